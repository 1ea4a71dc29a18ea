"""The exact front equals brute-force enumeration; Pareto ties; the engine registry."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
from synthetic import all_plans, random_cost_model, random_testbed, synthetic_profile

from optisplit.cost import CostModel, Evaluation, Overheads, load_cost_model
from optisplit.errors import SearchError, UsageError
from optisplit.pareto import objective_key, pareto_front
from optisplit.plan import Plan
from optisplit.search import ENGINES, ExactEngine, get_engine
from optisplit.search.exact import _Solver
from optisplit.testbed import Device, Link, Testbed, apply_condition, load_testbed

ROOT = Path(__file__).resolve().parents[1] / "profiles"


def _keys(front: list[Evaluation]) -> list[tuple[float, float]]:
    return [(objective_key(e.latency_ms), objective_key(e.throughput_rps)) for e in front]


def _instance(seed: int) -> CostModel:
    rng = random.Random(seed)
    testbed = random_testbed(
        rng,
        rng.randint(1, 5),
        switches=rng.choice([0, 0, 1, 2]),
        sink_elsewhere=rng.random() < 0.3,
    )
    overheads = rng.choice(
        [
            Overheads(),
            Overheads.none(),
            Overheads(
                message_ms=1.0,
                copy_gbps=0.01,
                buffers=3,
                handoff_ms=2.5,
                handoff_ms_per_mb=40.0,
                queue_ms=0.7,
            ),
            Overheads(message_ms=0.5, handoff_ms=1.0, request_ms=4.0),
        ]
    )
    return random_cost_model(
        rng, testbed, rng.randint(1, 6), overheads=overheads, depth=rng.choice([None, 0, 1, 3])
    )


def test_exact_equals_brute_force_on_random_instances() -> None:
    shared_links = infeasible = 0
    for seed in range(120):
        model = _instance(seed)
        plans = list(all_plans(model.devices, model.n_blocks))
        assert len(plans) <= 10**6
        evaluations = [model.evaluate(p) for p in plans]
        infeasible += sum(not e.feasible for e in evaluations)
        shared_links += _Solver(model).m > 0
        brute = pareto_front(evaluations)
        found = ExactEngine().run(model)
        assert _keys(found.front) == _keys(brute), f"instance {seed}"
        for evaluation in found.front:
            assert evaluation.feasible
            assert evaluation == model.evaluate(evaluation.plan)
    # the instances cover memory-infeasible plans and link directions shared by two transfers
    assert infeasible > 100
    assert shared_links > 5


def _shared_host(seed: int) -> CostModel:
    """A random testbed whose devices share the cores of one host (an emulated testbed)."""
    rng = random.Random(seed)
    bed = random_testbed(rng, rng.randint(1, 4), switches=rng.choice([0, 0, 1]))
    cores = rng.randint(1, 3)
    devices = {}
    for name, device in bed.devices.items():
        pinned = tuple(sorted(rng.sample(range(cores), rng.randint(1, cores))))
        quota = rng.choice([None, 0.3, 0.5, 1.0])
        devices[name] = dataclasses.replace(
            device,
            cores=pinned,
            cpu_quota=quota,
            throttle=rng.choice(["quota", "pace"]) if quota else "quota",
        )
    bed = dataclasses.replace(bed, devices=devices)
    overheads = Overheads(
        request_ms=rng.choice([0.0, 0.5, 2.0]),
        request_cpu_ms=rng.choice([None, 0.0, 1.5]),
        client_ms=rng.choice([0.0, 1.0, 5.0]),
        forward_ms=rng.choice([0.0, 0.3]),
        forward_ms_per_mb=rng.choice([0.0, 3.0, 30.0]),
        client_wait_share=rng.choice([0.0, 0.05, 0.3]),
        worker_wait_share=rng.choice([0.0, 0.04, 0.2]),
        queue_ms=rng.choice([0.0, 0.4]),
    )
    return random_cost_model(
        rng, bed, rng.randint(1, 6), overheads=overheads, depth=rng.choice([None, 0, 2])
    )


def test_exact_equals_brute_force_on_a_shared_host() -> None:
    """Devices pinned to the cores of one host: every core's load is part of the bottleneck."""
    bound_by_cores = 0
    for seed in range(80):
        model = _shared_host(seed)
        assert model.host_cores
        plans = list(all_plans(model.devices, model.n_blocks))
        evaluations = [model.evaluate(p) for p in plans]
        brute = pareto_front(evaluations)
        found = ExactEngine().run(model)
        assert _keys(found.front) == _keys(brute), f"instance {seed}"
        for evaluation in brute:
            cores = max(model.core_loads(evaluation.plan).values())
            bound_by_cores += math.isclose(evaluation.throughput_rps, 1000.0 / cores)
    # the cores bind on a good share of the front plans
    assert bound_by_cores > 20


