"""The split-vector encoding shared by the nsga2 and optuna engines, with their seeds and cache.

A plan over a chain of ``B`` blocks and a testbed of ``D`` devices is encoded as ``2D - 1``
integers::

    x = [p_1, ..., p_{D-1},   key_0, ..., key_{D-1}]
         cut slots (0..B-1)   device keys (0..D-1), one per testbed device

Decoding: the distinct non-zero slot values, sorted, are the interior cuts (``0`` = an unused
slot), so a plan has ``k = 1 + #cuts <= D`` stages. The devices sorted by key (ties broken by
their index in the testbed: a stable sort) give the device order; the first ``k`` run the
stages. Every vector decodes to a valid plan, and integer steps on a slot move a cut by whole
blocks, which is what integer-aware operators (rounded SBX, polynomial mutation) exploit.

Reachability: every plan ``d_1[0:c_1] -> ... -> d_k[c_{k-1}:B]`` is the decoding of its
*canonical* vector (``SplitEncoding.encode``): slots ``c_1 < ... < c_{k-1}`` then zeros, keys
``0 .. k-1`` on ``d_1 .. d_k`` and ``k .. D-1`` on the unused devices in testbed order. So any
number of stages, any subset and order of devices and every cut is reachable, and
``decode(encode(plan)) == plan`` (``tests/test_search_contract.py`` checks it on every plan of
small instances). The nsga2 engine repairs offspring to canonical form, so that two vectors are
equal exactly when their plans are.

A flag per block boundary (``B - 1`` variables) would reach the same plans, but costs Optuna a
parameter per boundary (about 9 ms per trial at VGG16's 38 boundaries); the slots keep the
vector at ``2D - 1`` whatever the chain length.

Memory limits are constraints, not filters: ``violation`` is the largest relative excess of a
device's memory over its limit (``<= 0`` when the plan fits), the ``G`` of pymoo and the
constraint of Optuna.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from optisplit.errors import SearchError
from optisplit.plan import Plan

if TYPE_CHECKING:
    from optisplit.cost import CostModel, Evaluation
    from optisplit.search.base import SearchResult

__all__ = [
    "PlanEvaluator",
    "SplitEncoding",
    "check_budget",
    "mutate",
    "search_then_polish",
    "seed_plans",
    "two_point_crossover",
    "violation",
]

log = logging.getLogger(__name__)

IntVector = np.ndarray


class SplitEncoding:
    """Cut slots plus device keys; see the module docstring for the exact mapping."""

    def __init__(self, n_blocks: int, devices: Sequence[str]) -> None:
        if n_blocks < 1:
            raise SearchError(f"a chain needs at least one block, got {n_blocks}")
        if not devices:
            raise SearchError("a search needs at least one device")
        self.n_blocks = n_blocks
        self.devices = tuple(devices)
        self.n_slots = len(self.devices) - 1
        self.n_var = self.n_slots + len(self.devices)
        self.lower = np.zeros(self.n_var, dtype=int)
        self.upper = np.concatenate(
            [
                np.full(self.n_slots, n_blocks - 1, dtype=int),
                np.full(len(self.devices), len(self.devices) - 1, dtype=int),
            ]
        )
        self._index = {d: i for i, d in enumerate(self.devices)}

    @property
    def max_stages(self) -> int:
        return min(self.n_blocks, len(self.devices))

    def size(self) -> int:
        """How many distinct plans there are: Σ_k D!/(D-k)! · C(B-1, k-1)."""
        d, b = len(self.devices), self.n_blocks
        return sum(math.perm(d, k) * math.comb(b - 1, k - 1) for k in range(1, d + 1))

    def decode(self, x: Sequence[float] | IntVector) -> Plan:
        """The plan a vector stands for (every vector decodes to a valid plan)."""
        values = np.rint(np.asarray(x, dtype=float)).astype(int)
        slots = np.clip(values[: self.n_slots], 0, self.n_blocks - 1)
        cuts = sorted({int(c) for c in slots if c > 0})
        order = np.argsort(values[self.n_slots :], kind="stable")
        devices = [self.devices[int(i)] for i in order[: len(cuts) + 1]]
        return Plan.from_cuts(devices, cuts, self.n_blocks)

    def encode(self, plan: Plan) -> IntVector:
        """The canonical vector of ``plan`` (raises SearchError for a plan outside this space)."""
        if plan.n_blocks != self.n_blocks:
            raise SearchError(f"plan {plan} has {plan.n_blocks} blocks, expected {self.n_blocks}")
        x = np.zeros(self.n_var, dtype=int)
        x[: len(plan.cuts)] = plan.cuts
        used = plan.devices
        for rank, device in enumerate(used):
            if device not in self._index:
                raise SearchError(f"plan {plan} uses {device!r}, not one of {self.devices}")
            x[self.n_slots + self._index[device]] = rank
        rest = [d for d in self.devices if d not in used]
        for rank, device in enumerate(rest, start=len(used)):
            x[self.n_slots + self._index[device]] = rank
        return x

    def canonical(self, x: Sequence[float] | IntVector) -> IntVector:
        """``encode(decode(x))``: the one vector that stands for the plan of ``x``."""
        return self.encode(self.decode(x))

    def params(self, plan: Plan) -> dict[str, int]:
        """The canonical vector as named integer parameters (``slot<i>``, ``key_<device>``)."""
        return dict(zip(self.param_names(), (int(v) for v in self.encode(plan))))

    def param_names(self) -> list[str]:
        slots = [f"slot{i}" for i in range(1, self.n_slots + 1)]
        return slots + [f"key_{d}" for d in self.devices]


def mutate(x: IntVector, encoding: SplitEncoding, rng: np.random.Generator) -> None:
    """Apply one random plan move to ``x`` in place, leaving it canonical.

    Moves (probabilities): shift a cut by a few blocks (0.4); split a stage, handing its head or
    tail to an unused device (0.2); merge two neighbouring stages (0.15); give a stage to an
    unused device (0.15); swap the devices of two stages (0.1). A move that does not apply to
    the plan (no unused device, a single block) leaves it unchanged.
    """
    plan = encoding.decode(x)
    bounds = [0, *plan.cuts, encoding.n_blocks]
    devices = list(plan.devices)
    unused = [d for d in encoding.devices if d not in devices]
    move = rng.random()
    if move < 0.4 and len(bounds) > 2:
        _shift(bounds, rng)
    elif move < 0.6 and unused:
        _split(bounds, devices, str(rng.choice(unused)), rng)
    elif move < 0.75 and len(devices) > 1:
        i = int(rng.integers(1, len(devices)))
        del bounds[i]
        del devices[i - 1 if rng.random() < 0.5 else i]
    elif move < 0.9 and unused:
        devices[int(rng.integers(len(devices)))] = str(rng.choice(unused))
    elif len(devices) > 1:
        i, j = (int(v) for v in rng.choice(len(devices), size=2, replace=False))
        devices[i], devices[j] = devices[j], devices[i]
    x[:] = encoding.encode(Plan.from_cuts(devices, bounds[1:-1], encoding.n_blocks))


def _shift(bounds: list[int], rng: np.random.Generator) -> None:
    i = int(rng.integers(1, len(bounds) - 1))
    reach = max(1, (bounds[-1] - 1) // 6)
    step = int(rng.integers(1, reach + 1)) * (1 if rng.random() < 0.5 else -1)
    bounds[i] = min(max(bounds[i] + step, bounds[i - 1] + 1), bounds[i + 1] - 1)


def _split(bounds: list[int], devices: list[str], new: str, rng: np.random.Generator) -> None:
    wide = [i for i in range(len(devices)) if bounds[i + 1] - bounds[i] > 1]
    if not wide:
        return
    i = int(rng.choice(wide))
    cut = int(rng.integers(bounds[i] + 1, bounds[i + 1]))
    bounds.insert(i + 1, cut)
    devices.insert(i + 1 if rng.random() < 0.5 else i, new)


def neighbours(
    plan: Plan, devices: Sequence[str], n_blocks: int, *, splits: bool = True
) -> list[Plan]:
    """Every plan one ``mutate`` move away from ``plan`` (cut shifts of 1 and 2 blocks), in a
    fixed order: shifts, merges, device swaps, replacements by an unused device, then (unless
    ``splits`` is false) splits, which are most of the neighbourhood (stage x cut x device)."""
    bounds = [0, *plan.cuts, n_blocks]
    used = list(plan.devices)
    unused = [d for d in devices if d not in used]
    out: list[Plan] = []

    def add(devs: Sequence[str], cuts: Sequence[int]) -> None:
        out.append(Plan.from_cuts(list(devs), list(cuts), n_blocks))

    for i in range(1, len(bounds) - 1):
        for step in (-2, -1, 1, 2):
            if bounds[i - 1] < bounds[i] + step < bounds[i + 1]:
                add(used, [*bounds[1:i], bounds[i] + step, *bounds[i + 1 : -1]])
    for i in range(1, len(used)):
        cuts = bounds[1:i] + bounds[i + 1 : -1]
        add(used[:i] + used[i + 1 :], cuts)
        add(used[: i - 1] + used[i:], cuts)
    for i, j in itertools.combinations(range(len(used)), 2):
        swapped = list(used)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        add(swapped, bounds[1:-1])
    for i in range(len(used)):
        for device in unused:
            add([*used[:i], device, *used[i + 1 :]], bounds[1:-1])
    for i in range(len(used) if splits else 0):
        for cut in range(bounds[i] + 1, bounds[i + 1]):
            cuts = sorted([*bounds[1:-1], cut])
            for device in unused:
                add([*used[: i + 1], device, *used[i + 1 :]], cuts)
                add([*used[:i], device, *used[i:]], cuts)
    return list(dict.fromkeys(out))


def polish(evaluator: PlanEvaluator, encoding: SplitEncoding, limit: int) -> None:
    """Pareto local search: evaluate the neighbours of each front plan until none improves the
    front or ``limit`` evaluations have been made in total (Paquete et al., 2004).

    Evolutionary search finds the shape of the front; a point one rare move away from a front
    plan (a one-block stage handed to a third device, say) is found far more cheaply by
    enumerating the neighbourhood than by waiting for a mutation to hit it. The small
    neighbourhoods (no splits) of the whole front come first, so that a tight ``limit`` is not
    spent on the splits of the first few plans only.
    """
    for splits in (False, True):
        done: set[Plan] = set()
        while True:
            todo = [e.plan for e in evaluator.front() if e.plan not in done]
            if not todo:
                break
            for plan in todo:
                done.add(plan)
                for neighbour in neighbours(
                    plan, encoding.devices, encoding.n_blocks, splits=splits
                ):
                    if evaluator.evaluations >= limit:
                        return
                    evaluator(neighbour)


def two_point_crossover(a: IntVector, b: IntVector, rng: np.random.Generator) -> IntVector:
    """One child of a two-point crossover: ``a`` with the segment ``[i, j)`` taken from ``b``."""
    i, j = sorted(int(v) for v in rng.choice(len(a) + 1, size=2, replace=False))
    child = np.array(a, dtype=int)
    child[i:j] = np.asarray(b, dtype=int)[i:j]
    return child


def violation(model: CostModel, evaluation: Evaluation) -> float:
    """Constraint value of an evaluated plan: ``<= 0`` feasible, ``> 0`` infeasible.

    The largest relative memory excess over the devices that have a limit; 1.0 for a plan the
    cost model calls infeasible for another reason.
    """
    worst = -1.0
    for device, used in evaluation.memory_bytes.items():
        limit = model.testbed.devices[device].memory_bytes
        if limit:
            worst = max(worst, (used - limit) / limit)
    if not evaluation.feasible and worst <= 0:
        return 1.0
    if evaluation.feasible:
        return min(worst, 0.0)
    return worst


class PlanEvaluator:
    """Evaluates each distinct plan once; repeats come from the cache without a new evaluation.

    ``on_evaluate`` sees every distinct plan exactly once, in evaluation order.
    """

    def __init__(
        self,
        model: CostModel,
        on_evaluate: Callable[[Evaluation], None] | None = None,
    ) -> None:
        self.model = model
        self._on_evaluate = on_evaluate
        self._cache: dict[Plan, Evaluation] = {}
        self.candidates = 0

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    def __call__(self, plan: Plan) -> Evaluation:
        self.candidates += 1
        found = self._cache.get(plan)
        if found is not None:
            return found
        evaluation = self.model.evaluate(plan)
        self._cache[plan] = evaluation
        if self._on_evaluate is not None:
            self._on_evaluate(evaluation)
        return evaluation

    def seen(self, plan: Plan) -> bool:
        """Whether ``plan`` has been evaluated already."""
        return plan in self._cache

    def exhaust(self, encoding: SplitEncoding) -> None:
        """Evaluate every plan of the space (for spaces no larger than a search budget)."""
        n, devices = encoding.n_blocks, encoding.devices
        for k in range(1, min(n, len(devices)) + 1):
            for cuts in itertools.combinations(range(1, n), k - 1):
                for order in itertools.permutations(devices, k):
                    self(Plan.from_cuts(order, cuts, n))

    def evaluated(self) -> list[Evaluation]:
        return list(self._cache.values())

    def front(self) -> list[Evaluation]:
        """The Pareto front of everything evaluated so far (the archive, not a population)."""
        from optisplit.pareto import pareto_front

        return pareto_front(self.evaluated())


def seed_plans(model: CostModel, *, limit: int | None = None) -> list[Plan]:
    """Plans worth evaluating first, most useful first (at most ``limit``).

    1. every single-device plan (the low-latency end of the front);
    2. *threshold fills*: for a device order and a per-stage compute budget ``tau``, each device
       in turn takes blocks until its stage would exceed ``tau``, the last takes the rest. The
       orders are fastest-first, and each device first followed by the rest fastest-first;
       ``tau`` runs over a geometric grid from the largest single block to the fastest
       single-device time. Small ``tau`` gives balanced many-stage pipelines (the
       high-throughput end), large ``tau`` short ones in between;
    3. the two-stage plans at every cut between any two of the three fastest devices (a fast
       device hands the tail, or the head, to the next fastest), then from the source to every
       other device (offloading, the plans the ParetoPipe paper sweeps, which matter when links
       are slow).
    """
    devices = list(model.devices)
    n = model.n_blocks
    times = {d: [model.block_ms(d, b) for b in range(n)] for d in devices}
    ranked = sorted(devices, key=lambda d: float(sum(times[d])))
    plans: list[Plan] = [Plan.from_cuts([d], [], n) for d in ranked]
    orders = [ranked] + [[d, *(o for o in ranked if o != d)] for d in ranked]
    for tau in _tau_grid(times, ranked[0]):
        for order in orders:
            plans.append(_fill(order, times, tau, n))
    source = model.testbed.source if model.testbed.source in devices else ranked[0]
    pairs = [(a, b) for a in ranked[:3] for b in ranked[:3] if a != b]
    pairs += [(source, d) for d in ranked if d != source and (source, d) not in pairs]
    for a, b in pairs:
        plans += [Plan.from_cuts([a, b], [cut], n) for cut in range(1, n)]
    unique = _unique(plans)
    return unique if limit is None else unique[:limit]


def _tau_grid(times: dict[str, list[float]], fastest: str, steps: int = 24) -> list[float]:
    low = max(min(max(t) for t in times.values()), 1e-9)
    high = max(sum(times[fastest]), low)
    return [float(v) for v in np.geomspace(low, high, steps)]


def _fill(order: Sequence[str], times: dict[str, list[float]], tau: float, n: int) -> Plan:
    devices: list[str] = []
    cuts: list[int] = []
    start = 0
    for i, device in enumerate(order):
        end, spent = start, 0.0
        last = i == len(order) - 1
        while end < n and (last or end == start or spent + times[device][end] <= tau):
            spent += times[device][end]
            end += 1
        devices.append(device)
        if end >= n:
            break
        cuts.append(end)
        start = end
    return Plan.from_cuts(devices, cuts, n)


def _unique(plans: Iterable[Plan]) -> list[Plan]:
    return list(dict.fromkeys(plans))


def check_budget(budget: int | None, default: int) -> int:
    """The evaluation budget: ``default`` when None; SearchError when not positive."""
    if budget is None:
        return default
    if budget <= 0:
        raise SearchError(f"budget must be a positive number of evaluations, got {budget}")
    return budget


def search_then_polish(
    engine: str,
    model: CostModel,
    budget: int,
    polish_ratio: float,
    on_evaluate: Callable[[Evaluation], None] | None,
    search: Callable[[SplitEncoding, PlanEvaluator], None],
) -> SearchResult:
    """The run shared by the heuristic engines: enumerate a space no larger than the budget;
    otherwise ``search`` (the engine's own loop), then a Pareto local search with
    ``budget * polish_ratio`` more evaluations."""
    from optisplit.search.base import SearchResult

    started = time.perf_counter()
    encoding = SplitEncoding(model.n_blocks, model.devices)
    evaluator = PlanEvaluator(model, on_evaluate)
    if encoding.size() <= budget:
        evaluator.exhaust(encoding)  # the whole space is cheaper than a search
    else:
        search(encoding, evaluator)
        polish(evaluator, encoding, evaluator.evaluations + int(budget * polish_ratio))
    return SearchResult(
        engine=engine,
        front=evaluator.front(),
        evaluations=evaluator.evaluations,
        seconds=time.perf_counter() - started,
    )
