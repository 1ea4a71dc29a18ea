"""The public surface: a sorted __all__ whose every name resolves, and a fast-starting CLI."""

from __future__ import annotations

import subprocess
import sys

import optisplit


def test_all_is_sorted_and_resolves() -> None:
    assert optisplit.__all__ == sorted(optisplit.__all__)
    for name in optisplit.__all__:
        assert getattr(optisplit, name) is not None, name


def test_help_does_not_import_torch() -> None:
    code = "import sys; from optisplit.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pure_core_does_not_import_torch() -> None:
    code = (
        "import sys, optisplit.plan, optisplit.profile, optisplit.errors; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_without_command_prints_help_and_exits_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "optisplit"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2
    assert "usage: optisplit" in out.stdout
