"""HTTP load generator for ``raml bench serve``: client processes with blocking connections, closed or open loop.

Why not one asyncio client: a single event loop in the benchmark's process shares its core with JSON parsing,
TLS-free socket work and every other coroutine, so under load requests wait *inside the client* before their
headers are sent, and the benchmark reports the client's queue as the server's latency (issue 20). Here:

- ``processes`` worker processes (``multiprocessing``, spawn), each with ``threads`` threads, each thread with
  its own blocking ``http.client.HTTPConnection`` (keep-alive);
- **closed loop** (:func:`run_load` with ``rate=None``): every thread sends one request after the other; the
  latency of a request is measured from its send to its answer;
- **open loop** (``rate`` in requests/s): arrivals follow a Poisson process at the offered rate (exponential
  gaps, seeded). A dispatcher thread per process hands each arrival to a free connection at its *intended* time,
  and the latency is measured from that intended time, so a request that waited for a free connection because
  the server was slow is charged that wait (no coordinated omission);
- **a 503 in the closed loop**: the client waits what the answer's ``Retry-After`` asks (seconds; ``RETRY_DEFAULT_S``
  when the 503 carried none or an unreadable one, never past the row's end) before its next request, as a polite
  client would. Re-sending at once turned an overloaded server's refusals into a flood of requests that cost the
  server's event loop and the client a core between them, a cost the server that never refused did not pay;
- the client's own lag: in the open loop, how late the dispatcher handed an arrival over (intended -> handed);
  in the closed loop, the gap between an answer and the next send on the same connection. ``pool wait``
  (handed -> sent) is the time an arrival waited for a free connection: it grows when the server holds all
  ``processes * threads`` connections, which is the server's doing, not the client's;
- each answer's ``timings_ms`` (the server's own account: ``total`` from the handler's start to the answer,
  ``embed`` the batch's forward pass) is kept, so the time spent outside the server's handler is known.

A row is **client-limited** (:func:`summarise`) when a client process used more than ``CPU_LIMIT`` of a core, when
the client processes together used more than ``CORES_SHARE`` of the machine's cores, when the client's lag p99
exceeds ``LAG_SHARE`` of the latency p99 (and ``LAG_FLOOR_MS``), or, in the closed loop, when the clients sent more
than ``SENT_PER_ANSWER`` requests per answered query by 503 refusals alone (refusals, not queries, made the row;
errors and time-outs are the server's failures and do not flag a row): then the row describes the client, not the
server, and a benchmark leaves it out of its ratios.

Records: one tuple per request, ``(intended, handed, sent, done, status, server_total_ms, server_embed_ms,
batch_size, retry_after, lag, server_decode_ms, server_queue_ms, server_read_ms, server_search_ms)`` with times in
s on the system-wide ``time.monotonic`` clock (the same in every process on Linux), ``status`` 0 for a failed
connection or a time-out, ``retry_after`` whether a 503 carried ``Retry-After``. In the open loop every scheduled
arrival gets a record: one that waited more than the time-out for a free connection is not sent and counts as
failed (status 0), as do those still held by a thread that outlived the run's end.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ClientPool",
    "http_client",
    "CORES_SHARE",
    "CPU_LIMIT",
    "LAG_FLOOR_MS",
    "LAG_SHARE",
    "LoadResult",
    "machine_cores",
    "poisson_schedule",
    "RETRY_DEFAULT_S",
    "run_load",
    "SENT_PER_ANSWER",
    "summarise",
]

#: a client process above this share of one core may itself be the bottleneck
CPU_LIMIT = 0.8
#: the client's lag p99 may be at most this share of the latency p99 (issue 20's client: 2.2 s of a 2.4 s p99) ...
LAG_SHARE = 0.25
#: ... unless it is below this many ms (timer and scheduler granularity on a busy 2-core machine)
LAG_FLOOR_MS = 20.0
#: the client processes together above this share of the machine's cores take them from a server beside them
CORES_SHARE = 0.25
#: closed loop: more requests sent per answered query than this, and the row measured refusals, not throughput
SENT_PER_ANSWER = 2.0
#: closed loop: the wait after a 503 without a readable ``Retry-After`` (the server's own value is 1 s)
RETRY_DEFAULT_S = 1.0

_READY_TIMEOUT_S = 120.0
#: how long after its last possible answer (the run's end plus two time-outs) a client thread is waited for before
#: it counts as stuck in a request (a server that drips its answer byte by byte never times a socket out)
_JOIN_GRACE_S = 10.0

Record = tuple[float, float, float, float, int, float, float, float, bool, float, float, float, float, float]


@dataclass(frozen=True)
class _Job:
    host: str
    port: int
    target: str
    bodies: tuple[bytes, ...]
    threads: int
    start_offset: int
    timeout_s: float
    schedule: tuple[float, ...] | None  # open loop: intended send times of this worker, s after t0
    stop_after_s: float  # closed loop: send no request after t0 + this


@dataclass
class LoadResult:
    """What :func:`run_load` measured: the raw records, the window, and the client processes' CPU use."""

    records: list[Record]
    window: tuple[float, float]  # (start, end) on time.monotonic
    cpu_share: list[float]  # per client process: CPU s / wall s while it sent
    rate: float | None  # offered requests/s (open loop), None for the closed loop
    concurrency: int  # connections in all
    probes: tuple[Any, Any]  # what ``probe`` returned at the window's start and end
    machine_cores: int | None = None  # cores the clients and the server share; None: this process's


