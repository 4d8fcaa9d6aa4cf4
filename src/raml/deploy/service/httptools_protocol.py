"""``raml serve``'s connection defences on uvicorn's ``httptools`` protocol (llhttp, in C): the faster front end.

Contract: :class:`DeadlineHttpToolsProtocol` is uvicorn's ``HttpToolsProtocol`` with the same defences as
:class:`raml.deploy.service.connections.DeadlineH11Protocol` (see :mod:`raml.deploy.service.connections`, which
selects one of the two):

- **header deadline**: complete request headers within ``header_timeout_s`` of the connection's opening and of
  its previous response, or ``408`` and the connection is closed;
- **header size**: at most ``max_header_bytes`` bytes of a request before its headers are complete, or ``431``
  and the connection is closed (h11 has this bound built in, 16 KiB; llhttp has none, so without it a client
  could grow the server's memory for ``header_timeout_s``); a chunked body's trailer fields are dropped, never
  handed to the application, and the connection is closed once they pass the same bound;
- **open connections**: beyond ``max_connections``, ``503`` with ``Retry-After`` and the new connection is closed;
- **unread bodies**: a response sent before its request's body arrived in full closes the connection (after a
  lingering of at most ``linger_s``, :class:`~raml.deploy.service.connections.LingeringClose`).

Importing this module needs ``httptools`` (``pip install raml[serve]``).
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from raml.deploy.service.connections import ConnectionDefences, framing_problem

logger = logging.getLogger(__name__)

__all__ = ["DeadlineHttpToolsProtocol"]


class DeadlineHttpToolsProtocol(ConnectionDefences, HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`~raml.deploy.service.connections.ConnectionDefences` and a header
    size bound (llhttp has none of its own).

    The limits are class attributes, set on the subclass :func:`raml.deploy.service.connections.server_options`
    makes.
    """

    max_header_bytes: int = 16 * 1024
    _awaiting_headers: bool = True  # between a response (or the opening) and the next request's full headers
    _header_bytes: int = 0
    _headers_done: bool = False  # the current message's headers are complete: a further field is a trailer
    _trailer_bytes: int = 0

    def on_message_begin(self) -> None:
        self._headers_done = False
        self._trailer_bytes = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._headers_done:
            super().on_header(name, value)
            return
        # A trailer field of a chunked body. uvicorn appends it to the request's headers, which the application
        # already holds: a client streaming trailers grew the server by ~30 bytes per byte sent (2 GB in 4 s)
        # for as long as the body deadline let it. Trailers are never handed on, and bounded like the headers.
        self._trailer_bytes += len(name) + len(value) + 4
        if self._trailer_bytes > self.max_header_bytes and not self.transport.is_closing():
            logger.info("Closing a connection whose trailer fields passed %d bytes", self.max_header_bytes)
            self.transport.close()

    def _headers_pending(self) -> bool:
        return self._awaiting_headers

    def _next_bytes_buffered(self) -> bool:
        return not self._headers_done  # a next message began (on_message_begin) and its headers are incomplete

    def _arm_header_timer(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        super()._arm_header_timer()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._awaiting_headers = False
        super()._refuse(status, reason, message)

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
        self._headers_done = True
        self._awaiting_headers = False
        self._cancel_header_timer()
        problem = framing_problem(self.parser.get_http_version(), self.headers)
        if problem is not None:  # raised through llhttp as a parser error: uvicorn answers 400 and closes
            raise ValueError(problem)
        super().on_headers_complete()

    def _body_unread(self) -> bool:
        # self.cycle is the answered request's, unless a pipelined request is queued behind it (whose headers came
        # after the answered request's whole body)
        return not self.pipeline and self.cycle is not None and self.cycle.more_body

    def _next_request_started(self) -> bool:
        return bool(self.pipeline)  # the next request's headers came already
