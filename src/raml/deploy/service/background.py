"""Run an ASGI application with uvicorn in a background thread on a free loopback port (tests, notebooks).

Contract: ``with BackgroundServer(app) as server:`` binds ``127.0.0.1`` (port 0 = a free one chosen by the
system), runs the application's lifespan and serves until the block ends; ``server.url`` is
``http://127.0.0.1:<port>``. Waits are bounded: a server that does not start or stop within ``timeout_s``
raises ``TimeoutError``.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """uvicorn in a daemon thread (see the module docstring).

    Args:
        app: The ASGI application.
        host: Address to bind.
        port: Port; 0 picks a free one.
        timeout_s: Longest wait for start-up and for shut-down.
        options: More ``uvicorn.Config`` keyword arguments, e.g.
            :func:`raml.deploy.service.connections.server_options` (the deadlines of ``raml serve``).
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 30.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        self.timeout_s = float(timeout_s)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **(options or {}))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="raml-uvicorn", daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("The server thread stopped during start-up; see the log for the reason.")
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise TimeoutError(f"The server did not start within {self.timeout_s:g} s.")
            time.sleep(0.01)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self.timeout_s)
        self._socket.close()
        if self._thread.is_alive():
            raise TimeoutError(f"The server did not stop within {self.timeout_s:g} s.")
