"""``raml serve --latency-target-ms``: the query size chosen per batch to keep a latency target (issue 20, items 4, 6).

The controller's rule is tested as a pure function in ``test_size_controller.py``; here: its state
(:class:`AdaptiveQuerySize`: smoothing, which sizes an upload is prepared at), the batcher's hook (a batch's
unpinned queries served at the size chosen when the batch is formed, pinned ones at theirs), the service and CLI
(a single-size network is refused; answers say which size answered and equal ``raml search`` at that size;
``/metrics`` and ``/health``), and one end-to-end run on loopback: a burst makes the server step down, a quiet
period brings it back up.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

from raml.cli import main as cli_main  # noqa: E402
from raml.deploy import load_index  # noqa: E402
from raml.deploy.service import MicroBatcher, SearchService, ServiceLimits, TorchQueryEmbedder  # noqa: E402
from raml.deploy.service.adaptive_size import AdaptiveQuerySize  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.deploy.service.size_controller import ControllerSettings  # noqa: E402
from raml.models import load_network  # noqa: E402
from raml.retrieval.extract import extract_embeddings  # noqa: E402

SIZES = [24, 32, 48]
DR = 48
CPU = torch.device("cpu")
WAIT_S = 30.0  # bound of every wait
EMBED_S = 0.03


@pytest.fixture(scope="module")
def world(tmp_path_factory, indexed_synth_world) -> dict:
    """Generated data (synth-test: 4 classes x 5 images), a 16-d teacher and student, an index of synth-test."""
    return indexed_synth_world(tmp_path_factory.mktemp("adaptive"), DR)


def multi_size_student(world: dict, sizes: list[int] | None = SIZES) -> TorchQueryEmbedder:
    """The tiny student, its meta listing ``sizes`` (a multi-size student) or none (``--image-size 32``)."""
    network = load_network(world["nets"]["student"])
    if sizes:
        network.meta["image_sizes"] = list(sizes)
    return TorchQueryEmbedder(network, CPU, None if sizes else 32)


def post(client, path: str, k: int = 5, **params):
    data = Path(path).read_bytes()
    return client.post("/search", params={"k": k, **params}, content=data, headers={"content-type": "image/jpeg"})


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# ------------------------------------------------------------------------------------------------ state


def test_adaptive_size_smooths_per_query_times_and_prepares_one_size_above():
    """The load given to the controller, against the same arithmetic written out: queue delay = EWMA of, per batch,
    the larger of its oldest query's wait and the queries still waiting x the time per query at the size in use;
    batch service time of a size = EWMA of its time per query (batches of at least half a full one) x EWMA of
    queries per batch."""
    alpha = 0.5
    adaptive = AdaptiveQuerySize(ControllerSettings(100.0, (24, 32, 48), 0.7), alpha=alpha, full_batch=4)
    assert adaptive.current == 48 and adaptive.prepare_sizes() == (24, 32, 48)
    adaptive.observe(48, 1, 0.050)  # a lone query (below half a full batch): its time per query is not recorded
    assert adaptive.load.service_ms == {}
    adaptive.observe(48, 4, 0.080)  # 20 ms per query; batch EWMA 0.5 * 1 + 0.5 * 4
    batch = 0.5 * 1 + 0.5 * 4
    assert adaptive.load.service_ms == pytest.approx({48: 20.0 * batch})
    # oldest wait 200 ms, none behind: queue 100 ms; 48 predicted 100 + 50 > 100 -> 32, estimated from 48 by pixels
    assert adaptive.choose(0.200, 0) == 32
    s48, s32 = 20.0 * batch, 20.0 * batch * (32 / 48) ** 2
    assert adaptive.decisions[-1].predicted_ms == pytest.approx(100.0 + s48)
    assert adaptive.decisions[-1].predicted_after_ms == pytest.approx(100.0 * s32 / s48 + s32) and s32 <= 100.0
    assert adaptive.current == 32 and adaptive.prepare_sizes() == (24, 32, 48)  # one size above the one in use
    adaptive.observe(32, 4, 0.040)  # 10 ms per query at 32; batch EWMA 0.5 * 2.5 + 0.5 * 4
    batch = 0.5 * batch + 0.5 * 4
    assert adaptive.load.service_ms == pytest.approx({48: 20.0 * batch, 32: 10.0 * batch})
    # oldest wait 10 ms, but 20 queries behind at 10 ms each: sample 200, queue 0.5 * 100 + 0.5 * 200 = 150;
    # 32 predicted 150 + 32.5 > 100 -> down (the oldest wait alone: queue 55, 87.5, would have stayed)
    assert adaptive.choose(0.010, 20) == 24
    assert adaptive.decisions[-1].queue_delay_ms == pytest.approx(150.0)
    assert adaptive.current == 24 and adaptive.prepare_sizes() == (24, 32)  # 48 is two steps away: not prepared
    assert adaptive.changes == 2 and [(d.before, d.after) for d in adaptive.decisions] == [(48, 32), (32, 24)]
    with pytest.raises(ValueError, match="at least one query"):
        adaptive.observe(24, 0, 0.01)
    # utilisation = arrival rate x time per query (measured, or the nearest measured one scaled by pixels)
    assert adaptive.load.utilisation == {24: 0.0, 32: 0.0, 48: 0.0}  # nothing arrived yet
    slow = AdaptiveQuerySize(ControllerSettings(100.0, (24, 32, 48), 0.7), full_batch=4, rate_window_s=60.0)
    assert slow.load.utilisation == {}  # nothing measured: no constraint
    slow.observe(48, 4, 0.080)  # 20 ms per query at 48
    for _ in range(30):
        slow.arrived()  # 30 queries within the last 60 s: 0.5 per s
    assert slow.load.utilisation == pytest.approx({48: 0.5 * 0.020, 32: 0.5 * 0.020 * (32 / 48) ** 2, 24: 0.5 * 0.005})


# ------------------------------------------------------------------------------------------------ batcher hook


class FixedSizer:
    """A sizer that always chooses ``size`` and records what it is told."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.waits: list[float] = []
        self.observed: list[tuple[int, int]] = []
        self.seconds: list[float] = []

    def choose(self, oldest_wait_s: float, waiting: int) -> int:
        assert waiting >= 0
        self.waits.append(oldest_wait_s)
        return self.size

    def observe(self, size: int, queries: int, service_s: float) -> None:
        self.observed.append((size, queries))
        self.seconds.append(service_s)


