"""Hand-mutation round on raml.deploy.service.adaptive_size: the cases the other tests left open."""

from __future__ import annotations

import pytest

from raml.deploy.service.adaptive_size import AdaptiveQuerySize
from raml.deploy.service.size_controller import ControllerSettings

SETTINGS = ControllerSettings(100.0, (24, 32, 48), 0.7)


@pytest.mark.parametrize(("queries", "measured"), [(1, False), (2, True), (3, True), (4, True)])
def test_a_batch_of_half_a_full_one_is_measured(queries, measured):
    adaptive = AdaptiveQuerySize(SETTINGS, full_batch=4)  # half of 4: batches of 2 and more count
    adaptive.observe(48, queries, 0.010 * queries)
    assert adaptive.has_measured(48) is measured


def test_a_calibration_batch_leaves_the_smoothed_batch_size_alone():
    adaptive = AdaptiveQuerySize(SETTINGS, alpha=0.5, full_batch=4)
    adaptive.observe(48, 4, 0.080, traffic=False)  # 20 ms per query; queries per batch stays at its start, 1
    assert adaptive.load.service_ms == pytest.approx({48: 20.0})
    adaptive.observe(48, 4, 0.080)  # a batch the load formed: 0.5 * 1 + 0.5 * 4 queries per batch
    assert adaptive.load.service_ms == pytest.approx({48: 20.0 * 2.5})


def test_a_step_down_that_races_another_keeps_the_smaller_size():
    """Another step down to 24 lands while this one decides on 32 (simulated from inside ``fits``): the smaller
    size stays, and nothing is recorded twice."""
    adaptive = AdaptiveQuerySize(SETTINGS, full_batch=4)

    def fits(size: int) -> bool:
        if adaptive.current == 48:
            assert adaptive.step_down_to_admit(lambda s: s == 24) == 24
        return True

    assert adaptive.step_down_to_admit(fits) == 24
    assert adaptive.current == 24
    assert [(d.before, d.after) for d in adaptive.decisions] == [(48, 24)] and adaptive.changes == 1
