"""Connection-level defences of ``raml serve``: a header deadline, a cap on open connections, no idle bodies.

Contract: :func:`server_options` ``(limits, http=, loop=)`` -> keyword arguments for ``uvicorn.Config`` /
``uvicorn.run``: the HTTP protocol class and the event loop. ``http="httptools"`` selects
:class:`raml.deploy.service.httptools_protocol.DeadlineHttpToolsProtocol` (uvicorn's protocol on llhttp, in C),
``"h11"`` :class:`DeadlineH11Protocol` (pure Python), ``"auto"`` the first if ``httptools`` is importable;
``loop="uvloop"`` / ``"asyncio"`` / ``"auto"`` (uvloop if importable) likewise. Both protocols add the same
defences to uvicorn's:

- **header deadline**: a connection must deliver a request's complete headers within ``header_timeout_s`` of
  being opened, and of its previous response; otherwise it gets ``408 Request Timeout`` and is closed (a client
  that never finishes its headers, or trickles them, no longer holds a socket forever);
- **open connections**: beyond ``max_connections`` open at once, a new connection gets ``503`` with
  ``Retry-After`` and is closed at once;
- **counted**: each response the protocol writes itself (503, 408, 431) is reported to ``server_options``'s
  ``on_refusal`` (``raml serve``: ``raml_shed_total{reason="connections"}`` and
  ``raml_connection_refusals_total{status}``, :mod:`raml.deploy.service.metrics`);
- **unread bodies**: a response sent before its request's body was received in full closes the connection (so a
  client cannot keep trickling a body nobody reads), after lingering at most ``linger_s`` (1 s) while discarding
  what still arrives, so that a client still sending reads the response instead of a reset (:class:`LingeringClose`);
- **unread responses**: a connection whose writing stays paused (the client reads nothing while the kernel's
  buffers are full) for ``send_timeout_s`` is aborted: before, a client that pipelined requests and never read the
  answers held its connection for ever, and ``max_connections`` such clients locked everyone out;
- **framing**: a request with both ``Content-Length`` and ``Transfer-Encoding``, ``Content-Length`` twice, a
  ``Transfer-Encoding`` other than ``chunked``, or HTTP/1.1 without ``Host`` gets ``400`` and the connection is
  closed, on both front ends (:func:`framing_problem`; RFC 9112, 6.3): h11 framed the first as chunked and kept
  the connection, so a request hidden in the body behind a proxy that frames by ``Content-Length`` was run.

The body deadline itself (408 when a body is not received in full within ``body_timeout_s``) is the
application's (:func:`raml.deploy.service.app.read_limited_body`), which answers it in JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

__all__ = [
    "HTTP_CHOICES",
    "LOOP_CHOICES",
    "ConnectionDefences",
    "DeadlineH11Protocol",
    "framing_problem",
    "LingeringClose",
    "raw_response",
    "resolve_http",
    "resolve_loop",
    "server_options",
]

HTTP_CHOICES = ("auto", "httptools", "h11")
LOOP_CHOICES = ("auto", "uvloop", "asyncio")


def raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    """A complete JSON error response (``{"error": message}``) that closes the connection, as raw bytes."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _LingeringTransport:
    """A connection's transport as the uvicorn protocol sees it: ``close()`` lingers (see :class:`LingeringClose`)
    while the request's body is unread; everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: LingeringClose) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write  # the hot path, without __getattr__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def close(self) -> None:
        if not self.is_closing() and self._protocol._body_unread():
            self._protocol._linger()
        else:
            self._transport.close()


class LingeringClose:
    """Mixin for a uvicorn HTTP protocol: a connection whose response went out before its request's body arrived in
    full (refused early, or past the body deadline) is closed *after* a short lingering.

    Closing at once, with the client's body still arriving, makes the kernel answer its next segment with a reset,
    and a client still sending then often loses the response it was sent (e.g. a 413, or a 503 with Retry-After).
    So, as web servers do, the protocol sends its end of the stream (FIN), discards whatever still comes for at most
    ``linger_s`` seconds, and closes when the client has closed its side or that time is up: the connection never
    outlives the response by more than ``linger_s``, and nothing it sends is parsed or buffered. Subclasses say
    when the body is unread (:meth:`_body_unread`). The application should send ``Connection: close`` with such a
    response, so that a keep-alive client does not send its next request on this connection.
    """

    linger_s: float = 1.0
    _lingering: bool = False
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[misc]

    def _body_unread(self) -> bool:
        raise NotImplementedError

    def _linger(self) -> None:
        transport: asyncio.Transport = self.transport._transport  # type: ignore[attr-defined]
        self._lingering = True
        self._linger_timer = self.loop.call_later(self.linger_s, transport.close)  # type: ignore[attr-defined]
        flow = getattr(self, "flow", None)
        if flow is not None:
            flow.resume_reading()  # a paused read would leave the client blocked, and the reset would come anyway
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a body nobody reads
        super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class ConnectionDefences(LingeringClose):
    """Mixin for a uvicorn HTTP protocol: the header deadline, the connection cap and the close of a connection
    answered before its body arrived (see the module docstring), the same for every protocol.

    The limits are class attributes, set on the subclass :func:`server_options` makes. Subclasses say whether the
    connection still waits for a request's complete headers (:meth:`_headers_pending`), whether the answered
    request's body is unread (:meth:`_body_unread`), and whether the next request's headers came already
    (:meth:`_next_request_started`).
    """

    header_timeout_s: float = 10.0
    max_connections: int = 256
    retry_after_s: int = 1
    send_timeout_s: float = 30.0
    #: called with the status of each response this layer writes itself, before any request reaches the
    #: application (503: the connection cap; 408: the header deadline; 431: headers too large), e.g. for /metrics
    on_refusal: Callable[[int], None] | None = None
    _header_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _answered: bool = False  # a response went out on this connection
    _idle: bool = True  # no byte came since the header deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # type: ignore[attr-defined]
            logger.warning("Refused a connection: %d open (--max-connections)", self.max_connections)
            message = f"{self.max_connections} connections are open already (--max-connections); try again shortly."
            transport.write(raw_response(503, "Service Unavailable", message, f"retry-after: {self.retry_after_s}\r\n"))
            transport.close()
            self._count_refusal(503)
            return
        self._arm_header_timer()

    def _headers_pending(self) -> bool:
        raise NotImplementedError

    def _next_request_started(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        self._idle = False
        super().data_received(data)  # type: ignore[misc]

    def _next_bytes_buffered(self) -> bool:
        """Whether bytes of a next request (incomplete headers) came already, e.g. pipelined with the last one."""
        return False

    def _arm_header_timer(self) -> None:
        self._idle = not self._next_bytes_buffered()
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)  # type: ignore[attr-defined]

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._cancel_header_timer()
        self.transport.write(raw_response(status, reason, message))  # type: ignore[attr-defined]
        self.transport.close()  # type: ignore[attr-defined]
        self._count_refusal(status)

    def _count_refusal(self, status: int) -> None:
        if self.on_refusal is not None:
            try:
                self.on_refusal(status)
            except Exception:  # counting must never break the connection handling
                logger.exception("Counting a refused connection (%d) failed", status)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._headers_pending():  # type: ignore[attr-defined]
            return  # the headers came: the request is being handled (its body has the application's deadline)
        if self._answered and self._idle:
            # a keep-alive connection after its answer, with no byte of a next request: closed as at keep-alive
            # expiry, without a 408 (no request timed out; nothing is counted)
            logger.debug("Closing a keep-alive connection idle for %g s (--header-timeout)", self.header_timeout_s)
            self.transport.close()  # type: ignore[attr-defined]
            return
        logger.info("Closing a connection that sent no complete request headers within %g s", self.header_timeout_s)
        message = (
            f"The request headers were not received within {self.header_timeout_s:g} s (--header-timeout); "
            "the connection is closed."
        )
        self._refuse(408, "Request Timeout", message)

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_deadline)  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()  # type: ignore[misc]

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_deadline(self) -> None:
        self._send_timer = None  # still paused: resume_writing cancels this timer
        logger.info("Aborting a connection that read none of its responses for %g s", self.send_timeout_s)
        # abort, not close: close() would wait for the client to read the buffered bytes it does not read
        self.transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and self._body_unread():  # type: ignore[attr-defined]
            # answered before its body arrived in full (refused early, or the body deadline passed): close
            self.server_state.total_requests += 1  # type: ignore[attr-defined]
            self._linger()
            return
        self._answered = True
        next_started = self._next_request_started()
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and not next_started:  # type: ignore[attr-defined]
            self._arm_header_timer()  # the next request's headers have the same deadline


class _StrictFraming(h11.Connection):
    """h11's connection, refusing a request that carries both ``Content-Length`` and ``Transfer-Encoding`` (h11
    frames it as chunked and keeps the connection open; RFC 9112, 6.3 says to close it): uvicorn answers the
    :class:`h11.RemoteProtocolError` with 400 and closes the connection, before the application sees the request."""

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            problem = framing_problem(event.http_version.decode("ascii", "replace"), list(event.headers))
            if problem is not None:
                raise h11.RemoteProtocolError(problem, error_status_hint=400)
        return event


def framing_problem(http_version: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's framing headers are refused, or None: both ``Content-Length`` and ``Transfer-Encoding``,
    ``Content-Length`` more than once, a ``Transfer-Encoding`` other than exactly ``chunked``, or an HTTP/1.1
    request without ``Host``. Both front ends refuse the same set (h11 and llhttp each let some through: the
    differences a proxy in front could be made to read otherwise; h11 merges a Content-Length repeated with one
    value before this sees it, as a proxy would read it, and refuses differing ones itself)."""
    names = [name.lower() for name, _ in headers]
    if b"content-length" in names and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding"
    if names.count(b"content-length") > 1:
        return "Content-Length more than once"
    encodings = [value.strip().lower() for name, value in headers if name.lower() == b"transfer-encoding"]
    if encodings and encodings != [b"chunked"]:
        return "a Transfer-Encoding other than chunked"
    if http_version == "1.1" and b"host" not in names:
        return "an HTTP/1.1 request without Host"
    return None


