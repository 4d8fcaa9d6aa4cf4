"""Past saturation, later arrivals take the place of early ones (raml.deploy.service.arrival_profile).

The rule is checked against the Poisson distribution it approximates (computed here term by term), the profile
against a plain count of the recorded arrivals; the batcher's use of them against a worker held in a known batch in
test_queue_wait.py.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from raml.deploy.service.arrival_profile import ArrivalProfile, later_arrivals_fill


def poisson_at_least(free: int, mean: float) -> float:
    """P(N >= free) for N ~ Poisson(mean), summed term by term."""
    term, below = math.exp(-mean), 0.0
    for n in range(free):
        below += term
        term *= mean / (n + 1)
    return 1.0 - below


@pytest.mark.parametrize(
    ("free", "expected", "z", "fills"),
    [
        (32, 64.0, 2.0, True),  # 64 - 2 * 8 = 48 >= 32
        (32, 43.0, 2.0, False),  # 43 - 2 * 6.56 = 29.9 < 32: not surely enough later arrivals
        (32, 32.0, 0.0, True),  # z = 0: the mean alone
        (32, 31.9, 0.0, False),
        (1, 5.9, 2.0, True),  # 5.9 - 4.86 = 1.04 >= 1
        (1, 5.7, 2.0, False),
        (0, 100.0, 2.0, False),  # no free place: nothing to fill (the queue-wait bound decides)
        (4, 0.0, 2.0, False),
        (4, float("nan"), 2.0, False),
    ],
)
def test_later_arrivals_fill_table(free, expected, z, fills):
    assert later_arrivals_fill(free, expected, z) is fills


def test_when_the_rule_defers_the_places_fill_with_high_probability():
    # over every free count of a batch of up to 64 and expected arrivals from 0.1 to 300: wherever the rule says
    # "later arrivals fill the free places", they do with probability >= 0.95 (the normal approximation at z = 2)
    worst = 1.0
    for free in range(1, 65):
        for mean in np.arange(0.1, 300.0, 0.1):
            if later_arrivals_fill(free, float(mean)):
                worst = min(worst, poisson_at_least(free, float(mean)))
    assert 0.95 <= worst < 1.0


def test_the_profile_is_the_mean_count_of_arrivals_later_in_the_period():
    rng = random.Random(3)
    profile = ArrivalProfile(periods=4)
    periods = [[rng.uniform(0.0, 0.1) for _ in range(rng.randrange(0, 30))] for _ in range(6)]
    for i, period in enumerate(periods):
        for remaining in period:
            profile.record(remaining)
        profile.next_period()
        kept = periods[max(0, i - 3) : i + 1]  # the last 4 periods
        for remaining in (0.0, 0.01, 0.05, 0.0999, 0.2):
            plain = sum(sum(1 for r in p if r < remaining) for p in kept) / len(kept)
            estimate = profile.expected_later(remaining)
            assert estimate is None if i < 1 else estimate == pytest.approx(plain)  # half of 4 periods first
            if i >= 1:  # behind two full batches: two whole periods' mean count more
                whole = sum(len(p) for p in kept) / len(kept)
                assert profile.expected_later(remaining, periods_ahead=2) == pytest.approx(plain + 2 * whole)
    with pytest.raises(ValueError, match="periods"):
        ArrivalProfile(periods=0)
