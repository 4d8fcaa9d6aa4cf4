"""``raml bench quantization``: what an int8 student and a compressed database cost and save, measured together.

Contract: a teacher and a student checkpoint and a labelled test split -> one row per (query network, database):
query networks the PyTorch student, its fp32 ONNX export and its int8 ONNX export (``raml.deploy.quantize``,
calibrated on ``calibration_images`` images of ``calibration_split``); databases the split embedded by the
teacher at DR into an exact (``flat``) and an ``ivfpq`` index. Each row holds the asymmetric mAP and R@1 of
``raml.deploy.evaluate_with_index`` (every image of the split a query, its own image junk), the query cost on
the CPU in milliseconds per image (median forward pass at batch 1 plus the median single-query search for the
top ``k``), and the bytes each database vector takes in the index (faiss's code size: ``4 * D`` for flat,
``m * nbits / 8`` for ivfpq, whose inverted lists also store an 8-byte id per vector).

All three query networks run on the CPU with ``threads`` threads (torch and onnxruntime alike), in this one
run, so their times compare; the PyTorch row is the baseline the fp32 export must reproduce exactly.
"""

from __future__ import annotations

import datetime
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.bench import parsers
from raml.data.splits import get_split
from raml.deploy import DatabaseIndex, IndexParams, evaluate_with_index, index_images, load_index
from raml.deploy.export import export_onnx
from raml.deploy.onnx_network import OnnxQueryNetwork
from raml.deploy.quantize import evenly_spaced, quantize_onnx
from raml.models import checkpoint_sha256, load_network
from raml.models.cost import latency_ms_per_image
from raml.retrieval.extract import extract_embeddings
from raml.utils import atomic_write_text, cpu_model

logger = logging.getLogger(__name__)

__all__ = ["format_quantization_report", "main", "run_quantization_benchmark"]

CPU = torch.device("cpu")


def _code_bytes(index: Any, index_type: str) -> int:
    """Bytes of one stored vector code in a faiss index built by ``raml.deploy``."""
    import faiss

    if index_type in ("ivf", "ivfpq"):
        return int(faiss.extract_index_ivf(index).code_size)
    if isinstance(index, faiss.IndexIDMap):  # flat and HNSW indexes carry their ids in an IndexIDMap2
        index = faiss.downcast_index(index.index)
    return int(index.code_size)


