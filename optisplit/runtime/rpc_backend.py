"""The RPC backend: ``torch.distributed.rpc`` (TensorPipe) with stages held as RRefs on workers.

Per deployment, every worker starts a child process that joins an RPC group (rank 0 is the
orchestrator). Each stage module is built on its worker by ``rpc.remote`` (the orchestrator keeps
the RRefs); a request enters stage 1 with ``rpc_async``, each stage calls the next one with
``rpc_async`` and the last stage delivers to the orchestrator (the sink), so activations never
relay through the orchestrator. TensorPipe is limited to the ``uv`` transport and ``basic``
channel and bound to the interface that carries the worker's address, so traffic crosses the
(emulated) links instead of shared memory.

Security: RPC unpickles what it receives (arguments, RRefs), and its rendezvous store listens
without authentication. Use it on trusted networks only; the socket backend has neither issue.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from optisplit.errors import RuntimeFailure
from optisplit.runtime import wire
from optisplit.runtime.base import (
    Backend,
    ModelSpec,
    Reply,
    StagePlacement,
)
from optisplit.runtime.control import RemoteDeployment, started
from optisplit.runtime.wire import Kind

if TYPE_CHECKING:
    import torch

__all__ = ["RpcBackend", "RpcDeployment", "interface_of", "start_rpc_process"]

log = logging.getLogger(__name__)

ORCHESTRATOR = "orchestrator"
_RPC_TIMEOUT_S = 120.0

# -- worker side (the RPC child process) ----------------------------------------------------------

_STAGES: dict[int, _StageHolder] = {}
_TORCH_DEVICE = ["cpu"]  # this RPC child's compute device, set from its worker's --torch-device
_REPLIES: queue.Queue[Any] = queue.Queue()


class _StageHolder:
    """One stage's module on its worker, computing on one thread of its own, calls in order.

    RPC runs each call on whichever of its handler threads is free; computing there made every
    handler thread's first calls slow (its own heap arena and kernel scratch memory to fault in)
    and let waiting calls overtake each other. The handler now hands the tensors to the stage's
    thread and waits, as the socket worker's compute thread takes frames from its queue.
    """

    def __init__(self, index: int, spec: dict[str, Any], start: int, end: int, nxt: str) -> None:
        from optisplit.pace import pace_from_env
        from optisplit.runtime.stage import build_stage

        torch_device = _TORCH_DEVICE[0]
        self.index = index
        self.module = build_stage(
            ModelSpec.from_dict(spec), start, end, torch_device=torch_device, pace=pace_from_env()
        )
        self.next = nxt
        self.torch_device = torch_device
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{index}")
        _STAGES[index] = self

    def run(self, tensors: tuple[Any, ...]) -> tuple[tuple[Any, ...], float, float]:
        """The stage's outputs and compute start and end times, computed on its own thread."""
        from optisplit.runtime.stage import run_stage

        job = self.executor.submit(run_stage, self.module, tensors, self.torch_device)
        return job.result()

    def ready(self) -> bool:
        return True


def _stage_call(
    index: int, request_id: int, tensors: tuple[Any, ...], stamps: tuple[float, ...]
) -> None:
    """Run stage ``index`` on this worker, then hand the result to the next stage or the sink."""
    import torch.distributed.rpc as rpc

    received = time.perf_counter()
    holder = _STAGES[index]
    outputs, begin, end = holder.run(tensors)
    stamps = (*stamps, received, begin, end, time.perf_counter())
    if holder.next == ORCHESTRATOR:
        future = rpc.rpc_async(ORCHESTRATOR, _deliver, args=(request_id, outputs, stamps))
    else:
        future = rpc.rpc_async(
            holder.next, _stage_call, args=(index + 1, request_id, outputs, stamps)
        )
    future.add_done_callback(_forward_failure)


def _forward_failure(future: Any) -> None:
    try:
        future.wait()
    except Exception as exc:
        import torch.distributed.rpc as rpc

        rpc.rpc_async(ORCHESTRATOR, _deliver_failure, args=(f"{type(exc).__name__}: {exc}",))


# -- orchestrator side ------------------------------------------------------------------------


