"""``raml bench adaptive``: a fixed query size against a size chosen per batch for a latency target, under load.

Contract: in one run on loopback, the demo's multi-size student (``raml bench resolutions``: one student trained
for the query sizes 24, 32 and 48 against the demo's teacher at DR = 64) answers queries of the demo's held-out
classes, searched in the teacher's index of those classes, served by ``raml serve`` (a separate process) twice:

- **fixed**: every query at the largest trained size (``--image-size`` that size);
- **adaptive**: ``--latency-target-ms T``: each batch at the largest size predicted to keep the p99 under T.

The load comes from :mod:`raml.bench.loadgen`: first a closed loop of ``saturation_clients`` clients against the
fixed server gives the *saturation rate* of the largest size; then the open loop (Poisson arrivals, latency from
the intended send time) at ``rates`` x that rate, the same absolute rates for both servers. Unless given, T is
twice the fixed server's p99 at the first (lowest) offered rate: a target the largest size meets with room at a
light load. Each row: answered q/s, p50/p99, errors, 503s, the share of the queries answered at each size (from
the server's ``raml_queries_total{size}`` counters read at the window's start and end) and the **served mAP**:
``sum over sizes of share x that size's asymmetric mAP``, the mAP measured by ``raml test --image-size 24,32,48``
(:func:`raml.retrieval.sizes.evaluate_sizes`) on the same held-out classes at the start of the run. The served mAP
is the expected accuracy of the answers given (503s are no answers; their count is beside it).

Outputs: the report (stdout), ``--json`` and ``--plot`` (p99 and served mAP against the offered rate, fixed vs
adaptive). ``--quick``: random tiny networks on a tiny dataset, a few seconds per row (tests: structure only).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from raml.bench import parsers
from raml.bench.cpu import add_server_cores, core_columns, cpu_snapshot
from raml.bench.loadgen import ClientPool, http_client, run_load, summarise
from raml.utils import atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = [
    "AdaptiveBenchSettings",
    "format_adaptive_report",
    "main",
    "plot_adaptive",
    "run_adaptive_benchmark",
    "served_map",
    "size_shares",
]

_START_TIMEOUT_S = 180.0
DATASET = "synth"


@dataclass(frozen=True)
class AdaptiveBenchSettings:
    """What one run does (see the module docstring). ``target_ms`` None: twice the fixed server's p99 at the
    lowest offered rate."""

    target_ms: float | None = None
    up_fraction: float = 0.7
    rates: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)  # x the fixed server's saturation rate
    duration_s: float = 8.0
    warmup_s: float = 2.0
    # closed loop: --max-batch clients, each query finds room in the next batch. Twice as many (64, until
    # 2026-12-04) made the time-bounded queue shed ~1,000 requests in 6 s, the clients resent at once, and the
    # server's front end spent its time on 503s: 180 q/s at 48 px against 222 q/s with 32 clients, measured the
    # same hour (docs/deployment.md), so "2x saturation" was 1.6x what the server can answer
    saturation_clients: int = 32
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 64
    # open loop: the most requests in flight; above queue_size + max_batch (or nothing is shed) and below the
    # server's --max-connections (256), so that the /metrics probe always gets a connection
    open_connections: int = 160
    client_processes: int = 2
    database_size: int = 64
    k: int = 10
    timeout_s: float = 30.0
    seed: int = 0
    server_args: tuple[str, ...] = ()  # more raml serve flags, for both servers (A/B experiments, e.g. --eager)


@dataclass(frozen=True)
class BenchInputs:
    """The networks and data the run serves: a multi-size student, its teacher, the demo's data root."""

    student: Path
    teacher: Path
    data_root: Path


def resolutions_inputs(directory: Path, seed: int = 0) -> BenchInputs:
    """The multi-size student, teacher and data that ``raml bench resolutions --out DIRECTORY`` wrote.

    Raises:
        FileNotFoundError: Naming what is missing and the command that makes it.
    """
    inputs = BenchInputs(
        directory / "students" / f"seed{seed}" / "multi" / "model_best.pth.tar",
        directory / "teacher" / "model_best.pth.tar",
        directory / "data",
    )
    for what, path in (("multi-size student", inputs.student), ("teacher", inputs.teacher)):
        if not path.is_file():
            raise FileNotFoundError(
                f"No {what} at {path}: run `raml bench resolutions --out {directory}` first (it trains the demo's "
                "multi-size student), or give --student, --teacher and --data-root."
            )
    return inputs


