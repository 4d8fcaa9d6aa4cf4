"""The load generator of ``raml bench serve`` against a tiny stand-in server on loopback (no model, no torch)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

import numpy as np
import pytest

from raml.bench.loadgen import LoadResult, poisson_schedule, run_load, summarise

SERVICE_S = 0.04


class _Handler(BaseHTTPRequestHandler):
    """Answers every POST after ``SERVICE_S`` like ``/search``; every 4th body ``b"busy"`` gets a 503."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: avoid Nagle x delayed-ACK stalls of 40 ms

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        started = time.monotonic()
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if body == b"busy":
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        time.sleep(SERVICE_S)
        total_ms = 1000.0 * (time.monotonic() - started)
        payload = json.dumps({"batch_size": 1, "timings_ms": {"total": total_ms, "embed": 1000.0 * SERVICE_S}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def _serve(server_class, handler: type[BaseHTTPRequestHandler] = _Handler):
    server = server_class(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    # a 50 ms poll (the default is 0.5 s): shutdown() waits up to one poll
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def threaded_server():
    server, url = _serve(ThreadingHTTPServer)
    yield url
    server.shutdown()
    server.server_close()


def test_poisson_schedule_has_the_offered_rate_and_exponential_gaps():
    times = poisson_schedule(200.0, 50.0, seed=3)
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < 50.0
    assert len(times) == pytest.approx(200.0 * 50.0, rel=0.05)  # 10,000 arrivals: sd 1 %
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 200.0, rel=0.05)
    assert np.mean(gaps > 1 / 200.0) == pytest.approx(np.exp(-1.0), abs=0.02)  # P(gap > mean) of an exponential
    with pytest.raises(ValueError, match="positive"):
        poisson_schedule(0.0, 1.0, seed=0)


def test_open_loop_charges_the_wait_for_a_slow_server_from_the_intended_send_time():
    """One connection, a server that takes 40 ms, 50 arrivals/s offered: requests queue at the client. The
    latency must count from the intended time (the plain computation below), not from the late send."""
    server, url = _serve(HTTPServer)  # one request at a time
    try:
        result = run_load(url, [b"img"], k=1, warmup_s=0.0, duration_s=1.0, concurrency=1, rate=50.0, processes=1)
    finally:
        server.shutdown()
        server.server_close()
    row = summarise(result)
    start, end = result.window
    inside = [r for r in result.records if start <= r[0] < end and r[4] == 200]
    from_intended = [1000.0 * (r[3] - r[0]) for r in inside]
    from_send = [1000.0 * (r[3] - r[2]) for r in inside]
    assert len(inside) > 10 and row["errors"] == 0
    assert row["queries"] == sum(r[4] == 200 and start <= r[3] < end for r in result.records)
    assert row["p99_ms"] == pytest.approx(np.percentile(from_intended, 99))
    assert row["p50_ms"] == pytest.approx(np.percentile(from_intended, 50))
    # 50/s offered against at most 25/s served: the backlog grows, and the open loop shows it
    assert row["p99_ms"] > 3 * np.percentile(from_send, 99)
    assert row["pool_wait_p99_ms"] > 100.0  # the wait was for the one busy connection ...
    assert row["client_lag_p99_ms"] < row["pool_wait_p99_ms"]  # ... not the dispatcher being late


def test_closed_loop_row_counts_503s_apart_from_errors_and_checks_retry_after(threaded_server):
    bodies = [b"busy", b"a", b"b", b"c"]
    # no warm-up: connection 0 waits the 503's Retry-After (1 s) after its first request, at the window's start
    result = run_load(threaded_server, bodies, k=1, warmup_s=0.0, duration_s=0.8, concurrency=4, processes=2)
    row = summarise(result)
    start, end = result.window
    inside = [r for r in result.records if start <= r[0] < end]
    assert row["loop"] == "closed" and row["offered_per_s"] is None
    # each of the 4 connections sends one body in turn: connection 0 only "busy"
    assert row["rejected_503"] == sum(r[4] == 503 for r in inside) > 0
    assert row["rejected_without_retry_after"] == 0 and row["errors"] == 0
    assert row["queries"] == sum(r[4] == 200 and start <= r[3] < end for r in result.records)
    assert row["queries_per_s"] == pytest.approx(row["queries"] / (end - start)) and row["mean_batch"] == 1.0
    # the server's own total is about SERVICE_S; the time outside it is small on loopback
    assert row["server_total_p50_ms"] == pytest.approx(1000.0 * SERVICE_S, abs=15.0)
    assert row["outside_server_p50_ms"] < row["server_total_p50_ms"]


def test_small_open_loop_run_is_not_client_limited(threaded_server):
    """The benchmark's own check: at a modest rate the client keeps its schedule and stays well under a core. On
    a host busy with other tests a scheduler stall can put one run's lag p99 over the 20 ms floor, so up to three
    runs are made; a client that cannot keep its schedule fails all three."""
    verdicts = []
    for _ in range(3):
        result = run_load(threaded_server, [b"x"], k=1, warmup_s=0.3, duration_s=1.5, concurrency=8, rate=40.0)
        row = summarise(result)
        assert row["errors"] == 0 and row["queries"] > 20
        assert row["sent_per_s"] == pytest.approx(40.0, rel=0.5)
        verdicts.append(row["client_limited_because"])
        if not row["client_limited"]:
            break
    assert not row["client_limited"], verdicts


class _RefusingHandler(BaseHTTPRequestHandler):
    """Refuses every POST at once with 503, ``Retry-After: 1`` (``raml serve``'s value); ``/none``: without one."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        if not self.path.startswith("/none"):
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_closed_loop_waits_the_retry_after_of_a_503_instead_of_resending_at_once():
    """A server that refuses everything at once: re-sending at once made thousands of requests per second (issue:
    a flood that cost the server and the client a core between them); each client now waits the 1 s asked."""
    server, url = _serve(ThreadingHTTPServer, _RefusingHandler)
    try:
        result = run_load(url, [b"x"], k=1, warmup_s=0.0, duration_s=1.5, concurrency=2, processes=1)
    finally:
        server.shutdown()
        server.server_close()
    row = summarise(result)
    # 2 clients, each sends at 0 s and after 1 s: 4 requests (a few more on a machine that stalls nothing)
    assert 2 <= len(result.records) <= 6, len(result.records)
    assert row["rejected_503"] == len(result.records) and row["rejected_without_retry_after"] == 0
    # the waits asked by the server are not the client's lag
    assert row["client_lag_max_ms"] < 500.0
    # nothing was answered: the row measured refusals, not the server's throughput
    assert row["client_limited"] and "refusals" in " ".join(row["client_limited_because"])


def test_a_closed_loop_row_that_sent_far_more_than_was_answered_or_took_the_machines_cores_is_client_limited():
    nan = float("nan")
    ok = [(0.1 * i, 0.1 * i, 0.1 * i, 0.1 * i + 0.01, 200, 1.0, 1.0, 1.0, False, 0.0, 0.5, 0.25) for i in range(10)]
    refused = [(0.01 * i, 0.01 * i, 0.01 * i, 0.01 * i, 503, nan, nan, nan, True, 0.0, nan, nan) for i in range(100)]
    # 110 sent for 10 answered in the closed loop: flagged
    row = summarise(LoadResult(ok + refused, (0.0, 1.0), [0.1], None, 2, (None, None), 2))
    assert row["client_limited"] and "110.0 requests/s for 10.0 answered/s" in row["client_limited_because"][0]
    # failures are not refusals: a server that answers 500, or nothing before the time-out, is not the client's limit
    # (its goals must read missed, not "not measured")
    failed = [(0.01 * i, 0.01 * i, 0.01 * i, 0.01 * i, status, nan, nan, nan, False, 0.0, nan, nan)
              for i, status in enumerate([500] * 50 + [0] * 50)]  # fmt: skip
    for records in (ok + failed, failed):
        row = summarise(LoadResult(records, (0.0, 1.0), [0.1], None, 2, (None, None), 2))
        assert not row["client_limited"], row["client_limited_because"]
    # the same in the open loop is the server shedding what was offered: not the client's doing
    assert not summarise(LoadResult(ok + refused, (0.0, 1.0), [0.1], 110.0, 2, (None, None), 2))["client_limited"]
    # two client processes at 30 % of a core each: 0.6 of a 2-core machine, over a quarter of it
    row = summarise(LoadResult(ok, (0.0, 1.0), [0.3, 0.3], None, 2, (None, None), 2))
    assert row["client_limited_because"] == ["the client processes used 0.60 of the machine's 2 cores (limit 25%)"]
    assert not summarise(LoadResult(ok, (0.0, 1.0), [0.3, 0.3], None, 2, (None, None), 8))["client_limited"]


def _records(lags_ms: list[float], latency_ms: float) -> list:
    t = [1.0 + i / 100 for i in range(len(lags_ms))]
    return [
        (t[i], t[i], t[i], t[i] + latency_ms / 1000, 200, 1.0, 1.0, 1.0, False, lag / 1000.0, 0.5, 0.25)
        for i, lag in enumerate(lags_ms)
    ]


@pytest.mark.parametrize(
    ("lags_ms", "latency_ms", "cpu", "limited"),
    [
        ([0.1] * 100, 50.0, [0.2], False),  # no lag, idle client
        ([0.1] * 90 + [60.0] * 10, 100.0, [0.2], True),  # lag p99 60 ms > 25 % of 100 ms
        ([0.1] * 90 + [15.0] * 10, 20.0, [0.2], False),  # lag above 25 % but below the 20 ms floor
        ([0.1] * 90 + [150.0] * 10, 2400.0, [0.2], False),  # lag above the floor but 6 % of the p99
        ([0.1] * 100, 50.0, [0.3, 0.95], True),  # a client process at 95 % of a core
    ],
)
def test_client_limited_verdict(lags_ms, latency_ms, cpu, limited):
    result = LoadResult(_records(lags_ms, latency_ms), (0.0, 10.0), cpu, 10.0, 1, (None, None))
    row = summarise(result)
    assert row["client_lag_p99_ms"] == pytest.approx(np.percentile(lags_ms, 99))
    assert row["client_cpu_max"] == max(cpu) and row["client_cpu_cores"] == pytest.approx(sum(cpu))
    assert row["client_limited"] is limited and bool(row["client_limited_because"]) is limited


def test_mean_batch_counts_forward_passes_from_the_answers_batch_sizes():
    """Two passes of 4 (8 answers saying 4), one of 2, one of 1: 11 queries in 4 passes; 503s and errors don't count."""
    sizes = [4] * 8 + [2] * 2 + [1]
    records = [(1.0, 1.0, 1.0, 1.01, 200, 1.0, 1.0, float(b), False, 0.0, float(b), 2.0 * b) for b in sizes]
    nan = float("nan")
    records += [(1.0, 1.0, 1.0, 1.01, 503, nan, nan, nan, True, 0.0, nan, nan)]
    row = summarise(LoadResult(records, (0.0, 2.0), [0.1], None, 4, (None, None)))
    passes = 8 / 4 + 2 / 2 + 1 / 1
    assert row["mean_batch"] == pytest.approx(len(sizes) / passes) == pytest.approx(11 / 4)
    assert row["rejected_503"] == 1 and row["errors"] == 0 and row["queries"] == 11
    # the server's decode and queue times of the answered requests (here decode = b ms, queue = 2b ms)
    assert row["server_decode_p50_ms"] == pytest.approx(np.percentile(sizes, 50))
    assert row["server_queue_p99_ms"] == pytest.approx(np.percentile([2.0 * b for b in sizes], 99))
    assert row["server_read_p99_ms"] is None  # records of 12 fields carry no read / search timings


def test_read_and_the_rest_of_the_handler_time_come_from_the_answers_timings():
    # total 50 ms = read 3 + decode 2 + queue 10 + embed 20 + search 1 + 14 after the batch (k ms more for request k)
    records = [(1.0, 1.0, 1.0, 1.06, 200, 50.0 + k, 20.0, 4.0, False, 0.0, 2.0, 10.0, 3.0, 1.0) for k in range(101)]
    row = summarise(LoadResult(records, (0.0, 2.0), [0.1], None, 4, (None, None)))
    assert row["server_read_p99_ms"] == pytest.approx(3.0)
    assert row["server_rest_p99_ms"] == pytest.approx(np.percentile([14.0 + k for k in range(101)], 99))


def test_open_loop_records_every_scheduled_arrival_behind_a_slow_server():
    """The auditor's slow.py: 100/s offered for 2 s on one connection to a server that takes 0.1 s, a 1 s time-out.
    Before, the arrivals still queued when the thread's join timed out were dropped (158 of 174 recorded: the
    longest waits missing, p99 biased low). Now one that waited out the time-out for the connection is recorded as
    failed (status 0) without being sent, and every scheduled arrival has a record."""

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.1)
            body = json.dumps({"timings_ms": {"total": 100.0, "embed": 100.0}, "batch_size": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server, url = _serve(ThreadingHTTPServer, Slow)
    try:
        result = run_load(
            url, [b"x"], k=1, warmup_s=0.0, duration_s=2.0, concurrency=1, rate=100.0, processes=1, timeout_s=1.0
        )
    finally:
        server.shutdown()
        server.server_close()
    scheduled = poisson_schedule(100.0, 2.0, seed=0)
    assert sorted(r[0] - result.window[0] for r in result.records) == pytest.approx(list(scheduled), abs=1e-6)
    row = summarise(result)
    answered = sum(r[4] == 200 for r in result.records)
    assert 5 <= answered <= 40 and row["errors"] == len(scheduled) - answered > 100
    # the answered ones waited up to the time-out for the connection, and their latency says so
    assert 500.0 < row["p99_ms"] < 1000.0 + 300.0


def test_a_client_thread_stuck_in_a_dripping_answer_is_left_and_its_arrivals_count_as_failed(monkeypatch, caplog):
    """A server that sends its answer a byte at a time never times the socket out: the thread is still in its
    request when the run ends. Its arrivals, sent or still queued, are each recorded once as failed (status 0),
    and the run does not wait for the thread beyond the time-outs and a grace."""
    import queue
    import socket

    from raml.bench import loadgen

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not stop.wait(0.05):
            conn.sendall(b"a")
        conn.close()

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    monkeypatch.setattr(loadgen, "_JOIN_GRACE_S", 0.2)
    schedule = (0.0, 0.05, 0.1)
    job = loadgen._Job("127.0.0.1", listener.getsockname()[1], "/search?k=1", (b"x",), 1, 0, 0.3, schedule, 0.15)
    ready, start, results = queue.Queue(), queue.Queue(), queue.Queue()
    start.put(time.monotonic() + 0.05)
    began = time.monotonic()
    try:
        with caplog.at_level("WARNING", logger="raml.bench.loadgen"):
            loadgen._worker(job, 0, ready, start, results)
        waited = time.monotonic() - began
    finally:
        stop.set()
        dripper.join(timeout=5)
        listener.close()
    index, records, _ = results.get(timeout=1)
    assert index == 0 and ready.get_nowait() == 0
    assert [r[4] for r in records] == [0, 0, 0]  # every arrival once, as failed
    assert sorted(r[0] for r in records) == sorted(records[0][0] - schedule[0] + s for s in schedule)
    assert waited < 5  # the run's end plus two time-outs and the grace, not the stuck request
    assert "1 client thread(s) still in a request at the run's end: 3 arrivals count as failed" in caplog.text


class _GarbledHandler(BaseHTTPRequestHandler):
    """Answers every POST with 200 and a body that is not JSON (as a server dying mid-answer may)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("rate", [None, 20.0])
def test_a_200_whose_body_is_not_json_counts_as_an_error_and_the_client_goes_on(rate):
    """Before, json.loads raised in the client's thread, which died (an unhandled thread exception) and left its
    remaining requests unsent; each such answer is now an error (status 0) and the thread keeps sending."""
    server, url = _serve(ThreadingHTTPServer, _GarbledHandler)
    try:
        result = run_load(url, [b"x"], k=1, warmup_s=0.0, duration_s=1.0, concurrency=1, processes=1, rate=rate)
    finally:
        server.shutdown()
        server.server_close()
    assert len(result.records) >= 3, len(result.records)  # one thread: it went on after the first bad answer
    assert all(record[4] == 0 for record in result.records)
    assert summarise(result)["errors"] == len(result.records)
