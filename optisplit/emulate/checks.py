"""Probes that hold an emulated testbed to its spec: every link's RTT and rate, every device's speed.

Tolerances (a check passes when the measurement is within them):

- RTT: 10% of the spec, but never tighter than ``RTT_FLOOR_MS`` (0.3 ms). The delay path adds a
  few tens of microseconds per packet on an idle machine and up to a few hundred on a busy one,
  which is noise for a Wi-Fi link but a large share of a 0.2 ms LAN RTT; the cost model treats
  RTTs that small as negligible next to block times anyway.
- Rate: 10% of the spec (a bulk TCP transfer timed at the receiver from its first to its last
  byte, so propagation delay does not count). On a path with loss only the upper bound holds:
  TCP's goodput over a lossy link is below the link's rate by design.
- Speed: the share of its cores a device gets, CPU seconds / wall seconds of a busy loop run
  inside its sandbox, must be within 10% of ``min(1, cpu_quota)`` (a paced device's loop rests
  as its workers do, so this checks the pacing).
"""

from __future__ import annotations

import logging
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from optisplit.emulate import netns
from optisplit.emulate.shaping import PathSpec, pair_paths
from optisplit.emulate.state import DeviceState, TestbedState
from optisplit.errors import TestbedError

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

__all__ = [
    "RTT_FLOOR_MS",
    "TOLERANCE",
    "CheckReport",
    "DeviceCheck",
    "LinkCheck",
    "check_testbed",
    "measure_device",
    "measure_path",
]

log = logging.getLogger(__name__)

TOLERANCE = 0.10
RTT_FLOOR_MS = 0.3
_PROBE_PORT_TIMEOUT_S = 30.0
# A busy loop in chunks of about a millisecond; a paced device rests after each chunk for all
# the CPU time it used since its last rest (the loop's own bookkeeping included).
_LOOP = (
    "import sys, time\n"
    "from optisplit.pace import Pacer, pace_from_env\n"
    "speed = pace_from_env(); pacer = None if speed is None else Pacer(speed)\n"
    "work = float(sys.argv[1]); t = t_last = time.perf_counter()\n"
    "c = last = time.process_time(); x = 0\n"
    "while time.process_time() - c < work:\n"
    "    for i in range(20000): x += i * i\n"
    "    if pacer is not None:\n"
    "        now, t_now = time.process_time(), time.perf_counter()\n"
    "        pacer.rest(int((now - last) * 1e9), int((t_now - t_last) * 1e9))\n"
    "        last, t_last = now, time.perf_counter()\n"
    "print(time.perf_counter() - t, time.process_time() - c)\n"
)


@dataclass(frozen=True)
class LinkCheck:
    """A measured device pair: RTT (ms) and rate from ``src`` to ``dst`` (Mbit/s) vs the spec."""

    src: str
    dst: str
    rtt_ms: float | None
    mbps: float | None
    expected_rtt_ms: float
    expected_mbps: float
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class DeviceCheck:
    """A device's sandbox: address, cores, quota, and its measured speed vs the expected one."""

    name: str
    address: str
    cores: tuple[int, ...] | None
    cpu_quota: float | None
    speed: float | None
    expected_speed: float | None
    problem: str | None = None
    throttle: str = "quota"

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        document = {**asdict(self), "ok": self.ok}
        document["cores"] = list(self.cores) if self.cores is not None else None
        return document


@dataclass(frozen=True)
class CheckReport:
    """Every check of one testbed; ``emulated`` is false on the loopback fallback (no root)."""

    testbed: str
    emulated: bool
    delay_path: str
    devices: tuple[DeviceCheck, ...]
    links: tuple[LinkCheck, ...]

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        found = [d.problem for d in self.devices] + [link.problem for link in self.links]
        return [p for p in found if p is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "testbed": self.testbed,
            "emulated": self.emulated,
            "delay_path": self.delay_path,
            "ok": self.ok,
            "devices": [d.to_dict() for d in self.devices],
            "links": [link.to_dict() for link in self.links],
        }


def within(measured: float, expected: float, floor: float = 0.0) -> bool:
    return abs(measured - expected) <= max(TOLERANCE * expected, floor)


# ---------------------------------------------------------------------------------------- links


def _server(ns: str, address: str) -> socket.socket:
    with netns.entered(ns):
        server = socket.create_server((address, 0))
    server.settimeout(_PROBE_PORT_TIMEOUT_S)
    return server


def _client(ns: str, address: str, port: int) -> socket.socket:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(sock)
        sock.settimeout(_PROBE_PORT_TIMEOUT_S)
        sock.connect((address, port))
    return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise TestbedError("a link probe connection closed early")
        data += chunk
    return bytes(data)


