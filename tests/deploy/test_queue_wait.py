"""A batching queue bounded in time (issue 20): the predicted wait, the batch cost model, and shedding on them.

The pure pieces (:func:`predicted_wait_s`, :func:`should_shed`, :class:`BatchCostModel`) are checked against plain
implementations written here (a simulation of the worker's FIFO, ``numpy.polyfit``); the batcher against a
worker held at a known point; the service end to end on loopback, where an overload must be shed with 503 +
``Retry-After`` and every answered query must have waited no longer than the bound the server computed from its
own measured batch times. With ``--defer-early-arrivals`` (the end of this file) the batcher refuses an early
arrival that later ones replace, checked with the worker held in a known batch.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.deploy.service.admission import (
    BatchCostModel,
    QueueWaitError,
    RecentQuantile,
    ServiceBusyError,
    nearest_rank,
    predicted_wait_s,
    promised_wait_bound_s,
    should_shed,
)
from raml.deploy.service.batching import MIN_AUTO_QUEUE_WAIT_S, MicroBatcher
from raml.deploy.service.late_budget import LateBudget

WAIT_S = 20.0  # bound of every wait


# ------------------------------------------------------------------------------------------- predicted wait


def simulated_wait(depth: int, max_batch: int, remaining: float, full: float, window: float) -> float:
    """The worker, step by step: finish the batch in progress, take the queue's head max_batch at a time; the
    query's own batch waits for the window unless the query fills it."""
    waited, ahead = remaining, depth
    while ahead >= max_batch:  # a full batch of the queries ahead
        waited += full
        ahead -= max_batch
    if ahead + 1 < max_batch:  # its batch (the ``ahead`` left and itself) is not full: the window
        waited += window
    return waited


@pytest.mark.parametrize(
    ("depth", "max_batch", "remaining", "full", "window", "expected"),
    [
        (0, 32, 0.0, 0.2, 0.005, 0.005),  # idle worker, empty queue: the batching window only
        (0, 32, 0.1, 0.2, 0.005, 0.105),  # the rest of the batch in progress, then the window
        (30, 32, 0.1, 0.2, 0.005, 0.105),  # 30 ahead + this one = 31: its batch is not full yet
        (31, 32, 0.1, 0.2, 0.005, 0.1),  # 31 ahead + this one fill the next batch: no window
        (32, 32, 0.1, 0.2, 0.005, 0.305),  # one full batch ahead
        (95, 32, 0.0, 0.2, 0.005, 0.4),  # 95 ahead: two full batches, then its batch is full (31 + 1)
        (3, 1, 0.05, 0.02, 0.005, 0.11),  # unbatched: every query ahead is a batch; no window
    ],
)
def test_predicted_wait_table(depth, max_batch, remaining, full, window, expected):
    assert predicted_wait_s(depth, max_batch, remaining, full, window) == pytest.approx(expected)


def test_predicted_wait_equals_a_simulation_of_the_worker():
    for depth in range(0, 80):
        for max_batch in (1, 2, 7, 16, 32):
            args = (depth, max_batch, 0.013, 0.17, 0.004)
            assert predicted_wait_s(*args) == pytest.approx(simulated_wait(*args)), args


@pytest.mark.parametrize(
    ("predicted", "bound", "depth", "remaining", "shed"),
    [
        (0.30, 0.25, 5, 0.1, True),  # over the bound
        (0.25, 0.25, 5, 0.1, False),  # at the bound: admitted
        (0.10, 0.25, 40, 0.0, False),  # under it
        (9.00, None, 500, 1.0, False),  # nothing measured yet: no bound, only --queue-size
        (0.01, 0.001, 0, 0.0, False),  # idle worker, empty queue: always admitted, even over a tiny bound
        (0.01, 0.001, 1, 0.0, True),  # ... but not with a query ahead of it
        (0.01, 0.001, 0, 0.005, True),  # ... nor behind a batch in progress
    ],
)
def test_should_shed_table(predicted, bound, depth, remaining, shed):
    assert should_shed(predicted, bound, depth, remaining) is shed


# ------------------------------------------------------------------------------------------- the promise's bound


@pytest.mark.parametrize(
    ("window", "full", "front_end", "own", "expected"),
    [
        (0.005, 0.100, 0.0, None, 0.105),  # no front end, a full own batch: the window plus one full batch
        (0.005, 0.100, 0.030, None, 0.075),  # the front end's 30 ms come off the wait
        (0.005, 0.100, 0.030, 0.060, 0.115),  # its own batch, smaller than full, takes 40 ms less
        (0.005, 0.100, 0.030, 0.100, 0.075),  # a full own batch given is the default
        (0.005, 0.100, 0.105, None, 0.0),  # a front end as slow as the window and a batch leaves no wait at all
        (0.005, 0.100, 0.200, None, -0.095),  # ... or less (the batcher floors it)
        (0.0, 0.0, 0.0, None, 0.0),
    ],
)
def test_promised_wait_bound_table(window, full, front_end, own, expected):
    assert promised_wait_bound_s(window, full, front_end, own) == pytest.approx(expected)


