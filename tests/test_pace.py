"""Paced devices: the pacer's share of a core, paced stages and profiles, and how a paced
device's speed reaches the processes started as that device."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synthetic import synthetic_profile

from optisplit import emulate, pace
from optisplit.chain import trace
from optisplit.cost import CostModel, Overheads
from optisplit.errors import UsageError
from optisplit.pace import (
    ANCHOR_ENV,
    ENV,
    PacedBlocks,
    Pacer,
    SpeedReference,
    anchor_from_env,
    check_speed,
    pace_from_env,
)
from optisplit.plan import Plan
from optisplit.profiler import profile_chain
from optisplit.runtime.base import ModelSpec
from optisplit.runtime.stage import build_stage
from optisplit.testbed import Device, Link, Testbed, load_testbed

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.test_runtime_contract:tiny_model"


def _spin(seconds: float) -> None:
    """Busy work of about ``seconds`` of this thread's CPU time."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        sum(i * i for i in range(500))


def test_speed_is_checked() -> None:
    assert check_speed("0.25") == 0.25 and check_speed(1) == 1.0
    for bad in (0, -0.5, 1.5, "fast", None):
        with pytest.raises(UsageError, match=r"expected a speed in \(0, 1\]"):
            check_speed(bad)  # type: ignore[arg-type]


def test_speed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert pace_from_env() is None
    monkeypatch.setenv(ENV, "0.4")
    assert pace_from_env() == 0.4
    monkeypatch.setenv(ENV, "1")
    assert pace_from_env() is None  # full speed: nothing to pace
    monkeypatch.setenv(ENV, "2")
    with pytest.raises(UsageError, match=ENV):
        pace_from_env()


def test_pacer_stretches_work_to_its_speed() -> None:
    pacer = Pacer(0.25)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(40):
        pacer.run(_spin, 0.002)
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    # 80 ms of work at a quarter of a core: four times as long (more only if preempted)
    assert wall / cpu > 4.0 * 0.9
    # the rests alone: three times the work (a late wake-up is taken off the next rests)
    rested, worked = 0.0, 0.0
    for _ in range(40):
        start = time.thread_time_ns()
        _spin(0.002)
        work_ns = time.thread_time_ns() - start
        before = time.perf_counter()
        pacer.rest(work_ns)
        rested += time.perf_counter() - before
        worked += work_ns / 1e9
    assert 3 * worked * 0.95 < rested < 3 * worked * 1.5  # late wake-ups on a busy machine


def test_time_spent_waiting_for_the_core_counts_toward_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []  # the sleeps asked for (a busy host would stretch real ones)
    monkeypatch.setattr(pace.time, "sleep", slept.append)
    pacer = Pacer(0.5)
    pacer.rest(4_000_000, 6_000_000)  # 4 ms of work that took 6 ms: 2 ms left of its 8 ms
    assert slept == [pytest.approx(0.002, abs=1e-4)]
    pacer.rest(4_000_000, 12_000_000)  # took longer than 8 ms anyway: no rest, a little credit
    assert len(slept) == 1 and pacer._owed_ns < 0


def test_pacer_keeps_small_rests_for_later() -> None:
    pacer = Pacer(0.5)
    start = time.perf_counter_ns()
    pacer.rest(10_000)  # 10 us owed: too short for a sleep of its own
    assert time.perf_counter_ns() - start < 5_000_000
    assert pacer._owed_ns == pytest.approx(10_000)
    pacer.rest(1_000_000)  # now ~1 ms is owed and slept off
    assert pacer._owed_ns <= 0


@pytest.fixture(scope="module")
def tiny_chain() -> object:
    from tests.test_runtime_contract import tiny_model

    model, x = tiny_model()
    return trace(model, (x,))