class DeadlineH11Protocol(ConnectionDefences, H11Protocol):
    """uvicorn's h11 protocol with :class:`ConnectionDefences` and strict framing (:class:`_StrictFraming`); h11
    bounds an incomplete request's headers itself (16 KiB)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.config.h11_max_incomplete_event_size  # uvicorn's setting; None: h11's own default (16 KiB)
        self.conn = _StrictFraming(h11.SERVER) if limit is None else _StrictFraming(h11.SERVER, limit)

    def _headers_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

    def _body_unread(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY

    def _next_bytes_buffered(self) -> bool:
        return bool(self.conn.trailing_data[0])  # what h11 holds unparsed for the next cycle


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _resolve(value: str, choices: tuple[str, ...], name: str, package: str, fallback: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
    if value == "auto":
        return package if _importable(package) else fallback
    if value == package and not _importable(package):
        raise ImportError(f"--{name} {package} needs the {package} package: pip install raml[serve] (or {package}).")
    return value


def resolve_http(http: str) -> str:
    """``"httptools"`` or ``"h11"``: ``http`` itself, or for ``"auto"`` httptools where it is importable.

    Raises:
        ValueError: ``http`` is not one of :data:`HTTP_CHOICES`.
        ImportError: ``"httptools"`` asked for and not installed.
    """
    return _resolve(http, HTTP_CHOICES, "http", "httptools", "h11")


def resolve_loop(loop: str) -> str:
    """``"uvloop"`` or ``"asyncio"``: ``loop`` itself, or for ``"auto"`` uvloop where it is importable.

    Raises:
        ValueError: ``loop`` is not one of :data:`LOOP_CHOICES`.
        ImportError: ``"uvloop"`` asked for and not installed.
    """
    return _resolve(loop, LOOP_CHOICES, "loop", "uvloop", "asyncio")


def server_options(
    header_timeout_s: float,
    max_connections: int,
    retry_after_s: int = 1,
    http: str = "auto",
    loop: str = "auto",
    max_header_bytes: int = 16 * 1024,
    send_timeout_s: float = 30.0,
    on_refusal: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run``: the protocol class with these limits, the loop.

    Args:
        header_timeout_s: Seconds a connection has to deliver complete request headers.
        max_connections: Most connections open at once.
        retry_after_s: ``Retry-After`` of the 503 a connection over the cap gets.
        http: ``"httptools"``, ``"h11"`` or ``"auto"`` (httptools where importable; see :func:`resolve_http`).
        loop: ``"uvloop"``, ``"asyncio"`` or ``"auto"`` (uvloop where importable; see :func:`resolve_loop`).
        max_header_bytes: With httptools, most bytes of a request before its headers are complete (h11 has its
            own bound, 16 KiB), and of a chunked body's trailer fields.
        send_timeout_s: Seconds a connection's writing may stay paused (its client reading nothing) before the
            connection is aborted.
        on_refusal: Called (on the event loop) with the status of each response the protocol writes itself:
            503 (over ``max_connections``), 408 (headers past ``header_timeout_s``), 431 (httptools: headers over
            ``max_header_bytes``); e.g. :meth:`~raml.deploy.service.metrics.ServiceMetrics.record_connection_refusal`.
    """
    if not (send_timeout_s > 0 and math.isfinite(send_timeout_s)):
        raise ValueError(f"send_timeout_s must be a finite number of seconds > 0, got {send_timeout_s!r}.")
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s must be positive, got {header_timeout_s!r}.")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}.")
    limits: dict[str, Any] = {
        "header_timeout_s": float(header_timeout_s),
        "max_connections": max_connections,
        "retry_after_s": retry_after_s,
        "send_timeout_s": float(send_timeout_s),
        "on_refusal": staticmethod(on_refusal) if on_refusal is not None else None,
    }
    if resolve_http(http) == "httptools":
        from raml.deploy.service.httptools_protocol import DeadlineHttpToolsProtocol

        limits["max_header_bytes"] = max_header_bytes
        protocol = type("RamlHttpToolsProtocol", (DeadlineHttpToolsProtocol,), limits)
    else:
        protocol = type("RamlH11Protocol", (DeadlineH11Protocol,), limits)
    return {"http": protocol, "loop": resolve_loop(loop)}
