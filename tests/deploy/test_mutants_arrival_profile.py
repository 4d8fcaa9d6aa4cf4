"""Hand-mutation round on raml.deploy.service.arrival_profile: the cases the other tests left open."""

from __future__ import annotations

import pytest

from raml.deploy.service.arrival_profile import ArrivalProfile


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (0.01, 0.0),  # nothing came with less than 10 ms left
        (0.02, 0.5),  # only the 10 ms arrival: those with exactly 20 ms left did not come *later*
        (0.020001, 1.5),
        (0.03, 1.5),
        (0.05, 2.0),
    ],
)
def test_an_arrival_with_exactly_the_time_left_is_not_a_later_one(remaining, expected):
    profile = ArrivalProfile(periods=2)
    for period in ([0.02, 0.01, 0.03], [0.02]):  # recorded out of order: the profile sorts them
        for left in period:
            profile.record(left)
        profile.next_period()
    assert profile.expected_later(remaining) == pytest.approx(expected)