def quick_inputs(work_dir: Path) -> BenchInputs:
    """Random tiny networks (the student listing the sizes 16 and 24) and a tiny synthetic dataset: for tests."""
    from raml.data.synth import generate_synthetic_dataset
    from raml.models import build_network, save_checkpoint

    generate_synthetic_dataset(work_dir / "data" / DATASET, num_classes=4, images_per_class=4, image_size=32)
    paths = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        network = build_network("timm/test_resnet", whitening=8, pretrained=False)
        if name == "student":
            network.meta["image_sizes"] = [16, 24]
        paths[name] = work_dir / f"{name}.pth"
        save_checkpoint(paths[name], network)
    return BenchInputs(paths["student"], paths["teacher"], work_dir / "data")


def size_maps(inputs: BenchInputs, sizes: list[int], database_size: int) -> dict[int, float]:
    """Asymmetric mAP (%) of the student at each size on the held-out classes (``raml test --image-size``)."""
    from raml.data import get_split
    from raml.models import load_network
    from raml.retrieval.sizes import evaluate_sizes

    device = torch.device("cpu")
    split = get_split(f"{DATASET}-test", inputs.data_root)
    student = load_network(inputs.student, device=device)
    teacher = load_network(inputs.teacher, device=device)
    entries = evaluate_sizes(
        student, [split], sizes, device, teacher=teacher, teacher_image_size=database_size, progress=False
    )
    return {int(e["image_size"]): float(e["results"][split.name]["asym"]["mAP"]) for e in entries}


def _index(inputs: BenchInputs, work_dir: Path, database_size: int) -> tuple[Path, list[Path]]:
    """The teacher's index of the held-out classes; returns it and the query files (the same images)."""
    from raml.data import get_split
    from raml.deploy import index_images
    from raml.models import checkpoint_sha256, load_network

    split = get_split(f"{DATASET}-test", inputs.data_root)
    paths = [Path(p) for p in split.abspaths()]
    index_dir = work_dir / "index"
    index_images(
        load_network(inputs.teacher),
        [str(p) for p in paths],
        database_size,
        index_dir,
        checkpoint_sha256(inputs.teacher),
        network_path=inputs.teacher,
        labels=list(split.labels),
        dataset=split.name,
        overwrite=True,
    )
    return index_dir, paths


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ServeProcess:
    """``raml serve`` with ``flags`` in a child process on a free loopback port, its output in ``log``."""

    def __init__(self, flags: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        self._http = http_client()  # one client for every poll and probe (see raml.bench.loadgen.http_client)
        command = [sys.executable, "-m", "raml", "serve", *flags, "--port", str(self.port), "--device", "cpu"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, route: str) -> Any:
        return self._http.get(self.url + route, timeout=10)

    def __enter__(self) -> _ServeProcess:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"raml serve exited with status {self.process.returncode}; see {self._log.name}.")
            try:
                if self.get("/health").json().get("ready"):
                    return self
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        self.close()
        raise TimeoutError(f"raml serve did not answer /health within {_START_TIMEOUT_S:g} s; see {self._log.name}.")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._http.close()
        self._log.close()


def _queries_by_size(metrics_text: str) -> dict[int, float]:
    """``raml_queries_total{size="S"}`` counters of a ``/metrics`` text."""
    found = re.findall(r'^raml_queries_total\{size="(\d+)"\} (\S+)$', metrics_text, flags=re.MULTILINE)
    return {int(size): float(value) for size, value in found}


def _shed_by_reason(metrics_text: str) -> dict[str, float]:
    """``raml_shed_total{reason="R"}`` counters of a ``/metrics`` text (503s by the limit reached)."""
    found = re.findall(r'^raml_shed_total\{reason="([^"]+)"\} (\S+)$', metrics_text, flags=re.MULTILINE)
    return {reason: float(value) for reason, value in found}


def _late_answers(metrics_text: str) -> float:
    """``raml_late_answers_total`` of a ``/metrics`` text (0 when absent)."""
    found = re.search(r"^raml_late_answers_total (\S+)$", metrics_text, flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def counter_deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, int]:
    """How much each counter grew between two readings (only those that did; empty when a reading is missing)."""
    if before is None or after is None:
        return {}
    grown = {name: after[name] - before.get(name, 0.0) for name in sorted(after)}
    return {name: int(round(value)) for name, value in grown.items() if value > 0}


