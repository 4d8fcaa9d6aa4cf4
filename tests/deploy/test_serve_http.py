"""``raml serve``'s HTTP rules beyond the limits of ``test_serve_limits.py``: the default k within ``--max-k``,
image ids, Starlette's own errors as counted JSON, the Host and Origin checks against DNS rebinding.

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

from raml.cli import main as cli_main  # noqa: E402
from raml.deploy.service import SearchService, ServiceLimits, TorchQueryEmbedder  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.deploy.service.connections import server_options  # noqa: E402
from raml.deploy.service.hosts import HostRules, allowed_host_name  # noqa: E402
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
def client_of(
    world: dict, front_end: dict[str, str], hosts: HostRules | None = None, **limits
) -> Iterator[httpx.Client]:
    """An HTTP client of a service over the test index with ``limits`` (ServiceLimits fields) and ``hosts`` on
    ``front_end``; ``client.service`` is the service."""
    service = SearchService(world["embedder"], world["index"], ServiceLimits(**limits))
    options = server_options(service.limits.header_timeout_s, service.limits.max_connections, **front_end)
    with (
        BackgroundServer(create_app(service, hosts=hosts), options=options) as running,
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


def query(world: dict, **headers: str) -> dict:
    """``client.post("/search", **query(world, ...))``: a JPEG as the raw body, with more ``headers``."""
    content = Path(world["paths"][1]).read_bytes()
    return {"content": content, "headers": {"content-type": "image/jpeg", **headers}}


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


def test_a_request_naming_another_host_is_refused_against_dns_rebinding(world, front_end):
    """Before, a page of attacker.test that a rebinding DNS server pointed at 127.0.0.1 read /health and /image and
    ran searches (the requests said Host: attacker.test:PORT); the same-origin clients are answered as before."""
    with client_of(world, front_end) as client:
        port = client.base_url.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST.", "127.0.0.1"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        for host in (f"attacker.test:{port}", "127.0.0.1.attacker.test", "[::2]", "a b", f"localhost:{port}x"):
            refused = client.get("/health", headers={"host": host})
            assert refused.status_code == 421 and refused.headers["connection"] == "close", host
            assert f"Host {host!r} is not a name this service answers to" in refused.json()["error"]
        named = client.get("/image/0", headers={"host": f"attacker.test:{port}"}).json()["error"]
        assert "--allowed-host attacker.test" in named and "DNS rebinding" in named
        search = client.post("/search", **query(world, host=f"attacker.test:{port}"))
        assert search.status_code == 421
        # a POST from a page of another origin (a "simple" request: no preflight) is refused; its own page's is not
        for origin in (
            f"http://attacker.test:{port}",
            "null",
            f"http://127.0.0.1:{port + 1}",
            f"http://localhost:{port}",
        ):
            foreign = client.post("/search", **query(world, origin=origin))
            assert foreign.status_code == 403 and origin in foreign.json()["error"], origin
        own = client.post("/search", **query(world, origin=f"http://127.0.0.1:{port}"))
        assert own.status_code == 200 and client.post("/search", **query(world)).status_code == 200
        text = client.get("/metrics").text
    assert 'raml_requests_total{route="health",status="421"} 5.0' in text
    assert 'raml_requests_total{route="search",status="403"} 4.0' in text
    named_rules = HostRules(["search.example.org", "[fd00::1]"], bind_host="0.0.0.0")
    with client_of(world, front_end, hosts=named_rules) as client:
        assert client.get("/health", headers={"host": "search.example.org"}).status_code == 200
        assert client.get("/health", headers={"host": "[fd00::1]:8000"}).status_code == 200
        assert client.get("/health", headers={"host": "0.0.0.0"}).status_code == 421
        behind_tls = {"host": "search.example.org", "origin": "https://search.example.org"}  # a TLS proxy's
        assert client.post("/search", **query(world, **behind_tls)).status_code == 200
    with client_of(world, front_end, hosts=HostRules(["*"])) as client:
        assert client.get("/health", headers={"host": "anything.example"}).status_code == 200
        foreign = {"host": "anything.example", "origin": "http://attacker.test"}
        assert client.post("/search", **query(world, **foreign)).status_code == 403


def test_allowed_host_names_and_the_cli_flag(capsys):
    assert [allowed_host_name(v) for v in ("Search.Example.org.", "[::1]", "::1", "10.0.0.5", "*")] == [
        "search.example.org",
        "::1",
        "::1",
        "10.0.0.5",
        "*",
    ]
    for bad in ("example.org:8000", "http://example.org", "a/b", "", "-x.org"):
        with pytest.raises(ValueError, match="is not a host name or an IP address"):
            allowed_host_name(bad)
    assert HostRules(bind_host="0.0.0.0").describe() == ["127.0.0.1", "::1", "localhost"]
    assert "192.168.1.5" in HostRules(bind_host="192.168.1.5").describe()
    assert HostRules.same_origin("http://a.org", "a.org") and HostRules.same_origin("https://a.org", "a.org:443")
    assert not HostRules.same_origin("http://a.org:81", "a.org") and not HostRules.same_origin("http://b.org", "a.org")
    argv = ["serve", "--index", "idx", "--network-path", "net.pth", "--allowed-host", "a.org,b.org:80"]
    assert cli_main.main(argv) == 2  # refused before anything is loaded
    err = capsys.readouterr().err.strip()
    assert err.startswith("raml serve: error: --allowed-host 'b.org:80' is not a host name") and "\n" not in err


@pytest.mark.parametrize("host", ["http://0.0.0.0", "127.0.0.1:8000", "*", "a/b"])
def test_a_bad_host_to_bind_is_refused_naming_host_not_allowed_host(host, capsys):
    with pytest.raises(ValueError, match=r"^--host .* is not an IP address or a host name to bind"):
        HostRules(bind_host=host)
    argv = ["serve", "--index", "idx", "--network-path", "net.pth", "--host", host]
    assert cli_main.main(argv) == 2  # refused before anything is loaded
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raml serve: error: --host {host!r} is not an IP address") and "\n" not in err
    assert "--allowed-host" not in err


def test_a_proxy_that_drops_the_port_from_host_is_named_in_the_403_and_the_docs_keep_it():
    """Behind nginx on port 8080 with ``proxy_set_header Host $host`` (no port) the service's own page (Origin
    http://search.example.org:8080) was refused with a 403 that named no cause; docs/deployment.md documented it."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from raml.deploy.service.app import ServiceApp
    from raml.deploy.service.metrics import ServiceMetrics

    async def search(request):  # noqa: ARG001
        return JSONResponse({"results": []})

    inner = Starlette(routes=[Route("/search", search, methods=["POST"])])
    app = ServiceApp(inner, ServiceMetrics(), HostRules(["search.example.org"], bind_host="127.0.0.1"))
    origin = "http://search.example.org:8080"
    with TestClient(app) as client:
        dropped = client.post("/search", headers={"host": "search.example.org", "origin": origin}, content=b"x")
        assert dropped.status_code == 403
        assert "a reverse proxy may have dropped the port from Host" in dropped.json()["error"]
        assert "proxy_set_header Host $http_host" in dropped.json()["error"]
        kept = client.post("/search", headers={"host": "search.example.org:8080", "origin": origin}, content=b"x")
        assert kept.status_code == 200
        other = client.post("/search", headers={"host": "search.example.org", "origin": "http://a.test:8080"})
        assert other.status_code == 403 and "dropped the port" not in other.json()["error"]
    assert not HostRules.port_dropped("https://search.example.org", "search.example.org")  # default port: none
    assert not HostRules.port_dropped(origin, "search.example.org:8081")  # a port given: not dropped
    deployment = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert "proxy_set_header Host $host;" not in deployment and deployment.count("$http_host;") >= 2


def test_the_url_raml_serve_logs_is_answered_when_bound_to_every_interface():
    """Bound to 0.0.0.0, raml serve logged http://0.0.0.0:8000/, whose Host (0.0.0.0) the service refuses (421)."""
    from urllib.parse import urlsplit

    from raml.cli.serve import local_url

    for bind, url in (
        ("0.0.0.0", "http://127.0.0.1:8000/"),
        ("::", "http://[::1]:8000/"),
        ("127.0.0.1", "http://127.0.0.1:8000/"),
        ("fd00::5", "http://[fd00::5]:8000/"),
        ("search.example.org", "http://search.example.org:8000/"),
    ):
        assert local_url(bind, 8000) == url, bind
        assert HostRules(bind_host=bind).allows_host(urlsplit(url).netloc), bind
