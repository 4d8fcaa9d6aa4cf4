"""``raml bench eval``: exact retrieval evaluation against the bare similarity matmul, SOP-sized, in one run.

Contract: synthetic clustered embeddings ``(N, D)`` float32, L2-normalised (class centres on the unit
sphere plus Gaussian noise; class sizes 2..12 like Stanford Online Products, summing to ``N``) are written
to a temporary file; then two phases run, each in a fresh Python process so that its peak resident memory
(``ru_maxrss``) is its own:

* ``matmul``: the all-vs-all float32 similarities ``X_b @ X^T`` in query blocks of the size
  :func:`~raml.retrieval.metrics.retrieval_metrics` uses by default, results discarded: the floor any exact
  evaluation must pay.
* ``eval``: :func:`~raml.retrieval.metrics.retrieval_metrics` with ``ks=(1, 10, 100, 1000)`` and
  ``exclude_self=True`` on query = database = the embeddings (the SOP test protocol).

The result dict holds the seconds of each phase (the data loading and imports not included), their
ratio, the peak RSS of each process in GB, the RSS after loading the data, the metrics, the torch thread
count and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import raml
from raml.retrieval import metrics as metrics_module
from raml.utils import atomic_path, atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = ["check_sizes", "format_eval_report", "main", "make_clustered_embeddings", "run_eval_benchmark"]

_KS = (1, 10, 100, 1000)
_MIN_CLASS, _MAX_CLASS = 2, 12
# Noise norm relative to the unit class centre: SOP-like difficulty (mAP around 50-70 %).
_NOISE = 2.2


def check_sizes(num_images: int, dim: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``num_images`` can form ``num_classes`` classes of 2..12 images."""
    if num_classes < 1 or dim < 1:
        raise ValueError(f"num_classes and dim must be >= 1, got num_classes={num_classes}, dim={dim}.")
    if not _MIN_CLASS * num_classes <= num_images <= _MAX_CLASS * num_classes:
        raise ValueError(
            f"{num_images} images cannot form {num_classes} classes of {_MIN_CLASS}..{_MAX_CLASS} images; "
            f"choose --num-images between {_MIN_CLASS * num_classes} and {_MAX_CLASS * num_classes}."
        )


