"""``raml serve`` under hostile input (issue 18, items 5-7): extreme aspect ratios, a burst of costly 16-bit
uploads, and slow clients on raw loopback sockets.

Each server here runs on 127.0.0.1 (a free port) with short deadlines configured for the test, so that every
test takes seconds; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

from raml.data import get_split  # noqa: E402
from raml.deploy import index_images  # noqa: E402
from raml.deploy.service import SearchService, ServiceLimits, TorchQueryEmbedder  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.deploy.service.connections import server_options  # noqa: E402
from raml.models import checkpoint_sha256, load_network  # noqa: E402

QR, DR = 32, 48
CPU = torch.device("cpu")
WAIT_S = 20.0  # bound of every wait
MB = 2**20


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_and_networks) -> dict:
    base = tmp_path_factory.mktemp("serve_limits")
    root, nets = synth_and_networks("resnet18", {"teacher": (16, 0), "student": (16, 1)})
    split = get_split("synth-test", root)
    paths = [str(p) for p in split.abspaths()]
    teacher = load_network(nets["teacher"])
    index_images(teacher, paths[:8], DR, base / "index", checkpoint_sha256(nets["teacher"]))
    # one query network for the module's services: loading and tracing it cost ~0.45 s a service, and it holds
    # no state of a service (each test's service, batcher and limits are its own)
    embedder = TorchQueryEmbedder(load_network(nets["student"]), CPU, QR)
    return {"nets": nets, "paths": paths, "index": base / "index", "embedder": embedder}


@contextlib.contextmanager
def serving(
    world: dict, front_end: dict[str, str], send_timeout_s: float = 30.0, **limits
) -> Iterator[tuple[SearchService, str]]:
    """A service over the test index with ``limits`` (ServiceLimits fields), its deadlines in force, on the HTTP
    front end ``front_end`` (:func:`server_options`'s ``http`` and ``loop``)."""
    service = SearchService(world["embedder"], world["index"], ServiceLimits(**limits))
    options = server_options(
        service.limits.header_timeout_s, service.limits.max_connections, send_timeout_s=send_timeout_s, **front_end
    )
    with BackgroundServer(create_app(service), options=options) as running:
        yield service, running.url


def good_query(world: dict) -> bytes:
    return Path(world["paths"][1]).read_bytes()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ item 5: extreme aspect ratio


def test_an_extreme_aspect_ratio_is_refused_with_413_before_decoding(world, front_end):
    thin = png_bytes(np.zeros((1, 100_000), dtype=np.uint8))  # 100,000 pixels, under any --max-pixels here
    assert len(thin) < 1000
    with (
        serving(world, front_end, max_pixels=1_000_000) as (_, url),
        httpx.Client(base_url=url, timeout=WAIT_S) as client,
    ):
        response = client.post("/search", content=thin, headers={"content-type": "image/png"})
        assert response.status_code == 413, response.text
        message = response.json()["error"]
        # at 32 px the short side becomes 36.57 px: 100000 x 36.57 -> 3657143 x 37 pixels
        assert "100000x1" in message and "3657143x37" in message and "1000000" in message and "--max-pixels" in message
        tall = png_bytes(np.zeros((5000, 3), dtype=np.uint8))  # the same in the other direction
        assert client.post("/search", content=tall, headers={"content-type": "image/png"}).status_code == 413
        fine = png_bytes(np.zeros((40, 700), dtype=np.uint8))  # 700 x 40 -> 640 x 37: well within
        assert client.post("/search", content=fine, headers={"content-type": "image/png"}).status_code == 200
        assert client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"}).is_success


# ------------------------------------------------------------------------------ item 6: admission before decoding


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[dict]:
    """The peak resident memory of this process (where the server runs) during the block, in bytes.

    The kernel's high-water mark (VmHWM) is reset first (``/proc/self/clear_refs``); where that is not allowed,
    a thread samples VmRSS every millisecond instead (only then: beside the kernel's exact peak the samples add
    nothing, and the thread took the GIL a thousand times a second from the server it measures).
    """
    out: dict = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = _rss_kb("VmHWM") <= _rss_kb("VmRSS") + 1024
    except OSError:
        reset = False
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss_kb("VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    if not reset:
        sampler.start()
    try:
        yield out
    finally:
        stop.set()
        if not reset:
            sampler.join(WAIT_S)
        out["peak"] = 1024 * max([*samples, _rss_kb("VmHWM") if reset else 0])
        out["method"] = "VmHWM" if reset else "sampled VmRSS"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to read the RSS")
def test_a_burst_of_16bit_uploads_keeps_the_peak_rss_bounded_and_the_service_up(world, front_end):
    # a 16-bit 4000x4000 PNG: 16 M pixels, 32 MB decoded, ~40 KB as a file
    ramp = np.tile(np.linspace(0, 65535, 4000).astype(np.uint16), (4000, 1))
    upload = png_bytes(ramp)
    del ramp
    assert len(upload) < 100_000 and Image.open(io.BytesIO(upload)).mode.startswith("I;16")
    limits = dict(max_pixels=20_000_000, max_batch=4, max_wait_ms=1, queue_size=4)
    with (
        serving(world, front_end, **limits) as (service, url),
        httpx.Client(base_url=url, timeout=4 * WAIT_S) as client,
    ):
        assert client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"}).is_success
        idle = _rss_kb("VmRSS") * 1024
        barrier = threading.Barrier(16, timeout=WAIT_S)

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return client.post("/search", content=upload, headers={"content-type": "image/png"})

        with peak_rss() as rss, ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, range(16)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        for refused in (r for r in responses if r.status_code == 503):
            assert refused.headers["retry-after"] == "1" and "try again" in refused.json()["error"]
        assert service.uploads.held == 0 and service.decodes.held == 0
        growth = rss["peak"] - idle
        print(f"idle RSS {idle / MB:.0f} MB, peak {rss['peak'] / MB:.0f} MB ({rss['method']}), statuses {statuses}")
        assert growth < 500 * MB, f"peak RSS grew by {growth / MB:.0f} MB under 16 concurrent 16-bit uploads"
        after = client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"})
        assert after.status_code == 200, after.text


def test_uploads_beyond_max_uploads_get_503_before_their_body_is_read(world, front_end):
    with serving(world, front_end, max_uploads=1, body_timeout_s=WAIT_S) as (service, url):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=WAIT_S) as slow:
            slow.sendall(
                b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\nab"
            )
            deadline = time.monotonic() + WAIT_S
            while service.uploads.held < 1:  # the slow upload holds the only slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with httpx.Client(base_url=url, timeout=WAIT_S) as client:
                busy = client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"})
                assert busy.status_code == 503 and "--max-uploads" in busy.json()["error"]
                assert busy.headers["retry-after"] == "1"
                metrics = client.get("/metrics").text
                assert "raml_uploads_in_flight 1.0" in metrics and "raml_decodes_in_flight 0.0" in metrics
                assert 'raml_shed_total{reason="uploads"} 1.0' in metrics
        # the slow client is gone: its slot is free again
        deadline = time.monotonic() + WAIT_S
        while service.uploads.held:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            assert client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"}).is_success


# ------------------------------------------------------------------------------ item 7: slow clients


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _read_until_closed(sock: socket.socket, limit_s: float = WAIT_S) -> bytes:
    """Everything the server sends until it closes the connection (bounded by ``limit_s``; fails past it)."""
    sock.settimeout(limit_s)
    received = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError("the server kept the connection open")


def test_a_client_that_never_finishes_its_headers_gets_408_and_is_closed(world, front_end):
    with serving(world, front_end, header_timeout_s=0.3) as (_, url):
        port = _port(url)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as partial,
            socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as silent,
        ):
            partial.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: ima")
            for sock in (partial, silent):
                answer = _read_until_closed(sock)
                assert answer.startswith(b"HTTP/1.1 408 ") and b"--header-timeout" in answer
        # the deadline runs again after each response: a keep-alive connection answered once, then sending part of
        # its next request's headers, is closed like a new one (its first request outlasts the first deadline: the
        # headers at once, the body after it)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as answered:
            query = good_query(world)
            answered.sendall(
                b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                % len(query)
            )
            time.sleep(0.5)
            answered.sendall(query)
            first = b""
            while b"\r\n\r\n" not in first:
                chunk = answered.recv(65536)
                assert chunk, "the connection closed before answering"
                first += chunk
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
            while len(body) < length:
                body += answered.recv(65536)
            answered.sendall(b"GET /health HTTP/1.1\r\nHo")
            answer = _read_until_closed(answered)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"--header-timeout" in answer
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:  # a normal client is unaffected
            assert client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"}).is_success


