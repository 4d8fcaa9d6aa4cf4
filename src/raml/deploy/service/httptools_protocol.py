"""``raml serve``'s connection defences on uvicorn's ``httptools`` protocol (llhttp, in C): the faster front end.

Contract: :class:`DeadlineHttpToolsProtocol` is uvicorn's ``HttpToolsProtocol`` with the same defences as
:class:`raml.deploy.service.connections.DeadlineH11Protocol` (see :mod:`raml.deploy.service.connections`, which
selects one of the two):

- **header deadline**: complete request headers within ``header_timeout_s`` of the connection's opening and of
  its previous response, or ``408`` and the connection is closed;
- **header size**: at most ``max_header_bytes`` bytes of a request before its headers are complete, or ``431``
  and the connection is closed (h11 has this bound built in, 16 KiB; llhttp has none, so without it a client
  could grow the server's memory for ``header_timeout_s``);
- **open connections**: beyond ``max_connections``, ``503`` with ``Retry-After`` and the new connection is closed;
- **unread bodies**: a response sent before its request's body arrived in full closes the connection (after a
  lingering of at most ``linger_s``, :class:`~raml.deploy.service.connections.LingeringClose`).

Importing this module needs ``httptools`` (``pip install raml[serve]``).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from raml.deploy.service.connections import LingeringClose, raw_response

logger = logging.getLogger(__name__)

__all__ = ["DeadlineHttpToolsProtocol"]


class DeadlineHttpToolsProtocol(LingeringClose, HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size bound and a connection cap.

    The limits are class attributes, set on the subclass :func:`raml.deploy.service.connections.server_options`
    makes.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 256
    retry_after_s: int = 1
    max_header_bytes: int = 16 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = True  # between a response (or the opening) and the next request's full headers
        self._header_bytes = 0
        if len(self.connections) > self.max_connections:
            logger.warning("Refused a connection: %d open (--max-connections)", self.max_connections)
            message = f"{self.max_connections} connections are open already (--max-connections); try again shortly."
            transport.write(raw_response(503, "Service Unavailable", message, f"retry-after: {self.retry_after_s}\r\n"))
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._cancel_header_timer()
        self._awaiting_headers = False
        self.transport.write(raw_response(status, reason, message))
        self.transport.close()

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers:
            return  # the headers came: the request is being handled (its body has the application's deadline)
        logger.info("Closing a connection that sent no complete request headers within %g s", self.header_timeout_s)
        message = (
            f"The request headers were not received within {self.header_timeout_s:g} s (--header-timeout); "
            "the connection is closed."
        )
        self._refuse(408, "Request Timeout", message)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                # counted per read: the headers may end inside this chunk, so let the parser see it first
                super().data_received(data)
                if self._awaiting_headers and not self.transport.is_closing():
                    logger.info("Closing a connection whose request headers passed %d bytes", self.max_header_bytes)
                    message = f"The request headers are over {self.max_header_bytes} bytes; the connection is closed."
                    self._refuse(431, "Request Header Fields Too Large", message)
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _body_unread(self) -> bool:
        # self.cycle is the answered request's, unless a pipelined request is queued behind it (whose headers came
        # after the answered request's whole body)
        return not self.pipeline and self.cycle is not None and self.cycle.more_body

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and self._body_unread():
            # answered before its body arrived in full (refused early, or the body deadline passed): close
            self.server_state.total_requests += 1
            self._linger()
            return
        pipelined = bool(self.pipeline)  # the next request's headers came already
        super().on_response_complete()
        if not self.transport.is_closing() and not pipelined:
            self._arm_header_timer()  # the next request's headers have the same deadline