def test_the_batcher_serves_unpinned_queries_at_the_size_of_their_batch(world):
    index = load_index(world["index"])
    shapes: list[tuple[int, ...]] = []

    def embed(images: torch.Tensor) -> np.ndarray:
        shapes.append(tuple(images.shape))
        time.sleep(EMBED_S)  # a forward pass that takes a known time: the service time observed includes it
        return index.embeddings[: images.shape[0]]

    def at(*sizes: int) -> dict[int, torch.Tensor]:
        return {s: torch.zeros(3, s, s) for s in sizes}

    sizer = FixedSizer(32)
    batcher = MicroBatcher(embed, lambda: index, max_batch=5, max_wait_s=5.0, queue_size=5, sizer=sizer)
    with pytest.raises(ValueError, match="mapping"):
        MicroBatcher(embed, lambda: index).submit(at(24), None, k=2)  # no sizer: a size is needed
    batcher.start()
    try:
        with pytest.raises(ValueError, match="mapping"):
            batcher.submit(torch.zeros(3, 24, 24), None, k=2)  # a tensor without its size
        futures = [
            batcher.submit(at(24, 32, 48), None, k=2),  # -> 32, the batch's size
            batcher.submit(at(24), None, k=2),  # -> 24: the largest it holds not above 32
            batcher.submit(at(48), None, k=2),  # -> 48: none at or below 32, its smallest
            batcher.submit(torch.zeros(3, 48, 48), 48, k=2),  # pinned by its request: 48
            batcher.submit(at(24, 32), None, k=2),  # -> 32
        ]
        results = [f.result(timeout=WAIT_S) for f in futures]
    finally:
        batcher.stop()
    assert [r.size for r in results] == [32, 24, 48, 48, 32]
    assert len(sizer.waits) == 1 and sizer.waits[0] >= 0  # chosen once, when the batch was formed
    assert sorted(shapes) == [(1, 3, 24, 24), (2, 3, 32, 32), (2, 3, 48, 48)]
    assert sorted(sizer.observed) == [(24, 1), (32, 2), (48, 2)]
    assert all(EMBED_S <= seconds < WAIT_S for seconds in sizer.seconds), sizer.seconds  # forward pass + search