def _read_response(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One HTTP response from ``sock`` (after ``buffered``): its head, its body and what came after it."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole response head: {data[:200]!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside a response body"
        rest += chunk
    return head, rest[:length], rest[length:]


def test_a_pipelined_request_whose_headers_came_early_is_not_timed_out_as_headerless(world, front_end):
    """A second request pipelined behind the first (its headers in the same segment) already has its headers: the
    header deadline must not be re-armed for it when the first response completes. Its body, sent after more than
    the header deadline, is then read under the body deadline and answered 200 (re-arming it instead answers 408
    and closes the connection, and with httptools would count the body's bytes as header bytes)."""
    header_timeout_s = 0.3
    query = good_query(world)
    head = (
        b"POST /search?k=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
    ) % len(query)
    with (
        serving(world, front_end, header_timeout_s=header_timeout_s, body_timeout_s=WAIT_S) as (_, url),
        socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as sock,
    ):
        sock.sendall(head + query + head)  # the first request whole, the second's headers right behind it
        first_head, first_body, rest = _read_response(sock)
        assert first_head.startswith(b"HTTP/1.1 200 "), first_head + first_body[:200]
        time.sleep(2 * header_timeout_s)  # past the header deadline, well within the body deadline
        sock.sendall(query)
        second_head, second_body, _ = _read_response(sock, rest)
        assert second_head.startswith(b"HTTP/1.1 200 "), second_head + second_body[:200]
        assert len(json.loads(second_body)["results"]) == 3


def test_trickled_bodies_get_408_at_the_body_deadline_and_are_closed(world, front_end):
    with serving(world, front_end, body_timeout_s=0.5, header_timeout_s=WAIT_S) as (_, url):
        port = _port(url)
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(3)]
        try:
            for sock in sockets:
                sock.sendall(
                    b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
                )
            closed: dict[int, bytes] = {}
            deadline = time.monotonic() + WAIT_S
            while len(closed) < len(sockets):  # one byte per socket every 50 ms until the server gives up
                assert time.monotonic() < deadline, "trickling clients were never timed out"
                for i, sock in enumerate(sockets):
                    if i in closed:
                        continue
                    try:
                        sock.sendall(b"x")
                    except (BrokenPipeError, ConnectionResetError):
                        closed[i] = b""
                        continue
                    sock.settimeout(0.0)
                    try:
                        data = sock.recv(65536)
                        closed[i] = data or b"(closed)"
                    except BlockingIOError:
                        pass  # nothing from the server yet
                    except ConnectionResetError:
                        closed[i] = b""
                    sock.settimeout(WAIT_S)
                time.sleep(0.05)
            for i, sock in enumerate(sockets):
                answer = closed[i] + (_read_until_closed(sock) if closed[i] not in (b"", b"(closed)") else b"")
                if answer:
                    assert answer.startswith(b"HTTP/1.1 408 ") and b"--body-timeout" in answer, answer[:200]
            assert any(closed[i].startswith(b"HTTP/1.1 408 ") for i in closed)
        finally:
            for sock in sockets:
                sock.close()
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            assert client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"}).is_success


