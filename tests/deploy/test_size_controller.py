"""The adaptive query-size controller as a pure function of measured load (issue 20, item 6): table-driven."""

from __future__ import annotations

import pytest

from raml.deploy.service.size_controller import (
    ControllerSettings,
    SizeLoad,
    choose_size,
    ewma,
    predict_latency_ms,
    queue_wait_bound_ms,
    smooth,
)

SIZES = (24, 32, 48)
TARGET = 100.0
SETTINGS = ControllerSettings(target_ms=TARGET, sizes=SIZES, up_fraction=0.7)
#: batch service times measured at every size (ms)
MEASURED = {24: 10.0, 32: 20.0, 48: 40.0}


@pytest.mark.parametrize(
    ("case", "current", "queue_ms", "pinned", "expected"),
    [
        # predicted(s) = queue * service[s] / service[current] + service[s]; target 100 ms; up needs <= 70 ms
        ("idle: largest stays", 48, 0.0, None, 48),
        ("48 at 50+40=90: stays", 48, 50.0, None, 48),
        ("48 at 70+40=110: one step to 32 (35+20=55)", 48, 70.0, None, 32),
        ("48 at 240, 32 at 100+20=120: two steps to 24 (50+10=60)", 48, 200.0, None, 24),
        ("every size over target (24: 125+10): the smallest", 48, 500.0, None, 24),
        ("24 at 210: nothing smaller, stays", 24, 200.0, None, 24),
        ("load falls: 24 -> 32 when 32 predicted <= 70 (40+20=60)", 24, 20.0, None, 32),
        ("step up is one size at a time (idle: 48 fits, still 32)", 24, 0.0, None, 32),
        ("hysteresis: 32 predicted 60+20=80 (within target, > 70): 24 stays", 24, 30.0, None, 24),
        ("hysteresis: 48 predicted 40+40=80 at 32: stays at 32", 32, 20.0, None, 32),
        ("... and 48 in use at that load (40+40=80 <= 100) stays at 48", 48, 40.0, None, 48),
        ("load falls further: 32 -> 48 (20+40=60)", 32, 10.0, None, 48),
        ("pinned 48 under overload is honoured", 32, 500.0, 48, 48),
        ("pinned 24 when idle is honoured", 48, 0.0, 24, 24),
    ],
)
def test_choose_size(case, current, queue_ms, pinned, expected):
    load = SizeLoad(queue_delay_ms=queue_ms, service_ms=MEASURED)
    assert choose_size(current, load, SETTINGS, pinned=pinned) == expected, case


@pytest.mark.parametrize(
    ("case", "current", "queue_ms", "utilisation", "expected"),
    [
        # utilisation = arrival rate x time per query at that size; > 1: that size cannot keep up at all
        ("short queue, but 48 cannot keep up (1.6): down to 32 (0.8)", 48, 0.0, {48: 1.6, 32: 0.8, 24: 0.4}, 32),
        ("32 cannot keep up either (1.2): down to 24", 48, 0.0, {48: 2.4, 32: 1.2, 24: 0.6}, 24),
        ("none can keep up: the smallest", 48, 0.0, {48: 4.0, 32: 2.0, 24: 1.1}, 24),
        ("queue drained after a step down (48 predicted 0+40): no step up while 48 would be at 1.6", 32, 0.0,
         {48: 1.6, 32: 0.8}, 32),
        ("... nor at 0.8 (over up_fraction 0.7: hysteresis)", 32, 0.0, {48: 0.8, 32: 0.4}, 32),
        ("... up at 0.6", 32, 0.0, {48: 0.6, 32: 0.3}, 48),
        ("48 at 0.9 (<= 1) with a short queue stays", 48, 10.0, {48: 0.9}, 48),
        ("no utilisation given: the queue delay alone decides (0+40 fits)", 48, 0.0, {}, 48),
    ],
)  # fmt: skip
def test_choose_size_with_utilisation(case, current, queue_ms, utilisation, expected):
    load = SizeLoad(queue_delay_ms=queue_ms, service_ms=MEASURED, utilisation=utilisation)
    assert choose_size(current, load, SETTINGS) == expected, case


def test_no_flapping_under_a_steady_overload_of_the_largest_size():
    """Offered load twice what 48 can serve: after a step down the queue drains (delay 0), which alone invites a
    step back up; the utilisation of 48 (2.0) forbids it, at every queue delay the smaller size sees."""
    per_query = {24: 1.0, 32: 2.0, 48: 4.0}  # ms per query; arrivals: 0.5 per ms -> 48 at 2.0, 32 at 1.0
    utilisation = {size: 0.5 * ms for size, ms in per_query.items()}
    path = [48]
    for queue_ms in (0.0, 5.0, 0.0, 20.0, 0.0, 0.0, 10.0, 0.0):
        load = SizeLoad(queue_delay_ms=queue_ms, service_ms=MEASURED, utilisation=utilisation)
        path.append(choose_size(path[-1], load, SETTINGS))
    assert path == [48, 32, 32, 32, 32, 32, 32, 32, 32], path


