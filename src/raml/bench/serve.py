"""``raml bench serve``: the load curve of ``raml serve``, micro-batched vs not, from a client that is not the limit.

Contract: in one run on loopback, a demo-sized index (the synthetic dataset of ``raml demo``: 60 classes x 16
images of 64 px, embedded by a resnet18 with 128-d whitening at DR = 64) is served by ``raml serve`` (a
separate process) with a student of the same shape at QR = 32, once with micro-batching (``--max-batch``,
default 32) and once with ``--max-batch 1``, both with ``--queue-size`` (default 64). The load comes from
:mod:`raml.bench.loadgen` (client processes, one blocking keep-alive connection per client thread):

- **closed loop**: ``concurrency`` clients (default 1, 8, 32 and 64) each send one query after the other; the best
  batched throughput is the *saturation rate*;
- **open loop**: Poisson arrivals at ``rates`` x the saturation rate (default 0.25 to 2), the same absolute
  rates for both modes, latency measured from each request's intended send time (no coordinated omission).

Each row runs ``duration_s`` seconds after a ``warmup_s`` warm-up and gives queries/s (answered 200s),
p50/p95/p99 latency, errors (failed connections, statuses other than 200 and 503), 503s (and whether each
carried ``Retry-After``), the mean number of queries per forward pass (from the answers' ``batch_size``: ``n /
sum(1 / batch_size)``), the server's own
``timings_ms.total`` p99, the client's lag p99, the cores used by the server's event loop, by its other threads and
by the whole machine (:mod:`raml.bench.cpu`), and whether the client, not the server, limited the row. The
report adds the batched / unbatched ratio per concurrency and issue 20's goals as measured in the run. The
networks have random weights: throughput does not depend on them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from raml.bench import parsers
from raml.bench.cpu import add_server_cores, core_columns, cpu_snapshot
from raml.bench.loadgen import ClientPool, http_client, run_load, summarise
from raml.deploy.service.connections import resolve_http, resolve_loop
from raml.deploy.service.embedders import available_cores, serving_threads
from raml.utils import atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = ["ServeBenchSettings", "format_serve_report", "main", "plot_serve_curve", "run_serve_benchmark"]

_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServeBenchSettings:
    """What one ``raml bench serve`` run does (see the module docstring)."""

    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    num_classes: int = 60
    images_per_class: int = 16
    image_size: int = 64
    architecture: str = "resnet18"
    whitening: int = 128
    database_size: int = 64
    query_size: int = 32
    k: int = 10
    rates: tuple[float, ...] = (0.25, 0.5, 0.8, 1.0, 1.5, 2.0)  # open loop, x the batched saturation rate
    open_connections: int = 256  # open loop: the most requests in flight; above queue_size + max_batch, or no 503
    client_processes: int = 2
    queue_size: int = 64  # the server's --queue-size
    timeout_s: float = 30.0
    seed: int = 0
    http: str = "auto"  # the server's --http (httptools where installed)
    loop: str = "auto"  # the server's --loop (uvloop where installed)
    server_args: tuple[str, ...] = ()  # more raml serve flags, for both servers (A/B experiments)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_data(work_dir: Path, settings: ServeBenchSettings) -> tuple[Path, Path, list[Path]]:
    """Generate the dataset, the two networks and the index; returns (index dir, student checkpoint, query files)."""
    from raml.data.synth import generate_synthetic_dataset
    from raml.deploy import collect_images, index_images
    from raml.models import build_network, checkpoint_sha256, load_network, save_checkpoint

    data = generate_synthetic_dataset(
        work_dir / "synth", settings.num_classes, settings.images_per_class, settings.image_size
    )
    paths = collect_images(data / "images")
    nets = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        nets[name] = work_dir / f"{name}.pth"
        save_checkpoint(
            nets[name], build_network(settings.architecture, whitening=settings.whitening, pretrained=False)
        )
    teacher = load_network(nets["teacher"])
    index_dir = work_dir / "index"
    index_images(teacher, paths, settings.database_size, index_dir, checkpoint_sha256(nets["teacher"]), overwrite=True)
    return index_dir, nets["student"], [Path(p) for p in paths]


class _Server:
    """``raml serve`` in a child process on a free loopback port."""

    def __init__(self, index_dir: Path, student: Path, settings: ServeBenchSettings, max_batch: int, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "raml", "serve", "--index", str(index_dir), "--network-path", str(student)]
        command += ["--image-size", str(settings.query_size), "--port", str(self.port), "--device", "cpu"]
        command += ["--max-batch", str(max_batch), "--max-wait-ms", str(settings.max_wait_ms)]
        command += ["--queue-size", str(settings.queue_size), "--http", settings.http, "--loop", settings.loop]
        # room for every client connection and the benchmark's own /metrics probe
        command += ["--max-connections", str(max(256, settings.open_connections + 16))]
        command += list(settings.server_args)
        self._log = log.open("w")
        self.http = http_client()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"raml serve exited with status {self.process.returncode}; see {self._log.name}.")
            try:
                if self.http.get(self.url + "/health", timeout=2).json().get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"raml serve did not answer /health within {_START_TIMEOUT_S:g} s; see {self._log.name}.")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.http.close()
        self._log.close()


def _shed_totals(metrics_text: str) -> dict[str, float]:
    """Requests shed with 503 so far, by reason (``raml_shed_total{reason=...}`` of ``/metrics``)."""
    found = re.findall(r'^raml_shed_total\{reason="([^"]+)"\} (\S+)$', metrics_text, flags=re.MULTILINE)
    return {reason: float(value) for reason, value in found}


def _scrape_shed(client: Any, url: str) -> dict[str, float] | None:
    """The server's shed counts, or None when ``/metrics`` did not answer 200 (e.g. every connection taken)."""
    import httpx

    try:
        response = client.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return _shed_totals(response.text) if response.status_code == 200 else None


