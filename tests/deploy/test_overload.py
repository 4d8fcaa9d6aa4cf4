"""The overload margin's pure pieces (issue 20): the gate that says the service is overloaded, and the margin it
takes off the queue-wait bound. The batcher's use of them is checked in test_queue_wait.py (with its held worker).
"""

from __future__ import annotations

import math

import pytest

from raml.deploy.service.overload import OverloadGate, tail_margin_s


@pytest.mark.parametrize(
    ("front_end", "overrun", "margin"),
    [(0.0, 0.0, 0.0), (0.015, 0.0, 0.015), (0.0, 0.007, 0.014), (0.016, 0.007, 0.030), (1.0, 2.0, 5.0)],
)
def test_the_margin_is_the_front_end_and_two_overruns(front_end: float, overrun: float, margin: float):
    # the batch in progress when the query arrived and its own batch may each overrun their prediction
    assert tail_margin_s(front_end, overrun) == pytest.approx(margin)


@pytest.mark.parametrize(("front_end", "overrun"), [(-0.001, 0.0), (0.0, -0.001), (math.nan, 0.0), (0.0, math.nan)])
def test_a_negative_or_nan_time_is_refused(front_end: float, overrun: float):
    with pytest.raises(ValueError, match="must be >= 0 seconds"):
        tail_margin_s(front_end, overrun)


def test_overloaded_means_refusals_on_the_predicted_wait_in_half_the_recent_periods():
    gate = OverloadGate(periods=4)
    assert not gate.overloaded() and gate.periods_seen == 0
    for refused in (True, False, True):
        if refused:
            gate.record_refused()
        gate.next_period()
        assert not gate.overloaded() or refused  # 1 of 1, then 1 of 2: not yet 2 (half of 4)
    assert gate.overloaded()  # 2 of 3
    for _ in range(3):
        gate.next_period()
    assert not gate.overloaded() and gate.periods_seen == 6  # the last 4: 1 with a refusal
    gate.record_refused()
    gate.record_refused()  # two refusals in one period count as one period with refusals
    gate.next_period()
    assert not gate.overloaded()


def test_refusals_count_in_the_period_in_which_they_came():
    gate = OverloadGate(periods=2)
    gate.record_refused()
    assert not gate.overloaded()  # the period has not ended yet
    gate.next_period()
    assert gate.overloaded()  # 1 of 1 = half of 2
    gate.next_period()
    assert gate.overloaded()  # 1 of 2
    gate.next_period()
    assert not gate.overloaded()  # the refusal's period is forgotten


@pytest.mark.parametrize("periods", [0, -1, 1.5, True])
def test_a_gate_needs_a_positive_number_of_periods(periods):
    with pytest.raises(ValueError, match="periods must be a positive integer"):
        OverloadGate(periods=periods)
