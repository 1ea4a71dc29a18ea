"""Thinning a front to the fewest plans that stand for all of it within a relative margin."""

from __future__ import annotations

import itertools
import random

import pytest

from optisplit.cost import Evaluation
from optisplit.pareto import pareto_front, thin_front
from optisplit.plan import Plan


def _front(points: list[tuple[float, float]]) -> list[Evaluation]:
    evals = [
        Evaluation(Plan.parse(f"d[0:{i + 1}]"), lat, thr, thr, {}, True, (), ())
        for i, (lat, thr) in enumerate(points)
    ]
    front = pareto_front(evals)
    assert len(front) == len(points), "the test's points must form a front"
    return front


def _covers(a: Evaluation, b: Evaluation, eps: float) -> bool:
    return a.latency_ms <= (1 + eps) * b.latency_ms and a.throughput_rps * (1 + eps) >= (
        b.throughput_rps
    )


# a two-device resnet18 front (latency ms, throughput rps): four plans within 1 % throughput
DEMO = [
    (35.06, 34.09),
    (35.24, 34.33),
    (35.26, 34.35),
    (36.20, 34.48),
    (40.06, 40.61),
    (43.38, 44.38),
    (44.41, 47.45),
    (45.84, 50.23),
]


def test_near_ties_are_shown_as_one_plan() -> None:
    front = _front(DEMO)
    kept = thin_front(front, 0.03)
    # 35.06 covers the next three (34.09 x 1.03 = 35.11 >= 34.48), 44.41 covers 43.38 (44.41 <=
    # 43.38 x 1.03 = 44.68); 40.06 and 45.84 stand alone
    assert [e.latency_ms for e in kept] == [35.06, 40.06, 44.41, 45.84]
    assert thin_front(front, 0.0) == front
    assert thin_front(front, 10.0) == [front[0]]  # one plan stands for all: the earliest
    assert thin_front([], 0.05) == []
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        thin_front(front, -0.01)


@pytest.mark.parametrize("seed", range(40))
def test_the_kept_plans_cover_the_front_and_no_smaller_subset_does(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    lat = sorted(v / 100 for v in rng.sample(range(1000, 6000), n))
    thr = sorted(v / 100 for v in rng.sample(range(1000, 6000), n))
    front = _front(list(zip(lat, thr)))
    eps = rng.choice([0.01, 0.03, 0.05, 0.1, 0.3])
    kept = thin_front(front, eps)
    assert kept == sorted(kept, key=lambda e: e.latency_ms)
    assert all(any(_covers(k, b, eps) for k in kept) for b in front)
    smaller = [
        subset
        for size in range(1, len(kept))
        for subset in itertools.combinations(front, size)
        if all(any(_covers(k, b, eps) for k in subset) for b in front)
    ]
    assert smaller == []
