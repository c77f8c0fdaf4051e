"""How the time left in a request is shared out between the rungs of the ladder."""

from __future__ import annotations

import pytest

from app.services.ladder import LadderBudget

RUNGS = ["openai", "replicate"]
BUDGET = LadderBudget(reserve_seconds=0.5, share=0.6, floors={"openai": 2.0, "replicate": 4.0})


def test_the_first_rung_gets_its_share_of_what_is_left_after_the_reserve() -> None:
    assert BUDGET.for_rung(RUNGS, 0, 30.0) == pytest.approx(0.6 * 29.5)


def test_the_last_upstream_rung_gets_everything_but_the_reserve() -> None:
    assert BUDGET.for_rung(RUNGS, 1, 12.0) == pytest.approx(11.5)


def test_a_rung_never_leaves_a_later_rung_less_than_its_floor() -> None:
    # 7.5 s after the reserve: the share (4.5 s) would leave Replicate 3 s < its 4 s floor.
    assert BUDGET.for_rung(RUNGS, 0, 8.0) == pytest.approx(3.5)


def test_a_rung_gets_at_least_its_floor_when_the_share_is_smaller_and_time_allows() -> None:
    budget = LadderBudget(share=0.1, floors={"openai": 2.0})
    assert budget.for_rung(RUNGS, 0, 10.0) == pytest.approx(2.0)


def test_with_too_little_time_the_budget_falls_below_the_floor_and_the_rung_is_skipped() -> None:
    assert BUDGET.for_rung(RUNGS, 0, 5.0) < BUDGET.floor("openai")


def test_the_defaults_give_each_rung_everything_that_is_left() -> None:
    assert LadderBudget().for_rung(RUNGS, 0, 9.0) == pytest.approx(9.0)


@pytest.mark.parametrize(
    "options", [{"reserve_seconds": -1.0}, {"share": 0.0}, {"share": 1.5}, {"grace_seconds": -1}]
)
def test_nonsense_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="share"):
        LadderBudget(**options)  # type: ignore[arg-type]
