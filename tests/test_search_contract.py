"""Every search engine against brute force; the split-vector encoding reaches every plan."""

from __future__ import annotations

import random

import numpy as np
import pytest
from synthetic import all_plans, random_cost_model, random_testbed, synthetic_profile

from optisplit.cost import CostModel, Evaluation
from optisplit.errors import SearchError
from optisplit.pareto import hypervolume, objective_key, pareto_front, reference_point
from optisplit.plan import Plan
from optisplit.search import ENGINES, NSGA2Engine, OptunaEngine, get_engine
from optisplit.search.encoding import SplitEncoding, seed_plans
from optisplit.testbed import Device, Link, Testbed


def _keys(front: list[Evaluation]) -> list[tuple[float, float]]:
    return [(objective_key(e.latency_ms), objective_key(e.throughput_rps)) for e in front]


def _instance(seed: int) -> CostModel:
    rng = random.Random(seed)
    testbed = random_testbed(rng, rng.randint(1, 4), switches=rng.choice([0, 1]))
    return random_cost_model(rng, testbed, rng.randint(1, 7))


def _chain_testbed(n_devices: int, *, memory_mb: float | None = None) -> Testbed:
    names = [f"d{i}" for i in range(n_devices)]
    scales = [4.0, 1.0, 0.5, 2.0, 0.25, 8.0][:n_devices]
    devices = {
        n: Device(n, "host", s, None if memory_mb is None or i == 0 else int(memory_mb * 2**20))
        for i, (n, s) in enumerate(zip(names, scales))
    }
    links = tuple(Link("sw", n, 1.0, 200.0) for n in names)
    return Testbed("star", devices, links, "d0", "d0", ("sw",))


# ----- the encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(("n_blocks", "n_devices"), [(1, 1), (1, 3), (5, 1), (6, 3), (5, 4)])
def test_encoding_reaches_every_plan_and_decodes_canonically(
    n_blocks: int, n_devices: int
) -> None:
    devices = [f"d{i}" for i in range(n_devices)]
    encoding = SplitEncoding(n_blocks, devices)
    plans = list(all_plans(devices, n_blocks))
    assert encoding.size() == len(plans)
    vectors = set()
    for plan in plans:
        x = encoding.encode(plan)
        assert encoding.decode(x) == plan
        assert np.all(x >= encoding.lower)
        assert np.all(x <= encoding.upper)
        vectors.add(tuple(x))
    assert len(vectors) == len(plans)  # canonical vectors are one per plan


def test_every_vector_decodes_to_a_valid_plan() -> None:
    devices = ["a", "b", "c", "d"]
    encoding = SplitEncoding(9, devices)
    rng = np.random.default_rng(0)
    for _ in range(500):
        x = rng.integers(encoding.lower, encoding.upper + 1)
        plan = encoding.decode(x)
        plan.check(9, devices)
        assert len(plan.stages) == 1 + len({int(c) for c in x[: encoding.n_slots] if c > 0})
        assert tuple(encoding.canonical(x)) == tuple(encoding.encode(plan))


def test_seed_plans_start_with_every_single_device_plan() -> None:
    model = CostModel(_chain_testbed(4), {f"d{i}": synthetic_profile(10) for i in range(4)})
    seeds = seed_plans(model)
    assert {str(p) for p in seeds[:4]} == {f"d{i}[0:10]" for i in range(4)}
    assert len(seeds) == len(set(seeds))
    assert any(len(p.stages) == 4 for p in seeds)
    assert len(seed_plans(model, limit=7)) == 7


# ----- the contract every engine meets ------------------------------------------------------


@pytest.mark.parametrize("search", [False, True], ids=["default-budget", "budget-below-space"])
@pytest.mark.parametrize("name", sorted(ENGINES))
def test_engine_finds_the_brute_force_front_on_small_instances(name: str, search: bool) -> None:
    for seed in range(10):
        model = _instance(seed)
        brute = pareto_front([model.evaluate(p) for p in all_plans(model.devices, model.n_blocks)])
        seen: list[Evaluation] = []
        # With the default budget a small space is enumerated; one plan short of the space
        # forces the evolutionary search and the local search.
        size = SplitEncoding(model.n_blocks, model.devices).size()
        budget = max(1, size - 1) if search else None
        engine = get_engine(name)()
        result = engine.run(model, budget=budget, seed=seed, on_evaluate=seen.append)
        assert result.engine == name
        assert _keys(result.front) == _keys(brute), f"{name} on instance {seed}"
        for evaluation in result.front:
            assert evaluation.feasible
            assert evaluation == model.evaluate(evaluation.plan)
        if name != "exact":
            assert result.evaluations == len(seen) == len({e.plan for e in seen})


