"""The service's metrics in the Prometheus text exposition format (version 0.0.4), thread-safe.

Exposed series (``raml_`` prefix):

- ``raml_requests_total{route, status}`` counter: answered HTTP requests by route and status code;
- ``raml_request_seconds`` histogram: latency of ``POST /search`` requests, arrival to answer;
- ``raml_batch_size`` histogram: queries embedded together per forward pass;
- ``raml_queue_depth`` gauge: queries waiting for the batching worker; ``raml_uploads_in_flight`` and
  ``raml_decodes_in_flight`` gauges: request bodies being received and images being decoded (bounded by
  ``--max-uploads`` / ``--max-decodes``); ``raml_index_generation`` and ``raml_index_size`` gauges: the index
  being served.

A histogram's ``_bucket{le="x"}`` counts observations ``<= x`` (cumulative), ``le="+Inf"`` all of them.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Histogram", "ServiceMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Counts of observations per upper bound (``le``), their sum and count; not locked (see ServiceMetrics)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"Histogram bounds must be strictly increasing and non-empty, got {list(bounds)}.")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += float(value)
        self.count += 1

    def cumulative(self) -> list[int]:
        """Observations ``<= bound`` for each bound, then the total (``+Inf``)."""
        out, total = [], 0
        for count in self.counts:
            total += count
            out.append(total)
        return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class ServiceMetrics:
    """Counters and histograms of one service; ``render()`` gives the ``/metrics`` text.

    Args:
        gauges: Name (without prefix) -> (help text, callable read at render time).
    """

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._latency = Histogram(LATENCY_BUCKETS)
        self._batches = Histogram(BATCH_BUCKETS)
        self._gauges = dict(gauges or {})

    def record_request(self, route: str, status: int, seconds: float | None = None) -> None:
        """Count one answered request; ``seconds`` (search requests) goes into the latency histogram."""
        with self._lock:
            self._requests[(route, int(status))] += 1
            if seconds is not None:
                self._latency.observe(seconds)

    def record_batch(self, size: int) -> None:
        """Count one forward pass over ``size`` queries."""
        with self._lock:
            self._batches.observe(size)

    def request_count(self, route: str, status: int) -> int:
        """Requests answered on ``route`` with ``status`` so far."""
        with self._lock:
            return self._requests[(route, int(status))]

    def render(self) -> str:
        """The exposition text."""
        with self._lock:
            requests = sorted(self._requests.items())
            latency = (self._latency.bounds, self._latency.cumulative(), self._latency.sum, self._latency.count)
            batches = (self._batches.bounds, self._batches.cumulative(), self._batches.sum, self._batches.count)
        lines = [
            "# HELP raml_requests_total HTTP requests answered, by route and status code.",
            "# TYPE raml_requests_total counter",
        ]
        lines += [f'raml_requests_total{{route="{route}",status="{status}"}} {n}' for (route, status), n in requests]
        lines += _histogram_lines("raml_request_seconds", "Latency of POST /search requests in seconds.", *latency)
        lines += _histogram_lines("raml_batch_size", "Queries embedded together per forward pass.", *batches)
        for name, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP raml_{name} {help_text}", f"# TYPE raml_{name} gauge", f"raml_{name} {_number(read())}"]
        return "\n".join(lines) + "\n"


def _histogram_lines(
    name: str, help_text: str, bounds: Sequence[float], cumulative: Sequence[int], total: float, count: int
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(bounds, cumulative)]
    lines += [f'{name}_bucket{{le="+Inf"}} {cumulative[-1]}', f"{name}_sum {_number(total)}", f"{name}_count {count}"]
    return lines