def test_a_query_admitted_at_the_promised_bound_is_answered_within_the_promise():
    """The promise: the window plus two full batches. Wait up to the bound, then its own batch (at most a full one),
    then the front end: the sum never exceeds the promise, and the bound is the largest wait for which it holds."""
    rng = np.random.default_rng(1)
    for window, full, front_end, share in rng.uniform(0, 0.2, size=(200, 4)):
        own = 5 * share * full  # its own batch: 0 to a full one
        bound = promised_wait_bound_s(window, full, front_end, own)
        promise = window + 2 * full
        assert bound + own + front_end == pytest.approx(promise)
    with pytest.raises(ValueError, match="front_end_s"):
        promised_wait_bound_s(0.005, 0.1, -1.0)
    with pytest.raises(ValueError, match="full_batch_s"):
        promised_wait_bound_s(0.005, float("nan"), 0.0)


def test_nearest_rank_against_numpy():
    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 100, 256):
        values = rng.exponential(size=n).tolist()
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            assert nearest_rank(values, q) == np.quantile(values, q, method="inverted_cdf"), (n, q)
    with pytest.raises(ValueError):
        nearest_rank([], 0.9)


def test_recent_quantile_keeps_the_last_window_and_recomputes_every_few():
    tracker = RecentQuantile(quantile=0.9, window=10, every=3)
    assert tracker.value is None
    tracker.add(5.0)
    assert tracker.value == 5.0  # the first observation is taken at once
    for value in (1.0, 2.0):
        tracker.add(value)
    assert tracker.value == 5.0  # not recomputed yet
    tracker.add(3.0)  # the third since the last recomputation
    assert tracker.value == nearest_rank([5.0, 1.0, 2.0, 3.0], 0.9)
    stream = np.random.default_rng(3).uniform(0, 1, size=47).tolist()
    tracker = RecentQuantile(quantile=0.9, window=10, every=1)
    for value in stream:
        tracker.add(value)
    assert tracker.value == np.quantile(stream[-10:], 0.9, method="inverted_cdf")  # only the last 10 count
    tracker.add(float("nan"))  # ignored
    assert tracker.value == np.quantile(stream[-10:], 0.9, method="inverted_cdf")


# ------------------------------------------------------------------------------------------- batch cost model


def test_the_cost_model_is_weighted_least_squares():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 33, size=40)
    seconds = 0.02 + 0.006 * sizes + rng.uniform(0, 0.004, size=sizes.size)
    model = BatchCostModel(decay=0.8)
    for n, t in zip(sizes, seconds):
        model.observe(int(n), float(t))
    weights = 0.8 ** np.arange(sizes.size)[::-1]  # the newest batch weighs 1, the one before 0.8, ...
    b, a = np.polyfit(sizes, seconds, 1, w=np.sqrt(weights))  # polyfit's w multiplies the residuals
    assert model.coefficients() == pytest.approx((a, b), rel=1e-6)
    assert model.predict(32) == pytest.approx(a + 32 * b, rel=1e-6)


def test_the_cost_model_follows_a_change_of_load():
    model = BatchCostModel(decay=0.5)
    for n in (4, 8, 16, 32) * 3:
        model.observe(n, 0.01 * n)  # 10 ms a query
    for n in (4, 8, 16, 32) * 5:
        model.observe(n, 0.03 * n)  # the machine got three times slower
    assert model.predict(32) == pytest.approx(0.96, rel=0.01)


@pytest.mark.parametrize(
    ("batches", "expected_a_b"),
    [
        ([(4, 0.2), (4, 0.2)], (0.0, 0.05)),  # one batch size only: proportional to the work (t = b n)
        ([(1, 0.3), (8, 0.1)], (0.2, 0.0)),  # larger looked faster (noise): a constant, the weighted mean
        ([(2, 0.01), (4, 0.2)], None),  # the line would be negative at 0: through the origin, computed below
    ],
)
def test_the_cost_model_falls_back_where_a_line_does_not_fit(batches, expected_a_b):
    model = BatchCostModel(decay=0.5)
    for n, t in batches:
        model.observe(n, t)
    if expected_a_b is None:
        w = np.array([0.5, 1.0])
        n, t = np.array([b[0] for b in batches], float), np.array([b[1] for b in batches])
        expected_a_b = (0.0, float(np.sum(w * n * t) / np.sum(w * n * n)))
    if batches[0][0] == 1:  # the constant is the weighted mean of the times
        expected_a_b = ((0.5 * 0.3 + 0.1) / 1.5, 0.0)
    assert model.coefficients() == pytest.approx(expected_a_b)


def test_the_cost_model_knows_nothing_before_a_batch():
    model = BatchCostModel()
    assert model.predict(8) is None and model.coefficients() is None and not model.observed
    with pytest.raises(ValueError, match="decay"):
        BatchCostModel(decay=1.0)


# ------------------------------------------------------------------------------------------- the batcher


