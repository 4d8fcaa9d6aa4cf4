"""Dynamic micro-batching: queries from concurrent requests embedded together, then searched.

Contract: :meth:`MicroBatcher.submit` puts one transformed query ``(3, S, S)`` (its size S and k) into a bounded
queue and returns a :class:`concurrent.futures.Future` of a :class:`QueryResult`, or raises at once (the caller
sheds the load with 503): :class:`QueueFullError` when ``queue_size`` queries already wait, and
:class:`~raml.deploy.service.admission.QueueWaitError` when the query's *predicted wait* for its batch to start
(:func:`~raml.deploy.service.admission.predicted_wait_s`: the rest of the batch in progress and the full batches
queued ahead of it, from the smoothed service time of the batches served so far) exceeds the bound
``max_queue_wait_s`` (default: the batching window plus two full batches' smoothed service time less that of a
batch of the recent size, so at least the window plus one full batch, and at least ``MIN_AUTO_QUEUE_WAIT_S``: a
query is admitted unless a whole batch's worth of queries already waits ahead of it, so its batch is done within
the window plus two batch service times). A query that, against the prediction, has
waited longer than the bound when its batch starts gets the same error instead of a late answer, so no query that
is answered waited longer than the bound in force for it when its batch started (:attr:`QueryResult.wait_bound_s`):
the bound for a batch of that batch's size, or, without a sizer, the bound the query was admitted under where that
was looser (a batch larger than the recent ones shrinks the bound; a query admitted at moderate load is not refused
for that after it waited).

The bound counts from the query's submission, after its image was decoded, not from the end of its upload: counting
the decoding too was tried (issue 20) and, under closed-loop clients that resend at once after a 503, made the
service livelock: the front end, busy answering 503s, delayed every decode past the bound, so every decoded query
was refused (0 answers/s at 64 clients on the 2-core machine at load ~10, against 213 without it at the same
load). A query is refused before its decoding or not at all, unless the worker falls behind the prediction.
One
worker thread takes the first waiting query, then keeps taking queries until it holds ``max_batch`` of them or
``max_wait_s`` have passed since it took the first, or no query is waiting and ``arriving()`` says none is on its
way (so a lone query is not held back for nothing); it reads the served index once for the whole batch,
embeds the queries of each size in one forward pass ``(B, 3, S, S) -> (B, D)``, searches the queries of each k
together, and resolves every future (with the error, should the network or the search fail). With
``max_batch == 1`` every query is embedded alone.

With a ``sizer`` (a latency target, :mod:`raml.deploy.service.adaptive_size`), every query still comes with its
size (the request handlers transform an unpinned query at the ``sizer``'s size in use when it is decoded); when a
batch is formed the worker tells the sizer ``sizer.choose(oldest wait, queries still waiting)`` (which updates the
size in use for the queries decoded next), and after each size group's forward pass and search
``sizer.observe(size, queries, seconds)``. The queue's bound in time then comes from the sizer, expressed at the
size in use (``sizer.wait_bound_s(window)``, unless ``max_queue_wait_s`` is given), and the predicted waits from
its time per query at each size (``sizer.batch_s(size, queries)``) rather than from :class:`BatchCostModel`, which
counts queries whatever their size.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from raml.deploy.service.admission import (
    BatchCostModel,
    QueueWaitError,
    RecentQuantile,
    predicted_wait_s,
    promised_wait_bound_s,
    should_shed,
)
from raml.deploy.service.arrival_profile import ArrivalProfile, later_arrivals_fill
from raml.deploy.service.late_budget import LateBudget
from raml.deploy.service.overload import OverloadGate, tail_margin_s
from raml.deploy.service.size_controller import ewma
from raml.deploy.store import DatabaseIndex

logger = logging.getLogger(__name__)

__all__ = ["MIN_AUTO_QUEUE_WAIT_S", "BatchSizer", "MicroBatcher", "QueryResult", "QueueFullError", "QueueWaitError"]

_BATCH_SIZE_ALPHA = 0.2  # weight of each batch in the recent mean batch size (the default bound's own batch)
_POLL_S = 0.0005  # while waiting for more queries: how often to re-check whether any is still arriving
#: the default queue-wait bound (one full batch's service time) is never below this: a wait this short is not worth
#: a refusal (a scheduler hiccup or a garbage collection on a busy host lasts as long), e.g. with batches of 2 ms
MIN_AUTO_QUEUE_WAIT_S = 0.05
#: the quantile of the front end's time per query taken off the default bound (see ``promised_wait_bound_s``)
FRONT_END_QUANTILE = 0.9
#: the quantile of a batch's service time beyond its prediction taken off the bound while overloaded
OVERRUN_QUANTILE = 0.9


class QueueFullError(RuntimeError):
    """The batching queue holds ``queue_size`` queries already; try again later."""


@dataclass
class QueryResult:
    """The answer to one query.

    Attributes:
        ids: ``(k',)`` database ids by decreasing score (k' <= k; -1 entries removed).
        scores: ``(k',)`` inner products.
        index: The index searched (its paths and labels name the ids).
        batch_size: Queries embedded in the same forward pass.
        queue_s: Seconds between submission and the start of its batch.
        embed_s: Seconds of its batch's forward pass.
        search_s: Seconds of its search.
        wait_bound_s: The queue-wait bound in force for it when its batch started (``queue_s`` is within it): the
            bound for a batch of its size, or the one it was admitted under where that was looser; None while no
            batch had been measured yet.
        size: The query size it was embedded at.
        finished: ``time.perf_counter()`` when its answer was ready (the front end measures its own delay from it).
        late: Admitted on the late-answer budget (:mod:`raml.deploy.service.late_budget`): its wait bound is the late
            bound, past the one a query is refused beyond.
    """

    ids: np.ndarray
    scores: np.ndarray
    index: DatabaseIndex
    batch_size: int
    queue_s: float
    embed_s: float
    search_s: float
    wait_bound_s: float | None = None
    size: int = 0
    finished: float = 0.0
    late: bool = False


class BatchSizer(Protocol):
    """Keeps the query size in use and the service time per size (see the module docstring)."""

    @property
    def current(self) -> int: ...

    def choose(self, oldest_wait_s: float, waiting: int) -> int: ...

    def observe(self, size: int, queries: int, service_s: float) -> None: ...

    def batch_s(self, size: int, queries: int) -> float | None: ...

    def wait_bound_s(self, window_s: float, size: int | None = None) -> float | None: ...

    def step_down_to_admit(self, fits: Callable[[int], bool]) -> int | None: ...


@dataclass
class _Query:
    image: torch.Tensor
    size: int
    k: int
    submitted: float
    admitted_bound: float | None = None  # the bound it was admitted under (at submission)
    bound: float | None = None  # the bound in force for it when its batch started
    late: bool = False  # admitted past the bound on the late-answer budget (admitted_bound is then the late bound)
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """A bounded queue of queries and the one worker thread that batches them (see the module docstring).

    Args:
        embed: ``(B, 3, S, S)`` float32 -> ``(B, D)`` float32 numpy.
        current_index: Returns the index to search (read once per batch).
        max_batch: Most queries per forward pass.
        max_wait_s: Longest wait for more queries once a batch has its first one.
        queue_size: Most queries waiting; beyond it :meth:`submit` raises :class:`QueueFullError`.
        on_batch: Called with the size of each forward pass (metrics).
        arriving: Returns how many queries are on their way (received, not yet submitted); None = always wait
            the full ``max_wait_s``.
        max_queue_wait_s: Longest predicted (and actual) wait of a query for its batch to start; beyond it the
            query is refused with :class:`QueueWaitError`. None: ``max_wait_s`` plus one full batch's smoothed
            service time, at least ``MIN_AUTO_QUEUE_WAIT_S`` (an answered query then takes about the window plus
            two batch service times at most); ``math.inf``: no bound in time (only ``queue_size``).
        sizer: Keeps the size in use for a latency target and bounds the queue's wait at that size (None: a
            fixed size).
        count_front_end: Take the front end's measured p90 (:attr:`front_end`) off the default bound, so that an
            admitted query is also answered within the promise once its receiving and decoding are counted. Off
            by default: on a loaded 2-core host the front end's p90 grows with the load it should not refuse,
            and the bound with it refused 68-374 queries at 0.8x of capacity against 0-9 without it (issue 20).
        defer_early_arrivals: Without a sizer, while overloaded: refuse an arriving query (in
            :meth:`check_admission`, before its decoding) when the queries still to come before its batch starts
            will fill that batch anyway (:mod:`raml.deploy.service.arrival_profile`), so that past saturation a
            batch is made of the queries that wait least. Off by default (arrival order): it lowered the median
            wait at 2x saturation but not the p99, and a closed loop of clients that resend at once still drew
            more 503s with it in one of two runs (issue 20).
        overload_margin: Without a sizer or ``max_queue_wait_s``, while overloaded (:attr:`overload`): take the
            tail margin off the default bound (:mod:`raml.deploy.service.overload`: the front end's p90 and twice
            the forward passes' overrun p90), so that the queries admitted past saturation are answered within the
            promise. On by default.
        late_budget: With a sizer and its derived bound: admit a query that no trained size admits within the bound
            on this budget, within the bound plus one full batch, rather than refuse it; and answer a query found
            past its bound when its batch starts the same way (:mod:`raml.deploy.service.late_budget`). None: refuse.
    """

    def __init__(
        self,
        embed: Callable[[torch.Tensor], np.ndarray],
        current_index: Callable[[], DatabaseIndex],
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        queue_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
        arriving: Callable[[], int] | None = None,
        max_queue_wait_s: float | None = None,
        sizer: BatchSizer | None = None,
        count_front_end: bool = False,
        defer_early_arrivals: bool = False,
        overload_margin: bool = True,
        late_budget: LateBudget | None = None,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be zero or positive, got {max_wait_s!r}.")
        if max_queue_wait_s is not None and not max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be positive (or None: one batch time), got {max_queue_wait_s!r}.")
        if late_budget is not None and sizer is None:
            raise ValueError("A late-answer budget belongs to a latency target (a sizer); give one, or no budget.")
        self._embed = embed
        self._current_index = current_index
        self.max_batch = max_batch
        self.max_wait_s = float(max_wait_s)
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda size: None)
        self._arriving = arriving or (lambda: 1)
        self._sizer = sizer
        self.count_front_end = bool(count_front_end)
        self.defer_early_arrivals = bool(defer_early_arrivals) and sizer is None
        self.overload_margin = bool(overload_margin)
        #: the share of queries admitted past their bound rather than refused (with a sizer; None: refuse them)
        self.late_budget = late_budget if max_queue_wait_s is None else None
        #: refusals on the predicted wait per batch period: whether more queries arrive than the batches take
        self.overload = OverloadGate()
        #: a high quantile of how much longer a batch took than predicted (the overload margin's second part)
        self.overrun = RecentQuantile(OVERRUN_QUANTILE, window=64, every=4)
        #: arrivals by the time the batch in progress had left (the estimate of the queries still to come)
        self.arrivals = ArrivalProfile()
        self._queue: queue.Queue[_Query | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.max_queue_wait_s = max_queue_wait_s
        self.cost = BatchCostModel()
        #: a high quantile of the time an answered query spent outside its batch (the front end's share of the
        #: promise; taken off the default bound with ``count_front_end``; :meth:`observe_front_end`)
        self.front_end = RecentQuantile(FRONT_END_QUANTILE)
        self._mean_batch: float | None = None  # smoothed queries per batch (weight 0.2 per batch)
        self._busy: tuple[float, float] | None = None  # (start, predicted seconds) of the batch in progress
        self._shed_lock = threading.Lock()
        self.shed_predicted = 0  # queries refused at submission: predicted wait over the bound
        self.shed_expired = 0  # queries refused when their batch started: actual wait over the bound
        self.shed_deferred = 0  # queries refused at submission because later arrivals fill the next batch

    @property
    def queue_wait_bound_s(self) -> float | None:
        """The bound on a query's wait for its batch to start: ``max_queue_wait_s``, else what the promise of an
        answer within the window plus two full batches leaves once the query's own batch (of the smoothed recent
        batch size) is taken off, and with ``count_front_end`` the front end's p90 too
        (:func:`promised_wait_bound_s`), at least ``MIN_AUTO_QUEUE_WAIT_S`` (None while no batch has been served,
        or without a bound). Without ``count_front_end`` that is at least the window plus one full batch.

        Why that default: a query that finds fewer than ``max_batch`` queries ahead of it joins the next batch, so
        it waits at most for the batch in progress and the window; only a whole batch's worth ahead of it, or a
        front end slow enough to eat the promise, makes it late. Refusing earlier (e.g. at one batch time, without
        the window) sheds queries at moderate load whenever a full batch has just started."""
        return self._bound_s(None)

    def _bound_s(self, own_queries: int | None) -> float | None:
        """:attr:`queue_wait_bound_s` for a query whose batch holds ``own_queries`` (None: the smoothed recent
        batch size)."""
        if self.max_queue_wait_s is not None:
            return None if math.isinf(self.max_queue_wait_s) else self.max_queue_wait_s
        if self._sizer is not None:
            return self._sizer_bound_s(self._sizer, None)
        full = self.cost.predict(self.max_batch)
        if full is None:
            return None
        if own_queries is None:
            own_queries = self._recent_batch()
        own = self.cost.predict(min(self.max_batch, max(1, own_queries))) or 0.0
        promised = promised_wait_bound_s(self.max_wait_s, full, self._front_end_s(), min(own, full))
        return max(promised - self.overload_margin_s(), MIN_AUTO_QUEUE_WAIT_S)

    def overload_margin_s(self) -> float:
        """What the default bound loses while overloaded (:mod:`raml.deploy.service.overload`): the front end's p90
        (unless ``count_front_end`` takes it off already) and twice the forward passes' overrun p90; 0 when not
        overloaded, without ``overload_margin``, and where the default bound does not apply (a sizer's or an
        operator's bound)."""
        if not self.overload_margin or self._sizer is not None or self.max_queue_wait_s is not None:
            return 0.0
        if not self.overload.overloaded():
            return 0.0
        front_end = 0.0 if self.count_front_end else (self.front_end.value or 0.0)
        return tail_margin_s(front_end, self.overrun.value or 0.0)

    def _front_end_s(self) -> float:
        """The front end's time taken off the bound: its measured p90 with ``count_front_end``, else 0."""
        return (self.front_end.value or 0.0) if self.count_front_end else 0.0

    def _sizer_bound_s(self, sizer: BatchSizer, size: int | None) -> float | None:
        """``sizer``'s bound at ``size`` (None: the size in use) less :meth:`_front_end_s`, at least
        ``MIN_AUTO_QUEUE_WAIT_S``; None before the sizer has measured anything."""
        bound = sizer.wait_bound_s(self.max_wait_s, size)
        return None if bound is None else max(bound - self._front_end_s(), MIN_AUTO_QUEUE_WAIT_S)

    def _recent_batch(self) -> int:
        """Queries per batch lately (smoothed; a full batch before any was served)."""
        return round(self._mean_batch) if self._mean_batch is not None else self.max_batch

    def observe_front_end(self, seconds: float) -> None:
        """Account the time an answered query spent outside its batch: from its request's start to its submission,
        and from its answer being ready (:attr:`QueryResult.finished`) to the handler taking it up again."""
        self.front_end.add(seconds)

    def _full_batch_s(self) -> float | None:
        """Predicted service time of a full batch: at the sizer's size in use, else from :attr:`cost`."""
        if self._sizer is not None:
            return self._sizer.batch_s(self._sizer.current, self.max_batch)
        return self.cost.predict(self.max_batch)

    def _predict_batch_s(self, batch: list[_Query]) -> float:
        """Predicted service time of ``batch`` (0 before any measurement): per size with a sizer."""
        if self._sizer is None:
            return self.cost.predict(len(batch)) or 0.0
        counts: dict[int, int] = defaultdict(int)
        for query in batch:
            counts[query.size] += 1
        return sum(self._sizer.batch_s(size, n) or 0.0 for size, n in counts.items())

    def _busy_remaining(self) -> float:
        busy = self._busy
        if busy is None:
            return 0.0
        started, predicted = busy
        return max(0.0, predicted - (time.perf_counter() - started))

    @property
    def depth(self) -> int:
        """Queries waiting for the worker."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def check_admission(self, step_down: bool = False, arrival: bool = True) -> float | None:
        """Refuse a query now if its predicted wait for its batch exceeds the bound (the HTTP layer calls this
        before decoding a request's image, so that a request to be shed costs no decode; :meth:`submit` calls it
        again, with ``arrival`` False).

        Args:
            step_down: With a sizer, for a query that will be prepared at the size in use (no size pinned): before
                refusing, step down to the largest smaller size whose bound admits the wait, and admit it there.
            arrival: The query's first check: it counts as an arrival, and with ``defer_early_arrivals`` it is
                refused when later arrivals will fill the next batch.

        Returns:
            The bound the query was admitted under (None: no bound yet); the late bound for a query admitted past its
            bound on the late-answer budget (:attr:`late_budget`: at arrival, while the budget has a grant left;
            :meth:`submit` takes the grant).

        Raises:
            QueueWaitError: When the predicted wait exceeds :attr:`queue_wait_bound_s`, or the query is deferred.
        """
        return self._admit(step_down, arrival)[0]

    def _admit(self, step_down: bool, arrival: bool) -> tuple[float | None, bool]:
        """:meth:`check_admission`, and whether the query is admitted on the late-answer budget (at ``arrival``
        only if a grant is left; otherwise, at :meth:`submit`, the grant is taken)."""
        if arrival and self.late_budget is not None:
            self.late_budget.arrived()
        depth, remaining = self.depth, self._busy_remaining()
        defer = arrival and self.defer_early_arrivals and remaining > 0
        if defer:
            self.arrivals.record(remaining)
        # its own batch: at least those ahead of it in that batch and itself, else as large as batches are now
        bound, full = self._bound_s(max(self._recent_batch(), depth % self.max_batch + 1)), self._full_batch_s()
        if bound is None or full is None:
            return None, False
        predicted = predicted_wait_s(depth, self.max_batch, remaining, full, self.max_wait_s)
        if should_shed(predicted, bound, depth, remaining) and not (
            step_down and self._admitted_smaller(predicted, depth, remaining)
        ):
            late_bound = self._late_bound_s(bound, full)
            if late_bound is not None and predicted <= late_bound and self._grant_late(arrival):
                return late_bound, True
            with self._shed_lock:
                self.shed_predicted += 1
            if arrival:
                self.overload.record_refused()
            raise QueueWaitError(
                f"The service is busy: a query now would wait about {1000 * predicted:.0f} ms for its batch "
                f"({depth} queued), over the bound of {1000 * bound:.0f} ms (--max-queue-wait-ms; default the "
                "batching window plus two batch service times less its own batch's, or what a --latency-target-ms "
                "leaves); try again shortly."
            )
        if defer and self.overload.overloaded():  # will those arriving before its batch starts fill its places?
            expected = self.arrivals.expected_later(remaining, periods_ahead=depth // self.max_batch)
            free = self.max_batch - depth % self.max_batch
            if expected is not None and later_arrivals_fill(free, expected):
                with self._shed_lock:
                    self.shed_deferred += 1
                raise QueueWaitError(
                    f"The service is busy: about {expected:.0f} queries arriving before this one's batch starts "
                    f"fill its {free} free places and wait less than this one would; try again shortly.",
                    deferred=True,
                )
        return bound, False

    def _late_bound_s(self, bound: float, full: float | None) -> float | None:
        """With a late-answer budget: ``bound`` plus ``full``, one full batch's predicted time at the size in use
        (:meth:`_full_batch_s`; the longest wait of a query admitted on the budget); None without a budget or
        before any batch was measured."""
        if self.late_budget is None or full is None:
            return None
        return bound + full

    def _grant_late(self, arrival: bool) -> bool:
        """Whether the late-answer budget admits one more query: at arrival only whether a grant is left (the query
        is decoded, then :meth:`submit` takes the grant, or refuses it if others took the last one meanwhile)."""
        budget = self.late_budget
        if budget is None:
            return False
        return budget.available() if arrival else budget.try_grant()

    def _admitted_smaller(self, predicted_s: float, depth: int, remaining_s: float) -> bool:
        """With a sizer and the derived bound: whether a smaller size's bound admits a wait of ``predicted_s`` (the
        queries ahead keep their sizes; only the query's own batch, at the smaller size, is shorter), in which case
        the sizer steps down to it (:meth:`~raml.deploy.service.adaptive_size.AdaptiveQuerySize.step_down_to_admit`)
        and the query is transformed at it."""
        sizer = self._sizer
        if sizer is None or self.max_queue_wait_s is not None:
            return False

        def fits(size: int) -> bool:
            bound = self._sizer_bound_s(sizer, size)
            return bound is not None and not should_shed(predicted_s, bound, depth, remaining_s)

        return sizer.step_down_to_admit(fits) is not None

    def submit(self, image: torch.Tensor, size: int, k: int) -> Future:
        """Queue one ``(3, size, size)`` query for the ``k`` nearest database images.

        Raises:
            QueueFullError: When ``queue_size`` queries already wait.
            QueueWaitError: When the query's predicted wait for its batch exceeds the bound.
            RuntimeError: When the worker is not running.
            ValueError: When ``image`` is not ``(3, size, size)``.
        """
        if not isinstance(image, torch.Tensor) or tuple(image.shape[-2:]) != (size, size):
            shape = getattr(image, "shape", image)
            raise ValueError(f"Submit a (3, {size}, {size}) query tensor with its size {size}, got {shape!r}.")
        if not self.running:
            raise RuntimeError("The batching worker is not running; start() it first.")
        admitted_bound, late = self._admit(step_down=False, arrival=False)
        query = _Query(image, int(size), int(k), time.perf_counter(), admitted_bound, late=late)
        try:
            self._queue.put_nowait(query)
        except queue.Full:
            raise self._queue_full() from None
        return query.future

    def check_room(self, on_the_way: int = 0) -> None:
        """Refuse a query before it is decoded when the queue cannot take it: ``on_the_way`` queries (being decoded,
        to be submitted) and those queued fill ``queue_size`` already.

        Raises:
            QueueFullError: When ``depth + on_the_way >= queue_size``.
        """
        if self.depth + max(0, on_the_way) >= self.queue_size:
            raise self._queue_full()

    def _queue_full(self) -> QueueFullError:
        return QueueFullError(
            f"{self.queue_size} queries are already waiting or being decoded (--queue-size); try again shortly, "
            "or start the service with a larger --queue-size."
        )

    def start(self) -> None:
        """Start the worker thread."""
        if self.running:
            return
        self._thread = threading.Thread(target=self._work, name="raml-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the worker finish the queries already queued, then stop it."""
        if self._thread is None:
            return
        self._queue.put(None)  # after everything already queued
        self._thread.join(timeout=timeout_s)
        self._thread = None

    def _take_batch(self, first: _Query) -> tuple[list[_Query], bool]:
        """``first`` and the queries that arrive until the batch is full or the wait is over; True = stop seen."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._arriving() <= 0:
                    break
                try:  # short waits, so that the last arriving query's failure does not hold the batch back
                    item = self._queue.get(timeout=min(remaining, _POLL_S))
                except queue.Empty:
                    continue
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._take_batch(first)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Query]) -> None:
        started = time.perf_counter()
        # A query whose client went away (its future cancelled) is dropped; the others can no longer be cancelled.
        batch = [query for query in batch if query.future.set_running_or_notify_cancel()]
        if self._sizer is not None and batch:
            # the size in use for the queries decoded from now on; told before any query is refused for its wait,
            # so that a backlog refused whole (every query of the batch past the bound) still steps the size down
            self._sizer.choose(started - batch[0].submitted, self._queue.qsize())
        bound = self._bound_s(len(batch))
        if bound is not None:  # a query that waited past the bound gets 503 rather than a late answer
            for query in batch:
                # the bound now, for a batch of this size, or the one it was admitted under if that was looser: a
                # batch larger than the recent ones shrinks the bound, and a query admitted at moderate load is not
                # refused for that after it waited (it is answered within the promise plus its batch's growth). Not
                # with a sizer: there a falling bound is a step down, and the backlog must go
                # with the sizer, a query admitted on the late-answer budget keeps its late bound
                admitted = query.admitted_bound if self._sizer is None or query.late else None
                query.bound = bound if admitted is None else max(bound, admitted)
            expired = [query for query in batch if started - query.submitted > query.bound]
            late_bound = self._late_bound_s(bound, self._full_batch_s()) if expired else None
            if late_bound is not None:  # answered late on the budget rather than refused, while it lasts
                for query in expired:
                    if not query.late and started - query.submitted <= late_bound and self._grant_late(False):
                        query.late, query.bound = True, late_bound
                expired = [query for query in expired if started - query.submitted > query.bound]
            for query in expired:
                query.future.set_exception(
                    QueueWaitError(
                        f"The service is busy: the query waited {1000 * (started - query.submitted):.0f} ms for its "
                        f"batch, over the bound of {1000 * query.bound:.0f} ms (--max-queue-wait-ms); try again "
                        "shortly.",
                        expired=True,
                    )
                )
            if expired:
                with self._shed_lock:
                    self.shed_expired += len(expired)
                batch = [query for query in batch if not query.future.done()]
        if not batch:
            return
        self.overload.next_period()
        if self.defer_early_arrivals:  # the profile serves the deferral alone
            self.arrivals.next_period()
        predicted = self._predict_batch_s(batch)
        self._busy = (started, predicted)
        try:
            self._serve(batch, started)
        finally:
            self._busy = None
            took = time.perf_counter() - started
            if predicted > 0:
                self.overrun.add(max(0.0, took - predicted))
            self.cost.observe(len(batch), took)
            self._mean_batch = ewma(self._mean_batch, float(len(batch)), _BATCH_SIZE_ALPHA)

    def _serve(self, batch: list[_Query], started: float) -> None:
        index = self._current_index()  # one index for the whole batch, even if a new generation is swapped in
        by_size: dict[int, list[_Query]] = defaultdict(list)
        for query in batch:
            by_size[query.size].append(query)
        for size, group in by_size.items():
            try:
                t0 = group_started = time.perf_counter()
                embeddings = self._embed(torch.stack([q.image for q in group]))
                embed_s = time.perf_counter() - t0
                self._on_batch(len(group))
                by_k: dict[int, list[int]] = defaultdict(list)
                for row, query in enumerate(group):
                    by_k[query.k].append(row)
                for k, rows in by_k.items():
                    t0 = time.perf_counter()
                    scores, ids = index.search(embeddings[rows], k)
                    search_s = time.perf_counter() - t0
                    for row, row_scores, row_ids in zip(rows, scores, ids):
                        keep = row_ids >= 0
                        result = QueryResult(
                            row_ids[keep], row_scores[keep], index, len(group), started - group[row].submitted,
                            embed_s, search_s, group[row].bound, size, time.perf_counter(), group[row].late,
                        )  # fmt: skip
                        group[row].future.set_result(result)
                if self._sizer is not None:
                    self._sizer.observe(size, len(group), time.perf_counter() - group_started)
            except Exception as error:  # the requests of this group get the error; the worker goes on
                logger.exception("A batch of %d queries at %d px failed", len(group), group[0].size)
                for query in group:
                    if not query.future.done():
                        query.future.set_exception(error)
