"""One contract every runtime backend passes: deploy, run, measure, close; outputs equal the model.

The model is a tiny residual network from a factory in this file (workers import it by name),
so each deployment builds in milliseconds; the workers are real local processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from optisplit.errors import RuntimeFailure
from optisplit.plan import Plan
from optisplit.runtime import backend_class
from optisplit.runtime.base import Backend, ModelSpec, StagePlacement
from optisplit.runtime.launcher import LocalWorkers
from optisplit.runtime.measure import measure
from optisplit.testbed import parse_testbed
from optisplit.validate import plan_placements

if TYPE_CHECKING:
    from optisplit.testbed import Testbed

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.test_runtime_contract:tiny_model"
BACKENDS = ("inprocess", "socket", "rpc")


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x))) + x)


def tiny_model() -> tuple[nn.Module, torch.Tensor]:
    """A 6-block residual network on 16x16 inputs (the runtime tests' model)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        _Residual(),
        _Residual(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return model, torch.randn(1, 3, 16, 16)


def tiny_testbed(n: int = 3) -> Testbed:
    names = [f"d{i}" for i in range(n)]
    return parse_testbed(
        {
            "schema_version": 1,
            "name": "tiny",
            "source": names[0],
            "devices": {name: {} for name in names},
            "links": [
                {"between": [a, b], "rtt_ms": 0.2, "mbps": 1000}
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            ],
        }
    )


def reference(batch: int = 2) -> tuple[list[tuple[torch.Tensor]], list[tuple[torch.Tensor]]]:
    from optisplit.zoo import build_model

    model = build_model("tiny", module=FACTORY)
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(batch, 3, 16, 16, generator=gen),) for _ in range(2)]
    with torch.inference_mode():
        return inputs, [(model(*x),) for x in inputs]


@pytest.fixture(scope="module")
def workers() -> Iterator[LocalWorkers]:
    old = os.getcwd()
    os.chdir(ROOT)  # workers import the factory from the repository root
    try:
        with LocalWorkers(tiny_testbed(), ["d0", "d1", "d2"]) as local:
            yield local
    finally:
        os.chdir(old)


def make_backend(name: str, workers: LocalWorkers) -> Backend:
    cls = backend_class(name)
    return cls() if name == "inprocess" else cls(workers.token)  # type: ignore[no-any-return]


def placements(plan: str, workers: LocalWorkers, backend: str) -> list[StagePlacement]:
    addresses = None if backend == "inprocess" else workers.start()
    return plan_placements(Plan.parse(plan), tiny_testbed(), addresses)