def test_every_plan_infeasible_gives_an_empty_front() -> None:
    rng = random.Random(1)
    testbed = random_testbed(rng, 2, memory_limits=False)
    profile = synthetic_profile(3, mem_bytes=[2**40] * 3)
    for name in testbed.devices:
        testbed.devices[name] = Device(name, "host", memory_bytes=1)
    model = CostModel(testbed, dict.fromkeys(testbed.devices, profile))
    result = ExactEngine().run(model)
    assert result.front == [] and result.evaluations == 0


def test_shipped_three_device_testbed_and_callbacks() -> None:
    testbed = load_testbed("pi-pi-gpu", root=ROOT)
    profile = synthetic_profile(12, seed=5)
    model = CostModel(testbed, dict.fromkeys(testbed.devices, profile))
    seen: list[Evaluation] = []
    result = ExactEngine().run(model, budget=3, seed=9, on_evaluate=seen.append)
    assert result.engine == "exact" and result.seconds < 5
    assert result.front and {e.plan for e in result.front} <= {e.plan for e in seen}
    brute = pareto_front([model.evaluate(p) for p in all_plans(model.devices, model.n_blocks)])
    assert _keys(result.front) == _keys(brute)
    assert list(result.to_dict()) == ["engine", "evaluations", "seconds", "front"]


def _fake(plan: str, latency: float, throughput: float, feasible: bool = True) -> Evaluation:
    parsed = Plan.parse(plan)
    return Evaluation(parsed, latency, throughput, throughput, {}, feasible, (), ())


def test_pareto_front_ties_and_weak_dominance() -> None:
    evals = [
        _fake("a[0:2]", 10.0, 5.0),
        _fake("b[0:2]", 10.0, 5.0),  # exact duplicate: one representative
        _fake("a[0:1] -> b[1:2]", 10.0, 4.0),  # same latency, lower throughput: dominated
        _fake("b[0:1] -> a[1:2]", 12.0, 5.0),  # same throughput, higher latency: dominated
        _fake("c[0:1] -> a[1:2]", 12.0, 9.0),
        _fake("c[0:2]", 1.0, 100.0, feasible=False),
        _fake("a[0:1] -> c[1:2]", 12.0 + 1e-14, 9.0),  # equal at 12 significant digits
    ]
    front = pareto_front(evals)
    assert [str(e.plan) for e in front] == ["a[0:2]", "a[0:1] -> c[1:2]"]


def test_registry() -> None:
    assert ENGINES["exact"] is ExactEngine
    assert get_engine("exact") is ExactEngine
    with pytest.raises(UsageError, match=r"unknown search engine 'best'; choose one of .*exact"):
        get_engine("best")


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("condition", [None, "wifi", "constrained"])
def test_shipped_profiles_on_pi_pi_gpu(model_name: str, condition: str | None) -> None:
    testbed = load_testbed("pi-pi-gpu", root=ROOT)
    if condition is not None:
        testbed = apply_condition(testbed, condition)
    model = load_cost_model(model_name, testbed, profiles_root=str(ROOT))
    brute = pareto_front([model.evaluate(p) for p in all_plans(model.devices, model.n_blocks)])
    result = ExactEngine().run(model)
    assert _keys(result.front) == _keys(brute)
    assert result.seconds < 2.0  # the 1 s target is measured by bench/exact.py; slack for CI load


def test_too_many_devices_is_a_clear_error() -> None:
    devices = {f"d{i}": Device(f"d{i}", "host") for i in range(17)}
    links = tuple(Link(f"d{i}", "d0", 1.0, 100.0) for i in range(1, 17))
    testbed = Testbed("big", devices, links, "d0", "d0", ())
    model = CostModel(testbed, dict.fromkeys(devices, synthetic_profile(2)))
    with pytest.raises(SearchError, match="17 devices of big"):
        ExactEngine().run(model)
