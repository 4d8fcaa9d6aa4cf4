"""``raml bench index``: peak memory and images/s of ``raml index`` against the database size, single process vs
Ray, in one run.

Contract: synthetic databases of ``sizes`` images (default 2k, 8k and 32k; small random JPEGs of ``image_size``
px, the larger databases extending the smaller ones) are indexed by ``raml index`` in a fresh process each, once
with the single-process engine and once with ``--engine ray`` (a local Ray instance, ``ray_actors`` actors), by a
randomly initialised ``architecture`` (default timm's tiny ``test_resnet``, so that the run measures the
pipeline rather than the convolutions) with 512-d whitening (the paper's embedding size) into an IVF-PQ index trained on
``train_size`` embeddings (memory bounded by the codes). Per run the report gives the wall time, images/s, the
peak resident memory (``ru_maxrss``) of the indexing process and, for Ray, of each actor; per size, whether both
engines wrote bit-identical embeddings; per engine, the ratio of the largest database's peak memory to the
smallest's (streaming goal: within 10%).

``run_build_benchmark`` measures the faiss index build alone, on synthetic unit rows (no network, no images):
an IVF-PQ index of ``sizes`` vectors built in memory (one index, the chunks added to it) and on disk (part
indexes of ``part_rows`` vectors merged into an ``OnDiskInvertedLists`` file: ``raml index --on-disk``),
each in a fresh process that samples its anonymous resident memory (``RssAnon``: what the build allocates;
mapped file pages are the page cache's and the kernel reclaims them) and reports it with its ``ru_maxrss``;
both indexes are then searched with the same queries and their results (ids and scores) compared.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raml.bench import parsers
from raml.utils import atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = ["format_build_report", "format_index_report", "main", "run_build_benchmark", "run_index_benchmark"]


def _write_images(folder: Path, count: int, size: int, seed: int = 0) -> list[str]:
    """``count`` random ``size`` px JPEGs under ``folder/{size}px-seed{seed}`` (kept between runs: only missing
    files are written; the size and the seed name the folder, so a run with another ``--image-size`` never
    measures the images of an earlier one)."""
    folder = folder / f"{size}px-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i // 1000:04d}" / f"img{i:07d}.jpg"
        pixels = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)  # drawn always: same images
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    return paths


def _run_index(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Run one ``raml index`` process; ``(wall seconds, its peak RSS in MiB, exit code)``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        logger.error("raml index failed:\n%s", stderr.decode(errors="replace")[-4000:])
    return wall, usage.ru_maxrss / 1024.0, process.returncode


def run_index_benchmark(
    work_dir: Path,
    sizes: tuple[int, ...] = (2000, 8000, 32000),
    engines: tuple[str, ...] = ("local", "ray"),
    image_size: int = 32,
    shard_size: int = 1024,
    batch_size: int = 64,
    ray_actors: int = 2,
    train_size: int = 2000,
    architecture: str = "test_resnet",
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the report as a dict."""
    import torch

    from raml.deploy.store import load_index
    from raml.models import build_network, save_checkpoint

    work_dir.mkdir(parents=True, exist_ok=True)
    paths = _write_images(work_dir / "images", max(sizes), image_size)
    network = work_dir / f"teacher-{architecture}-512.pth"
    if not network.is_file():
        torch.manual_seed(0)
        save_checkpoint(network, build_network(architecture, whitening=512, pretrained=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    runs: list[dict[str, Any]] = []
    equal: dict[int, dict[str, Any]] = {}
    for size in sizes:
        listing = work_dir / f"list-{size}.txt"
        listing.write_text("\n".join(paths[:size]) + "\n")
        outputs = {}
        for engine in engines:
            output = work_dir / f"index-{engine}-{size}"
            summary = work_dir / f"summary-{engine}-{size}.json"
            command = [sys.executable, "-m", "raml", "index", "--network-path", str(network), "--list", str(listing)]
            command += ["--output", str(output), "--overwrite", "--image-size", str(image_size), "--device", "cpu"]
            command += ["--workers", "0", "--no-progress", "--batch-size", str(batch_size), "--shard-size"]
            command += [str(shard_size), "--index-type", "ivfpq", "--train-size", str(min(train_size, size))]
            command += ["--engine", engine, "--json", str(summary)]
            if engine == "ray":
                command += ["--ray-actors", str(ray_actors)]
            wall, peak, code = _run_index(command, env)
            report = json.loads(summary.read_text()) if code == 0 else {}
            runs.append(
                {
                    "engine": engine,
                    "images": size,
                    "exit_code": code,
                    "wall_s": round(wall, 2),
                    "images_per_s": round(size / wall, 1),
                    "peak_rss_mib": round(peak, 1),
                    "actor_peak_rss_mib": [round(v, 1) for v in report.get("actor_peak_rss_mib", [])],
                }
            )
            logger.info("%s", runs[-1])
            outputs[engine] = output
        if len(outputs) == 2 and all(r["exit_code"] == 0 for r in runs[-2:]):
            a, b = (np.asarray(load_index(outputs[e]).embeddings) for e in engines)
            equal[size] = {"bit_identical": bool(np.array_equal(a, b)), "max_abs_diff": float(np.abs(a - b).max())}
    ratios = {}
    for engine in engines:
        peaks = {r["images"]: r["peak_rss_mib"] for r in runs if r["engine"] == engine and r["exit_code"] == 0}
        if min(sizes) in peaks and max(sizes) in peaks:
            ratios[engine] = round(peaks[max(sizes)] / peaks[min(sizes)], 3)
    return {
        "benchmark": "index",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": list(os.getloadavg())},
        "settings": {
            "sizes": list(sizes),
            "image_size": image_size,
            "shard_size": shard_size,
            "batch_size": batch_size,
            "ray_actors": ray_actors,
            "train_size": train_size,
            "network": f"{architecture}, 512-d whitening, random weights",
            "index": "ivfpq",
        },
        "runs": runs,
        "equal_outputs": {str(k): v for k, v in equal.items()},
        "peak_rss_ratio_largest_to_smallest": ratios,
    }


def format_index_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        "| engine | images | wall s | images/s | peak RSS MiB (process) | actors' peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        actors = ", ".join(f"{v:.0f}" for v in r["actor_peak_rss_mib"]) or "-"
        lines.append(
            f"| {r['engine']} | {r['images']} | {r['wall_s']} | {r['images_per_s']} | {r['peak_rss_mib']:.0f} | "
            f"{actors} |"
        )
    for size, result in report["equal_outputs"].items():
        lines.append(
            f"\n{size} images: local vs ray bit-identical: {result['bit_identical']} "
            f"(max abs diff {result['max_abs_diff']:.3g})"
        )
    for engine, ratio in report["peak_rss_ratio_largest_to_smallest"].items():
        lines.append(f"\n{engine}: peak RSS largest / smallest database = {ratio}")
    return "\n".join(lines)


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class _PeakSampler:
    """Samples this process's ``RssAnon`` every ``interval_s`` in a thread; ``peak_kib`` is the largest seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_kib = _rss_anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_kib = max(self.peak_kib, _rss_anon_kib())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _rss_anon_kib())


def _synthetic_chunks(n: int, dim: int, chunk_rows: int, seed: int) -> Any:
    """``(rows, ids)`` chunks of ``n`` unit rows, the same for every call with the same arguments."""
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        x = np.random.default_rng([seed, start]).standard_normal((stop - start, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x, np.arange(start, stop, dtype=np.int64)


def build_child(
    mode: str, n: int, out: str, dim: int, nlist: int, m: int, chunk_rows: int, part_rows: int, train: int
) -> dict:
    """One build (run in a fresh process by :func:`run_build_benchmark`): ``mode`` is ``memory`` or ``disk``."""
    from raml.deploy.faiss_index import IndexParams, add_with_ids, empty_faiss_index, import_faiss
    from raml.deploy.ondisk_ivf import build_ondisk_ivf, set_lists_name

    faiss = import_faiss()
    faiss.omp_set_num_threads(1)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    params = IndexParams("ivfpq", nlist=nlist, m=m, nbits=8, train_size=train).resolve(max(n, train), dim)
    template = empty_faiss_index(params, dim)
    template.train(next(_synthetic_chunks(train, dim, train, seed=1))[0])  # the same sample for both modes
    baseline = _rss_anon_kib()
    started = time.perf_counter()
    with _PeakSampler() as sampler:
        if mode == "memory":
            index = faiss.clone_index(template)
            for rows, ids in _synthetic_chunks(n, dim, chunk_rows, seed=0):
                add_with_ids(index, rows, ids)
            faiss.write_index(index, str(folder / "index.faiss"))
        else:
            index = build_ondisk_ivf(
                template,
                _synthetic_chunks(n, dim, chunk_rows, seed=0),
                folder / "lists.ivfdata",
                folder / "parts",
                part_rows=part_rows,
            )
            set_lists_name(index, "lists.ivfdata")
            faiss.write_index(index, str(folder / "index.faiss"))
    wall = time.perf_counter() - started
    import resource

    return {
        "mode": mode,
        "vectors": n,
        "wall_s": round(wall, 2),
        "baseline_anon_mib": round(baseline / 1024, 1),
        "peak_anon_mib": round(sampler.peak_kib / 1024, 1),
        "build_anon_mib": round((sampler.peak_kib - baseline) / 1024, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "codes_mib": round(n * (params.m + 8) / 2**20, 1),
        "part_codes_mib": round(min(n, part_rows) * (params.m + 8) / 2**20, 1),
        "chunk_rows_mib": round(min(n, chunk_rows) * dim * 4 / 2**20, 1),
    }


def run_build_benchmark(
    work_dir: Path,
    sizes: tuple[int, ...] = (250_000, 1_000_000, 4_000_000),
    dim: int = 64,
    nlist: int = 256,
    m: int = 16,
    chunk_rows: int = 8192,
    part_rows: int = 1 << 20,
    train_size: int = 20_000,
    queries: int = 200,
) -> dict[str, Any]:
    """Peak build memory of in-memory vs on-disk IVF-PQ against N, and equality of their search results."""
    from raml.deploy.faiss_index import import_faiss

    faiss = import_faiss()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs: list[dict[str, Any]] = []
    equal: dict[str, Any] = {}
    q = next(_synthetic_chunks(queries, dim, queries, seed=2))[0]
    for n in sizes:
        for mode in ("memory", "disk"):
            out = work_dir / f"build-{mode}-{n}"
            code = (
                "import json, sys; from raml.bench.index import build_child; "
                f"print(json.dumps(build_child({mode!r}, {n}, {str(out)!r}, {dim}, {nlist}, {m}, {chunk_rows}, "
                f"{part_rows}, {train_size})))"
            )
            result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if result.returncode != 0:
                logger.error("build %s %d failed:\n%s", mode, n, result.stderr[-4000:])
                runs.append({"mode": mode, "vectors": n, "exit_code": result.returncode})
                continue
            runs.append({**json.loads(result.stdout.strip().splitlines()[-1]), "exit_code": 0})
            logger.info("%s", runs[-1])
        if all(r.get("exit_code") == 0 for r in runs[-2:]):
            memory = faiss.read_index(str(work_dir / f"build-memory-{n}" / "index.faiss"))
            disk = faiss.read_index(
                str(work_dir / f"build-disk-{n}" / "index.faiss"),
                faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY,
            )
            results = []
            for index in (memory, disk):
                faiss.extract_index_ivf(index).nprobe = 16
                results.append(index.search(q, 10))
            equal[str(n)] = {
                "ids_equal": bool(np.array_equal(results[0][1], results[1][1])),
                "scores_equal": bool(np.array_equal(results[0][0], results[1][0])),
            }
            del memory, disk
    return {
        "benchmark": "index build",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": list(os.getloadavg())},
        "settings": {
            "sizes": list(sizes),
            "dim": dim,
            "index": f"IVF{nlist},PQ{m}x8 (inner product), synthetic unit rows",
            "chunk_rows": chunk_rows,
            "part_rows": part_rows,
            "train_size": train_size,
            "threads": 1,
        },
        "runs": runs,
        "equal_outputs": equal,
    }


def format_build_report(report: dict[str, Any]) -> str:
    """The build report as a Markdown table."""
    lines = [
        "| build | vectors | wall s | RssAnon peak - baseline MiB | ru_maxrss MiB | all codes+ids MiB | one part's "
        "codes+ids MiB | one chunk's rows MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        if r.get("exit_code"):
            lines.append(f"| {r['mode']} | {r['vectors']} | failed | | | | | |")
            continue
        lines.append(
            f"| {r['mode']} | {r['vectors']} | {r['wall_s']} | {r['build_anon_mib']} | {r['ru_maxrss_mib']} | "
            f"{r['codes_mib']} | {r['part_codes_mib']} | {r['chunk_rows_mib']} |"
        )
    for n, result in report["equal_outputs"].items():
        lines.append(
            f"\n{n} vectors: on-disk vs in-memory search results equal: ids {result['ids_equal']}, scores "
            f"{result['scores_equal']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench index [--sizes 2000,8000,32000] [--engines local,ray] [--json PATH]``."""
    from raml.entry import setup_logging

    parser = parsers.index_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    engines = tuple(e for e in args.engines.split(",") if e)
    parts = {p for p in args.parts.split(",") if p}
    if not parts or parts - {"extraction", "build"}:
        parser.error(f"--parts takes extraction and/or build, got {args.parts!r}")
    report: dict[str, Any] = {}
    ok = True
    if "extraction" in parts:
        report = run_index_benchmark(
            args.work_dir,
            args.sizes,
            engines,
            args.image_size,
            args.shard_size,
            args.batch_size,
            args.ray_actors,
            architecture=args.architecture,
        )
        print(format_index_report(report))
        ok = all(r["exit_code"] == 0 for r in report["runs"])
    if "build" in parts:
        report["build"] = run_build_benchmark(args.work_dir, args.build_sizes)
        print(format_build_report(report["build"]))
        ok = ok and all(r["exit_code"] == 0 for r in report["build"]["runs"])
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1
