"""The HTTP API of ``raml serve``: a Starlette (ASGI) application over a :class:`SearchService`.

Routes:

- ``GET /``: the web page (``web/index.html``: choose or drop a query image, see the top-k thumbnails);
- ``POST /search?k=K&size=S`` (``k`` omitted: ``DEFAULT_K``, or ``max_k`` where that is smaller): the image as
  multipart form data (field ``image``) or as the raw body with an ``image/*`` content type -> ``{"k", "size",
  "size_chosen_by", "generation", "batch_size", "results": [{"rank", "id", "path", "label", "score"}, ...],
  "timings_ms": {"read", "decode", "queue", "embed", "search", "total"}}``
  (``size``: the query size that answered; ``size_chosen_by``: ``"request"`` (``size=``), ``"default"`` (the
  network's default size) or ``"latency_target"`` (``raml serve --latency-target-ms``: the size of its batch))
  (``label`` is null where the index has none; ``path`` is relative to the folder holding the served generation's
  images, never an absolute server path: :mod:`raml.deploy.service.shown_paths`). Errors are ``{"error": message}``
  with status 400 (bad k or size, truncated or corrupt image, bad form), 408 (the body did not arrive within
  ``body_timeout_s``; the connection is closed), 413 (body over ``max_bytes``; image, or the image resized to the
  query size, over ``max_pixels``), 415 (not an image, or a body that is neither multipart nor ``image/*``), 503 with
  ``Retry-After`` (``max_uploads`` bodies being received, ``max_decodes`` images being decoded: refused before the
  body is read; the batching queue full (the queries queued and those being decoded fill ``--queue-size``), or a
  query's predicted wait for its batch over ``--max-queue-wait-ms``: refused before the image is decoded). A client
  that closes its connection before its answer is counted as 499 (nothing is sent); its query, if still queued, is
  dropped unembedded;
- ``GET /health``: :meth:`SearchService.health`;
- ``GET /metrics``: Prometheus text from ``prometheus_client`` (:mod:`raml.deploy.service.metrics`);
- ``GET /image/{id}``: the database image with that index id, for display (no path is ever taken from a
  request; an id that is not 1 to 18 digits, and ids outside the served index, get 404, and so does a file that
  does not start like an image of :mod:`raml.deploy.service.image_types`, whatever the index's path list names;
  the type is sent with ``X-Content-Type-Options: nosniff``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from raml.deploy.service.admission import QueueWaitError, ServiceBusyError
from raml.deploy.service.batching import QueryResult, QueueFullError
from raml.deploy.service.decode import DEFAULT_INLINE_DECODE_PIXELS, QueryImageError, open_query_image
from raml.deploy.service.hosts import HostRules, parse_host_header
from raml.deploy.service.image_types import SNIFF_BYTES, image_media_type
from raml.deploy.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from raml.deploy.service.metrics import ServiceMetrics
from raml.deploy.service.service import SearchService

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CLIENT_GONE_STATUS",
    "DEFAULT_K",
    "RETRY_AFTER_S",
    "create_app",
    "ServiceApp",
    "read_limited_body",
    "route_label",
]

DEFAULT_K = 10
RETRY_AFTER_S = 1
_FORM_FIELD = "image"
#: an image id of ``GET /image/{id}``: at most 18 digits (below 2**63); anything else is 404 without a conversion
_IMAGE_ID = re.compile(r"[0-9]{1,18}")


def _page() -> str:
    return importlib.resources.files("raml.deploy.service").joinpath("web/index.html").read_text(encoding="utf-8")


async def read_limited_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``max_bytes`` (announced or streamed), and with
    408 when it has not arrived in full within ``timeout_s`` seconds (None: no deadline)."""
    announced = request.headers.get("content-length")
    too_large = QueryImageError(
        413, f"The request body is over this service's limit of {max_bytes} bytes (--max-bytes); send a smaller file."
    )
    if announced is not None and announced.isdigit() and int(announced) > max_bytes:
        raise too_large
    chunks, total = [], 0

    async def read() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise too_large
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            await read()
    except TimeoutError:
        raise QueryImageError(
            408,
            f"The request body did not arrive in full within {timeout_s:g} s (--body-timeout; {total} bytes "
            "received); the connection is closed.",
        ) from None
    except ClientDisconnect:
        raise QueryImageError(400, "The client closed the connection before sending the whole body.") from None
    return b"".join(chunks)