def _serve(server: socket.socket, handler: Callable[[socket.socket], None]) -> threading.Thread:
    def run() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            _tune(conn)
            conn.settimeout(_PROBE_PORT_TIMEOUT_S)
            try:
                handler(conn)
            except (OSError, TestbedError) as exc:  # the client sees the failure too
                log.debug("link probe server: %s", exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(64):
        conn.sendall(data)


def _sink(conn: socket.socket) -> None:
    """Receive a warm-up and then one bulk transfer, timed from its first to its last read.

    The warm-up opens TCP's windows (a SYN's window is never scaled, so a fresh connection
    sends at most 64 kB in its first round trip); workers keep their connections open, so the
    rate that matters is the one after that. Answers the bytes after the first read and their
    seconds.
    """
    warm, total = struct.unpack("!QQ", _recv_exact(conn, 16))
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    while warm:
        warm -= conn.recv_into(view[: min(len(buffer), warm)]) or _closed()
    conn.sendall(b"k")
    got = conn.recv_into(view[: min(len(buffer), total)]) or _closed()
    first_t, first_n = time.perf_counter(), got
    last_t = first_t
    while got < total:
        got += conn.recv_into(view[: min(len(buffer), total - got)]) or _closed()
        last_t = time.perf_counter()
    conn.sendall(struct.pack("!Qd", got - first_n, last_t - first_t))


def _closed() -> int:
    raise TestbedError("a link probe connection closed early")


def probe_rtt(src: DeviceState, dst: DeviceState, *, count: int) -> float:
    """Median TCP round trip (ms) of a small message from ``src`` to ``dst``."""
    server = _server(dst.netns, dst.address)
    thread = _serve(server, _echo)
    try:
        with _client(src.netns, dst.address, server.getsockname()[1]) as sock:
            samples = []
            for i in range(count + 1):
                t = time.perf_counter()
                sock.sendall(b"x" * 32)
                _recv_exact(sock, 32)
                if i:  # the first round trip warms both ends up
                    samples.append((time.perf_counter() - t) * 1e3)
    finally:
        server.close()
        thread.join(timeout=5)
    return statistics.median(samples)


def probe_rate(src: DeviceState, dst: DeviceState, *, n_bytes: int, warm_bytes: int) -> float:
    """Rate (Mbit/s) of a bulk TCP transfer of ``n_bytes`` from ``src`` to ``dst``.

    ``warm_bytes`` go first, untimed, to open the connection's windows.
    """
    server = _server(dst.netns, dst.address)
    thread = _serve(server, _sink)
    payload = memoryview(bytearray(1 << 20))
    try:
        with _client(src.netns, dst.address, server.getsockname()[1]) as sock:
            sock.sendall(struct.pack("!QQ", warm_bytes, n_bytes))
            _send(sock, payload, warm_bytes)
            _recv_exact(sock, 1)
            _send(sock, payload, n_bytes)
            counted, seconds = struct.unpack("!Qd", _recv_exact(sock, 16))
    finally:
        server.close()
        thread.join(timeout=5)
    if seconds <= 0:
        raise TestbedError(f"link probe {src.name}->{dst.name} moved too few bytes to time")
    return float(counted * 8 / seconds / 1e6)


def _send(sock: socket.socket, payload: memoryview, n: int) -> None:
    while n:
        n -= sock.send(payload[: min(n, len(payload))])


def measure_path(state: TestbedState, path: PathSpec) -> tuple[float, float]:
    """Measured (RTT ms, rate Mbit/s) of one ordered device pair of a running testbed."""
    src, dst = state.devices[path.src], state.devices[path.dst]
    count = int(min(20, max(3, 1000.0 / max(path.rtt_ms, 1.0))))
    n_bytes = int(min(32 << 20, max(512 << 10, path.mbps * 1e6 / 8 * 0.3)))
    bdp = path.mbps * 1e6 / 8 * path.rtt_ms / 1e3
    warm = int(min(n_bytes, max(256 << 10, 2 * bdp)))
    try:
        rtt = probe_rtt(src, dst, count=count)
        rate = probe_rate(src, dst, n_bytes=n_bytes, warm_bytes=warm)
    except OSError as exc:
        raise TestbedError(f"link probe {path.src}->{path.dst} failed: {exc}") from None
    return rtt, rate


def _rate_ok(mbps: float, path: PathSpec) -> bool:
    """Within tolerance; on a lossy path only an upper bound (TCP backs off on every loss)."""
    if path.loss_pct > 0:
        return mbps <= path.mbps * (1 + TOLERANCE)
    return within(mbps, path.mbps)


def check_link(state: TestbedState, path: PathSpec, *, attempts: int = 2) -> LinkCheck:
    """Measure one pair (retrying once: a busy machine can disturb a single probe)."""
    for attempt in range(attempts):
        rtt, mbps = measure_path(state, path)
        problem = None
        if not within(rtt, path.rtt_ms, RTT_FLOOR_MS):
            problem = (
                f"link {path.src}->{path.dst}: RTT {rtt:.2f} ms, spec {path.rtt_ms:.2f} ms "
                f"(tolerance {max(TOLERANCE * path.rtt_ms, RTT_FLOOR_MS):.2f} ms)"
            )
        elif not _rate_ok(mbps, path):
            problem = (
                f"link {path.src}->{path.dst}: {mbps:.1f} Mbit/s, spec {path.mbps:.1f} Mbit/s "
                f"(tolerance {TOLERANCE:.0%})"
            )
        if problem is None or attempt == attempts - 1:
            return LinkCheck(path.src, path.dst, rtt, mbps, path.rtt_ms, path.mbps, problem)
        log.info("retrying: %s", problem)
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------- devices


def _loop_seconds(argv_prefix: list[str], work_s: float) -> tuple[float, float]:
    """Wall and CPU seconds of a CPU loop run with ``argv_prefix`` until it used ``work_s``."""
    out = subprocess.run(
        [*argv_prefix, sys.executable, "-c", _LOOP, str(work_s)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if out.returncode != 0:
        raise TestbedError(f"speed probe failed: {out.stderr.strip()[-300:]}")
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def measure_device(sandbox_prefix: list[str], *, work_s: float = 0.05, repeats: int = 2) -> float:
    """Share of its cores a sandbox gets: CPU seconds of a busy loop / its wall seconds.

    This is what a CPU quota sets, and what other load on the machine takes away; it does not
    depend on how fast the host's cores are (which the device's profile, measured inside the
    same sandbox, accounts for).

    Args:
        sandbox_prefix: argv prefix that runs a command inside the sandbox.
        work_s: CPU seconds the loop runs for.
        repeats: runs; the best counts (interference only ever slows a run down).
    """
    best = 0.0
    for _ in range(repeats):
        wall, cpu = _loop_seconds(sandbox_prefix, work_s)
        best = max(best, cpu / wall)
    return best


def expected_speed(cpu_quota: float | None) -> float:
    return 1.0 if cpu_quota is None else min(1.0, cpu_quota)


def check_device(state: TestbedState, name: str) -> DeviceCheck:
    """Measure the share of its cores device ``name`` gets inside its sandbox."""
    from optisplit.emulate import sandbox

    device = state.devices[name]
    expected = expected_speed(device.cpu_quota)
    inside = sandbox.command_prefix(state, name)
    speed = measure_device(inside)
    problem = None
    if not within(speed, expected):
        # A second look before refusing: other load on the machine can disturb one measurement.
        speed = measure_device(inside, repeats=3)
        if not within(speed, expected):
            problem = (
                f"device {name}: speed {speed:.3f} of its cores, spec {expected:.3f} "
                f"(cpu_quota {device.cpu_quota}, tolerance {TOLERANCE:.0%})"
            )
    return DeviceCheck(
        name,
        device.address,
        device.cores,
        device.cpu_quota,
        speed,
        expected,
        problem,
        throttle=device.throttle,
    )


# Device pairs have separate queues in the forwarder, so probing several at once changes no
# measurement as long as the machine keeps up; the budget keeps the concurrent probe traffic
# at about 2 Gbit/s.
_PARALLEL_MBPS = 2000.0
_MAX_PARALLEL = 8


def _check_links(
    state: TestbedState, paths: list[PathSpec], done: Callable[[str], None]
) -> list[LinkCheck]:
    if not paths:
        return []
    workers = int(min(_MAX_PARALLEL, max(1, _PARALLEL_MBPS // max(p.mbps for p in paths))))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
        futures = [pool.submit(check_link, state, path) for path in paths]
        results = []
        for path, future in zip(paths, futures):
            results.append(future.result())
            done(f"link {path.src}->{path.dst}")
    return results


def check_testbed(
    testbed: Testbed,
    *,
    links: bool = True,
    devices: bool = True,
    on_check: Callable[[str], None] | None = None,
) -> CheckReport:
    """Probe a testbed against its spec: each device's speed, each device pair's RTT and rate.

    On the loopback fallback (no root, or the testbed is not up) nothing is emulated: the
    report has ``emulated`` false, addresses 127.0.0.1 and no measurements.

    Args:
        testbed: the testbed, as loaded from its file.
        links: probe device pairs.
        devices: probe device speeds.
        on_check: called with a description after each check (progress display).

    Returns:
        The report; ``report.ok`` is false and ``report.problems()`` names each failed check.
    """
    from optisplit.emulate import sandbox

    state = sandbox.running(testbed) if sandbox.is_root() else None
    if state is None:
        fallback = tuple(
            DeviceCheck(name, "127.0.0.1", d.cores, d.cpu_quota, None, None, throttle=d.throttle)
            for name, d in sorted(testbed.devices.items())
        )
        return CheckReport(testbed.name, False, "none (loopback)", fallback, ())
    done = on_check or (lambda what: None)
    if sandbox.spec_of(testbed) != state.spec:
        problem = (
            f"testbed {testbed.name} is up with other devices or links than asked for "
            "(bring it up again with the wanted condition)"
        )
        return CheckReport(
            testbed.name,
            True,
            state.delay_path,
            (DeviceCheck(testbed.name, "-", None, None, None, None, problem),),
            (),
        )
    device_checks = []
    for name in sorted(state.devices):
        if devices:
            device_checks.append(check_device(state, name))
            done(f"device {name}")
        else:
            d = state.devices[name]
            device_checks.append(
                DeviceCheck(name, d.address, d.cores, d.cpu_quota, None, None, throttle=d.throttle)
            )
    link_checks = _check_links(state, pair_paths(testbed) if links else [], done)
    return CheckReport(
        testbed.name, True, state.delay_path, tuple(device_checks), tuple(link_checks)
    )