class HeldEmbed:
    """An embedder the test holds at its forward pass until released (the worker's state is then known)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the worker"
        return np.eye(4, dtype=np.float32)[np.zeros(images.shape[0], dtype=int)]


class OneRowIndex:
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((len(queries), 1), np.float32), np.zeros((len(queries), 1), np.int64)


def test_the_batcher_sheds_on_the_predicted_wait_and_expires_what_waited_too_long():
    embed = HeldEmbed()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.0, queue_size=100, max_queue_wait_s=0.15)
    for _ in range(3):
        batcher.cost.observe(1, 0.1)
        batcher.cost.observe(2, 0.2)  # t(n) = 0.1 n: a batch of 1 takes 0.1 s, a full batch of 2 0.2 s
    assert batcher.cost.predict(2) == pytest.approx(0.2) and batcher.queue_wait_bound_s == 0.15
    image = torch.zeros(3, 4, 4)
    batcher.start()
    try:
        first = batcher.submit(image, 4, 1)
        assert embed.entered.wait(WAIT_S)  # the worker holds a batch of 1 (predicted 0.1 s)
        queued = [batcher.submit(image, 4, 1) for _ in range(2)]  # wait: the rest of that batch, < 0.15 s
        assert batcher.depth == 2
        with pytest.raises(QueueWaitError, match="--max-queue-wait-ms") as refused:
            batcher.submit(image, 4, 1)  # two ahead = one full batch of 0.2 s (plus the rest): over 0.15 s
        assert isinstance(refused.value, ServiceBusyError) and refused.value.flag == "--max-queue-wait-ms"
        assert batcher.shed_predicted == 1
        time.sleep(0.2)  # the batch in progress overruns: the two queued have now waited past the bound
        embed.release.set()
        assert first.result(timeout=WAIT_S).queue_s < 0.15
        for future in queued:
            with pytest.raises(QueueWaitError, match="waited"):
                future.result(timeout=WAIT_S)
        assert batcher.shed_expired == 2
        late = batcher.submit(image, 4, 1).result(timeout=WAIT_S)  # idle again: served
        assert late.queue_s <= late.wait_bound_s
    finally:
        embed.release.set()
        batcher.stop()


def test_without_measurements_or_with_an_infinite_bound_only_the_queue_size_limits():
    embed = HeldEmbed()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.0, queue_size=100)
    batcher.start()
    try:
        futures = [batcher.submit(torch.zeros(3, 4, 4), 4, 1) for _ in range(20)]  # nothing measured: all queued
        embed.release.set()
        assert futures[0].result(timeout=WAIT_S).wait_bound_s is None  # its batch started before any measurement
        for future in futures:  # the others are answered, or refused for their wait once a batch was measured
            assert future.exception(timeout=WAIT_S) is None or isinstance(future.exception(), QueueWaitError)
    finally:
        embed.release.set()
        batcher.stop()
    unbounded = MicroBatcher(embed, OneRowIndex, max_batch=2, max_queue_wait_s=float("inf"))
    unbounded.cost.observe(2, 0.2)
    assert unbounded.queue_wait_bound_s is None
    with pytest.raises(ValueError, match="max_queue_wait_s"):
        MicroBatcher(embed, OneRowIndex, max_queue_wait_s=0.0)


def test_the_default_bound_is_the_window_plus_one_full_batch_so_a_query_joining_the_next_batch_is_admitted():
    """At moderate load a full batch may have just started when a query arrives: it waits for that batch and the
    window, and joins the next batch. The default bound admits it (a bound of one batch time alone refused it)."""
    embed = HeldEmbed()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.02, queue_size=100)
    for _ in range(3):
        batcher.cost.observe(1, 0.1)
        batcher.cost.observe(2, 0.2)
    assert batcher.queue_wait_bound_s == pytest.approx(0.22)  # window 0.02 + full batch 0.2
    slow_front = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.02, queue_size=100, count_front_end=True)
    uncounted = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.02, queue_size=100)
    for counted in (slow_front, uncounted):
        counted.cost.observe(2, 0.2)
    for seconds in (0.01,) * 9 + (0.05,):
        slow_front.observe_front_end(seconds)  # p90 (nearest rank) of ten: 0.01
    assert slow_front.queue_wait_bound_s == pytest.approx(0.21)
    for _ in range(20):
        slow_front.observe_front_end(0.05)
        uncounted.observe_front_end(0.05)
    assert slow_front.queue_wait_bound_s == pytest.approx(0.17)  # the front end's p90 comes off the bound
    assert uncounted.queue_wait_bound_s == pytest.approx(0.22)  # by default it does not
    for _ in range(20):
        slow_front.observe_front_end(0.5)
    assert slow_front.queue_wait_bound_s == MIN_AUTO_QUEUE_WAIT_S  # never below the floor
    image = torch.zeros(3, 4, 4)
    batcher.start()
    try:
        held = [batcher.submit(image, 4, 1), batcher.submit(image, 4, 1)]
        assert embed.entered.wait(WAIT_S)  # the worker holds a full batch of 2, just started (~0.2 s to go)
        joining = batcher.submit(image, 4, 1)  # predicted ~0.2 + 0.02: within the bound
        assert batcher.shed_predicted == 0
        behind = batcher.submit(image, 4, 1)  # fills the next batch: no window, ~0.2 s
        with pytest.raises(QueueWaitError):  # a whole batch ahead of it: ~0.4 s, over the bound
            batcher.submit(image, 4, 1)
        embed.release.set()
        for future in (*held, joining, behind):
            assert future.result(timeout=WAIT_S).queue_s <= future.result().wait_bound_s
    finally:
        embed.release.set()
        batcher.stop()


# ------------------------------------------------------------------------------------------- end to end


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
BATCH_SLEEP_S = 0.04  # added to every forward pass, so that a burst of a few dozen requests overloads the server


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_and_networks) -> dict:
    base = tmp_path_factory.mktemp("queue_wait")
    root, nets = synth_and_networks("resnet18", {"teacher": (16, 0), "student": (16, 1)})
    paths = [str(p) for p in get_split("synth-test", root).abspaths()]
    index_images(load_network(nets["teacher"]), paths[:8], DR, base / "index", checkpoint_sha256(nets["teacher"]))
    # the real student, loaded and traced once for the module (it holds no state of a service)
    student = TorchQueryEmbedder(load_network(nets["student"]), torch.device("cpu"), QR)
    return {"nets": nets, "paths": paths, "index": base / "index", "student": student}


def test_an_overload_is_shed_and_no_answered_query_waited_past_the_measured_bound(world, front_end):
    real = world["student"]

    class Slow:  # the real student, each forward pass 40 ms slower
        sizes, default_size, output_dim, teacher_sha256 = real.sizes, real.default_size, real.output_dim, None
        transform, describe = real.transform, real.describe

        def embed(self, images):
            time.sleep(BATCH_SLEEP_S)
            return real.embed(images)

    limits = ServiceLimits(max_batch=4, max_wait_ms=2, queue_size=256, max_uploads=128, max_decodes=128)
    service = SearchService(Slow(), world["index"], limits)
    answered: list[Future] = []
    submit = service.submit

    def recording_submit(image, size, k):  # keeps each accepted query's future, to read its result's bound
        future = submit(image, size, k)
        answered.append(future)
        return future

    service.submit = recording_submit
    body = Path(world["paths"][1]).read_bytes()

    def post(client):
        return client.post("/search", params={"k": 3}, content=body, headers={"content-type": "image/jpeg"})

    options = server_options(limits.header_timeout_s, limits.max_connections, **front_end)
    with (
        BackgroundServer(create_app(service), options=options) as running,
        httpx.Client(base_url=running.url, timeout=WAIT_S) as client,
    ):
        for _ in range(4):  # measured batches: the bound exists from here on
            assert post(client).status_code == 200
        # four clients against batches of four: never a whole batch ahead of a query, so none is refused on its
        # predicted wait. One found past the bound when its batch starts (expired) means the batch ahead overran
        # the smoothed batch time, which a busy host does now and then: that round is repeated, up to three times
        batcher, rounds = service.batcher, []
        for _ in range(3):
            with ThreadPoolExecutor(4) as pool:
                rounds.append([r.status_code for r in pool.map(lambda _: post(client), range(8))])
            assert batcher.shed_predicted == 0, (rounds, batcher.shed_expired, batcher.cost.predict(4))
            if rounds[-1] == [200] * 8:
                break
        assert rounds[-1] == [200] * 8, (rounds, batcher.shed_expired, batcher.cost.predict(4))
        expired_before_the_burst = batcher.shed_expired
        assert service.batcher.queue_wait_bound_s is not None
        with ThreadPoolExecutor(48) as pool:  # a burst of 96: a dozen times what one batch time absorbs
            burst = list(pool.map(lambda _: post(client), range(96)))
        metrics = client.get("/metrics").text
    ok = [r for r in burst if r.status_code == 200]
    shed = [r for r in burst if r.status_code == 503]
    assert len(ok) + len(shed) == len(burst), [r.status_code for r in burst]
    assert shed and ok and all(r.headers.get("retry-after") for r in shed)
    assert service.batcher.shed_predicted > 0  # refused on the prediction, before queueing
    # refused on the prediction (before decoding) or, admitted, when their batch started: counted apart
    counted = {
        reason: float(line.rsplit(" ", 1)[1])
        for reason in ("queue_wait", "queue_wait_expired")
        for line in metrics.splitlines()
        if line.startswith(f'raml_shed_total{{reason="{reason}"}}')
    }
    assert counted.get("queue_wait", 0.0) == service.batcher.shed_predicted
    margin = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("raml_overload_margin_"))
    assert margin == pytest.approx(service.batcher.overload_margin_s())  # what the bound loses now, exported
    assert counted.get("queue_wait_expired", 0.0) == service.batcher.shed_expired
    assert sum(counted.values()) == len(shed) + expired_before_the_burst
    # every answered query started its batch within the bound in force, computed from the measured batch times
    results = [f.result(timeout=0) for f in answered if f.done() and f.exception() is None]
    assert len(results) == len(answered) - service.batcher.shed_expired
    bounded = [r for r in results if r.wait_bound_s is not None]
    assert len(bounded) >= len(ok) and all(r.queue_s <= r.wait_bound_s for r in bounded)
    full_batch_s = service.batcher.cost.predict(limits.max_batch)
    assert full_batch_s >= BATCH_SLEEP_S
    window_s = limits.max_wait_ms / 1000
    front_end_s = service.batcher.front_end.value  # measured on the answered queries (not counted by default)
    assert front_end_s is not None and front_end_s > 0
    own_s = service.batcher.cost.predict(round(service.batcher._mean_batch))  # a batch of the recent size
    expected = window_s + 2 * full_batch_s - min(own_s, full_batch_s)
    if service.batcher.overload.overloaded():  # after the burst: less the front end's p90 and two overruns' p90
        expected -= front_end_s + 2 * (service.batcher.overrun.value or 0.0)
    assert service.batcher.queue_wait_bound_s == pytest.approx(max(expected, MIN_AUTO_QUEUE_WAIT_S))
    # the server's own reported queue wait of every 200 is within the largest bound it applied
    largest_ms = 1000 * max(r.wait_bound_s for r in bounded)
    assert max(r.json()["timings_ms"]["queue"] for r in ok) <= largest_ms + 0.001


def test_a_request_shed_for_its_wait_leaves_the_clients_keep_alive_connection_usable(world, front_end):
    """The refusal comes after the body is read: answering before it breaks a connection still sending."""
    import http.client

    real = world["student"]

    class Slow:
        sizes, default_size, output_dim, teacher_sha256 = real.sizes, real.default_size, real.output_dim, None
        transform, describe = real.transform, real.describe

        def embed(self, images):
            time.sleep(BATCH_SLEEP_S)
            return real.embed(images)

    limits = ServiceLimits(max_batch=1, max_wait_ms=0, queue_size=64, max_queue_wait_ms=1.0)
    service = SearchService(Slow(), world["index"], limits)
    body = Path(world["paths"][1]).read_bytes()
    outcomes: list[object] = []

    def client(port: int) -> None:  # one keep-alive connection, 12 requests one after the other
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        for _ in range(12):
            try:  # the headers, then the body a moment later, as a client on a real network sends them
                conn.putrequest("POST", "/search?k=3")
                conn.putheader("Content-Type", "image/jpeg")
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                time.sleep(0.01)
                conn.send(body)
                response = conn.getresponse()
                response.read()
                outcomes.append(response.status)
            except (OSError, http.client.HTTPException) as error:
                outcomes.append(type(error).__name__)
                conn.close()
        conn.close()

    # raml serve's connection handling
    options = server_options(limits.header_timeout_s, limits.max_connections, **front_end)
    with BackgroundServer(create_app(service), options=options) as running:
        threads = [threading.Thread(target=client, args=(running.port,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=4 * WAIT_S)
    assert len(outcomes) == 72 and set(outcomes) <= {200, 503}, sorted(map(str, outcomes))
    assert 503 in outcomes and service.batcher.shed_predicted > 0


# ------------------------------------------------------------ later arrivals first (--defer-early-arrivals)


def _held_batcher(arrivals_per_period: int, overloaded: bool = True, **kwargs) -> tuple[MicroBatcher, HeldEmbed]:
    """A batcher of 4 whose worker is held in a batch of one (predicted 1 s), after 8 periods in which
    ``arrivals_per_period`` queries each came spread over the last second of the batch in progress (and, where
    ``overloaded``, one more was refused on its predicted wait)."""
    embed = HeldEmbed()
    kwargs.setdefault("defer_early_arrivals", True)
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=4, max_wait_s=0.0, queue_size=100, **kwargs)
    for _ in range(3):
        batcher.cost.observe(1, 1.0)
        batcher.cost.observe(4, 4.0)  # t(n) = n s
    for _ in range(8):
        for i in range(arrivals_per_period):
            batcher.arrivals.record((i + 0.5) / arrivals_per_period)
        if overloaded:
            batcher.overload.record_refused()
        batcher.overload.next_period()
        batcher.arrivals.next_period()
    batcher.start()
    batcher.submit(torch.zeros(3, 4, 4), 4, 1)
    assert embed.entered.wait(WAIT_S)
    return batcher, embed


def test_an_early_arrival_is_deferred_when_later_arrivals_fill_the_next_batch():
    batcher, embed = _held_batcher(40)  # ~40 queries still to come in the batch's last second, 4 places free
    try:
        with pytest.raises(QueueWaitError, match="fill its 4 free places") as refused:
            batcher.check_admission()
        assert refused.value.flag == "--max-queue-wait-ms" and not refused.value.expired and refused.value.deferred
        assert batcher.shed_deferred == 1 and batcher.shed_predicted == 0
        batcher.check_admission(arrival=False)  # submit()'s own check, after decoding, never defers
        assert batcher.shed_deferred == 1
    finally:
        embed.release.set()
        batcher.stop()


def test_no_deferral_in_arrival_order_or_when_too_few_arrive_later():
    fifo, embed = _held_batcher(40, defer_early_arrivals=False)
    try:
        fifo.check_admission()  # admitted: arrival order (the default, without --defer-early-arrivals)
        assert fifo.shed_deferred == 0
    finally:
        embed.release.set()
        fifo.stop()
    calm, embed = _held_batcher(40, overloaded=False)  # many arrivals, but none refused on its wait: e.g. a
    try:  # closed loop of clients that resend at once, whose resends would otherwise defer ever more of them
        calm.check_admission()
        assert calm.shed_deferred == 0
    finally:
        embed.release.set()
        calm.stop()
    sparse, embed = _held_batcher(3)  # 3 later arrivals cannot surely fill 4 places
    try:
        sparse.check_admission()
        assert sparse.shed_deferred == 0
    finally:
        embed.release.set()
        sparse.stop()
    idle = MicroBatcher(HeldEmbed(), OneRowIndex, max_batch=4, defer_early_arrivals=True)
    idle.cost.observe(4, 4.0)
    for _ in range(8):
        for i in range(40):
            idle.arrivals.record(i / 40)
        idle.arrivals.next_period()
    idle.check_admission()  # no batch in progress: nothing is still to come "before it ends"
    assert idle.shed_deferred == 0


def test_each_batch_the_worker_starts_ends_a_period_and_a_pinned_size_service_never_defers():
    embed = HeldEmbed()
    embed.release.set()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=4, max_wait_s=0.0, defer_early_arrivals=True)
    batcher.start()
    try:
        for n in range(1, 4):
            batcher.submit(torch.zeros(3, 4, 4), 4, 1).result(timeout=WAIT_S)
            assert batcher.arrivals.periods_seen == n
    finally:
        batcher.stop()
    fifo = MicroBatcher(embed, OneRowIndex, max_batch=4, max_wait_s=0.0)  # arrival order: no profile kept
    fifo.start()
    try:
        fifo.submit(torch.zeros(3, 4, 4), 4, 1).result(timeout=WAIT_S)
        assert fifo.arrivals.periods_seen == 0
    finally:
        fifo.stop()

    class Sizer:  # the latency target's sizer steps the size down instead (see adaptive_size)
        current = 4

    assert not MicroBatcher(embed, OneRowIndex, defer_early_arrivals=True, sizer=Sizer()).defer_early_arrivals  # type: ignore[arg-type]
    assert not MicroBatcher(embed, OneRowIndex).defer_early_arrivals  # off by default


def test_a_query_behind_a_full_batch_counts_the_next_periods_arrivals_too():
    # 6 arrivals a period, 4 places: for the next batch 6 - 2 sqrt(6) = 1.1 < 4 later arrivals (admitted); behind
    # a full batch queued, its batch starts a period later: 12 - 2 sqrt(12) = 5.1 >= 4 (deferred)
    batcher, embed = _held_batcher(6, max_queue_wait_s=100.0)  # a bound that admits a full batch ahead
    try:
        batcher.check_admission()
        assert batcher.shed_deferred == 0
        for _ in range(4):
            batcher.submit(torch.zeros(3, 4, 4), 4, 1)
        assert batcher.depth == 4
        with pytest.raises(QueueWaitError, match="fill its 4 free places"):
            batcher.check_admission()
        assert batcher.shed_deferred == 1
    finally:
        embed.release.set()
        batcher.stop()


def test_a_query_is_held_to_the_bound_it_was_admitted_under_when_its_batch_grew():
    """The bound counts the query's own batch: admitted while batches held one query (bound = window + 2 full - a
    batch of 1), a query is not refused because its batch, when it starts, holds four (whose bound is smaller); a
    query admitted under the smaller bound is."""
    embed = HeldEmbed()
    embed.release.set()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=4, max_wait_s=0.0, queue_size=100)
    batcher.start()
    try:
        for _ in range(3):  # batches of one query: the recent batch size is 1
            batcher.submit(torch.zeros(3, 4, 4), 4, 1).result(timeout=WAIT_S)
        batcher.cost = BatchCostModel()
        for _ in range(3):
            batcher.cost.observe(1, 0.1)
            batcher.cost.observe(4, 0.4)  # t(n) = 0.1 n s: full batch 0.4 s
        embed.release.clear()
        embed.entered.clear()
        held = batcher.submit(torch.zeros(3, 4, 4), 4, 1)
        assert embed.entered.wait(WAIT_S)  # the worker holds a batch of one
        # admitted with 0, 1, 2, 3 ahead: own batch of 1, 2, 3, 4 queries, bound 0.7, 0.6, 0.5, 0.4 s
        queued = [batcher.submit(torch.zeros(3, 4, 4), 4, 1) for _ in range(4)]
        time.sleep(0.45)  # all four wait past 0.4 s, the bound for their batch of four
        embed.release.set()
        held.result(timeout=WAIT_S)
        answered = [future.result(timeout=WAIT_S) for future in queued[:3]]
        assert [round(r.wait_bound_s, 3) for r in answered] == [0.7, 0.6, 0.5]
        assert all(0.45 <= r.queue_s <= r.wait_bound_s and r.batch_size == 3 for r in answered)
        with pytest.raises(QueueWaitError, match="over the bound of 400 ms"):
            queued[3].result(timeout=WAIT_S)
        assert batcher.shed_expired == 1
    finally:
        embed.release.set()
        batcher.stop()


# ------------------------------------------------------ the overload margin (raml.deploy.service.overload)


def _margin_batcher(**kwargs) -> MicroBatcher:
    """A batcher of 4 with t(n) = 0.1 n s (full batch 0.4 s, window 0: default bound 0.4 s), a front end whose p90
    is 0.03 s and forward passes whose overrun p90 is 0.02 s."""
    batcher = MicroBatcher(HeldEmbed(), OneRowIndex, max_batch=4, max_wait_s=0.0, **kwargs)
    for _ in range(3):
        batcher.cost.observe(1, 0.1)
        batcher.cost.observe(4, 0.4)
    for value in [0.01] * 15 + [0.03] * 2:  # p90 (nearest rank) of 17, recomputed at the 17th: the 16th, 0.03
        batcher.front_end.add(value)
    for value in [0.0] * 8 + [0.02]:  # of 9, recomputed at the 9th: the 9th
        batcher.overrun.add(value)
    assert (batcher.front_end.value, batcher.overrun.value) == (0.03, 0.02)
    return batcher


def _overload(batcher: MicroBatcher, periods: int = 8) -> None:
    for _ in range(periods):
        batcher.overload.record_refused()
        batcher.overload.next_period()


def test_while_overloaded_the_default_bound_loses_the_front_end_and_two_overruns():
    batcher = _margin_batcher()
    assert batcher.queue_wait_bound_s == pytest.approx(0.4) and batcher.overload_margin_s() == 0.0  # not overloaded
    _overload(batcher)
    assert batcher.overload_margin_s() == pytest.approx(0.03 + 2 * 0.02)
    assert batcher.queue_wait_bound_s == pytest.approx(0.4 - 0.07)
    for _ in range(8):  # periods without a refusal: no longer overloaded, the bound is back
        batcher.overload.next_period()
    assert batcher.queue_wait_bound_s == pytest.approx(0.4)

    off = _margin_batcher(overload_margin=False)
    _overload(off)
    assert off.queue_wait_bound_s == pytest.approx(0.4) and off.overload_margin_s() == 0.0
    counted = _margin_batcher(count_front_end=True)  # the front end is off the bound already: not taken twice
    assert counted.queue_wait_bound_s == pytest.approx(0.4 - 0.03)
    _overload(counted)
    assert counted.queue_wait_bound_s == pytest.approx(0.4 - 0.03 - 2 * 0.02)
    fixed = _margin_batcher(max_queue_wait_s=0.3)  # an operator's bound is kept as given
    _overload(fixed)
    assert fixed.queue_wait_bound_s == 0.3 and fixed.overload_margin_s() == 0.0
    floored = _margin_batcher()
    for _ in range(16):
        floored.front_end.add(5.0)
    _overload(floored)
    assert floored.queue_wait_bound_s == MIN_AUTO_QUEUE_WAIT_S


def test_an_arrival_refused_on_its_predicted_wait_counts_for_the_gate_and_submits_second_check_does_not():
    embed = HeldEmbed()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.0, queue_size=100, max_queue_wait_s=0.15)
    for _ in range(3):
        batcher.cost.observe(1, 0.1)
        batcher.cost.observe(2, 0.2)
    batcher.start()
    try:
        batcher.submit(torch.zeros(3, 4, 4), 4, 1)
        assert embed.entered.wait(WAIT_S)
        for _ in range(2):
            batcher.submit(torch.zeros(3, 4, 4), 4, 1)  # two ahead now: the next arrival waits a full batch more
        for _ in range(4):
            with pytest.raises(QueueWaitError):
                batcher.check_admission(arrival=False)  # submit()'s own check: not an arrival
            batcher.overload.next_period()
        assert not batcher.overload.overloaded()
        for _ in range(4):
            with pytest.raises(QueueWaitError):
                batcher.check_admission()  # an arrival (the HTTP layer's check, before decoding)
            batcher.overload.next_period()
        assert batcher.overload.overloaded()
    finally:
        embed.release.set()
        batcher.stop()


def test_an_early_arrival_is_refused_while_overloaded_and_admitted_without_the_margin():
    """The worker holds a batch of one predicted at 1 s (t(n) = n s, full batch 4 s): an arrival now waits ~1 s,
    within the default bound of 4 s; with a front end's p90 of 3.5 s taken off while overloaded, it is not."""
    for margin, refused in ((True, True), (False, False)):
        batcher, embed = _held_batcher(0, overloaded=True, defer_early_arrivals=False, overload_margin=margin)
        try:
            for _ in range(10):
                batcher.front_end.add(3.5)
            if refused:
                with pytest.raises(QueueWaitError, match="over the bound of 500 ms"):
                    batcher.check_admission()
                assert batcher.shed_predicted == 1
            else:
                assert batcher.check_admission() == pytest.approx(4.0)
                assert batcher.shed_predicted == 0
        finally:
            embed.release.set()
            batcher.stop()