async def _upload_bytes(request: Request, body: bytes) -> bytes:
    """The image bytes of a multipart body (field ``image``) or a raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return body
    if content_type != "multipart/form-data":
        raise QueryImageError(
            415,
            f"Send the image as multipart form data (field {_FORM_FIELD!r}) or as the raw body with an image/* "
            f"content type, not {content_type or 'no content type'!r}.",
        )

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        replayed = Request(request.scope, receive=replay)
        form = await replayed.form(max_files=1, max_fields=16, max_part_size=max(1, len(body)))
    except (MultiPartException, HTTPException) as error:
        detail = getattr(error, "detail", error)
        raise QueryImageError(400, f"The multipart form could not be parsed: {detail}.") from None
    try:
        upload = form.get(_FORM_FIELD)
        if not isinstance(upload, UploadFile):
            raise QueryImageError(400, f"The form has no file field {_FORM_FIELD!r}; send the image in that field.")
        return await upload.read()
    finally:
        await form.close()


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise QueryImageError(400, f"{name}={text!r} is not an integer; give one between {low} and {high}.") from None
    if not low <= value <= high:
        raise QueryImageError(400, f"{name}={value} is out of range; give {name} between {low} and {high}.")
    return value


#: the ``route`` label of ``raml_requests_total`` for a path; every other path is ``other`` (a bounded label set)
_ROUTE_LABELS = {"/": "page", "/search": "search", "/health": "health", "/metrics": "metrics"}
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_ROUTES_TEXT = "GET /, POST /search, GET /health, GET /metrics and GET /image/ID"


def route_label(path: str) -> str:
    """The ``route`` label a request to ``path`` is counted under: one of the routes' names, or ``other``."""
    if path.startswith("/image/") and "/" not in path[len("/image/") :]:
        return "image"
    return _ROUTE_LABELS.get(path, "other")


