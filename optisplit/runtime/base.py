"""What every runtime backend provides: deploy a plan's stages, stream requests, read stats, close.

A :class:`Backend` turns a model spec and an ordered list of stage placements into a live
:class:`Deployment`. Lifecycle and invariants, shared by every backend and checked by one
contract test suite:

1. ``deploy`` returns only when every stage has built its block range and the data path
   source -> stage 1 -> ... -> stage k -> sink is connected (stage i sends straight to stage i+1,
   the last stage to the sink; never through the orchestrator).
2. ``submit(request_id, inputs)`` sends one request and returns the monotonic time it was sent;
   ``receive(timeout)`` returns the next completed request (FIFO) with its outputs and the
   per-stage timestamps ``(receive, compute start, compute end, send)`` of every stage.
3. ``reset_stats`` / ``stats`` bracket a measurement window: per stage CPU utilisation and
   memory, sampled by the process that runs the stage.
4. ``close`` is idempotent and releases every stage; a failed deployment raises
   :class:`~optisplit.errors.RuntimeFailure` naming the stage and the reason.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from optisplit.errors import RuntimeFailure

if TYPE_CHECKING:
    import torch

__all__ = [
    "STAMPS_PER_STAGE",
    "Backend",
    "Deployment",
    "ModelSpec",
    "Reply",
    "StagePlacement",
    "StageStats",
]

STAMPS_PER_STAGE = 4
"""Per stage: received, compute start, compute end, send (monotonic seconds of its host)."""


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the model it takes its block range from (no pickled modules travel)."""

    model: str
    batch_size: int = 1
    granularity: str = "coarse"
    module: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ModelSpec:
        """Build from a control message, checking every field's type."""
        checks: dict[str, tuple[type, ...]] = {
            "model": (str,),
            "batch_size": (int,),
            "granularity": (str,),
            "module": (str, type(None)),
            "weights": (str, type(None)),
            "weights_sha256": (str, type(None)),
            "seed": (int,),
        }
        unknown = set(doc) - set(checks)
        if unknown:
            raise RuntimeFailure(f"model spec has unknown fields {sorted(unknown)}")
        for name, types in checks.items():
            if name in doc and not isinstance(doc[name], types):
                raise RuntimeFailure(f"model spec field {name!r} has the wrong type")
        if "model" not in doc:
            raise RuntimeFailure("model spec lacks 'model'")
        spec = cls(**doc)
        if spec.batch_size < 1:
            raise RuntimeFailure(f"batch size must be >= 1, got {spec.batch_size}")
        return spec


@dataclass(frozen=True)
class StagePlacement:
    """One stage of a deployment: ``device`` runs blocks ``start .. end-1`` (start == end relays).

    ``address`` is the worker's (host, port) for remote backends, None in process.
    """

    device: str
    start: int
    end: int
    address: tuple[str, int] | None = None

    @property
    def relay(self) -> bool:
        return self.start == self.end


@dataclass(frozen=True)
class Reply:
    """One completed request: outputs at the sink and every stage's timestamps."""

    request_id: int
    outputs: tuple[torch.Tensor, ...]
    stamps: tuple[float, ...]
    received: float
    sent: float | None = None
    """When the source sent it, if stamped by the backend (else ``submit``'s return value)."""


@dataclass(frozen=True)
class StageStats:
    """What the process running a stage sampled about itself over the measurement window."""

    device: str
    cpu_percent: float
    memory_bytes: int
    compute_ms: float | None = None


class Deployment(abc.ABC):
    """A plan's stages, live; see the module docstring for the lifecycle."""

    stages: tuple[StagePlacement, ...]
    same_clock: bool = True
    """True when every stage stamps with the orchestrator's monotonic clock (one host)."""

    @abc.abstractmethod
    def submit(self, request_id: int, inputs: Sequence[torch.Tensor]) -> float:
        """Send one request into stage 1; returns the monotonic time it was sent."""

    @abc.abstractmethod
    def receive(self, timeout: float) -> Reply:
        """The next completed request; RuntimeFailure on timeout or a failed stage."""

    @abc.abstractmethod
    def stats(self) -> list[StageStats]:
        """Per stage CPU and memory since the last ``reset_stats``."""

    def reset_stats(self) -> None:  # noqa: B027 - optional hook
        """Start a new measurement window."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every stage; idempotent."""

    def __enter__(self) -> Deployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Backend(abc.ABC):
    """Deploys stage placements; one instance may deploy many plans, one at a time."""

    name: ClassVar[str]

    @abc.abstractmethod
    def deploy(self, spec: ModelSpec, stages: Sequence[StagePlacement]) -> Deployment:
        """Build and connect every stage; RuntimeFailure naming the stage that failed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend-wide resources (listeners, RPC groups)."""
