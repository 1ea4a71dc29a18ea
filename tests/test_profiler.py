"""The block profiler: real timings, memory, provenance, sandboxing and argument checks."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from optisplit.chain import trace
from optisplit.errors import UsageError
from optisplit.profile import load_profile, profile_path, save_profile
from optisplit.profiler import profile_chain, profile_model, profile_module
from tests.models import tiny_cnn, tiny_residual


def test_profile_of_a_tiny_model(tmp_path: Path) -> None:
    rounds: list[tuple[int, int]] = []
    result = profile_model(
        "tiny",
        module="tests.models:tiny_residual",
        device="box",
        batch_size=2,
        warmup=1,
        repeats=5,
        on_progress=lambda done, total: rounds.append((done, total)),
    )
    assert rounds[-1] == (6, 6) and len(rounds) == 6
    assert result.device == "box" and result.model == "tiny" and result.batch_size == 2
    assert [b.name for b in result.blocks] == [
        "stem",
        "layers.0",
        "layers.1",
        "pool",
        "flatten",
        "fc",
    ]
    for block in result.blocks:
        assert 0 < block.time_p10_ms <= block.time_ms <= block.time_p90_ms
        assert block.entry_ms is not None and block.entry_ms > 0  # each block started stages
    stem = result.blocks[0]
    assert stem.out_bytes == 2 * 8 * 16 * 16 * 4 and stem.param_bytes == (8 * 3 * 9 + 8) * 4
    assert stem.mem_bytes >= stem.out_bytes
    assert result.blocks[4].mem_bytes == 0  # flatten is a view of its input
    assert result.interior_cut_bytes[0] == stem.out_bytes and result.output_bytes == 80
    assert result.whole_ms > 0 and result.sum_ms > 0
    prov = result.provenance
    assert prov["threads"] == 1 and prov["repeats"] == 5 and prov["clock"] == "wall"
    assert {"host", "cpu", "torch", "date"} <= set(prov)
    path = save_profile(result, profile_path(tmp_path, "box", "tiny", 2))
    assert load_profile(path) == result


def test_cpu_clock_and_fine_granularity() -> None:
    model, x = tiny_residual()
    chain = trace(model, (x,), granularity="fine", name="tiny")
    result = profile_chain(chain, device="host", warmup=0, repeats=3, clock="cpu")
    assert result.granularity == "fine" and result.n_blocks == chain.n_blocks
    assert result.provenance["clock"] == "cpu"
    # In-place relus write into their inputs; every round starts from a fresh input.
    assert all(b.time_ms > 0 for b in result.blocks)


def test_user_module_is_never_touched() -> None:
    model, x = tiny_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_before = x.clone()
    result = profile_module(model, (x,), device="host", name="tiny", warmup=0, repeats=2)
    assert result.n_blocks == 9
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(x, x_before)


def test_bad_arguments() -> None:
    model, x = tiny_cnn()
    chain = trace(model, (x,), name="tiny")
    with pytest.raises(UsageError, match="cpu clock measures one thread only"):
        profile_chain(chain, device="host", threads=2, clock="cpu")
    with pytest.raises(UsageError, match="unknown clock 'sun'"):
        profile_chain(chain, device="host", clock="sun")
    with pytest.raises(UsageError, match="repeats must be at least 1"):
        profile_chain(chain, device="host", repeats=0)
    with pytest.raises(UsageError, match="threads must be at least 1"):
        profile_chain(chain, device="host", threads=0)
    with pytest.raises(UsageError, match="spread must be at least 0 seconds"):
        profile_chain(chain, device="host", spread_s=-1.0)


def test_time_budget_stops_rounds_early_but_keeps_the_minimum() -> None:
    capped = profile_model(
        "tiny", module="tests.models:tiny_cnn", device="box", warmup=0, repeats=40, max_seconds=0.0
    )
    assert capped.provenance["repeats"] == 5
    full = profile_model(
        "tiny", module="tests.models:tiny_cnn", device="box", warmup=0, repeats=7, max_seconds=None
    )
    assert full.provenance["repeats"] == 7


def test_spread_rests_before_the_whole_model_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from optisplit import profiler

    events: list[tuple[str, float]] = []
    run_blocks, run_whole = profiler._run_blocks, profiler._Timed.run

    def blocks(*args: object) -> object:
        events.append(("blocks", time.monotonic()))
        return run_blocks(*args)  # type: ignore[arg-type]

    def whole(self: object) -> float:
        events.append(("whole", time.monotonic()))
        return run_whole(self)  # type: ignore[arg-type]

    monkeypatch.setattr(profiler, "_run_blocks", blocks)
    monkeypatch.setattr(profiler._Timed, "run", whole)
    profile_model(
        "tiny", module="tests.models:tiny_cnn", device="box", warmup=1, repeats=4, spread_s=0.8
    )
    kinds = [kind for kind, _ in events]
    assert kinds == ["blocks", "whole"] * 5
    # warm-up back to back; then each whole-model run half a round (0.1 s) after its blocks
    timed = events[2:]
    gaps = [timed[i + 1][1] - timed[i][1] for i in range(0, len(timed), 2)]
    assert all(0.09 <= gap < 0.2 for gap in gaps), gaps
    assert events[1][1] - events[0][1] < 0.09


def test_each_block_is_also_timed_as_a_stage_start_after_a_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from optisplit import profiler

    runs: list[tuple[int, float]] = []  # (block, wall seconds of the call, its rest included)
    inputs: list[tuple[torch.Tensor, ...]] = []
    run_entry, capture = profiler._run_entry, profiler._capture_inputs

    def capture_inputs(*args: object) -> list[tuple[torch.Tensor, ...]]:
        inputs.extend(capture(*args))  # type: ignore[arg-type]
        return inputs

    def entry(stage: object, args: tuple[torch.Tensor, ...], *rest: object) -> float:
        began = time.monotonic()
        ms = run_entry(stage, args, *rest)  # type: ignore[arg-type]
        runs.append((next(i for i, a in enumerate(inputs) if a is args), time.monotonic() - began))
        return ms

    monkeypatch.setattr(profiler, "_capture_inputs", capture_inputs)
    monkeypatch.setattr(profiler, "_run_entry", entry)
    result = profile_model(
        "tiny", module="tests.models:tiny_cnn", device="box", warmup=1, repeats=6, clock="cpu"
    )
    n = result.n_blocks
    blocks = [block for block, _ in runs]
    # every block in turn on the input it takes in the chain, ENTRY_SAMPLES times each
    assert blocks[: 2 * n] == list(range(n)) * 2
    assert all(blocks.count(b) >= profiler.ENTRY_SAMPLES for b in range(n))
    assert all(seconds >= profiler.ENTRY_REST_S for _, seconds in runs)
    assert all(b.entry_ms is not None and b.entry_ms > 0 for b in result.blocks)


def test_spread_spaces_the_timed_rounds_over_the_span() -> None:
    starts: list[float] = []
    spread = profile_model(
        "tiny",
        module="tests.models:tiny_cnn",
        device="box",
        warmup=1,
        repeats=5,
        spread_s=1.0,
        on_progress=lambda done, total: starts.append(time.monotonic()),
    )
    assert spread.provenance["repeats"] == 5 and spread.provenance["spread_s"] == 1.0
    # progress comes after each round: rounds 2..5 begin 0.2 s apart, after the pause
    gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
    assert all(gap >= 0.19 for gap in gaps), gaps
    assert starts[-1] - starts[1] >= 0.79
    # a spread longer than the time budget still runs every round it spaces out
    capped = profile_model(
        "tiny",
        module="tests.models:tiny_cnn",
        device="box",
        warmup=0,
        repeats=6,
        spread_s=0.6,
        max_seconds=0.0,
    )
    assert capped.provenance["repeats"] == 6


def test_a_start_that_measured_faster_than_the_chain_leaves_the_blocks_time(
    tmp_path: Path,
) -> None:
    """Paired start costs of a block of microseconds can have a median below minus its own
    time on a busy host: the profile keeps the block's time as its start, a positive time that
    the profile loader accepts, rather than writing a negative one it would refuse."""
    from optisplit.profiler import _build_profile

    model, x = tiny_cnn()
    chain = trace(model, (x,), name="tiny")
    n = chain.n_blocks
    block_ms = [[0.02, 0.03, 0.04] for _ in range(n)]
    extras = [[-0.5, -0.4, -0.6]] + [[0.1, 0.2, 0.3]] * (n - 1)  # block 0's start "saved" 0.5 ms
    settings = {"threads": 1, "warmup": 0, "repeats": 3}
    profile = _build_profile(chain, "box", settings, block_ms, [0.2] * 3, [0] * n, extras)
    first, second = profile.blocks[0], profile.blocks[1]
    assert first.entry_ms == pytest.approx(first.time_ms) and first.entry_ms > 0
    assert second.entry_ms == pytest.approx(0.03 + 0.2)
    path = save_profile(profile, tmp_path / "box.json")
    assert load_profile(path).blocks[0].entry_ms == pytest.approx(0.03)