def _deliver(request_id: int, outputs: tuple[Any, ...], stamps: tuple[float, ...]) -> None:
    _REPLIES.put(Reply(request_id, tuple(outputs), tuple(stamps), time.perf_counter()))


def _deliver_failure(reason: str) -> None:
    _REPLIES.put(RuntimeFailure(f"a stage failed: {reason}"))


def interface_of(address: str) -> str | None:
    """Name of the network interface that holds ``address`` (psutil), None if none does."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            return str(name)
    return None


def _rpc_options(master_addr: str, master_port: int) -> Any:
    import torch.distributed.rpc as rpc

    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=16,
        rpc_timeout=_RPC_TIMEOUT_S,
        init_method=f"tcp://{master_addr}:{master_port}",
        _transports=["uv"],
        _channels=["basic"],
    )


def _bind_interface(local_address: str) -> None:
    ifname = interface_of(local_address)
    if ifname is not None:
        os.environ["TP_SOCKET_IFNAME"] = ifname
        os.environ["GLOO_SOCKET_IFNAME"] = ifname


def start_rpc_process(
    doc: dict[str, Any], torch_device: str, local_address: str
) -> subprocess.Popen[bytes]:
    """On a worker: start the child that joins the RPC group described by ``doc``."""
    from optisplit.runtime.launcher import spawn

    fields = {"master_addr": str, "master_port": int, "rank": int, "world_size": int, "name": str}
    for key, kind in fields.items():
        if not isinstance(doc.get(key), kind):
            raise RuntimeFailure(f"rpc field {key!r} must be {kind.__name__}")
    argv = [
        sys.executable, "-m", "optisplit.runtime.rpc_backend", "stage",
        "--name", doc["name"], "--rank", str(doc["rank"]), "--world-size", str(doc["world_size"]),
        "--master-addr", doc["master_addr"], "--master-port", str(doc["master_port"]),
        "--local-address", local_address, "--torch-device", torch_device,
    ]  # fmt: skip
    return spawn(argv, stdout=subprocess.DEVNULL, stderr=None)


def _stage_main(args: argparse.Namespace) -> int:
    """The RPC child of a worker: joins the group and serves stage calls until shutdown."""
    import torch.distributed.rpc as rpc

    from optisplit.runtime.stage import configure_torch

    configure_torch(1, args.torch_device)
    _TORCH_DEVICE[0] = args.torch_device
    _bind_interface(args.local_address)
    rpc.init_rpc(
        args.name,
        rank=args.rank,
        world_size=args.world_size,
        rpc_backend_options=_rpc_options(args.master_addr, args.master_port),
    )
    rpc.shutdown()  # graceful: serves stage calls until the orchestrator shuts down too
    return 0


class _Driver:
    """Rank 0 of a deployment's RPC group, in its own process (RPC cannot re-initialise in one).

    It talks to the orchestrator over a socket pair with wire frames: DEPLOY -> READY, DATA in
    (requests) and out (replies, stamps followed by sent and received), CLOSE -> CLOSED.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.rrefs: list[Any] = []
        self.names: list[str] = []
        self.sent: dict[int, float] = {}
        self.healthy = True

    def send(
        self,
        kind: Kind,
        request_id: int = 0,
        tensors: Any = (),
        stamps: Any = (),
        body: bytes = b"",
    ) -> None:
        with self.lock:
            wire.send_frame(self.sock, kind, request_id, tensors, stamps, body, timeout=60.0)

    def fail(self, reason: str) -> None:
        self.healthy = False
        self.send(Kind.ERROR, body=json.dumps({"error": reason}).encode())

    def deploy(self, doc: dict[str, Any]) -> None:
        import torch.distributed.rpc as rpc

        from optisplit.runtime.stage import configure_torch

        configure_torch(1, "cpu")
        _bind_interface(doc["master_addr"])
        rpc.init_rpc(
            ORCHESTRATOR,
            rank=0,
            world_size=doc["world_size"],
            rpc_backend_options=_rpc_options(doc["master_addr"], doc["master_port"]),
        )
        stages = doc["stages"]
        self.names = [s["name"] for s in stages]
        for index, stage in enumerate(stages):
            nxt = ORCHESTRATOR if index == len(stages) - 1 else stages[index + 1]["name"]
            args = (index, doc["spec"], stage["start"], stage["end"], nxt)
            self.rrefs.append(rpc.remote(stage["name"], _StageHolder, args=args))
        for stage, rref in zip(stages, self.rrefs):
            try:
                rref.rpc_sync(timeout=_RPC_TIMEOUT_S).ready()
            except Exception as exc:
                raise RuntimeFailure(f"stage {stage['device']} failed to build: {exc}") from None

    def serve(self) -> None:
        import torch.distributed.rpc as rpc

        threading.Thread(target=self._reply_loop, daemon=True).start()
        while True:
            frame = wire.recv_frame(self.sock, eof_ok=True)
            if frame is None or frame.kind == Kind.CLOSE:
                break
            self.sent[frame.request_id] = time.perf_counter()
            future = rpc.rpc_async(
                self.names[0], _stage_call, args=(0, frame.request_id, tuple(frame.tensors), ())
            )
            future.add_done_callback(_forward_failure_local)
        self.rrefs.clear()
        try:
            rpc.shutdown(graceful=self.healthy, timeout=30.0)
        finally:
            if frame is not None:
                self.send(Kind.CLOSED, body=b"{}")

    def _reply_loop(self) -> None:
        while True:
            item = _REPLIES.get()
            if isinstance(item, RuntimeFailure):
                self.fail(str(item))
                continue
            sent = self.sent.pop(item.request_id, float("nan"))
            self.send(
                Kind.DATA, item.request_id, item.outputs, (*item.stamps, sent, item.received)
            )


