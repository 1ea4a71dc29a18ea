"""The stage server (``optisplit worker``): builds its block ranges, streams frames between stages.

One orchestrator at a time owns the worker through a *control* connection; over it, it deploys
one or more stages (a block range, or a relay when the device only feeds or collects) and reads
resource statistics. Each deployed stage then receives frames on a *data* connection from its
upstream peer, computes, and sends straight to its downstream peer (the next stage or the sink):
receive, compute and send run in three threads joined by bounded queues, so they overlap and
apply back-pressure. Losing the control connection tears the deployment down.

Anything a client sends is checked (wire limits, HMAC handshake, JSON fields); a bad connection is
logged and dropped, and the worker keeps serving. Connections that do not start with the wire
magic are handed to the link-probe server when one is available.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from optisplit.errors import OptisplitError, RuntimeFailure
from optisplit.pace import pace_from_env
from optisplit.runtime import wire
from optisplit.runtime.base import ModelSpec
from optisplit.runtime.stage import ResourceSampler, build_stage, run_stage
from optisplit.runtime.wire import FrameError, Kind

if TYPE_CHECKING:
    import subprocess

__all__ = ["Worker"]

log = logging.getLogger(__name__)

_DATA_ROLE = re.compile(r"^data:(\d{1,4})$")
_QUEUE_DEPTH = 2
_FRAME_TIMEOUT_S = 60.0
_POLL_S = 0.2


class _Stage:
    """One deployed block range: receiver, compute and sender threads with bounded queues."""

    def __init__(
        self,
        index: int,
        module: Any,
        downstream: socket.socket,
        torch_device: str,
        on_error: Any,
    ) -> None:
        self.index = index
        self.module = module
        self.downstream = downstream
        self.torch_device = torch_device
        self.on_error = on_error
        self.stop = threading.Event()
        self.upstream: socket.socket | None = None
        self._inbox: queue.Queue[Any] = queue.Queue(_QUEUE_DEPTH)
        self._outbox: queue.Queue[Any] = queue.Queue(_QUEUE_DEPTH)
        self._threads = [
            threading.Thread(target=self._guard, args=(self._compute_loop,), daemon=True),
            threading.Thread(target=self._guard, args=(self._send_loop,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def attach(self, upstream: socket.socket) -> None:
        if self.upstream is not None:
            raise FrameError(f"stage {self.index} already has an upstream connection")
        self.upstream = upstream
        thread = threading.Thread(target=self._guard, args=(self._receive_loop,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _guard(self, loop: Any) -> None:
        try:
            loop()
        except FrameError as exc:
            if not self.stop.is_set():
                self.fail(f"stage {self.index}: {exc}")
        except Exception as exc:
            log.exception("stage %d failed", self.index)
            self.fail(f"stage {self.index}: {type(exc).__name__}: {exc}")

    def fail(self, reason: str) -> None:
        if self.stop.is_set():
            return
        log.warning("%s", reason)
        self.on_error(reason)
        self.close()

    def _put(self, box: queue.Queue[Any], item: Any) -> None:
        while not self.stop.is_set():
            try:
                box.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _get(self, box: queue.Queue[Any]) -> Any:
        while not self.stop.is_set():
            try:
                return box.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def _receive_loop(self) -> None:
        assert self.upstream is not None
        while not self.stop.is_set():
            frame = wire.recv_frame(
                self.upstream, stop=self.stop, frame_timeout=_FRAME_TIMEOUT_S, eof_ok=True
            )
            if frame is None:  # a clean end of stream: the upstream is done with us
                log.info("stage %d: upstream closed the data connection", self.index)
                return
            if frame.kind != Kind.DATA:
                raise FrameError(f"expected DATA on the data connection, got {frame.kind.name}")
            frame.stamps.append(time.perf_counter())
            self._put(self._inbox, frame)

    def _compute_loop(self) -> None:
        while not self.stop.is_set():
            frame = self._get(self._inbox)
            if frame is None:
                return
            outputs, begin, end = run_stage(self.module, frame.tensors, self.torch_device)
            frame.tensors = list(outputs)
            frame.stamps += [begin, end]
            self._put(self._outbox, frame)

    def _send_loop(self) -> None:
        while not self.stop.is_set():
            frame = self._get(self._outbox)
            if frame is None:
                return
            frame.stamps.append(time.perf_counter())
            wire.send_frame(
                self.downstream,
                Kind.DATA,
                frame.request_id,
                frame.tensors,
                frame.stamps,
                timeout=_FRAME_TIMEOUT_S,
            )

    def close(self) -> None:
        self.stop.set()
        for sock in (self.upstream, self.downstream):
            if sock is not None:
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already disconnected: closing is all that is left
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _Session:
    """What one control connection deployed: stages (socket) or an RPC process."""

    def __init__(self, control: socket.socket, token: bytes, torch_device: str) -> None:
        self.control = control
        self.token = token
        self.torch_device = torch_device
        self.stages: dict[int, _Stage] = {}
        self.rpc_process: subprocess.Popen[bytes] | None = None
        self.sampler: ResourceSampler | None = None
        self.send_lock = threading.Lock()

    def send(self, kind: Kind, document: dict[str, Any]) -> None:
        with self.send_lock:
            wire.send_control(self.control, kind, document, timeout=10.0)

    def report(self, reason: str) -> None:
        try:
            self.send(Kind.ERROR, {"error": reason})
        except FrameError:
            log.warning("could not report to the orchestrator: %s", reason)

    def close(self) -> None:
        for stage in self.stages.values():
            stage.close()
        self.stages.clear()
        if self.rpc_process is not None:
            from optisplit.runtime.launcher import stop_process

            stop_process(self.rpc_process)
            self.rpc_process = None
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None


class Worker:
    """A stage server listening on ``host:port`` (port 0 picks a free one).

    Args:
        token: the shared secret every connection must prove it holds.
        torch_device: where stages compute ("cpu" or "cuda"); tensors travel as CPU bytes.
        max_connections: connections handled at once; more are refused at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        *,
        torch_device: str = "cpu",
        max_connections: int = 32,
    ) -> None:
        if not token:
            raise RuntimeFailure("the worker token is empty")
        self.token = token
        self.torch_device = torch_device
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self.rejected = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown``; each is handled in its own thread."""
        self._listener.settimeout(_POLL_S)
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                log.warning("refused %s: too many connections", peer)
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def shutdown(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            if self._session is not None:
                self._session.close()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        keep = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._starts_with_magic(conn):
                keep = self._probe(conn, peer)
                return
            role = wire.server_handshake(conn, self.token)
            if role == "control":
                self._control_loop(conn)
            else:
                keep = self._attach(conn, role)
        except (FrameError, OptisplitError, OSError) as exc:
            self.rejected += 1
            log.warning("rejected connection from %s: %s", _peer(peer), exc)
        except Exception:
            self.rejected += 1
            log.exception("connection from %s failed", _peer(peer))
        finally:
            if not keep:
                _close(conn)
            self._slots.release()

    def _starts_with_magic(self, conn: socket.socket) -> bool:
        deadline = time.monotonic() + 5.0
        head = b""
        while len(head) < len(wire.MAGIC):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameError("no data within 5 s")
            conn.settimeout(remaining)
            try:
                head = conn.recv(len(wire.MAGIC), socket.MSG_PEEK)
            except TimeoutError:
                continue
            if not head:
                raise FrameError("closed before sending anything")
            if not wire.MAGIC.startswith(head):
                return False
            if len(head) < len(wire.MAGIC):
                time.sleep(0.01)
        return True

    def _probe(self, conn: socket.socket, peer: Any) -> bool:
        try:
            from optisplit.probe import serve_probe_connection
        except ImportError:
            raise FrameError("not an optisplit frame (bad magic)") from None
        serve_probe_connection(conn, self.token)
        return False

    def _attach(self, conn: socket.socket, role: str) -> bool:
        match = _DATA_ROLE.match(role)
        if match is None:
            raise FrameError(f"unknown role {role!r}")
        with self._lock:
            session = self._session
            stage = session.stages.get(int(match[1])) if session is not None else None
            if stage is None:
                raise FrameError(f"no stage {match[1]} is deployed here")
            stage.attach(conn)
        return True

    # -- control -------------------------------------------------------------------------------

    def _control_loop(self, conn: socket.socket) -> None:
        session = _Session(conn, self.token, self.torch_device)
        try:
            while True:
                frame = wire.recv_frame(conn, stop=self._stop, max_tensor_bytes=0, eof_ok=True)
                if frame is None:
                    return
                self._dispatch(session, frame)
        finally:
            with self._lock:
                if self._session is session:
                    self._session = None
            session.close()

    def _dispatch(self, session: _Session, frame: wire.Frame) -> None:
        doc = frame.json()
        if frame.kind == Kind.DEPLOY:
            if not self._claim(session):
                session.send(
                    Kind.ERROR, {"error": "busy: another orchestrator holds a deployment"}
                )
                return
            try:
                reply = self._deploy(session, doc)
            except OptisplitError as exc:
                session.send(Kind.ERROR, {"error": str(exc)})
                return
            except Exception as exc:
                log.exception("deploy failed")
                session.send(Kind.ERROR, {"error": f"{type(exc).__name__}: {exc}"})
                return
            session.send(Kind.READY, reply)
        elif frame.kind in (Kind.STATS, Kind.RESET_STATS):
            if session.sampler is None:
                raise FrameError("no deployment to report on")
            if frame.kind == Kind.RESET_STATS:
                session.sampler.reset()
            cpu, memory = session.sampler.read()
            session.send(Kind.STATS_REPLY, {"cpu_percent": cpu, "memory_bytes": memory})
        elif frame.kind == Kind.CLOSE:
            session.close()
            with self._lock:
                if self._session is session:
                    self._session = None
            session.send(Kind.CLOSED, {})
        else:
            raise FrameError(f"unexpected {frame.kind.name} on the control connection")

    def _claim(self, session: _Session) -> bool:
        """Make ``session`` the owner of this worker unless another one holds it."""
        with self._lock:
            if self._session is not None and self._session is not session:
                log.warning("refused a deployment: another orchestrator holds this worker")
                return False
            self._session = session
            return True

    def _deploy(self, session: _Session, doc: dict[str, Any]) -> dict[str, Any]:
        spec = ModelSpec.from_dict(_field(doc, "spec", dict))
        backend = _field(doc, "backend", str)
        began = time.perf_counter()
        if backend == "rpc":
            from optisplit.runtime.rpc_backend import start_rpc_process

            local = str(session.control.getsockname()[0])
            session.rpc_process = start_rpc_process(
                _field(doc, "rpc", dict), self.torch_device, local
            )
            session.sampler = ResourceSampler(session.rpc_process.pid)
            return {"pid": session.rpc_process.pid, "build_s": time.perf_counter() - began}
        if backend != "socket":
            raise FrameError(f"unknown backend {backend!r}")
        index = _field(doc, "stage", int)
        start, end = _field(doc, "start", int), _field(doc, "end", int)
        if index in session.stages:
            raise FrameError(f"stage {index} is already deployed")
        module = build_stage(
            spec, start, end, torch_device=self.torch_device, pace=pace_from_env()
        )
        nxt = _field(doc, "next", dict)
        address = _address(nxt.get("address"))
        role = f"data:{_field(nxt, 'stage', int)}"
        downstream = wire.connect(address, self.token, role)
        stage = _Stage(index, module, downstream, self.torch_device, session.report)
        session.stages[index] = stage
        if session.sampler is None:
            session.sampler = ResourceSampler()
        params = sum(p.numel() * p.element_size() for p in getattr(module, "parameters", list)())
        return {"param_bytes": params, "build_s": time.perf_counter() - began}


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FrameError(f"control field {name!r} must be {kind.__name__}")
    return value


def _address(value: Any) -> tuple[str, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or not 0 < value[1] < 65536
    ):
        raise FrameError(f"malformed address {json.dumps(value)[:60]}")
    return value[0], value[1]


def _peer(peer: Any) -> str:
    try:
        return f"{peer[0]}:{peer[1]}"
    except (TypeError, IndexError):
        return str(peer)