def _batch_totals(metrics_text: str) -> tuple[float, float]:
    """(queries embedded, forward passes) so far, from ``/metrics``."""
    found = dict(re.findall(r"^raml_batch_size_(sum|count) (\S+)$", metrics_text, flags=re.MULTILINE))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def _measure(
    server: _Server,
    pool: ClientPool,
    bodies: Sequence[bytes],
    settings: ServeBenchSettings,
    concurrency: int,
    rate: float | None,
) -> dict[str, Any]:
    """One row: closed loop at ``concurrency`` clients (``rate`` None) or open loop at ``rate`` requests/s."""
    result = run_load(
        server.url,
        bodies,
        k=settings.k,
        warmup_s=settings.warmup_s,
        duration_s=settings.duration_s,
        concurrency=concurrency,
        rate=rate,
        processes=settings.client_processes,
        timeout_s=settings.timeout_s,
        seed=settings.seed,
        pool=pool,
        probe=lambda: (_scrape_shed(server.http, server.url), cpu_snapshot(server.process.pid)),
    )
    row = summarise(result)
    (before, cpu_before), (after, cpu_after) = result.probes
    # the server's CPU in the window: its event loop (the main thread) and its other threads (the batch worker,
    # torch), and the whole machine's (server, clients and kernel), in cores
    add_server_cores(row, cpu_before, cpu_after)
    # the server's own account of the 503s sent in the window, by the limit reached (queue_wait: the predicted or
    # actual wait for a batch over --max-queue-wait-ms)
    row["shed_by_reason"] = (
        None
        if before is None or after is None
        else {reason: int(count - before.get(reason, 0.0)) for reason, count in sorted(after.items())}
    )
    return row


def _log_row(row: dict[str, Any]) -> None:
    what = f"{row['concurrency']} clients" if row["loop"] == "closed" else f"{row['offered_per_s']:.1f}/s offered"
    logger.info(
        "%s, %s loop, %s: %.1f q/s, p99 %s ms, %d errors, %d 503s%s",
        row["mode"],
        row["loop"],
        what,
        row["queries_per_s"],
        f"{row['p99_ms']:.1f}" if row["p99_ms"] is not None else "-",
        row["errors"],
        row["rejected_503"],
        "; CLIENT-LIMITED: " + "; ".join(row["client_limited_because"]) if row["client_limited"] else "",
    )


