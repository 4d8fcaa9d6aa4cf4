"""``raml serve``: the HTTP API of a real server on 127.0.0.1 (a free port) with a real HTTP client.

A tiny teacher indexes a generated dataset; a tiny student queries it. Results are checked against ``raml search``
(and a plain numpy ranking); batching, load shedding, bad inputs and an index generation committed while clients
query are exercised against the running server.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import threading
import time
import zlib
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

from raml.cli import main as cli_main  # noqa: E402
from raml.cli import serve as serve_cli  # noqa: E402
from raml.deploy import index_images, load_index  # noqa: E402
from raml.deploy.search import check_query_dim  # noqa: E402
from raml.deploy.service import (  # noqa: E402
    LiveIndex,
    MicroBatcher,
    QueryImageError,
    SearchService,
    ServiceLimits,
    ServiceMetrics,
    TorchQueryEmbedder,
    decode_query_image,
)
from raml.deploy.service.admission import RecentQuantile  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.deploy.service.connections import server_options  # noqa: E402
from raml.deploy.service.overload import OverloadGate  # noqa: E402
from raml.models import checkpoint_sha256, load_network  # noqa: E402
from raml.retrieval.extract import extract_embeddings  # noqa: E402

QR, DR = 32, 48
CPU = torch.device("cpu")
WAIT_S = 20.0  # bound of every wait loop


@pytest.fixture(scope="module")
def world(indexed_synth_world) -> dict:
    """Generated data (synth-test: 4 classes x 5 images), a 16-d teacher and student, an index of synth-test."""
    return indexed_synth_world(DR)


def student_embedder(world: dict, image_sizes: list[int] | None = None) -> TorchQueryEmbedder:
    """The student at QR, or at ``image_sizes`` as a multi-size student; loaded and traced once per module and
    sizes (it holds no state of a service)."""
    built = world.setdefault("embedders", {})
    key = tuple(image_sizes or ())
    if key not in built:
        network = load_network(world["nets"]["student"])
        if image_sizes is not None:
            network.meta["image_sizes"] = image_sizes
        built[key] = TorchQueryEmbedder(network, CPU, None if image_sizes else QR)
    return built[key]


def serving(service: SearchService, front_end: dict[str, str]) -> BackgroundServer:
    """``service`` on loopback with ``raml serve``'s connection handling on the front end ``front_end``."""
    options = server_options(service.limits.header_timeout_s, service.limits.max_connections, **front_end)
    return BackgroundServer(create_app(service), options=options)


@pytest.fixture(scope="module")
def server(world, front_end):
    """One running service: student at 32 px (48 px also served), batches of up to 8, small input limits."""
    limits = ServiceLimits(max_batch=8, max_wait_ms=100, queue_size=64, max_bytes=100_000, max_pixels=1_000_000)
    service = SearchService(student_embedder(world, image_sizes=[QR, 48]), world["index"], limits)
    with serving(service, front_end) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        yield {"service": service, "client": client, "url": running.url}


def post_file(client, path: str, k: int = 5, multipart: bool = True, **params):
    data = Path(path).read_bytes()
    query = {"k": k, **params}
    if multipart:
        return client.post("/search", params=query, files={"image": (Path(path).name, data, "image/jpeg")})
    return client.post("/search", params=query, content=data, headers={"content-type": "image/jpeg"})


def shown(index, path: str) -> str:
    """A database path as the service shows it: relative to the folder holding the index's images."""
    return os.path.relpath(path, os.path.commonpath([os.path.dirname(p) for p in index.paths]))