@pytest.mark.parametrize(
    "engine",
    [NSGA2Engine(), OptunaEngine(), OptunaEngine(sampler="nsga2-plan")],
    ids=["nsga2", "optuna", "optuna-plan-moves"],
)
def test_heuristic_engines_reach_the_exact_hypervolume_on_a_larger_chain(engine: object) -> None:
    assert isinstance(engine, (NSGA2Engine, OptunaEngine))
    profile = synthetic_profile(24, seed=3)
    model = CostModel(_chain_testbed(5), {f"d{i}": profile for i in range(5)})
    exact = get_engine("exact")().run(model)
    found = engine.run(model, budget=1500, seed=0)
    reference = reference_point([exact.front, found.front])
    ratio = hypervolume(found.front, reference) / hypervolume(exact.front, reference)
    assert ratio >= 0.99
    assert found.evaluations <= 2 * 1500  # the search's budget, then as much local search


@pytest.mark.parametrize(
    "engine",
    [NSGA2Engine(), OptunaEngine(), OptunaEngine(sampler="nsga2-plan")],
    ids=["nsga2", "optuna", "optuna-plan-moves"],
)
def test_same_seed_gives_the_same_front(engine: object) -> None:
    assert isinstance(engine, (NSGA2Engine, OptunaEngine))
    profile = synthetic_profile(16, seed=5)
    model = CostModel(_chain_testbed(4), {f"d{i}": profile for i in range(4)})
    first = engine.run(model, budget=300, seed=7)
    again = engine.run(model, budget=300, seed=7)
    assert [str(e.plan) for e in first.front] == [str(e.plan) for e in again.front]
    assert first.evaluations == again.evaluations


@pytest.mark.parametrize("engine", [NSGA2Engine(), OptunaEngine()], ids=["nsga2", "optuna"])
def test_memory_infeasible_plans_are_evaluated_but_never_on_the_front(engine: object) -> None:
    assert isinstance(engine, (NSGA2Engine, OptunaEngine))
    profile = synthetic_profile(12, seed=2, param_bytes=[8 * 2**20] * 12)
    model = CostModel(_chain_testbed(4, memory_mb=40), {f"d{i}": profile for i in range(4)})
    seen: list[Evaluation] = []
    result = engine.run(model, budget=400, seed=0, on_evaluate=seen.append)
    assert any(not e.feasible for e in seen)
    assert result.front and all(e.feasible for e in result.front)
    brute = pareto_front([model.evaluate(p) for p in all_plans(model.devices, 12)])
    reference = reference_point([brute, result.front])
    assert hypervolume(result.front, reference) >= 0.99 * hypervolume(brute, reference)


@pytest.mark.parametrize("engine", [NSGA2Engine(), OptunaEngine()], ids=["nsga2", "optuna"])
def test_budget_must_be_positive(engine: object) -> None:
    assert isinstance(engine, (NSGA2Engine, OptunaEngine))
    model = _instance(1)
    with pytest.raises(SearchError, match="budget must be a positive"):
        engine.run(model, budget=0)


def test_unknown_sampler_lists_the_valid_ones() -> None:
    with pytest.raises(SearchError, match="nsga2, nsga2-plan, tpe"):
        OptunaEngine(sampler="random")


def test_tpe_sampler_runs_within_its_budget() -> None:
    model = CostModel(_chain_testbed(3), {f"d{i}": synthetic_profile(8) for i in range(3)})
    result = OptunaEngine(sampler="tpe").run(model, budget=40, seed=0)
    assert 0 < result.evaluations <= 2 * 40
    assert result.front


# ----- hypervolume ---------------------------------------------------------------------------


def test_hypervolume_of_known_fronts() -> None:
    model = CostModel(_chain_testbed(2), {f"d{i}": synthetic_profile(4) for i in range(2)})
    a = model.evaluate(Plan.parse("d1[0:4]"))
    b = model.evaluate(Plan.parse("d0[0:2] -> d1[2:4]"))
    front = pareto_front([a, b])
    reference = reference_point([front])
    assert reference["throughput_rps"] == 0.0
    assert reference["latency_ms"] == pytest.approx(1.1 * max(e.latency_ms for e in front))
    tmax = max(e.throughput_rps for e in front)
    assert reference["throughput_scale_rps"] == pytest.approx(tmax)
    single = [front[0]]
    expected = (1 - front[0].latency_ms / reference["latency_ms"]) * front[0].throughput_rps / tmax
    assert hypervolume(single, reference) == pytest.approx(expected)
    assert hypervolume(front, reference) >= hypervolume(single, reference)
    assert hypervolume([], reference) == 0.0
