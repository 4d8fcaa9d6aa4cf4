"""The service's metrics, exposed through ``prometheus_client`` (one registry per service), thread-safe.

Exposed series (``raml_`` prefix; counters also get ``prometheus_client``'s ``_created`` series):

- ``raml_requests_total{route, status}`` counter: answered HTTP requests by route (``page``, ``search``, ``health``,
  ``metrics``, ``image``, or ``other`` for a path without a route) and status code (``499`` on ``search``: the
  client closed its connection before its answer; a query still waiting in the batching queue is then dropped);
- ``raml_request_seconds`` histogram: latency of ``POST /search`` requests, arrival to answer;
- ``raml_queries_total{size}`` counter: queries embedded, by the query size that answered (``?size=``, the
  default, or with ``--latency-target-ms`` the size chosen for its batch);
- ``raml_queue_seconds`` histogram: how long each query waited in the batching queue before its forward pass;
- ``raml_shed_total{reason}`` counter: requests refused with 503 to shed load, by the limit reached
  (``queue`` = ``--queue-size``, ``connections`` = ``--max-connections`` (a connection refused at once, before
  any request on it), ``uploads`` = ``--max-uploads``, ``decodes`` = ``--max-decodes``,
  ``decode_pixels`` = ``--max-decode-pixels``, ``queue_wait`` = a query's wait for its batch predicted over
  ``--max-queue-wait-ms``, refused before decoding; ``queue_wait_expired`` = admitted on the prediction, then found
  over the bound when its batch started; ``queue_wait_deferred`` = refused before decoding past saturation because
  the queries arriving later fill its batch, see :mod:`raml.deploy.service.arrival_profile`);
- ``raml_connection_refusals_total{status}`` counter: responses the connection layer wrote itself, before any
  request reached the application: ``503`` (``--max-connections``), ``408`` (request headers not complete within
  ``--header-timeout``), ``431`` (request headers too large, httptools front end);
- ``raml_late_answers_total`` counter: queries answered past their wait bound on the late-answer budget of a
  latency target (``--late-budget``) rather than refused, see :mod:`raml.deploy.service.late_budget`;
- ``raml_batch_size`` histogram: queries embedded together per forward pass;
- gauges given by the service, read at scrape time: ``raml_queue_depth``, ``raml_uploads_in_flight``,
  ``raml_decodes_in_flight``, ``raml_decode_pixels_in_flight``, ``raml_index_generation``, ``raml_index_size``;
  with ``--latency-target-ms`` also ``raml_query_size`` (the size in use for queries that pin none),
  ``raml_queue_delay_smoothed_seconds`` (the controller's smoothed queue delay) and ``raml_latency_target_seconds``.

A histogram's ``_bucket{le="x"}`` counts observations ``<= x`` (cumulative), ``le="+Inf"`` all of them; bounds
are written as floats (``le="1.0"``), as ``prometheus_client`` does.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS", "SHED_REASONS", "ServiceMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: the limit flag -> the ``reason`` label of ``raml_shed_total``
SHED_REASONS = {
    "--queue-size": "queue",
    "--max-uploads": "uploads",
    "--max-decodes": "decodes",
    "--max-decode-pixels": "decode_pixels",
    "--max-queue-wait-ms": "queue_wait",
    "--max-connections": "connections",
}


class ServiceMetrics:
    """Counters, histograms and gauges of one service in its own ``prometheus_client`` registry.

    Args:
        gauges: Name (without prefix) -> (help text, callable read at scrape time).
    """

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self._requests = Counter(
            "raml_requests", "HTTP requests answered, by route and status code.", ["route", "status"], registry=reg
        )
        self._latency = Histogram(
            "raml_request_seconds",
            "Latency of POST /search requests in seconds.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._queries = Counter(
            "raml_queries", "Queries embedded, by the query size that answered.", ["size"], registry=reg
        )
        self._queue = Histogram(
            "raml_queue_seconds",
            "Seconds a query waited in the batching queue before its forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._shed = Counter(
            "raml_shed", "Requests refused with 503 to shed load, by the limit reached.", ["reason"], registry=reg
        )
        self._late = Counter(
            "raml_late_answers",
            "Queries answered past their wait bound on the late-answer budget (--late-budget) rather than refused.",
            registry=reg,
        )
        self._connection_refusals = Counter(
            "raml_connection_refusals",
            "Responses the connection layer wrote itself before any request reached the application, by status "
            "(503: --max-connections; 408: --header-timeout; 431: request headers too large).",
            ["status"],
            registry=reg,
        )
        self._batches = Histogram(
            "raml_batch_size", "Queries embedded together per forward pass.", buckets=BATCH_BUCKETS, registry=reg
        )
        for name, (help_text, read) in sorted((gauges or {}).items()):
            Gauge(f"raml_{name}", help_text, registry=reg).set_function(read)

    def record_request(self, route: str, status: int, seconds: float | None = None) -> None:
        """Count one answered request; ``seconds`` (search requests) goes into the latency histogram."""
        self._requests.labels(route=route, status=str(int(status))).inc()
        if seconds is not None:
            self._latency.observe(seconds)

    def record_query(self, size: int, queue_seconds: float) -> None:
        """Count one embedded query at ``size`` and how long it waited in the queue."""
        self._queries.labels(size=str(int(size))).inc()
        self._queue.observe(queue_seconds)

    def record_shed(self, flag: str, expired: bool = False, deferred: bool = False) -> None:
        """Count one request refused with 503 because the limit set by ``flag`` was reached (``expired``: a query
        refused when its batch started, after it was decoded, rather than on its predicted wait; ``deferred``: refused
        before decoding because later arrivals fill its batch)."""
        reason = SHED_REASONS.get(flag, flag.lstrip("-") or "other")
        suffix = "_expired" if expired else "_deferred" if deferred else ""
        self._shed.labels(reason=reason + suffix).inc()

    def record_connection_refusal(self, status: int) -> None:
        """Count one response written by the connection layer (:func:`raml.deploy.service.connections.server_options`
        ``on_refusal``): a connection over ``--max-connections`` (503, also counted as shed, reason
        ``connections``), past ``--header-timeout`` (408), or with headers too large (431)."""
        self._connection_refusals.labels(status=str(int(status))).inc()
        if int(status) == 503:
            self.record_shed("--max-connections")

    def record_late(self) -> None:
        """Count one query answered on the late-answer budget."""
        self._late.inc()

    def record_batch(self, size: int) -> None:
        """Count one forward pass over ``size`` queries."""
        self._batches.observe(size)

    def request_count(self, route: str, status: int) -> int:
        """Requests answered on ``route`` with ``status`` so far."""
        value = self.registry.get_sample_value("raml_requests_total", {"route": route, "status": str(int(status))})
        return int(value or 0)

    def render(self) -> str:
        """The exposition text (``prometheus_client.generate_latest``)."""
        return generate_latest(self.registry).decode("utf-8")
