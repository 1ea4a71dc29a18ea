"""Local worker processes: one ``optisplit worker`` per device, started and stopped by process id.

Used where a testbed gives no worker addresses. Each worker runs ``torch.set_num_threads(1)``
and is pinned to its device's cores; on an emulated testbed (``optisplit.emulate.is_up``) its
command is wrapped so it runs in the device's network namespace and CPU cgroup, and it listens on
the device's address. No orphans: every child gets ``PR_SET_PDEATHSIG`` (it dies with us), its
own process group, an ``atexit`` stop, and an explicit stop on error or Ctrl-C.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from optisplit.errors import RuntimeFailure

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

__all__ = ["LocalWorkers", "emulated", "stop_process"]

log = logging.getLogger(__name__)

PARENT_ENV = "OPTISPLIT_PARENT_PID"
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_LIVE: set[subprocess.Popen[bytes]] = set()


def stop_process(proc: subprocess.Popen[Any], *, grace_s: float = 3.0) -> None:
    """Stop a child we started, by its id: SIGTERM to its group, then SIGKILL after ``grace_s``."""
    _LIVE.discard(proc)
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        stop_process(proc, grace_s=1.0)


def spawn(
    argv: Sequence[str], *, stdout: Any, stderr: Any, pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group that dies with this process."""
    environ = {**os.environ, PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(
        list(argv),
        stdout=stdout,
        stderr=stderr,
        env=environ,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    _LIVE.add(proc)
    return proc


def die_with_parent() -> None:
    """In a child: ask the kernel for SIGTERM when the parent named in the environment dies."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def emulated(testbed: Testbed) -> Any | None:
    """The ``optisplit.emulate`` module when the testbed is up as an emulation, else None."""
    try:
        from optisplit import emulate
    except ImportError:
        return None
    try:
        return emulate if emulate.is_up(testbed) else None
    except AttributeError:
        return None


class LocalWorkers:
    """One local worker process per device, addressed on loopback or the emulated device's host.

    Args:
        testbed: where device cores and emulation come from.
        devices: the devices to start workers for.
        torch_device: ``--torch-device`` for every worker.
        log_dir: where each worker's stderr goes (default: a temporary folder).
    """

    def __init__(
        self,
        testbed: Testbed,
        devices: Sequence[str],
        *,
        torch_device: str = "cpu",
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.testbed = testbed
        self.devices = tuple(dict.fromkeys(devices))
        self.torch_device = torch_device
        self.token = secrets.token_hex(32).encode()
        self._tmp = tempfile.TemporaryDirectory(prefix="optisplit-workers-")
        self.log_dir = Path(log_dir or self._tmp.name)
        self._token_file = Path(self._tmp.name) / "token"
        self._token_file.write_bytes(self.token)
        self._token_file.chmod(0o600)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self._emulate = emulated(testbed)

    def log_path(self, device: str) -> Path:
        return self.log_dir / f"worker-{device}.log"

    def start(self) -> dict[str, tuple[str, int]]:
        """Start every worker that is not running; returns the device addresses."""
        pending = [
            d for d in self.devices if d not in self.procs or self.procs[d].poll() is not None
        ]
        for device in pending:
            self.procs[device] = self._spawn(device)
        for device in pending:
            self.addresses[device] = self._read_address(device, self.procs[device])
        return dict(self.addresses)

    def _host(self, device: str) -> str:
        if self._emulate is None:
            return "127.0.0.1"
        return str(self._emulate.device_host(self.testbed, device))

    def _spawn(self, device: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "optisplit", "worker",
            "--listen", f"{self._host(device)}:0",
            "--token-file", str(self._token_file),
            "--torch-device", self.torch_device,
            "--threads", "1",
        ]  # fmt: skip
        if self._emulate is not None:
            argv = list(self._emulate.wrap_command(self.testbed, device, argv))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(device), "ab") as log_file:
            proc = spawn(argv, stdout=subprocess.PIPE, stderr=log_file)
        cores = self.testbed.devices[device].cores
        if cores:
            try:
                os.sched_setaffinity(proc.pid, cores)
            except OSError as exc:
                log.warning("cannot pin worker %s to cores %s: %s", device, cores, exc)
        return proc

    def _read_address(self, device: str, proc: subprocess.Popen[bytes]) -> tuple[str, int]:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120.0
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 1)
                if not chunk:
                    break
                line += chunk
            elif proc.poll() is not None:
                break
        match = _LISTENING.search(line.decode("utf-8", "replace"))
        if match is None:
            stop_process(proc)
            tail = self._log_tail(device)
            raise RuntimeFailure(f"worker for {device} did not start: {tail or 'no output'}")
        return match[1], int(match[2])

    def _log_tail(self, device: str) -> str:
        try:
            lines = self.log_path(device).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def dead(self) -> list[str]:
        """Devices whose worker process has exited."""
        return [d for d, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
        self.procs.clear()
        self._tmp.cleanup()

    def __enter__(self) -> LocalWorkers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
