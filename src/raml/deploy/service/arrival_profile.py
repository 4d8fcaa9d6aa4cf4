"""Under overload, admit the queries that will wait least: the later arrivals of each batch period (opt-in,
``raml serve --defer-early-arrivals``).

Why: the queue-wait bound (:mod:`raml.deploy.service.admission`) admits a query whenever fewer than a full batch
wait ahead of it, in arrival order. Past saturation the next batch's ``max_batch`` places then fill with the
queries that arrive *first* after a batch starts, each of which waits for nearly the whole batch in progress, and
the later arrivals of the period are refused. At 2x saturation on the 2-core machine (``raml bench serve``,
2026-12-04 18:47) the admitted queries' median wait for their batch was 54.9 ms of a 75.8 ms forward pass (about
38 ms if the admitted ones were spread over the period), their p99 82.6 ms: the promise of an answer within the
batching window plus two batch service times then leaves the front end nothing.

Contract: :class:`ArrivalProfile` records, for each arrival while a batch is in progress, the time that batch had
left (``record(remaining_s)``), per batch period (``next_period()`` when a batch starts); from the last ``periods``
periods, ``expected_later(remaining_s, periods_ahead)`` is the mean number of arrivals that came with less than
``remaining_s`` left, plus ``periods_ahead`` whole periods' worth: how many queries are still to come before the
batch in progress ends (and the full batches queued after it). :func:`later_arrivals_fill` says whether those will
fill the ``free`` places of the query's batch even ``z`` standard deviations below their mean (Poisson: the standard
deviation is the square root of the mean): then the query arriving now is refused (503, ``Retry-After``, before its
image is decoded; ``raml_shed_total{reason="queue_wait_deferred"}``) and a later one takes its place, so the batch
is as full and its queries waited less. With fewer arrivals than places to come, nothing is refused that would not
have been.

The rule applies only while the service is *overloaded* (:class:`raml.deploy.service.overload.OverloadGate`): in
at least half of the recent periods some arrival was refused on its predicted wait anyway.
Without that gate a closed loop of clients, each of which sends its next query at once, even after a 503, fed
itself: a deferred client's resend counted as one more arrival later in the period, which deferred more (on the
2-core machine, 64 closed-loop clients got 636 and, counting the batches queued ahead too, 4,908 503s in 5 s,
and 327 against 403-416 q/s answered; none without the rule).

Measured (``raml bench serve``, four runs alternated with arrival order, 2026-12-04 19:02-19:13): at 2x saturation
the admitted queries' median wait for their batch 32.6 / 39.1 ms against 57.5 / 60.7 ms, the median latency 128.1
/ 140.9 against 157.3 / 165.6 ms; the p99 not lower (232.2 / 193.4 against 190.4 / 211.4 ms; the forward pass's
overruns and the event loop's delays make the tail); with 64 closed-loop clients 0 / 614 503s against 0 / 109,
and in a fifth run 446, 331 of them deferred (the gate opened on 14 refusals). Hence off by default.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

__all__ = ["ArrivalProfile", "later_arrivals_fill"]


def later_arrivals_fill(free: int, expected_later: float, z: float = 2.0) -> bool:
    """Whether ``expected_later`` arrivals (Poisson in count) fill ``free`` places even ``z`` standard deviations
    below their mean: ``expected - z * sqrt(expected) >= free`` (False when ``free`` < 1: nothing to fill)."""
    if free < 1 or not expected_later > 0:
        return False
    return expected_later - z * math.sqrt(expected_later) >= free


class ArrivalProfile:
    """Arrivals by the time the batch in progress had left, over the last ``periods`` batch periods.

    Written from two threads (arrivals on the event loop, periods on the batch worker): each is a single list
    operation or an attribute swap, atomic under the GIL; an arrival that races a period's end may count in either.

    Args:
        periods: Batch periods remembered (the estimate needs at least half of them).
    """

    def __init__(self, periods: int = 8) -> None:
        if isinstance(periods, bool) or not isinstance(periods, int) or periods < 1:
            raise ValueError(f"periods must be a positive integer, got {periods!r}.")
        self.periods = periods
        self._past: deque[list[float]] = deque(maxlen=periods)  # remaining times per period, sorted
        self._current: list[float] = []
        self.periods_seen = 0  # batch periods ended so far

    def record(self, remaining_s: float) -> None:
        """One arrival while the batch in progress had ``remaining_s`` seconds left."""
        self._current.append(float(remaining_s))

    def next_period(self) -> None:
        """A batch starts: the arrivals recorded so far form one period."""
        current, self._current = self._current, []
        self._past.append(sorted(current))
        self.periods_seen += 1

    def expected_later(self, remaining_s: float, periods_ahead: int = 0) -> float | None:
        """The mean number of arrivals per period that came with less than ``remaining_s`` left, plus
        ``periods_ahead`` whole periods' mean count (a query with full batches queued ahead of it starts its batch
        that many periods later), or None while fewer than half of ``periods`` periods were seen."""
        past = list(self._past)
        if len(past) < max(1, self.periods // 2):
            return None
        later = sum(bisect.bisect_left(period, remaining_s) for period in past)
        return (later + periods_ahead * sum(len(period) for period in past)) / len(past)
