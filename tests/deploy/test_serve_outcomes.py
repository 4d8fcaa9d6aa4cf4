"""``raml serve``: what happens to a request the service does not answer with a result, and how ``/metrics`` counts
it: a client that leaves while its query is queued (the query is dropped, counted as 499), a full queue (refused
before decoding), connections refused by the connection cap or the header deadline (counted)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

from raml.deploy.service import SearchService, ServiceLimits, TorchQueryEmbedder  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.deploy.service.connections import server_options  # noqa: E402
from raml.models import load_network  # noqa: E402

QR, DR = 32, 48
WAIT_S = 20.0  # bound of every wait
EMBED_S = 0.5  # the slowed student's cost of one query


@pytest.fixture(scope="module")
def world(indexed_synth_world) -> dict:
    made = dict(indexed_synth_world(DR))
    made["embedder"] = TorchQueryEmbedder(load_network(made["nets"]["student"]), torch.device("cpu"), QR)
    return made


class Slowed:
    """The real student, ``EMBED_S`` slower per query, counting the queries it embeds and the forward passes in
    progress."""

    def __init__(self, real: TorchQueryEmbedder) -> None:
        self.real, self.embedded, self.busy = real, 0, 0
        self.sizes, self.default_size, self.output_dim = real.sizes, real.default_size, real.output_dim
        self.teacher_sha256, self.transform, self.describe = None, real.transform, real.describe

    def embed(self, images: torch.Tensor) -> np.ndarray:
        self.embedded += images.shape[0]
        self.busy += 1
        try:
            time.sleep(EMBED_S * images.shape[0])
            return self.real.embed(images)
        finally:
            self.busy -= 1


@contextlib.contextmanager
def serving(world: dict, front_end: dict[str, str], embedder=None, **limits) -> Iterator[tuple[SearchService, str]]:
    """A service on ``front_end`` with ``limits``, its connection refusals counted in its metrics (as raml serve)."""
    service = SearchService(embedder or world["embedder"], world["index"], ServiceLimits(**limits))
    options = server_options(
        service.limits.header_timeout_s,
        service.limits.max_connections,
        on_refusal=service.metrics.record_connection_refusal,
        **front_end,
    )
    with BackgroundServer(create_app(service), options=options) as running:
        yield service, running.url


def query(world: dict) -> bytes:
    return Path(world["paths"][1]).read_bytes()


def counted(url: str, series: str) -> float:
    text = httpx.get(url + "/metrics", timeout=WAIT_S).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_that_leaves_while_its_query_is_queued_has_it_dropped_and_counted_as_499(world, front_end):
    """Six clients at once against forward passes of one query at 0.5 s each, every client giving up after 0.3 s:
    the queries still queued when their clients leave are never embedded, and none of the six is counted as a 200;
    each is counted under status 499."""
    clients = 6
    student = Slowed(world["embedder"])
    limits = dict(max_batch=1, max_wait_ms=0, queue_size=64, max_queue_wait_ms=60000, max_uploads=64, max_decodes=64)
    with serving(world, front_end, student, **limits) as (service, url):
        data = query(world)

        def give_up(_: int) -> str:
            with httpx.Client(base_url=url, timeout=0.3) as client:
                try:
                    return str(client.post("/search", content=data, headers={"content-type": "image/jpeg"}).status_code)
                except httpx.TimeoutException:
                    return "gave up"

        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(give_up, range(clients)))
        assert outcomes.count("gave up") == clients, outcomes
        gone = 'raml_requests_total{route="search",status="499"}'
        wait_for(lambda: counted(url, gone) == clients, "every client that left is counted as 499")
        wait_for(lambda: service.batcher.depth == 0 and student.busy == 0, "the queue drains")
        assert student.embedded < clients
        assert counted(url, 'raml_requests_total{route="search",status="200"}') == 0
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:  # a client that waits is still answered
            response = client.post("/search", content=data, headers={"content-type": "image/jpeg"})
        assert response.status_code == 200, response.text


def test_a_full_queue_refuses_a_query_before_its_image_is_decoded(world, front_end):
    """--queue-size 2, forward passes of one query at 0.5 s each, 20 requests at once: the queries queued and those
    being decoded never exceed the queue, so every image decoded is answered, and the others get 503 (reason
    ``queue``) without a decode."""
    requests = 20
    student = Slowed(world["embedder"])
    limits = dict(max_batch=1, max_wait_ms=0, queue_size=2, max_queue_wait_ms=60000, max_uploads=64, max_decodes=64)
    with serving(world, front_end, student, **limits) as (service, url):
        decoded = []
        lock = threading.Lock()

        def counting(transform):
            def run(image):
                with lock:
                    decoded.append(1)
                return transform(image)

            return run

        service.transforms = {size: counting(transform) for size, transform in service.transforms.items()}
        data = query(world)
        pool_limits = httpx.Limits(max_connections=requests)
        with (
            httpx.Client(base_url=url, timeout=WAIT_S, limits=pool_limits) as client,
            ThreadPoolExecutor(requests) as pool,
        ):
            post = lambda _: client.post("/search", content=data, headers={"content-type": "image/jpeg"})  # noqa: E731
            statuses = list(pool.map(post, range(requests)))
        codes = [response.status_code for response in statuses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0, codes
        assert len(decoded) == codes.count(200), (len(decoded), codes)
        assert all("--queue-size" in r.json()["error"] for r in statuses if r.status_code == 503)
        assert counted(url, 'raml_shed_total{reason="queue"}') == codes.count(503)


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT_S)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_connections_refused_by_the_connection_cap_and_the_header_deadline_are_counted(world, front_end):
    """--max-connections 2 held by two silent clients: five more connections get 503 at once, counted as shed
    (reason ``connections``); the two silent ones then get 408 at the header deadline, counted too."""
    with serving(world, front_end, max_connections=2, header_timeout_s=1.0) as (service, url):
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(2)]
        try:
            time.sleep(0.2)  # let the server register the two
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as extra:
                    assert _read_until_closed(extra).startswith(b"HTTP/1.1 503 ")
            for sock in held:
                assert _read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        finally:
            for sock in held:
                sock.close()
        registry = service.metrics.registry
        assert registry.get_sample_value("raml_shed_total", {"reason": "connections"}) == 5
        assert registry.get_sample_value("raml_connection_refusals_total", {"status": "503"}) == 5
        assert registry.get_sample_value("raml_connection_refusals_total", {"status": "408"}) == 2


def test_an_idle_keep_alive_connection_is_closed_at_the_header_deadline_without_a_408(world, front_end):
    """After an answer, a connection that sends nothing is closed quietly (no request timed out: nothing counted);
    one that sends part of its next request's headers, after the answer or pipelined with the answered request,
    gets the 408, counted."""
    with serving(world, front_end, header_timeout_s=0.5) as (service, url):
        port = int(url.rsplit(":", 1)[1])
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        cases = (
            (b"", b"", b""),  # idle after the answer: closed quietly
            (b"", b"GET /health HTTP/1.1\r\nHo", b"HTTP/1.1 408 "),  # part of a next request after the answer
            (b"GET /health HTTP/1.1\r\nHo", b"", b"HTTP/1.1 408 "),  # the same part pipelined with the request
        )
        for pipelined, partial, expected in cases:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
                sock.sendall(request + pipelined)
                answer = b""
                while b'"ready"' not in answer:  # the whole /health answer (a small JSON body)
                    chunk = sock.recv(65536)
                    assert chunk, answer
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 ")
                sock.sendall(partial)
                rest = _read_until_closed(sock)
                assert rest.startswith(expected) and (expected or rest == b""), rest[:200]
        registry = service.metrics.registry
        assert registry.get_sample_value("raml_connection_refusals_total", {"status": "408"}) == 2