def _read_counters(server: _ServeProcess, attempts: int = 5) -> tuple[dict[int, float], dict[str, float], float] | None:
    """The server's per-size query counters, its 503s by reason and its late answers (on a latency target's
    late-answer budget), or None when ``/metrics`` did not answer 200 (then the row has no size shares rather than
    wrong ones)."""
    for _ in range(attempts):
        try:
            response = server.get("/metrics")
        except Exception as error:  # a busy server may time out; try again
            logger.warning("GET /metrics failed (%s); retrying", error)
            continue
        if response.status_code == 200:
            return _queries_by_size(response.text), _shed_by_reason(response.text), _late_answers(response.text)
        logger.warning("GET /metrics answered %d; retrying", response.status_code)
        time.sleep(0.1)
    return None


def size_shares(before: dict[int, float] | None, after: dict[int, float] | None) -> dict[int, float]:
    """Share of the queries embedded between two counter readings, per size (empty when none was, or when a
    reading is missing)."""
    if before is None or after is None:
        return {}
    counts = {size: after.get(size, 0.0) - before.get(size, 0.0) for size in after}
    total = sum(counts.values())
    return {size: count / total for size, count in sorted(counts.items()) if count > 0} if total > 0 else {}


def served_map(shares: dict[int, float], maps: dict[int, float]) -> float | None:
    """Expected mAP of the answers: ``sum(share[S] * mAP[S])``; None without answers."""
    return sum(share * maps[size] for size, share in shares.items()) if shares else None


def _row(server: _ServeProcess, pool: ClientPool, bodies: list[bytes], s: AdaptiveBenchSettings, **load: Any) -> dict:
    result = run_load(
        server.url,
        bodies,
        k=s.k,
        warmup_s=s.warmup_s,
        duration_s=s.duration_s,
        processes=s.client_processes,
        timeout_s=s.timeout_s,
        seed=s.seed,
        probe=lambda: (_read_counters(server), cpu_snapshot(server.process.pid)),
        pool=pool,
        **load,
    )
    row = summarise(result)
    counters = [probe[0] for probe in result.probes]
    sizes = [None if counted is None else counted[0] for counted in counters]
    row["size_share"] = {str(size): share for size, share in size_shares(*sizes).items()}
    row["size_share_read"] = all(counted is not None for counted in counters)
    # the server's account of its 503s in the window, by the limit reached (queue_wait, uploads, decodes, ...)
    row["shed_by_reason"] = counter_deltas(*[None if counted is None else counted[1] for counted in counters])
    # answered past their wait bound on the late-answer budget (--late-budget), in the window; None: unread
    lates = [None if counted is None else counted[2] for counted in counters]
    row["late_answers"] = None if None in lates else int(round(lates[1] - lates[0]))
    # the cores of the window: the server's event loop, its other threads, the whole machine (raml.bench.cpu)
    add_server_cores(row, *[probe[1] for probe in result.probes])
    return row


