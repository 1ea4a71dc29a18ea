"""The ``nsga2`` engine: pymoo's NSGA-II over split vectors, with plan-aware integer operators.

NSGA-II (Deb et al., 2002, IEEE TEC 6(2)) as pymoo composes it: a sampling, a crossover, a
mutation, a repair and rank-and-crowding survival. Ours are:

- **sampling**: the seed plans of ``encoding.seed_plans`` (every single-device plan, balanced
  multi-device plans, 2-stage offloads from the source), topped up with random vectors;
- **crossover**: two-point crossover of whole vectors (cut slots, then device keys);
- **mutation**: one or two plan moves per child: shift a cut by a few blocks, add a cut, drop a
  cut, swap two device keys (a device joins, leaves or changes place in the pipeline);
- **repair**: every child becomes the canonical vector of its plan, so pymoo's duplicate
  elimination compares plans, not vectors;
- **constraints**: ``G = violation`` (relative memory excess), NSGA-II's constraint domination.

Objectives are ``F = (latency_ms, -throughput_rps)``. After NSGA-II, a Pareto local search
(``encoding.polish``) evaluates the neighbours of the front's plans. Each distinct plan is evaluated once (a
cache by plan); the result's front is the Pareto front of every plan evaluated, not only of the
last population.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from optisplit.errors import SearchError
from optisplit.search.base import Engine, SearchResult
from optisplit.search.encoding import (
    PlanEvaluator,
    SplitEncoding,
    check_budget,
    mutate,
    search_then_polish,
    seed_plans,
    violation,
)

if TYPE_CHECKING:
    from optisplit.cost import CostModel, Evaluation

__all__ = ["NSGA2Engine"]

log = logging.getLogger(__name__)


class NSGA2Engine(Engine):
    """pymoo NSGA-II, then a Pareto local search; ``budget`` is NSGA-II's candidate count.

    When the whole plan space is no larger than ``budget``, every plan is evaluated instead
    (exhaustive, hence exact, and cheaper than a search). Otherwise NSGA-II proposes ``budget``
    candidates (repeats come from the cache), then ``encoding.polish`` evaluates at most
    ``polish_ratio * budget`` neighbours of the front's plans (cost-model evaluations are cheap
    next to a generation of NSGA-II).

    Args:
        population: population size (default 100).
        crossover_prob: probability that a pair of parents is crossed (default 0.9).
        polish_ratio: the local search's allowance, as a multiple of ``budget`` (default 1.0).
    """

    name: ClassVar[str] = "nsga2"
    DEFAULT_BUDGET: ClassVar[int] = 3000

    def __init__(
        self, *, population: int = 100, crossover_prob: float = 0.9, polish_ratio: float = 1.0
    ) -> None:
        if population < 4:
            raise SearchError(f"population must be at least 4, got {population}")
        if polish_ratio < 0:
            raise SearchError(f"polish_ratio must be >= 0, got {polish_ratio}")
        self.population = population
        self.crossover_prob = crossover_prob
        self.polish_ratio = polish_ratio

    def run(
        self,
        model: CostModel,
        *,
        budget: int | None = None,
        seed: int = 0,
        on_evaluate: Callable[[Evaluation], None] | None = None,
    ) -> SearchResult:
        budget = check_budget(budget, self.DEFAULT_BUDGET)
        return search_then_polish(
            self.name,
            model,
            budget,
            self.polish_ratio,
            on_evaluate,
            lambda encoding, evaluator: self._evolve(model, encoding, evaluator, budget, seed),
        )

    def _evolve(
        self,
        model: CostModel,
        encoding: SplitEncoding,
        evaluator: PlanEvaluator,
        budget: int,
        seed: int,
    ) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.operators.crossover.pntx import TwoPointCrossover
        from pymoo.optimize import minimize

        algorithm = NSGA2(
            pop_size=self.population,
            sampling=_initial_population(encoding, model, self.population, seed),
            crossover=TwoPointCrossover(prob=self.crossover_prob),
            mutation=_plan_mutation(encoding),
            repair=_canonical_repair(encoding),
            eliminate_duplicates=True,
        )
        termination = _termination(budget, encoding.size(), evaluator)
        minimize(_problem(encoding, evaluator), algorithm, termination, seed=seed, verbose=False)


def _termination(budget: int, space: int, evaluator: PlanEvaluator) -> Any:
    """Stop after ``budget`` candidates, or once every plan of the space has been evaluated."""
    from pymoo.core.termination import Termination

    class _Stop(Termination):  # type: ignore[misc]
        def _update(self, algorithm: Any) -> float:
            spent = algorithm.evaluator.n_eval / budget
            return float(max(spent, evaluator.evaluations / space))

    return _Stop()


def _initial_population(
    encoding: SplitEncoding, model: CostModel, size: int, seed: int
) -> np.ndarray:
    seeds = [encoding.encode(p) for p in seed_plans(model)]
    rng = np.random.default_rng(seed)
    rows = list(seeds)
    known = {tuple(r) for r in rows}
    attempts = 0
    while len(rows) < size and attempts < 20 * size:
        attempts += 1
        x = encoding.canonical(rng.integers(encoding.lower, encoding.upper + 1))
        if tuple(x) not in known:
            known.add(tuple(x))
            rows.append(x)
    return np.array(rows, dtype=int)


def _problem(encoding: SplitEncoding, evaluator: PlanEvaluator) -> Any:
    from pymoo.core.problem import Problem

    class _SplitProblem(Problem):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(
                n_var=encoding.n_var,
                n_obj=2,
                n_ieq_constr=1,
                xl=encoding.lower,
                xu=encoding.upper,
                vtype=int,
            )

        def _evaluate(self, X: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            F = np.empty((len(X), 2))
            G = np.empty((len(X), 1))
            for row, x in enumerate(X):
                evaluation = evaluator(encoding.decode(x))
                F[row] = (evaluation.latency_ms, -evaluation.throughput_rps)
                G[row, 0] = violation(evaluator.model, evaluation)
            out["F"] = F
            out["G"] = G

    return _SplitProblem()


def _canonical_repair(encoding: SplitEncoding) -> Any:
    from pymoo.core.repair import Repair

    class _CanonicalRepair(Repair):  # type: ignore[misc]
        def _do(self, problem: Any, X: np.ndarray, **kwargs: Any) -> np.ndarray:
            return np.array([encoding.canonical(x) for x in X], dtype=int)

    return _CanonicalRepair()


def _plan_mutation(encoding: SplitEncoding) -> Any:
    from pymoo.core.mutation import Mutation

    class _PlanMutation(Mutation):  # type: ignore[misc]
        def _do(
            self, problem: Any, X: np.ndarray, *args: Any, random_state: Any = None, **kwargs: Any
        ) -> np.ndarray:
            rng = random_state if random_state is not None else np.random.default_rng()
            Y: np.ndarray = np.rint(X).astype(int)
            for row in Y:
                for _ in range(1 + int(rng.random() < 0.3)):
                    mutate(row, encoding, rng)
            return Y

    return _PlanMutation()