def metric(text: str, name: str, missing: float | None = None) -> float:
    """The sample ``name`` of ``/metrics``; ``missing`` where a labelled counter has not been created yet (else the
    sample must be there)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.MULTILINE)
    if match is None and missing is not None:
        return missing
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# ------------------------------------------------------------------------------------------------ results


def test_results_equal_raml_search_and_a_numpy_ranking(world, server, tmp_path):
    queries = world["paths"][::4]
    out = tmp_path / "search.json"
    code = cli_main.main(
        ["search", "--network-path", str(world["nets"]["student"]), "--image-size", str(QR), "--index"]
        + [str(world["index"]), "--k", "5", "--json", str(out), "--device", "cpu", "--workers", "0", "--no-progress"]
        + queries
    )
    assert code == 0
    expected = json.loads(out.read_text())
    index = load_index(world["index"])
    student = load_network(world["nets"]["student"])
    query_embeddings = extract_embeddings(student, queries, QR, CPU, progress=False).numpy()
    for i, (path, want) in enumerate(zip(queries, expected)):
        response = post_file(server["client"], path, multipart=i % 2 == 0)
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["k"] == 5 and got["size"] == QR and got["generation"] == index.generation
        assert [h["path"] for h in got["results"]] == [shown(index, h["path"]) for h in want["results"]]
        got_scores, want_scores = [h["score"] for h in got["results"]], [h["score"] for h in want["results"]]
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        # an independent ranking: every database embedding's inner product with the query, sorted
        scores = index.embeddings @ query_embeddings[i]
        order = np.argsort(-scores, kind="stable")[:5]
        assert [h["id"] for h in got["results"]] == order.tolist()
        assert [h["rank"] for h in got["results"]] == [1, 2, 3, 4, 5]
        assert [h["label"] for h in got["results"]] == index.labels[order].tolist()
        assert set(got["timings_ms"]) == {"read", "decode", "queue", "embed", "search", "total"}


def test_an_onnx_student_serves_the_results_of_raml_search_onnx(world, tmp_path, front_end):
    pytest.importorskip("onnxruntime")
    from raml.deploy import export_onnx
    from raml.deploy.service import OnnxQueryEmbedder

    onnx_file = tmp_path / "student.onnx"
    export_onnx(load_network(world["nets"]["student"]), QR, onnx_file, exporter="torchscript")
    queries = world["paths"][1:3]
    out = tmp_path / "search.json"
    argv = ["search", "--onnx", str(onnx_file), "--index", str(world["index"]), "--k", "4", "--json", str(out)]
    assert cli_main.main([*argv, "--workers", "0", "--no-progress", *queries]) == 0
    index = load_index(world["index"])
    service = SearchService(OnnxQueryEmbedder(onnx_file), world["index"], ServiceLimits(max_wait_ms=0))
    assert service.embedder.sizes == (QR,)
    with serving(service, front_end) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        assert client.get("/health").json()["networks"]["query"]["kind"] == "onnx"
        for path, want in zip(queries, json.loads(out.read_text())):
            got = post_file(client, path, k=4).json()["results"]
            assert [h["path"] for h in got] == [shown(index, h["path"]) for h in want["results"]]
            np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want["results"]], atol=1e-5)


def test_a_listed_query_size_is_served_and_others_are_refused_by_name(world, server):
    path = world["paths"][3]
    response = post_file(server["client"], path, k=3, size=48)
    assert response.status_code == 200 and response.json()["size"] == 48
    index = load_index(world["index"])
    query = extract_embeddings(load_network(world["nets"]["student"]), [path], 48, CPU, progress=False).numpy()[0]
    assert [h["id"] for h in response.json()["results"]] == np.argsort(-(index.embeddings @ query))[:3].tolist()
    refused = post_file(server["client"], path, size=40)
    assert refused.status_code == 400 and "allowed query sizes: 32, 48" in refused.json()["error"]


def test_health_and_images_by_id_only(world, server):
    client = server["client"]
    health = client.get("/health").json()
    assert health["ready"] is True
    assert health["index"]["size"] == 20 and health["index"]["generation"] == load_index(world["index"]).generation
    assert health["query_sizes"] == [QR, 48] and health["default_query_size"] == QR
    assert health["networks"]["query"]["path"] == Path(world["nets"]["student"]).name  # its name only
    assert health["index"]["name"] == "index"
    assert health["networks"]["database"]["sha256"] == checkpoint_sha256(world["nets"]["teacher"])
    image = client.get("/image/7")
    assert image.status_code == 200 and image.content == Path(world["paths"][7]).read_bytes()
    assert image.headers["content-type"] == "image/jpeg"
    for bad in ("/image/20", "/image/-1", "/image/..%2F..%2Fetc%2Fpasswd", "/image/" + world["paths"][0]):
        assert client.get(bad).status_code == 404, bad
    page = client.get("/")
    assert page.status_code == 200 and '<input id="file" type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: nothing from the internet


def _strings(value) -> list[str]:
    """Every string of a decoded JSON value, keys included."""
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (key, *_strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_health_and_search_show_no_absolute_server_path(world, server, tmp_path_factory):
    """An unauthenticated client learns no absolute path on the server: /health names the index folder and the
    networks' files by name, a /search answer gives each image's id and its path below the images' folder."""
    client = server["client"]
    built = str(tmp_path_factory.getbasetemp())  # every file of the test world is below it
    health = client.get("/health")
    answer = post_file(client, world["paths"][2], k=20)
    assert health.status_code == 200 and answer.status_code == 200
    assert built not in health.text and built not in answer.text
    for text in _strings(health.json()) + _strings(answer.json()):
        assert not os.path.isabs(text), text
    index = load_index(world["index"])
    hits = answer.json()["results"]
    assert len(hits) == 20
    for hit in hits:  # still what a client needs: the id names the image, the path its place in the database
        stored = index.paths[hit["id"]]
        assert stored.endswith(os.sep + hit["path"]) and Path(hit["path"]).parts[-2:] == Path(stored).parts[-2:]