def test_paced_blocks_compute_what_the_stage_computes(tiny_chain: object) -> None:
    chain = tiny_chain
    n = chain.n_blocks  # type: ignore[attr-defined]
    x = chain.example_inputs  # type: ignore[attr-defined]
    blocks = [chain.stage_module(i, i + 1) for i in range(n)]  # type: ignore[attr-defined]
    paced = PacedBlocks(blocks, Pacer(0.5))
    with torch.inference_mode():
        expected = chain.stage_module(0, n)(*x)  # type: ignore[attr-defined]
        got = paced(*x)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_build_stage_with_pace_runs_blocks_one_by_one() -> None:
    spec = ModelSpec("tiny", module=FACTORY)
    plain = build_stage(spec, 1, 5)
    paced = build_stage(spec, 1, 5, pace=0.5)
    assert isinstance(paced, PacedBlocks) and len(paced.blocks) == 4
    assert not isinstance(build_stage(spec, 1, 5, pace=None), PacedBlocks)
    from tests.test_runtime_contract import tiny_model

    model, x = tiny_model()
    first = trace(model, (x,)).stage_module(0, 1)
    with torch.inference_mode():
        (mid,) = first(x)
        want = plain(mid)
        got = paced(mid)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_paced_profile_counts_the_rests_on_the_wall_clock() -> None:
    layers = [torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)]  # ~1.5 ms each
    model = torch.nn.Sequential(*layers).eval()
    chain = trace(model, (torch.randn(1, 64, 40, 40),))
    kwargs = {"device": "d", "warmup": 2, "repeats": 9, "max_seconds": None}
    cpu = profile_chain(chain, clock="cpu", pace=0.5, **kwargs)  # type: ignore[arg-type]
    wall = profile_chain(chain, clock="wall", pace=0.5, **kwargs)  # type: ignore[arg-type]
    assert cpu.provenance["pace"] == 0.5 and wall.provenance["pace"] == 0.5
    # twice the CPU time at half speed (more if other work preempts it; unpaced, about 1)
    assert wall.sum_ms / cpu.sum_ms > 1.5
    with pytest.raises(UsageError, match="one thread"):
        profile_chain(chain, threads=2, pace=0.5, **kwargs)  # type: ignore[arg-type]


def test_a_cpu_clock_profile_of_a_paced_device_does_not_rest() -> None:
    layers = [torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)]
    chain = trace(torch.nn.Sequential(*layers).eval(), (torch.randn(1, 64, 40, 40),))
    kwargs = {"device": "d", "warmup": 1, "repeats": 6, "max_seconds": None, "clock": "cpu"}
    start = time.perf_counter()
    plain = profile_chain(chain, **kwargs)  # type: ignore[arg-type]
    middle = time.perf_counter()
    paced = profile_chain(chain, pace=0.05, **kwargs)  # type: ignore[arg-type]
    end = time.perf_counter()
    assert paced.provenance["pace"] == 0.05 and "pace" not in plain.provenance
    # paced at 0.05, the 7 rounds of blocks and whole model would rest 19 times their CPU time
    work_s = 7 * (paced.sum_ms + paced.whole_ms) / 1000
    assert (end - middle) - (middle - start) < 5 * work_s, (end - middle, middle - start, work_s)


def test_cost_model_sums_blocks_on_a_paced_device() -> None:
    profile = synthetic_profile(3, times_ms=[10, 20, 30], cut_bytes=[1_000] * 4)
    profile = type(profile)(
        **{**profile.__dict__, "whole_ms": 90.0, "provenance": {"clock": "cpu"}}
    )
    devices = {
        "q": Device("q", profile="host", cpu_quota=0.5),
        "p": Device("p", profile="host", cpu_quota=0.5, throttle="pace"),
    }
    testbed = Testbed("qp", devices, (Link("q", "p", 1.0, 100.0),), "q", "q", ())
    model = CostModel(testbed, {"q": profile, "p": profile}, overheads=Overheads())
    # CPU-clock work at half a core takes twice as long on both; only the quota device spreads
    # the whole-model time (90 ms against 60 ms of block medians) over its blocks
    assert model.compute_ms("q", 0, 3) == pytest.approx(90 / 0.5)
    assert model.compute_ms("p", 0, 3) == pytest.approx(60 / 0.5)
    e = model.evaluate(Plan.parse("p[0:3]"))
    assert e.stages[0].compute_ms == pytest.approx(120)


def test_a_paced_device_works_its_runtime_into_its_rests() -> None:
    profile = synthetic_profile(2, times_ms=[10, 30], cut_bytes=[1_000] * 3)
    profile = type(profile)(**{**profile.__dict__, "provenance": {"clock": "cpu"}})
    devices = {
        "q": Device("q", profile="host", cpu_quota=0.5),
        "p": Device("p", profile="host", cpu_quota=0.5, throttle="pace"),
    }
    testbed = Testbed("qp", devices, (Link("q", "p", 1.0, 100.0),), "q", "q", ())
    overheads = Overheads(copy_gbps=0.0, request_ms=5.0)
    model = CostModel(testbed, {"q": profile, "p": profile}, overheads=overheads)
    # p computes 10 ms of CPU in 20 ms: the 5 ms of its runtime fit in the 10 ms of rest
    assert model.stage_busy("p", 0, 1, first=False, last=False) == pytest.approx(20)
    # q, under a quota, pays them on top, and as the sink once more for relaying the output
    assert model.stage_busy("q", 0, 1, first=True, last=False) == pytest.approx(20 + 5 + 5)
    # runtime work beyond the rests overflows them: 10 ms of CPU + 25 ms
    heavy = CostModel(
        testbed,
        {"q": profile, "p": profile},
        overheads=Overheads(copy_gbps=0.0, request_ms=25.0),
    )
    assert heavy.stage_busy("p", 0, 1, first=False, last=False) == pytest.approx(10 + 25)


