"""``raml bench eval``: exact retrieval evaluation against the bare similarity matmul, SOP-sized, in one run.

Contract: synthetic clustered embeddings ``(N, D)`` float32, L2-normalised (class centres on the unit
sphere plus Gaussian noise; class sizes 2..12 like Stanford Online Products, summing to ``N``) are written
to a temporary file; then two phases run, each in a fresh Python process so that its peak resident memory
(``ru_maxrss``) is its own:

* ``matmul``: the all-vs-all float32 similarities ``X_b @ X^T`` in query blocks of the size
  :func:`~raml.retrieval.metrics.retrieval_metrics`'s one-sided path uses by default, results discarded: the
  floor of any exact evaluation that computes every similarity.
* ``sym``: :func:`~raml.retrieval.metrics.retrieval_metrics` with ``ks=(1, 10, 100, 1000)`` and
  ``exclude_self=True`` on query = database = the embeddings (the SOP symmetric test): each pair of blocks is
  computed once and counted both ways.
* ``sym_one_sided``: the same test through the one-sided path (every query row in full, as before issue 21);
  its metrics must equal ``sym``'s.
* ``asym``: student-like queries (the same images' embeddings with more noise) against the embeddings as the
  database, ``exclude_self=True`` (the asymmetric test).

With ``--device cuda`` every phase runs on the GPU (the embeddings and the counting stay there; peak memory
is then ``torch.cuda.max_memory_allocated``); when CUDA is not available the benchmark runs on the CPU and
says so (``cuda_unavailable``).

The result dict holds the seconds of each phase (the data loading and imports not included), their ratios
to ``matmul``, the peak memory of each process in GB, the memory after loading the data, the metrics, the
torch thread count and the machine.
"""

from __future__ import annotations

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
from raml.bench import parsers
from raml.retrieval import metrics as metrics_module
from raml.utils import atomic_path, atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = [
    "PHASES",
    "check_sizes",
    "format_eval_report",
    "main",
    "make_clustered_embeddings",
    "make_queries",
    "resolve_device",
    "run_eval_benchmark",
]

