"""Sweeps: the front per network condition, and the paper's finding on a synthetic testbed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from optisplit.cli import main
from optisplit.profile import BlockProfile, BlockTiming, profile_path, save_profile
from optisplit.sweep import run_sweep
from optisplit.testbed import parse_testbed

# A slow edge device where inputs appear and a 10x faster server. The input is large and the
# activations shrink along the chain, as in image classifiers.
CUT_BYTES = (600_000, 400_000, 100_000, 20_000, 4_000)
TESTBED = {
    "schema_version": 1,
    "name": "toybed",
    "source": "edge",
    "devices": {"edge": {}, "server": {}},
    "links": [{"between": ["edge", "server"], "rtt_ms": 1.0, "mbps": 100}],
}


def _profile(device: str, block_ms: float) -> BlockProfile:
    n = len(CUT_BYTES) - 1
    blocks = tuple(
        BlockTiming(i, f"b{i}", block_ms, block_ms, block_ms, CUT_BYTES[i + 1], 1000, 0)
        for i in range(n)
    )
    return BlockProfile(
        device=device,
        model="toy",
        batch_size=1,
        threads=1,
        granularity="coarse",
        input_bytes=CUT_BYTES[0],
        output_bytes=CUT_BYTES[-1],
        blocks=blocks,
        cut_names=tuple(f"b{i}" for i in range(1, n)),
        interior_cut_bytes=CUT_BYTES[1:-1],
        whole_ms=block_ms * n,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    import yaml

    for device, ms in (("edge", 20.0), ("server", 2.0)):
        save_profile(_profile(device, ms), profile_path(tmp_path, device, "toy", 1))
    (tmp_path / "testbeds").mkdir()
    (tmp_path / "testbeds" / "toybed.yaml").write_text(yaml.safe_dump(TESTBED))
    return tmp_path


def test_constrained_links_move_the_front_toward_the_source(root: Path) -> None:
    testbed = parse_testbed(TESTBED)
    sweep = run_sweep("toy", testbed, ["lan", "constrained"], profiles_root=str(root))
    lan, constrained = (c.summary() for c in sweep.conditions)
    assert lan["condition"] == "lan" and lan["rtt_ms"] == pytest.approx(0.2)
    assert constrained["mbps"] == pytest.approx(5.0)
    # on a LAN the fastest plan offloads everything it can; constrained, it stays on the edge
    assert lan["source_share_at_min_latency"] < 0.5
    assert constrained["source_share_at_min_latency"] == pytest.approx(1.0)
    assert constrained["source_share_mean"] > lan["source_share_mean"]
    for cond in sweep.conditions:
        assert cond.front and len(cond.front) == len(cond.source_shares)
        assert all(0.0 <= s <= 1.0 for s in cond.source_shares)
        lat = [e.latency_ms for e in cond.front]
        assert lat == sorted(lat)


def test_source_share_is_the_share_of_source_compute(root: Path) -> None:
    testbed = parse_testbed(TESTBED)
    sweep = run_sweep("toy", testbed, ["wifi"], profiles_root=str(root))
    for evaluation, share in zip(sweep.conditions[0].front, sweep.conditions[0].source_shares):
        on_edge = sum(s.end - s.start for s in evaluation.plan.stages if s.device == "edge")
        assert share == pytest.approx(on_edge / 4)


def test_sweep_with_measure_compares_each_condition(root: Path) -> None:
    testbed = parse_testbed(TESTBED)
    seen: list[str] = []

    def measure(bed: Any, condition: str, plans: Any) -> list[dict[str, Any]]:
        seen.append(condition)
        assert bed.links[0].rtt_ms == pytest.approx(10.0)
        return [
            {
                "plan": str(p),
                "predicted": {"latency_ms": 1.0, "throughput_rps": 1.0},
                "measured": {"latency_ms": 1.1, "latency_p95_ms": 1.2, "throughput_rps": 0.9},
                "outputs_match": True,
                "error": None,
            }
            for p in plans
        ]

    sweep = run_sweep("toy", testbed, ["wifi"], profiles_root=str(root), measure=measure)
    assert seen == ["wifi"]
    summary = sweep.conditions[0].summary()
    assert summary["latency_mape"] == pytest.approx(100 / 11)


def test_cli_sweep_json_and_plot(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = root / "sweep.png"
    args = ["sweep", "toy", "--testbed", "toybed", "--profiles", str(root), "--plot", str(plot)]
    assert main([*args, "--conditions", "lan,constrained", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["condition"] for s in doc["summary"]] == ["lan", "constrained"]
    assert doc["source"] == "edge"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--conditions", "lan,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_cost_model_spreads_the_whole_model_time_over_the_blocks() -> None:
    import dataclasses

    from optisplit.cost import CostModel, Overheads
    from optisplit.plan import Plan

    testbed = parse_testbed(TESTBED)
    edge = dataclasses.replace(_profile("edge", 20.0), whole_ms=100.0)  # blocks sum to 80
    profiles = {"edge": edge, "server": _profile("server", 2.0)}
    model = CostModel(testbed, profiles)
    assert model.compute_ms("edge", 0, 4) == pytest.approx(100.0)
    assert model.compute_ms("edge", 1, 3) == pytest.approx(50.0)
    assert model.compute_ms("server", 0, 4) == pytest.approx(8.0)
    bare = CostModel(testbed, profiles, overheads=Overheads.none())
    assert bare.compute_ms("edge", 0, 4) == pytest.approx(80.0)
    evaluation = model.evaluate(Plan.parse("edge[0:4]"))
    assert evaluation.latency_ms == pytest.approx(100.0)


def test_cpu_clock_profiles_are_divided_by_the_device_quota() -> None:
    import dataclasses

    from optisplit.cost import CostModel

    spec = {**TESTBED, "devices": {"edge": {"cpu_quota": 0.25}, "server": {"cpu_quota": 2.0}}}
    testbed = parse_testbed(spec)
    cpu = {"clock": "cpu"}
    profiles = {
        "edge": dataclasses.replace(_profile("edge", 20.0), provenance=cpu),
        "server": dataclasses.replace(_profile("server", 2.0), provenance=cpu),
    }
    model = CostModel(testbed, profiles)
    assert model.compute_ms("edge", 0, 4) == pytest.approx(320.0)  # 80 ms of work at 1/4 core
    assert model.compute_ms("server", 0, 4) == pytest.approx(8.0)  # one thread: at most 1 core
    wall = CostModel(testbed, {"edge": _profile("edge", 20.0), "server": _profile("server", 2.0)})
    assert wall.compute_ms("edge", 0, 4) == pytest.approx(80.0)  # wall clock includes the quota


def test_handoffs_add_two_local_messages_to_the_latency() -> None:
    from optisplit.cost import CostModel, Overheads
    from optisplit.plan import Plan

    testbed = parse_testbed(TESTBED)
    profiles = {"edge": _profile("edge", 20.0), "server": _profile("server", 2.0)}
    plain = CostModel(testbed, profiles).evaluate(Plan.parse("edge[0:4]"))
    handed = CostModel(testbed, profiles, overheads=Overheads(handoff_ms=1.5)).evaluate(
        Plan.parse("edge[0:4]")
    )
    assert handed.latency_ms == pytest.approx(plain.latency_ms + 3.0)
    # each hand-off also costs per MB it carries: the input at the source, the output at the
    # sink, whichever devices run the stages; throughput's bound is not a hand-off's
    per_mb = Overheads(handoff_ms=1.5, handoff_ms_per_mb=2.0)
    moved_mb = (CUT_BYTES[0] + CUT_BYTES[-1]) / 1e6
    base = CostModel(testbed, profiles, overheads=Overheads(handoff_ms=1.5), depth=0)
    grown = CostModel(testbed, profiles, overheads=per_mb, depth=0)
    for text in ("edge[0:4]", "edge[0:2] -> server[2:4]", "server[0:4]"):
        before, after = base.evaluate(Plan.parse(text)), grown.evaluate(Plan.parse(text))
        assert after.latency_ms == pytest.approx(before.latency_ms + 2.0 * moved_mb), text
        assert after.throughput_rps == pytest.approx(before.throughput_rps), text
    assert per_mb.handoffs_ms(500_000, 1_000) == pytest.approx(3.0 + 2.0 * 0.501)