def test_launcher_hands_the_pace_to_the_command() -> None:
    code = f"import os; print(os.environ.get({ENV!r}))"
    launcher = [sys.executable, "-m", "optisplit.emulate.enter", "--pace", "0.4", "--"]
    out = subprocess.run([*launcher, sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0.4"
    bad = [sys.executable, "-m", "optisplit.emulate.enter", "--pace", "3", "--", "true"]
    out = subprocess.run(bad, capture_output=True, text=True)
    assert out.returncode == 1 and "expected a speed" in out.stderr


def test_a_paced_device_is_paced_even_when_its_testbed_is_not_up(tmp_path: Path) -> None:
    path = tmp_path / f"paced{os.getpid()}.yaml"
    path.write_text(
        f"schema_version: 1\nname: paced{os.getpid()}\nsource: slow\n"
        "devices:\n  slow: {cores: [0], cpu_quota: 0.5, throttle: pace}\n"
        "  fast: {cores: [0]}\nlinks:\n  - {between: [slow, fast], rtt_ms: 1, mbps: 100}\n"
    )
    testbed = load_testbed(str(path))
    assert not emulate.is_up(testbed)
    argv = emulate.wrap_command(testbed, "slow", [sys.executable, "-c", "pass"])
    assert argv[:2] == ["env", f"{ENV}=0.5"] and argv[2:5] == ["taskset", "-c", "0"]
    assert emulate.wrap_command(testbed, "fast", ["true"])[0] == "taskset"


def test_speed_check_sees_a_paced_device_at_its_speed() -> None:
    from optisplit.emulate import checks

    inside = [sys.executable, "-m", "optisplit.emulate.enter", "--pace", "0.25", "--"]
    wall, cpu = checks._loop_seconds(inside, 0.1)
    assert cpu == pytest.approx(0.1, abs=0.02) and wall > 2 * cpu
    assert checks.within(checks.measure_device(inside), checks.expected_speed(0.25))


class _CountingPacer(Pacer):
    """A pacer that also records the CPU time of each piece of work it rested after."""

    def __init__(self, speed: float) -> None:
        super().__init__(speed)
        self.works_ns: list[int] = []

    def rest(self, cpu_ns: int, wall_ns: int | None = None) -> None:
        self.works_ns.append(cpu_ns)
        super().rest(cpu_ns, wall_ns)


def test_a_paced_stage_rests_once_after_all_its_blocks() -> None:
    blocks = [lambda *t: (_spin(0.004), *t)[1:] for _ in range(3)]
    pacer = _CountingPacer(0.5)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    out = PacedBlocks(blocks, pacer)(torch.ones(2))
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    assert torch.equal(out[0], torch.ones(2))
    assert len(pacer.works_ns) == 1  # the blocks ran back to back, one rest for the stage
    assert pacer.works_ns[0] / 1e9 >= 3 * 0.004
    assert wall / cpu > 2.0 * 0.9  # half a core: twice the stage's CPU time


def test_anchor_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ANCHOR_ENV, raising=False)
    assert anchor_from_env() is None and SpeedReference.from_env() is None
    monkeypatch.setenv(ANCHOR_ENV, "0.25")
    assert anchor_from_env() == 0.25
    reference = SpeedReference.from_env()
    assert reference is not None and reference.anchor_ms == 0.25
    for bad in ("0", "-1", "inf", "soon"):
        monkeypatch.setenv(ANCHOR_ENV, bad)
        with pytest.raises(UsageError, match=ANCHOR_ENV):
            anchor_from_env()


def test_speed_reference_reads_its_recent_median_against_the_anchor() -> None:
    reference = SpeedReference(0.2, window=3)
    assert reference.slowdown() == 1.0  # nothing sampled yet
    ms = reference.sample()
    assert ms > 0 and reference.slowdown() == pytest.approx(min(2.0, max(0.5, ms / 0.2)))
    reference._samples.extend([0.3, 0.1, 0.3])  # the window keeps the last three
    assert reference.slowdown() == pytest.approx(1.5)
    reference._samples.extend([0.9, 0.9, 0.9])  # a stall, not the host's speed: bounded
    assert reference.slowdown() == 2.0
    reference._samples.extend([0.01] * 3)
    assert reference.slowdown() == 0.5
    # measure() starts over: its samples alone, all from now
    fresh = reference.measure(runs=4)
    assert len(reference._samples) == 3 and 0.5 <= fresh <= 2.0
    # an anchor is the kernel's own median time on this thread
    anchor = SpeedReference.anchor(0.1)
    assert 0.001 < anchor < 50


def _held(reference: SpeedReference, slowdown: float) -> SpeedReference:
    """``reference`` holding one slowdown, sampling no more."""
    assert reference.anchor_ms is not None
    reference._samples.clear()
    reference._samples.append(slowdown * reference.anchor_ms)
    reference.interval_s = 1e9
    reference._last = time.monotonic()
    return reference


def test_anchored_pacer_rests_for_the_speed_at_its_anchor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(pace.time, "sleep", slept.append)
    reference = SpeedReference(0.2)
    slow_host = Pacer(0.5, _held(reference, 1.5))
    slow_host.rest(4_000_000, 4_000_000)  # 4 ms of work on a core 1.5x slow: 4 / 0.75 in all
    assert slept == [pytest.approx(4 / 0.75 / 1e3 - 0.004, abs=1e-4)]
    fast_host = Pacer(0.5, _held(SpeedReference(0.2), 0.5))
    fast_host.rest(4_000_000, 4_000_000)  # on a core twice as fast: 4 / 0.25 in all
    assert slept[1] == pytest.approx(0.012, abs=1e-4)
    plain = Pacer(0.5)
    plain.rest(4_000_000, 4_000_000)
    assert slept[2] == pytest.approx(0.004, abs=1e-4)


def test_anchored_pacer_samples_its_reference_in_long_rests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(pace.time, "sleep", slept.append)
    reference = SpeedReference(1e6)  # an anchor no sample comes near: slowdown 0.5
    pacer = Pacer(0.5, reference)
    pacer.rest(200_000, 200_000)  # a short rest: no sample
    assert not reference._samples
    pacer.rest(4_000_000, 4_000_000)  # due and long enough: one sample, taken off the sleep
    assert len(reference._samples) == 1
    assert reference.slowdown() == 0.5
    assert slept[-1] < (0.2 + 4.0) / 1e3 - reference._samples[0] / 1e3 + 1e-4
    pacer.rest(4_000_000, 4_000_000)  # not due again this soon
    assert len(reference._samples) == 1


def test_launcher_hands_the_anchor_to_the_command() -> None:
    code = f"import os; print(os.environ.get({ANCHOR_ENV!r}))"
    launcher = [sys.executable, "-m", "optisplit.emulate.enter", "--pace", "0.4"]
    launcher += ["--anchor", "0.31", "--"]
    out = subprocess.run([*launcher, sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0.31"
    bad = [sys.executable, "-m", "optisplit.emulate.enter", "--anchor", "-2", "--", "true"]
    out = subprocess.run(bad, capture_output=True, text=True)
    assert out.returncode == 1 and "expected a positive time" in out.stderr


def test_an_anchored_cpu_clock_profile_divides_by_the_slowdown() -> None:
    layers = [torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(3)]
    chain = trace(torch.nn.Sequential(*layers).eval(), (torch.randn(1, 32, 32, 32),))
    kwargs = {"device": "d", "warmup": 1, "repeats": 8, "max_seconds": None, "clock": "cpu"}
    anchor = SpeedReference.anchor(0.2)
    near = profile_chain(chain, pace=0.5, anchor_ms=anchor, **kwargs)  # type: ignore[arg-type]
    far = profile_chain(chain, pace=0.5, anchor_ms=2 * anchor, **kwargs)  # type: ignore[arg-type]
    assert near.provenance["anchor_ms"] == anchor
    spread = near.provenance["slowdown"]
    assert 0.5 <= spread["min"] <= spread["median"] <= spread["max"] <= 2.0
    # against an anchor twice as long the host reads twice as fast: the work counts double
    assert 1.4 < far.sum_ms / near.sum_ms < 2.9, (far.sum_ms, near.sum_ms)
    plain = profile_chain(chain, pace=0.5, **kwargs)  # type: ignore[arg-type]
    assert "anchor_ms" not in plain.provenance and "slowdown" not in plain.provenance