_KS = (1, 10, 100, 1000)
_MIN_CLASS, _MAX_CLASS = 2, 12
# Noise norm relative to the unit class centre: SOP-like difficulty (mAP around 50-70 %).
_NOISE = 2.2
# Extra noise of the asymmetric phase's queries (a student's embeddings of the same images).
_QUERY_NOISE = 0.5
#: The phases, in the order they run; ratios are taken against the first.
PHASES = ("matmul", "sym", "sym_one_sided", "asym")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_phase(phase: str, data_path: Path, out_path: Path, device_name: str) -> None:
    """Body of one phase, run inside the fresh child process; writes its measurements to ``out_path``."""
    device = torch.device(device_name)
    data = np.load(data_path)
    x = torch.from_numpy(np.ascontiguousarray(data["embeddings"])).to(device)
    labels = data["labels"]
    queries = torch.from_numpy(np.ascontiguousarray(data["queries"])).to(device) if phase == "asym" else None
    loaded_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded_device = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    block = _default_block_size(x.shape[0])
    metrics: dict[str, float] = {}
    _sync(device)
    start = time.perf_counter()
    cpu_start = time.process_time()
    if phase == "matmul":
        for b0 in range(0, x.shape[0], block):
            sims = x[b0 : b0 + block] @ x.T
            del sims
        _sync(device)
    elif phase in ("sym", "sym_one_sided"):
        metrics_module._SYMMETRIC_PAIRS = phase == "sym"
        metrics = metrics_module.retrieval_metrics(x, x, labels, labels, ks=_KS, exclude_self=True)
    elif phase == "asym":
        metrics = metrics_module.retrieval_metrics(queries, x, labels, labels, ks=_KS, exclude_self=True)
    else:
        raise ValueError(f"unknown benchmark phase {phase!r}; expected one of {', '.join(PHASES)}.")
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
    if device.type == "cuda":
        record["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        record["loaded_device_gb"] = loaded_device / 1e9
        record["gpu"] = torch.cuda.get_device_name(device)
    atomic_write_text(out_path, json.dumps(record))


def _child_main() -> None:
    """Entry of the child process: ``python -c '...' PHASE DATA_PATH OUT_PATH DEVICE``."""
    phase, data_path, out_path, device = sys.argv[1:5]
    _run_phase(phase, Path(data_path), Path(out_path), device)


def _spawn_phase(phase: str, data_path: Path, workdir: Path, device: str) -> dict:
    out_path = workdir / f"{phase}.json"
    env = dict(os.environ)
    src_root = str(Path(raml.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "from raml.bench.eval import _child_main; _child_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, phase, str(data_path), str(out_path), device],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"benchmark phase {phase!r} failed (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def make_queries(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Student-like queries of the same images: ``x`` plus Gaussian noise of norm ``_QUERY_NOISE``, renormalised."""
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal(x.shape, dtype=np.float32)
    q *= _QUERY_NOISE / np.sqrt(x.shape[1])
    q += x
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def resolve_device(name: str) -> tuple[str, bool]:
    """``(device to run on, whether CUDA was asked for but is not available)``."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        logger.warning("bench eval: CUDA was asked for but is not available; running on the CPU.")
        return "cpu", True
    return name, False


def run_eval_benchmark(
    num_images: int = 60502,
    dim: int = 512,
    num_classes: int = 11316,
    seed: int = 0,
    repeats: int = 1,
    device: str = "cpu",
    phases: tuple[str, ...] = PHASES,
) -> dict:
    """Time and measure the bare blocked matmul and the exact evaluations on the same data, in one run.

    Args:
        num_images: number of embeddings (queries = database); SOP's test set has 60,502.
        dim: embedding dimension.
        num_classes: number of classes (SOP's test set has 11,316).
        seed: data seed.
        repeats: run the phases this many times, alternating, and keep the fastest of each (on a shared
            machine the quietest); every run's times are kept under ``runs``.
        device: ``"cpu"`` or ``"cuda"`` (falls back to the CPU, recorded as ``cuda_unavailable``).
        phases: which of :data:`PHASES` to run; ``"matmul"`` always runs (the ratios' baseline).

    Returns:
        A JSON-serialisable dict: per phase ``<phase>_s`` (wall seconds), ``<phase>_cpu_s`` (process CPU
        seconds), ``<phase>_peak_rss_gb`` (and ``<phase>_peak_device_gb`` on CUDA), and for the evaluations
        ``<phase>_ratio`` / ``<phase>_cpu_ratio`` (over ``matmul``) and ``<phase>_metrics``;
        ``sym_metrics_equal`` (the two symmetric paths' metrics identical) and ``sym_max_abs_diff``;
        ``data_rss_gb``, ``block_size``, ``torch_threads``, ``device``, ``cuda_unavailable``, ``cpu_model``,
        ``cpu_count``, ``runs``, sizes, versions, date. ``eval_s``, ``ratio``, ``cpu_ratio``,
        ``eval_peak_rss_gb`` and ``metrics`` repeat the symmetric phase's figures.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phases {unknown}; choose from {', '.join(PHASES)}.")
    phases = tuple(p for p in PHASES if p == "matmul" or p in phases)
    run_device, cuda_unavailable = resolve_device(device)
    x, labels = make_clustered_embeddings(num_images, dim, num_classes, seed)
    queries = make_queries(x, seed)
    with tempfile.TemporaryDirectory(prefix="raml-bench-eval-") as tmp:
        workdir = Path(tmp)
        data_path = workdir / "data.npz"
        with atomic_path(data_path) as part, open(part, "wb") as f:  # a file object: savez adds no ".npz"
            np.savez(f, embeddings=x, labels=labels, queries=queries)
        del x, queries
        runs: list[dict] = []
        for run in range(repeats):
            logger.info(
                "bench eval run %d/%d: %d x %d embeddings, %d classes, on %s",
                run + 1,
                repeats,
                num_images,
                dim,
                num_classes,
                run_device,
            )
            measured = {}
            for phase in phases:
                measured[phase] = _spawn_phase(phase, data_path, workdir, run_device)
                logger.info("bench eval: %s %.2f s", phase, measured[phase]["seconds"])
            runs.append(measured)
    best = {phase: min((r[phase] for r in runs), key=lambda m: m["seconds"]) for phase in phases}
    matmul = best["matmul"]
    result: dict = {
        "benchmark": "eval",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "num_images": num_images,
        "dim": dim,
        "num_classes": num_classes,
        "seed": seed,
        "ks": list(_KS),
        "phases": list(phases),
        "device": run_device,
        "cuda_unavailable": cuda_unavailable,
        "block_size": matmul["block_size"],
        "data_rss_gb": matmul["loaded_rss_gb"],
    }
    for phase, m in best.items():
        result[f"{phase}_s"] = m["seconds"]
        result[f"{phase}_cpu_s"] = m["cpu_seconds"]
        result[f"{phase}_peak_rss_gb"] = m["peak_rss_gb"]
        if "peak_device_gb" in m:
            result[f"{phase}_peak_device_gb"] = m["peak_device_gb"]
            result["gpu"] = m["gpu"]
        if phase != "matmul":
            result[f"{phase}_ratio"] = _ratio(m["seconds"], matmul["seconds"])
            result[f"{phase}_cpu_ratio"] = _ratio(m["cpu_seconds"], matmul["cpu_seconds"])
            result[f"{phase}_metrics"] = m["metrics"]
    if "sym" in best and "sym_one_sided" in best:
        a, b = best["sym"]["metrics"], best["sym_one_sided"]["metrics"]
        result["sym_metrics_equal"] = a == b
        result["sym_max_abs_diff"] = max(abs(float(a[k]) - float(b[k])) for k in a)
    first_eval = next((p for p in ("sym", "sym_one_sided", "asym") if p in best), None)
    if first_eval is not None:  # the keys of earlier versions of this benchmark
        result["eval_s"] = result[f"{first_eval}_s"]
        result["ratio"] = result[f"{first_eval}_ratio"]
        result["cpu_ratio"] = result[f"{first_eval}_cpu_ratio"]
        result["eval_peak_rss_gb"] = result[f"{first_eval}_peak_rss_gb"]
        result["metrics"] = result[f"{first_eval}_metrics"]
    result.update(
        {
            "torch_threads": matmul["torch_threads"],
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "repeats": repeats,
            "runs": [
                {phase: {"seconds": r[phase]["seconds"], "cpu_seconds": r[phase]["cpu_seconds"]} for phase in r}
                for r in runs
            ],
        }
    )
    return result


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


_PHASE_NAMES = {
    "matmul": "bare blocked matmul",
    "sym": "symmetric, pairs once",
    "sym_one_sided": "symmetric, one-sided",
    "asym": "asymmetric",
}


def format_eval_report(result: dict) -> str:
    """A readable table of a :func:`run_eval_benchmark` result."""
    on_cuda = result.get("device") == "cuda"
    header = ("phase", "wall s", "CPU s", "x matmul (wall)", "x matmul (CPU)", "peak RSS (GB)")
    rows = [header + (("peak GPU (GB)",) if on_cuda else ())]
    for phase in result["phases"]:
        ratio = "1.00" if phase == "matmul" else f"{result[f'{phase}_ratio']:.2f}"
        cpu_ratio = "1.00" if phase == "matmul" else f"{result[f'{phase}_cpu_ratio']:.2f}"
        row = (
            _PHASE_NAMES[phase],
            f"{result[f'{phase}_s']:.2f}",
            f"{result[f'{phase}_cpu_s']:.2f}",
            ratio,
            cpu_ratio,
            f"{result[f'{phase}_peak_rss_gb']:.2f}",
        )
        rows.append(row + ((f"{result[f'{phase}_peak_device_gb']:.2f}",) if on_cuda else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    where = f"GPU {result.get('gpu', '')}" if on_cuda else "CPU"
    lines = [
        f"raml bench eval: {result['num_images']} x {result['dim']} embeddings, {result['num_classes']} classes, "
        f"seed {result['seed']}, block {result['block_size']} queries, on the {where}",
        f"machine: {result['cpu_model']}, {result['cpu_count']} cores, torch {result['torch_version']} with "
        f"{result['torch_threads']} threads, load average {', '.join(f'{v:.2f}' for v in result['load_average'])}",
    ]
    if result.get("cuda_unavailable"):
        lines.append("CUDA was asked for but is not available: this run measured the CPU.")
    lines.append("")
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", f"best of {result.get('repeats', 1)}; RSS after loading the data: {result['data_rss_gb']:.2f} GB"]
    if "sym_metrics_equal" in result:
        lines.append(
            f"symmetric paths' metrics identical: {result['sym_metrics_equal']} "
            f"(largest difference {result['sym_max_abs_diff']:.3g})"
        )
    for phase in result["phases"]:
        if phase != "matmul":
            metrics = result[f"{phase}_metrics"]
            text = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            lines.append(f"{_PHASE_NAMES[phase]} metrics (%): {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench eval [--num-images N] [--dim D] [--num-classes C] [--seed S] [--repeat R]
    [--device cpu|cuda] [--phases P ...] [--json PATH]``."""
    parser = parsers.eval_parser()
    args = parser.parse_args(argv)
    try:
        check_sizes(args.num_images, args.dim, args.num_classes)
        if args.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {args.repeat}.")
        if args.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda', got {args.device!r}.")
        unknown = [p for p in args.phases if p not in PHASES]
        if unknown:
            raise ValueError(f"unknown --phases {unknown}; choose from {', '.join(PHASES)}.")
    except ValueError as exc:
        parser.error(str(exc))
    result = run_eval_benchmark(
        args.num_images, args.dim, args.num_classes, args.seed, args.repeat, args.device, tuple(args.phases)
    )
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(format_eval_report(result))
    return 0
