"""The late-answer budget of a latency target: a small share of queries answered past their wait bound, not refused.

``raml serve --latency-target-ms T`` promises a p99 under T: up to 1 % of the answers may take longer. With a
multi-size student the service steps down to a smaller query size before it refuses anything
(:mod:`raml.deploy.service.adaptive_size`), but at the smallest size a Poisson burst that queues more than the
bound allows still got 503s (issue 20: 10 of ~3,700 queries at twice the largest size's saturation, while the p99
of the answered ones stayed 10 % under T). Refusing those few is worse for the client than answering them a
little late: the budget lets the batcher admit such a query instead, provided that

- no smaller size admits it (the step down comes first), and its predicted wait is within the bound plus one full
  batch at the size in use (the *late bound*: it is answered at most one batch after the target, never queued
  without bound);
- fewer than ``fraction`` of the last ``window`` arrivals were admitted on the budget (0.5 % suggested: half of
  what a p99 allows, so the rest of the tail keeps the other half).

A query admitted within its bound that has, against the prediction, waited past it when its batch starts is
answered on the budget too (within the late bound, while the budget lasts) rather than refused after its decoding.

The budget counts arrivals, not seconds: ``window`` arrivals are a few seconds at the rates where it matters. Before
``1 / fraction`` queries have arrived it grants nothing (a budget of less than one query is none).

``raml serve --late-budget F`` turns it on; it is off by default because it did not do what it was built for: in
three alternated pairs of ``raml bench adaptive --rates 2 --target-ms 120.7`` runs (2026-12-04 21:54-22:00 UTC) the
budget of 0.005 answered 12-15 queries late but still refused 10-26 (the 24 px size then runs at 85-95 % of its
capacity, and a burst outlasts the budget), and the p99 of the answered queries rose to 122.1-128.9 ms, over T,
against 116.3-127.6 ms (over T in one of three) with 12-61 refused without it. The queries admitted late lengthen
the queue for those that arrive after them in the same burst.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["DEFAULT_LATE_FRACTION", "LateBudget"]

#: the share of arrivals a latency target may answer late by default: half of the 1 % a p99 target allows
DEFAULT_LATE_FRACTION = 0.005


class LateBudget:
    """Grants over-bound admissions to at most ``fraction`` of the last ``window`` arrivals (thread-safe).

    Args:
        fraction: The share of arrivals that may be admitted past their wait bound, in ``(0, 0.1]``.
        window: How many of the latest arrivals the share is counted over (at least ``1 / fraction``, so that
            the budget is at least one query).
    """

    def __init__(self, fraction: float = DEFAULT_LATE_FRACTION, window: int = 2000) -> None:
        if not 0 < fraction <= 0.1:
            raise ValueError(
                f"The late-answer budget is a share of the queries in (0, 0.1] (e.g. 0.005: 0.5 %), got {fraction!r}."
            )
        if isinstance(window, bool) or not isinstance(window, int) or window * fraction < 1:
            raise ValueError(
                f"window must be an integer of at least 1 / fraction = {1 / fraction:.0f} arrivals (a budget of at "
                f"least one query), got {window!r}."
            )
        self.fraction = float(fraction)
        self.window = window
        self.arrivals = 0  # arrivals so far
        self.granted = 0  # over-bound admissions granted so far
        self._grants: deque[int] = deque()  # the arrival count at each grant within the window
        self._lock = threading.Lock()

    def arrived(self) -> None:
        """Count one arriving query."""
        with self._lock:
            self.arrivals += 1

    def _forget(self) -> None:
        oldest = self.arrivals - self.window  # grants made at or before this count fall out of the window
        while self._grants and self._grants[0] <= oldest:
            self._grants.popleft()

    def _has_room(self) -> bool:
        """Whether one more grant fits among the last ``window`` arrivals (the caller holds the lock)."""
        self._forget()
        return len(self._grants) + 1 <= self.fraction * min(self.arrivals, self.window)

    def available(self) -> bool:
        """Whether one more grant fits in the budget now (nothing is taken)."""
        with self._lock:
            return self._has_room()

    def try_grant(self) -> bool:
        """Take one grant if the budget has one; returns whether it did."""
        with self._lock:
            if not self._has_room():
                return False
            self._grants.append(self.arrivals)
            self.granted += 1
            return True

    def in_window(self) -> int:
        """Grants among the last ``window`` arrivals."""
        with self._lock:
            self._forget()
            return len(self._grants)