def test_image_by_id_sends_only_image_files_whatever_the_index_lists(world, tmp_path):
    """An index whose path list names a text file and an HTML page (a crafted or tampered index folder): /image
    answers 404 for both, never their bytes; a real image is sent with its type and nosniff."""
    copies = [tmp_path / f"db{i}.jpg" for i in range(3)]
    for source, copy in zip(world["paths"], copies):
        copy.write_bytes(Path(source).read_bytes())
    index_dir = tmp_path / "index"
    sha = checkpoint_sha256(world["nets"]["teacher"])
    index_images(world["teacher"], [str(p) for p in copies], DR, index_dir, sha)
    secret, page = b"root:x:0:0:root:/root:/bin/bash\n", b"<html><script>alert(document.cookie)</script></html>"
    copies[1].write_bytes(secret)  # the files change after indexing: the service reads them at request time
    copies[2].write_bytes(page)
    service = SearchService(student_embedder(world), index_dir, ServiceLimits())
    with BackgroundServer(create_app(service)) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        image = client.get("/image/0")
        assert image.status_code == 200 and image.content == copies[0].read_bytes()
        assert image.headers["content-type"] == "image/jpeg" and image.headers["x-content-type-options"] == "nosniff"
        for image_id, content in ((1, secret), (2, page)):
            refused = client.get(f"/image/{image_id}")
            assert refused.status_code == 404 and content not in refused.content
            assert "not an image file" in refused.json()["error"]


# ------------------------------------------------------------------------------------------------ batching


def test_the_overload_margin_is_exported(server):
    service, client = server["service"], server["client"]
    batcher = service.batcher
    gate, overrun = batcher.overload, batcher.overrun
    try:
        batcher.overload, batcher.overrun = OverloadGate(), RecentQuantile(0.9)
        assert metric(client.get("/metrics").text, "raml_overload_margin_seconds") == 0.0  # not overloaded
        for _ in range(8):  # refusals on the predicted wait in every recent batch period
            batcher.overload.record_refused()
            batcher.overload.next_period()
        batcher.overrun.add(0.25)
        expected = (batcher.front_end.value or 0.0) + 2 * 0.25
        assert metric(client.get("/metrics").text, "raml_overload_margin_seconds") == pytest.approx(expected)
    finally:
        batcher.overload, batcher.overrun = gate, overrun


def test_concurrent_queries_are_embedded_together(world, server):
    client = server["client"]
    before = client.get("/metrics").text
    batches_before = metric(before, "raml_batch_size_count")
    ones_before = metric(before, 'raml_batch_size_bucket{le="1.0"}')
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post_file(client, p), world["paths"][:8]))
    assert [r.status_code for r in responses] == [200] * 8
    after = client.get("/metrics").text
    batches = metric(after, "raml_batch_size_count") - batches_before
    single = metric(after, 'raml_batch_size_bucket{le="1.0"}') - ones_before
    assert batches < 8 and single < batches  # fewer forward passes than queries: some held several queries
    assert max(r.json()["batch_size"] for r in responses) > 1
    assert metric(after, 'raml_requests_total{route="search",status="200"}') >= 8
    assert metric(after, "raml_queue_depth") == 0
    queries = metric(after, 'raml_queries_total{size="32"}') - metric(before, 'raml_queries_total{size="32"}', 0.0)
    assert queries == 8  # (the counter of a size appears with its first query: none when this test runs first)
    assert metric(after, "raml_queue_seconds_count") - metric(before, "raml_queue_seconds_count") == 8
    # batched results are the single-query ones
    index = load_index(world["index"])
    embeddings = extract_embeddings(load_network(world["nets"]["student"]), world["paths"][:8], QR, CPU, progress=False)
    for response, query in zip(responses, embeddings.numpy()):
        assert [h["id"] for h in response.json()["results"]] == np.argsort(-(index.embeddings @ query))[:5].tolist()