# ------------------------------------------------------------------------------------------------ service


def test_a_latency_target_needs_a_multi_size_network(world):
    with pytest.raises(ValueError, match="image_sizes"):
        SearchService(multi_size_student(world, None), world["index"], latency_target_ms=100.0)
    argv = ["serve", "--index", str(world["index"]), "--network-path", str(world["nets"]["student"])]
    assert cli_main.main([*argv, "--image-size", "32", "--latency-target-ms", "100", "--device", "cpu"]) == 2
    args = cli_main.build_parser().parse_args([*argv, "--latency-target-ms", "250", "--latency-up-fraction", "0.6"])
    assert args.latency_target_ms == 250.0 and args.latency_up_fraction == 0.6


@pytest.mark.parametrize(("target_ms", "served"), [(1e-6, 24), (1e6, 48)])
def test_answers_say_the_size_chosen_and_equal_raml_search_at_that_size(world, target_ms, served):
    """A target no batch can meet serves every unpinned query at the smallest size, one every batch meets at the
    largest; the results are those of the student at that size (``raml search --image-size S``), a request's
    ``size=`` is honoured, and /metrics and /health say what was served."""
    limits = ServiceLimits(max_batch=4, max_wait_ms=1)
    service = SearchService(multi_size_student(world), world["index"], limits, latency_target_ms=target_ms)
    queries = world["paths"][:3]
    with BackgroundServer(create_app(service)) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        answers = [post(client, p).json() for p in queries]
        pinned = post(client, queries[0], size=32).json()
        text = client.get("/metrics").text
        health = client.get("/health").json()
    assert [(a["size"], a["size_chosen_by"]) for a in answers] == [(served, "latency_target")] * 3
    assert (pinned["size"], pinned["size_chosen_by"]) == (32, "request")
    index = load_index(world["index"])
    student = load_network(world["nets"]["student"])
    for answer, query in zip(answers, extract_embeddings(student, queries, served, CPU, progress=False).numpy()):
        assert [h["id"] for h in answer["results"]] == np.argsort(-(index.embeddings @ query), kind="stable")[
            :5
        ].tolist()
    pinned_query = extract_embeddings(student, queries[:1], 32, CPU, progress=False).numpy()[0]
    assert [h["id"] for h in pinned["results"]] == np.argsort(-(index.embeddings @ pinned_query))[:5].tolist()
    assert metric(text, f'raml_queries_total{{size="{served}"}}') == 3
    assert metric(text, 'raml_queries_total{size="32"}') == 1 + (3 if served == 32 else 0)
    assert metric(text, "raml_query_size") == served and metric(text, "raml_latency_target_seconds") == target_ms / 1000
    assert health["adaptive"]["current_size"] == served and health["adaptive"]["latency_target_ms"] == target_ms


# ------------------------------------------------------------------------------------------------ end to end