def _nearest(rows: list[dict[str, Any]], fraction: float) -> dict[str, Any] | None:
    """The open-loop row whose offered rate is nearest ``fraction`` of the saturation rate (within 10 %)."""
    best = min(rows, key=lambda r: abs(r["saturation_fraction"] - fraction), default=None)
    return best if best is not None and abs(best["saturation_fraction"] - fraction) <= 0.1 * fraction else None


def _saturation(runs: list[dict], mode: str) -> float | None:
    """The best closed-loop q/s of ``mode`` among the rows that measured the server (None: every row was
    client-limited, or there was none)."""
    return max((r["queries_per_s"] for r in runs if r["mode"] == mode and not r["client_limited"]), default=None)


def _goals(runs: list[dict], open_rows: list[dict], settings: ServeBenchSettings) -> dict[str, Any]:
    """Issue 20's goals, each a ratio or a bound measured in this run (absent where the run lacks the row). A goal
    whose rows were client-limited (or whose open-loop rates came from a client-limited saturation) has ``met``
    None: not measured."""
    saturation = {mode: _saturation(runs, mode) for mode in ("batched", "unbatched")}
    batched_open = [r for r in open_rows if r["mode"] == "batched"]
    goals: dict[str, Any] = {
        "saturation_per_s": saturation,
        "saturation_ratio": saturation["batched"] / saturation["unbatched"]
        if saturation["batched"] is not None and saturation["unbatched"]
        else None,
    }
    goals["saturation_ratio_met"] = None if goals["saturation_ratio"] is None else goals["saturation_ratio"] >= 4.0
    # the open-loop rates are fractions of the batched saturation: from a client-limited row, they mean nothing
    rates_measured = saturation["batched"] is not None
    at80 = _nearest(batched_open, 0.8)
    if at80 is not None and at80["p50_ms"]:
        ratio = at80["p99_ms"] / at80["p50_ms"]
        clean = at80["errors"] == 0 and at80["rejected_503"] == 0
        goals["at_80pct"] = {"p99_over_p50": ratio, "errors": at80["errors"], "rejected_503": at80["rejected_503"]}
        measured = rates_measured and not at80["client_limited"]
        goals["at_80pct"]["met"] = (ratio <= 3.0 and clean) if measured else None
    at2x = _nearest(batched_open, 2.0)
    if at2x is not None:
        service = at2x["server_embed_p50_ms"]
        best = max((r for r in runs if r["mode"] == "batched"), key=lambda r: r["queries_per_s"], default=None)
        bound = settings.max_wait_ms + 2.0 * service if service is not None else None
        goals["at_2x"] = {
            "rejected_503": at2x["rejected_503"],
            "shed_by_reason": at2x.get("shed_by_reason", {}),
            "rejected_without_retry_after": at2x["rejected_without_retry_after"],
            "p99_ms": at2x["p99_ms"],
            "bound_ms": bound,
            "batch_service_ms": service,
            # the same forward pass at the saturation row, and the load generator's share of the machine: on a host
            # shared by server and clients, how much slower the server's own work ran at this rate
            "saturation_batch_service_ms": best["server_embed_p50_ms"] if best is not None else None,
            "client_cpu_cores": at2x.get("client_cpu_cores"),
            # where the machine's cores went at 2x: a loop under a core on a busy machine waits for a core
            "server_loop_cores": at2x.get("server_loop_cores"),
            "server_other_cores": at2x.get("server_other_cores"),
            "machine_busy_cores": at2x.get("machine_busy_cores"),
        }
        goals["at_2x"]["met"] = (
            bool(
                at2x["rejected_503"] > 0
                and at2x["rejected_without_retry_after"] == 0
                and bound is not None
                and at2x["p99_ms"] is not None
                and at2x["p99_ms"] <= bound
            )
            if rates_measured and not at2x["client_limited"]
            else None
        )
    return goals


def _verdict(met: bool | None) -> str:
    return "not measured (client-limited)" if met is None else "met" if met else "missed"


