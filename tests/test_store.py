"""Study conventions: one trial per evaluated plan, fronts, measurements, one-line errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from synthetic import all_plans, synthetic_profile, two_device_testbed

from optisplit import store
from optisplit.cost import CostModel, Evaluation
from optisplit.errors import StudyError
from optisplit.pareto import pareto_front

ATTRS = {
    "model": "synth",
    "testbed": "pair",
    "batch_size": 1,
    "granularity": "coarse",
    "condition": None,
    "profiles_root": "profiles",
}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'studies.db'}"


def _evaluations() -> list[Evaluation]:
    testbed = two_device_testbed()
    model = CostModel(testbed, {"a": synthetic_profile(5), "b": synthetic_profile(5)})
    return [model.evaluate(p) for p in all_plans(model.devices, 5)]


def test_every_evaluation_becomes_a_complete_trial_with_the_agreed_attributes(url: str) -> None:
    evaluations = _evaluations()
    front = pareto_front(evaluations)
    study = store.create_study("s1", url, attrs=ATTRS)
    written = store.record_evaluations(
        study, evaluations, engine="nsga2", front=[str(e.plan) for e in front]
    )
    assert written == len(evaluations)
    loaded = store.load_study("s1", url)
    assert loaded.user_attrs == ATTRS
    assert [d.name for d in loaded.directions] == ["MINIMIZE", "MAXIMIZE"]
    trials = loaded.get_trials()
    assert len(trials) == len(evaluations)
    assert [t.number for t in trials] == list(range(len(evaluations)))
    for trial, evaluation in zip(trials, evaluations):
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.values == pytest.approx([evaluation.latency_ms, evaluation.throughput_rps])
        attrs = trial.user_attrs
        assert attrs["plan"] == str(evaluation.plan)
        assert attrs["engine"] == "nsga2"
        assert attrs["latency_ms"] == pytest.approx(evaluation.latency_ms)
        assert attrs["throughput_rps"] == pytest.approx(evaluation.throughput_rps)
        assert attrs["items_per_s"] == pytest.approx(evaluation.items_per_s)
        assert attrs["memory_bytes"] == dict(evaluation.memory_bytes)
        assert attrs["feasible"] is evaluation.feasible
        assert attrs["on_front"] is (evaluation in front)
        assert attrs["bound"] == evaluation.bound and attrs["bound"]
    assert [t.user_attrs["plan"] for t in store.front_trials(loaded)] == [
        str(e.plan) for e in front
    ]


def test_resume_appends_and_the_combined_front_is_kept(url: str) -> None:
    evaluations = _evaluations()
    front = pareto_front(evaluations)
    study = store.create_study("s2", url, attrs=ATTRS)
    worse = [e for e in evaluations if e not in front][:3]
    store.record_evaluations(study, worse, engine="optuna", front=[str(e.plan) for e in worse])
    again = store.create_study("s2", url, attrs=ATTRS, resume=True)
    store.record_evaluations(again, front, engine="exact", front=[str(e.plan) for e in front])
    loaded = store.load_study("s2", url)
    assert len(loaded.get_trials()) == len(worse) + len(front)
    kept = {t.user_attrs["plan"] for t in store.front_trials(loaded)}
    assert kept == {str(e.plan) for e in front}


def test_existing_study_asks_for_resume_or_a_new_name(url: str) -> None:
    store.create_study("taken", url, attrs=ATTRS)
    with pytest.raises(StudyError, match=r"already exists.*--resume.*another --study name"):
        store.create_study("taken", url, attrs=ATTRS)
    with pytest.raises(StudyError, match="cannot resume study 'free'"):
        store.create_study("free", url, resume=True)


def test_missing_study_and_malformed_urls_are_one_line_errors(url: str) -> None:
    store.create_study("present", url, attrs=ATTRS)
    with pytest.raises(StudyError, match="no study named 'absent'.*present") as info:
        store.load_study("absent", url)
    assert "\n" not in str(info.value)
    for bad in ("not a url", "nosuchdb://x/y", "sqlite//missing-colon.db"):
        with pytest.raises(StudyError) as info:
            store.open_storage(bad)
        assert "\n" not in str(info.value)
        assert bad in str(info.value)


def test_list_studies_reports_names_trials_and_attributes(url: str) -> None:
    first = store.create_study("alpha", url, attrs=ATTRS)
    store.record_evaluations(first, _evaluations()[:4], engine="nsga2")
    store.create_study("beta", url, attrs={**ATTRS, "testbed": "edge8"})
    rows = {r["name"]: r for r in store.list_studies(url)}
    assert rows["alpha"]["trials"] == 4
    assert rows["alpha"]["model"] == "synth"
    assert rows["beta"]["testbed"] == "edge8"
    assert rows["beta"]["trials"] == 0


def test_record_measurement_adds_the_backend_attribute_to_the_plan_trials(url: str) -> None:
    evaluations = _evaluations()
    study = store.create_study("m", url, attrs=ATTRS)
    store.record_evaluations(study, evaluations, engine="nsga2")
    store.record_evaluations(study, evaluations[:1], engine="optuna")
    plan = str(evaluations[0].plan)
    measured = {
        "latency_ms": 12.5,
        "latency_p95_ms": 14.0,
        "throughput_rps": 80.0,
        "items_per_s": 80.0,
        "requests": 20,
        "outputs_match": True,
        "error": None,
        "stages": [],
        "transfers": [],
    }
    store.record_measurement(study, plan.replace(" ", ""), "socket", measured)
    store.record_measurement(study, plan, "socket", {**measured, "latency_ms": 11.0})
    loaded = store.load_study("m", url)
    marked = [t for t in loaded.get_trials() if "measured_socket" in t.user_attrs]
    assert len(marked) == 2  # both engines' trials of that plan
    assert all(t.user_attrs["plan"] == plan for t in marked)
    assert marked[0].user_attrs["measured_socket"] == {**measured, "latency_ms": 11.0}
    with pytest.raises(StudyError, match="unknown backend"):
        store.record_measurement(study, plan, "carrier-pigeon", measured)
    with pytest.raises(StudyError, match="not in study"):
        store.record_measurement(study, "a[0:1] -> b[1:99]", "rpc", measured)


def test_default_study_name_names_model_testbed_engine_and_time() -> None:
    import datetime as dt

    when = dt.datetime(2026, 1, 27, 10, 15, 0, tzinfo=dt.timezone.utc)
    name = store.default_study_name("resnet18", "pi-gpu", "nsga2", now=when)
    assert name == "resnet18-pi-gpu-nsga2-20260127T101500"
