"""Build and tear down an emulated testbed: namespaces, TUN interfaces, the forwarder, cgroups."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit._io import write_json
from optisplit.emulate import cgroup, netns
from optisplit.emulate.shaping import has_netem, pair_paths
from optisplit.emulate.state import (
    NETNS_PREFIX,
    DeviceState,
    TestbedState,
    lock,
    netns_name,
    read_state,
    safe_name,
    state_dir,
    state_root,
    used_slots,
    write_state,
)
from optisplit.errors import TestbedError

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

__all__ = ["DEVICE_IF", "MTU", "build", "forwarder_alive", "is_root", "running", "teardown"]

log = logging.getLogger(__name__)

DEVICE_IF = "os0"
# Large packets keep the forwarder's packet rate low (1 Gbit/s is ~2,000 packets/s).
MTU = 65000
_HOST_IF = "os-h"
_SUBNET = "10.231"
_READY_TIMEOUT_S = 10.0


def is_root() -> bool:
    return os.geteuid() == 0


def spec_of(testbed: Testbed) -> dict[str, Any]:
    """The parts of a testbed that the emulation depends on (a rebuild happens when they change)."""
    return {
        "devices": {
            name: {
                "cores": list(d.cores) if d.cores is not None else None,
                "cpu_quota": d.cpu_quota,
                "throttle": d.throttle,
            }
            for name, d in sorted(testbed.devices.items())
        },
        "paths": [p.to_dict() for p in pair_paths(testbed)],
    }


def forwarder_alive(state: TestbedState) -> bool:
    pid = state.forwarder_pid
    return pid is not None and _forwarder_of(pid) == str(state_dir(state.name))


def _forwarder_of(pid: int) -> str | None:
    """The state folder that forwarder ``pid`` serves, or None when ``pid`` is no forwarder."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"optisplit.emulate.delay" not in argv or len(argv) < 2:
        return None
    return argv[argv.index(b"optisplit.emulate.delay") + 1].decode(errors="replace")


def running(testbed: Testbed) -> TestbedState | None:
    """The state of ``testbed`` when it is up and whole, else None."""
    state = read_state(testbed.name)
    if state is None or not forwarder_alive(state):
        return None
    present = set(netns.list_namespaces(NETNS_PREFIX))
    if any(d.netns not in present for d in state.devices.values()):
        return None
    return state


def build(testbed: Testbed) -> TestbedState:
    """Bring ``testbed`` up (or keep it when it is already up with the same spec).

    Raises:
        TestbedError: a step failed; whatever was built is torn down again.
    """
    spec = spec_of(testbed)
    with lock():
        state = running(testbed)
        if state is not None and state.spec == spec:
            return state
        kept = _kept_anchors(state)
        _teardown_locked(testbed.name)
        state = _plan(testbed, spec)
        write_state(state)  # first, so that a crash half-way can still be cleaned up
        try:
            _make_devices(state)
            netns.add_tun(state.host_if, netns=None, address=state.host_address, mtu=MTU)
            pid = _start_forwarder(state)
            devices = _anchored(state.devices, kept)
        except BaseException:
            _teardown_locked(testbed.name)
            raise
        state = TestbedState(**{**state.__dict__, "forwarder_pid": pid, "devices": devices})
        write_state(state)
        return state


# Seconds of reference runs that fix a paced device's anchor when its testbed comes up, and
# how much slower than their median the anchor is set. The host's speed at any one moment is
# a draw from a spread (in one bring-up of ``local`` the reference read 0.21 ms on one core
# and 0.27 ms on the other): the margin sets the devices' speed at a slow moment of the host
# rather than a fast one, so that a device paced at 0.8 still keeps its speed through spells 1.1 / 0.8 = 1.37
# times slower than the moment the anchor was taken.
ANCHOR_SECONDS = 2.0
ANCHOR_MARGIN = 1.5
_ANCHOR_SCRIPT = (
    "import sys\n"
    "from optisplit.pace import SpeedReference\n"
    "print(repr(SpeedReference.anchor(float(sys.argv[1])) * float(sys.argv[2])))\n"
)


def _kept_anchors(state: TestbedState | None) -> dict[tuple[str, Any, Any], float]:
    """Anchors of a testbed up now, by (device, cores, pace): a testbed brought up again with
    other links keeps its devices' anchors, so profiles taken under one condition still
    describe the devices under the next."""
    if state is None:
        return {}
    return {
        (d.name, d.cores, d.pace): d.anchor_ms
        for d in state.devices.values()
        if d.anchor_ms is not None
    }


