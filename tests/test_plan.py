"""Plans: text form round trip and one-line errors for malformed plans."""

from __future__ import annotations

import itertools

import pytest

from optisplit.errors import InvalidPlanError
from optisplit.plan import Plan, Stage


def test_round_trip_of_every_plan_on_a_small_chain() -> None:
    devices = ["pi1", "pi2", "gpu"]
    count = 0
    for k in (1, 2, 3):
        for order in itertools.permutations(devices, k):
            for cuts in itertools.combinations(range(1, 6), k - 1):
                plan = Plan.from_cuts(order, cuts, 6)
                assert Plan.parse(str(plan)) == plan
                assert plan.cuts == cuts and plan.devices == order and plan.n_blocks == 6
                count += 1
    assert count == 3 * 1 + 6 * 5 + 6 * 10


def test_text_form() -> None:
    plan = Plan.parse("pi1[0:7] -> gpu[7:19]")
    assert plan.stages == (Stage("pi1", 0, 7), Stage("gpu", 7, 19))
    assert str(plan) == "pi1[0:7] -> gpu[7:19]"
    assert Plan.parse("  a[0:3]->b[3:4] ") == Plan((Stage("a", 0, 3), Stage("b", 3, 4)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pi1[0:7] -> pi1[7:19]", "appears twice"),
        ("pi1[0:7] -> gpu[8:19]", "gap"),
        ("pi1[0:7] -> gpu[6:19]", "overlap"),
        ("pi1[1:7] -> gpu[7:19]", "must start at block 0"),
        ("pi1[0:0] -> gpu[0:19]", "runs no blocks"),
        ("pi1(0:7)", "cannot parse stage"),
        ("", "cannot parse stage"),
    ],
)
def test_malformed_plans_give_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidPlanError, match=message) as info:
        Plan.parse(text)
    assert "\n" not in str(info.value)


def test_check_against_chain_and_devices() -> None:
    plan = Plan.parse("pi1[0:7] -> gpu[7:19]")
    plan.check(19, ["pi1", "gpu"])
    with pytest.raises(InvalidPlanError, match="unknown device 'gpu'"):
        plan.check(19, ["pi1", "pi2"])
    with pytest.raises(InvalidPlanError, match="has 10 blocks"):
        plan.check(10, ["pi1", "gpu"], model="resnet18")
