"""The query size of a service with a latency target: :func:`~raml.deploy.service.size_controller.choose_size` with
the state it needs (the size in use, the smoothed load), thread-safe (issue 20, item 4).

Contract: the batching worker calls :meth:`AdaptiveQuerySize.choose` once per batch it forms, with how long the
oldest query of that batch has waited (s) and how many queries still wait behind the batch; it updates the size in
use (:attr:`AdaptiveQuerySize.current`). After each forward pass and search it calls
:meth:`AdaptiveQuerySize.observe` with the size, the number of queries and the seconds they took. The request
handlers transform each upload that pins no size at :attr:`AdaptiveQuerySize.current` *when it is decoded* (one
transform per query), and the query is served at that size. The batcher bounds a query's wait for its batch by
:meth:`AdaptiveQuerySize.wait_bound_s`, predicting waits with :meth:`AdaptiveQuerySize.batch_s`.

Why the size is taken at decoding, not when the batch is formed: choosing per batch needs each query ready at every
size its batch may pick, so each upload was transformed at up to three sizes; in a run at twice the largest size's
saturation (docs/deployment.md) the server spent its time on the front end, not on the network, and the extra
transforms were a cost without a gain. The price: queries queued before a step down are served at the size they
were prepared at; the wait bound refuses those that would miss the target.

The queue delay observed per batch is the larger of two waits known *when the batch is formed* (no lag of one
batch): how long its oldest query has waited (the target bounds the tail, and within a batch the first query taken
has waited longest), and how long the last query still waiting will wait for the queries ahead of it (their number
times the time per query at the size in use). The second sees a burst as it arrives, before any query has waited
long: a queue that fills faster than the smoothed wait of served queries rises would otherwise overflow (503)
before the size steps down. After a quiet spell both are near zero, so the smoothed delay falls and the size
climbs back, one size per batch at most (see :mod:`~raml.deploy.service.size_controller` for the rule and its
hysteresis).

The batch service time the controller is given for a size is the smoothed time *per query* at that size times the
smoothed number of queries per batch. A batch's time grows with its queries, and a size not in use keeps the
measurement of the last time it was: under load a size is measured on full batches, and kept as a per-batch time
it would stay too large once the load falls and batches are small again (the service would never step back up).
Per query, scaled by the batch size of the moment, it follows the load. The time per query is taken from batches
of at least half ``full_batch`` queries only: a lone query costs several times more per query than a full batch
(fixed costs), and times per query measured at different batch sizes would make the ratio between two sizes, which
rescales the queue delay, meaningless (a step up predicted at a fraction of its cost, then straight back down).
A size without such a measurement is estimated from the nearest measured one by the pixel count.

Calibration at start: a service with a latency target measures each size on a synthetic full batch before it is
ready (:meth:`~raml.deploy.service.service.SearchService.calibrate`: ``max_batch`` zero images through the embedder
and the index search, a warm-up then a timed run, given to :meth:`AdaptiveQuerySize.observe` as a served batch), so
the predictions and the wait bound hold from the first query on. Before, nothing was measured until traffic made a
half-full batch: a burst right after start was admitted without any bound, and one after light traffic was refused
at the largest size on the provisional time below rather than stepped down to a smaller size that answers in time.
A size whose calibration batch takes longer than the target ends the calibration (its larger sizes, estimated by
the pixel count from it, are measured from traffic); so does a failing batch. For a size still without a measured
time (and for a sizer without a service), until the first half-full batch the batcher's predictions and wait bound
(not the controller) take the time per query of the smaller batches served so far, an over-estimate: under light
traffic no half-full batch may come for a long time, and without any bound a burst was admitted, decoded, and only
then refused as expired.

The utilisation of each size (the controller's guard against stepping up into a load the larger size cannot
serve, see :mod:`~raml.deploy.service.size_controller`) is the arrival rate (the queries submitted in the last
``rate_window_s`` seconds, counted by :meth:`AdaptiveQuerySize.arrived`) times the size's time per query.

The wait bound (:func:`~raml.deploy.service.size_controller.queue_wait_bound_ms`) is expressed at the size in use:
a full batch's time is the time per query at that size times ``full_batch``, so a step down shortens it.

A step down at admission (:meth:`AdaptiveQuerySize.step_down_to_admit`): a query that pins no size and whose
predicted wait exceeds the bound at the size in use is not refused while a smaller size's bound admits it; the
size in use becomes the largest such size, and the query is prepared at it. The controller's rule sees a burst
only as batches are formed, one size per batch; between a step up and the next batch, a queue that grows faster
than predicted was refused at the larger size although a smaller one would have answered in time (measured at 350
q/s against a target of 190 ms: 130-173 503s in 8 s without this step, 3-11 with it; docs/deployment.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from raml.deploy.service.size_controller import (
    ControllerSettings,
    SizeLoad,
    choose_size,
    ewma,
    predict_latency_ms,
    queue_wait_bound_ms,
)

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveQuerySize", "SizeDecision"]

_KEEP_DECISIONS = 100


@dataclass(frozen=True)
class SizeDecision:
    """One change of the size in use: ``before`` -> ``after``, the smoothed queue delay and the predicted latency
    at both sizes that made it (ms)."""

    before: int
    after: int
    queue_delay_ms: float
    predicted_ms: float
    predicted_after_ms: float


class AdaptiveQuerySize:
    """The size in use and the smoothed load of one service (see the module docstring).

    Args:
        settings: The latency target, the trained sizes (increasing) and the hysteresis.
        alpha: Weight of each new observation in the smoothed queue delay, per-query service times and batch size
            (0 < alpha <= 1).
        full_batch: The batcher's ``max_batch``; times per query are measured on batches of at least half of it.
        rate_window_s: The arrival rate is the number of queries submitted in this many last seconds, divided by it.

    The size in use starts at the largest trained size (an idle service answers at its best accuracy).
    """

    def __init__(
        self, settings: ControllerSettings, alpha: float = 0.2, full_batch: int = 1, rate_window_s: float = 1.0
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}.")
        if full_batch < 1:
            raise ValueError(f"full_batch must be a positive number of queries, got {full_batch!r}.")
        self.settings = settings
        self.alpha = float(alpha)
        if not rate_window_s > 0:
            raise ValueError(f"rate_window_s must be positive, got {rate_window_s!r}.")
        self.full_batch = int(full_batch)
        self.measured_from = max(1, full_batch // 2)  # the smallest batch whose time per query is recorded
        self.rate_window_s = float(rate_window_s)
        self._arrivals: deque[float] = deque()  # submission times within the last rate_window_s
        self._current = settings.sizes[-1]
        self._queue_ms = 0.0
        self._per_query_ms: dict[int, float] = {}
        #: times per query of batches below ``measured_from`` (higher: a small batch's fixed costs are shared by few
        #: queries): the batcher's predictions and wait bound until a batch of ``measured_from`` is measured
        self._provisional_ms: dict[int, float] = {}
        self._batch = 1.0  # smoothed queries per forward pass
        self._lock = threading.Lock()
        self.changes = 0  # changes of the size in use so far
        self.decisions: deque[SizeDecision] = deque(maxlen=_KEEP_DECISIONS)  # the latest changes, oldest first

    @property
    def current(self) -> int:
        """The size in use (the last batch's choice)."""
        return self._current

    @property
    def load(self) -> SizeLoad:
        """The smoothed load: queue delay, and batch service time per measured size at the smoothed batch size."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> SizeLoad:
        service = {size: ms * self._batch for size, ms in self._per_query_ms.items()}
        utilisation = {}
        if self._per_query_ms:
            rate = self._rate(time.monotonic())
            per_query = SizeLoad(0.0, self._per_query_ms)
            utilisation = {s: rate * predict_latency_ms(s, per_query) / 1000.0 for s in self.settings.sizes}
        return SizeLoad(self._queue_ms, service, utilisation)

    def _rate(self, now: float) -> float:
        while self._arrivals and self._arrivals[0] < now - self.rate_window_s:
            self._arrivals.popleft()
        return len(self._arrivals) / self.rate_window_s

    def arrived(self) -> None:
        """Count one query submitted now (for the arrival rate)."""
        now = time.monotonic()
        with self._lock:
            self._arrivals.append(now)
            self._rate(now)  # drops the old ones: the deque holds at most a window's arrivals

    def has_measured(self, size: int) -> bool:
        """Whether ``size`` has a time per query from a batch of at least half ``full_batch`` queries."""
        with self._lock:
            return int(size) in self._per_query_ms

    def batch_s(self, size: int, queries: int) -> float | None:
        """Predicted seconds to serve ``queries`` queries at ``size``: the smoothed time per query at that size
        (else the nearest measured size's, scaled by the pixel count) times ``queries``; None before any batch was
        served. Until a batch of at least half ``full_batch`` queries is measured, the time per query is that of the
        smaller batches served so far: an over-estimate (their fixed costs are shared by fewer queries), so a burst
        after light traffic is refused early, before decoding, rather than admitted without any bound."""
        with self._lock:
            per_query = self._per_query_ms or self._provisional_ms
            if not per_query:
                return None
            return predict_latency_ms(int(size), SizeLoad(0.0, dict(per_query))) * queries / 1000.0

    def wait_bound_s(self, window_s: float, size: int | None = None) -> float | None:
        """The bound on a query's wait for its batch at ``size`` (default: the size in use; s, see
        :func:`~raml.deploy.service.size_controller.queue_wait_bound_ms`); None before any batch was served."""
        full = self.batch_s(self._current if size is None else int(size), self.full_batch)
        if full is None:
            return None
        return queue_wait_bound_ms(self.settings.target_ms, 1000.0 * full, 1000.0 * window_s) / 1000.0

    def step_down_to_admit(self, fits: Callable[[int], bool]) -> int | None:
        """Before a query is refused at the size in use: the largest smaller size at which ``fits(size)`` (the
        query's predicted wait is within that size's bound) becomes the size in use, and is returned; None (and
        no change) when no smaller size fits. A service with a latency target refuses only what no trained size
        could answer in time; the controller's own rule (:meth:`choose`) may step back up later, with its
        hysteresis. Recorded in :attr:`decisions` like the controller's changes."""
        before = self._current
        chosen = next((size for size in reversed(self.settings.sizes) if size < before and fits(size)), None)
        if chosen is None:
            return None
        with self._lock:
            if self._current != before:  # another thread changed it meanwhile: take whichever is smaller
                chosen = min(chosen, self._current)
                if chosen == self._current:
                    return chosen
            load = self._snapshot()
            decision = SizeDecision(
                before, chosen, load.queue_delay_ms, predict_latency_ms(before, load),
                predict_latency_ms(chosen, load, before),
            )  # fmt: skip
            self.decisions.append(decision)
            self.changes += 1
            self._current = chosen
        logger.info(
            "Query size %d -> %d px at admission: a query's predicted wait exceeded the bound at %d px but not at "
            "%d px (target %.0f ms)",
            before,
            chosen,
            before,
            chosen,
            self.settings.target_ms,
        )
        return chosen

    def choose(self, oldest_wait_s: float, waiting: int = 0) -> int:
        """Update the size in use as a batch is formed: its oldest query has waited ``oldest_wait_s`` seconds, and
        ``waiting`` queries wait behind it. Returns the size in use from now on."""
        with self._lock:
            before = self._current
            per_query = predict_latency_ms(before, SizeLoad(0.0, self._snapshot().service_ms)) / self._batch
            sample = max(1000.0 * max(0.0, oldest_wait_s), max(0, waiting) * per_query)
            self._queue_ms = ewma(self._queue_ms, sample, self.alpha)
            load = self._snapshot()
            after = choose_size(before, load, self.settings)
            if after != before:
                decision = SizeDecision(
                    before,
                    after,
                    load.queue_delay_ms,
                    predict_latency_ms(before, load),
                    predict_latency_ms(after, load, before),
                )
                self.decisions.append(decision)
                self.changes += 1
                self._current = after
        if after != before:
            logger.info(
                "Query size %d -> %d px: predicted latency %.1f ms at %d px, %.1f ms at %d px (target %.0f ms, "
                "smoothed queue delay %.1f ms); utilisation %.2f at %d px, %.2f at %d px",
                before,
                after,
                decision.predicted_ms,
                before,
                decision.predicted_after_ms,
                after,
                self.settings.target_ms,
                decision.queue_delay_ms,
                load.utilisation.get(before, 0.0),
                before,
                load.utilisation.get(after, 0.0),
                after,
            )
        return after

    def observe(self, size: int, queries: int, service_s: float, traffic: bool = True) -> None:
        """Record one forward pass and search of ``queries`` queries at ``size`` that took ``service_s`` seconds.
        ``traffic=False`` (a calibration batch, not one the load formed): its time per query is recorded, but the
        smoothed number of queries per batch, which describes the load, is left as it is."""
        if queries < 1:
            raise ValueError(f"A batch holds at least one query, got {queries!r}.")
        with self._lock:
            per_query = 1000.0 * service_s / queries
            measured = self._per_query_ms if queries >= self.measured_from else self._provisional_ms
            measured[int(size)] = ewma(measured.get(int(size)), per_query, self.alpha)
            if traffic:
                self._batch = ewma(self._batch, float(queries), self.alpha)

    def describe(self) -> dict[str, object]:
        """For ``/health``: the target, the size in use and the smoothed load."""
        load = self.load
        return {
            "latency_target_ms": self.settings.target_ms,
            "current_size": self._current,
            "up_fraction": self.settings.up_fraction,
            "queue_delay_ms": round(load.queue_delay_ms, 3),
            "batch_service_ms": {str(size): round(ms, 3) for size, ms in sorted(load.service_ms.items())},
            "utilisation": {str(size): round(u, 3) for size, u in sorted(load.utilisation.items())},
            "changes": self.changes,
        }
