"""``raml bench serve``: queries/s and latency of ``raml serve`` under concurrent clients, micro-batched vs not.

Contract: in one run on loopback, a demo-sized index (the synthetic dataset of ``raml demo``: 60 classes x 16
images of 64 px, embedded by a resnet18 with 128-d whitening at DR = 64) is served by ``raml serve`` (a
separate process) with a student of the same shape at QR = 32, once with micro-batching (``--max-batch``,
default 32) and once with ``--max-batch 1``. For each, ``concurrency`` clients (default 1, 8 and 32) each send
one query after the other (the JPEG files of the dataset, as raw ``image/jpeg`` bodies) for ``duration_s``
seconds after a ``warmup_s`` warm-up; the report gives queries/s, p50/p95/p99 latency (client side, request sent
to answer read), errors (any status but 200, or a failed connection) and the mean number of queries per forward
pass (from ``/metrics``), plus the batched / unbatched throughput ratio per concurrency. The networks have
random weights: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
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

import numpy as np
import torch

from raml.utils import atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = ["ServeBenchSettings", "format_serve_report", "main", "run_serve_benchmark"]

_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServeBenchSettings:
    """What one ``raml bench serve`` run does (see the module docstring)."""

    concurrency: tuple[int, ...] = (1, 8, 32)
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
        command += ["--queue-size", str(max(256, 4 * max(settings.concurrency)))]
        self._log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"raml serve exited with status {self.process.returncode}; see {self._log.name}.")
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("ready"):
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
        self._log.close()


def _batch_totals(metrics_text: str) -> tuple[float, float]:
    """(queries embedded, forward passes) so far, from ``/metrics``."""
    found = dict(re.findall(r"^raml_batch_size_(sum|count) (\S+)$", metrics_text, flags=re.MULTILINE))
    return float(found.get("sum", 0)), float(found.get("count", 0))


async def _drive(url: str, bodies: Sequence[bytes], concurrency: int, seconds: float, k: int) -> tuple[list, int]:
    """``concurrency`` clients query for ``seconds``; returns (latencies in s of answered 200s, errors)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        stop_at = time.perf_counter() + seconds

        async def one_client(start: int) -> None:
            nonlocal errors
            i = start
            while time.perf_counter() < stop_at:
                body = bodies[i % len(bodies)]
                i += concurrency
                sent = time.perf_counter()
                try:
                    response = await client.post(
                        "/search", params={"k": k}, content=body, headers={"content-type": "image/jpeg"}
                    )
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    return latencies, errors


def _measure(server: _Server, bodies: Sequence[bytes], concurrency: int, settings: ServeBenchSettings) -> dict:
    import httpx

    asyncio.run(_drive(server.url, bodies, concurrency, settings.warmup_s, settings.k))
    queries_before, passes_before = _batch_totals(httpx.get(server.url + "/metrics").text)
    started = time.perf_counter()
    latencies, errors = asyncio.run(_drive(server.url, bodies, concurrency, settings.duration_s, settings.k))
    elapsed = time.perf_counter() - started
    queries_after, passes_after = _batch_totals(httpx.get(server.url + "/metrics").text)
    ms = np.asarray(latencies) * 1000.0
    passes = passes_after - passes_before
    return {
        "concurrency": concurrency,
        "queries": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "queries_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "p95_ms": float(np.percentile(ms, 95)) if ms.size else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
        "mean_batch": (queries_after - queries_before) / passes if passes else None,
    }


