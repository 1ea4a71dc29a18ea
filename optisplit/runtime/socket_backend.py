"""The socket backend: workers joined by authenticated TCP connections carrying raw tensor frames.

The orchestrator opens a control connection to every worker of the plan, listens as the sink,
and deploys the stages last to first, telling each where to send (the next stage's worker or
the sink); it then connects to stage 1 as the source. Activations flow worker to worker; the
orchestrator only sends inputs and receives outputs. See :mod:`optisplit.runtime.wire` for the
frames and handshake, :mod:`optisplit.runtime.worker` for the stage side.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from optisplit.errors import RuntimeFailure
from optisplit.runtime import wire
from optisplit.runtime.base import Backend, ModelSpec, Reply, StagePlacement
from optisplit.runtime.control import RemoteDeployment, started
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
        return started(SocketDeployment(self, tuple(stages)), spec)


class SocketDeployment(RemoteDeployment):
    def __init__(self, backend: SocketBackend, stages: tuple[StagePlacement, ...]) -> None:
        super().__init__(stages, backend.token, backend.same_clock)
        self._backend = backend
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._sink_sock: socket.socket | None = None
        self._source: socket.socket | None = None
        self._closed = False

    def start(self, spec: ModelSpec) -> None:
        controls = [self.control(s) for s in self.stages]
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
                self.replies.put(reply)
        except FrameError as exc:
            if not self._stop.is_set():
                self.replies.put(RuntimeFailure(str(exc)))

    def submit(self, request_id: int, inputs: Sequence[torch.Tensor]) -> float:
        assert self._source is not None
        sent = time.perf_counter()
        try:
            wire.send_frame(self._source, Kind.DATA, request_id, inputs, timeout=60.0)
        except FrameError as exc:
            raise self.failure(f"sending request {request_id} to stage 1: {exc}") from None
        return sent

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.close_controls()
        for sock in (self._source, self._sink_sock, self._listener):
            if sock is not None:
                sock.close()
