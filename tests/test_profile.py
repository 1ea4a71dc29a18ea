"""Profile files: round trip, scaling, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from optisplit.errors import ProfileError
from optisplit.profile import BlockProfile, BlockTiming, load_profile, profile_path, save_profile


def _profile() -> BlockProfile:
    blocks = tuple(
        BlockTiming(i, f"layer{i}", 1.0 + i, 0.9 + i, 1.2 + i, 100 * (i + 1), 10 * i, 50)
        for i in range(3)
    )
    return BlockProfile(
        device="host",
        model="toy",
        batch_size=2,
        threads=1,
        granularity="coarse",
        input_bytes=64,
        output_bytes=8,
        blocks=blocks,
        cut_names=("layer1", "layer2"),
        interior_cut_bytes=(120, 260),
        whole_ms=6.1,
        provenance={"host": "x"},
    )


def test_round_trip_and_csv(tmp_path: Path) -> None:
    profile = _profile()
    path = save_profile(profile, profile_path(tmp_path, "host", "toy", 2))
    assert path == tmp_path / "devices" / "host" / "toy-b2.json"
    assert load_profile(path) == profile
    csv = path.with_suffix(".csv").read_text().splitlines()
    assert csv[0].startswith("index,name,time_ms") and len(csv) == 4
    assert [profile.cut_bytes(c) for c in range(4)] == [64, 120, 260, 8]
    assert profile.sum_ms == pytest.approx(6.0)


def test_entry_times_round_trip_scale_and_older_files_lack_them(tmp_path: Path) -> None:
    profile = _profile()
    timed = dataclasses.replace(
        profile,
        blocks=tuple(
            dataclasses.replace(b, entry_ms=b.time_ms + 0.5 * b.index) for b in profile.blocks
        ),
    )
    assert [b.entry_cost_ms for b in timed.blocks] == pytest.approx([0.0, 0.5, 1.0])
    path = save_profile(timed, profile_path(tmp_path, "host", "toy", 2))
    assert load_profile(path) == timed
    assert "entry_ms" in path.with_suffix(".csv").read_text().splitlines()[0]
    assert [b.entry_ms for b in timed.scaled(2.0, "pi").blocks] == pytest.approx([2.0, 5.0, 8.0])
    # a block that starts a stage faster than in the chain costs nothing extra
    quick = dataclasses.replace(profile.blocks[1], entry_ms=0.1)
    assert quick.entry_cost_ms == 0.0
    # files written before entry times were measured: no entry cost
    doc = timed.to_dict()
    for block in doc["blocks"]:
        del block["entry_ms"]
    older = tmp_path / "older.json"
    older.write_text(json.dumps(doc))
    assert all(b.entry_ms is None and b.entry_cost_ms == 0.0 for b in load_profile(older).blocks)
    doc["blocks"][1]["entry_ms"] = -3
    older.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="older.json: malformed field: entry_ms must be a time"):
        load_profile(older)


def test_scaled() -> None:
    scaled = _profile().scaled(10.0, "pi")
    assert scaled.device == "pi" and scaled.sum_ms == pytest.approx(60.0)
    assert scaled.whole_ms == pytest.approx(61.0)
    assert scaled.provenance["scaled_from"] == "host"


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ProfileError, match="not found: .*nope.json"):
        load_profile(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json is not valid JSON"):
        load_profile(bad)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**_profile().to_dict(), "schema_version": 99}))
    with pytest.raises(ProfileError, match="schema_version 99"):
        load_profile(future)
    partial = tmp_path / "partial.json"
    doc = _profile().to_dict()
    del doc["whole_ms"]
    partial.write_text(json.dumps({**doc}))
    with pytest.raises(ProfileError, match="missing field 'whole_ms'"):
        load_profile(partial)


def test_wander_says_how_far_the_median_lies_above_the_10th_percentile() -> None:
    from synthetic import synthetic_profile

    base = synthetic_profile(3, times_ms=[10, 10, 10])

    def with_p10(p10: object, whole: float = 31.8) -> BlockProfile:
        provenance = {} if p10 is None else {"whole_p10_ms": p10}
        return BlockProfile(**{**base.__dict__, "whole_ms": whole, "provenance": provenance})

    assert with_p10(24.66).wander == pytest.approx((31.8 - 24.66) / 24.66)
    assert with_p10(31.8).wander == 0.0
    assert with_p10(None).wander is None and with_p10("x").wander is None


def test_cpu_clock_profiles_of_one_host_are_compared_by_whole_model_time() -> None:
    from optisplit.profile import cpu_clock_disagreement

    def timed(whole: float, clock: str | None = "cpu") -> BlockProfile:
        provenance = {} if clock is None else {"clock": clock}
        return BlockProfile(**{**_profile().__dict__, "whole_ms": whole, "provenance": provenance})

    assert cpu_clock_disagreement([timed(27.0), timed(34.4)]) == pytest.approx(34.4 / 27.0 - 1)
    assert cpu_clock_disagreement([timed(30.0), timed(30.0), timed(33.0)]) == pytest.approx(0.1)
    assert cpu_clock_disagreement([timed(30.0)]) is None  # nothing to compare
    # a wall-clock profile counts quota throttling and rests: devices differ by design
    assert cpu_clock_disagreement([timed(30.0), timed(60.0, "wall")]) is None
    assert cpu_clock_disagreement([timed(30.0), timed(60.0, None)]) is None
