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

**Anchored pacing.** A shared host's cores change speed by tens of per cent over seconds (5-s
medians of one model 1.4 times apart, ``bench/drift.py``), and plain pacing passes that on: the
device is ``s`` of whatever the core is doing now. An anchored pacer also times a fixed
reference kernel (:class:`SpeedReference`: four 128x128 matrix products, about 0.25 ms) in its
rests and stretches work to ``c / (s * h)``, where ``h`` is the reference's recent median over
an anchor fixed when the testbed came up (``OPTISPLIT_PACE_ANCHOR``, ms): when the host runs
slow, the device rests less and keeps its speed; when it runs fast, it rests more. A CPU-clock
profile of the device divides each round by ``h`` measured right after it. Both sides then
describe the device at the anchor's speed, whatever the host does in between, as long as
``s * h`` stays below 1. ``bench/anchor.py`` runs one model as a paced stage with both pacers
taking turns inside each device's sandbox.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from optisplit.errors import UsageError

__all__ = [
    "ANCHOR_ENV",
    "ENV",
    "PacedBlocks",
    "Pacer",
    "SpeedReference",
    "anchor_from_env",
    "check_anchor",
    "check_speed",
    "pace_from_env",
    "pace_of",
]

ENV = "OPTISPLIT_PACE"
ANCHOR_ENV = "OPTISPLIT_PACE_ANCHOR"
# The reference's slowdown is believed within these bounds only: beyond them the sample is
# broken (a stall, a migration), not the host's speed.
_SLOWDOWN_BOUNDS = (0.5, 2.0)
# Owed rest below this is kept for later: a sleep call costs tens of microseconds by itself.
_MIN_SLEEP_NS = 50_000
# Overslept time credited to the next rests, at most this much: a thread kept from its core for
# a moment catches up, but a long stall is not paid back by many blocks running unpaced.
_MAX_CREDIT_NS = 2_000_000
# Timer slack of a pacing thread (the kernel's default of 50 us would add to every rest).
_SLACK_NS = 1_000
# An anchored pacer samples its reference (about 0.25 ms) only in rests at least this long.
_SAMPLE_IN_REST_NS = 1_000_000
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


def check_anchor(anchor_ms: float | str, where: str = "anchor") -> float:
    """``anchor_ms`` as a positive float; raises UsageError otherwise."""
    try:
        value = float(anchor_ms)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected a positive time in ms, got {anchor_ms!r}") from None
    if not value > 0.0 or value == float("inf"):
        raise UsageError(f"{where}: expected a positive time in ms, got {anchor_ms!r}")
    return value


def anchor_from_env() -> float | None:
    """The reference time this process paces against (``OPTISPLIT_PACE_ANCHOR``), or None."""
    raw = os.environ.get(ANCHOR_ENV, "").strip()
    return check_anchor(raw, ANCHOR_ENV) if raw else None


class SpeedReference:
    """A fixed kernel timed on the calling thread: how slow this core runs now against an anchor.

    ``sample()`` runs the kernel once and keeps its CPU time among the last ``window``;
    ``slowdown()`` is their median over ``anchor_ms`` (1.0 before any sample), bounded to
    ``_SLOWDOWN_BOUNDS``. The kernel needs torch, which every paced worker and profiler has.

    Args:
        anchor_ms: the kernel's time at the speed the device is to keep (see ``measure``);
            None only for measuring one.
        window: samples the median is over.
        interval_s: ``due()`` is true this long after the last sample.
    """

    def __init__(
        self, anchor_ms: float | None, *, window: int = 9, interval_s: float = 0.05
    ) -> None:
        import torch

        self.anchor_ms = None if anchor_ms is None else check_anchor(anchor_ms)
        generator = torch.Generator().manual_seed(0)
        self._a = torch.randn(128, 128, generator=generator)
        self._samples: deque[float] = deque(maxlen=max(1, window))
        self.interval_s = interval_s
        self._last = float("-inf")
        self._kernel()  # the first call pays for lazy set-up

    @classmethod
    def from_env(cls) -> SpeedReference | None:
        """A reference against ``OPTISPLIT_PACE_ANCHOR``, or None when it is not set."""
        anchor = anchor_from_env()
        return None if anchor is None else cls(anchor)

    def _kernel(self) -> None:
        a = self._a
        for _ in range(4):
            a @ a

    def time_ms(self) -> float:
        """CPU ms of one run of the kernel on this thread (not kept), right after an untimed
        one: the timed run finds its operands in the caches whatever ran before it (after a
        model's stage a lone run took 1.25 times as long as in a loop of runs)."""
        self._kernel()
        start = time.thread_time_ns()
        self._kernel()
        return (time.thread_time_ns() - start) / 1e6

    def sample(self) -> float:
        """Run the kernel, keep its time among the recent ones; returns that time (ms)."""
        ms = self.time_ms()
        self._samples.append(ms)
        self._last = time.monotonic()
        return ms

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    def slowdown(self) -> float:
        """Median of the recent samples over the anchor (> 1: the core runs slow now)."""
        if not self._samples or self.anchor_ms is None:
            return 1.0
        low, high = _SLOWDOWN_BOUNDS
        return min(high, max(low, statistics.median(self._samples) / self.anchor_ms))

    def measure(self, runs: int = 5) -> float:
        """A fresh slowdown: ``runs`` samples now, the median over them alone."""
        self._samples.clear()
        for _ in range(max(1, runs)):
            self.sample()
        return self.slowdown()

    @classmethod
    def anchor(cls, seconds: float = 1.0) -> float:
        """The kernel's median time (ms) over ``seconds`` of runs on this thread: an anchor."""
        import torch

        torch.set_num_threads(1)
        reference = cls(None)
        times: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end or len(times) < 5:
            times.append(reference.time_ms())
        return statistics.median(times)


def pace_from_env() -> float | None:
    """The speed this process runs at (``OPTISPLIT_PACE``), or None when it is not paced."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    speed = check_speed(raw, ENV)
    return None if speed == 1.0 else speed


class Pacer:
    """Rests after each piece of work so that it takes ``1 / speed`` times its CPU time.

    With a ``reference`` (anchored pacing, see the module docstring) the work takes
    ``1 / (speed * h)`` times its CPU time, ``h`` the reference's slowdown; the reference is
    sampled in the rests, at most every ``reference.interval_s``, and its time is rest time.
    """

    def __init__(self, speed: float, reference: SpeedReference | None = None) -> None:
        self.speed = check_speed(speed)
        self.reference = reference
        self._owed_ns = 0.0

    def rest(self, cpu_ns: int, wall_ns: int | None = None) -> None:
        """Sleep until work of ``cpu_ns`` at full speed has taken ``cpu_ns / speed`` in all.

        ``wall_ns`` is how long the work itself took (default: ``cpu_ns``); time it spent
        waiting for its core (other devices or processes on it) counts toward the rest, so a
        paced device is only slowed by others when they leave it less than its speed.
        """
        spent = cpu_ns if wall_ns is None else wall_ns
        reference = self.reference
        share = self.speed if reference is None else self.speed * reference.slowdown()
        self._owed_ns = max(self._owed_ns + cpu_ns / share - spent, -_MAX_CREDIT_NS)
        if self._owed_ns < _MIN_SLEEP_NS:
            return
        if not getattr(_local, "tight", False):
            _tight_timers()
        start = time.perf_counter_ns()
        if reference is not None and self._owed_ns > _SAMPLE_IN_REST_NS and reference.due():
            reference.sample()
        left_ns = self._owed_ns - (time.perf_counter_ns() - start)
        if left_ns > 0:
            time.sleep(left_ns / 1e9)
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