SPEC = ModelSpec("tiny", batch_size=2, module=FACTORY)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_deploy_run_measure_close(backend: str, workers: LocalWorkers) -> None:
    inputs, expected = reference()
    # sink d0 is not the last device: the socket and rpc backends add a relay stage on d0
    stages = placements("d0[0:2] -> d1[2:4] -> d2[4:6]", workers, backend)
    with make_backend(backend, workers).deploy(SPEC, stages) as deployment:
        result = measure(deployment, inputs, expected, requests=4, warmup=1, depth=3, batch_size=2)
    assert result.outputs_match and result.max_abs_diff <= 1e-5
    assert 0 < result.latency_ms <= result.latency_p95_ms
    assert result.throughput_rps > 0 and result.items_per_s == 2 * result.throughput_rps
    assert [s["device"] for s in result.stages] == ["d0", "d1", "d2"]
    assert [(s["start"], s["end"]) for s in result.stages] == [(0, 2), (2, 4), (4, 6)]
    assert all(s["compute_ms"] > 0 and s["memory_bytes"] > 0 for s in result.stages)
    hops = [(t["src"], t["dst"]) for t in result.transfers]
    assert hops[1:3] == [("d0", "d1"), ("d1", "d2")]
    assert all(t["ms"] is not None and t["ms"] >= 0 for t in result.transfers)
    assert result.requests == 4 + max(4, 2 * 3)
    # the request passes its threads' hand-offs in every stage and in d0's relay
    assert result.queue_ms is not None and 0 < result.queue_ms < result.latency_ms
    # CPU per request over the throughput phase (its warm-up request included)
    assert result.host["requests"] == 1 + max(4, 2 * 3)
    if backend != "inprocess":
        assert sorted(result.host["devices_ms"]) == ["d0", "d1", "d2"]
    assert all(ms >= 0 for ms in result.host["devices_ms"].values())
    assert len(result.host["cores_ms"]) == os.cpu_count()
    for row in result.rows:  # one clock: every stamp follows the previous one
        stamps = row[3:]
        assert stamps == sorted(stamps), row


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_stage_and_redeploy_after_close(backend: str, workers: LocalWorkers) -> None:
    inputs, expected = reference(batch=1)
    spec = ModelSpec("tiny", module=FACTORY)
    runtime = make_backend(backend, workers)
    for plan in ("d1[0:6]", "d2[0:3] -> d1[3:6]"):
        deployment = runtime.deploy(spec, placements(plan, workers, backend))
        try:
            result = measure(deployment, inputs, expected, requests=2, warmup=0, depth=2)
        finally:
            deployment.close()
        deployment.close()  # idempotent
        assert result.outputs_match, plan
        assert result.requests == 2 + 4
    runtime.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stage_that_cannot_build_fails_with_its_device(
    backend: str, workers: LocalWorkers
) -> None:
    stages = [
        StagePlacement("d1", 0, 3, None if backend == "inprocess" else workers.start()["d1"]),
        StagePlacement("d2", 3, 99, None if backend == "inprocess" else workers.start()["d2"]),
    ]
    with pytest.raises(RuntimeFailure, match=r"d2|\[3:99\]"):
        make_backend(backend, workers).deploy(SPEC, stages).close()
    assert workers.dead() == []


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="inprocess, rpc, socket"):
        backend_class("carrier-pigeon")


def _identity_builder(spec: ModelSpec, start: int, end: int) -> Any:
    return nn.Identity()


def test_inprocess_backend_takes_any_stage_builder() -> None:
    backend = backend_class("inprocess")(builder=_identity_builder)
    x = torch.arange(6.0).reshape(2, 3)
    stages = [StagePlacement("a", 0, 1), StagePlacement("b", 1, 2)]
    with backend.deploy(SPEC, stages) as deployment:
        result = measure(deployment, [(x,)], [(x,)], requests=3, warmup=1, depth=2)
    assert result.outputs_match
    assert len(result.rows) == 3 + 4


