"""The socket backend: workers joined by authenticated TCP connections carrying raw tensor frames.

The orchestrator opens a control connection to every worker of the plan, listens as the sink,
and deploys the stages last to first, telling each where to send (the next stage's worker or
the sink); it then connects to stage 1 as the source. Activations flow worker to worker; the
orchestrator only sends inputs and receives outputs. See :mod:`optisplit.runtime.wire` for the
frames and handshake, :mod:`optisplit.runtime.worker` for the stage side.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from optisplit.errors import RuntimeFailure
from optisplit.runtime import wire
from optisplit.runtime.base import (
    Backend,
    Deployment,
    ModelSpec,
    Reply,
    StagePlacement,
    StageStats,
)
from optisplit.runtime.wire import FrameError, Kind

if TYPE_CHECKING:
    import torch

__all__ = ["SocketBackend", "SocketDeployment"]

log = logging.getLogger(__name__)

SINK_STAGE = 9999
"""Stage index the sink answers to in the data handshake (``data:9999``)."""


class SocketBackend(Backend):
    """Drives ``optisplit worker`` processes over TCP.

    Args:
        token: the shared secret of the workers.
        same_clock: every worker runs on this host (hop times can be computed).
        deploy_timeout_s: how long a worker may take to build its stage.
    """

    name: ClassVar[str] = "socket"

    def __init__(
        self, token: bytes, *, same_clock: bool = True, deploy_timeout_s: float = 300.0
    ) -> None:
        self.token = token
        self.same_clock = same_clock
        self.deploy_timeout_s = deploy_timeout_s

    def deploy(self, spec: ModelSpec, stages: Sequence[StagePlacement]) -> SocketDeployment:
        deployment = SocketDeployment(self, tuple(stages))
        try:
            deployment.start(spec)
        except BaseException:
            deployment.close()
            raise
        return deployment


class _Control:
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


class SocketDeployment(Deployment):
    def __init__(self, backend: SocketBackend, stages: tuple[StagePlacement, ...]) -> None:
        self.stages = stages
        self.same_clock = backend.same_clock
        self._backend = backend
        self._controls: dict[tuple[str, int], _Control] = {}
        self._replies: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._sink_sock: socket.socket | None = None
        self._source: socket.socket | None = None
        self._closed = False

    def _control(self, stage: StagePlacement) -> _Control:
        if stage.address is None:
            raise RuntimeFailure(f"stage {stage.device} has no worker address")
        if stage.address not in self._controls:
            self._controls[stage.address] = _Control(
                stage.address, stage.device, self._backend.token
            )
        return self._controls[stage.address]

    def start(self, spec: ModelSpec) -> None:
        controls = [self._control(s) for s in self.stages]
        sink_host = controls[-1].sock.getsockname()[0]
        self._listener = socket.create_server((sink_host, 0))
        accepted = threading.Thread(target=self._accept_sink, daemon=True)
        accepted.start()
        sink = [sink_host, self._listener.getsockname()[1]]
        for index in reversed(range(len(self.stages))):
            stage = self.stages[index]
            nxt = (
                {"address": sink, "stage": SINK_STAGE}
                if index == len(self.stages) - 1
                else {"address": list(self.stages[index + 1].address or ()), "stage": index + 1}
            )
            doc = {
                "backend": "socket",
                "spec": spec.to_dict(),
                "stage": index,
                "start": stage.start,
                "end": stage.end,
                "next": nxt,
            }
            controls[index].request(Kind.DEPLOY, doc, Kind.READY, self._backend.deploy_timeout_s)
        accepted.join(timeout=30.0)
        if self._sink_sock is None:
            raise RuntimeFailure(
                f"the last stage ({self.stages[-1].device}) never connected to the sink"
            )
        first = self.stages[0]
        assert first.address is not None
        self._source = wire.connect(first.address, self._backend.token, "data:0")
        threading.Thread(target=self._sink_loop, daemon=True).start()

    def _accept_sink(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(30.0)
        try:
            conn, _ = self._listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            role = wire.server_handshake(conn, self._backend.token)
        except (OSError, FrameError) as exc:
            log.warning("sink: %s", exc)
            return
        if role != f"data:{SINK_STAGE}":
            log.warning("sink: unexpected role %r", role)
            conn.close()
            return
        self._sink_sock = conn

    def _sink_loop(self) -> None:
        assert self._sink_sock is not None
        try:
            while not self._stop.is_set():
                frame = wire.recv_frame(
                    self._sink_sock, stop=self._stop, frame_timeout=60.0, eof_ok=True
                )
                received = time.perf_counter()
                if frame is None:
                    raise FrameError("the last stage closed its connection to the sink")
                if frame.kind != Kind.DATA:
                    raise FrameError(f"sink got {frame.kind.name}, expected DATA")
                reply = Reply(
                    frame.request_id, tuple(frame.tensors), tuple(frame.stamps), received
                )
                self._replies.put(reply)
        except FrameError as exc:
            if not self._stop.is_set():
                self._replies.put(RuntimeFailure(str(exc)))

    def submit(self, request_id: int, inputs: Sequence[torch.Tensor]) -> float:
        assert self._source is not None
        sent = time.perf_counter()
        try:
            wire.send_frame(self._source, Kind.DATA, request_id, inputs, timeout=60.0)
        except FrameError as exc:
            raise self._failure(f"sending request {request_id} to stage 1: {exc}") from None
        return sent

    def receive(self, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._replies.get(timeout=min(0.5, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                problem = self._diagnose()
                if problem is not None:
                    raise RuntimeFailure(problem) from None
                if time.monotonic() >= deadline:
                    raise RuntimeFailure(f"no reply within {timeout:g} s") from None
                continue
            if isinstance(item, RuntimeFailure):
                raise self._failure(str(item))
            return item  # type: ignore[no-any-return]

    def _diagnose(self) -> str | None:
        for control in self._controls.values():
            problem = control.diagnose()
            if problem is not None:
                return problem
        return None

    def _failure(self, symptom: str) -> RuntimeFailure:
        time.sleep(0.2)  # let the failing worker's report or disconnect arrive
        cause = self._diagnose()
        return RuntimeFailure(cause if cause is not None else symptom)

    def reset_stats(self) -> None:
        for control in self._controls.values():
            control.request(Kind.RESET_STATS, {}, Kind.STATS_REPLY, 30.0)

    def stats(self) -> list[StageStats]:
        replies = {
            a: c.request(Kind.STATS, {}, Kind.STATS_REPLY, 30.0) for a, c in self._controls.items()
        }
        out = []
        for stage in self.stages:
            assert stage.address is not None
            doc = replies[stage.address]
            out.append(
                StageStats(stage.device, float(doc["cpu_percent"]), int(doc["memory_bytes"]))
            )
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for control in self._controls.values():
            control.close()
        for sock in (self._source, self._sink_sock, self._listener):
            if sock is not None:
                sock.close()