@contextlib.contextmanager
def _held(lock: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock`` for the block (None: nothing), so that timed runs never overlap."""
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as handle:
        logger.info("Waiting for the lock %s", lock)
        fcntl.flock(handle, fcntl.LOCK_EX)
        logger.info("Holding the lock %s (load average %s)", lock, " ".join(f"{v:.1f}" for v in os.getloadavg()))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_adaptive_benchmark(
    inputs: BenchInputs, work_dir: Path, settings: AdaptiveBenchSettings | None = None, lock: Path | None = None
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) in ``work_dir``; returns the report as a dict. ``lock``: a
    file to hold an exclusive ``flock`` on while the servers are loaded (not while the mAP is evaluated and the
    index built), so that timed runs of several benchmarks never overlap."""
    from raml.models import load_network

    settings = settings or AdaptiveBenchSettings()
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sizes = sorted(int(s) for s in (load_network(inputs.student).meta.get("image_sizes") or []))
    if len(sizes) < 2:
        raise ValueError(f"{inputs.student} lists no image_sizes in its meta: a multi-size student is needed.")
    largest = sizes[-1]
    maps = size_maps(inputs, sizes, settings.database_size)
    logger.info("Asymmetric mAP per query size: %s", ", ".join(f"{s} px {m:.2f}" for s, m in maps.items()))
    index_dir, query_files = _index(inputs, work_dir, settings.database_size)
    bodies = [p.read_bytes() for p in query_files]
    common = ["--index", str(index_dir), "--network-path", str(inputs.student), "--max-batch", str(settings.max_batch)]
    common += ["--max-wait-ms", str(settings.max_wait_ms), "--queue-size", str(settings.queue_size)]
    common += list(settings.server_args)
    rows: list[dict[str, Any]] = []
    target = settings.target_ms
    load_before = list(os.getloadavg())
    with _held(lock), ClientPool(settings.client_processes, bodies) as pool:
        load_before = list(os.getloadavg())
        with _ServeProcess([*common, "--image-size", str(largest)], work_dir / "serve-fixed.log") as fixed:
            closed = _row(fixed, pool, bodies, settings, concurrency=settings.saturation_clients)
            saturation = closed["queries_per_s"]
            logger.info("Saturation of the fixed server at %d px: %.1f q/s", largest, saturation)
            if closed["client_limited"]:  # the rates below are fractions of it: the goal is not measured
                logger.warning(
                    "The saturation row was client-limited (%s): the goal at 2x is not measured.",
                    "; ".join(closed["client_limited_because"]),
                )
            for fraction in settings.rates:
                row = _row(
                    fixed, pool, bodies, settings, concurrency=settings.open_connections, rate=fraction * saturation
                )
                rows.append({"server": "fixed", "saturation_fraction": fraction, **row})
                _log_row(rows[-1], maps)
        target, target_limited = derived_target(settings.target_ms, rows)
        flags = [*common, "--latency-target-ms", f"{target:.1f}", "--latency-up-fraction", str(settings.up_fraction)]
        with _ServeProcess(flags, work_dir / "serve-adaptive.log") as adaptive:
            for fraction in settings.rates:
                row = _row(
                    adaptive, pool, bodies, settings, concurrency=settings.open_connections, rate=fraction * saturation
                )
                row["size_changes"] = adaptive.get("/health").json()["adaptive"]["changes"]
                rows.append({"server": "adaptive", "saturation_fraction": fraction, **row})
                _log_row(rows[-1], maps)
    for row in rows:
        shares = {int(size): share for size, share in row["size_share"].items()}
        row["served_mAP"] = served_map(shares, maps)
    return {
        "benchmark": "adaptive",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average": list(os.getloadavg()),
        },
        "settings": {**asdict(replace(settings, target_ms=target)), "target_derived": settings.target_ms is None},
        "inputs": {key: str(value) for key, value in asdict(inputs).items()},
        "sizes": sizes,
        "asym_mAP": {str(size): value for size, value in maps.items()},
        "database_images": len(query_files),
        "saturation": {"size": largest, "clients": settings.saturation_clients, **closed},
        "rows": rows,
        "goals": _goals(rows, target, saturation_limited=closed["client_limited"] or target_limited),
        "seconds": time.perf_counter() - start,
    }


def derived_target(given_ms: float | None, fixed_rows: list[dict[str, Any]]) -> tuple[float, bool]:
    """The latency target T and whether it came from a client-limited row: ``given_ms`` (``--target-ms``) as
    given, else twice the p99 of the fixed server's first row that answered (the lowest rate; see the module
    docstring). A target derived from a client-limited row measures the client, so the goal it sets is not
    measured either.

    Raises:
        RuntimeError: no target given and no fixed row answered a query.
    """
    if given_ms is not None:
        return given_ms, False
    for row in fixed_rows:
        if row["p99_ms"] is not None:
            if row["client_limited"]:
                logger.warning(
                    "The latency target comes from a client-limited row (%s): the goal at 2x is not measured.",
                    "; ".join(row["client_limited_because"]),
                )
            return 2.0 * row["p99_ms"], bool(row["client_limited"])
    raise RuntimeError("The fixed server answered no query at the lowest rate: no latency target to derive.")


