"""The query service without HTTP: a query network, the live index, the micro-batcher and the metrics.

Contract: :meth:`SearchService.prepare` turns untrusted upload bytes into a ``(3, S, S)`` query at an allowed
size S (or raises :class:`~raml.deploy.service.decode.QueryImageError` / ``ValueError``);
:meth:`SearchService.submit` queues it for the ``k`` nearest images of the served index (a future of a
:class:`~raml.deploy.service.batching.QueryResult`); :meth:`SearchService.health` describes what is served.

With a latency target (``latency_target_ms``, a network trained for several query sizes), a query whose request
pins no size is transformed once, at the size in use when it is decoded (:attr:`AdaptiveQuerySize.current`, which
the batcher updates as it forms batches, :mod:`raml.deploy.service.adaptive_size`), and served at that size; the
result says which size answered. :meth:`SearchService.start` then first times a full batch at each size
(:meth:`SearchService.calibrate`), so that the queue's wait bound holds from the first query on.
The HTTP layer (:mod:`raml.deploy.service.app`) only parses requests and formats answers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from raml.data.image_limits import DEFAULT_MAX_PIXELS, resized_size
from raml.deploy.search import check_query_dim, warn_if_other_teacher
from raml.deploy.service.adaptive_size import AdaptiveQuerySize
from raml.deploy.service.admission import Slots
from raml.deploy.service.batching import MicroBatcher, QueueFullError
from raml.deploy.service.decode import decode_opened_image
from raml.deploy.service.embedders import QueryEmbedder
from raml.deploy.service.late_budget import LateBudget
from raml.deploy.service.live_index import LiveIndex
from raml.deploy.service.metrics import ServiceMetrics
from raml.deploy.service.shown_paths import DatabaseRoots, shown_name
from raml.deploy.service.size_controller import ControllerSettings
from raml.deploy.store import DatabaseIndex

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_K", "ServiceLimits", "SearchService"]

#: results per query of the calibration's searches (:meth:`SearchService.calibrate`): an omitted k's default
CALIBRATION_K = 10


@dataclass(frozen=True)
class ServiceLimits:
    """Batching, load-shedding and input limits of a service.

    Attributes:
        max_batch: Most queries embedded in one forward pass (1 = no batching).
        max_wait_ms: Longest wait for more queries once a batch has its first one.
        queue_size: Most queries waiting for the worker; more get 503.
        max_queue_wait_ms: Longest predicted (and actual) wait of a query for its batch to start; more gets 503
            (None: ``max_wait_ms`` plus one full batch's measured service time, see
            :class:`~raml.deploy.service.batching.MicroBatcher`;
            with a latency target, what the target leaves at the size in use, see
            :func:`~raml.deploy.service.size_controller.queue_wait_bound_ms`).
        max_bytes: Largest accepted request body; larger gets 413.
        max_pixels: Largest accepted image (width x height, read from the header before decoding); larger gets 413.
        max_k: Largest k a request may ask for.
        poll_interval_s: Seconds between checks for a new index generation.
        max_uploads: Most request bodies being received at once; more get 503 at once (before being read).
        max_decodes: Most images being decoded and transformed at once; more get 503 at once (before decoding).
        max_decode_pixels: Most pixels (width x height from the headers) of the images being decoded and
            transformed at once; an image that does not fit gets 503 before decoding (one image is always
            admitted when none is being decoded). About 7 bytes of memory per pixel.
        header_timeout_s: Seconds a connection has to deliver complete request headers; then 408 and closed.
        body_timeout_s: Seconds a request has to deliver its whole body once its handler reads it; then 408.
        max_connections: Most connections open at once; more get 503 and are closed.
        queue_wait_counts_front_end: Take the front end's measured p90 (receiving, decoding, writing the answer)
            off the default queue-wait bound (``MicroBatcher(count_front_end=...)``); off by default.
        defer_early_arrivals: While overloaded, refuse a query when later arrivals fill its batch anyway
            (``MicroBatcher(defer_early_arrivals=...)``; a fixed query size only); off by default.
        overload_margin: While overloaded, take the answer's measured tail (front end, forward-pass overruns) off
            the default queue-wait bound (``MicroBatcher(overload_margin=...)``; a fixed query size only); on by
            default.
        late_budget: With a latency target and the derived queue-wait bound: the share of queries (0 to 0.1) that
            may be answered past their wait bound, within one more full batch, rather than refused when no trained
            size admits them in time (:mod:`raml.deploy.service.late_budget`, e.g. 0.005); 0 (the default): refuse
            them. Off by default: in three alternated runs at 2x saturation it answered 12-15 queries late but
            still refused 10-26, and the p99 rose over the target (issue 20).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 256
    max_queue_wait_ms: float | None = None
    max_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_k: int = 100
    poll_interval_s: float = 1.0
    max_uploads: int = 32
    max_decodes: int = 16
    max_decode_pixels: int = 64_000_000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256
    queue_wait_counts_front_end: bool = False
    defer_early_arrivals: bool = False
    overload_margin: bool = True
    late_budget: float = 0.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        counts = ("max_batch", "queue_size", "max_bytes", "max_pixels", "max_k", "max_uploads", "max_decodes")
        for name in (*counts, "max_decode_pixels", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_queue_wait_ms is not None and not self.max_queue_wait_ms > 0:
            raise ValueError(f"max_queue_wait_ms must be positive (or None), got {self.max_queue_wait_ms!r}.")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be zero or positive, got {self.max_wait_ms!r}.")
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {self.poll_interval_s!r}.")
        if not 0 <= self.late_budget <= 0.1:
            raise ValueError(
                f"late_budget is a share of the queries from 0 (off) to 0.1, e.g. 0.005; got {self.late_budget!r}."
            )


class SearchService:
    """Serve top-k searches of the index in ``index_dir`` for queries embedded by ``embedder``.

    Args:
        embedder: The query network (the student).
        index_dir: The index directory built by ``raml index`` (new generations are picked up).
        limits: Batching and input limits.
        latency_target_ms: The p99 latency to keep (ms) by choosing the query size per batch among the network's
            trained sizes; None: every query at the size it asks for, else the default size.
        up_fraction: With a latency target: a larger size is taken only when predicted within this share of it.

    Raises:
        IndexDirectoryError: If ``index_dir`` holds no index.
        ValueError: If the query network's output dimension differs from the index's, or a latency target is
            given for a network that serves a single query size.
    """

    def __init__(
        self,
        embedder: QueryEmbedder,
        index_dir: Any,
        limits: ServiceLimits | None = None,
        latency_target_ms: float | None = None,
        up_fraction: float = 0.7,
    ) -> None:
        self.embedder = embedder
        self.limits = limits or ServiceLimits()
        refused = [size for size in embedder.sizes if resized_size(1, 1, size)[0] ** 2 > self.limits.max_pixels]
        if refused:  # a square image, the smallest any upload is resized to, already over the limit: refuse them all
            side = resized_size(1, 1, max(refused))[0]
            raise ValueError(
                f"--max-pixels {self.limits.max_pixels} is below what even a square query image is resized to at "
                f"query size {max(refused)} ({side}x{side} = {side * side} pixels): every upload would be refused "
                f"(413). Give --max-pixels {side * side} or more."
            )
        self.adaptive: AdaptiveQuerySize | None = None
        if latency_target_ms is not None:
            sizes = tuple(sorted(embedder.sizes))
            if len(sizes) < 2:
                raise ValueError(
                    f"--latency-target-ms needs a query network trained for several query sizes (meta "
                    f"'image_sizes', e.g. `raml train --image-size 24,32,48`); this one serves {sizes[0]} px only. "
                    "Serve a multi-size student, or drop --latency-target-ms."
                )
            self.adaptive = AdaptiveQuerySize(
                ControllerSettings(float(latency_target_ms), sizes, up_fraction), full_batch=self.limits.max_batch
            )
        gauges = {}
        if self.adaptive is not None:
            adaptive = self.adaptive
            gauges = {
                "query_size": (
                    "Query size in use for unpinned queries (--latency-target-ms).",
                    lambda: adaptive.current,
                ),
                "queue_delay_smoothed_seconds": (
                    "Smoothed wait of each batch's oldest query, the controller's queue delay.",
                    lambda: adaptive.load.queue_delay_ms / 1000.0,
                ),
                "latency_target_seconds": (
                    "The latency target (--latency-target-ms).",
                    lambda: adaptive.settings.target_ms / 1000.0,
                ),
            }
        self.roots = DatabaseRoots()  # before the first index is accepted
        self.index = LiveIndex(index_dir, accept=self._accept, poll_interval_s=self.limits.poll_interval_s)
        self.transforms = {size: embedder.transform(size) for size in embedder.sizes}
        self.metrics = ServiceMetrics(
            {
                "queue_depth": ("Queries waiting for the batching worker.", lambda: self.batcher.depth),
                "index_generation": ("Generation of the index being served.", lambda: self.index.current.generation),
                "index_size": ("Images in the index being served.", lambda: len(self.index.current)),
                "uploads_in_flight": ("Request bodies being received (--max-uploads).", lambda: self.uploads.held),
                "decodes_in_flight": ("Images being decoded (--max-decodes).", lambda: self.decodes.held),
                "decode_pixels_in_flight": (
                    "Pixels of the images being decoded (--max-decode-pixels).",
                    lambda: self.decode_pixels.held,
                ),
                "queue_wait_bound_seconds": (
                    "The bound in force on a query's wait for its batch (NaN: none yet).",
                    lambda: _or_nan(self.batcher.queue_wait_bound_s),
                ),
                "front_end_p90_seconds": (
                    "p90 of the last answered queries' time outside their batch, taken off the default bound with "
                    "--queue-wait-counts-front-end (NaN: none yet).",
                    lambda: _or_nan(self.batcher.front_end.value),
                ),
                "overload_margin_seconds": (
                    "What the default queue-wait bound loses while overloaded: the front end's p90 and twice the "
                    "forward passes' overrun p90 (0: not overloaded, or --no-overload-margin).",
                    lambda: self.batcher.overload_margin_s(),
                ),
                **gauges,
            }
        )
        self.batcher = MicroBatcher(
            embedder.embed,
            lambda: self.index.current,
            max_batch=self.limits.max_batch,
            max_wait_s=self.limits.max_wait_ms / 1000.0,
            queue_size=self.limits.queue_size,
            on_batch=self.metrics.record_batch,
            arriving=lambda: self._arriving,
            max_queue_wait_s=self._queue_wait_bound_s(),
            sizer=self.adaptive,
            count_front_end=self.limits.queue_wait_counts_front_end,
            defer_early_arrivals=self.limits.defer_early_arrivals,
            overload_margin=self.limits.overload_margin,
            late_budget=self._late_budget(),
        )
        self._arriving = 0  # requests between the end of their body and the submission of their query
        self._arriving_lock = threading.Lock()
        self.uploads = Slots(self.limits.max_uploads, "request bodies being received", "--max-uploads")
        self.decodes = Slots(self.limits.max_decodes, "images being decoded", "--max-decodes")
        self.decode_pixels = Slots(self.limits.max_decode_pixels, "pixels being decoded", "--max-decode-pixels")

    def _queue_wait_bound_s(self) -> float | None:
        """The batcher's bound on a query's wait (s): ``max_queue_wait_ms`` when given, else None: the batcher's
        default (with a latency target, the sizer's bound at the size in use)."""
        if self.limits.max_queue_wait_ms is not None:
            return self.limits.max_queue_wait_ms / 1000.0
        return None

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap decoding and submitting one query whose body has arrived in full: the batcher waits for such
        queries only (an upload still being received, perhaps stalled, never holds a batch back).

        Raises:
            QueueFullError: Before anything is decoded, when the queries queued and those already on their way
                (being decoded) fill ``queue_size``: a query that the queue could not take costs no decode.
                :meth:`submit` still refuses a query the queue cannot take.
        """
        with self._arriving_lock:
            try:
                self.batcher.check_room(on_the_way=self._arriving)
            except QueueFullError:
                if self.adaptive is not None:
                    self.adaptive.arrived()  # offered load: counted also when the queue is full (as in submit)
                raise
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def _accept(self, index: DatabaseIndex) -> None:
        check_query_dim(self.embedder.output_dim, index)
        warn_if_other_teacher(self.embedder.teacher_sha256, index)
        self.roots.root(index)  # here (start, or the watcher thread), not on the event loop of a search

    def shown_path(self, index: DatabaseIndex, image_id: int) -> str:
        """The path of database image ``image_id`` of ``index`` as a client is shown it: relative to the folder
        holding the generation's images, never absolute (:mod:`raml.deploy.service.shown_paths`)."""
        return self.roots.shown(index, image_id)

    def start(self) -> None:
        """Start the batching worker and the index watcher; with a latency target, first calibrate the sizer
        (:meth:`calibrate`): the worker takes no query, and ``/health`` says not ready, until every size is
        measured."""
        if self.adaptive is not None and not self.batcher.running:
            self.calibrate()
        self.batcher.start()
        self.index.start()

    def calibrate(self) -> dict[int, float]:
        """Time a full batch at each trained size the sizer has not measured yet, smallest first, and give it to
        the sizer as the batching worker gives it a served batch (``observe(size, max_batch, seconds)``, leaving
        the smoothed batch size, which describes the load, alone), so that
        its predictions and the queue's wait bound hold from the first query on (see
        :mod:`~raml.deploy.service.adaptive_size`). Each batch is ``max_batch`` images of zeros in the transform's
        output shape, through the embedder and a search of the current index (``CALIBRATION_K`` results): what the
        worker times for a batch. It runs once untimed first (the first call of a recorded graph is slower). A
        size whose batch takes longer than the latency target ends the calibration: the larger sizes are left to
        traffic (until then estimated from the smaller ones by the pixel count). A failing batch is logged and
        ends it too (the service starts as without one). Without a latency target: nothing (an empty dict).

        Returns:
            The seconds of each size's timed batch.
        """
        adaptive = self.adaptive
        if adaptive is None:
            return {}
        index = self.index.current
        queries = self.limits.max_batch
        k = min(CALIBRATION_K, self.limits.max_k)
        cap_s = adaptive.settings.target_ms / 1000.0
        timed: dict[int, float] = {}
        stopped = ""
        for size in adaptive.settings.sizes:
            if adaptive.has_measured(size):
                continue
            side = self.transforms[size].size
            try:
                self._calibration_batch(index, queries, side, k)  # warm-up
                started = time.perf_counter()
                self._calibration_batch(index, queries, side, k)
                seconds = time.perf_counter() - started
            except Exception:
                logger.warning(
                    "Calibrating the latency target's sizer failed at %d px; that size and the larger ones are "
                    "measured from traffic",
                    size,
                    exc_info=True,
                )
                break
            adaptive.observe(size, queries, seconds, traffic=False)  # not a batch of the load: its size is not
            timed[size] = seconds
            if seconds > cap_s:
                larger = [s for s in adaptive.settings.sizes if s > size]
                if larger:
                    stopped = (
                        f"; stopped after {size} px, whose batch took longer than the target of "
                        f"{adaptive.settings.target_ms:.0f} ms: {', '.join(map(str, larger))} px measured from traffic"
                    )
                break
        if timed:
            logger.info(
                "Latency target: a full batch of %d queries (forward pass and search) takes %s%s",
                queries,
                ", ".join(f"{1000 * seconds:.1f} ms at {size} px" for size, seconds in timed.items()),
                stopped,
            )
        return timed

    def _calibration_batch(self, index: DatabaseIndex, queries: int, side: int, k: int) -> None:
        """One synthetic batch of ``queries`` zero images ``(3, side, side)``: stacked, embedded and searched as
        the batching worker does a batch of one size and one k."""
        images = torch.stack([torch.zeros(3, side, side) for _ in range(queries)])
        index.search(self.embedder.embed(images), k)

    def stop(self) -> None:
        """Finish the queued queries, then stop both threads."""
        self.index.stop()
        self.batcher.stop()

    def query_size(self, requested: int | None) -> int | None:
        """The query size to use: ``requested`` if it is served; when None, the default, or None with a latency
        target (the size is chosen when the query's batch is formed).

        Raises:
            ValueError: If ``requested`` is not one of the served sizes (the message lists them).
        """
        if requested is None:
            return None if self.adaptive is not None else self.embedder.default_size
        if requested not in self.embedder.sizes:
            raise ValueError(
                f"size={requested} is not served; allowed query sizes: {', '.join(map(str, self.embedder.sizes))}."
            )
        return requested

    def prepare(self, image: Image.Image, size: int | None) -> torch.Tensor:
        """Decode an upload opened by :func:`~raml.deploy.service.decode.open_query_image` (within ``max_pixels``,
        before and after the resize) and transform it to ``(3, size, size)``, holding its pixels (read from the
        header) in the :attr:`decode_pixels` budget; the caller holds a :attr:`decodes` slot. ``size`` None (a
        latency target, no size pinned): at the size in use now (:attr:`AdaptiveQuerySize.current`).

        Raises:
            QueryImageError: With the HTTP status to answer (see :mod:`raml.deploy.service.decode`).
            ServiceBusyError: When the image's pixels do not fit in the budget (503).
        """
        if size is None:
            if self.adaptive is None:
                image.close()
                raise ValueError("A query without a size needs a latency target; give its size.")
            size = self.adaptive.current
        return decode_opened_image(
            image, self.limits.max_pixels, size, admit=self.decode_pixels.take, finish=self.transforms[size]
        )

    def submit(self, image: torch.Tensor, size: int | None, k: int) -> Future:
        """Queue a prepared query (``size`` None: chosen by the latency target, read from the tensor's shape);
        raises ``QueueFullError`` when the queue is full, ``QueueWaitError`` when its predicted wait exceeds the
        bound."""
        if self.adaptive is not None:
            self.adaptive.arrived()  # offered load: counted also when the queue is full
        return self.batcher.submit(image, int(image.shape[-1]) if size is None else size, k)

    def _late_budget(self) -> LateBudget | None:
        """The late-answer budget: with a latency target and a share above 0 (the batcher drops it where an
        operator's ``--max-queue-wait-ms`` replaces the derived bound)."""
        if self.adaptive is None or self.limits.late_budget <= 0:
            return None
        return LateBudget(self.limits.late_budget, window=max(2000, math.ceil(1 / self.limits.late_budget)))

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` reports: no absolute server-side path (the index directory and the networks' files
        by their names)."""
        index = self.index.current
        query = dict(self.embedder.describe())
        if query.get("path") is not None:
            query["path"] = shown_name(query["path"])
        return {
            "ready": self.batcher.running,
            "index": {
                "name": index.directory.name,
                "size": index.live_count,  # images served; removed ids (tombstones) counted apart
                "removed": len(index) - index.live_count,
                "generation": index.generation,
                "index_type": index.meta.get("index_type"),
                "dim": index.dim,
            },
            "networks": {
                "query": query,
                "database": {
                    "path": shown_name(index.meta.get("network", {}).get("path")),
                    "sha256": index.network_sha256,
                    "image_size": index.meta.get("image_size"),
                },
            },
            "query_sizes": list(self.embedder.sizes),
            "default_query_size": self.embedder.default_size,
            "adaptive": self.adaptive.describe() if self.adaptive is not None else None,
            "batching": {
                "max_batch": self.limits.max_batch,
                "max_wait_ms": self.limits.max_wait_ms,
                "queue_size": self.limits.queue_size,
                "queue_depth": self.batcher.depth,
            },
            "limits": {
                "max_uploads": self.limits.max_uploads,
                "max_decodes": self.limits.max_decodes,
                "max_decode_pixels": self.limits.max_decode_pixels,
                "max_connections": self.limits.max_connections,
                "header_timeout_s": self.limits.header_timeout_s,
                "body_timeout_s": self.limits.body_timeout_s,
                "max_bytes": self.limits.max_bytes,
                "max_pixels": self.limits.max_pixels,
                "max_k": self.limits.max_k,
            },
        }


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