def _search_ms(database: DatabaseIndex, queries: np.ndarray, k: int, repeats: int, nprobe: int | None) -> float:
    """Median milliseconds of a single-query search (the online case) over the queries, ``repeats`` passes."""
    times = []
    for _ in range(repeats):
        for row in queries:
            start = time.perf_counter()
            database.search(row[None, :], k, nprobe=nprobe)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def run_quantization_benchmark(
    teacher_path: str | Path,
    student_path: str | Path,
    data_root: str | Path,
    dataset: str,
    image_size: int,
    teacher_image_size: int,
    calibration_split: str,
    work_dir: str | Path,
    calibration_images: int = 64,
    ivfpq: IndexParams | None = None,
    probes: Sequence[int | None] = (None,),
    k: int = 10,
    repeats: int = 20,
    threads: int = 1,
) -> dict[str, Any]:
    """Measure every (query network, database) row; see the module docstring.

    Args:
        teacher_path: Database network checkpoint.
        student_path: Query network checkpoint.
        data_root: Folder holding the datasets.
        dataset: The labelled test split (queries and database).
        image_size: Query size QR.
        teacher_image_size: Database size DR.
        calibration_split: Split of the int8 calibration images (not the test split, to keep them apart).
        work_dir: Where the exports and indexes are written (replaced).
        calibration_images: Calibration images, evenly spaced over ``calibration_split``.
        ivfpq: Parameters of the compressed index (default: ``IndexParams("ivfpq")``, defaults from the data).
        probes: The ``nprobe`` values the IVF-PQ index is tested with, one set of rows each (None: as built).
        k: Results per timed search.
        repeats: Timed passes (forward passes at batch 1; search passes over all queries); medians reported.
        threads: CPU threads of torch and onnxruntime.

    Returns:
        ``{"rows": [...], "settings": {...}, "files": {...}, "machine": {...}}``.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        teacher = load_network(teacher_path, device=CPU)
        student = load_network(student_path, device=CPU)
        split = get_split(dataset, data_root)
        calibration_paths = [str(p) for p in get_split(calibration_split, data_root).abspaths()]
        calibration = evenly_spaced(calibration_paths, calibration_images)
        fp32_file, int8_file = work / "student.fp32.onnx", work / "student.int8.onnx"
        export_onnx(student, image_size, fp32_file, network_path=student_path)
        held_out = evenly_spaced([str(p) for p in split.abspaths()], 64)  # checked on the queries, not calibration
        quantized = quantize_onnx(fp32_file, int8_file, calibration, held_out, calibration_split=calibration_split)
        networks: dict[str, nn.Module] = {
            "PyTorch fp32": student,
            "ONNX fp32": OnnxQueryNetwork(fp32_file, threads=threads),
            "ONNX int8": OnnxQueryNetwork(int8_file, threads=threads),
        }
        databases = {"exact (flat)": IndexParams("flat"), "ivfpq": ivfpq or IndexParams("ivfpq")}
        indexes = {}
        for name, params in databases.items():
            directory = work / f"index-{params.index_type}"
            index_images(
                teacher,
                [str(p) for p in split.abspaths()],
                teacher_image_size,
                directory,
                network_sha256=checkpoint_sha256(teacher_path),
                network_path=teacher_path,
                labels=list(split.labels),
                dataset=split.name,
                params=params,
                overwrite=True,
            )
            indexes[name] = load_index(directory)
        paths = [str(p) for p in split.abspaths()]
        embed_ms = {
            name: latency_ms_per_image(net, image_size, CPU, batch_size=1, repeats=repeats)
            for name, net in networks.items()
        }
        rows = []
        for db_name, database in indexes.items():
            index_type = database.meta["index_type"]
            ivf = index_type in ("ivf", "ivfpq")
            for nprobe in probes if ivf else [None]:
                searched = database.params.nprobe if nprobe is None else min(nprobe, database.params.nlist)
                for net_name, net in networks.items():
                    metrics = evaluate_with_index(net, split, image_size, database, CPU, nprobe=nprobe)
                    queries = extract_embeddings(net, paths, image_size, CPU, progress=False).numpy()
                    search_ms = _search_ms(database, queries, min(k, len(database)), max(1, repeats // 10), nprobe)
                    rows.append(
                        {
                            "query_network": net_name,
                            "database": db_name,
                            "faiss": database.meta.get("faiss_factory") + (f", nprobe {searched}" if ivf else ""),
                            "nprobe": searched if ivf else None,
                            "mAP": metrics["mAP"],
                            "R@1": metrics["R@1"],
                            "embed_ms": embed_ms[net_name],
                            "search_ms": search_ms,
                            "query_ms": embed_ms[net_name] + search_ms,
                            "bytes_per_vector": _code_bytes(database.index, index_type),
                            "num_queries": metrics["num_queries"],
                        }
                    )
                    logger.info(
                        "%s / %s: mAP %.2f, R@1 %.2f", net_name, rows[-1]["faiss"], metrics["mAP"], metrics["R@1"]
                    )
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "rows": rows,
        "settings": {
            "teacher": str(teacher_path),
            "student": str(student_path),
            "dataset": dataset,
            "image_size": image_size,
            "teacher_image_size": teacher_image_size,
            "calibration_split": calibration_split,
            "calibration_images": len(calibration),
            "k": k,
            "repeats": repeats,
            "threads": threads,
        },
        "files": {
            "fp32_bytes": quantized.fp32_bytes,
            "int8_bytes": quantized.int8_bytes,
            "int8_mean_cosine_to_fp32": quantized.mean_cosine,
            "int8_min_cosine_to_fp32": quantized.min_cosine,
            # the cosines are measured on these images of the test split, none of them a calibration image
            "int8_checked_images": quantized.checked_images,
        },
        "machine": {"cpu": cpu_model(), "torch": torch.__version__, "onnxruntime": _version("onnxruntime")},
        "date": datetime.date.today().isoformat(),
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def format_quantization_report(result: dict[str, Any]) -> str:
    """A Markdown table of the rows (the one docs/deployment.md shows)."""
    lines = [
        "| query network | database | faiss | mAP | R@1 | query ms/image (embed + search) | bytes / database vector |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['query_network']} | {r['database']} | {r['faiss']} | {r['mAP']:.2f} | {r['R@1']:.2f} | "
            f"{r['query_ms']:.2f} ({r['embed_ms']:.2f} + {r['search_ms']:.3f}) | {r['bytes_per_vector']} |"
        )
    files = result["files"]
    checked = files.get("int8_checked_images")
    lines.append("")
    lines.append(
        f"ONNX files: fp32 {files['fp32_bytes']} bytes, int8 {files['int8_bytes']} bytes "
        f"({files['fp32_bytes'] / files['int8_bytes']:.2f}x smaller); int8 vs fp32 embedding cosine on "
        + (f"{checked} " if checked is not None else "")
        + "held-out images of the test split (not used for calibration): "
        f"mean {files['int8_mean_cosine_to_fp32']:.4f}, min {files['int8_min_cosine_to_fp32']:.4f}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from raml.entry import setup_logging, write_json

    parser = parsers.quantization_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    ivfpq = IndexParams("ivfpq", nlist=args.nlist, m=args.m, nbits=args.nbits)
    result = run_quantization_benchmark(
        args.teacher_path,
        args.student_path,
        args.data_root,
        args.dataset,
        args.image_size,
        args.teacher_image_size,
        args.calibration_split,
        args.work_dir,
        calibration_images=args.calibration_images,
        ivfpq=ivfpq,
        probes=args.nprobe or [None],
        k=args.k,
        repeats=args.repeats,
        threads=args.threads,
    )
    table = format_quantization_report(result)
    print(table)
    if args.json is not None:
        write_json(args.json, result)
    if args.markdown is not None:
        atomic_write_text(args.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
