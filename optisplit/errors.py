"""The exception hierarchy: one root, precise subclasses that also subclass the built-in they resemble."""

from __future__ import annotations

__all__ = [
    "InvalidPlanError",
    "ModelError",
    "OptisplitError",
    "ProfileError",
    "RuntimeFailure",
    "SearchError",
    "StudyError",
    "TestbedError",
    "TraceError",
    "UsageError",
]


class OptisplitError(Exception):
    """Root of every error optisplit raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class UsageError(OptisplitError, ValueError):
    """The user asked for something malformed (bad flag value, bad name); exit code 2."""

    exit_code = 2


class ModelError(UsageError):
    """Unknown model name, bad factory spec, unreadable weights file."""


class TraceError(OptisplitError):
    """A model could not be traced into a chain of blocks, or a cut did not verify."""


class InvalidPlanError(UsageError):
    """A split plan is malformed or does not fit the chain and testbed."""


class ProfileError(OptisplitError, ValueError):
    """A profile file is missing, unreadable, or of an unknown schema."""


class TestbedError(OptisplitError, ValueError):
    """A testbed file is malformed, or the emulated testbed could not be built."""

    __test__ = False  # not a pytest test class


class SearchError(OptisplitError):
    """A search could not be run (bad engine, budget, storage)."""


class StudyError(OptisplitError):
    """A study is missing, already exists, or its storage URL is malformed."""


class RuntimeFailure(OptisplitError):
    """A deployment failed: a worker died, timed out, or sent something invalid."""