#: the slowed student's cost of one query at 48 px (s); at size S it is (S / 48)^2 of that
COST_48_S = 0.05
TARGET_MS = 400.0
BURST = 40
QUIET_GAP_S = 0.5  # between the quiet period's queries: < 2 per s (a low utilisation even if 48 px was measured slow)


class Slowed:
    """The real student, plus a known cost per query that grows with the pixels (a forward pass of a larger
    network): the test's timing does not hang on how fast this machine runs the tiny one."""

    def __init__(self, real: TorchQueryEmbedder) -> None:
        self.real = real
        self.sizes, self.default_size, self.output_dim = real.sizes, real.default_size, real.output_dim
        self.teacher_sha256, self.transform, self.describe = None, real.transform, real.describe

    def embed(self, images: torch.Tensor) -> np.ndarray:
        out = self.real.embed(images)
        time.sleep(COST_48_S * images.shape[0] * (images.shape[-1] / 48) ** 2)
        return out


def test_a_burst_steps_the_size_down_and_a_quiet_period_brings_it_back(world):
    """40 queries at once against batches of 4 at 200 ms each (48 px): the backlog passes the 400 ms target
    within a batch or two, so the server steps down and answers part of the burst at a smaller size, every one of
    them 200. The real network's time comes on top of the known cost; on a loaded machine it can reach tens of ms
    per query, which the target leaves room for. Then one query at a time, 0.5 s apart (at most 60, each answered
    before the next): the wait and the arrival rate fall, the size climbs back one step per batch to 48, and stays
    there."""
    limits = ServiceLimits(max_batch=4, max_wait_ms=2, queue_size=128, max_uploads=64, max_decodes=64)
    service = SearchService(Slowed(multi_size_student(world)), world["index"], limits, latency_target_ms=TARGET_MS)
    paths = world["paths"]
    with BackgroundServer(create_app(service)) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        assert post(client, paths[0]).json()["size"] == 48  # idle: the largest size
        with ThreadPoolExecutor(BURST) as pool:
            burst = list(pool.map(lambda i: post(client, paths[i % len(paths)]), range(BURST)))
        assert [r.status_code for r in burst] == [200] * BURST
        burst_sizes = [r.json()["size"] for r in burst]
        assert min(burst_sizes) < 48, burst_sizes
        assert any(d.after < d.before for d in service.adaptive.decisions)
        quiet: list[int] = []
        for i in range(60):
            time.sleep(QUIET_GAP_S)
            quiet.append(post(client, paths[i % len(paths)]).json()["size"])
            if quiet[-3:] == [48, 48, 48]:
                break
        assert quiet[-3:] == [48, 48, 48], quiet
        assert quiet == sorted(quiet), quiet  # climbing back: never a step down while quiet (no flapping)
        text = client.get("/metrics").text
    served = sum(metric(text, f'raml_queries_total{{size="{s}"}}') for s in SIZES if f'size="{s}"' in text)
    assert served == 1 + BURST + len(quiet)
    assert metric(text, "raml_query_size") == 48
    assert metric(text, 'raml_requests_total{route="search",status="200"}') == 1 + BURST + len(quiet)


def test_a_latency_target_lifts_the_queue_wait_bound_unless_one_is_given(world):
    """With a latency target the backlog is answered at a smaller size, not shed on a wait predicted from the
    larger size's batch times; an explicit --max-queue-wait-ms still applies; without a target the batcher's
    default (one batch time) stays."""
    student = multi_size_student(world)
    adaptive = SearchService(student, world["index"], ServiceLimits(), latency_target_ms=TARGET_MS)
    assert adaptive.batcher.max_queue_wait_s == float("inf")
    given = SearchService(student, world["index"], ServiceLimits(max_queue_wait_ms=120), latency_target_ms=TARGET_MS)
    assert given.batcher.max_queue_wait_s == pytest.approx(0.12)
    fixed = SearchService(student, world["index"], ServiceLimits())
    assert fixed.batcher.max_queue_wait_s is None