def _anchored(
    devices: dict[str, DeviceState], kept: dict[tuple[str, Any, Any], float]
) -> dict[str, DeviceState]:
    """``devices`` with one anchor for all the paced ones: kept from before when every one of
    them is as it was, else measured now on each of their core sets at once, the median of
    those. One anchor, not one per core: a 2-s reading is a draw from the host's spread, and
    one per core made the ``fast`` device of ``local`` slower than ``slow`` after one
    bring-up (72.7 against 69.5 ms of mobilenet_v2, ``bench/anchor.py``): the devices' speeds
    relative to each other are the testbed's spec."""
    paced = {name: d for name, d in devices.items() if d.pace is not None}
    if not paced:
        return dict(devices)
    keys = [(name, d.cores, d.pace) for name, d in paced.items()]
    if all(key in kept for key in keys):
        anchor = statistics.median(kept[key] for key in keys)
    else:
        anchor = _measure_anchor({usable_cores(d.cores) for d in paced.values()})
    return {
        name: dataclasses.replace(d, anchor_ms=anchor) if name in paced else d
        for name, d in devices.items()
    }


def _measure_anchor(core_sets: set[tuple[int, ...] | None]) -> float:
    """The reference's median time on each core set (all at once), the median over them, times
    ``ANCHOR_MARGIN``."""
    script = [sys.executable, "-c", _ANCHOR_SCRIPT, str(ANCHOR_SECONDS), str(ANCHOR_MARGIN)]
    procs = [
        subprocess.Popen(
            [*pin_prefix(cores), *script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": _package_parent()},
        )
        for cores in sorted(core_sets, key=lambda c: c or ())
    ]
    readings = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise TestbedError(f"speed anchor failed: {stderr.strip()[-300:]}")
            readings.append(float(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return statistics.median(readings)


def _plan(testbed: Testbed, spec: dict[str, Any]) -> TestbedState:
    taken = used_slots()
    free = (s for s in range(250) if s not in taken and not netns.link_exists(f"{_HOST_IF}{s}"))
    slot = next(free, None)
    if slot is None:
        raise TestbedError("250 emulated testbeds are up already; bring some down")
    tree = cgroup.tree(safe_name(testbed.name))
    devices = {}
    for i, name in enumerate(sorted(testbed.devices)):
        device = testbed.devices[name]
        devices[name] = DeviceState(
            name=name,
            netns=netns_name(testbed.name, name),
            address=f"{_SUBNET}.{slot}.{i + 1}",
            cgroup=str(tree / safe_name(name)) if tree is not None else None,
            cores=tuple(device.cores) if device.cores is not None else None,
            cpu_quota=device.cpu_quota,
            throttle=device.throttle,
        )
    return TestbedState(
        name=testbed.name,
        slot=slot,
        devices=devices,
        host_if=f"{_HOST_IF}{slot}",
        host_address=f"{_SUBNET}.{slot}.254",
        delay_path=delay_path(),
        spec=spec,
    )


def _make_devices(state: TestbedState) -> None:
    for device in state.devices.values():
        netns.make_namespace(device.netns)
        netns.add_tun(DEVICE_IF, netns=device.netns, address=device.address, mtu=MTU)
        netns.tune_tcp(device.netns)
        cgroup.make_group(safe_name(state.name), safe_name(device.name), cfs_quota(device))


def _start_forwarder(state: TestbedState) -> int:
    folder = state_dir(state.name)
    address = {name: d.address for name, d in state.devices.items()}
    config = {
        "tuns": [
            {"ifname": DEVICE_IF, "netns": d.netns, "address": d.address}
            for d in state.devices.values()
        ]
        + [{"ifname": state.host_if, "netns": None, "address": state.host_address}],
        "paths": [
            {**p, "src_address": address[p["src"]], "dst_address": address[p["dst"]]}
            for p in state.spec["paths"]
        ],
        "seed": 0,
        # select() sleeps this much longer than asked here (measured with SCHED_FIFO); the
        # forwarder takes it off every delay so that RTTs come out at the spec.
        "overhead_ms": 0.06,
    }
    write_json(folder / "forwarder.json", config)
    (folder / "forwarder.ready").unlink(missing_ok=True)
    with open(folder / "forwarder.log", "ab") as logfile:
        helpers = helper_cores(state.devices.values())
        proc = subprocess.Popen(
            [*pin_prefix(helpers), sys.executable, "-m", "optisplit.emulate.delay", str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": _package_parent()},
        )
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not (folder / "forwarder.ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (folder / "forwarder.log").read_text(errors="replace").strip()[-300:]
            raise TestbedError(f"the delay forwarder of {state.name} did not start: {tail}")
        time.sleep(0.02)
    return proc.pid


def _package_parent() -> str:
    here = str(Path(__file__).resolve().parents[2])
    extra = os.environ.get("PYTHONPATH")
    return f"{here}:{extra}" if extra else here


def teardown(name: str) -> list[str]:
    """Remove everything ``up`` built for testbed ``name``; idempotent. Returns what it removed."""
    with lock():
        return _teardown_locked(name)


def _teardown_locked(name: str) -> list[str]:
    removed: list[str] = []
    state = read_state(name)
    folder = state_dir(name)
    for pid in _forwarders(str(folder)):
        _stop(pid)
        removed.append(f"forwarder {pid}")
    for ns in netns.list_namespaces(f"{NETNS_PREFIX}{safe_name(name)}."):
        for pid in netns.namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns.delete_namespace(ns)
        removed.append(f"namespace {ns}")
    tree = cgroup.tree(safe_name(name))
    if tree is not None and tree.exists():
        cgroup.remove_tree(tree)
        removed.append(f"cgroup {tree}")
    for link in _host_links(state):
        netns.delete_link(link)
        removed.append(f"interface {link}")
    if folder.exists():
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
    return removed


def _forwarders(folder: str) -> list[int]:
    """Forwarder processes serving ``folder`` (found by their command line, stopped by pid)."""
    found = {
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _forwarder_of(int(p.name)) == folder
    }
    return sorted(found)


def _stop(pid: int, timeout_s: float = 2.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _host_links(state: TestbedState | None) -> list[str]:
    """The host-side TUN of this testbed; without a record, every one no testbed claims."""
    if state is not None:
        return [state.host_if]
    claimed = {f"{_HOST_IF}{slot}" for slot in used_slots()}
    return [link for link in netns.list_links(_HOST_IF) if link not in claimed]


def teardown_all() -> list[str]:
    """Remove every emulated testbed on this machine, recorded or left over."""
    removed: list[str] = []
    root = state_root()
    names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    for ns in netns.list_namespaces(NETNS_PREFIX):
        names.append(ns[len(NETNS_PREFIX) :].split(".", 1)[0])
    with lock():
        for name in sorted(set(names)):
            removed += _teardown_locked(name)
        for link in netns.list_links(_HOST_IF):
            netns.delete_link(link)
            removed.append(f"interface {link}")
    return removed


def delay_path() -> str:
    """The delay path, as recorded in the state and shown by ``status``.

    Always the userspace forwarder: it is exact (see ``delay.py``) and tested on kernels with
    and without ``sch_netem``; where netem exists the report says it was left unused.
    """
    if has_netem():
        return "forwarder (sch_netem present, unused)"
    return "forwarder (no sch_netem in this kernel)"


def cfs_quota(device: DeviceState) -> float | None:
    """The CFS quota of a device's cgroup, or None for none.

    A paced device limits itself (its group still weighs and collects its processes). A quota
    of at least as many cores as the device is pinned to limits nothing, but the kernel still
    throttles it: CFS hands out quota in 5 ms slices per CPU, and a device at quota 1.0 on one
    core was throttled in 26 % of its periods (7 s over a validation run), its stages 13-20 %
    slower than profiled.
    """
    if device.throttle == "pace" or device.cpu_quota is None:
        return None
    kept = usable_cores(device.cores)
    if kept is not None and device.cpu_quota >= len(kept):
        return None
    return device.cpu_quota


def usable_cores(cores: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """``cores`` restricted to those this process may use (None: no pinning)."""
    if cores is None:
        return None
    allowed = os.sched_getaffinity(0)
    kept = tuple(c for c in cores if c in allowed)
    if len(kept) < len(cores):
        log.warning("cores %s are not all available here (allowed: %s)", cores, sorted(allowed))
    return kept or None


def helper_cores(devices: Iterable[Any]) -> tuple[int, ...] | None:
    """The cores where the emulation's own processes disturb the devices least (None: anywhere).

    :func:`optisplit.testbed.helper_cores` over the cores this process may use: the helpers
    (delay forwarder, the client that sends requests and checks outputs) go to the usable
    cores with the smallest share allotted, when that share leaves room. Left to the scheduler
    they also ran on a fast device's core: its stages ran 1.7 ms per request (13 %) longer than
    their CPU time in a mobilenet_v2 pipeline on ``local3`` (0.5 ms with the helpers on the
    slow devices' core), and its throughput fell from 86 to 74 requests/s.
    """
    from optisplit.testbed import helper_cores as pick

    return pick(devices, os.sched_getaffinity(0))


@contextlib.contextmanager
def on_cores(cores: tuple[int, ...] | None) -> Iterator[None]:
    """Run this process (every thread of it) on ``cores`` inside the block; None: as it is."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    _pin_threads(set(cores))
    try:
        yield
    finally:
        _pin_threads(before)


def _pin_threads(cores: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cores)


def pin_prefix(cores: tuple[int, ...] | None) -> list[str]:
    """argv prefix that pins a command to ``cores`` (``taskset``), or nothing."""
    kept = usable_cores(cores)
    return [] if kept is None else ["taskset", "-c", ",".join(map(str, kept))]


def command_prefix(state: TestbedState, device: str) -> list[str]:
    """argv prefix that runs a command in ``device``'s cgroup, on its cores, in its namespace."""
    d = state.devices[device]
    prefix = [sys.executable, "-m", "optisplit.emulate.enter"]
    if d.cgroup is not None:
        prefix += ["--cgroup", d.cgroup]
    kept = usable_cores(d.cores)
    if kept is not None:
        prefix += ["--cores", ",".join(map(str, kept))]
    if d.pace is not None:
        prefix += ["--pace", str(d.pace)]
        if d.anchor_ms is not None:
            prefix += ["--anchor", repr(d.anchor_ms)]
    return [*prefix, "--netns", d.netns, "--ifname", DEVICE_IF, "--"]