def _forward_failure_local(future: Any) -> None:
    try:
        future.wait()
    except Exception as exc:
        _REPLIES.put(RuntimeFailure(f"stage 1 failed: {type(exc).__name__}: {exc}"))


def _driver_main(args: argparse.Namespace) -> int:
    sock = socket.socket(fileno=args.fd)
    driver = _Driver(sock)
    try:
        hello = wire.expect(sock, Kind.DEPLOY, timeout=60.0)
        driver.deploy(hello.json())
    except Exception as exc:
        driver.send(Kind.ERROR, body=json.dumps({"error": f"{exc}"}).encode())
        return 1
    driver.send(Kind.READY, body=b"{}")
    driver.serve()
    return 0


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optisplit-rpc")
    sub = parser.add_subparsers(dest="role", required=True)
    stage = sub.add_parser("stage")
    for flag in ("--name", "--master-addr", "--local-address", "--torch-device"):
        stage.add_argument(flag, required=True)
    for flag in ("--rank", "--world-size", "--master-port"):
        stage.add_argument(flag, type=int, required=True)
    driver = sub.add_parser("driver")
    driver.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    from optisplit.runtime.launcher import die_with_parent

    # torch's own rpc.shutdown() gathers over its Gloo group in a way torch itself deprecates;
    # the warning says nothing about the user's plan and would end up in their terminal
    warnings.filterwarnings(
        "ignore", message=r"You are using a Backend .* as a ProcessGroup", category=UserWarning
    )

    die_with_parent()
    return _stage_main(args) if args.role == "stage" else _driver_main(args)


class RpcBackend(Backend):
    """Drives ``optisplit worker`` processes, each running its stages in an RPC child process.

    Rank 0 (the source and sink) is a driver process per deployment, because
    ``torch.distributed.rpc`` cannot be initialised twice in one process; the driver stamps
    ``sent`` and ``received`` on this host's monotonic clock.

    Args:
        token: the workers' shared secret (control connections only; RPC itself has none).
        same_clock: every worker runs on this host.
    """

    name: ClassVar[str] = "rpc"

    def __init__(self, token: bytes, *, same_clock: bool = True) -> None:
        self.token = token
        self.same_clock = same_clock

    def deploy(self, spec: ModelSpec, stages: Sequence[StagePlacement]) -> RpcDeployment:
        return started(RpcDeployment(self, tuple(stages)), spec)


