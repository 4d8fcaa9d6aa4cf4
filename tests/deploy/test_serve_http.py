"""``raml serve``'s HTTP rules beyond the limits of ``test_serve_limits.py``: the default k within ``--max-k``.

Each server runs on 127.0.0.1 (a free port) on both HTTP front ends; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

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
WAIT_S = 20.0


@pytest.fixture(scope="module")
def world(indexed_synth_world) -> dict:
    """The session's indexed synth-test (20 images) and one untraced student at QR for the module's services."""
    world = indexed_synth_world(DR)
    embedder = TorchQueryEmbedder(load_network(world["nets"]["student"]), torch.device("cpu"), QR, graph=False)
    return {**world, "embedder": embedder}


@contextlib.contextmanager
def client_of(world: dict, front_end: dict[str, str], **limits) -> Iterator[httpx.Client]:
    """An HTTP client of a service over the test index with ``limits`` (ServiceLimits fields) on ``front_end``;
    ``client.service`` is the service."""
    service = SearchService(world["embedder"], world["index"], ServiceLimits(**limits))
    options = server_options(service.limits.header_timeout_s, service.limits.max_connections, **front_end)
    with (
        BackgroundServer(create_app(service), options=options) as running,
        httpx.Client(base_url=running.url, timeout=WAIT_S) as client,
    ):
        client.service = service
        yield client


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def query(world: dict) -> dict:
    return {"content": Path(world["paths"][1]).read_bytes(), "headers": {"content-type": "image/jpeg"}}


def test_a_request_without_k_gets_at_most_max_k_results(world, front_end):
    """Before, a request that gave no k got the default 10 results from a server started with --max-k 5."""
    with client_of(world, front_end, max_k=5) as client:
        answer = client.post("/search", **query(world))
        assert answer.status_code == 200, answer.text
        assert answer.json()["k"] == 5 and len(answer.json()["results"]) == 5
        assert client.get("/health").json()["limits"]["max_k"] == 5  # what the web page bounds its k box by
        refused = client.post("/search", params={"k": 6}, **query(world))
        assert refused.status_code == 400 and "between 1 and 5" in refused.json()["error"]
    with client_of(world, front_end) as client:  # the default max_k (100): 10 results
        answer = client.post("/search", **query(world))
        assert answer.json()["k"] == 10 and len(answer.json()["results"]) == 10


def test_an_image_id_of_many_digits_is_a_counted_404_without_a_traceback(world, front_end, caplog):
    """Before, Starlette's int convertor took /image/<5,000 digits> and int() raised in the handler: a 500, a
    2.3 KB traceback logged for each such request, and nothing counted in /metrics."""
    with client_of(world, front_end) as client:
        for bad in ("9" * 5000, "1" * 19, "-1", "7a", "%2e%2e"):
            refused = client.get(f"/image/{bad}")
            assert refused.status_code == 404, (bad[:30], refused.text[:200])
            assert "ids are integers from 0 to 19" in refused.json()["error"]
            assert len(refused.content) < 300  # the id is not echoed in full
        assert client.get("/image/7").status_code == 200
        text = client.get("/metrics").text
    assert 'raml_requests_total{route="image",status="404"} 5.0' in text
    assert 'status="500"' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_starlettes_own_errors_are_json_counted_and_a_crash_is_logged_once(world, front_end):
    """Before, a path with no route (404), a method a route does not take (405) and an unexpected exception (500)
    were Starlette's text/plain answers, none counted in /metrics; and uvicorn logged the 500's traceback."""
    collected = Collected()
    with client_of(world, front_end) as client:
        for name in ("raml", "uvicorn.error"):  # the service's log, and the server's (which does not propagate)
            logging.getLogger(name).addHandler(collected)
        try:
            missing = client.get("/nope/" + "x" * 500)
            assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
            assert "POST /search" in missing.json()["error"] and len(missing.content) < 400
            for method in ("GET", "PUT"):
                wrong = client.request(method, "/search")
                assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
                assert f"{method} is not allowed on /search; use POST" in wrong.json()["error"]
            assert sorted(client.delete("/health").headers["allow"].split(", ")) == ["GET", "HEAD"]

            def broken() -> dict:
                raise RuntimeError("secret detail of the failure")

            client.service.health = broken
            crashed = client.get("/health")
            assert crashed.status_code == 500 and crashed.headers["content-type"] == "application/json"
            assert "secret detail" not in crashed.text and "Traceback" not in crashed.text
            assert crashed.json()["error"]
            assert client.get("/metrics").status_code == 200  # served on, on the same connection
            text = client.get("/metrics").text
        finally:
            for name in ("raml", "uvicorn.error"):
                logging.getLogger(name).removeHandler(collected)
    assert 'raml_requests_total{route="other",status="404"} 1.0' in text
    assert 'raml_requests_total{route="search",status="405"} 2.0' in text
    assert 'raml_requests_total{route="health",status="405"} 1.0' in text
    assert 'raml_requests_total{route="health",status="500"} 1.0' in text
    logged = [r for r in collected.records if r.exc_info and "secret detail" in str(r.exc_info[1])]
    assert len(logged) == 1 and logged[0].name.startswith("raml"), [(r.name, r.getMessage()) for r in logged]