def test_no_flapping_when_the_queue_delay_follows_the_size_served():
    """A steady offered load whose queue delay scales with the batch service time of the size in use
    (``queue = f * service[size]``): stepping down shortens the queue, which, without hysteresis, would invite a
    step back up at once. Iterated at every load, the controller settles within
    two moves and never oscillates."""
    for tenths in range(0, 60):
        f = tenths / 10
        for start in SIZES:
            path = [start]
            for _ in range(10):
                load = SizeLoad(queue_delay_ms=f * MEASURED[path[-1]], service_ms=MEASURED)
                path.append(choose_size(path[-1], load, SETTINGS))
            assert len(set(path[3:])) == 1, (f, path)
            # at most one correction: the prediction for a smaller size keeps today's queue, so a step down may
            # overshoot by a size and come back once
            assert sum(b != a for a, b in zip(path, path[1:])) <= 2, (f, path)


@pytest.mark.parametrize(
    ("service", "size", "current", "expected"),
    [
        ({24: 10.0, 32: 20.0, 48: 40.0}, 48, None, 5.0 + 40.0),  # measured
        ({24: 10.0, 32: 20.0, 48: 40.0}, 48, 48, 5.0 + 40.0),  # the size in use: no scaling
        ({24: 10.0, 32: 20.0, 48: 40.0}, 48, 24, 5.0 * 40.0 / 10.0 + 40.0),  # queue measured at 24, scaled
        ({24: 10.0}, 48, None, 5.0 + 10.0 * 4.0),  # unmeasured: nearest (24) x (48/24)^2
        ({24: 10.0}, 48, 24, 5.0 * 4.0 + 10.0 * 4.0),
        ({24: 10.0, 48: 40.0}, 32, None, 5.0 + 10.0 * (32 / 24) ** 2),  # nearest of 24 (8 away) and 48 (16 away)
        ({}, 32, 24, 5.0),  # nothing measured yet: the queue delay alone
    ],
)
def test_predicted_latency(service, size, current, expected):
    assert predict_latency_ms(size, SizeLoad(5.0, service), current) == pytest.approx(expected)


def test_an_unmeasured_larger_size_is_predicted_from_the_pixel_count_before_stepping_up():
    # only 24 measured (10 ms); 32 is predicted at 10 * (32/24)^2 = 17.8 ms, its queue scaled by the same 1.78:
    # (29 + 10) * 1.78 = 69.3 <= 70 steps up, (30 + 10) * 1.78 = 71.1 does not
    assert choose_size(24, SizeLoad(29.0, {24: 10.0}), SETTINGS) == 32
    assert choose_size(24, SizeLoad(30.0, {24: 10.0}), SETTINGS) == 24


def test_smooth_is_an_exponentially_weighted_moving_average():
    load = SizeLoad()
    expected_queue, expected_32 = 0.0, None
    for queue, service in [(10.0, 20.0), (30.0, 24.0), (0.0, 18.0)]:
        load = smooth(load, queue_delay_ms=queue, size=32, service_ms=service, alpha=0.25)
        expected_queue = 0.75 * expected_queue + 0.25 * queue
        expected_32 = service if expected_32 is None else 0.75 * expected_32 + 0.25 * service
    assert load.queue_delay_ms == pytest.approx(expected_queue)
    assert load.service_ms == {32: pytest.approx(expected_32)}
    assert smooth(load, size=24, service_ms=7.0).service_ms[24] == 7.0  # first sample of a size: as it is


def test_the_one_moving_average_starts_at_its_first_sample():
    value = None
    for sample in (4.0, 8.0, 2.0):
        value = ewma(value, sample, 0.5)
    assert value == 4.0  # 4, then (4 + 8) / 2 = 6, then (6 + 2) / 2 = 4
    assert ewma(None, 3, 0.1) == 3.0 and isinstance(ewma(None, 3, 0.1), float)


@pytest.mark.parametrize(
    ("case", "target", "full", "window", "expected"),
    [
        # max(window + full, target - full - window), ms
        ("a target with room: what it leaves after a batch and the window", 400.0, 100.0, 5.0, 295.0),
        ("a step down shortens the batch: the bound grows", 400.0, 50.0, 5.0, 345.0),
        ("a target tighter than two batches: a fixed server's bound", 150.0, 100.0, 5.0, 105.0),
        ("the two meet", 210.0, 100.0, 5.0, 105.0),
        ("no window", 300.0, 100.0, 0.0, 200.0),
        ("nothing measured yet (no batch time): the target less the window", 300.0, 0.0, 5.0, 295.0),
    ],
)
def test_queue_wait_bound(case, target, full, window, expected):
    assert queue_wait_bound_ms(target, full, window) == pytest.approx(expected), case


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ControllerSettings(0.0, SIZES), "target must be positive"),
        (lambda: ControllerSettings(100.0, (32, 24)), "increasing order"),
        (lambda: ControllerSettings(100.0, SIZES, up_fraction=1.0), "hysteresis"),
        (lambda: choose_size(40, SizeLoad(), SETTINGS), "current size 40 is not a trained size"),
        (lambda: choose_size(32, SizeLoad(), SETTINGS, pinned=64), "pinned size 64 is not a trained size"),
        (lambda: smooth(SizeLoad(), size=32), "together"),
        (lambda: smooth(SizeLoad(), queue_delay_ms=1.0, alpha=0.0), "alpha"),
        (lambda: queue_wait_bound_ms(100.0, -1.0, 5.0), "full_batch_ms must be zero or positive"),
        (lambda: queue_wait_bound_ms(float("nan"), 1.0, 5.0), "target_ms must be zero or positive"),
    ],
)
def test_bad_arguments_say_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
