"""The demo's compute drift: measured stage compute against the profiles' prediction."""

from __future__ import annotations

import dataclasses

import pytest

from optisplit.demo import compute_drift


def _result(*stages: tuple[str, int, int, float]) -> dict[str, object]:
    return {
        "measured": {
            "stages": [
                {"device": d, "start": a, "end": b, "compute_ms": ms} for d, a, b, ms in stages
            ]
        }
    }


def test_median_of_measured_over_predicted_over_every_measured_stage() -> None:
    def predict(device: str, start: int, end: int) -> float:
        return {"fast": 1.0, "slow": 2.0}[device] * (end - start)

    results = [
        _result(("fast", 0, 10, 13.0)),  # +30 %
        _result(("slow", 0, 2, 5.2), ("fast", 2, 10, 10.4)),  # +30 %, +30 %
        _result(("fast", 0, 5, 4.0)),  # -20 %
        {"measured": None, "error": "it failed"},  # skipped
    ]
    assert compute_drift(results, predict) == pytest.approx(0.30)
    # a host that slowed down in every stage
    assert compute_drift(results[:2], predict) == pytest.approx(0.30)
    assert compute_drift([{"measured": None}], predict) is None
    assert compute_drift([], predict) is None


@pytest.mark.parametrize(("drift", "warned"), [(0.31, "31% slower"), (-0.2, "20% faster")])
def test_the_demo_warns_when_the_host_changed_speed(
    drift: float, warned: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    from optisplit.cli.demo import _print
    from optisplit.compare import Comparison
    from optisplit.demo import DemoResult

    comparison = Comparison((), 4.0, 5.0, 1.0, 1.0, None, None, None, 1.0, 1.0)
    result = DemoResult(
        model="resnet18",
        testbed="local",
        emulated=True,
        backend="socket",
        study="d",
        storage="sqlite:///x.db",
        folder=Path("studies/d"),
        report=Path("studies/d/r.md"),
        plot=Path("studies/d/p.png"),
        front=(),
        comparison=comparison,
        compute_drift=drift,
    )
    _print(result)
    captured = capsys.readouterr()
    assert f"stages' compute against their profiles: {drift:+.1%}" in captured.out
    assert warned in captured.err and "--reprofile" in captured.err
    _print(dataclasses.replace(result, compute_drift=0.05))
    assert "warning" not in capsys.readouterr().err
