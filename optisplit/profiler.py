"""Measuring a chain's blocks on this device: time per block, whole-model time, peak block memory.

Method (issue 2): the model is traced in a sandboxed deep copy. Each of ``warmup + repeats``
rounds runs the single-block stage modules in sequence, each fed the real tensors the previous
one just produced (the data flow of the whole model, with a clock read between blocks), then
the whole (eager) model in one piece; interleaving the two keeps slow drifts of the machine from
biasing one against the other. Everything runs under ``torch.inference_mode`` with
``torch.set_num_threads(threads)`` and the garbage collector paused; each round starts from a
fresh copy of the input (copied outside the timed region). The process's heap is tuned as a
worker's is (``runtime.stage.tune_allocator``), so blocks allocate their outputs the same way.

``mem_bytes`` (peak extra memory of a block) is the peak, over the block's run, of the bytes of
tensor storages the block itself allocated and still holds alive (its outputs included; its inputs
and the parameters excluded), counted per storage through a ``TorchDispatchMode`` in one extra,
untimed run. Allocator caching and kernels' private scratch buffers are not included.

``entry_ms`` (the block's time when it starts a stage): after each timed round's whole-model
run, a few blocks in turn each run alone after a rest of ``ENTRY_REST_S``, on a fresh copy of
the input they take in the chain, until every block has about ``ENTRY_SAMPLES`` such runs.
``entry_ms`` is the block's median time plus the median of what each such run took beyond the
block's time in the same round's chain (paired, so that the host's drift cancels out), that
median at least 0 (the cost model adds no less).
A stage whose input arrives from another device starts like that: its core rested (or ran
other work) while it waited, and its input was just written by the receiving thread. Here such
a start cost resnet18's last residual block about 1 ms more than its 4-5 ms in the middle of
the chain, and most mobilenet_v2 blocks past the first about 0.5 ms. Stages run after a rest
took that much more than their blocks' summed times (``bench/entry.py``: resnet18 ``[11:15]``
5.84 ms of CPU against 4.63 summed, 5.73 with its start), and so did stages that started at
those blocks in pipelines on the emulated testbeds (``bench/fidelity.py``). The cost model
adds ``entry_ms - time_ms`` to each stage at its first block. With a spread, rounds start
after a rest, so block 0's ``time_ms`` already holds its start.
"""

from __future__ import annotations

import copy
import datetime
import gc
import logging
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from optisplit.errors import UsageError
from optisplit.pace import Pacer, SpeedReference
from optisplit.profile import BlockProfile, BlockTiming

if TYPE_CHECKING:
    import torch

    from optisplit.chain import Chain

__all__ = [
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_REPEATS",
    "DEFAULT_WARMUP",
    "WANDER_WARN",
    "profile_chain",
    "profile_model",
    "profile_module",
]

DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 15
DEFAULT_MAX_SECONDS = 10.0
"""Timed rounds stop early once they have taken this long (at least ``MIN_REPEATS`` rounds run)."""
MIN_REPEATS = 5
ENTRY_SAMPLES = 5
"""Runs per block as the first block of a stage (``entry_ms``)."""
ENTRY_REST_S = 0.02
"""Rest before each such run: a device waiting for its input from another one rests about as
long (a few ms of compute upstream plus a transfer); the start cost here grew with rests up to
a few ms and stayed flat beyond."""
WANDER_WARN = 0.10
"""A profile whose whole-model median lies this far above its 10th percentile gets a warning
(``BlockProfile.wander``): steady devices here stay within 0.02."""
_log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``on_progress(rounds_done, rounds_total)``."""


def profile_model(
    model: str,
    *,
    device: str,
    batch_size: int = 1,
    granularity: str = "coarse",
    threads: int = 1,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    clock: str = "wall",
    module: str | None = None,
    weights: str | None = None,
    seed: int = 0,
    on_progress: Progress | None = None,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    pace: float | None = None,
    spread_s: float = 0.0,
    anchor_ms: float | None = None,
) -> BlockProfile:
    """Build a zoo (or user) model, trace it and profile it on this host as ``device``.

    Raises:
        ModelError, UsageError, TraceError: as :func:`optisplit.chain.load_chain`.
    """
    from optisplit.chain import load_chain

    _check_counts(threads, warmup, repeats)
    # A freshly built model belongs to us: it is already the sandbox.
    chain = load_chain(
        model,
        batch_size=batch_size,
        granularity=granularity,
        module=module,
        weights=weights,
        seed=seed,
    )
    return profile_chain(
        chain,
        device=device,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        clock=clock,
        on_progress=on_progress,
        sandbox=False,
        max_seconds=max_seconds,
        pace=pace,
        spread_s=spread_s,
        anchor_ms=anchor_ms,
    )


def profile_module(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    device: str,
    name: str = "model",
    granularity: str = "coarse",
    threads: int = 1,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    clock: str = "wall",
    on_progress: Progress | None = None,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    pace: float | None = None,
    spread_s: float = 0.0,
) -> BlockProfile:
    """Profile a user's ``nn.Module`` on this host; the module itself is never touched."""
    from optisplit.chain import trace

    _check_counts(threads, warmup, repeats)
    chain = trace(copy.deepcopy(model), example_inputs, granularity=granularity, name=name)
    return profile_chain(
        chain,
        device=device,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        clock=clock,
        on_progress=on_progress,
        sandbox=False,
        max_seconds=max_seconds,
        pace=pace,
        spread_s=spread_s,
    )


def profile_chain(
    chain: Chain,
    *,
    device: str,
    threads: int = 1,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    clock: str = "wall",
    on_progress: Progress | None = None,
    sandbox: bool = True,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    pace: float | None = None,
    spread_s: float = 0.0,
    anchor_ms: float | None = None,
) -> BlockProfile:
    """Profile every block of ``chain`` and the whole model on this host as ``device``.

    Args:
        chain: the traced model.
        device: the device name the profile is for.
        threads: ``torch.set_num_threads`` while measuring (restored afterwards).
        warmup: untimed rounds first.
        repeats: timed rounds; medians and p10/p90 come from these.
        clock: ``"wall"`` (monotonic wall clock: what a device really takes, CPU-quota
            throttling included) or ``"cpu"`` (this thread's CPU time; only with one thread:
            immune to other processes on a shared host, blind to throttling).
        on_progress: called after each round with ``(done, total)``.
        sandbox: trace a deep copy of ``chain.model`` first (set False if the chain is yours).
        max_seconds: stop the timed rounds once they have taken this long, after at least
            ``MIN_REPEATS`` (or ``repeats``, if fewer); ``None`` runs every round. Keeps a
            default profile of a slow model (vgg16) short while fast models get every round.
        pace: the speed of a paced device (:mod:`optisplit.pace`): with the wall clock each
            block, and the whole model, rests after it ran, as in a paced worker, and the clock
            counts the rest; the CPU clock times the work unpaced. Recorded in the provenance.
        spread_s: spread the timed rounds evenly over at least this many seconds, idle in
            between, so that the medians describe the device over that span rather than over
            the moment a back-to-back profile takes: a shared host's speed wanders by 10-20 %
            over seconds (``bench/drift.py``), a Pi's with its temperature. ``max_seconds``
            then counts from the end of the spread. Each round's whole-model run starts half
            a round after its blocks, so that both start after a rest.
        anchor_ms: with ``pace``, the reference time the device keeps to (anchored pacing,
            :mod:`optisplit.pace`): the wall clock's rests follow the reference's slowdown as a
            worker's do, and the CPU clock divides each round's blocks, and its whole-model
            run, by the slowdown measured right after them. Recorded in the provenance, with
            the slowdowns' median, lowest and highest.
    """
    import torch

    from optisplit.chain import trace

    _check_counts(threads, warmup, repeats)
    if not spread_s >= 0:
        raise UsageError(f"spread must be at least 0 seconds, got {spread_s}")
    timer = _timer(clock, threads)
    if pace is not None and threads != 1:
        raise UsageError(f"a paced device runs one thread; got threads={threads}")
    # The CPU clock does not count rests, only what waking from them costs: paced at 0.5 on this
    # host mobilenet_v2 used 8-12 % more CPU per pass than unpaced (bench/rests.py), while a
    # paced worker's stages in a pipeline (optisplit validate on the local testbed) ran within
    # -3..+6 % of the unpaced profile. So a CPU-clock profile times the work unpaced; the cost
    # model divides by the pace.
    reference = None if pace is None or anchor_ms is None else SpeedReference(anchor_ms)
    pacer = None if pace is None or clock == "cpu" else Pacer(pace, reference)
    slowdowns: list[float] = []
    if sandbox:
        chain = trace(
            copy.deepcopy(chain.model),
            chain.example_inputs,
            granularity=chain.granularity,
            name=chain.name,
        )
    from optisplit.runtime.stage import tune_allocator

    # Heap settings as in a worker: without them a fresh activation buffer is a fresh mmap whose
    # pages fault in: mobilenet_v2 takes ~1.4 times as long as in a worker (bench/allocator.py).
    tune_allocator()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            block_ms, whole_ms, mem, start_extra_ms = _measure(
                chain,
                warmup,
                repeats,
                timer,
                on_progress,
                max_seconds,
                pacer,
                spread_s,
                reference if pacer is None else None,
                slowdowns,
            )
    finally:
        torch.set_num_threads(previous)
    settings: dict[str, Any] = {
        "threads": threads,
        "warmup": warmup,
        "repeats": len(whole_ms),
        "clock": clock,
    }
    if spread_s > 0:
        settings["spread_s"] = spread_s
    if pace is not None:
        settings["pace"] = pace
    if reference is not None:
        settings["anchor_ms"] = reference.anchor_ms
    if slowdowns:
        settings["slowdown"] = {
            "median": statistics.median(slowdowns),
            "min": min(slowdowns),
            "max": max(slowdowns),
        }
    profile = _build_profile(chain, device, settings, block_ms, whole_ms, mem, start_extra_ms)
    wander = profile.wander
    if wander is not None and wander > WANDER_WARN:
        _log.warning(
            "profile of %s on %s wandered: whole model median %.2f ms, 10th percentile %.2f ms "
            "(%.0f %% apart); the device's speed changed while it was profiled: profile again",
            chain.name,
            device,
            profile.whole_ms,
            profile.provenance["whole_p10_ms"],
            100 * wander,
        )
    return profile


