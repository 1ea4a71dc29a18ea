"""The orchestrator's side of worker control connections, shared by the socket and RPC backends.

A :class:`RemoteDeployment` holds one authenticated control connection per worker (deploy,
statistics, close) and a queue of replies filled by its backend. When a reply is late or a stage
fails, it asks every control connection what happened, so a failure names the worker and why
(its reported error, or that it went away).
"""

from __future__ import annotations

import abc
import logging
import queue
import select
import time
from typing import Any, TypeVar

from optisplit.errors import RuntimeFailure
from optisplit.runtime import wire
from optisplit.runtime.base import Deployment, ModelSpec, Reply, StagePlacement, StageStats
from optisplit.runtime.wire import FrameError, Kind

__all__ = ["RemoteDeployment", "WorkerControl"]

log = logging.getLogger(__name__)

_POLL_S = 0.5


class WorkerControl:
    """The control connection to one worker (one per distinct address)."""

    def __init__(self, address: tuple[str, int], device: str, token: bytes) -> None:
        self.address = address
        self.device = device
        self.sock = wire.connect(address, token, "control")

    @property
    def label(self) -> str:
        return f"worker {self.device} at {self.address[0]}:{self.address[1]}"

    def request(
        self, kind: Kind, doc: dict[str, Any], reply: Kind, timeout: float
    ) -> dict[str, Any]:
        """Send one control message and return the JSON of its reply of kind ``reply``."""
        try:
            wire.send_control(self.sock, kind, doc, timeout=timeout)
            return wire.expect(self.sock, reply, timeout=timeout).json()
        except wire.PeerError as exc:
            raise RuntimeFailure(f"{self.label}: {exc}") from None
        except FrameError as exc:
            raise RuntimeFailure(self._lost(exc)) from None

    def _lost(self, exc: Exception) -> str:
        return f"{self.label}: control connection lost; the worker died or was killed ({exc})"

    def diagnose(self) -> str | None:
        """The worker's reported error, or that it went away; None when it looks healthy."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return None
            frame = wire.recv_frame(self.sock, idle_timeout=1.0, max_tensor_bytes=0, eof_ok=True)
        except (FrameError, OSError, ValueError) as exc:
            return self._lost(exc)
        if frame is None:
            return f"{self.label} closed its control connection (the worker died or was killed)"
        if frame.kind == Kind.ERROR:
            return f"{self.label}: {frame.json().get('error', 'unknown error')}"
        return None

    def close(self) -> None:
        try:
            wire.send_control(self.sock, Kind.CLOSE, {}, timeout=5.0)
            wire.expect(self.sock, Kind.CLOSED, timeout=5.0)
        except (FrameError, OSError):
            log.debug("%s did not confirm the close", self.label)
        finally:
            self.sock.close()


class RemoteDeployment(Deployment):
    """A deployment on worker processes: control connections, a reply queue, diagnosis."""

    def __init__(self, stages: tuple[StagePlacement, ...], token: bytes, same_clock: bool) -> None:
        self.stages = stages
        self.same_clock = same_clock
        self.token = token
        self.controls: dict[tuple[str, int], WorkerControl] = {}
        self.replies: queue.Queue[Any] = queue.Queue()

    @abc.abstractmethod
    def start(self, spec: ModelSpec) -> None:
        """Deploy every stage on its worker; may leave connections open if it fails."""

    def control(self, stage: StagePlacement) -> WorkerControl:
        """The control connection of ``stage``'s worker, opened on first use."""
        if stage.address is None:
            raise RuntimeFailure(f"stage {stage.device} has no worker address")
        if stage.address not in self.controls:
            self.controls[stage.address] = WorkerControl(stage.address, stage.device, self.token)
        return self.controls[stage.address]

    def receive(self, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        while True:
            wait = min(_POLL_S, max(deadline - time.monotonic(), 0.001))
            try:
                item = self.replies.get(timeout=wait)
            except queue.Empty:
                problem = self.diagnose()
                if problem is not None:
                    raise RuntimeFailure(problem) from None
                if time.monotonic() >= deadline:
                    raise RuntimeFailure(f"no reply within {timeout:g} s") from None
                continue
            if isinstance(item, RuntimeFailure):
                raise self.failure(str(item))
            return item  # type: ignore[no-any-return]

    def diagnose(self) -> str | None:
        """The first problem a worker reports (or its disappearance); None when all look fine."""
        for control in self.controls.values():
            problem = control.diagnose()
            if problem is not None:
                return problem
        return None

    def failure(self, symptom: str) -> RuntimeFailure:
        """The error for ``symptom``: the worker-side cause when one shows up."""
        time.sleep(0.2)  # let the failing worker's report or disconnect arrive
        return RuntimeFailure(self.diagnose() or symptom)

    def reset_stats(self) -> None:
        for control in self.controls.values():
            control.request(Kind.RESET_STATS, {}, Kind.STATS_REPLY, 30.0)

    def stats(self) -> list[StageStats]:
        replies = {
            a: c.request(Kind.STATS, {}, Kind.STATS_REPLY, 30.0) for a, c in self.controls.items()
        }
        out = []
        for stage in self.stages:
            assert stage.address is not None
            doc = replies[stage.address]
            out.append(
                StageStats(stage.device, float(doc["cpu_percent"]), int(doc["memory_bytes"]))
            )
        return out

    def close_controls(self) -> None:
        for control in self.controls.values():
            control.close()


_D = TypeVar("_D", bound=RemoteDeployment)


def started(deployment: _D, spec: ModelSpec) -> _D:
    """Start ``deployment``; close whatever it opened when starting fails (or is interrupted)."""
    try:
        deployment.start(spec)
    except BaseException:
        deployment.close()
        raise
    return deployment
