"""Hand-mutation round on raml.deploy.service.size_controller: the cases the other tests left open."""

from __future__ import annotations

import pytest

from raml.deploy.service.size_controller import ControllerSettings, SizeLoad, choose_size, predict_latency_ms

SETTINGS = ControllerSettings(target_ms=100.0, sizes=(24, 32, 48), up_fraction=0.7)
MEASURED = {24: 10.0, 32: 20.0, 48: 40.0}


@pytest.mark.parametrize(
    ("case", "current", "queue_ms", "expected"),
    [
        ("48 predicted exactly at the target (60+40=100) is within it: stays", 48, 60.0, 48),
        ("48 just over (60.5+40): down to 32", 48, 60.5, 32),
        # a smaller size is judged with the queue scaled to it: 100 ms at 48 is 50 at 32 (50+20=70 <= 100); the
        # unscaled queue (100+20=120, 24 at 110) would send it to the smallest size
        ("48 at 100+40: down to 32, whose scaled queue fits", 48, 100.0, 32),
    ],
)
def test_choose_size_at_the_boundaries(case, current, queue_ms, expected):
    assert choose_size(current, SizeLoad(queue_delay_ms=queue_ms, service_ms=MEASURED), SETTINGS) == expected, case


def test_an_unmeasured_size_halfway_between_two_measured_ones_is_scaled_from_the_smaller():
    load = SizeLoad(0.0, {24: 10.0, 40: 50.0})  # 32 is 8 px from both
    assert predict_latency_ms(32, load) == pytest.approx(10.0 * (32 / 24) ** 2)