def test_batches_hold_one_query_size_each(world):
    index = load_index(world["index"])
    shapes: list[tuple[int, ...]] = []

    def embed(images: torch.Tensor) -> np.ndarray:
        shapes.append(tuple(images.shape))
        return index.embeddings[: images.shape[0]]

    batcher = MicroBatcher(embed, lambda: index, max_batch=6, max_wait_s=5.0, queue_size=6)
    batcher.start()
    try:
        futures = [batcher.submit(torch.zeros(3, s, s), s, k=4) for s in (8, 12, 8, 12, 8, 12)]
        results = [f.result(timeout=WAIT_S) for f in futures]
    finally:
        batcher.stop()
    assert sorted(shapes) == [(3, 3, 8, 8), (3, 3, 12, 12)]  # one batch of six, one forward pass per size
    for row, result in enumerate(results):
        expected = np.argsort(-(index.embeddings @ index.embeddings[row // 2]), kind="stable")[:4]
        assert result.ids.tolist() == expected.tolist() and result.batch_size == 3


def test_a_lone_query_is_not_held_back_when_none_is_arriving(world):
    index = load_index(world["index"])
    asked: list[int] = []

    def arriving() -> int:
        asked.append(1)
        return 0

    embed = lambda images: index.embeddings[: images.shape[0]]  # noqa: E731
    batcher = MicroBatcher(embed, lambda: index, max_batch=8, max_wait_s=10 * WAIT_S, arriving=arriving)
    batcher.start()
    try:  # were it to wait max_wait_s for company, the result would time out
        result = batcher.submit(torch.zeros(3, 8, 8), 8, k=2).result(timeout=WAIT_S)
    finally:
        batcher.stop()
    assert result.batch_size == 1 and asked


def test_a_full_queue_sheds_load_with_503_and_retry_after(world, front_end):
    real = student_embedder(world)
    entered, release = threading.Event(), threading.Event()

    class Blocking:  # the real embedder, held at its first forward pass until released
        sizes, default_size, output_dim, teacher_sha256 = real.sizes, real.default_size, real.output_dim, None
        transform, describe = real.transform, real.describe

        def embed(self, images):
            entered.set()
            assert release.wait(WAIT_S), "the test never released the worker"
            return real.embed(images)

    limits = ServiceLimits(max_batch=1, max_wait_ms=0, queue_size=1)
    service = SearchService(Blocking(), world["index"], limits)
    with serving(service, front_end) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        path = world["paths"][0]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_file, client, path)
            assert entered.wait(WAIT_S)  # the worker holds the first query
            second = pool.submit(post_file, client, path)
            deadline = time.monotonic() + WAIT_S
            while service.batcher.depth < 1:  # the second query waits in the queue
                assert time.monotonic() < deadline, "the second query never reached the queue"
                time.sleep(0.01)
            shed = post_file(client, path)
            assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
            assert "--queue-size" in shed.json()["error"]
            release.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert post_file(client, path).status_code == 200
        text = client.get("/metrics").text
        assert metric(text, 'raml_requests_total{route="search",status="503"}') == 1
        assert metric(text, 'raml_shed_total{reason="queue"}') == 1


# ------------------------------------------------------------------------------------------------ bad input


def _png(size: tuple[int, int] = (20, 20)) -> bytes:
    """A noisy RGB PNG (noise: its compressed pixel data is long enough to truncate)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header (IHDR, with a valid CRC) announces ``width x height`` pixels: a decompression bomb."""
    data = bytearray(_png())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_decode_classifies_bad_uploads():
    assert decode_query_image(_png(), 1000).size == (20, 20)
    cases = {
        b"": 400,
        b"not an image at all": 415,
        _png()[:600]: 400,  # truncated
        _png_claiming(5000, 5000): 413,  # over our limit, under PIL's own
        _png_claiming(40000, 40000): 413,  # over PIL's own bomb limit
        _png((40, 30)): 413,  # 1200 pixels > 1000
    }
    for data, status in cases.items():
        with pytest.raises(QueryImageError) as refused:
            decode_query_image(data, 1000)
        assert refused.value.status == status, data[:20]


def test_each_bad_input_gets_its_status_and_the_next_request_is_served(world, server):
    client = server["client"]
    good = Path(world["paths"][1]).read_bytes()
    png = {"content-type": "image/png"}
    cases = [
        ("text body", dict(content=b"hello", headers={"content-type": "text/plain"}), 415),
        ("non-image as image/png", dict(content=b"hello, not a png", headers=png), 415),
        ("truncated", dict(content=_png()[:600], headers=png), 400),
        ("bomb over PIL's limit", dict(content=_png_claiming(40000, 40000), headers=png), 413),
        ("over --max-pixels", dict(content=_png_claiming(2000, 2000), headers=png), 413),
        ("over --max-bytes", dict(content=good + b"\0" * 100_000, headers={"content-type": "image/jpeg"}), 413),
        ("over --max-bytes, multipart", dict(files={"image": ("a.jpg", b"\0" * 120_000, "image/jpeg")}), 413),
        ("over --max-bytes, streamed", dict(content=iter([good] + [b"\0" * 10_000] * 12), headers=png), 413),
        ("empty body", dict(content=b"", headers=png), 400),
        ("form without the image field", dict(files={"picture": ("a.jpg", good, "image/jpeg")}), 400),
        ("non-image in the form", dict(files={"image": ("a.txt", b"plain text", "text/plain")}), 415),
        ("k=0", dict(content=good, headers=png, params={"k": "0"}), 400),
        ("k=ten", dict(content=good, headers=png, params={"k": "ten"}), 400),
        ("k over --max-k", dict(content=good, headers=png, params={"k": "101"}), 400),
    ]
    for name, request, status in cases:
        response = client.post("/search", **request)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"], name
        follow = post_file(client, world["paths"][2], k=2)
        assert follow.status_code == 200, (name, follow.text)
    text = client.get("/metrics").text
    assert metric(text, 'raml_requests_total{route="search",status="413"}') >= 5
    assert metric(text, 'raml_requests_total{route="search",status="415"}') >= 3


# ------------------------------------------------------------------------------------------------ hot swap


def test_a_generation_committed_while_clients_query_is_picked_up_without_a_failed_request(world, tmp_path, front_end):
    index_dir = tmp_path / "index"
    sha = checkpoint_sha256(world["nets"]["teacher"])
    index_images(world["teacher"], world["paths"][:12], DR, index_dir, sha)
    # indexing in this process competes for the CPU with the service: no queue-wait bound, so that a 503 here can
    # only come from the swap, which is what this test is about (load shedding: tests/deploy/test_queue_wait.py)
    limits = ServiceLimits(max_wait_ms=1, poll_interval_s=0.05, max_queue_wait_ms=float("inf"))
    service = SearchService(student_embedder(world), index_dir, limits)
    statuses: list[int] = []
    generations: list[int] = []
    stop = threading.Event()
    with serving(service, front_end) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:

        def query_until_stopped(path: str) -> None:
            deadline = time.monotonic() + 2 * WAIT_S
            while not stop.is_set() and time.monotonic() < deadline:
                response = post_file(client, path, k=3, multipart=False)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    generations.append(response.json()["generation"])

        with ThreadPoolExecutor(2) as pool:
            clients = [pool.submit(query_until_stopped, p) for p in world["paths"][:2]]
            try:
                deadline = time.monotonic() + WAIT_S
                while len(statuses) < 3:  # clients are querying generation 1
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                index_images(world["teacher"], world["paths"], DR, index_dir, sha)  # commits generation 2
                deadline = time.monotonic() + WAIT_S
                while client.get("/health").json()["index"]["generation"] != 2:
                    assert time.monotonic() < deadline, "the new generation was never served"
                    time.sleep(0.02)
                seen = len(generations)
                while len(generations) < seen + 3:  # a few queries against the new generation
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            finally:
                stop.set()
            for future in clients:
                future.result()
        health = client.get("/health").json()
    assert set(statuses) == {200}
    assert generations[0] == 1 and generations[-1] == 2 and sorted(generations) == generations
    assert health["index"] == {**health["index"], "size": 20, "generation": 2}


def test_a_generation_the_student_cannot_search_is_refused_and_the_old_one_kept(world, tmp_path):
    index_dir = tmp_path / "index"
    index_images(world["teacher"], world["paths"][:4], DR, index_dir, checkpoint_sha256(world["nets"]["teacher"]))
    live = LiveIndex(index_dir, accept=lambda index: check_query_dim(16, index), poll_interval_s=0.05)
    assert live.check() is False and live.current.generation == 1  # nothing new

    class Narrow(torch.nn.Module):  # an 8-d network rebuilds the index: the 16-d student cannot search it
        meta = {"outputdim": 8}

        def forward(self, x):
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)).repeat(1, 3)[:, :8] + 1.0, dim=1)

    index_images(Narrow(), world["paths"][:4], DR, index_dir, "0" * 64, overwrite=True)
    assert load_index(index_dir).generation == 2 and load_index(index_dir).dim == 8
    assert live.check() is False and live.current.generation == 1 and live.current.dim == 16
    index_images(world["teacher"], world["paths"][:5], DR, index_dir, "1" * 64, overwrite=True)  # 16-d again
    assert live.check() is True and live.current.generation == 3 and len(live.current) == 5