def test_open_connections_are_bounded(world, front_end):
    with serving(world, front_end, max_connections=3, header_timeout_s=WAIT_S) as (_, url):
        port = _port(url)
        held = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(3)]
        try:
            time.sleep(0.2)  # let the server register the three
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as extra:
                answer = _read_until_closed(extra)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
            assert b"--max-connections" in answer
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + WAIT_S
        while True:  # once they are closed, clients are served again
            with httpx.Client(base_url=url, timeout=WAIT_S) as client:
                response = client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"})
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, response.text
            time.sleep(0.05)


def test_a_response_sent_before_the_body_arrived_closes_the_connection(world, front_end):
    # the only upload slot is held, so the second request gets 503 before its body is read: a client that goes on
    # trickling that body must not keep the connection (and its socket) open
    with serving(world, front_end, max_uploads=1, body_timeout_s=WAIT_S, header_timeout_s=WAIT_S) as (service, url):
        head = b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
        with (
            socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as holder,
            socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as refused,
        ):
            holder.sendall(head + b"ab")
            deadline = time.monotonic() + WAIT_S
            while service.uploads.held < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused.sendall(head + b"cd")
            answer = _read_until_closed(refused, limit_s=3.0)  # fails if the connection stays open
            assert answer.startswith(b"HTTP/1.1 503 ") and b"--max-uploads" in answer
            assert b"connection: close" in answer.lower()  # so that a keep-alive client opens a new connection
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            assert client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"}).is_success


