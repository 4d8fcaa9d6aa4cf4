"""Admission control: a bounded number of uploads and decodes in flight, and a queue bounded in *time*.

Contract: ``with slots.take(n):`` holds ``n`` of ``slots.limit`` units for the block, or raises
:class:`ServiceBusyError` at once (never waits) when they do not fit; the HTTP layer answers that with 503 and
``Retry-After``. The service keeps three: request bodies being received (``--max-uploads``), images being
decoded and transformed (``--max-decodes``), and the pixels of those images, read from their headers
(``--max-decode-pixels``), so that the memory a burst of requests can take is bounded *before* any body is
buffered or any pixel decoded (the batching queue's ``--queue-size`` only bounds what waits after decoding).

The batching queue is also bounded in time (issue 20): a count of queries says nothing of how long they will
wait, since a batch's service time depends on the machine, the query size and the load. :class:`BatchCostModel`
fits the service time of a batch of ``n`` queries, ``t(n) = a + b n``, by exponentially weighted least squares
over the batches served (the newest weighs most); :func:`predicted_wait_s` turns the queue's state into the
seconds a query submitted now waits for its batch to start; :func:`should_shed` compares that with the bound
(``--max-queue-wait-ms``, by default :func:`promised_wait_bound_s`: what the promise of an answer within the batching
window plus two full batches' service time leaves for the wait once the query's own batch is taken off, and, with
``--queue-wait-counts-front-end``, the front end's time too, :class:`RecentQuantile` of the measured time outside
the batch), and the batcher refuses the query with :class:`QueueWaitError` (503 + ``Retry-After``) when it is over.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

__all__ = [
    "BatchCostModel",
    "QueueWaitError",
    "RecentQuantile",
    "ServiceBusyError",
    "Slots",
    "predicted_wait_s",
    "promised_wait_bound_s",
    "should_shed",
]

#: the flag that sets the bound on a query's wait for its batch (the metrics count refusals by it)
QUEUE_WAIT_FLAG = "--max-queue-wait-ms"


class ServiceBusyError(RuntimeError):
    """What a request needs is all held; try again shortly (HTTP 503 with ``Retry-After``).

    Attributes:
        flag: The command-line flag of the limit reached (the metrics count refusals by it).
    """

    def __init__(self, message: str, flag: str = "") -> None:
        super().__init__(message)
        self.flag = flag


class Slots:
    """``limit`` units taken without waiting (thread-safe): slots (one per holder) or a budget (e.g. pixels).

    Args:
        limit: Most units held at once (positive).
        what: What is held, for the refusal message (e.g. ``"request bodies being received"``).
        flag: The command-line flag that sets ``limit``, named in the refusal message.
    """

    def __init__(self, limit: int, what: str, flag: str) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"A slot limit must be a positive integer, got {limit!r}.")
        self.limit = limit
        self.what = what
        self.flag = flag
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Units held now."""
        return self._held

    @contextlib.contextmanager
    def take(self, amount: int = 1) -> Iterator[None]:
        """Hold ``amount`` units (one slot, or e.g. an image's pixels) for the block.

        ``amount`` is admitted when the units held plus ``amount`` stay within ``limit``, or when nothing is held
        (so that one request larger than the whole budget is still served, alone).

        Raises:
            ServiceBusyError: At once, when ``amount`` does not fit.
        """
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"amount must be a non-negative integer, got {amount!r}.")
        with self._lock:
            if self._held > 0 and self._held + amount > self.limit:
                raise ServiceBusyError(
                    f"The service is busy: {self._held} {self.what} in flight, {self.flag} is {self.limit}; "
                    "try again shortly.",
                    self.flag,
                )
            self._held += amount
        try:
            yield
        finally:
            with self._lock:
                self._held -= amount