def _check_counts(threads: int, warmup: int, repeats: int) -> None:
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if warmup < 0:
        raise UsageError(f"warmup must be 0 or more, got {warmup}")
    if repeats < 1:
        raise UsageError(f"repeats must be at least 1, got {repeats}")


def _timer(clock: str, threads: int) -> Callable[[], int]:
    if clock == "wall":
        return time.perf_counter_ns
    if clock == "cpu":
        if threads != 1:
            raise UsageError(f"the cpu clock measures one thread only; got threads={threads}")
        return time.thread_time_ns
    raise UsageError(f"unknown clock {clock!r}; choose wall or cpu")


def _measure(
    chain: Chain,
    warmup: int,
    repeats: int,
    timer: Callable[[], int],
    on_progress: Progress | None,
    max_seconds: float | None = None,
    pacer: Pacer | None = None,
    spread_s: float = 0.0,
    reference: SpeedReference | None = None,
    slowdowns: list[float] | None = None,
) -> tuple[list[list[float]], list[float], list[int], list[list[float]]]:
    """Interleaved timing rounds; returns per-block times, whole-model times, peak memory and
    per block, what each of its runs as the first block of a stage took beyond its time in the
    chain in the same round (see the module docstring): paired so that the host's drift from
    round to round cancels out.

    With ``spread_s``, timed round ``k`` starts no earlier than ``k * spread_s / repeats``
    seconds after the first (and a rest after the previous round's last run), and its
    whole-model run half a round after it began: both then start after a rest, as a stage does
    in a pipeline (its device waits for its input). Run right after the
    blocks, the whole model would find their weights and buffers in the caches: on this host
    such a warm run of mobilenet_v2 took 11.5 ms against 12.1 ms after a rest (resnet18: 27.8
    against 28.5; ``bench/rests.py``), and the cost model's ``whole_ms / Σ blocks`` would
    carry that into every stage.

    With a ``reference``, each round's block times are divided by its slowdown measured right
    after the blocks, and the whole-model and entry runs by the one measured right after the
    whole model; the timed rounds' slowdowns go to ``slowdowns``. After, not before: a paced
    worker samples its reference at the start of a rest, right after its work, and a sample
    taken after an idle spell reads slow (the core is still waking up): measured before the
    rounds, the slowdowns of one resnet18 profile had a median of 1.11, and its stages ran
    37-47 % slower than profiled (``optisplit demo``; -1 % once measured after).
    """
    stages = [chain.stage_module(i, i + 1) for i in range(chain.n_blocks)]
    inputs = _capture_inputs(stages, chain.example_inputs)
    whole = _Timed(chain.model, chain.example_inputs, timer, pacer)
    block_ms: list[list[float]] = [[] for _ in stages]
    start_extra_ms: list[list[float]] = [[] for _ in stages]
    whole_ms: list[float] = []
    total = warmup + repeats
    slot = spread_s / repeats
    per_round = -(-ENTRY_SAMPLES * len(stages) // repeats)  # ceil: every block gets its runs
    probed = 0
    rest = 0.0
    gc.collect()
    gc.disable()
    deadline = None
    first = 0.0
    try:
        for round_ in range(total):
            timed = round_ - warmup
            if round_ == warmup:
                first = time.monotonic()
                if max_seconds is not None:
                    deadline = first + spread_s + max_seconds
            if deadline is not None and timed >= MIN_REPEATS and time.monotonic() > deadline:
                break
            if timed > 0 and slot > 0:  # (a round that ran long still leaves its rest)
                _sleep_until(max(first + timed * slot, time.monotonic() + rest))
            began = time.monotonic()
            times = _run_blocks(stages, chain.example_inputs, timer, pacer)
            # right after the work, as a paced worker samples it (see the docstring)
            slow = 1.0 if reference is None else reference.measure()
            times = [t / slow for t in times]
            if timed >= 0 and slot > 0:  # the whole model starts as cold as the blocks did
                _sleep_until(began + 0.5 * slot)
            ms = whole.run()
            slow_whole = 1.0 if reference is None else reference.measure()
            ms /= slow_whole
            if round_ >= warmup:
                if reference is not None and slowdowns is not None:
                    slowdowns += [slow, slow_whole]
                for i, t in enumerate(times):
                    block_ms[i].append(t)
                whole_ms.append(ms)
                probing = time.monotonic()
                rest = ENTRY_REST_S  # before the next round's blocks, after these runs
                for _ in range(per_round):
                    block = probed % len(stages)
                    started = _run_entry(stages[block], inputs[block], timer, pacer) / slow_whole
                    start_extra_ms[block].append(started - times[block])  # vs this round's chain
                    probed += 1
                if deadline is not None:  # the rounds' budget is for the rounds themselves
                    deadline += time.monotonic() - probing
            if on_progress is not None:
                on_progress(round_ + 1, total)
    finally:
        gc.enable()
    mem = [_peak_bytes(stage, args) for stage, args in zip(stages, inputs)]
    return block_ms, whole_ms, mem, start_extra_ms


def _run_entry(
    stage: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    timer: Callable[[], int],
    pacer: Pacer | None,
) -> float:
    """One block run as the first block of a stage: after a rest, on a fresh copy of its input."""
    time.sleep(ENTRY_REST_S)
    fresh = tuple(t.clone() for t in args)
    start = timer()
    stage(*fresh) if pacer is None else pacer.run(stage, *fresh)
    return (timer() - start) / 1e6


def _sleep_until(moment: float) -> None:
    pause = moment - time.monotonic()
    if pause > 0:
        time.sleep(pause)


def _run_blocks(
    stages: Sequence[torch.nn.Module],
    first: tuple[torch.Tensor, ...],
    timer: Callable[[], int],
    pacer: Pacer | None = None,
) -> list[float]:
    """One forward pass, block after block, each fed what the previous one just produced."""
    args = tuple(t.clone() for t in first)
    times = []
    for stage in stages:
        start = timer()
        args = stage(*args) if pacer is None else pacer.run(stage, *args)
        times.append((timer() - start) / 1e6)
    return times


def _capture_inputs(
    stages: Sequence[torch.nn.Module], first: tuple[torch.Tensor, ...]
) -> list[tuple[torch.Tensor, ...]]:
    inputs = [tuple(t.clone() for t in first)]
    for stage in stages[:-1]:
        inputs.append(tuple(t.clone() for t in stage(*inputs[-1])))
    return inputs


class _Timed:
    """A module and its captured inputs; copies them per call only if it writes into them."""

    def __init__(
        self,
        module: torch.nn.Module,
        args: tuple[torch.Tensor, ...],
        timer: Callable[[], int],
        pacer: Pacer | None = None,
    ) -> None:
        import torch

        self._timer = timer
        self._pacer = pacer
        self._module = module
        self._args = args
        before = tuple(t.clone() for t in args)
        module(*before)
        self._copy = not all(torch.equal(a, b) for a, b in zip(before, args))

    def run(self) -> float:
        args = tuple(t.clone() for t in self._args) if self._copy else self._args
        start = self._timer()
        if self._pacer is None:
            self._module(*args)
        else:
            self._pacer.run(self._module, *args)
        return (self._timer() - start) / 1e6


def _peak_bytes(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    fresh = tuple(t.clone() for t in args)
    tracker = _make_tracker(fresh)
    with tracker:
        out = module(*fresh)
    del out
    return int(tracker.peak)


def _make_tracker(args: tuple[torch.Tensor, ...]) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakMemory(TorchDispatchMode):  # type: ignore[misc]
        """Sums the storages allocated by ops while any tensor viewing them is alive."""

        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, list[int]] = {}
            self.current = 0
            self.peak = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor):
                    self._track(value)
            return out

        def _track(self, tensor: torch.Tensor) -> None:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in outside:
                return
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)

        def _release(self, key: int) -> None:
            entry = self.live.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    # The block's inputs are not its own allocations, even when it writes into them in place.
    outside = {t.untyped_storage().data_ptr() for t in args}
    return PeakMemory()


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _build_profile(
    chain: Chain,
    device: str,
    settings: dict[str, Any],
    block_ms: list[list[float]],
    whole_ms: list[float],
    mem: list[int],
    start_extra_ms: list[list[float]],
) -> BlockProfile:
    blocks = tuple(
        BlockTiming(
            index=i,
            name=info.name,
            time_ms=_percentile(block_ms[i], 50),
            time_p10_ms=_percentile(block_ms[i], 10),
            time_p90_ms=_percentile(block_ms[i], 90),
            out_bytes=chain.block_out_bytes(i),
            param_bytes=info.param_bytes,
            mem_bytes=mem[i],
            entry_ms=(
                # a start that costs nothing measurable leaves the block's time: a block of
                # microseconds on a busy host can draw a median beyond minus its own time
                _percentile(block_ms[i], 50) + max(_percentile(start_extra_ms[i], 50), 0.0)
                if start_extra_ms[i]
                else None
            ),
        )
        for i, info in enumerate(chain.blocks)
    )
    return BlockProfile(
        device=device,
        model=chain.name,
        batch_size=chain.batch_size,
        threads=int(settings["threads"]),
        granularity=chain.granularity,
        input_bytes=chain.input_bytes,
        output_bytes=chain.output_bytes,
        blocks=blocks,
        cut_names=tuple(c.name for c in chain.cuts),
        interior_cut_bytes=tuple(c.bytes for c in chain.cuts),
        whole_ms=_percentile(whole_ms, 50),
        provenance=_provenance(settings, whole_ms),
    )


def _provenance(settings: dict[str, Any], whole_ms: list[float]) -> dict[str, Any]:
    import torch

    import optisplit

    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "optisplit": optisplit.__version__,
        **settings,
        "whole_p10_ms": _percentile(whole_ms, 10),
        "whole_p90_ms": _percentile(whole_ms, 90),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
