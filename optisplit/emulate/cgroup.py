"""CPU limits per emulated device: a cgroup with a CPU quota (v1 ``cpu`` or v2 ``cpu.max``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path

from optisplit.errors import TestbedError

__all__ = [
    "PERIOD_US",
    "cgroup_root",
    "join",
    "make_group",
    "pids",
    "remove_tree",
    "tree",
]

log = logging.getLogger(__name__)

# A short period keeps a throttled device's stalls small (each stall lasts at most
# period x (1 - quota)), so per-block timings of a slow device stay smooth; the kernel needs a
# quota of at least 1 ms, so slow devices get a longer period.
PERIOD_US = 10_000
_MIN_QUOTA_US = 1_000
# Device groups outweigh other work on their cores eightfold (v1 shares 1024 and v2 weight 100
# are the defaults), so a device gets its quota even while the machine is busy with other jobs.
_SHARES = 8192
_WEIGHT = 800

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


def cgroup_root() -> tuple[Path, int] | None:
    """The cgroup folder holding CPU controls and its version (1 or 2), or None."""
    if (_V1 / "cpu.cfs_quota_us").exists():
        return _V1, 1
    controllers = _V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _V2, 2
    return None


def tree(testbed: str) -> Path | None:
    """The cgroup folder of a testbed (its devices are sub-folders)."""
    found = cgroup_root()
    return None if found is None else found[0] / "optisplit" / testbed


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise TestbedError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from None


def make_group(testbed: str, device: str, cpu_quota: float | None) -> Path:
    """Create the device's cgroup with ``cpu_quota`` cores (None: unlimited)."""
    found = cgroup_root()
    if found is None:
        raise TestbedError("no cgroup with a cpu controller (v1 'cpu' or v2 'cpu.max') is mounted")
    root, version = found
    group = root / "optisplit" / testbed / device
    if version == 2:
        for parent in (root, root / "optisplit", root / "optisplit" / testbed):
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", "+cpu")
    group.mkdir(parents=True, exist_ok=True)
    weight = ("cpu.shares", str(_SHARES)) if version == 1 else ("cpu.weight", str(_WEIGHT))
    for level in (group.parent.parent, group.parent, group):  # weights count per level
        _write(level / weight[0], weight[1])
    period = PERIOD_US
    if cpu_quota is not None:
        period = max(PERIOD_US, math.ceil(_MIN_QUOTA_US / cpu_quota))
    quota = None if cpu_quota is None else round(cpu_quota * period)
    if version == 1:
        _write(group / "cpu.cfs_period_us", str(period))
        _write(group / "cpu.cfs_quota_us", str(-1 if quota is None else quota))
    else:
        _write(group / "cpu.max", f"{'max' if quota is None else quota} {period}")
    return group


def join(group: str | os.PathLike[str], pid: int = 0) -> None:
    """Move process ``pid`` (0: the caller) into ``group``."""
    _write(Path(group) / "cgroup.procs", str(pid or os.getpid()))


def pids(group: Path) -> list[int]:
    try:
        text = (group / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(tok) for tok in text.split()]


def remove_tree(top: Path, *, timeout_s: float = 5.0) -> None:
    """Kill every process in ``top`` and its sub-groups (by pid), then remove the folders."""
    if not top.is_dir():
        return
    groups = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    groups.append(top)
    for group in groups:
        for pid in pids(group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    for group in groups:
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TestbedError(f"cannot remove cgroup {group}: {exc.strerror}") from None
                time.sleep(0.02)
    parent = top.parent
    with contextlib.suppress(OSError):
        parent.rmdir()  # the shared 'optisplit' folder, once no testbed uses it