class QueueWaitError(ServiceBusyError):
    """A query would wait (or has waited) longer than the queue-wait bound for its batch to start (HTTP 503)."""

    def __init__(self, message: str, expired: bool = False, deferred: bool = False) -> None:
        super().__init__(message, QUEUE_WAIT_FLAG)
        #: False: refused on its predicted wait, before decoding; True: admitted, then its actual wait when its batch
        #: started was over the bound (it was decoded for nothing): the metrics count the two apart
        self.expired = expired
        #: refused before decoding because later arrivals fill its batch (:mod:`raml.deploy.service.arrival_profile`)
        self.deferred = deferred


class BatchCostModel:
    """The smoothed service time of a batch as a function of its number of queries: ``t(n) = a + b n``.

    Fitted by exponentially weighted least squares: each batch observed multiplies the weight of the earlier ones
    by ``decay``, so the model follows a change of load (other processes on the cores, another query size) within
    a few batches. Where the batches seen so far have (nearly) one size, or the fit would be negative at 0 or
    decreasing in ``n``, the model falls back to ``t(n) = b n`` through the origin (or a constant when ``b`` would be
    negative): a cost proportional to the work, which over-estimates a larger batch (sheds early) rather than
    under-estimating it.

    Args:
        decay: Weight kept by the earlier batches at each new one, in (0, 1) (0.9: the last ~10 batches count).
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}.")
        self.decay = float(decay)
        self._sums = [0.0] * 5  # weighted sums of 1, n, t, n*n, n*t
        self._lock = threading.Lock()

    @property
    def observed(self) -> bool:
        """Whether any batch has been observed."""
        return self._sums[0] > 0

    def observe(self, queries: int, seconds: float) -> None:
        """Account one batch of ``queries`` queries that took ``seconds`` to serve."""
        if queries < 1 or not seconds >= 0:
            raise ValueError(f"A batch needs >= 1 query and a duration >= 0, got {queries!r} and {seconds!r}.")
        n, t = float(queries), float(seconds)
        with self._lock:
            self._sums = [self.decay * s + x for s, x in zip(self._sums, (1.0, n, t, n * n, n * t))]

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, b)`` of ``t(n) = a + b n`` in seconds, or None before any batch is observed."""
        with self._lock:
            w, sn, st, snn, snt = self._sums
        if w <= 0:
            return None
        mean_n, mean_t = sn / w, st / w
        variance = snn / w - mean_n * mean_n
        if variance > 1e-6 * max(1.0, mean_n * mean_n):
            b = (snt / w - mean_n * mean_t) / variance
            a = mean_t - b * mean_n
            if b < 0:  # noise made larger batches look faster: a constant cost
                return mean_t, 0.0
            if a >= 0:
                return a, b
        return 0.0, snt / snn  # one batch size seen (or a < 0): proportional to the work

    def predict(self, queries: int) -> float | None:
        """Predicted seconds to serve a batch of ``queries`` queries, or None before any batch is observed."""
        fitted = self.coefficients()
        if fitted is None:
            return None
        a, b = fitted
        return max(0.0, a + b * queries)


def predicted_wait_s(
    depth: int, max_batch: int, busy_remaining_s: float, full_batch_s: float, max_wait_s: float
) -> float:
    """Seconds a query submitted now waits for its batch to start (its ``queue`` time).

    The worker first finishes the batch in progress (``busy_remaining_s``), then serves the ``depth`` queries
    waiting ahead of this one in order, ``max_batch`` at a time: ``depth // max_batch`` full batches of
    ``full_batch_s`` each come before this query's batch. That batch then waits up to ``max_wait_s`` for more
    queries, unless this query fills it.

    Args:
        depth: Queries waiting ahead of this one.
        max_batch: Most queries per batch.
        busy_remaining_s: Predicted rest of the batch in progress (0 when the worker is idle).
        full_batch_s: Predicted service time of a full batch.
        max_wait_s: The batching window.
    """
    ahead = depth // max_batch
    fills_its_batch = depth % max_batch + 1 >= max_batch
    return busy_remaining_s + ahead * full_batch_s + (0.0 if fills_its_batch else max_wait_s)