class _Burn(nn.Module):
    """Spins for ``ms`` of this thread's CPU time, then returns its input."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ns = int(ms * 1e6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.thread_time_ns() + self.ns
        while time.thread_time_ns() < end:
            pass
        return x


def test_cpu_per_request_of_cores_and_watched_processes() -> None:
    backend = backend_class("inprocess")(builder=lambda spec, start, end: _Burn(10.0))
    x = torch.arange(6.0).reshape(2, 3)
    stages = [StagePlacement("a", 0, 1), StagePlacement("b", 1, 2)]
    with backend.deploy(SPEC, stages) as deployment:
        result = measure(
            deployment, [(x,)], [(x,)], requests=20, warmup=1, depth=2,
            watch={"self": os.getpid(), "gone": 2**22 + 7},
        )  # fmt: skip
    host = result.host
    assert host["requests"] == 21
    # two stages spin 10 ms each per request in this process; clock ticks are 10 ms
    assert 15 <= host["watched_ms"]["self"] <= 40
    assert "gone" not in host["watched_ms"]  # no such process: left out
    assert 15 <= sum(host["cores_ms"].values()) <= 20 * os.cpu_count()
    assert host["devices_ms"] == {}  # in process: no worker of their own
    # the spinning thread kept one core busy about half of the time or more
    assert host["busiest_core"]["core"] in host["cores_ms"]
    assert 0.3 <= host["busiest_core"]["utilization"] <= 1.2
    # no spare core to look at (the devices own them all): nothing to tell
    with backend.deploy(SPEC, stages) as deployment:
        alone = measure(deployment, [(x,)], [(x,)], requests=4, warmup=1, spare_cores=())
    assert alone.host["busiest_core"] is None and alone.host["cores_ms"]
    assert result.to_dict()["host"] == host


def test_stage_compute_while_streaming_is_measured_apart() -> None:
    from types import SimpleNamespace

    from optisplit.runtime.base import StageStats
    from optisplit.runtime.measure import _stage_summary

    stages = [StagePlacement("a", 0, 2), StagePlacement("r", 2, 2), StagePlacement("b", 2, 4)]
    deployment = SimpleNamespace(stages=stages)

    def row(sent: float, computes: list[float]) -> list[float]:
        stamps: list[float] = []
        for ms in computes:  # receive, compute start, compute end, send
            stamps += [sent, sent + 0.001, sent + 0.001 + ms / 1e3, sent + 0.002 + ms / 1e3]
        return [1, 0, 0, sent, *stamps, sent + 1]

    latency = [row(t, [10.0, 0.0, 4.0]) for t in (0.0, 1.0, 2.0)]
    streaming = [row(t, [15.0, 0.0, 5.0]) for t in (3.0, 4.0)] + [row(5.0, [13.0, 0.0, 9.0])]
    stats = [StageStats(s.device, 50.0, 1 << 20) for s in stages]
    summary = _stage_summary(deployment, latency, streaming, stats)  # type: ignore[arg-type]
    assert [s["device"] for s in summary] == ["a", "b"]  # the relay computes nothing
    assert [s["compute_ms"] for s in summary] == pytest.approx([10.0, 4.0])
    assert [s["streaming_compute_ms"] for s in summary] == pytest.approx([15.0, 5.0])
    # with no throughput phase, streaming falls back to the latency phase's compute
    alone = _stage_summary(deployment, latency, [], stats)  # type: ignore[arg-type]
    assert [s["streaming_compute_ms"] for s in alone] == pytest.approx([10.0, 4.0])


def test_queue_time_is_the_time_in_stages_outside_compute() -> None:
    from optisplit.runtime.measure import Measurement, _queue_ms, merge_rounds

    def row(sent: float, gaps: list[tuple[float, float]]) -> list[float]:
        """Stages that take their input ``a`` ms after receiving it, compute 5 ms and send
        ``b`` ms after computing; 1 ms on every hop."""
        stamps: list[float] = []
        t = sent
        for a, b in gaps:  # receive, compute start, compute end, send
            t += 1e-3
            stamps += [t, t + a / 1e3, t + (a + 5) / 1e3, t + (a + 5 + b) / 1e3]
            t += (a + 5 + b) / 1e3
        return [1, "latency", 0, sent, *stamps, t + 1e-3]

    rows = [row(0.0, [(0.1, 0.2), (0.3, 0.0), (0.05, 0.05)]) for _ in range(2)]
    rows.append(row(1.0, [(2.0, 2.0), (0.0, 0.0), (0.0, 0.0)]))  # one slow request
    assert _queue_ms(rows, 3) == pytest.approx(0.7)  # the median request: 0.3 + 0.3 + 0.1
    assert _queue_ms([], 3) is None

    def measured(queue: float | None) -> Measurement:
        return Measurement(
            10.0, 11.0, 100.0, 100.0, 5, True, 0.0, [], [], rows=rows, queue_ms=queue
        )

    assert measured(0.7).to_dict()["queue_ms"] == 0.7
    # rounds merge to the median of those that measured it
    merged = merge_rounds([measured(0.2), measured(None), measured(0.4), measured(0.9)])
    assert merged.queue_ms == pytest.approx(0.4)
    assert merge_rounds([measured(None), measured(None)]).queue_ms is None