class SleepEmbed:
    """An embedder that takes ``seconds`` per forward pass."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        time.sleep(self.seconds)
        return np.eye(4, dtype=np.float32)[np.zeros(images.shape[0], dtype=int)]


def _served(batcher: MicroBatcher, batches: int) -> MicroBatcher:
    """``batches`` batches of one query served, the worker stopped (its bookkeeping after each batch done)."""
    batcher.start()
    try:
        for _ in range(batches):
            batcher.submit(torch.zeros(3, 4, 4), 4, 1).result(timeout=WAIT_S)
    finally:
        batcher.stop()
    return batcher


def test_each_batch_ends_a_gate_period_and_records_how_far_it_overran_its_prediction():
    unpredicted = _served(MicroBatcher(SleepEmbed(0.0), OneRowIndex, max_batch=4, max_wait_s=0.0), 1)
    assert unpredicted.overrun.value is None and unpredicted.overload.periods_seen == 1  # nothing predicted yet
    slow = MicroBatcher(SleepEmbed(0.06), OneRowIndex, max_batch=4, max_wait_s=0.0)
    slow.cost.observe(1, 0.01)  # predicted 10 ms (then a little more each batch); each takes >= 60 ms
    _served(slow, 1)
    assert 0.05 - 1e-6 <= slow.overrun.value < 1.0 and slow.overload.periods_seen == 1
    fast = MicroBatcher(SleepEmbed(0.0), OneRowIndex, max_batch=4, max_wait_s=0.0)
    fast.cost.observe(1, 5.0)  # predicted 5 s: faster than predicted is an overrun of 0
    _served(fast, 3)
    assert fast.overrun.value == 0.0 and fast.overload.periods_seen == 3


# ----------------------------------------------- the hand-mutation round's cases (each killed only by a flaky test)


class FixedSizer:
    """Size 4 in use, ``per_query_s`` per query, the wait bounded at ``bound_s``."""

    current = 4

    def __init__(self, per_query_s: float, bound_s: float) -> None:
        self.per_query_s, self.bound_s = per_query_s, bound_s

    def choose(self, oldest_wait_s: float, waiting: int) -> int:
        return self.current

    def observe(self, size: int, queries: int, service_s: float) -> None:
        pass

    def batch_s(self, size: int, queries: int) -> float | None:
        return self.per_query_s * queries

    def wait_bound_s(self, window_s: float, size: int | None = None) -> float | None:
        return self.bound_s

    def step_down_to_admit(self, fits) -> int | None:
        return None


def test_a_query_found_past_the_late_bound_is_refused_and_takes_no_grant():
    """Bound 0.075 s, a full batch of 2 at 0.05 s a query: the late bound is 0.175 s. A query admitted behind the
    batch in progress (a predicted wait of at most 0.05 s) that waits 0.3 s is past even the late bound when its
    batch starts: refused on its plain bound, with the budget's grants left untouched."""
    embed, budget = HeldEmbed(), LateBudget(0.1, window=40)
    batcher = MicroBatcher(
        embed, OneRowIndex, max_batch=2, max_wait_s=0.0, sizer=FixedSizer(0.05, 0.075), late_budget=budget
    )
    for _ in range(40):
        budget.arrived()  # 4 grants due
    image = torch.zeros(3, 4, 4)
    batcher.start()
    try:
        held = batcher.submit(image, 4, 1)
        assert embed.entered.wait(WAIT_S)
        queued = batcher.submit(image, 4, 1)
        assert not embed.release.wait(0.3)  # the batch in progress overruns: the queued query waits 0.3 s
        embed.release.set()
        held.result(timeout=WAIT_S)
        with pytest.raises(QueueWaitError, match="over the bound of 75 ms"):
            queued.result(timeout=WAIT_S)
    finally:
        embed.release.set()
        batcher.stop()
    assert (budget.granted, batcher.shed_expired) == (0, 1)