def should_shed(predicted_s: float, bound_s: float | None, depth: int, busy_remaining_s: float) -> bool:
    """Whether to refuse a query whose predicted wait is ``predicted_s``: when it exceeds ``bound_s`` (None: no
    bound yet, nothing measured), except that a query finding the worker idle and the queue empty is always
    admitted (it waits for nothing but its own batching window)."""
    if bound_s is None or (depth == 0 and busy_remaining_s <= 0):
        return False
    return predicted_s > bound_s


def promised_wait_bound_s(
    window_s: float, full_batch_s: float, front_end_s: float = 0.0, own_batch_s: float | None = None
) -> float:
    """The longest a query may wait for its batch to start so that it is answered within the service's promise,
    ``window + 2 x full batch`` (issue 20: the batching window, the batch ahead of it, its own batch):
    ``window + 2 full - own batch - front_end``, where ``own_batch_s`` is the predicted service time of the batch
    the query joins (default: a full batch) and ``front_end_s`` the time a query spends outside the batch
    (receiving, decoding, and the event loop's delay before its answer is written; a high quantile of what was
    measured, :class:`RecentQuantile`). With a full own batch and no front end that is the window plus one full
    batch: a query is refused only when a whole batch's worth of queries waits ahead of it. At moderate load the
    batches are smaller than full, and their shorter time leaves the wait more room (a query arriving as a batch
    of 20 starts is not refused for the front end's few milliseconds). The caller floors the result (a bound of
    0 would refuse everything whenever the front end is slow).

    Raises:
        ValueError: When a time is negative (or NaN).
    """
    own = full_batch_s if own_batch_s is None else own_batch_s
    checked = (
        ("window_s", window_s),
        ("full_batch_s", full_batch_s),
        ("front_end_s", front_end_s),
        ("own_batch_s", own),
    )
    for name, value in checked:
        if not value >= 0:
            raise ValueError(f"{name} must be zero or positive (s), got {value!r}.")
    return window_s + 2 * full_batch_s - own - front_end_s


class RecentQuantile:
    """The ``quantile`` of the last ``window`` observations (thread-safe): e.g. the p90 of the time a query spends
    outside its batch, recomputed every ``every`` observations (sorting a few hundred floats per request would cost
    the event loop more than it measures).

    Args:
        quantile: In [0, 1]; the value returned is the observation of that rank (nearest rank, rounded up).
        window: Observations kept (the newest).
        every: Observations between two recomputations (1: at each).
    """

    def __init__(self, quantile: float = 0.9, window: int = 256, every: int = 16) -> None:
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile!r}.")
        for name, value in (("window", window), ("every", every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.quantile = float(quantile)
        self.window = window
        self.every = every
        self._values: list[float] = []
        self._next = 0  # where the next observation goes once the window is full (a ring)
        self._since = 0
        self._value: float | None = None
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        """Account one observation (a non-negative number; NaN is ignored)."""
        if not value >= 0:
            return
        with self._lock:
            if len(self._values) < self.window:
                self._values.append(float(value))
            else:
                self._values[self._next] = float(value)
                self._next = (self._next + 1) % self.window
            self._since += 1
            if self._value is None or self._since >= self.every:
                self._value = nearest_rank(self._values, self.quantile)
                self._since = 0

    @property
    def value(self) -> float | None:
        """The quantile as last recomputed, or None before any observation."""
        return self._value


def nearest_rank(values: list[float], quantile: float) -> float:
    """The ``quantile`` of ``values`` by the nearest-rank rule: the ``ceil(q n)``-th smallest (the smallest for
    ``q = 0``), one of the values, never an interpolation."""
    if not values:
        raise ValueError("nearest_rank needs at least one value.")
    ordered = sorted(values)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return ordered[rank - 1]