class RpcDeployment(RemoteDeployment):
    def __init__(self, backend: RpcBackend, stages: tuple[StagePlacement, ...]) -> None:
        super().__init__(stages, backend.token, backend.same_clock)
        self._names: dict[tuple[str, int], str] = {}
        self._driver: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._closed = False

    def start(self, spec: ModelSpec) -> None:
        for stage in self.stages:
            self.control(stage)
            self._names.setdefault(stage.address, f"w{len(self._names) + 1}")  # type: ignore[arg-type]
        master = next(iter(self.controls.values())).sock.getsockname()[0]
        port = _free_port(master)
        world = len(self.controls) + 1
        for address, control in self.controls.items():
            name = self._names[address]
            doc = {
                "master_addr": master,
                "master_port": port,
                "rank": int(name[1:]),
                "world_size": world,
                "name": name,
            }
            control.request(
                Kind.DEPLOY,
                {"backend": "rpc", "spec": spec.to_dict(), "rpc": doc},
                Kind.READY,
                60.0,
            )
        self._start_driver(spec, master, port, world)

    def _start_driver(self, spec: ModelSpec, master: str, port: int, world: int) -> None:
        from optisplit.runtime.launcher import spawn

        parent, child = socket.socketpair()
        self._sock = parent
        argv = [
            sys.executable,
            "-m",
            "optisplit.runtime.rpc_backend",
            "driver",
            "--fd",
            str(child.fileno()),
        ]
        self._driver = spawn(
            argv, stdout=subprocess.DEVNULL, stderr=None, pass_fds=(child.fileno(),)
        )
        child.close()
        stages = [
            {"name": self._names[s.address], "device": s.device, "start": s.start, "end": s.end}  # type: ignore[index]
            for s in self.stages
        ]
        doc = {
            "spec": spec.to_dict(),
            "stages": stages,
            "master_addr": master,
            "master_port": port,
            "world_size": world,
        }
        try:
            wire.send_control(parent, Kind.DEPLOY, doc)
            wire.expect(parent, Kind.READY, timeout=_RPC_TIMEOUT_S)
        except wire.FrameError as exc:
            raise RuntimeFailure(self.diagnose() or f"RPC deployment failed: {exc}") from None
        threading.Thread(target=self._reply_loop, daemon=True).start()

    def _reply_loop(self) -> None:
        assert self._sock is not None
        try:
            while not self._stop.is_set():
                frame = wire.recv_frame(self._sock, stop=self._stop, eof_ok=True)
                if frame is None:
                    raise wire.FrameError("the RPC driver exited")
                if frame.kind == Kind.ERROR:
                    raise wire.FrameError(str(frame.json().get("error")))
                if frame.kind == Kind.CLOSED:
                    return
                *stamps, sent, received = frame.stamps
                self.replies.put(
                    Reply(frame.request_id, tuple(frame.tensors), tuple(stamps), received, sent)
                )
        except wire.FrameError as exc:
            if not self._stop.is_set():
                self.replies.put(RuntimeFailure(str(exc)))

    def submit(self, request_id: int, inputs: Sequence[torch.Tensor]) -> float:
        assert self._sock is not None
        sent = time.perf_counter()
        try:
            wire.send_frame(self._sock, Kind.DATA, request_id, inputs, timeout=60.0)
        except wire.FrameError as exc:
            raise RuntimeFailure(self.diagnose() or f"RPC driver: {exc}") from None
        return sent

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        healthy = self.diagnose() is None
        if self._sock is not None and self._driver is not None:
            if healthy:
                try:
                    wire.send_control(self._sock, Kind.CLOSE, {}, timeout=5.0)
                    self._driver.wait(timeout=40.0)
                except (wire.FrameError, subprocess.TimeoutExpired):
                    log.warning("the RPC driver did not shut down cleanly")
            self._stop.set()
            from optisplit.runtime.launcher import stop_process

            stop_process(self._driver)
            self._sock.close()
        self.close_controls()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    # Run from the imported module, so that functions RPC resolves by name share its state.
    from optisplit.runtime import rpc_backend

    sys.exit(rpc_backend._child_main())
