"""Past saturation, keep the promise for the queries admitted: while the service is overloaded, the default
queue-wait bound is lowered by the time an answer's tail takes beyond the predictions (on by default; ``raml serve
--no-overload-margin`` turns it off).

Why: the default bound (:func:`raml.deploy.service.admission.promised_wait_bound_s`) promises an answer within the
batching window plus two full batch service times, and admits a query whenever fewer than a full batch wait ahead
of it. Past saturation the next batch then fills with queries that arrive while the batch in progress has most of
its time left; each waits for nearly that whole batch, and its answer needs its own batch too, so it is answered
in about two batch times plus the window, with nothing left for what the predictions leave out: the front end
(receiving, decoding, the event loop's delay in writing the answer) and the forward passes that overrun their
predicted time. Measured at 2x saturation on the 2-core machine (2026-12-04 20:37, the worst 1 % of 3,100
answered queries, 850 queries/s offered): 75.6 ms waiting for the batch ahead + 92.5 ms in its own batch (median
78.3) + 19.2 ms in the front end = 187.8 ms against a promise of 5 + 2 x 78.3 = 161.6 ms.

Contract: :class:`OverloadGate` counts, per batch period (``next_period()`` when a batch starts), the arrivals
refused on their predicted wait (``record_refused()``); ``overloaded()`` is true when at least half of the recent
periods had one: more queries come than the batches take, whatever is done with their order. While it is true,
the batcher takes :func:`tail_margin_s` off its default bound: the front end's p90 (unless
``--queue-wait-counts-front-end`` takes it off already) plus twice the p90 of the forward passes' overrun of
their predicted time (the batch in progress and the query's own batch may each overrun). A query arriving early
in a batch period is then refused (503, ``Retry-After``, before its image is decoded) and one arriving later, which
waits less, takes its place: at 2x saturation enough arrive later to fill the next batch, so throughput holds.

The gate keeps it to overload: a service that refuses nothing on the plain bound (up to saturation; a closed loop
of clients that each wait for their answer) is never narrowed by it, so the goal of no 503s at 0.8x of capacity is
untouched, and a closed loop of clients that resend at once after a 503 cannot feed it.

Measured (``raml bench serve --duration 5 --warmup 1``, 2026-12-04 20:41-21:15, six runs with the margin and three
alternated ones with ``--no-overload-margin``): at 2x saturation the accepted p99 met the promise in 3 of 6 runs
(158.3 vs 169.1, 136.4 vs 146.5, 141.4 vs 151.3 ms) and missed it by 3.5, 17.5 and 0.5 % in the others; without the
margin it missed in 3 of 3, by 18-42 %. The queue's p99 fell from 77.8-84.9 to 53.5-68.1 ms; what is left of the
tail is mostly outside the server's view (before its handler starts and on the client's side: 21.5-27.8 ms p99 in
the runs that missed, 11.3-16.1 in those that met). The cost: 0-10 % fewer answers at 2x. No 503 at 0.8x and none to
64 closed-loop clients in any run.
"""

from __future__ import annotations

from collections import deque

__all__ = ["OverloadGate", "tail_margin_s"]


def tail_margin_s(front_end_s: float, overrun_s: float) -> float:
    """The time an admitted query's answer may take beyond the predictions: ``front_end_s`` (a high quantile of
    its time outside its batch) plus two forward-pass overruns of ``overrun_s`` (a high quantile of a batch's
    service time beyond its prediction): the batch in progress when it arrived and its own batch.

    Raises:
        ValueError: When a time is negative (or NaN).
    """
    for name, value in (("front_end_s", front_end_s), ("overrun_s", overrun_s)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 seconds, got {value!r}.")
    return float(front_end_s) + 2.0 * float(overrun_s)


class OverloadGate:
    """Whether more queries arrive than the batches take: refusals on the predicted wait in the recent batch
    periods.

    Written from two threads (refusals on the event loop, periods on the batch worker) without a lock: a refusal
    that races a period's end may count in either period, or be lost, which moves the gate by one period at most
    while refusals keep coming.

    Args:
        periods: Batch periods remembered.
    """

    def __init__(self, periods: int = 8) -> None:
        if isinstance(periods, bool) or not isinstance(periods, int) or periods < 1:
            raise ValueError(f"periods must be a positive integer, got {periods!r}.")
        self.periods = periods
        self._past: deque[int] = deque(maxlen=periods)  # refusals per period, newest last
        self._refused = 0
        self.periods_seen = 0  # batch periods ended so far

    def record_refused(self) -> None:
        """One arrival refused on its predicted wait (a full batch's worth, or the bound's share, waited already)."""
        self._refused += 1

    def next_period(self) -> None:
        """A batch starts: the refusals counted so far belong to the period that ends."""
        refused, self._refused = self._refused, 0
        self._past.append(refused)
        self.periods_seen += 1

    def overloaded(self) -> bool:
        """Whether in at least half of the remembered periods, and of ``periods``, an arrival was refused on its
        predicted wait."""
        past = list(self._past)
        return sum(1 for refused in past if refused) >= max(1, self.periods // 2, len(past) // 2)