def run_serve_benchmark(work_dir: str | Path, settings: ServeBenchSettings | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) in ``work_dir``; returns the report as a dict."""
    settings = settings or ServeBenchSettings()
    load_at_start = list(os.getloadavg())
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    index_dir, student, query_files = prepare_data(work_dir, settings)
    bodies = [p.read_bytes() for p in query_files]
    modes = {"batched": settings.max_batch, "unbatched": 1}
    runs: list[dict[str, Any]] = []
    open_rows: list[dict[str, Any]] = []
    rates: list[float] = []
    pool = ClientPool(settings.client_processes, bodies)
    for mode, max_batch in modes.items():
        server = _Server(index_dir, student, settings, max_batch, work_dir / f"serve-{mode}.log")
        try:
            server.wait_ready()
            for concurrency in settings.concurrency:
                row = {
                    "mode": mode,
                    "max_batch": max_batch,
                    **_measure(server, pool, bodies, settings, concurrency, None),
                }
                _log_row(row)
                runs.append(row)
            if not rates:  # the offered rates are fractions of the batched server's saturation, for both modes
                saturation = _saturation(runs, mode)
                if saturation is None:  # still run the curve, but no goal is measured from it (see _goals)
                    saturation = max(r["queries_per_s"] for r in runs)
                    logger.warning(
                        "Every closed-loop row of the %s server was client-limited: the open-loop rates come from "
                        "one (%.1f q/s) and its goals are not measured.",
                        mode,
                        saturation,
                    )
                rates = [f * saturation for f in settings.rates if f * saturation > 0]
            for fraction, rate in zip(settings.rates, rates):
                row = _measure(server, pool, bodies, settings, settings.open_connections, rate)
                row = {"mode": mode, "max_batch": max_batch, "saturation_fraction": fraction, **row}
                _log_row(row)
                open_rows.append(row)
        finally:
            server.close()
    pool.close()
    # a ratio only between rows that measured the server: a client-limited row on either side gives none
    qps = {(r["mode"], r["concurrency"]): r["queries_per_s"] for r in runs if not r["client_limited"]}
    speedup = {
        str(c): qps[("batched", c)] / qps[("unbatched", c)]
        if qps.get(("batched", c)) is not None and qps.get(("unbatched", c))
        else None
        for c in settings.concurrency
    }
    every = runs + open_rows
    return {
        "benchmark": "serve",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_start": load_at_start,
            "load_average": list(os.getloadavg()),
            "server_threads": serving_threads(available_cores()),  # raml serve's default --threads here
            "server_http": resolve_http(settings.http),  # what the server's --http / --loop resolve to here
            "server_loop": resolve_loop(settings.loop),
        },
        "settings": {**asdict(settings), "database_images": len(query_files)},
        "runs": runs,
        "open_loop": open_rows,
        "speedup_batched_over_unbatched": speedup,
        "goals": _goals(runs, open_rows, settings),
        "errors": sum(r["errors"] for r in every),
        "rejected_503": sum(r["rejected_503"] for r in every),
        "client_limited_rows": sum(r["client_limited"] for r in every),
    }


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_serve_report(result: dict[str, Any]) -> str:
    """Plain-text tables: closed-loop rows per (mode, concurrency), the open-loop curve, the ratios and goals."""
    s = result["settings"]
    lines = [
        f"raml serve on loopback: {s['database_images']} images indexed by {s['architecture']} "
        f"(D={s['whitening']}) at {s['database_size']} px, queries at {s['query_size']} px, k={s['k']}, "
        f"{s['duration_s']:g} s per row after {s['warmup_s']:g} s warm-up, {s['client_processes']} client "
        f"processes; {result['machine']['cpu']}, {result['machine']['cores']} cores, server's torch threads "
        f"{result['machine'].get('server_threads', '-')}, HTTP {result['machine'].get('server_http', '-')}, loop "
        f"{result['machine'].get('server_loop', '-')}, load average (1, 5, 15 min) "
        + " ".join(f"{v:.1f}" for v in result["machine"].get("load_average_at_start", []))
        + " at the start, "
        + " ".join(f"{v:.1f}" for v in result["machine"]["load_average"])
        + " at the end",
        "",
        "closed loop (each client sends its next query when the last one is answered):",
        f"{'mode':<10} {'max_batch':>9} {'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6} {'503s':>5} {'batch':>6} {'srv p99':>8} {'lag p99':>8} {core_columns()} {'limit':>6}",
    ]
    for r in result["runs"]:
        lines.append(
            f"{r['mode']:<10} {r['max_batch']:>9} {r['concurrency']:>7} {_number(r['queries_per_s']):>8} "
            f"{_number(r['p50_ms']):>8} {_number(r['p95_ms']):>8} {_number(r['p99_ms']):>8} {r['errors']:>6} "
            f"{r['rejected_503']:>5} {_number(r['mean_batch']):>6} {_number(r['server_total_p99_ms']):>8} "
            f"{_number(r['client_lag_p99_ms']):>8} {core_columns(r)} {'client' if r['client_limited'] else 'server':>6}"
        )
    if result["open_loop"]:
        lines += [
            "",
            "open loop (Poisson arrivals at the offered rate; latency from the intended send time):",
            f"{'offered/s':>9} {'x sat':>5} {'mode':<10} {'q/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'errors':>6} {'503s':>5} {'batch':>6} {'srv p99':>8} {'read p99':>8} {'dec p99':>8} {'que p99':>8} "
            f"{'emb p50':>8} {'rest p99':>8} {'lag p99':>8} {core_columns()} {'limit':>6}",
        ]
        for r in result["open_loop"]:
            lines.append(
                f"{r['offered_per_s']:>9.1f} {r['saturation_fraction']:>5.2f} {r['mode']:<10} "
                f"{_number(r['queries_per_s']):>8} {_number(r['p50_ms']):>8} {_number(r['p95_ms']):>8} "
                f"{_number(r['p99_ms']):>8} {r['errors']:>6} {r['rejected_503']:>5} {_number(r['mean_batch']):>6} "
                f"{_number(r['server_total_p99_ms']):>8} {_number(r.get('server_read_p99_ms')):>8} "
                f"{_number(r.get('server_decode_p99_ms')):>8} {_number(r.get('server_queue_p99_ms')):>8} "
                f"{_number(r['server_embed_p50_ms']):>8} {_number(r.get('server_rest_p99_ms')):>8} "
                f"{_number(r['client_lag_p99_ms']):>8} {core_columns(r)} "
                f"{'client' if r['client_limited'] else 'server':>6}"
            )
    lines += [
        "",
        "cores used in each row's window: loop c by the server's event loop, wrk c by its other threads (the batch "
        f"worker, torch), busy c by the whole machine ({result['machine']['cores']} cores: server, clients, kernel)",
    ]
    # the flags before any ratio or goal: those rows are left out of them
    limited = [r for r in result["runs"] + result["open_loop"] if r["client_limited"]]
    if limited:
        lines.append("")
    for r in limited:
        what = f"{r['concurrency']} clients" if r["loop"] == "closed" else f"{r['offered_per_s']:.1f}/s"
        lines.append(
            f"CLIENT-LIMITED row ({r['mode']}, {what}), left out of the ratios and goals: "
            + "; ".join(r["client_limited_because"])
        )
    ratios = ", ".join(f"{c} clients {_number(v, 2)}x" for c, v in result["speedup_batched_over_unbatched"].items())
    lines += ["", f"batched / unbatched throughput: {ratios} (-: a row was client-limited, or nothing answered)"]
    goals = result["goals"]
    sat = goals["saturation_per_s"]
    lines.append(
        f"saturation (best closed-loop q/s of the rows not client-limited): batched {_number(sat['batched'])}, "
        f"unbatched {_number(sat['unbatched'])}, ratio {_number(goals['saturation_ratio'], 2)}x "
        f"(goal >= 4x: {_verdict(goals['saturation_ratio_met'])})"
    )
    if "at_80pct" in goals:
        g = goals["at_80pct"]
        lines.append(
            f"open loop at 0.8x saturation: p99/p50 {g['p99_over_p50']:.2f}, {g['errors']} errors, "
            f"{g['rejected_503']} 503s (goal p99 <= 3x p50, none refused: {_verdict(g['met'])})"
        )
    if "at_2x" in goals:
        g = goals["at_2x"]
        lines.append(
            f"open loop at 2x saturation: {g['rejected_503']} 503s ({g['rejected_without_retry_after']} without "
            f"Retry-After; server: "
            + (", ".join(f"{n} {r}" for r, n in (g.get("shed_by_reason") or {}).items()) or "none")
            + f"), accepted p99 {_number(g['p99_ms'])} ms vs max-wait + 2 batch service times "
            f"{_number(g['bound_ms'])} ms (goal: {_verdict(g['met'])})"
        )
        if g.get("saturation_batch_service_ms") is not None and g.get("client_cpu_cores") is not None:
            lines.append(
                f"  at 2x a batch's forward pass took {_number(g['batch_service_ms'])} ms (median) against "
                f"{_number(g['saturation_batch_service_ms'])} ms at saturation, and the client processes used "
                f"{g['client_cpu_cores']:.2f} of the machine's {result['machine']['cores']} cores"
                + (
                    f"; the machine was {g['machine_busy_cores']:.2f} cores busy, the server's event loop "
                    f"{g['server_loop_cores']:.2f} and its other threads {g['server_other_cores']:.2f}"
                    if g.get("machine_busy_cores") is not None
                    else ""
                )
            )
    return "\n".join(lines)


def plot_serve_curve(result: dict[str, Any], path: Path) -> None:
    """PNG: achieved q/s, p50/p99 latency and the share refused with 503 against the offered rate, per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for mode, colour in (("batched", "tab:blue"), ("unbatched", "tab:orange")):
        rows = sorted((r for r in result["open_loop"] if r["mode"] == mode), key=lambda r: r["offered_per_s"])
        if not rows:
            continue
        offered = [r["offered_per_s"] for r in rows]
        axes[0].plot(offered, [r["queries_per_s"] for r in rows], "o-", color=colour, label=mode)
        axes[1].plot(offered, [r["p50_ms"] or float("nan") for r in rows], "o--", color=colour, label=f"{mode} p50")
        axes[1].plot(offered, [r["p99_ms"] or float("nan") for r in rows], "o-", color=colour, label=f"{mode} p99")
        share = [r["rejected_503"] / max(1, r["sent_per_s"] * r["seconds"]) for r in rows]
        axes[2].plot(offered, share, "o-", color=colour, label=mode)
    top = max((r["offered_per_s"] for r in result["open_loop"]), default=1.0)
    axes[0].plot([0, top], [0, top], ":", color="grey", label="achieved = offered")
    axes[0].set(xlabel="offered queries/s (Poisson)", ylabel="answered queries/s (200)", title="throughput")
    axes[1].set(xlabel="offered queries/s", ylabel="ms from the intended send", title="latency", yscale="log")
    axes[2].set(xlabel="offered queries/s", ylabel="share answered 503", title="shed", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"raml serve, open loop, {result['date']} (load average {result['machine']['load_average'][0]:.1f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench serve [--duration S] [--concurrency 1,8,32] [--rates 0.5,1,2] [--json P] [--plot P]``."""
    from raml.entry import setup_logging

    parser = parsers.serve_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # one line per request
    if not args.duration > 0 or not args.warmup >= 0:
        parser.error("--duration must be positive and --warmup zero or positive")
    settings = ServeBenchSettings(
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        num_classes=args.num_classes,
        images_per_class=args.images_per_class,
        architecture=args.architecture,
        whitening=args.whitening,
        database_size=args.database_size,
        query_size=args.query_size,
        rates=args.rates,
        open_connections=args.open_connections,
        client_processes=args.client_processes,
        queue_size=args.queue_size,
        http=args.http,
        loop=args.loop,
        server_args=tuple(args.server_arg),
    )
    result = run_serve_benchmark(args.work_dir, settings)
    print(format_serve_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot_serve_curve(result, args.plot)
    return 0
