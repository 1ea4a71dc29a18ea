"""``optisplit dashboard``: serves optuna-dashboard; headless Chromium renders the Pareto front."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from synthetic import all_plans, synthetic_profile, two_device_testbed

from optisplit import store
from optisplit.cost import CostModel
from optisplit.pareto import pareto_front

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return found


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        document = json.loads(response.read())
    assert isinstance(document, dict)
    return document


def _wait_for_study(base: str, name: str, server: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "the dashboard exited early"
        try:
            summaries = _get_json(f"{base}/api/studies")["study_summaries"]
        except OSError:
            time.sleep(0.3)
            continue
        assert isinstance(summaries, list)
        for summary in summaries:
            if summary["study_name"] == name:
                return int(summary["study_id"])
        pytest.fail(f"study {name} not listed by the dashboard: {summaries}")
    pytest.fail("the dashboard did not answer within 60 s")


@pytest.mark.browser
@pytest.mark.slow
def test_dashboard_serves_the_study_and_chromium_renders_its_pareto_front(tmp_path: Path) -> None:
    chromium = _chromium()
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    model = CostModel(two_device_testbed(), {"a": synthetic_profile(6), "b": synthetic_profile(6)})
    evaluations = [model.evaluate(p) for p in all_plans(model.devices, 6)]
    front = pareto_front(evaluations)
    study = store.create_study("dash", url, attrs={"model": "synth", "testbed": "pair"})
    store.record_evaluations(
        study, evaluations, engine="nsga2", front=[str(e.plan) for e in front]
    )

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "optisplit", "dashboard", "--storage", url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        study_id = _wait_for_study(base, "dash", server)
        detail = _get_json(f"{base}/api/studies/{study_id}?after=0")
        trials = detail["trials"]
        assert isinstance(trials, list) and len(trials) == len(evaluations)
        dom = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--dump-dom",
                f"{base}/dashboard/studies/{study_id}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert "Pareto Front" in dom
    pareto = dom[dom.index("Pareto Front") :]
    assert "js-plotly-plot" in pareto[:20000]  # the plot of the Pareto-front card rendered
    assert 'class="point"' in pareto  # with its points drawn
    assert "latency_ms" in dom and "throughput_rps" in dom  # the study's metric names
