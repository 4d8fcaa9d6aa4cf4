"""``raml serve``'s HTTP front end (issue 20): httptools or h11, uvloop or asyncio, and small images decoded on the
event loop instead of a worker thread. The connection defences of both protocols are tested in
``test_serve_limits.py`` (parametrised by the ``front_end`` fixture)."""

from __future__ import annotations

import argparse
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

import raml.deploy.service.connections as connections  # noqa: E402
from raml.cli import serve as serve_cli  # noqa: E402
from raml.deploy.service import SearchService, ServiceLimits, TorchQueryEmbedder  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.deploy.service.decode import QueryImageError, open_query_image  # noqa: E402
from raml.models import load_network  # noqa: E402

QR, DR = 32, 48
WAIT_S = 20.0


@pytest.mark.parametrize(
    ("asked", "installed", "expected"),
    [
        ("auto", True, "httptools"),
        ("auto", False, "h11"),
        ("httptools", True, "httptools"),
        ("h11", True, "h11"),
        ("h11", False, "h11"),
    ],
)
def test_auto_takes_httptools_where_installed_and_h11_otherwise(monkeypatch, asked, installed, expected):
    monkeypatch.setattr(connections, "_importable", lambda module: installed)
    assert connections.resolve_http(asked) == expected
    assert connections.resolve_loop(asked.replace("httptools", "uvloop").replace("h11", "asyncio")) == (
        expected.replace("httptools", "uvloop").replace("h11", "asyncio")
    )


def test_a_front_end_that_is_not_installed_or_unknown_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(connections, "_importable", lambda module: False)
    with pytest.raises(ImportError, match=r"pip install raml\[serve\]"):
        connections.resolve_http("httptools")
    with pytest.raises(ImportError, match="uvloop"):
        connections.resolve_loop("uvloop")
    with pytest.raises(ValueError, match="auto, httptools, h11"):
        connections.resolve_http("http2")
    with pytest.raises(ValueError, match="auto, uvloop, asyncio"):
        connections.resolve_loop("trio")


def test_server_options_give_each_protocol_its_limits():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    h11 = connections.server_options(2.5, 7, http="h11", loop="asyncio")
    assert issubclass(h11["http"], H11Protocol) and h11["loop"] == "asyncio"
    assert (h11["http"].header_timeout_s, h11["http"].max_connections) == (2.5, 7)
    pytest.importorskip("httptools")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    fast = connections.server_options(2.5, 7, http="httptools", loop="asyncio", max_header_bytes=1000)
    assert issubclass(fast["http"], HttpToolsProtocol)
    assert (fast["http"].header_timeout_s, fast["http"].max_connections, fast["http"].max_header_bytes) == (
        2.5,
        7,
        1000,
    )


def test_raml_serve_takes_its_front_end_from_flags():
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers())
    base = ["serve", "--index", "x", "--network-path", "n"]
    args = parser.parse_args(base)
    assert (args.http, args.loop, args.inline_decode_pixels) == ("auto", "auto", serve_cli_default())
    args = parser.parse_args([*base, "--http", "h11", "--loop", "asyncio", "--inline-decode-pixels", "0"])
    assert (args.http, args.loop, args.inline_decode_pixels) == ("h11", "asyncio", 0)
    for bad in (["--http", "http2"], ["--loop", "trio"], ["--inline-decode-pixels", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])


def serve_cli_default() -> int:
    from raml.deploy.service.decode import DEFAULT_INLINE_DECODE_PIXELS

    return DEFAULT_INLINE_DECODE_PIXELS


def jpeg(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_open_query_image_reads_the_header_only():
    assert open_query_image(jpeg(40)).size == (40, 40)
    assert open_query_image(jpeg(40)[: len(jpeg(40)) // 2]).size == (40, 40)  # the header is enough
    for data, status in ((b"not an image", 415), (b"", 400)):
        with pytest.raises(QueryImageError) as refused:
            open_query_image(data)
        assert refused.value.status == status


@pytest.fixture(scope="module")
def world(indexed_synth_world) -> dict:
    return indexed_synth_world(DR)


def test_small_images_are_decoded_on_the_event_loop_and_answer_as_in_a_thread(world, front_end, monkeypatch):
    small, large = jpeg(40, 1), jpeg(41, 2)
    answers: dict[int, dict[str, list]] = {}
    opens: list[int] = []  # PIL's header parsing, once per upload (it was twice on the loop: 80 us each)
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *args, **kwargs: opens.append(1) or real_open(fp, *args, **kwargs))
    embedder = TorchQueryEmbedder(load_network(world["nets"]["student"]), torch.device("cpu"), QR)
    for threshold in (0, 40 * 40):  # every image in a thread; images up to 40 x 40 on the event loop
        service = SearchService(embedder, world["index"], ServiceLimits(max_batch=1, max_pixels=1_000_000))
        prepared_in: list[tuple[int | None, str]] = []
        prepare = service.prepare

        def recording_prepare(opened, size, prepare=prepare, prepared_in=prepared_in):
            prepared_in.append((opened.width * opened.height, threading.current_thread().name))
            return prepare(opened, size)

        service.prepare = recording_prepare
        options = connections.server_options(10.0, 16, **front_end)
        with (
            BackgroundServer(create_app(service, inline_decode_pixels=threshold), options=options) as running,
            httpx.Client(base_url=running.url, timeout=WAIT_S) as client,
        ):
            answers[threshold] = {}
            for name, data in (("small", small), ("large", large)):
                opens.clear()
                response = client.post("/search", params={"k": 5}, content=data, headers={"content-type": "image/jpeg"})
                assert response.status_code == 200, response.text
                assert len(opens) == 1, (threshold, name)
                answers[threshold][name] = [(hit["id"], hit["score"]) for hit in response.json()["results"]]
            truncated = client.post("/search", content=small[: len(small) // 2], headers={"content-type": "image/jpeg"})
            assert truncated.status_code == 400, truncated.text  # refused on the loop as in a thread
            assert client.post("/search", content=small, headers={"content-type": "image/jpeg"}).status_code == 200
        on_loop = {pixels: name == "raml-uvicorn" for pixels, name in prepared_in}  # the event loop's thread
        assert on_loop == {1600: threshold >= 1600, 41 * 41: False}, prepared_in
    assert answers[0] == answers[1600]  # the same answers, wherever the image was decoded


def test_raml_serve_freezes_its_start_up_objects_before_serving(world, monkeypatch):
    """Full collections would otherwise scan the ~450,000 objects of torch, faiss and the web stack while serving
    (140-300 ms pauses of the whole process on the project's machine)."""
    import gc

    import uvicorn

    from raml.cli import main as cli_main

    seen: dict[str, object] = {}

    def fake_run(app, **options):  # record what serving would start with, instead of serving
        seen["frozen"] = gc.get_freeze_count()
        seen["http"], seen["loop"] = options["http"].__name__, options["loop"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    parser = cli_main.build_parser()
    argv = ["serve", "--index", str(world["index"]), "--network-path", str(world["nets"]["student"])]
    args = parser.parse_args([*argv, "--image-size", str(QR), "--device", "cpu", "--http", "h11", "--loop", "asyncio"])
    gc.unfreeze()
    try:
        assert args.func(args) == 0
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 10_000, seen  # torch alone holds far more
    assert (seen["http"], seen["loop"]) == ("RamlH11Protocol", "asyncio")