def test_an_idle_worker_records_no_arrival_in_the_profile():
    """Only arrivals while a batch is in progress describe how many come before it ends: one finding the worker
    idle is not recorded (the next period holds none)."""
    batcher = MicroBatcher(HeldEmbed(), OneRowIndex, max_batch=4, defer_early_arrivals=True)
    batcher.cost.observe(4, 4.0)
    for _ in range(8):
        for i in range(40):
            batcher.arrivals.record((i + 0.5) / 40)
        batcher.overload.record_refused()
        batcher.overload.next_period()
        batcher.arrivals.next_period()
    assert batcher.overload.overloaded()
    batcher.check_admission()  # the worker is idle: admitted, and not recorded
    batcher.arrivals.next_period()
    assert batcher.arrivals.expected_later(0.0, periods_ahead=1) == pytest.approx(7 * 40 / 8)


def test_a_batch_waits_for_no_more_queries_when_none_is_arriving():
    """The batching window (30 s here) is cut short when no query is on its way: a lone query is served at once
    rather than after the window (the result's timeout, 10 s, only bounds the test)."""
    embed = HeldEmbed()
    embed.release.set()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=4, max_wait_s=30.0, arriving=lambda: 0)
    batcher.start()
    try:
        assert batcher.submit(torch.zeros(3, 4, 4), 4, 1).result(timeout=10.0).batch_size == 1
    finally:
        batcher.stop()


def test_a_batch_holds_at_most_max_batch_queries():
    embed = HeldEmbed()
    batcher = MicroBatcher(embed, OneRowIndex, max_batch=2, max_wait_s=0.0, queue_size=10)
    image = torch.zeros(3, 4, 4)
    batcher.start()
    try:
        held = batcher.submit(image, 4, 1)
        assert embed.entered.wait(WAIT_S)  # the worker holds a batch of one; three queue behind it
        queued = [batcher.submit(image, 4, 1) for _ in range(3)]
        assert batcher.depth == 3
        embed.release.set()
        sizes = [future.result(timeout=WAIT_S).batch_size for future in [held, *queued]]
    finally:
        embed.release.set()
        batcher.stop()
    assert sizes == [1, 2, 2, 1]