def _shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message, cut at ``limit`` characters (a request's path can be long)."""
    return text if len(text) <= limit else text[:limit] + "..."


class ServiceApp:
    """The ASGI application of :func:`create_app`, around Starlette's. A request whose ``Host`` the service does not
    answer to gets 421, a cross-origin POST 403, before Starlette sees either (:class:`HostRules`). An unexpected
    exception that Starlette's ``ServerErrorMiddleware`` answered (the JSON 500 of :func:`create_app`'s handler,
    which logs it) and then raised again, for a server to log, ends here, so that it is logged once; one raised
    before an answer (the handler itself failed) gets a JSON 500."""

    def __init__(self, app: Starlette, metrics: ServiceMetrics, hosts: HostRules) -> None:
        self.app = app
        self.metrics = metrics
        self.hosts = hosts

    def _refusal(self, scope: dict[str, Any]) -> JSONResponse | None:
        """The answer to a request whose ``Host`` is not allowed (421), or a cross-origin POST (403); else None."""
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.hosts.allows_host(host):
            parsed = parse_host_header(host or "")
            allowed = ", ".join(self.hosts.describe())
            how = (
                f"if clients reach the service by that name, start raml serve with --allowed-host {_shown(parsed[0])}"
                if parsed is not None
                else "send the service's own name"
            )
            message = (
                f"Host {_shown(host or '')!r} is not a name this service answers to (allowed: {allowed}; any port): "
                f"a request naming another host may come from a web page through DNS rebinding; {how}."
            )
            return JSONResponse({"error": message}, status_code=421, headers={"Connection": "close"})
        origin = headers.get("origin")
        if scope.get("method") not in _SAFE_METHODS and origin is not None and not self.hosts.same_origin(origin, host):
            message = (
                f"Origin {_shown(origin)!r} is not this service's own ({_shown(host or '')!r}): a web page of another "
                "origin may not send it requests; use the service's own page, or a client that is no browser."
            )
            if self.hosts.port_dropped(origin, host):
                message += (
                    " The Host has no port while the Origin has one: a reverse proxy may have dropped the port from "
                    "Host; have it pass the client's Host as sent (nginx: proxy_set_header Host $http_host; not $host)."
                )
            return JSONResponse({"error": message}, status_code=403, headers={"Connection": "close"})
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            self.metrics.record_request(route_label(scope.get("path", "")), refusal.status_code)
            await refusal(scope, receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                return  # answered with a JSON 500 and logged by the application's handler
            logger.exception("The error handler of %s %s failed", scope.get("method"), _shown(scope.get("path", "")))
            response = JSONResponse({"error": "Internal error; see the service's log."}, status_code=500)
            self.metrics.record_request(route_label(scope.get("path", "")), 500)
            await response(scope, receive, send)


#: the status a search whose client closed the connection before its answer is counted under (nginx's "client
#: closed request"; nothing is sent, the connection being gone)
CLIENT_GONE_STATUS = 499


async def _client_gone(request: Request) -> None:
    """Return once the client has closed the connection (``http.disconnect``); called only after the whole body was
    read, so that no body message is taken from the request."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer_or_gone(request: Request, future: Future) -> tuple[QueryResult | None, bool]:
    """The query's answer, and whether its client closed the connection before it came. A query whose client
    leaves while it still waits in the batching queue is dropped (its future cancelled: the batcher skips it; no
    forward pass, no search) and its answer is None; one whose batch had started is awaited (its answer counts as
    an embedded query), and nothing is sent."""
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    left = gone.done() and not gone.cancelled() and gone.exception() is None
    if left and not answer.done() and future.cancel():
        logger.debug("A client closed its connection while its query was queued; the query is dropped")
        return None, True
    return await answer, left


def _open_and_prepare(service: SearchService, data: bytes, size: int | None) -> torch.Tensor:
    """Identify, decode and transform an upload in one go (in a worker thread, ``inline_decode_pixels`` 0)."""
    return service.prepare(open_query_image(data), size)


def create_app(
    service: SearchService, inline_decode_pixels: int = DEFAULT_INLINE_DECODE_PIXELS, hosts: HostRules | None = None
) -> ServiceApp:
    """The ASGI application; its lifespan starts and stops ``service``'s threads.

    Args:
        service: The search service.
        hosts: The ``Host`` names answered (others get 421) and the ``Origin`` check of POSTs (403); default: the
            loopback names only (:class:`~raml.deploy.service.hosts.HostRules`).
        inline_decode_pixels: An image whose header announces at most this many pixels is decoded and transformed
            on the event loop itself; larger ones in a worker thread (0: every image in a thread). For a small image
            the hop to a thread (and the wait for the GIL behind a busy loop) costs more than the decoding.
    """
    if isinstance(inline_decode_pixels, bool) or not isinstance(inline_decode_pixels, int) or inline_decode_pixels < 0:
        raise ValueError(f"inline_decode_pixels must be an integer >= 0, got {inline_decode_pixels!r}.")
    page = _page()
    metrics = service.metrics

    def answer(route: str, response: Response, started: float | None = None) -> Response:
        seconds = time.perf_counter() - started if started is not None else None
        metrics.record_request(route, response.status_code, seconds)
        return response

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def search(request: Request) -> Response:
        started = time.perf_counter()
        body_read = False  # a refusal before the whole body was read closes the connection (Connection: close)
        try:
            max_k = service.limits.max_k
            k = _int_param(request, "k", min(DEFAULT_K, max_k), 1, max_k)  # an omitted k is bounded by --max-k too
            requested = _int_param(request, "size", None, 1, 1 << 16)
            try:
                size = service.query_size(requested)
            except ValueError as refused:
                raise QueryImageError(400, str(refused)) from None
            # admission before anything is buffered or decoded: beyond the limits, 503 at once
            with service.uploads.take():
                body = await read_limited_body(request, service.limits.max_bytes, service.limits.body_timeout_s)
                body_read = True
                data = await _upload_bytes(request, body)
            del body
            read_done = time.perf_counter()
            # the predicted wait for a batch (--max-queue-wait-ms), before decoding; after the body is read, since a
            # response before it would break the client's keep-alive connection while it still sends
            service.batcher.check_admission(step_down=requested is None)  # a pinned size stays
            with service.decodes.take(), service.arriving():  # only a query with its whole body holds a batch
                if inline_decode_pixels:
                    opened = open_query_image(data)  # the header only: where to decode, from its pixel count
                    if opened.width * opened.height <= inline_decode_pixels:
                        image = service.prepare(opened, size)  # small: cheaper here than a hop to a thread
                    else:
                        image = await run_in_threadpool(service.prepare, opened, size)
                else:
                    image = await run_in_threadpool(_open_and_prepare, service, data, size)
                del data
                decoded = time.perf_counter()
                future = service.submit(image, size, int(k))
            result, left = await _answer_or_gone(request, future)
            if left:  # the client closed its connection: counted as such, whether or not its query was dropped
                if result is not None:
                    metrics.record_query(result.size, result.queue_s)
                return answer("search", Response(status_code=CLIENT_GONE_STATUS), started)
            # the time outside the batch (receiving, decoding, and the loop's delay in taking the answer up): the
            # default queue-wait bound leaves room for it
            service.batcher.observe_front_end((decoded - started) + (time.perf_counter() - result.finished))
        except QueryImageError as refused:
            headers = {"Connection": "close"} if refused.status == 408 or not body_read else None
            return answer("search", error(refused.status, str(refused), headers), started)
        except (QueueFullError, ServiceBusyError) as busy:
            expired = isinstance(busy, QueueWaitError) and busy.expired
            deferred = isinstance(busy, QueueWaitError) and busy.deferred
            metrics.record_shed(busy.flag if isinstance(busy, ServiceBusyError) else "--queue-size", expired, deferred)
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            if not body_read:
                headers["Connection"] = "close"
            return answer("search", error(503, str(busy), headers), started)
        except Exception:
            logger.exception("Search failed")
            return answer("search", error(500, "The search failed; see the service's log."), started)
        metrics.record_query(result.size, result.queue_s)
        if result.late:
            metrics.record_late()
        index = result.index
        hits = [
            {
                "rank": rank,
                "id": int(i),
                "path": service.shown_path(index, int(i)),
                "label": int(index.labels[int(i)]) if int(index.labels[int(i)]) >= 0 else None,
                "score": float(s),
            }
            for rank, (i, s) in enumerate(zip(result.ids, result.scores), start=1)
        ]
        chosen_by = "request" if requested is not None else "default" if size is not None else "latency_target"
        total = time.perf_counter() - started
        timings = {
            "read": read_done - started,
            "decode": decoded - read_done,
            "queue": result.queue_s,
            "embed": result.embed_s,
            "search": result.search_s,
            "total": total,
        }
        payload = {
            "k": k,
            "size": result.size,
            "size_chosen_by": chosen_by,
            "generation": index.generation,
            "batch_size": result.batch_size,
            "late": result.late,
            "results": hits,
            "timings_ms": {name: round(1000.0 * value, 3) for name, value in timings.items()},
        }
        return answer("search", JSONResponse(payload), started)

    async def health(request: Request) -> Response:
        return answer("health", JSONResponse(service.health()))

    async def metrics_text(request: Request) -> Response:
        return answer("metrics", Response(metrics.render(), media_type=METRICS_CONTENT_TYPE))

    async def image(request: Request) -> Response:
        index = service.index.current
        text = request.path_params["image_id"]
        if _IMAGE_ID.fullmatch(text) is None:  # never int() of an unbounded string (a 5,000-digit id was a 500)
            return answer(
                "image", error(404, f"No image {_shown(text, 24)!r}: ids are integers from 0 to {len(index) - 1}.")
            )
        image_id = int(text)
        if not 0 <= image_id < len(index):
            return answer("image", error(404, f"No image {image_id}: the index holds ids 0 to {len(index) - 1}."))
        if index.is_removed(image_id):
            return answer("image", error(404, f"Image {image_id} was removed from the index (ids are never reused)."))
        path = Path(index.paths[image_id])
        if not path.is_file():
            return answer("image", error(404, f"Image {image_id} is missing on the server's disk."))
        try:
            with path.open("rb") as f:
                media_type = image_media_type(f.read(SNIFF_BYTES))
        except OSError:
            media_type = None
        if media_type is None:  # never send a file that is not an image, whatever the index lists
            return answer("image", error(404, f"Image {image_id} is not an image file this service sends."))
        headers = {"X-Content-Type-Options": "nosniff"}
        return answer("image", FileResponse(path, media_type=media_type, headers=headers))

    async def home(request: Request) -> Response:
        return answer("page", HTMLResponse(page))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own refusals (no route: 404; a method the route does not take: 405) as JSON, counted."""
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"No route {method} {_shown(path)}; this service answers {_ROUTES_TEXT}."
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{method} is not allowed on {_shown(path)}; use {allowed or 'another method'}."
        else:
            message = str(exc.detail)
        return answer(route_label(path), error(exc.status_code, message, dict(exc.headers or {})))

    async def server_error(request: Request, exc: Exception) -> Response:
        """An unexpected exception: logged once here (see :class:`ServiceApp`), a JSON 500 without its traceback."""
        path = request.url.path
        logger.error("Unexpected error answering %s %s", request.method, _shown(path), exc_info=exc)
        return answer(route_label(path), error(500, "Internal error; see the service's log."))

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/search", search, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/image/{image_id}", image, methods=["GET"]),  # the id is checked by the handler (_IMAGE_ID)
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    starlette = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    return ServiceApp(starlette, metrics, hosts if hosts is not None else HostRules())
