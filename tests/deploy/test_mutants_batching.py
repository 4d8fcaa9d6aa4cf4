"""Hand-mutation round on the decision parts of raml.deploy.service.batching: the cases the other tests left open
(each was killed, if at all, only by a test whose timing under load makes it flaky)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from raml.deploy.service.admission import QueueWaitError
from raml.deploy.service.batching import MicroBatcher
from raml.deploy.service.late_budget import LateBudget

WAIT_S = 20.0  # bound of every wait


class HeldEmbed:
    """An embedder held at its forward pass until the test releases it."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the worker"
        return np.eye(4, dtype=np.float32)[np.zeros(images.shape[0], dtype=int)]


class OneRowIndex:
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((len(queries), 1), np.float32), np.zeros((len(queries), 1), np.int64)


class FixedSizer:
    """Size 4 in use, ``per_query_s`` per query, the wait bounded at ``bound_s``."""

    current = 4

    def __init__(self, per_query_s: float, bound_s: float) -> None:
        self.per_query_s, self.bound_s = per_query_s, bound_s

    def choose(self, oldest_wait_s: float, waiting: int) -> int:
        return self.current

    def observe(self, size: int, queries: int, service_s: float) -> None:
        pass

    def batch_s(self, size: int, queries: int) -> float | None:
        return self.per_query_s * queries

    def wait_bound_s(self, window_s: float, size: int | None = None) -> float | None:
        return self.bound_s

    def step_down_to_admit(self, fits) -> int | None:
        return None


def test_a_query_found_past_the_late_bound_is_refused_and_takes_no_grant():
    """Bound 0.075 s, a full batch of 2 at 0.05 s a query: the late bound is 0.175 s. A query admitted behind the
    batch in progress (a predicted wait of at most 0.05 s) that waits 0.3 s is past even the late bound when its
    batch starts: refused on its plain bound, with the budget's grants left untouched."""
    embed, budget = HeldEmbed(), LateBudget(0.1, window=40)
    batcher = MicroBatcher(
        embed, OneRowIndex, max_batch=2, max_wait_s=0.0, sizer=FixedSizer(0.05, 0.075), late_budget=budget
    )
    for _ in range(40):
        budget.arrived()  # 4 grants due
    image = torch.zeros(3, 4, 4)
    batcher.start()
    try:
        held = batcher.submit(image, 4, 1)
        assert embed.entered.wait(WAIT_S)
        queued = batcher.submit(image, 4, 1)
        assert not embed.release.wait(0.3)  # the batch in progress overruns: the queued query waits 0.3 s
        embed.release.set()
        held.result(timeout=WAIT_S)
        with pytest.raises(QueueWaitError, match="over the bound of 75 ms"):
            queued.result(timeout=WAIT_S)
    finally:
        embed.release.set()
        batcher.stop()
    assert (budget.granted, batcher.shed_expired) == (0, 1)


def test_an_idle_worker_records_no_arrival_in_the_profile():
    """Only arrivals while a batch is in progress describe how many come before it ends: one finding the worker
    idle is not recorded (the next period holds none)."""
    batcher = MicroBatcher(HeldEmbed(), OneRowIndex, max_batch=4, defer_early_arrivals=True)
    batcher.cost.observe(4, 4.0)
    for _ in range(8):
        for i in range(40):
            batcher.arrivals.record((i + 0.5) / 40)
        batcher.overload.record_refused()
        batcher.overload.next_period()
        batcher.arrivals.next_period()
    assert batcher.overload.overloaded()
    batcher.check_admission()  # the worker is idle: admitted, and not recorded
    batcher.arrivals.next_period()
    assert batcher.arrivals.expected_later(0.0, periods_ahead=1) == pytest.approx(7 * 40 / 8)


def test_a_batch_waits_for_no_more_queries_when_none_is_arriving():
    """The batching window (30 s here) is cut short when no query is on its way: a lone query is served at once
    rather than after the window (the result's timeout, 10 s, only bounds the test)."""
    embed = HeldEmbed()
    embed.release.set()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=4, max_wait_s=30.0, arriving=lambda: 0)
    batcher.start()
    try:
        assert batcher.submit(torch.zeros(3, 4, 4), 4, 1).result(timeout=10.0).batch_size == 1
    finally:
        batcher.stop()


def test_a_batch_holds_at_most_max_batch_queries():
    embed = HeldEmbed()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.0, queue_size=10)
    image = torch.zeros(3, 4, 4)
    batcher.start()
    try:
        held = batcher.submit(image, 4, 1)
        assert embed.entered.wait(WAIT_S)  # the worker holds a batch of one; three queue behind it
        queued = [batcher.submit(image, 4, 1) for _ in range(3)]
        assert batcher.depth == 3
        embed.release.set()
        sizes = [future.result(timeout=WAIT_S).batch_size for future in [held, *queued]]
    finally:
        embed.release.set()
        batcher.stop()
    assert sizes == [1, 2, 2, 1]