def _goals(rows: list[dict[str, Any]], target: float, saturation_limited: bool = False) -> dict[str, Any]:
    """Issue 20's goal at 2x saturation: the adaptive server keeps p99 <= T with no 503s; the fixed one sheds or
    misses T. ``met`` is None (not measured) when either row at 2x, or a row that set the goal's scale
    (``saturation_limited``: the saturation row whose rate sets every offered rate, or the row a derived target
    came from), was client-limited."""
    at = {r["server"]: r for r in rows if abs(r["saturation_fraction"] - 2.0) < 1e-9}
    if set(at) != {"fixed", "adaptive"}:
        return {"target_ms": target}
    a, f = at["adaptive"], at["fixed"]
    adaptive_met = a["p99_ms"] is not None and a["p99_ms"] <= target and a["rejected_503"] == 0 and a["errors"] == 0
    fixed_fails = f["rejected_503"] > 0 or f["errors"] > 0 or f["p99_ms"] is None or f["p99_ms"] > target
    return {
        "target_ms": target,
        "at_2x": {
            "adaptive_p99_ms": a["p99_ms"],
            "adaptive_503": a["rejected_503"],
            "adaptive_late": a.get("late_answers"),
            "adaptive_errors": a["errors"],
            "adaptive_served_mAP": a["served_mAP"],
            "fixed_p99_ms": f["p99_ms"],
            "fixed_503": f["rejected_503"],
            "fixed_errors": f["errors"],
            "fixed_served_mAP": f["served_mAP"],
            "met": None
            if saturation_limited or a["client_limited"] or f["client_limited"]
            else bool(adaptive_met and fixed_fails),
        },
    }


def _log_row(row: dict[str, Any], maps: dict[int, float]) -> None:
    logger.info(
        "%s at %.2fx saturation (%.1f/s): %.1f q/s, p99 %s ms, %d errors, %d 503s (server: %s), sizes %s",
        row["server"],
        row["saturation_fraction"],
        row["offered_per_s"],
        row["queries_per_s"],
        _number(row["p99_ms"]),
        row["errors"],
        row["rejected_503"],
        row.get("shed_by_reason"),
        row["size_share"],
    )


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_adaptive_report(result: dict[str, Any]) -> str:
    """The plain-text table: one row per (server, offered rate), the mAP per size and the goal."""
    s, sat = result["settings"], result["saturation"]
    sizes = result["sizes"]
    lines = [
        f"raml serve, fixed {sizes[-1]} px vs --latency-target-ms {s['target_ms']:.1f}"
        f"{' (derived: 2x the fixed p99 at the lowest rate)' if s['target_derived'] else ''}; "
        f"{result['database_images']} images indexed at {s['database_size']} px; {s['duration_s']:g} s per row after "
        f"{s['warmup_s']:g} s warm-up; {result['machine']['cpu']}, {result['machine']['cores']} cores, load average "
        + " ".join(f"{v:.1f}" for v in result["machine"]["load_average_before"])
        + " before the load rows, "
        + " ".join(f"{v:.1f}" for v in result["machine"]["load_average"])
        + " after",
        "asymmetric mAP per query size (raml test): "
        + ", ".join(f"{size} px {value:.2f}" for size, value in result["asym_mAP"].items()),
        f"saturation of the fixed server ({sat['clients']} closed-loop clients): {sat['queries_per_s']:.1f} q/s"
        + (
            " (CLIENT-LIMITED, no goal measured: " + "; ".join(sat["client_limited_because"]) + ")"
            if sat.get("client_limited")
            else ""
        ),
        "",
        f"{'server':<9} {'x sat':>5} {'offered':>8} {'q/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'503s':>5} "
        f"{'late':>5} "
        + " ".join(f"{f'{size}px':>6}" for size in sizes)
        + f" {'mAP':>6} {core_columns()} {'limit':>6}  503s by the server's reason",
    ]
    for r in result["rows"]:
        shares = " ".join(f"{r['size_share'].get(str(size), 0.0):>6.0%}" for size in sizes)
        lines.append(
            f"{r['server']:<9} {r['saturation_fraction']:>5.2f} {r['offered_per_s']:>8.1f} {r['queries_per_s']:>7.1f} "
            f"{_number(r['p50_ms']):>8} {_number(r['p99_ms']):>8} {r['errors']:>6} {r['rejected_503']:>5} "
            f"{'-' if r.get('late_answers') is None else r['late_answers']:>5} {shares} "
            f"{_number(r['served_mAP'], 2):>6} {core_columns(r)} {'client' if r['client_limited'] else 'server':>6}  "
            + (", ".join(f"{reason} {n}" for reason, n in r.get("shed_by_reason", {}).items()) or "-")
        )
    # the flags before the goal: a goal from those rows is not measured
    for r in result["rows"]:
        if r["client_limited"]:
            lines.append(
                f"CLIENT-LIMITED row ({r['server']}, {r['offered_per_s']:.1f}/s): "
                + "; ".join(r["client_limited_because"])
            )
    goal = result["goals"].get("at_2x")
    if goal:
        verdict = "not measured (client-limited)" if goal["met"] is None else "met" if goal["met"] else "missed"
        lines += [
            "",
            f"at 2x saturation: adaptive p99 {_number(goal['adaptive_p99_ms'])} ms (target {s['target_ms']:.1f}), "
            f"{goal['adaptive_503']} 503s, {goal.get('adaptive_late', '-')} answered late (--late-budget), "
            f"served mAP {_number(goal['adaptive_served_mAP'], 2)}; fixed p99 "
            f"{_number(goal['fixed_p99_ms'])} ms, {goal['fixed_503']} 503s, mAP {_number(goal['fixed_served_mAP'], 2)} "
            f"(goal: adaptive within T without 503s while the fixed one sheds or misses T: "
            f"{verdict})",
        ]
    return "\n".join(lines)


