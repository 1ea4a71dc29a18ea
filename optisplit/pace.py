"""Pacing: a device slower than this host's core, emulated by resting after each piece of work.

A paced process with speed ``s`` (0 < s <= 1) measures the CPU time ``c`` of each piece of work
(a stage's blocks in a worker, one block in the profiler) on its own thread and then sleeps
until the work has taken ``c / s`` of wall time (``c * (1/s - 1)`` when it ran without waiting
for its core), so the process uses ``s`` of a core whether it runs one block or a long
pipeline, and time lost to other work on its core comes out of the rest rather than on top of
it. A CFS quota gives the same long-run share but not per block: a burst shorter than the
quota's budget runs at full speed and a long run stalls at period boundaries, so one model's
time in a quota sandbox depends on how it is called (``bench/quota.py`` measures this). Pacing
makes the blocks' time the same in the profiler and in a worker, which is what the cost model
needs.

Pacing threads ask for tight timers, and the usual wake-up lateness of a sleep is taken off the
next rest, so many short blocks keep the pace. The emulated testbed hands the speed to every
process it starts as a paced device through the ``OPTISPLIT_PACE`` environment variable.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from optisplit.errors import UsageError

__all__ = ["ENV", "PacedBlocks", "Pacer", "check_speed", "pace_from_env", "pace_of"]

ENV = "OPTISPLIT_PACE"
# Owed rest below this is kept for later: a sleep call costs tens of microseconds by itself.
_MIN_SLEEP_NS = 50_000
# Overslept time credited to the next rests, at most this much: a thread kept from its core for
# a moment catches up, but a long stall is not paid back by many blocks running unpaced.
_MAX_CREDIT_NS = 2_000_000
# Timer slack of a pacing thread (the kernel's default of 50 us would add to every rest).
_SLACK_NS = 1_000
_local = threading.local()


def _tight_timers() -> None:
    """Ask the kernel to wake this thread on time (``PR_SET_TIMERSLACK``; Linux only)."""
    _local.tight = True
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, _SLACK_NS, 0, 0, 0)  # 29: PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def check_speed(speed: float | str, where: str = "pace") -> float:
    """``speed`` as a float in (0, 1]; raises UsageError otherwise."""
    try:
        value = float(speed)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected a speed in (0, 1], got {speed!r}") from None
    if not 0.0 < value <= 1.0:
        raise UsageError(f"{where}: expected a speed in (0, 1], got {speed!r}")
    return value


def pace_of(throttle: str, cpu_quota: float | None) -> float | None:
    """The speed a device with ``throttle`` and ``cpu_quota`` is paced at (None: not paced)."""
    if throttle != "pace" or cpu_quota is None or cpu_quota >= 1.0:
        return None
    return cpu_quota


def pace_from_env() -> float | None:
    """The speed this process runs at (``OPTISPLIT_PACE``), or None when it is not paced."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    speed = check_speed(raw, ENV)
    return None if speed == 1.0 else speed


class Pacer:
    """Rests after each piece of work so that it takes ``1 / speed`` times its CPU time."""

    def __init__(self, speed: float) -> None:
        self.speed = check_speed(speed)
        self._owed_ns = 0.0

    def rest(self, cpu_ns: int, wall_ns: int | None = None) -> None:
        """Sleep until work of ``cpu_ns`` at full speed has taken ``cpu_ns / speed`` in all.

        ``wall_ns`` is how long the work itself took (default: ``cpu_ns``); time it spent
        waiting for its core (other devices or processes on it) counts toward the rest, so a
        paced device is only slowed by others when they leave it less than its speed.
        """
        spent = cpu_ns if wall_ns is None else wall_ns
        self._owed_ns = max(self._owed_ns + cpu_ns / self.speed - spent, -_MAX_CREDIT_NS)
        if self._owed_ns < _MIN_SLEEP_NS:
            return
        if not getattr(_local, "tight", False):
            _tight_timers()
        start = time.perf_counter_ns()
        time.sleep(self._owed_ns / 1e9)
        self._owed_ns = max(self._owed_ns - (time.perf_counter_ns() - start), -_MAX_CREDIT_NS)

    def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)``, then the rest its CPU time (on this thread) calls for."""
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        result = work(*args)
        self.rest(time.thread_time_ns() - cpu, time.perf_counter_ns() - wall)
        return result


class PacedBlocks:
    """Block modules run one after another, then one rest for all of them: a stage on a slow
    device.

    Called like a stage module: takes the tensors crossing the first cut and returns the tuple
    crossing the last one, ``1 / speed`` times the stage's CPU time after it was called. The
    blocks run back to back, as the profiler runs them: a rest after each block would hand the
    core to the other processes on it between blocks, and each block would start with caches
    they had filled. On the core that ``local3``'s two paced devices share with the client and
    the delay forwarder, in ``slow1[0:3] -> fast[3:17] -> slow2[17:23]`` with mobilenet_v2,
    ``slow1``'s stage took 2.8-3.3 ms of CPU per request with a rest after each block and
    2.3-2.6 ms with one rest per stage, ``slow2``'s 2.4-2.7 and 2.0-2.2 ms (two runs of each
    way, taking turns).
    """

    def __init__(self, blocks: Sequence[Any], pacer: Pacer) -> None:
        self.blocks = list(blocks)
        self.pacer = pacer

    def __call__(self, *tensors: Any) -> Any:
        return self.pacer.run(self._forward, *tensors)

    def _forward(self, *tensors: Any) -> Any:
        out: Any = tensors
        for block in self.blocks:
            out = block(*out)
        return out

    def eval(self) -> PacedBlocks:
        return self