# ------------------------------------------------------------------------------------------------ pieces


def test_metrics_match_an_explicit_count():
    """The exposition (prometheus_client) against counts written out plainly."""
    latencies = [0.001, 0.005, 0.0051, 0.3, 2.0, 11.0, 0.01]
    sizes = [1, 3, 3, 40]
    metrics = ServiceMetrics({"queue_depth": ("help", lambda: 3)})
    for size in sizes:
        metrics.record_batch(size)
    for seconds in latencies:
        metrics.record_request("search", 200, seconds)
    metrics.record_request("health", 200)
    metrics.record_query(32, 0.004)
    metrics.record_query(48, 0.3)
    metrics.record_query(32, 0.02)
    for flag in ("--queue-size", "--max-decodes", "--max-decodes", "--max-decode-pixels"):
        metrics.record_shed(flag)
    metrics.record_shed("--max-queue-wait-ms", deferred=True)  # later arrivals fill its batch
    metrics.record_shed("--max-queue-wait-ms", expired=True)
    text = metrics.render()
    assert metric(text, 'raml_shed_total{reason="queue_wait_deferred"}') == 1
    assert metric(text, 'raml_shed_total{reason="queue_wait_expired"}') == 1
    for bound in (1, 2, 4, 8, 16, 32, 64):
        assert metric(text, f'raml_batch_size_bucket{{le="{float(bound)}"}}') == sum(1 for v in sizes if v <= bound)
    assert metric(text, 'raml_batch_size_bucket{le="+Inf"}') == 4 and metric(text, "raml_batch_size_sum") == 47
    for bound in (0.005, 0.01, 0.025, 1.0, 10.0):
        assert metric(text, f'raml_request_seconds_bucket{{le="{bound}"}}') == sum(1 for v in latencies if v <= bound)
    assert metric(text, "raml_request_seconds_count") == 7
    assert metric(text, "raml_request_seconds_sum") == pytest.approx(sum(latencies))
    assert metric(text, 'raml_requests_total{route="search",status="200"}') == 7
    assert metric(text, 'raml_requests_total{route="health",status="200"}') == 1
    assert metrics.request_count("search", 200) == 7 and metrics.request_count("search", 503) == 0
    assert metric(text, 'raml_queries_total{size="32"}') == 2 and metric(text, 'raml_queries_total{size="48"}') == 1
    assert metric(text, 'raml_queue_seconds_bucket{le="0.005"}') == 1 and metric(text, "raml_queue_seconds_count") == 3
    assert (
        metric(text, 'raml_shed_total{reason="queue"}') == 1 and metric(text, 'raml_shed_total{reason="decodes"}') == 2
    )
    assert metric(text, 'raml_shed_total{reason="decode_pixels"}') == 1
    assert metric(text, "raml_queue_depth") == 3
    assert "# TYPE raml_batch_size histogram" in text and "# TYPE raml_requests_total counter" in text