def plot_adaptive(result: dict[str, Any], path: Path) -> None:
    """PNG: p99 (with the target) and served mAP against the offered rate, fixed vs adaptive; 503 share beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    saturation = result["saturation"]["queries_per_s"]
    for server, colour in (("fixed", "tab:orange"), ("adaptive", "tab:blue")):
        rows = sorted((r for r in result["rows"] if r["server"] == server), key=lambda r: r["offered_per_s"])
        x = [r["saturation_fraction"] for r in rows]
        label = f"fixed {result['sizes'][-1]} px" if server == "fixed" else "adaptive"
        axes[0].plot(x, [r["p99_ms"] or float("nan") for r in rows], "o-", color=colour, label=label)
        mapped = [r["served_mAP"] if r["served_mAP"] is not None else float("nan") for r in rows]
        axes[1].plot(x, mapped, "o-", color=colour, label=label)
        share = [r["rejected_503"] / max(1.0, r["sent_per_s"] * r["seconds"]) for r in rows]
        axes[2].plot(x, share, "o-", color=colour, label=label)
    target = result["settings"]["target_ms"]
    axes[0].axhline(target, ls=":", color="grey", label=f"target {target:.0f} ms")
    for size, value in result["asym_mAP"].items():
        axes[1].axhline(value, ls=":", lw=0.8, color="grey")
        axes[1].annotate(f"{size} px", (axes[1].get_xlim()[0], value), fontsize=7, color="grey", va="bottom")
    xlabel = f"offered load (x saturation of the fixed server, {saturation:.0f} q/s; Poisson)"
    axes[0].set(xlabel=xlabel, ylabel="p99 ms from the intended send", title="p99 latency", yscale="log")
    axes[1].set(xlabel=xlabel, ylabel="asym mAP of the answers (%)", title="served accuracy")
    axes[2].set(xlabel=xlabel, ylabel="share answered 503", title="shed", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"raml serve, fixed size vs --latency-target-ms, {result['date']} "
        f"(load average {result['machine']['load_average'][0]:.1f})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench adaptive [--resolutions DIR | --student S --teacher T --data-root D] [--quick]``."""
    from raml.entry import setup_logging

    parser = parsers.adaptive_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        rates = tuple(float(v) for v in args.rates.split(",") if v.strip())
    except ValueError:
        rates = ()
    if not rates or min(rates) <= 0:
        parser.error(f"--rates expects positive numbers such as 0.5,1,2, got {args.rates!r}")
    if not args.duration > 0 or not args.warmup >= 0:
        parser.error("--duration must be positive and --warmup zero or positive")
    settings = AdaptiveBenchSettings(
        target_ms=args.target_ms,
        rates=rates,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        saturation_clients=args.saturation_clients,
        client_processes=args.client_processes,
        database_size=args.database_size,
        server_args=tuple(args.server_arg),
    )
    if args.quick:
        inputs = quick_inputs(args.work_dir)
        settings = replace(
            settings,
            database_size=24,
            open_connections=16,
            rates=(1.0, 2.0),
            duration_s=1.0,
            warmup_s=0.3,
            saturation_clients=4,
            client_processes=1,
            max_batch=4,
        )
    elif args.student or args.teacher or args.data_root:
        if not (args.student and args.teacher and args.data_root):
            parser.error("give --student, --teacher and --data-root together (or --resolutions DIR)")
        inputs = BenchInputs(args.student, args.teacher, args.data_root)
    else:
        inputs = resolutions_inputs(args.resolutions)
    result = run_adaptive_benchmark(inputs, args.work_dir, settings, lock=args.lock)
    print(format_adaptive_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot_adaptive(result, args.plot)
    return 0
