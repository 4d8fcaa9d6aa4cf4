"""The late-answer budget of a latency target (:mod:`raml.deploy.service.late_budget`; issue 20, item 5): a share of
the last arrivals that may be admitted past their wait bound. The batcher's and the service's use of it are tested
in ``test_adaptive_serve.py``."""

from __future__ import annotations

import pytest

from raml.deploy.service.late_budget import DEFAULT_LATE_FRACTION, LateBudget


@pytest.mark.parametrize("fraction", [0.0, -0.01, 0.2, float("nan")])
def test_a_share_outside_0_to_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=r"share of the queries in \(0, 0.1\]"):
        LateBudget(fraction)


@pytest.mark.parametrize("window", [99, 0, 1.5, True])
def test_a_window_that_holds_less_than_one_grant_is_refused(window):
    with pytest.raises(ValueError, match="at least 1 / fraction = 100 arrivals"):
        LateBudget(0.01, window=window)


def test_nothing_is_granted_before_a_whole_query_is_due():
    budget = LateBudget(0.1, window=20)
    for _ in range(9):
        budget.arrived()
        assert not budget.available() and not budget.try_grant()  # 0.1 x 9 arrivals < 1
    budget.arrived()
    assert budget.available() and budget.available()  # looking takes nothing
    assert budget.try_grant() and not budget.try_grant()  # 0.1 x 10 = one grant, taken
    assert (budget.arrivals, budget.granted, budget.in_window()) == (10, 1, 1)


def test_grants_follow_the_share_of_the_last_window_arrivals():
    """0.1 of a window of 20: 2 grants at most among the last 20 arrivals; a grant leaves the window 20 arrivals
    after the arrival it was made at."""
    budget = LateBudget(0.1, window=20)
    granted_at = []
    for arrival in range(1, 101):
        budget.arrived()
        while budget.try_grant():
            granted_at.append(arrival)
    assert granted_at[:2] == [10, 20]  # one per 10 arrivals while fewer than the window have arrived
    assert budget.granted == len(granted_at) == 10  # then one each time an old one leaves the window
    for arrival in range(1, 101):  # within any 20 consecutive arrivals, at most 2 grants
        assert sum(arrival - 20 < g <= arrival for g in granted_at) <= 2
    assert budget.in_window() == 2
    for _ in range(20):
        budget.arrived()
    assert budget.in_window() == 0 and budget.available()


def test_the_default_share_is_half_of_what_a_p99_allows():
    assert DEFAULT_LATE_FRACTION == 0.005
    budget = LateBudget()
    for _ in range(2000):
        budget.arrived()
    assert sum(budget.try_grant() for _ in range(20)) == 10  # 0.5 % of the last 2,000 arrivals
