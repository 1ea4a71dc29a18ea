"""Predicted vs measured: metrics on hand-computed cases and on a study shaped like validate's."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from optisplit.cli import main
from optisplit.compare import (
    PlanComparison,
    compare_plans,
    compare_study,
    measured_backends,
    plans_from_results,
)
from optisplit.errors import StudyError

optuna.logging.set_verbosity(optuna.logging.WARNING)

# plan, predicted (latency, throughput), measured (latency, throughput)
ROWS = [
    ("a[0:4]", (10.0, 100.0), (11.0, 90.0)),
    ("a[0:2] -> b[2:4]", (20.0, 150.0), (19.0, 160.0)),
    ("b[0:4]", (40.0, 50.0), (44.0, 50.0)),
    ("b[0:1] -> a[1:4]", (30.0, 140.0), (32.0, 170.0)),
]


def _plans(
    rows: list[tuple[str, tuple[float, float], tuple[float, float]]],
) -> list[PlanComparison]:
    return [
        PlanComparison(plan, p[0], p[1], m[0], m[0] * 1.1, m[1], outputs_match=True)
        for plan, p, m in rows
    ]


def test_errors_mape_and_spearman_match_hand_computation() -> None:
    result = compare_plans(_plans(ROWS))
    lat_err = [(10 - 11) / 11, (20 - 19) / 19, (40 - 44) / 44, (30 - 32) / 32]
    thr_err = [(100 - 90) / 90, (150 - 160) / 160, 0.0, (140 - 170) / 170]
    assert result.latency_mape == pytest.approx(100 * sum(map(abs, lat_err)) / 4)
    assert result.throughput_mape == pytest.approx(100 * sum(map(abs, thr_err)) / 4)
    assert result.plans[0].latency_error_pct == pytest.approx(100 * lat_err[0])
    assert result.latency_spearman == pytest.approx(1.0)
    # predicted throughput ranks 2,4,1,3 vs measured 2,3,1,4 -> rho = 1 - 6*2/(4*15) = 0.8
    assert result.throughput_spearman == pytest.approx(0.8)


def test_fronts_precision_recall_and_shared_reference_hypervolume() -> None:
    result = compare_plans(_plans(ROWS))
    flags = {p.plan: (p.on_predicted_front, p.on_measured_front) for p in result.plans}
    # predicted front: a (10,100), a->b (20,150); b->a (30,140) is dominated by a->b
    # measured front: a (11,90), a->b (19,160), b->a (32,170)
    assert flags == {
        "a[0:4]": (True, True),
        "a[0:2] -> b[2:4]": (True, True),
        "b[0:4]": (False, False),
        "b[0:1] -> a[1:4]": (False, True),
    }
    assert result.front_precision == pytest.approx(1.0)
    assert result.front_recall == pytest.approx(2 / 3)
    ref_lat = 1.1 * 44.0
    assert result.reference_point == (pytest.approx(ref_lat), 0.0)
    hv_pred = (ref_lat - 10) * 100 + (ref_lat - 20) * 50
    hv_meas = (ref_lat - 11) * 90 + (ref_lat - 19) * 70 + (ref_lat - 32) * 10
    assert result.hv_predicted == pytest.approx(hv_pred)
    assert result.hv_measured == pytest.approx(hv_meas)


def test_failed_plans_are_listed_but_left_out_of_every_figure() -> None:
    plans = [
        *_plans(ROWS[:3]),
        PlanComparison("b[0:1] -> a[1:4]", 30.0, 140.0, None, None, None, error="worker died"),
    ]
    result = compare_plans(plans)
    assert len(result.plans) == 4
    assert [p.plan for p in result.failed] == ["b[0:1] -> a[1:4]"]
    assert result.failed[0].latency_error_pct is None
    assert not result.failed[0].on_measured_front
    assert result.latency_mape == pytest.approx(100 * (1 / 11 + 1 / 19 + 4 / 44) / 3)
    doc = result.to_dict()
    assert doc["plans"][3]["error"] == "worker died"


def test_spearman_is_none_when_undefined() -> None:
    result = compare_plans(_plans(ROWS[:2]))
    assert result.latency_spearman is None
    assert result.throughput_spearman is None
    empty = compare_plans([])
    assert empty.latency_mape is None and empty.hv_measured is None
    assert empty.front_precision is None


# per plan of ROWS: three rounds of measured (latency, throughput)
ROUNDS = [
    [(11.0, 90.0), (12.0, 100.0), (11.0, 90.0)],
    [(19.0, 160.0), (19.0, 150.0), (20.0, 160.0)],
    [(44.0, 50.0), (40.0, 50.0), (44.0, 60.0)],
    [(32.0, 170.0), (32.0, 160.0), (32.0, 170.0)],
]


def test_repeatability_compares_each_round_with_the_next() -> None:
    plans = [
        dataclasses.replace(p, measured_rounds=tuple(r)) for p, r in zip(_plans(ROWS), ROUNDS)
    ]
    repeat = compare_plans(plans).repeatability
    assert repeat is not None and repeat["rounds"] == 3

    def mape(i: int, a: int, b: int) -> float:  # round b against round a, objective i
        return 100 * sum(abs(r[b][i] - r[a][i]) / r[b][i] for r in ROUNDS) / len(ROUNDS)

    assert repeat["latency_mape"] == pytest.approx((mape(0, 0, 1) + mape(0, 1, 2)) / 2)
    assert repeat["throughput_mape"] == pytest.approx((mape(1, 0, 1) + mape(1, 1, 2)) / 2)
    # latency ranks 1,2,4,3 in every round
    assert repeat["latency_spearman"] == pytest.approx(1.0)
    # throughput round 1 -> 2: [90,160,50,170] vs [100,150,50,160], ranks 2,3,1,4 vs 2,3,1,4
    # round 2 -> 3: [100,150,50,160] vs [90,160,60,170], ranks 2,3,1,4 vs 2,3,1,4
    assert repeat["throughput_spearman"] == pytest.approx(1.0)
    one_round = [dataclasses.replace(p, measured_rounds=(r[0],)) for p, r in zip(plans, ROUNDS)]
    assert compare_plans(one_round).repeatability is None
    assert compare_plans(_plans(ROWS)).repeatability is None


def test_repeatability_from_validate_results_and_its_rank_disagreement() -> None:
    rounds = [
        [(10.0, 100.0), (10.0, 120.0)],
        [(20.0, 110.0), (20.0, 100.0)],
        [(30.0, 90.0), (30.0, 80.0)],
    ]
    results = [
        {
            "plan": f"a[0:{i + 1}]",
            "predicted": {"latency_ms": 10.0 * (i + 1), "throughput_rps": 100.0},
            "measured": _measured(
                10.0 * (i + 1),
                100.0,
                rounds=[{"latency_ms": a, "throughput_rps": b} for a, b in r],
            ),
            "outputs_match": True,
            "error": None,
        }
        for i, r in enumerate(rounds)
    ]
    comparison = compare_plans(plans_from_results(results))
    repeat = comparison.repeatability
    assert repeat is not None and repeat["rounds"] == 2
    # throughput ranks 2,3,1 then 3,2,1: rho = 1 - 6 * (1 + 1 + 0) / (3 * 8) = 0.5
    assert repeat["throughput_spearman"] == pytest.approx(0.5)
    assert repeat["latency_mape"] == pytest.approx(0.0)
    assert comparison.to_dict()["repeatability"] == repeat


def _measured(latency: float, throughput: float, **extra: Any) -> dict[str, Any]:
    return {
        "latency_ms": latency,
        "latency_p95_ms": latency * 1.2,
        "throughput_rps": throughput,
        "items_per_s": throughput,
        "requests": 5,
        "outputs_match": True,
        "error": None,
        "stages": [],
        "transfers": [],
        **extra,
    }


def _result(plan: str, predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """A ``validate_plans`` result of a plan measured without error."""
    return {
        "plan": plan,
        "predicted": predicted,
        "measured": measured,
        "outputs_match": True,
        "error": None,
    }


def make_study(
    rows: list[tuple[str, tuple[float, float], tuple[float, float]]] = ROWS,
    *,
    backends: tuple[str, ...] = ("socket",),
    storage: str | None = None,
    name: str = "demo-study",
    rounds: list[list[tuple[float, float]]] | None = None,
) -> optuna.Study:
    """A study shaped like search + validate write it (shared with test_report)."""
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["minimize", "maximize"]
    )
    for key, value in {
        "model": "toy",
        "testbed": "local",
        "batch_size": 1,
        "granularity": "coarse",
        "condition": None,
        "profiles_root": "profiles",
    }.items():
        study.set_user_attr(key, value)
    for i, (plan, pred, meas) in enumerate(rows):
        extra = {}
        if rounds is not None:
            extra["rounds"] = [{"latency_ms": a, "throughput_rps": b} for a, b in rounds[i]]
        attrs: dict[str, Any] = {
            "plan": plan,
            "engine": "exact",
            "latency_ms": pred[0],
            "throughput_rps": pred[1],
            "items_per_s": pred[1],
            "memory_bytes": {"a": 1000},
            "feasible": True,
            "on_front": True,
        }
        for backend in backends:
            attrs[f"measured_{backend}"] = _measured(*meas, **extra)
        study.add_trial(optuna.trial.create_trial(values=list(pred), user_attrs=attrs))
    # a predicted-only trial (never validated) is ignored by compare
    study.add_trial(
        optuna.trial.create_trial(
            values=[99.0, 1.0],
            user_attrs={"plan": "c[0:4]", "latency_ms": 99.0, "throughput_rps": 1.0},
        )
    )
    return study


def test_compare_study_reads_trials_and_picks_the_backend() -> None:
    study = make_study(backends=("rpc", "socket"))
    assert measured_backends(study) == ["socket", "rpc"]
    result = compare_study(study)
    assert result.backend == "socket"
    assert result.study == "demo-study"
    assert sorted(p.plan for p in result.plans) == sorted(r[0] for r in ROWS)
    assert result.info["testbed"] == "local"
    assert compare_study(study, backend="rpc").latency_mape == pytest.approx(result.latency_mape)
    doc = result.to_dict()
    for key in (
        "latency_mape",
        "throughput_mape",
        "latency_spearman",
        "throughput_spearman",
        "hv_predicted",
        "hv_measured",
        "front_precision",
        "front_recall",
        "plans",
    ):
        assert key in doc
    assert math.isfinite(doc["hv_measured"])


def test_compare_study_reads_the_rounds() -> None:
    from optisplit.report import comparison_markdown

    comparison = compare_study(make_study(rounds=ROUNDS))
    repeat = comparison.repeatability
    assert repeat is not None and repeat["rounds"] == 3
    assert repeat["latency_spearman"] == pytest.approx(1.0)
    assert "| round-to-round throughput Spearman | 1 |" in comparison_markdown(comparison)
    single = compare_study(make_study(name="single"))
    assert single.repeatability is None
    assert "round-to-round" not in comparison_markdown(single).split("| plan")[0]


def test_compare_study_without_measurements_is_a_one_line_error() -> None:
    study = make_study(backends=())
    with pytest.raises(StudyError, match="no measured plans"):
        compare_study(study)
    with pytest.raises(StudyError, match="rpc backend"):
        compare_study(make_study(), backend="rpc")


def test_cli_compare_json_plot_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    make_study(storage=url, name="s1")
    code = main(
        ["compare", "--study", "s1", "--storage", url, "--json", "--out-dir", str(tmp_path)]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "socket"
    assert len(doc["plans"]) == len(ROWS)
    assert doc["front_recall"] == pytest.approx(2 / 3)
    assert Path(doc["plot"]) == tmp_path / "s1" / "compare-socket.png"
    assert Path(doc["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert "latency MAPE" in Path(doc["report"]).read_text()


def test_cli_compare_missing_study_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["compare", "--study", "nope", "--storage", url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study named 'nope'" in err[0]


def test_a_plan_recorded_by_several_engines_counts_once() -> None:
    study = make_study()
    plan, pred, meas = ROWS[0]
    study.add_trial(
        optuna.trial.create_trial(
            values=list(pred),
            user_attrs={
                "plan": plan,
                "engine": "nsga2",
                "latency_ms": pred[0],
                "throughput_rps": pred[1],
                "on_front": False,
                "measured_socket": _measured(*meas),
            },
        )
    )
    result = compare_study(study)
    assert sorted(p.plan for p in result.plans) == sorted(r[0] for r in ROWS)


def test_predicted_bound_and_host_utilisation_reach_the_report() -> None:
    from optisplit.report import comparison_markdown

    host = {"busiest_core": {"core": "1", "utilization": 0.97}, "cores_ms": {"1": 9.7}}
    results = [
        _result(
            "a[0:1] -> b[1:2]",
            {"latency_ms": 10.0, "throughput_rps": 100.0, "bound": "core 1"},
            _measured(11.0, 90.0, host=host),
        ),
        # an older result: no bound, no host figures
        _result("a[0:2]", {"latency_ms": 20.0, "throughput_rps": 50.0}, _measured(20.0, 50.0)),
    ]
    comparison = compare_plans(plans_from_results(results))
    first, second = comparison.plans
    assert (first.predicted_bound, first.host_busiest) == ("core 1", 0.97)
    assert (second.predicted_bound, second.host_busiest) == (None, None)
    assert first.to_dict()["predicted_bound"] == "core 1"
    text = comparison_markdown(comparison)
    assert "| core 1 | 97 |" in text and "| n/a | n/a |" in text


def _stage(device: str, alone: float, streaming: float) -> dict[str, Any]:
    return {"device": device, "compute_ms": alone, "streaming_compute_ms": streaming}


def test_stream_slowdown_is_the_stage_that_slowed_most_while_requests_streamed() -> None:
    from optisplit.report import comparison_markdown

    results = [
        # the paced stage computed 20 % slower while requests streamed; the other 5 % faster
        _result(
            "a[0:1] -> b[1:2]",
            {"latency_ms": 10.0, "throughput_rps": 120.0},
            _measured(11.0, 100.0, stages=[_stage("a", 10.0, 12.0), _stage("b", 8.0, 7.6)]),
        ),
        # a sub-millisecond stage's ratio is its timer's noise: left out
        _result(
            "b[0:1] -> a[1:2]",
            {"latency_ms": 12.0, "throughput_rps": 90.0},
            _measured(12.0, 90.0, stages=[_stage("b", 9.0, 9.18), _stage("a", 0.5, 0.9)]),
        ),
        # an older result without stage figures
        _result("a[0:2]", {"latency_ms": 20.0, "throughput_rps": 50.0}, _measured(20.0, 50.0)),
    ]
    comparison = compare_plans(plans_from_results(results))
    first, second, third = comparison.plans
    assert first.stream_slowdown_pct == pytest.approx(20.0)
    assert second.stream_slowdown_pct == pytest.approx(2.0)
    assert third.stream_slowdown_pct is None
    assert comparison.stream_slowdowns == pytest.approx((20.0, 2.0))
    assert comparison.stream_slowdown_pct == pytest.approx(11.0)  # median of 20 and 2
    doc = comparison.to_dict()
    assert doc["stream_slowdown_pct"] == pytest.approx(11.0)
    assert doc["plans"][0]["stream_slowdown_pct"] == pytest.approx(20.0)
    text = comparison_markdown(comparison)
    assert "| stages slower while streaming (median) | 11.00 % |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `a[0:1] -> b[1:2]`"))
    header = next(line for line in text.splitlines() if line.startswith("| plan |"))
    assert row.count("|") == header.count("|") and "| +20.0 |" in row