def test_endless_request_headers_are_refused_and_closed_before_the_header_deadline(world, front_end):
    # h11 bounds an unfinished request to 16 KiB; llhttp has no bound, so httptools' protocol adds one (431)
    with (
        serving(world, front_end, header_timeout_s=WAIT_S) as (_, url),
        socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as sock,
    ):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent, started, answer = 0, time.monotonic(), b""
        try:
            while sent < 4 * MB:
                sock.sendall(b"X-Filler-%d: %s\r\n" % (sent, b"y" * 1000))
                sent += 1000
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server while sending: its answer may be lost, the point is it closed
        else:
            answer = _read_until_closed(sock, limit_s=WAIT_S / 2)
        assert time.monotonic() - started < WAIT_S / 2, "the connection was held until the header deadline"
        if answer:
            assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), answer[:200]


def test_a_stalled_upload_does_not_hold_a_lone_query_for_the_batching_window(world, front_end):
    # a batching window far longer than the client's patience: were the stalled upload counted as a query on its
    # way, the lone query would wait for it (for max_wait_ms, or until the body deadline) and time out
    window_s = 10 * WAIT_S
    limits = dict(max_batch=8, max_wait_ms=1000 * window_s, body_timeout_s=window_s, header_timeout_s=window_s)
    with (
        serving(world, front_end, **limits) as (service, url),
        socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as stalled,
    ):
        stalled.sendall(
            b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 900\r\n\r\n"
        )
        stalled.sendall(b"\x89PNG\r\n")
        deadline = time.monotonic() + WAIT_S
        while service.uploads.held < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=WAIT_S / 2) as client:
            response = client.post("/search", content=good_query(world), headers={"content-type": "image/jpeg"})
        assert response.status_code == 200 and response.json()["batch_size"] == 1


def test_slots_admit_within_the_limit_and_one_oversized_request_alone():
    from raml.deploy.service.admission import ServiceBusyError, Slots

    budget = Slots(100, "pixels being decoded", "--max-decode-pixels")
    with budget.take(60):
        with budget.take(40):  # exactly full
            assert budget.held == 100
            with pytest.raises(ServiceBusyError, match="--max-decode-pixels is 100") as refused, budget.take(1):
                pass
            assert refused.value.flag == "--max-decode-pixels"
        with pytest.raises(ServiceBusyError), budget.take(41):
            pass
    assert budget.held == 0
    with budget.take(500):  # larger than the whole budget: admitted when nothing else is held
        assert budget.held == 500
        with pytest.raises(ServiceBusyError), budget.take(1):
            pass
    assert budget.held == 0