def test_cli_builds_the_service_from_flags_and_binds_loopback_by_default(world):
    parser = cli_main.build_parser()
    argv = ["serve", "--index", str(world["index"]), "--network-path", str(world["nets"]["student"])]
    args = parser.parse_args([*argv, "--image-size", str(QR), "--max-batch", "4", "--device", "cpu"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert [serve_cli._is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.2")] == [
        True,
        True,
        True,
        False,  # every interface: warned about as reachable from the network without authentication
        False,
    ]
    service = serve_cli.build_service(args)
    assert service.embedder.sizes == (QR,) and service.limits.max_batch == 4 and len(service.index.current) == 20
    assert not service.batcher.count_front_end  # the front end's time is off the queue-wait bound by default
    # the flags' plumbing below at the test's query size, untraced (the default size's graph cost a second a service)
    at_qr = [*argv, "--image-size", str(QR), "--device", "cpu", "--eager"]
    counted = serve_cli.build_service(parser.parse_args([*at_qr, "--queue-wait-counts-front-end"]))
    assert counted.limits.queue_wait_counts_front_end and counted.batcher.count_front_end
    # arrival order by default; --defer-early-arrivals lets later arrivals take an early one's place when overloaded
    assert not service.batcher.defer_early_arrivals and not service.limits.defer_early_arrivals
    deferring = serve_cli.build_service(parser.parse_args([*at_qr, "--defer-early-arrivals"]))
    assert deferring.limits.defer_early_arrivals and deferring.batcher.defer_early_arrivals
    # past saturation the bound loses the measured tail by default; --no-overload-margin keeps it
    assert service.limits.overload_margin and service.batcher.overload_margin
    plain = serve_cli.build_service(parser.parse_args([*at_qr, "--no-overload-margin"]))
    assert not plain.limits.overload_margin and not plain.batcher.overload_margin
    # the late-answer budget reaches the limits; without a latency target there is none to spend
    budgeted = serve_cli.build_service(parser.parse_args([*at_qr, "--late-budget", "0.02"]))
    assert budgeted.limits.late_budget == 0.02 and budgeted.batcher.late_budget is None
    # the query network in its own memory format unless --channels-last
    assert not service.embedder.channels_last and budgeted.embedder.describe()["memory_format"] == "contiguous"
    nhwc = serve_cli.build_service(parser.parse_args([*at_qr, "--channels-last"]))
    assert nhwc.embedder.channels_last and nhwc.embedder.describe()["memory_format"] == "channels_last"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--onnx", "x.onnx"])  # one query network
    not_an_index = ["serve", "--index", str(world["base"]), "--network-path", str(world["nets"]["student"])]
    assert (
        cli_main.main([*not_an_index, "--image-size", str(QR), "--device", "cpu"]) == 2
    )  # a clear error, not a traceback


@pytest.mark.parametrize(
    "flag", ["--max-wait-ms", "--header-timeout", "--body-timeout", "--send-timeout", "--latency-target-ms"]
)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_cli_refuses_non_finite_timings_naming_the_flag(flag, value, capsys):
    """inf passed the old checks: the server started and GET /health answered 500 (JSON has no inf)."""
    argv = ["serve", "--index", "idx", "--network-path", "net.pth", f"{flag}={value}"]
    with pytest.raises(SystemExit) as exited:
        cli_main.build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"argument {flag}: expected a finite" in capsys.readouterr().err
    assert serve_cli.non_negative_float("0") == 0.0 and serve_cli.positive_float("1e3") == 1000.0


def test_a_max_pixels_below_a_square_query_at_the_query_size_is_refused_at_start(world):
    """Every upload is resized at least to a square of side S + S/7 (37 x 37 at 32 px): a --max-pixels under that
    would answer 413 to every query, so the service refuses to start, naming the flag and the least that works."""
    embedder = student_embedder(world)
    assert embedder.sizes == (QR,) == (32,)
    side = 37  # 32 * 8 / 7 = 36.57, rounded
    with pytest.raises(ValueError, match=rf"--max-pixels {side * side - 1} is below .* Give --max-pixels {side**2}"):
        SearchService(embedder, world["index"], ServiceLimits(max_pixels=side * side - 1))
    SearchService(embedder, world["index"], ServiceLimits(max_pixels=side * side)).stop()
