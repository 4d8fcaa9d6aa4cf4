"""Hand-mutation round on raml.deploy.service.late_budget: the cases the other tests left open."""

from __future__ import annotations

import pytest

from raml.deploy.service.late_budget import LateBudget


@pytest.mark.parametrize(("fraction", "window"), [(0.01, 100), (0.1, 10), (0.005, 200)])
def test_a_window_of_exactly_one_over_the_fraction_holds_one_grant(fraction, window):
    budget = LateBudget(fraction, window=window)  # a budget of exactly one query is a budget
    for _ in range(window):
        budget.arrived()
    assert budget.try_grant() and not budget.try_grant()