def poisson_schedule(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival times in ``[0, seconds)`` of a Poisson process of ``rate`` per s (exponential gaps)."""
    if not rate > 0:
        raise ValueError(f"The offered rate must be positive (requests/s), got {rate!r}.")
    rng = np.random.default_rng(seed)
    expected = int(rate * seconds)
    gaps = rng.exponential(1.0 / rate, size=expected + 10 * int(np.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    while times[-1] < seconds:  # astronomically rare; keeps the schedule exact
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=expected + 10))])
    return times[times < seconds]


_NO_TIMINGS = (float("nan"),) * 6
_TIMINGS = ("total", "embed", "decode", "queue", "read", "search")


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _retry_after_s(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for: None without one, ``RETRY_DEFAULT_S`` for an unreadable one."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:  # an HTTP date, or garbage
        return RETRY_DEFAULT_S
    return seconds if seconds >= 0 else RETRY_DEFAULT_S


def _send(
    conn: http.client.HTTPConnection, target: str, body: bytes
) -> tuple[int, tuple[float, float, float, float], float, float | None]:
    """One POST; (status, the server's (total, embed, decode, queue, read, search) ms, batch size, the
    Retry-After in s or None without one). Raises on a failed connection."""
    conn.request("POST", target, body=body, headers={"Content-Type": "image/jpeg"})
    response = conn.getresponse()
    data = response.read()
    timings, batch = _NO_TIMINGS, float("nan")
    if response.status == 200:
        answer = json.loads(data)
        ms = answer.get("timings_ms", {})
        timings = tuple(float(ms.get(name, "nan")) for name in _TIMINGS)
        batch = float(answer.get("batch_size", "nan"))
    return response.status, timings, batch, _retry_after_s(response.getheader("Retry-After"))


def _worker(job: _Job, index: int, ready: Any, start: Any, results: Any) -> None:
    """One client process: connect ``job.threads`` connections, wait for t0, send, put (index, records, cpu)."""
    records: list[Record] = []
    lock = threading.Lock()
    conns = [http.client.HTTPConnection(job.host, job.port, timeout=job.timeout_s) for _ in range(job.threads)]
    for conn in conns:
        conn.connect()
    ready.put(index)
    t0 = start.get(timeout=_READY_TIMEOUT_S)
    arrivals: queue.Queue = queue.Queue()

    def request(conn: http.client.HTTPConnection, i: int) -> tuple[int, tuple[float, ...], float, float | None]:
        try:
            return _send(conn, job.target, job.bodies[i % len(job.bodies)])
        # ValueError: a 200 whose body is not the JSON answer (cut short): an error, not the thread's end
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()  # reconnects on the next request
            return 0, _NO_TIMINGS, float("nan"), None

    def closed(t: int) -> None:
        conn, i = conns[t], job.start_offset + t
        stop = t0 + job.stop_after_s
        while time.monotonic() < t0:
            time.sleep(min(0.01, max(0.0, t0 - time.monotonic())))
        previous = time.monotonic()
        while (sent := time.monotonic()) < stop:
            status, (total, embed, decode, wait, read, search), batch, retry_after = request(conn, i)
            done = time.monotonic()
            lag, retry = sent - previous, retry_after is not None
            with lock:
                records.append(
                    (sent, sent, sent, done, status, total, embed, batch, retry, lag, decode, wait, read, search)
                )
            previous, i = done, i + job.threads
            if status == 503:  # wait as asked before the next request (the wait is the server's, not lag)
                pause = min(RETRY_DEFAULT_S if retry_after is None else retry_after, max(0.0, stop - done))
                time.sleep(pause)
                previous = done + pause

    dispatched: list[tuple[float, float, int]] = []  # open loop: every arrival handed over
    finished: set[int] = set()  # ... and the numbers of those recorded (under ``lock``)
    abandoned = threading.Event()  # set when threads outlived their join: what they still record is dropped

    def unsent(item: tuple[float, float, int]) -> Record:
        """A failed record (status 0) for an arrival that got no answer: never sent, or given up."""
        intended, handed, _ = item
        now = time.monotonic()
        nan = float("nan")
        return (intended, handed, now, now, 0, nan, nan, nan, False, handed - intended, nan, nan, nan, nan)

    def open_(t: int) -> None:
        conn = conns[t]
        while (item := arrivals.get()) is not None:
            intended, handed, i = item
            sent = time.monotonic()
            if sent - intended > job.timeout_s:  # waited out its time-out for a free connection: failed, not sent
                record = unsent(item)
            else:
                status, (total, embed, decode, wait, read, search), batch, retry_after = request(conn, i)
                done = time.monotonic()
                lag, retry = handed - intended, retry_after is not None
                record = (
                    intended, handed, sent, done, status, total, embed, batch, retry, lag, decode, wait, read, search
                )  # fmt: skip
            with lock:
                if abandoned.is_set():  # the run ended without this thread: its arrival is already counted
                    return
                records.append(record)
                finished.add(i)

    threads = [
        threading.Thread(target=open_ if job.schedule is not None else closed, args=(t,), daemon=True)
        for t in range(job.threads)
    ]
    cpu0, wall0 = time.process_time(), time.monotonic()
    for thread in threads:
        thread.start()
    if job.schedule is not None:
        for n, offset in enumerate(job.schedule):
            intended = t0 + offset
            while (now := time.monotonic()) < intended:
                time.sleep(intended - now)
            dispatched.append((intended, time.monotonic(), job.start_offset + n))
            arrivals.put(dispatched[-1])
        for _ in threads:
            arrivals.put(None)
    for thread in threads:
        thread.join(timeout=max(0.0, t0 + job.stop_after_s + 2 * job.timeout_s + _JOIN_GRACE_S - time.monotonic()))
    cpu_share = (time.process_time() - cpu0) / max(1e-9, time.monotonic() - max(wall0, t0))
    alive = [t for t, thread in enumerate(threads) if thread.is_alive()]
    with lock:
        if alive:  # stuck in a request (a server that drips its answer): what was not recorded counts as failed
            abandoned.set()
            left = [item for item in dispatched if item[2] not in finished]
            records.extend(unsent(item) for item in left)
            logger.warning(
                "%d client thread(s) still in a request at the run's end: %d arrivals count as failed",
                len(alive),
                len(left),
            )
        results.put((index, list(records), cpu_share))
    for t, conn in enumerate(conns):
        if t not in alive:  # closing a connection under a live thread breaks its request mid-way
            conn.close()


def _worker_loop(index: int, bodies: tuple[bytes, ...], jobs: Any, ready: Any, start: Any, results: Any) -> None:
    """A client process of a :class:`ClientPool`: runs one job after the other until it receives None."""
    while (job := jobs.get()) is not None:
        _worker(dataclasses.replace(job, bodies=bodies), index, ready, start, results)


def http_client() -> Any:  # -> httpx.Client (imported lazily: an optional dependency)
    """A benchmark's own HTTP client for one server's ``/health`` polls and ``/metrics`` probes (not the load).

    One client for all of them, each request still on a fresh connection (no keep-alive, as ``httpx.get``): a
    ``httpx.get`` builds a client, and with it an SSL context, for every call (~23 ms of CPU each on the project's
    machine), and the readiness poll alone calls it five times a second while a server starts.
    """
    import httpx

    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


class ClientPool:
    """``processes`` client processes, started once and reused for every row (a spawn costs seconds on a busy
    machine). Use as a context manager; :func:`run_load` takes it as ``pool``."""

    def __init__(self, processes: int, bodies: Sequence[bytes]):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}.")
        if not bodies:
            raise ValueError("No request bodies to send.")
        context = multiprocessing.get_context("spawn")  # never fork a parent that holds torch's threads
        self.ready, self.results = context.Queue(), context.Queue()
        self.jobs = [context.Queue() for _ in range(processes)]
        self.starts = [context.Queue() for _ in range(processes)]
        self.workers = [
            context.Process(
                target=_worker_loop,
                args=(p, tuple(bodies), self.jobs[p], self.ready, self.starts[p], self.results),
                daemon=True,
            )
            for p in range(processes)
        ]
        for worker in self.workers:
            worker.start()

    def close(self) -> None:
        """Stop the processes (those that do not stop within 30 s are terminated)."""
        for jobs in self.jobs:
            jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=10)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_load(
    url: str,
    bodies: Sequence[bytes],
    *,
    k: int,
    warmup_s: float,
    duration_s: float,
    concurrency: int,
    rate: float | None = None,
    processes: int = 2,
    timeout_s: float = 30.0,
    seed: int = 0,
    probe: Callable[[], Any] | None = None,
    pool: ClientPool | None = None,
) -> LoadResult:
    """Drive ``POST {url}/search?k=K`` for ``warmup_s + duration_s`` seconds from client processes.

    Args:
        url: the server, ``http://host:port``.
        bodies: JPEG bodies, sent in turn (ignored when ``pool`` is given: the pool's bodies are sent).
        k: results per query.
        warmup_s: seconds before the measured window (requests sent then are not summarised).
        duration_s: seconds of the measured window.
        concurrency: connections in all (closed loop: clients; open loop: the most requests in flight).
        rate: offered requests/s for the open loop; None for the closed loop.
        processes: client processes (at most ``concurrency``); the connections are shared out among them.
            Ignored when ``pool`` is given (its processes are used, at most ``concurrency`` of them).
        timeout_s: per request; a request without an answer by then counts as failed (status 0).
        seed: of the Poisson schedule.
        probe: called at the window's start and end (e.g. to read the server's ``/metrics``).
        pool: client processes to reuse; None starts (and stops) a pool for this call.

    Returns:
        The records of every request, the window and the client processes' CPU shares.
    """
    if pool is None:
        with ClientPool(max(1, min(processes, concurrency)), bodies) as own:
            return run_load(
                url, bodies, k=k, warmup_s=warmup_s, duration_s=duration_s, concurrency=concurrency, rate=rate,
                timeout_s=timeout_s, seed=seed, probe=probe, pool=own,
            )  # fmt: skip
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}.")
    parts = urlsplit(url)
    processes = min(len(pool.workers), concurrency)
    threads = [concurrency // processes + (1 if p < concurrency % processes else 0) for p in range(processes)]
    total_s = warmup_s + duration_s
    schedules: list[tuple[float, ...] | None] = [None] * processes
    if rate is not None:
        arrivals = poisson_schedule(rate, total_s, seed)
        schedules = [tuple(float(t) for t in arrivals[p::processes]) for p in range(processes)]
    offset = 0
    for p in range(processes):
        job = _Job(
            parts.hostname or "127.0.0.1",
            int(parts.port or 80),
            f"/search?k={int(k)}",
            (),
            threads[p],
            offset,
            timeout_s,
            schedules[p],
            total_s,
        )
        offset += threads[p]
        pool.jobs[p].put(job)
    for _ in range(processes):
        pool.ready.get(timeout=_READY_TIMEOUT_S)
    t0 = time.monotonic() + 0.05
    for p in range(processes):
        pool.starts[p].put(t0)
    window = (t0 + warmup_s, t0 + total_s)
    time.sleep(max(0.0, window[0] - time.monotonic()))
    before = probe() if probe is not None else None
    time.sleep(max(0.0, window[1] - time.monotonic()))
    after = probe() if probe is not None else None
    gathered = [pool.results.get(timeout=2 * timeout_s + 60) for _ in range(processes)]
    gathered.sort(key=lambda item: item[0])
    records = [record for _, part, _ in gathered for record in part]
    shares = [share for _, _, share in gathered]
    return LoadResult(records, window, shares, rate, concurrency, (before, after), machine_cores())


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def summarise(result: LoadResult) -> dict[str, Any]:
    """One row of the report from the records of requests *intended* within the window.

    Fields: ``queries`` (200s answered within the window), ``queries_per_s`` (those / window), ``sent_per_s``,
    ``offered_per_s``,
    ``p50_ms``/``p95_ms``/``p99_ms`` (answered 200s, from the intended send: the send in the closed loop),
    ``errors`` (failed connections and statuses other than 200 and 503), ``rejected_503``,
    ``rejected_without_retry_after``, ``mean_batch`` (queries per forward pass, from each answer's ``batch_size``),
    ``server_total_p50_ms``/``_p99_ms`` (the server's ``timings_ms.total``),
    ``server_embed_p50_ms``, ``server_decode_p50_ms``/``_p99_ms`` and ``server_queue_p50_ms``/``_p99_ms`` (the
    server's ``timings_ms.decode`` and ``.queue``: where an answered request's time went), ``server_read_p99_ms``
    (``timings_ms.read``: receiving the body) and ``server_rest_p99_ms`` (``total`` minus read, decode, queue, embed
    and search: the wake-up of the event loop after the batch and the answer),
    ``outside_server_p50_ms``/``_p99_ms`` (send -> answer minus the server's total),
    ``client_lag_p50_ms``/``_p99_ms``/``_max_ms``, ``pool_wait_p99_ms``, ``client_cpu_max`` (the busiest client
    process, share of a core), ``client_cpu_cores`` (all client processes together, in cores), ``machine_cores``,
    ``client_limited`` and ``client_limited_because`` (the reasons, empty when the server was the limit).
    """
    start, end = result.window
    seconds = end - start
    # throughput: 200s *answered* within the window (a backlog answered after it is not throughput)
    completed = sum(1 for r in result.records if r[4] == 200 and start <= r[3] < end)
    nan2 = (float("nan"),) * 2  # records of 12 fields: no read / search timings
    rows = np.array(
        [r[:8] + (float(r[8]),) + r[9:12] + (tuple(r[12:14]) or nan2) for r in result.records if start <= r[0] < end],
        dtype=np.float64,
    ).reshape(-1, 14)
    intended, handed, sent, done, status = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
    ok = status == 200
    latency = (done - intended)[ok] * 1000.0
    server_total = rows[ok, 5]
    outside = (done - sent)[ok] * 1000.0 - server_total
    lag = rows[:, 9] * 1000.0
    batch = rows[ok, 7]
    batch = batch[np.isfinite(batch) & (batch >= 1)]
    pool_wait = (sent - handed) * 1000.0
    embed, decode, wait = rows[ok, 6], rows[ok, 10], rows[ok, 11]
    read = rows[ok, 12]
    # the rest of the handler's time: after the batch (the event loop's wake-up, the JSON answer), and any hop
    rest = server_total - rows[ok, 12] - decode - wait - embed - rows[ok, 13]
    row: dict[str, Any] = {
        "loop": "closed" if result.rate is None else "open",
        "offered_per_s": result.rate,
        "concurrency": result.concurrency,
        "queries": completed,
        "seconds": seconds,
        "queries_per_s": completed / seconds,
        "sent_per_s": len(rows) / seconds,
        "p50_ms": _percentile(latency, 50),
        "p95_ms": _percentile(latency, 95),
        "p99_ms": _percentile(latency, 99),
        "errors": int(((status != 200) & (status != 503)).sum()),
        "rejected_503": int((status == 503).sum()),
        "rejected_without_retry_after": int(((status == 503) & (rows[:, 8] == 0)).sum()),
        # a forward pass of b queries answers b requests, each saying b: passes = sum(1 / b)
        "mean_batch": float(batch.size / np.sum(1.0 / batch)) if batch.size else None,
        "server_total_p50_ms": _percentile(server_total[np.isfinite(server_total)], 50),
        "server_total_p99_ms": _percentile(server_total[np.isfinite(server_total)], 99),
        "server_embed_p50_ms": _percentile(embed[np.isfinite(embed)], 50),
        "server_decode_p50_ms": _percentile(decode[np.isfinite(decode)], 50),
        "server_decode_p99_ms": _percentile(decode[np.isfinite(decode)], 99),
        "server_queue_p50_ms": _percentile(wait[np.isfinite(wait)], 50),
        "server_queue_p99_ms": _percentile(wait[np.isfinite(wait)], 99),
        "server_read_p99_ms": _percentile(read[np.isfinite(read)], 99),
        "server_rest_p99_ms": _percentile(rest[np.isfinite(rest)], 99),
        "outside_server_p50_ms": _percentile(outside[np.isfinite(outside)], 50),
        "outside_server_p99_ms": _percentile(outside[np.isfinite(outside)], 99),
        "client_lag_p50_ms": _percentile(lag, 50),
        "client_lag_p99_ms": _percentile(lag, 99),
        "client_lag_max_ms": float(lag.max()) if lag.size else None,
        "pool_wait_p99_ms": _percentile(pool_wait, 99),
        "client_cpu_max": max(result.cpu_share) if result.cpu_share else None,
        # the cores the whole load generator took from a machine it may share with the server
        "client_cpu_cores": float(sum(result.cpu_share)) if result.cpu_share else None,
        "machine_cores": result.machine_cores or machine_cores(),
    }
    reasons = []
    if row["client_cpu_max"] is not None and row["client_cpu_max"] > CPU_LIMIT:
        reasons.append(f"a client process used {row['client_cpu_max']:.0%} of a core (limit {CPU_LIMIT:.0%})")
    cores, machine = row["client_cpu_cores"], row["machine_cores"]
    if cores is not None and cores > CORES_SHARE * machine:
        reasons.append(
            f"the client processes used {cores:.2f} of the machine's {machine} cores (limit {CORES_SHARE:.0%})"
        )
    # refusals only: errors and time-outs are the server's failures, which the row and the goals report as such
    refused_per_s = row["rejected_503"] / seconds
    if result.rate is None and refused_per_s > 0 and refused_per_s > (SENT_PER_ANSWER - 1) * row["queries_per_s"]:
        reasons.append(
            f"the clients sent {row['sent_per_s']:.1f} requests/s for {row['queries_per_s']:.1f} answered/s, "
            f"{refused_per_s:.1f}/s refused (more than {SENT_PER_ANSWER:g} per answer: refusals, not the server's "
            "throughput)"
        )
    lag_p99, p99 = row["client_lag_p99_ms"], row["p99_ms"]
    if lag_p99 is not None and lag_p99 > max(LAG_FLOOR_MS, LAG_SHARE * (p99 or 0.0)):
        reasons.append(
            f"the client's lag p99 {lag_p99:.1f} ms exceeds {LAG_SHARE:.0%} of the latency p99 "
            f"({p99 or 0.0:.1f} ms) and {LAG_FLOOR_MS:g} ms"
        )
    if not len(rows):
        reasons.append("no request was sent in the window")
    row["client_limited"] = bool(reasons)
    row["client_limited_because"] = reasons
    return row