# ------------------------------------------------------------------------------ protocol level (second audit)


def test_trailer_fields_of_a_chunked_body_are_bounded_and_never_answered(world, front_end):
    """A chunked upload followed by endless trailer fields: uvicorn's httptools protocol appended each to the
    request's headers (2 GB in 4 s from one socket, then a 200); now the connection is closed once they pass the
    header bound (h11 refuses them itself), and no answer comes."""
    query = good_query(world)
    head = (
        b"POST /search?k=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with (
        serving(world, front_end, header_timeout_s=WAIT_S, body_timeout_s=WAIT_S) as (_, url),
        socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as sock,
    ):
        sock.sendall(head + b"%x\r\n" % len(query) + query + b"\r\n0\r\n")
        trailers = b"a: b\r\n" * 10_000  # 60 KB a write, 4 MB in all
        try:
            for _ in range(70):
                sock.sendall(trailers)
            sock.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server while sending: the point
        answer = _read_until_closed(sock)
    assert not answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_a_client_that_reads_none_of_its_answers_is_cut_off_at_the_send_deadline(world, front_end):
    """One connection (the only one allowed) pipelines requests for the web page and never reads: the server's
    writes block. It held its slot for ever (every other client got 503); now it is aborted --send-timeout
    after its writes blocked, and other clients are served again."""
    with serving(world, front_end, send_timeout_s=0.5, max_connections=1, header_timeout_s=WAIT_S) as (_, url):
        port = _port(url)
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.connect(("127.0.0.1", port))
        hog.settimeout(2.0)
        try:
            # stopped by a timeout when the server stops reading (or a reset once it cut the client off)
            with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
                hog.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2000)
            started = time.monotonic()
            while True:  # a new client: 503 while the hog holds the slot, then served
                with httpx.Client(base_url=url, timeout=WAIT_S) as client:
                    if client.get("/health").status_code == 200:
                        break
                assert time.monotonic() - started < WAIT_S, "the connection that reads nothing is still held"
                time.sleep(0.1)
        finally:
            hog.close()


def _answer_to_raw_bytes(world: dict, front_end: dict[str, str], data: bytes) -> bytes:
    """What a fresh server sends back to ``data`` on one new connection, until it closes it."""
    with (
        serving(world, front_end, header_timeout_s=WAIT_S) as (_, url),
        socket.create_connection(("127.0.0.1", _port(url)), timeout=WAIT_S) as sock,
    ):
        sock.sendall(data)
        return _read_until_closed(sock)


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_closed(world, front_end):
    """The smuggling shape: a proxy framing by Content-Length sees one request, a server framing by chunked two.
    h11 answered the first and then ran the hidden GET /metrics on the same connection; both front ends now
    answer 400 and close (llhttp did already)."""
    hidden = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    request = (
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % len(body)
    ) + body
    answer = _answer_to_raw_bytes(world, front_end, request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1 and b"raml_" not in answer  # the hidden request was not run


@pytest.mark.parametrize(
    "head",
    [
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",
    ],
    ids=["gzip-chunked", "no-host"],
)
def test_both_front_ends_refuse_the_same_ambiguous_framings(world, front_end, head):
    """llhttp let these through where h11 refused them (gzip before chunked, read as chunked; HTTP/1.1 without
    Host): differences a proxy in front could be made to read otherwise. Both now answer 400 and close. (A
    Content-Length given twice with one value h11 merges into one, as a proxy would read it; llhttp refuses it.)"""
    answer = _answer_to_raw_bytes(world, front_end, head)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