def make_clustered_embeddings(
    num_images: int, dim: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """SOP-like synthetic embeddings: ``num_classes`` classes of 2..12 images each.

    Args:
        num_images: total number of embeddings N; needs ``2 * num_classes <= N <= 12 * num_classes``.
        dim: embedding dimension D.
        num_classes: number of classes.
        seed: seed of the generator (same seed, same data).

    Returns:
        ``(embeddings (N, D) float32, L2-normalised; labels (N,) int64)``, the rows in random order.
    """
    check_sizes(num_images, dim, num_classes)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(_MIN_CLASS, _MAX_CLASS + 1, num_classes)
    while (diff := num_images - int(sizes.sum())) != 0:
        room = np.flatnonzero(sizes < _MAX_CLASS) if diff > 0 else np.flatnonzero(sizes > _MIN_CLASS)
        pick = rng.choice(room, size=min(abs(diff), room.size), replace=False)
        sizes[pick] += 1 if diff > 0 else -1
    labels = np.repeat(np.arange(num_classes), sizes)
    rng.shuffle(labels)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((num_images, dim), dtype=np.float32)
    x *= _NOISE / np.sqrt(dim)
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def _default_block_size(num_database: int) -> int:
    return max(1, metrics_module._BLOCK_BYTES // (4 * num_database))


def _run_phase(phase: str, data_path: Path, out_path: Path) -> None:
    """Body of one phase, run inside the fresh child process; writes its measurements to ``out_path``."""
    data = np.load(data_path)
    x = torch.from_numpy(np.ascontiguousarray(data["embeddings"]))
    labels = data["labels"]
    loaded_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    block = _default_block_size(x.shape[0])
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    cpu_start = time.process_time()
    if phase == "matmul":
        for b0 in range(0, x.shape[0], block):
            sims = x[b0 : b0 + block] @ x.T
            del sims
    elif phase == "eval":
        metrics = metrics_module.retrieval_metrics(x, x, labels, labels, ks=_KS, exclude_self=True)
    else:
        raise ValueError(f"unknown benchmark phase {phase!r}; expected 'matmul' or 'eval'.")
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_gb": peak_kib * 1024 / 1e9,
        "loaded_rss_gb": loaded_rss_kib * 1024 / 1e9,
        "block_size": block,
        "torch_threads": torch.get_num_threads(),
        "metrics": metrics,
    }
    atomic_write_text(out_path, json.dumps(record))


def _child_main() -> None:
    """Entry of the child process: ``python -c '...' PHASE DATA_PATH OUT_PATH``."""
    phase, data_path, out_path = sys.argv[1:4]
    _run_phase(phase, Path(data_path), Path(out_path))


def _spawn_phase(phase: str, data_path: Path, workdir: Path) -> dict:
    out_path = workdir / f"{phase}.json"
    env = dict(os.environ)
    src_root = str(Path(raml.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "from raml.bench.eval import _child_main; _child_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, phase, str(data_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"benchmark phase {phase!r} failed (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def run_eval_benchmark(
    num_images: int = 60502, dim: int = 512, num_classes: int = 11316, seed: int = 0, repeats: int = 1
) -> dict:
    """Time and measure the bare blocked matmul and the full exact evaluation on the same data.

    Args:
        num_images: number of embeddings (queries = database); SOP's test set has 60,502.
        dim: embedding dimension.
        num_classes: number of classes (SOP's test set has 11,316).
        seed: data seed.
        repeats: run the two phases this many times, alternating, and keep the fastest of each (on a
            shared machine the quietest); every run's times are kept under ``runs``.

    Returns:
        A JSON-serialisable dict: ``matmul_s``, ``eval_s`` (wall seconds), ``ratio`` (eval / matmul),
        ``matmul_cpu_s``, ``eval_cpu_s``, ``cpu_ratio`` (process CPU seconds, less sensitive to other
        processes on the machine), ``matmul_peak_rss_gb``, ``eval_peak_rss_gb``, ``data_rss_gb`` (RSS of a
        phase process after loading the data), ``metrics``, ``block_size``, ``torch_threads``,
        ``cpu_model``, ``cpu_count``, ``runs``, sizes, versions, date.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    x, labels = make_clustered_embeddings(num_images, dim, num_classes, seed)
    with tempfile.TemporaryDirectory(prefix="raml-bench-eval-") as tmp:
        workdir = Path(tmp)
        data_path = workdir / "data.npz"
        with atomic_path(data_path) as part, open(part, "wb") as f:  # a file object: savez adds no ".npz"
            np.savez(f, embeddings=x, labels=labels)
        del x
        runs: list[dict] = []
        for run in range(repeats):
            logger.info(
                "bench eval run %d/%d: %d x %d embeddings, %d classes", run + 1, repeats, num_images, dim, num_classes
            )
            pair = {phase: _spawn_phase(phase, data_path, workdir) for phase in ("matmul", "eval")}
            logger.info("bench eval: matmul %.2f s, eval %.2f s", pair["matmul"]["seconds"], pair["eval"]["seconds"])
            runs.append(pair)
    matmul = min((r["matmul"] for r in runs), key=lambda m: m["seconds"])
    evaluation = min((r["eval"] for r in runs), key=lambda m: m["seconds"])
    return {
        "benchmark": "eval",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "num_images": num_images,
        "dim": dim,
        "num_classes": num_classes,
        "seed": seed,
        "ks": list(_KS),
        "block_size": matmul["block_size"],
        "matmul_s": matmul["seconds"],
        "eval_s": evaluation["seconds"],
        "ratio": evaluation["seconds"] / matmul["seconds"] if matmul["seconds"] > 0 else float("nan"),
        "matmul_cpu_s": matmul["cpu_seconds"],
        "eval_cpu_s": evaluation["cpu_seconds"],
        "cpu_ratio": evaluation["cpu_seconds"] / matmul["cpu_seconds"] if matmul["cpu_seconds"] > 0 else float("nan"),
        "matmul_peak_rss_gb": matmul["peak_rss_gb"],
        "eval_peak_rss_gb": evaluation["peak_rss_gb"],
        "data_rss_gb": evaluation["loaded_rss_gb"],
        "metrics": evaluation["metrics"],
        "torch_threads": evaluation["torch_threads"],
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "repeats": repeats,
        "runs": [
            {phase: {"seconds": r[phase]["seconds"], "cpu_seconds": r[phase]["cpu_seconds"]} for phase in r}
            for r in runs
        ],
    }


def format_eval_report(result: dict) -> str:
    """A readable table of a :func:`run_eval_benchmark` result."""
    metrics = result.get("metrics", {})
    metric_text = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    rows = [
        ("phase", "wall s", "CPU s", "peak RSS (GB)"),
        (
            "bare blocked matmul",
            f"{result['matmul_s']:.2f}",
            f"{result['matmul_cpu_s']:.2f}",
            f"{result['matmul_peak_rss_gb']:.2f}",
        ),
        (
            "retrieval_metrics",
            f"{result['eval_s']:.2f}",
            f"{result['eval_cpu_s']:.2f}",
            f"{result['eval_peak_rss_gb']:.2f}",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"raml bench eval: {result['num_images']} x {result['dim']} embeddings, {result['num_classes']} classes, "
        f"seed {result['seed']}, block {result['block_size']} queries",
        f"machine: {result['cpu_model']}, {result['cpu_count']} cores, torch {result['torch_version']} with "
        f"{result['torch_threads']} threads",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"eval / matmul: {result['ratio']:.2f}x wall, {result['cpu_ratio']:.2f}x CPU "
        f"(best of {result.get('repeats', 1)}); RSS after loading the data: {result['data_rss_gb']:.2f} GB",
        f"metrics (%): {metric_text}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench eval [--num-images N] [--dim D] [--num-classes C] [--seed S] [--repeat R]
    [--json PATH]``."""
    parser = argparse.ArgumentParser(
        prog="raml bench eval",
        description="Time exact mAP/R@k evaluation against the bare all-vs-all similarity matmul (SOP-sized).",
    )
    parser.add_argument("--num-images", type=int, default=60502, help="embeddings (default: SOP test, 60502)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    parser.add_argument("--num-classes", type=int, default=11316, help="classes of 2..12 images (default 11316)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the phases N times, keep the best (default 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    try:
        check_sizes(args.num_images, args.dim, args.num_classes)
        if args.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {args.repeat}.")
    except ValueError as exc:
        parser.error(str(exc))
    result = run_eval_benchmark(args.num_images, args.dim, args.num_classes, args.seed, args.repeat)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(format_eval_report(result))
    return 0
