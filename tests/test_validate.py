"""``optisplit validate``: JSON keys, predictions from profiles, timestamps, studies, errors."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_runtime_contract import FACTORY, ROOT

from optisplit.plan import Plan
from optisplit.profile import BlockProfile, BlockTiming, profile_path, save_profile

MEASURED_KEYS = {
    "latency_ms",
    "latency_p95_ms",
    "throughput_rps",
    "items_per_s",
    "requests",
    "stages",
    "transfers",
    "queue_ms",
    "host",
}


def _testbed(tmp_path: Path) -> Path:
    path = tmp_path / "tiny2.yaml"
    doc = {
        "schema_version": 1,
        "name": "tiny2",
        "source": "d0",
        "devices": {"d0": {}, "d1": {}},
        "links": [{"between": ["d0", "d1"], "rtt_ms": 0.2, "mbps": 1000}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _profiles(root: Path) -> None:
    """Synthetic profiles of the tiny model (1 ms per block) for both devices."""
    for device in ("d0", "d1"):
        blocks = tuple(BlockTiming(i, f"b{i}", 1.0, 0.9, 1.1, 1024, 64, 0) for i in range(6))
        profile = BlockProfile(
            device=device,
            model="tiny",
            batch_size=1,
            threads=1,
            granularity="coarse",
            input_bytes=3072,
            output_bytes=20,
            blocks=blocks,
            cut_names=tuple(f"b{i}" for i in range(1, 6)),
            interior_cut_bytes=(1024,) * 5,
            whole_ms=6.0,
        )
        save_profile(profile, profile_path(root, device, "tiny", 1))


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "optisplit", "validate", "tiny", "--module", FACTORY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.slow
def test_json_keys_predictions_and_timestamps(tmp_path: Path) -> None:
    _profiles(tmp_path / "profiles")
    out = _cli(
        "--testbed", str(_testbed(tmp_path)),
        "--backend", "inprocess",
        "--plan", "d0[0:2] -> d1[2:6]",
        "--plan", "d1[0:6]",
        "--requests", "3", "--warmup", "1", "--window", "0",
        "--profiles-root", str(tmp_path / "profiles"),
        "--out", str(tmp_path / "out"),
        "--json",
    )  # fmt: skip
    doc = json.loads(out.stdout)
    assert doc["backend"] == "inprocess"
    first, second = doc["results"]
    assert first["plan"] == "d0[0:2] -> d1[2:6]"
    assert set(first["measured"]) == MEASURED_KEYS
    assert first["outputs_match"] is True and first["error"] is None
    assert first["predicted"]["latency_ms"] > 6.0  # 6 blocks of 1 ms plus transfers
    assert first["predicted"]["throughput_rps"] > 0
    assert [s["device"] for s in first["measured"]["stages"]] == ["d0", "d1"]
    for stage in first["measured"]["stages"]:
        assert {"device", "compute_ms", "cpu_percent", "memory_bytes"} <= set(stage)
    assert {"src", "dst", "ms"} <= set(first["measured"]["transfers"][0])
    assert second["measured"]["requests"] == 3 + 4
    with open(first["timestamps_csv"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["round", "phase", "request_id", "sent"]
    assert rows[0][-1] == "received"
    assert "s1_d1_compute_end" in rows[0]
    assert len(rows) == 1 + 3 + 8  # depth 4: the throughput phase runs 2 x 4 requests
    saved = json.loads((tmp_path / "out" / "validate-inprocess.json").read_text())
    assert [r["plan"] for r in saved["results"]] == [first["plan"], second["plan"]]


def test_window_keeps_throughput_going(tmp_path: Path) -> None:
    out = _cli(
        "--testbed", str(_testbed(tmp_path)),
        "--backend", "inprocess",
        "--plan", "d0[0:3] -> d1[3:6]",
        "--requests", "3", "--warmup", "1", "--window", "0.5",
        "--out", str(tmp_path / "out"),
        "--json",
    )  # fmt: skip
    (result,) = json.loads(out.stdout)["results"]
    with open(result["timestamps_csv"], newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["phase"] == "throughput"]
    assert len(rows) > 3  # more than --requests: the window asked for half a second
    assert result["measured"]["requests"] == 3 + len(rows)
    span = max(float(r["received"]) for r in rows) - min(float(r["sent"]) for r in rows)
    assert span >= 0.5
    rate = result["measured"]["throughput_rps"]
    assert len(rows) / span <= rate <= 1.5 * len(rows) / span


@pytest.mark.slow
def test_rounds_interleave_plans_and_report_medians(tmp_path: Path) -> None:
    _profiles(tmp_path / "profiles")
    out = _cli(
        "--testbed", str(_testbed(tmp_path)),
        "--backend", "inprocess",
        "--plan", "d0[0:2] -> d1[2:6]",
        "--plan", "d1[0:6]",
        "--requests", "3", "--warmup", "1", "--rounds", "3", "--window", "0",
        "--out", str(tmp_path / "out"),
        "--json",
    )  # fmt: skip
    first, second = json.loads(out.stdout)["results"]
    rounds = first["measured"]["rounds"]
    assert len(rounds) == 3
    assert first["measured"]["throughput_rps"] == statistics.median(
        r["throughput_rps"] for r in rounds
    )
    assert second["measured"]["requests"] == 3 * (3 + 4)
    with open(first["timestamps_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * (3 + 8)
    assert [r["round"] for r in rows[::11]] == ["1", "2", "3"]
    pooled = [
        (float(r["received"]) - float(r["sent"])) * 1e3 for r in rows if r["phase"] == "latency"
    ]
    assert first["measured"]["latency_ms"] == pytest.approx(statistics.median(pooled))
    # the plans took turns: the first plan's second round began after the second plan's first
    with open(second["timestamps_csv"], newline="") as handle:
        other = list(csv.DictReader(handle))
    other_first = [float(r["received"]) for r in other if r["round"] == "1"]
    assert float(rows[11]["sent"]) > max(other_first) > float(rows[10]["received"])


@pytest.mark.slow
def test_missing_profiles_leave_predicted_null(tmp_path: Path) -> None:
    out = _cli(
        "--testbed", str(_testbed(tmp_path)),
        "--backend", "inprocess",
        "--plan", "d0[0:6]",
        "--requests", "2", "--warmup", "0",
        "--profiles-root", str(tmp_path / "nothing"),
        "--out", str(tmp_path / "out"),
        "--json",
    )  # fmt: skip
    (result,) = json.loads(out.stdout)["results"]
    assert result["predicted"] is None and result["outputs_match"] is True


def _study(tmp_path: Path, url: str, testbed: Path) -> Any:
    from optisplit.cost import Evaluation
    from optisplit.store import create_study, record_evaluations

    study = create_study(
        "tiny-study",
        url,
        attrs={"model": "tiny", "testbed": str(testbed), "batch_size": 1, "granularity": "coarse"},
    )
    plans = ["d0[0:3] -> d1[3:6]", "d0[0:6]", "d1[0:6]"]
    evaluations = [
        Evaluation(Plan.parse(p), lat, tput, tput, {}, True, (), ())
        for p, lat, tput in zip(plans, (5.0, 3.0, 9.0), (200.0, 100.0, 50.0))
    ]
    record_evaluations(study, evaluations, engine="exact", front=plans[:2])
    return study


@pytest.mark.slow
def test_study_front_top_k_is_recorded_and_resume_skips(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    testbed = _testbed(tmp_path)
    _study(tmp_path, url, testbed)
    args = [
        "--testbed", str(testbed),
        "--backend", "socket",
        "--study", "tiny-study",
        "--storage", url,
        "--top", "1",
        "--requests", "3", "--warmup", "1",
        "--out", str(tmp_path / "out"),
        "--json",
    ]  # fmt: skip
    (result,) = json.loads(_cli(*args).stdout)["results"]
    assert result["plan"] == "d0[0:6]"  # the lowest-latency front plan
    assert result["outputs_match"] is True

    from optisplit.store import load_study

    trials = load_study("tiny-study", url).get_trials()
    by_plan = {t.user_attrs["plan"]: t.user_attrs for t in trials}
    measured = by_plan["d0[0:6]"]["measured_socket"]
    assert MEASURED_KEYS | {"outputs_match", "error"} <= set(measured)
    assert measured["error"] is None and measured["outputs_match"] is True
    assert "measured_socket" not in by_plan["d1[0:6]"]

    (again,) = json.loads(_cli(*args, "--resume").stdout)["results"]
    assert again["resumed"] is True
    assert again["measured"]["latency_ms"] == result["measured"]["latency_ms"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plan", "d0[0:3] -> dX[3:6]"], "unknown device 'dX'"),
        (["--plan", "d0[0:3] -> d1[3:9]"], "tiny has 6 blocks"),
        (["--plan", "d0[0:3] -> d1[2:6]"], "overlap"),
        (["--plan", "d0[0:6]", "--top", "2"], "--top needs --study"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = _cli("--testbed", str(_testbed(tmp_path)), "--backend", "inprocess", *args, check=False)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert out.stdout == ""


def test_testbed_with_addresses_drives_running_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import psutil

    from optisplit.errors import UsageError
    from optisplit.runtime.worker import Worker
    from optisplit.testbed import load_testbed
    from optisplit.validate import validate_plans

    monkeypatch.chdir(ROOT)
    token = b"site-token"
    workers = [Worker("127.0.0.1", 0, token) for _ in range(2)]
    for worker in workers:
        threading.Thread(target=worker.serve_forever, daemon=True).start()
    doc = yaml.safe_load(_testbed(tmp_path).read_text())
    for name, worker in zip(("d0", "d1"), workers):
        doc["devices"][name]["address"] = "{}:{}".format(*worker.address)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    testbed = load_testbed(str(path))
    plans = ["d1[0:2] -> d0[2:6]"]
    common: dict[str, Any] = {"backend": "socket", "module": FACTORY, "out_dir": tmp_path}
    try:
        with pytest.raises(UsageError, match="token"):
            validate_plans("tiny", testbed, plans, **common)
        (result,) = validate_plans(
            "tiny", testbed, plans, requests=3, warmup=1, token=token, **common
        )
    finally:
        for worker in workers:
            worker.shutdown()
    assert result["error"] is None and result["outputs_match"] is True
    # source d0 is not the first device: the input reaches d1 through a relay on d0
    hops = [(t["src"], t["dst"]) for t in result["measured"]["transfers"]]
    assert hops == [("d0", "d0"), ("d0", "d1"), ("d1", "d0"), ("d0", "d0")]
    assert not [p for p in psutil.Process().children() if "worker" in " ".join(p.cmdline())]


def test_a_full_host_core_is_warned_about_unless_the_caller_turns_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Calibration validates its own probe plans, which may fill a helper core: it turns the
    warning off, and everyone else gets it."""
    import dataclasses
    import logging

    from optisplit.runtime import measure as measure_module
    from optisplit.testbed import load_testbed
    from optisplit.validate import validate_plans

    real = measure_module.measure

    def full_core(*args: Any, **kwargs: Any) -> Any:
        measured = real(*args, **kwargs)
        return dataclasses.replace(
            measured, host={**measured.host, "busiest_core": {"core": "1", "utilization": 1.0}}
        )

    monkeypatch.setattr(measure_module, "measure", full_core)
    monkeypatch.chdir(ROOT)
    testbed = load_testbed(str(_testbed(tmp_path)))
    common: dict[str, Any] = {
        "backend": "inprocess",
        "module": FACTORY,
        "requests": 3,
        "warmup": 1,
        "profiles_root": str(tmp_path),
    }
    with caplog.at_level(logging.WARNING, logger="optisplit.validate"):
        (quiet,) = validate_plans(
            "tiny", testbed, ["d1[0:6]"], out_dir=tmp_path / "q", warn_host_full=False, **common
        )
        assert quiet["error"] is None and not caplog.records
        (loud,) = validate_plans("tiny", testbed, ["d1[0:6]"], out_dir=tmp_path / "l", **common)
    assert loud["error"] is None
    assert [r.getMessage() for r in caplog.records] == [
        "plan d1[0:6]: core 1 of this host was 100 % busy while it streamed; the host, "
        "not only the plan, may have set its throughput"
    ]


@pytest.mark.slow
def test_rpc_validation_prints_nothing_but_its_own_lines(tmp_path: Path) -> None:
    """torch's RPC shutdown warns about its own deprecated use of a Gloo group in every stage
    process; that is not the user's concern and must not reach their terminal."""
    out = _cli(
        "--testbed", str(_testbed(tmp_path)),
        "--backend", "rpc",
        "--plan", "d0[0:2] -> d1[2:6]",
        "--requests", "3", "--warmup", "1", "--window", "0",
        "--profiles-root", str(tmp_path / "profiles"),
        "--out", str(tmp_path / "out"),
        "--json",
    )  # fmt: skip
    (result,) = json.loads(out.stdout)["results"]
    assert result["error"] is None and result["outputs_match"] is True
    assert "Warning" not in out.stderr, out.stderr
