"""Loopback servers for the download tests: everything on 127.0.0.1, on a free port, in-process.

- ``http_server``: a :class:`FileServer` serving ``files`` (name -> bytes) over HTTP with byte ranges, that
  can drop a connection after a given byte, ignore ``Range`` requests, and records every request's headers.
- ``ftp_server``: a pyftpdlib FTP server (anonymous, read-only) over a folder, recording ``REST`` offsets;
  skipped when pyftpdlib is not installed.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import tarfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

STOP_TIMEOUT_S = 10.0


@dataclass
class FileServer:
    """State of the loopback HTTP server; tests change it between requests.

    Attributes:
        files: URL path (without the leading '/') -> content.
        drop_after: URL path -> (byte offset in the file, how many more responses to break there; -1 = all).
        ignore_range: Answer 200 with the whole file even when a Range is asked for.
        requests: (path, Range header or None) of every GET, in order.
        validators: Send ``ETag`` and ``Last-Modified`` (both derived from the content) and honour ``If-Range``.
        ignore_if_range: Answer a Range with 206 even when its ``If-Range`` does not match (a broken server).
        if_ranges: The ``If-Range`` header (or None) of every GET, in order.
        send_length: Send ``Content-Length``; without it the body ends when the connection closes.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: dict[str, list[int]] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    validators: bool = True
    ignore_if_range: bool = False
    if_ranges: list[str | None] = field(default_factory=list)
    send_length: bool = True
    port: int = 0

    def etag(self, name: str) -> str:
        return '"' + hashlib.sha256(self.files[name]).hexdigest()[:16] + '"'

    def last_modified(self, name: str) -> str:
        return email.utils.formatdate(1_600_000_000 + zlib.crc32(self.files[name]) % 10**8, usegmt=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            name = self.path.lstrip("/")
            asked = self.headers.get("Range")
            state.requests.append((name, asked))
            state.if_ranges.append(self.headers.get("If-Range"))
            if name not in state.files:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return
            content = state.files[name]
            start = 0
            tags = (state.etag(name), state.last_modified(name)) if state.validators else ()
            if_range = self.headers.get("If-Range")
            if asked and if_range is not None and if_range not in tags and not state.ignore_if_range:
                asked = None  # another version than the client's: the whole file (RFC 9110, If-Range)
            if asked and not state.ignore_range:
                start = int(asked.removeprefix("bytes=").split("-")[0])
                if start >= len(content):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(content)}")
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                self.send_response(200)
            if tags:
                self.send_header("ETag", tags[0])
                self.send_header("Last-Modified", tags[1])
            if state.send_length:
                self.send_header("Content-Length", str(len(content) - start))
            self.send_header("Connection", "close")
            self.end_headers()
            body = content[start:]
            rule = state.drop_after.get(name)
            if rule is not None and rule[1] != 0 and rule[0] > start:
                rule[1] -= 1 if rule[1] > 0 else 0
                self.wfile.write(body[: rule[0] - start])  # then close: the client sees a short body
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    state = FileServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_TIMEOUT_S)


@dataclass
class FtpServer:
    root: Path
    port: int
    rest_offsets: list[int]
    announced_sizes: dict[str, int]
    """File name -> the size its ``SIZE`` command answers instead of the true one (a lying server)."""

    def url(self, name: str) -> str:
        return f"ftp://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def ftp_server(tmp_path: Path) -> Iterator[FtpServer]:
    with warnings.catch_warnings():  # pyftpdlib still imports asyncore/asynchat (deprecated in 3.11)
        warnings.simplefilter("ignore", DeprecationWarning)
        pytest.importorskip("pyftpdlib", reason="pyftpdlib (a dev dependency) is not installed: no loopback FTP server")
        import pyftpdlib.handlers  # noqa: F401 - imported here, under the filter above
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import ThreadedFTPServer

    root = tmp_path / "ftp"
    root.mkdir()
    offsets: list[int] = []
    announced: dict[str, int] = {}

    class Handler(FTPHandler):
        def ftp_SIZE(self, path: str) -> None:  # noqa: N802 - pyftpdlib's command naming
            name = Path(path).name
            if name in announced:
                self.respond(f"213 {announced[name]}")
                return
            super().ftp_SIZE(path)

        def ftp_REST(self, line: str) -> None:  # noqa: N802 - pyftpdlib's command naming
            offsets.append(int(line))
            super().ftp_REST(line)

        def log(self, msg: str, logfun: object = None) -> None:
            pass

        def logline(self, msg: str, logfun: object = None) -> None:
            pass

        def logerror(self, msg: str) -> None:
            pass

    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(root))
    Handler.authorizer = authorizer
    Handler.passive_ports = None
    server = ThreadedFTPServer(("127.0.0.1", 0), Handler)
    port = server.socket.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:  # non-blocking rounds, so that the loop sees the stop flag
        while not stop.is_set():
            server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield FtpServer(root, port, offsets, announced)
    finally:
        stop.set()
        thread.join(timeout=STOP_TIMEOUT_S)
        server.close_all()


@pytest.fixture(scope="session")
def symlink_chain_tgz() -> bytes:
    """The CVE-2025-4517 pattern (see tests/data/test_archives.py): ``escape/escaped.txt`` lands in the parent
    of the folder it is unpacked into, through symlinks the ``"data"`` filter of Python < 3.11.13 accepts."""
    long_dir, steps, prefix = "d" * 247, "abcdefghijklmnop", ""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for step in steps:
            folder = tarfile.TarInfo(f"{prefix}{long_dir}")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            link = tarfile.TarInfo(f"{prefix}{step}")
            link.type, link.linkname = tarfile.SYMTYPE, long_dir
            tar.addfile(link)
            prefix += long_dir + "/"
        top = "/".join(steps) + "/" + "l" * 254
        link = tarfile.TarInfo(top)
        link.type, link.linkname = tarfile.SYMTYPE, "../" * len(steps)
        tar.addfile(link)
        escape = tarfile.TarInfo("escape")
        escape.type, escape.linkname = tarfile.SYMTYPE, top + "/.."
        tar.addfile(escape)
        data = b"written outside the destination\n"
        member = tarfile.TarInfo("escape/escaped.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()
