"""Connection-level defences of ``raml serve``: a header deadline, a cap on open connections, no idle bodies.

Contract: :func:`server_options` ``(limits)`` -> keyword arguments for ``uvicorn.Config`` / ``uvicorn.run``
selecting :class:`DeadlineH11Protocol` (uvicorn's h11 protocol with three additions):

- **header deadline**: a connection must deliver a request's complete headers within ``header_timeout_s`` of
  being opened, and of its previous response; otherwise it gets ``408 Request Timeout`` and is closed (a client
  that never finishes its headers, or trickles them, no longer holds a socket forever);
- **open connections**: beyond ``max_connections`` open at once, a new connection gets ``503`` with
  ``Retry-After`` and is closed at once;
- **unread bodies**: a response sent before its request's body was received in full closes the connection (so a
  client cannot keep trickling a body nobody reads).

The body deadline itself (408 when a body is not received in full within ``body_timeout_s``) is the
application's (:func:`raml.deploy.service.app.read_limited_body`), which answers it in JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

__all__ = ["DeadlineH11Protocol", "server_options"]


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (see the module docstring).

    The limits are class attributes, set on the subclass :func:`server_options` makes.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 256
    retry_after_s: int = 1

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            logger.warning("Refused a connection: %d open (--max-connections)", self.max_connections)
            message = f"{self.max_connections} connections are open already (--max-connections); try again shortly."
            extra = f"retry-after: {self.retry_after_s}\r\n"
            transport.write(_raw_response(503, "Service Unavailable", message, extra))
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE or self.conn.our_state is not h11.IDLE:
            return  # the headers came: the request is being handled (its body has the application's deadline)
        logger.info("Closing a connection that sent no complete request headers within %g s", self.header_timeout_s)
        message = (
            f"The request headers were not received within {self.header_timeout_s:g} s (--header-timeout); "
            "the connection is closed."
        )
        self.transport.write(_raw_response(408, "Request Timeout", message))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            # answered before its body arrived in full (refused early, or the body deadline passed): close
            self.server_state.total_requests += 1
            self.transport.close()
            return
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers have the same deadline


def server_options(header_timeout_s: float, max_connections: int, retry_after_s: int = 1) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run``: the protocol class with these limits.

    Args:
        header_timeout_s: Seconds a connection has to deliver complete request headers.
        max_connections: Most connections open at once.
        retry_after_s: ``Retry-After`` of the 503 a connection over the cap gets.
    """
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s must be positive, got {header_timeout_s!r}.")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}.")
    protocol = type(
        "RamlH11Protocol",
        (DeadlineH11Protocol,),
        {
            "header_timeout_s": float(header_timeout_s),
            "max_connections": max_connections,
            "retry_after_s": retry_after_s,
        },
    )
    return {"http": protocol}