def run_serve_benchmark(work_dir: str | Path, settings: ServeBenchSettings | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) in ``work_dir``; returns the report as a dict."""
    settings = settings or ServeBenchSettings()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    index_dir, student, query_files = prepare_data(work_dir, settings)
    bodies = [p.read_bytes() for p in query_files]
    modes = {"batched": settings.max_batch, "unbatched": 1}
    runs: list[dict[str, Any]] = []
    for mode, max_batch in modes.items():
        server = _Server(index_dir, student, settings, max_batch, work_dir / f"serve-{mode}.log")
        try:
            server.wait_ready()
            for concurrency in settings.concurrency:
                row = {"mode": mode, "max_batch": max_batch, **_measure(server, bodies, concurrency, settings)}
                logger.info(
                    "%s, concurrency %d: %.1f q/s, p99 %s ms, %d errors",
                    mode,
                    concurrency,
                    row["queries_per_s"],
                    f"{row['p99_ms']:.1f}" if row["p99_ms"] is not None else "-",
                    row["errors"],
                )
                runs.append(row)
        finally:
            server.close()
    qps = {(r["mode"], r["concurrency"]): r["queries_per_s"] for r in runs}
    speedup = {
        str(c): qps[("batched", c)] / qps[("unbatched", c)] if qps[("unbatched", c)] else None
        for c in settings.concurrency
    }
    return {
        "benchmark": "serve",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {**asdict(settings), "database_images": len(query_files)},
        "runs": runs,
        "speedup_batched_over_unbatched": speedup,
        "errors": sum(r["errors"] for r in runs),
    }


def format_serve_report(result: dict[str, Any]) -> str:
    """A plain-text table: one row per (mode, concurrency), then the throughput ratios."""
    s = result["settings"]
    lines = [
        f"raml serve on loopback: {s['database_images']} images indexed by {s['architecture']} "
        f"(D={s['whitening']}) at {s['database_size']} px, queries at {s['query_size']} px, k={s['k']}, "
        f"{s['duration_s']:g} s per row after {s['warmup_s']:g} s warm-up; {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores",
        "",
        f"{'mode':<10} {'max_batch':>9} {'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6} {'batch':>6}",
    ]

    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in result["runs"]:
        lines.append(
            f"{r['mode']:<10} {r['max_batch']:>9} {r['concurrency']:>7} {number(r['queries_per_s']):>8} "
            f"{number(r['p50_ms']):>8} {number(r['p95_ms']):>8} {number(r['p99_ms']):>8} {r['errors']:>6} "
            f"{number(r['mean_batch']):>6}"
        )
    ratios = ", ".join(f"{c} clients {number(v, 2)}x" for c, v in result["speedup_batched_over_unbatched"].items())
    lines += ["", f"batched / unbatched throughput: {ratios}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench serve [--duration S] [--concurrency 1,8,32] [--json PATH]``."""
    from raml.entry import positive_int, setup_logging

    defaults = ServeBenchSettings()
    parser = argparse.ArgumentParser(
        prog="raml bench serve",
        description="Queries/s and p50/p95/p99 latency of raml serve on loopback at several client concurrencies, "
        "with micro-batching and with --max-batch 1, on a demo-sized synthetic index.",
    )

    def concurrency_list(value: str) -> tuple[int, ...]:
        try:
            levels = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers such as 1,8,32, got {value!r}")
        return levels

    parser.add_argument("--work-dir", type=Path, default=Path("bench-serve"), help="data, index, server logs")
    parser.add_argument(
        "--concurrency", type=concurrency_list, default=defaults.concurrency, help="clients (default 1,8,32)"
    )
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds measured per row (10)")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s, help="seconds of warm-up per row (2)")
    parser.add_argument("--max-batch", type=positive_int, default=defaults.max_batch, help="batched run's max (32)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, help="batched run's wait (5)")
    parser.add_argument("--num-classes", type=positive_int, default=defaults.num_classes, help="synthetic classes")
    parser.add_argument("--images-per-class", type=positive_int, default=defaults.images_per_class)
    parser.add_argument("--architecture", default=defaults.architecture, help="backbone of both networks")
    parser.add_argument("--whitening", type=positive_int, default=defaults.whitening, help="embedding dimension")
    parser.add_argument("--query-size", type=positive_int, default=defaults.query_size, help="QR (32)")
    parser.add_argument("--database-size", type=positive_int, default=defaults.database_size, help="DR (64)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
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
    )
    result = run_serve_benchmark(args.work_dir, settings)
    print(format_serve_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0
