"""``raml serve``: a query service over an index directory, with micro-batching, hot index swaps and a web page.

Data flow: upload bytes -> :mod:`~raml.deploy.service.decode` (limits, RGB) -> evaluation transform at the
query size -> :mod:`~raml.deploy.service.batching` (bounded queue, one worker: ``(B, 3, S, S)`` through the
student of :mod:`~raml.deploy.service.embedders` -> ``(B, D)``, searched in the index of
:mod:`~raml.deploy.service.live_index`) -> JSON from :mod:`~raml.deploy.service.app`.
:mod:`~raml.deploy.service.service` composes these without HTTP; :mod:`~raml.deploy.service.metrics` counts.
:mod:`~raml.deploy.service.admission` bounds the uploads and decodes in flight; :mod:`~raml.deploy.service.connections`
adds the header deadline and the connection cap to uvicorn's protocol; :mod:`~raml.deploy.service.hosts` says which
``Host`` and ``Origin`` a request may name (DNS rebinding). Starlette and uvicorn are optional
(``pip install raml[serve]``); only :mod:`~raml.deploy.service.app`, :mod:`~raml.deploy.service.connections`
and the CLI import them.
:mod:`~raml.deploy.service.adaptive_size` (with :mod:`~raml.deploy.service.size_controller`) chooses the query
size per batch for ``raml serve --latency-target-ms``.
"""

from __future__ import annotations

from raml.deploy.service.batching import MicroBatcher, QueryResult, QueueFullError
from raml.deploy.service.decode import QueryImageError, decode_query_image
from raml.deploy.service.embedders import OnnxQueryEmbedder, QueryEmbedder, TorchQueryEmbedder, allowed_query_sizes
from raml.deploy.service.live_index import LiveIndex
from raml.deploy.service.metrics import ServiceMetrics
from raml.deploy.service.service import SearchService, ServiceLimits

__all__ = [
    "LiveIndex",
    "MicroBatcher",
    "OnnxQueryEmbedder",
    "QueryEmbedder",
    "QueryImageError",
    "QueryResult",
    "QueueFullError",
    "SearchService",
    "ServiceLimits",
    "ServiceMetrics",
    "TorchQueryEmbedder",
    "allowed_query_sizes",
    "decode_query_image",
]
