"""``raml bench query``: what one online query costs, per query resolution and per index type.

Contract: a network and a list of image sizes -> per size: GFLOPs per image (``raml.models.cost``), the
parameter count, the median latency per image at batch 1 and at ``batch_size`` (and the throughput that
gives) on the chosen device; plus, for each index type, the build time and the search time per query of a
synthetic database of ``database_size`` random L2-normalised vectors of the network's output dimension.
Queries are database vectors plus Gaussian noise (renormalised), searched one at a time (the online case)
for their ``k`` nearest neighbours; ``recall@k`` is the share of queries whose exact nearest neighbour (by
brute force) is among the ``k`` results (faiss's "1-recall@k").

Uniformly random vectors are a hard case for approximate indexes (no cluster structure), so the recall of
ivf/hnsw/ivfpq here is a pessimistic figure; the search times are representative for the database size.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.bench import parsers
from raml.deploy.faiss_index import INDEX_TYPES, IndexParams, build_faiss_index
from raml.models.cost import gflops_per_image, latency_ms_per_image
from raml.utils import atomic_path, atomic_write_text, cpu_model, select_device

logger = logging.getLogger(__name__)

__all__ = [
    "format_query_report",
    "main",
    "measure_network_cost",
    "measure_search",
    "plot_query_report",
    "run_query_benchmark",
]

PLOT_FORMATS = (".png", ".pdf", ".svg")
# Noise norm of a query relative to its unit database vector (queries stay nearest to their source).
_QUERY_NOISE = 0.5


def measure_network_cost(
    network: nn.Module, sizes: Sequence[int], device: torch.device, batch_size: int = 32, repeats: int = 5
) -> list[dict[str, Any]]:
    """FLOPs, parameters, latency and throughput of ``network`` at each size.

    Args:
        network: ``(B, 3, S, S)`` -> ``(B, D)``, on ``device``.
        sizes: Query resolutions S.
        device: Where to time it.
        batch_size: The larger batch for the throughput figure.
        repeats: Timed forward passes per figure (after 2 warm-up passes); the median is reported.

    Returns:
        One dict per size: ``image_size``, ``gflops``, ``params_m``, ``latency_ms_batch1``,
        ``ms_per_image_batch``, ``throughput_images_per_s``, ``batch_size``.
    """
    params_m = sum(p.numel() for p in network.parameters()) / 1e6
    rows = []
    for size in sizes:
        gflops = gflops_per_image(network, size, device)
        latency = latency_ms_per_image(network, size, device, batch_size=1, repeats=repeats)
        per_image = latency_ms_per_image(network, size, device, batch_size=batch_size, repeats=repeats)
        rows.append(
            {
                "image_size": int(size),
                "gflops": gflops,
                "params_m": params_m,
                "latency_ms_batch1": latency,
                "ms_per_image_batch": per_image,
                "throughput_images_per_s": 1000.0 / per_image if per_image > 0 else float("inf"),
                "batch_size": int(batch_size),
            }
        )
        logger.info(
            "size %d: %.2f GFLOPs, %.2f ms at batch 1, %.2f ms/image at batch %d",
            size,
            gflops,
            latency,
            per_image,
            batch_size,
        )
    return rows


def measure_search(
    dim: int,
    database_size: int,
    index_types: Sequence[str] = INDEX_TYPES,
    num_queries: int = 100,
    k: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Build each index type on synthetic vectors and time single-query searches.

    Args:
        dim: Embedding dimension D.
        database_size: N random L2-normalised database vectors.
        index_types: Index types to measure (default parameters, see ``raml.deploy.faiss_index.IndexParams``).
        num_queries: Queries searched one by one.
        k: Neighbours per query.
        seed: Data seed.

    Returns:
        One dict per index type: ``index_type``, ``params`` (resolved), ``build_s``, ``ms_per_query``,
        ``recall_at_k`` (share of queries whose exact nearest neighbour is found), ``k``, ``database_size``.
    """
    rng = np.random.default_rng(seed)
    database = rng.standard_normal((database_size, dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    sources = rng.choice(database_size, size=num_queries, replace=database_size < num_queries)
    queries = database[sources] + rng.standard_normal((num_queries, dim), dtype=np.float32) * (
        _QUERY_NOISE / np.sqrt(dim)
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = min(k, database_size)
    nearest = np.argmax(queries @ database.T, axis=1)  # the exact nearest neighbour of each query
    rows = []
    for index_type in index_types:
        start = time.perf_counter()
        index, params = build_faiss_index(database, IndexParams(index_type=index_type))
        build_s = time.perf_counter() - start
        index.search(queries[:1], k)  # warm-up
        found = np.empty((num_queries, k), dtype=np.int64)
        times = []
        for i in range(num_queries):
            t0 = time.perf_counter()
            _, ids = index.search(queries[i : i + 1], k)
            times.append(time.perf_counter() - t0)
            found[i] = ids[0]
        recall = float(np.mean([nearest[i] in found[i] for i in range(num_queries)]))
        rows.append(
            {
                "index_type": index_type,
                "params": params.factory_string(),
                "build_s": build_s,
                "ms_per_query": 1000.0 * statistics.fmean(times),
                "recall_at_k": recall,
                "k": k,
                "database_size": int(database_size),
            }
        )
        logger.info(
            "%s: build %.2f s, %.3f ms/query, recall@%d %.3f", index_type, build_s, rows[-1]["ms_per_query"], k, recall
        )
    return rows


def run_query_benchmark(
    network: nn.Module,
    sizes: Sequence[int],
    device: torch.device,
    batch_size: int = 32,
    database_size: int = 100_000,
    index_types: Sequence[str] = INDEX_TYPES,
    num_queries: int = 100,
    k: int = 10,
    repeats: int = 5,
    seed: int = 0,
    network_name: str | None = None,
) -> dict[str, Any]:
    """The whole benchmark: :func:`measure_network_cost` and :func:`measure_search`, with the machine.

    Returns:
        A JSON-serialisable dict with ``resolutions``, ``search``, the network, device, machine and date.
    """
    _check(sizes, batch_size, database_size, index_types, num_queries, k, repeats)
    meta = dict(getattr(network, "meta", {}) or {})
    if meta.get("outputdim"):
        dim = int(meta["outputdim"])
    else:
        with torch.no_grad():
            dim = int(network.eval()(torch.zeros(1, 3, sizes[0], sizes[0], device=device)).shape[1])
    was_training = network.training
    network.eval()
    try:
        resolutions = measure_network_cost(network, sizes, device, batch_size, repeats)
    finally:
        network.train(was_training)
    search = measure_search(dim, database_size, index_types, num_queries, k, seed) if index_types else []
    return {
        "benchmark": "query",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "network": network_name or meta.get("architecture"),
        "architecture": meta.get("architecture"),
        "dim": dim,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "resolutions": resolutions,
        "search": search,
    }


def _check(
    sizes: Sequence[int],
    batch_size: int,
    database_size: int,
    index_types: Sequence[str],
    num_queries: int,
    k: int,
    repeats: int,
) -> None:
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 8 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of image sizes of at least 8 px, got {list(sizes)}.")
    for name, value in (
        ("batch_size", batch_size),
        ("database_size", database_size),
        ("num_queries", num_queries),
        ("k", k),
        ("repeats", repeats),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    unknown = [t for t in index_types if t not in INDEX_TYPES]
    if unknown:
        raise ValueError(f"Unknown index types {unknown}; choose from {', '.join(INDEX_TYPES)}.")


def format_query_report(result: dict[str, Any]) -> str:
    """Readable tables of a :func:`run_query_benchmark` result."""
    lines = [
        f"raml bench query: {result['network']} (D={result['dim']}) on {result['device']} ({result['device_name']}, "
        f"{result['torch_threads']} torch threads), {result['date']}",
        "",
    ]
    header = [
        "size",
        "GFLOPs",
        "params (M)",
        "ms @ batch 1",
        f"ms/img @ batch {result['resolutions'][0]['batch_size']}",
        "img/s",
    ]
    rows = [
        [
            str(r["image_size"]),
            f"{r['gflops']:.2f}",
            f"{r['params_m']:.2f}",
            f"{r['latency_ms_batch1']:.2f}",
            f"{r['ms_per_image_batch']:.2f}",
            f"{r['throughput_images_per_s']:.1f}",
        ]
        for r in result["resolutions"]
    ]
    lines += _table(header, rows)
    if result["search"]:
        first = result["search"][0]
        lines += [
            "",
            f"search: {first['database_size']} random {result['dim']}-d vectors, single queries, k={first['k']}",
        ]
        header = ["index", "faiss", "build (s)", "ms/query", f"recall@{first['k']}"]
        rows = [
            [r["index_type"], r["params"], f"{r['build_s']:.2f}", f"{r['ms_per_query']:.3f}", f"{r['recall_at_k']:.3f}"]
            for r in result["search"]
        ]
        lines += _table(header, rows)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def plot_query_report(result: dict[str, Any], path: str | Path) -> None:
    """Plot forward time per image against resolution (search times as horizontal lines), and GFLOPs.

    Written atomically; the format follows the suffix (``.png``, ``.pdf`` or ``.svg``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    sizes = [r["image_size"] for r in result["resolutions"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [r["latency_ms_batch1"] for r in result["resolutions"]], "o-", label="forward, batch 1")
    batch = result["resolutions"][0]["batch_size"]
    left.plot(
        sizes,
        [r["ms_per_image_batch"] for r in result["resolutions"]],
        "s-",
        label=f"forward, batch {batch} (per image)",
    )
    for i, row in enumerate(result["search"]):
        left.axhline(
            row["ms_per_query"],
            linestyle="--",
            color=f"C{i + 2}",
            label=f"search {row['index_type']} (N={row['database_size']})",
        )
    left.set_xlabel("query resolution (px)")
    left.set_ylabel("ms per image / query")
    left.set_yscale("log")
    left.set_title(f"time on {result['device']}")
    left.legend(fontsize=7)
    right.plot(sizes, [r["gflops"] for r in result["resolutions"]], "o-")
    right.set_xlabel("query resolution (px)")
    right.set_ylabel("GFLOPs per image")
    right.set_title(str(result["network"]))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench query --network-path NET | --network ARCH --sizes 224,448 [...]``."""
    from raml.entry import network_from_args, setup_logging

    parser = parsers.query_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_FORMATS:
        parser.error(f"--plot must end in one of {', '.join(PLOT_FORMATS)}, got {args.plot}")
    if args.index_types:
        try:
            from raml.deploy.faiss_index import import_faiss

            import_faiss()
        except ImportError as error:
            parser.error(f"{error} (or pass --index-types none)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if args.index_types:
            from raml.deploy.faiss_index import import_faiss

            import_faiss().omp_set_num_threads(args.threads)
    try:
        device = select_device(args.device)
        network, _ = network_from_args(
            args.network_path,
            args.network,
            args.data_root,
            device,
            pooling=args.pool,
            whitening=args.whitening if args.whitening is not None or args.network_path else 512,
            pretrained=not args.not_pretrained,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    result = run_query_benchmark(
        network,
        args.sizes,
        device,
        args.batch_size,
        args.database_size,
        args.index_types,
        args.queries,
        args.k,
        args.repeats,
        network_name=args.network_path or args.network,
    )
    print(format_query_report(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot_query_report(result, args.plot)
    return 0
