"""The argument parsers of ``raml bench NAME``, torch-free.

``raml bench NAME -h`` and a benchmark's usage errors are answered from here before the benchmark's module (which
imports torch, numpy, faiss, ... at its top) is imported; each module's ``main`` parses with the same parser.
Defaults and names whose home is a torch-importing module are spelled here, and
``tests/cli/test_cli_startup.py`` checks each against that module (:data:`SOURCES`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from raml.entry import add_network_args, image_sizes_arg, positive_int, seed_int, threads_int, workers_int
from raml.retrieval.scales import CPU_RUNTIMES

#: ``raml.bench.eval.PHASES``
EVAL_PHASES: tuple[str, ...] = ("matmul", "sym", "sym_one_sided", "asym")

#: ``tuple(raml.bench.methods.ROWS)``, in the table's order
METHOD_ROWS: tuple[str, ...] = (
    "ts_aug",
    "ts_aug --no-mixup",
    "ts_aug --uncoupled-views",
    "ts_reg",
    "aml",
    "rkd",
    "csd",
    "d3",
    "rop",
    "ugd",
)

#: ``raml.deploy.faiss_index.INDEX_TYPES``
INDEX_TYPES: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")

#: ``raml.demo.DemoSettings().threads``: the torch threads of the demo-based benchmarks
DEMO_THREADS = 2

#: ``raml.data.views.RESIZE_BACKENDS``
RESIZE_BACKENDS: tuple[str, ...] = ("pil", "torch")

#: the fields of ``raml.bench.adaptive.AdaptiveBenchSettings()``: ``raml bench adaptive``'s defaults
ADAPTIVE_SETTINGS: dict[str, object] = {
    "target_ms": None,
    "up_fraction": 0.7,
    "rates": (0.5, 1.0, 1.5, 2.0, 3.0),
    "duration_s": 8.0,
    "warmup_s": 2.0,
    "saturation_clients": 32,
    "max_batch": 32,
    "max_wait_ms": 5.0,
    "queue_size": 64,
    "open_connections": 160,
    "client_processes": 2,
    "database_size": 64,
    "k": 10,
    "timeout_s": 30.0,
    "seed": 0,
    "server_args": (),
}

#: the fields of ``raml.bench.serve.ServeBenchSettings()``: ``raml bench serve``'s defaults
SERVE_SETTINGS: dict[str, object] = {
    "concurrency": (1, 8, 32, 64),
    "duration_s": 10.0,
    "warmup_s": 2.0,
    "max_batch": 32,
    "max_wait_ms": 5.0,
    "num_classes": 60,
    "images_per_class": 16,
    "image_size": 64,
    "architecture": "resnet18",
    "whitening": 128,
    "database_size": 64,
    "query_size": 32,
    "k": 10,
    "rates": (0.25, 0.5, 0.8, 1.0, 1.5, 2.0),
    "open_connections": 256,
    "client_processes": 2,
    "queue_size": 64,
    "timeout_s": 30.0,
    "seed": 0,
    "http": "auto",
    "loop": "auto",
    "server_args": (),
}

#: the fields of ``raml.bench.resolutions.ResolutionSettings()`` but ``demo`` (the demo's defaults):
#: ``raml bench resolutions``' defaults
RESOLUTION_SETTINGS: dict[str, object] = {
    "out": Path("bench-resolutions"),
    "sizes": [24, 32, 48],
    "seeds": 3,
    "epochs": 4,
    "per_size_bn": True,
    "same_steps": True,
}

#: each name above -> (the module that defines it, its name there; ``()``: the default instance of that class,
#: compared field by field), for ``tests/cli/test_cli_startup.py``
SOURCES: dict[str, tuple[str, str]] = {
    "EVAL_PHASES": ("raml.bench.eval", "PHASES"),
    "METHOD_ROWS": ("raml.bench.methods", "ROWS"),
    "INDEX_TYPES": ("raml.deploy.faiss_index", "INDEX_TYPES"),
    "DEMO_THREADS": ("raml.demo", "DemoSettings().threads"),
    "RESIZE_BACKENDS": ("raml.data.views", "RESIZE_BACKENDS"),
    "ADAPTIVE_SETTINGS": ("raml.bench.adaptive", "AdaptiveBenchSettings()"),
    "SERVE_SETTINGS": ("raml.bench.serve", "ServeBenchSettings()"),
    "RESOLUTION_SETTINGS": ("raml.bench.resolutions", "ResolutionSettings()"),
}


def positive_int_list(example: str) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated positive integers (``example`` is shown when the value is not)."""

    def parse(value: str) -> tuple[int, ...]:
        try:
            items = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            items = ()
        if not items or min(items) < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers such as {example}, got {value!r}")
        return items

    return parse


def rate_list(value: str) -> tuple[float, ...]:
    """argparse type of ``raml bench serve --rates``: positive numbers, or ``none`` (no open-loop rows)."""
    if value.strip().lower() == "none":
        return ()
    try:
        rates = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        rates = ()
    if not rates or not all(r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"expected positive numbers such as 0.5,1,2 (or none), got {value!r}")
    return rates


def query_sizes(value: str) -> list[int]:
    """argparse type of ``raml bench query --sizes``: comma-separated sizes of at least 8 px."""
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated pixel sizes such as 224,448, got {value!r}"
        ) from error
    if not sizes or any(s < 8 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes of at least 8 px such as 224,448, got {value!r}"
        )
    return sizes


def index_types(value: str) -> list[str]:
    """argparse type of ``raml bench query --index-types``: known index types, or ``none`` (no index timed)."""
    if value.strip().lower() == "none":
        return []
    types = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [t for t in types if t not in INDEX_TYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown index types {unknown}; choose from {','.join(INDEX_TYPES)} (or 'none')"
        )
    return types


def adaptive_parser() -> argparse.ArgumentParser:
    """The ``raml bench adaptive`` argument parser."""
    d = ADAPTIVE_SETTINGS
    parser = argparse.ArgumentParser(
        prog="raml bench adaptive",
        description="raml serve at a fixed query size vs with --latency-target-ms (the size chosen per batch), "
        "open loop at multiples of the fixed server's saturation rate: p99, errors, 503s, the share answered at "
        "each size and the served mAP (share x that size's asymmetric mAP), with the demo's multi-size student.",
    )
    parser.add_argument(
        "--resolutions",
        type=Path,
        default=Path("bench-resolutions"),
        help="output folder of `raml bench resolutions` (its multi-size student, teacher and data; default "
        "bench-resolutions)",
    )
    parser.add_argument("--student", type=Path, help="a multi-size student checkpoint (instead of --resolutions')")
    parser.add_argument("--teacher", type=Path, help="its teacher checkpoint (instead of --resolutions')")
    parser.add_argument("--data-root", type=Path, help="folder holding the demo's synth/ data")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-adaptive"), help="index, server logs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny random networks and data, two 1-second rows per server (tests; overrides the load flags)",
    )
    parser.add_argument("--target-ms", type=float, help="the latency target T (default: 2x the fixed p99 at the "
                        "lowest rate)")  # fmt: skip
    rates: tuple[float, ...] = d["rates"]  # type: ignore[assignment]
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in rates), help="x saturation (0.5,1,1.5,2,3)")
    parser.add_argument(
        "--duration", type=float, default=d["duration_s"], help=f"seconds per row ({d['duration_s']:g})"
    )
    parser.add_argument(
        "--warmup", type=float, default=d["warmup_s"], help=f"warm-up seconds per row ({d['warmup_s']:g})"
    )
    parser.add_argument(
        "--max-batch", type=positive_int, default=d["max_batch"], help=f"both servers ({d['max_batch']})"
    )
    parser.add_argument(
        "--queue-size", type=positive_int, default=d["queue_size"], help=f"both servers ({d['queue_size']})"
    )
    parser.add_argument("--saturation-clients", type=positive_int, default=d["saturation_clients"])
    parser.add_argument("--client-processes", type=positive_int, default=d["client_processes"])
    parser.add_argument("--database-size", type=positive_int, default=d["database_size"], help="DR of the index (64)")
    parser.add_argument(
        "--lock",
        type=Path,
        metavar="FILE",
        help="hold an exclusive flock on FILE while the servers are loaded (not during the mAP evaluation and "
        "indexing), so that timed runs on a shared machine never overlap",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more raml serve argument for both servers (repeat; e.g. --server-arg=--eager)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also plot p99 and served mAP as a PNG")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    """The ``raml bench eval`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench eval",
        description="Time exact mAP/R@k evaluation (symmetric and asymmetric) against the bare all-vs-all "
        "similarity matmul (SOP-sized), in one run.",
    )
    parser.add_argument("--num-images", type=int, default=60502, help="embeddings (default: SOP test, 60502)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    parser.add_argument("--num-classes", type=int, default=11316, help="classes of 2..12 images (default 11316)")
    parser.add_argument("--seed", type=seed_int, default=0, help="data seed (default 0)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the phases N times, keep the best (default 1)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (default cpu; without CUDA it runs on the CPU and says so)"
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        default=list(EVAL_PHASES),
        metavar="PHASE",
        help=f"phases to run besides matmul (default: all of {' '.join(EVAL_PHASES)})",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    return parser


def extract_parser() -> argparse.ArgumentParser:
    """The ``raml bench extract`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench extract",
        description="Images/s of raml extract against the reference's loader and eager forward (same images, "
        "network, workers and threads), and the largest difference of their embeddings.",
    )
    parser.add_argument("--num-images", type=positive_int, default=64, help="synthetic JPEGs (default 64)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[448, 224], help="sizes (default 448 224)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    parser.add_argument(
        "--workers", type=workers_int, default=1, help="DataLoader worker processes, both sides (default 1)"
    )
    parser.add_argument("--threads", type=threads_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--bf16", action="store_true", help="also time raml with bfloat16 autocast")
    parser.add_argument(
        "--cpu-runtime",
        choices=CPU_RUNTIMES,
        default="auto",
        help="the forward of the raml row (default auto, raml extract's default)",
    )
    parser.add_argument("--architecture", default="resnet50", help="backbone (default resnet50, the paper's)")
    parser.add_argument("--seed", type=seed_int, default=0, help="images and weights seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def index_parser() -> argparse.ArgumentParser:
    """The ``raml bench index`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench index",
        description="Peak memory and images/s of raml index against the database size, single process vs Ray, "
        "in one run; and the faiss index build alone, in memory vs on disk.",
    )
    int_list = positive_int_list("2000,8000")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-index"), help="images, network, indexes")
    parser.add_argument("--sizes", type=int_list, default=(2000, 8000, 32000), help="database sizes")
    parser.add_argument("--engines", default="local,ray", help="engines compared (local,ray)")
    parser.add_argument("--image-size", type=positive_int, default=32, help="image side and DR (32)")
    parser.add_argument("--shard-size", type=positive_int, default=1024)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--ray-actors", type=positive_int, default=2)
    parser.add_argument("--architecture", default="test_resnet", help="backbone (default timm's tiny test_resnet)")
    parser.add_argument(
        "--build-sizes", type=int_list, default=(250_000, 1_000_000, 4_000_000), help="vectors of the build part"
    )
    parser.add_argument(
        "--parts", default="extraction,build", help="what to run: extraction (raml index), build (faiss, on disk)"
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.add_argument("--verbose", action="store_true")
    return parser


def methods_parser() -> argparse.ArgumentParser:
    """The ``raml bench methods`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench methods",
        description="Every distillation method and ablation with the same budget on the demo's synthetic data "
        "and teacher (trained once, cached in --out): methods.json, methods.md, methods.png.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-methods"), help="output folder (bench-methods)")
    parser.add_argument("--quick", action="store_true", help="a smaller dataset and teacher, 1 seed, 1 epoch")
    parser.add_argument("--seeds", type=positive_int, help="distillation seeds per method (3; --quick: 1)")
    parser.add_argument("--epochs", type=positive_int, help="distillation epochs of every method (5; --quick: 1)")
    parser.add_argument("--teacher-epochs", type=positive_int, help="teacher epochs (the demo's 15; --quick: 6)")
    parser.add_argument("--classes", type=positive_int, help="synthetic classes (the demo's 60; --quick: 20)")
    parser.add_argument("--images-per-class", type=positive_int, help="the demo's 16; --quick: 8")
    parser.add_argument("--architecture", help="teacher (and student) architecture (the demo's resnet18)")
    parser.add_argument("--threads", type=threads_int, help="torch intra-op threads (the demo's 2)")
    parser.add_argument("--pos-num", type=positive_int, help="views per image of the view-based methods (the demo's 4)")
    parser.add_argument(
        "--methods",
        type=lambda v: tuple(part.strip() for part in v.split(",") if part.strip()),
        help="comma-separated subset of the rows (default all: " + ", ".join(METHOD_ROWS) + ")",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default: the numbers are reproducible), cuda, auto")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def pipeline_parser() -> argparse.ArgumentParser:
    """The ``raml bench pipeline`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench pipeline",
        description="Coupled views per second of both distillation mixup modes vs the reference's approach.",
    )
    parser.add_argument("--image-size", type=int, default=224, help="QR, the student's resolution (224)")
    parser.add_argument("--teacher-image-size", type=int, default=448, help="DR, the teacher's resolution (448)")
    parser.add_argument("--pos-num", type=int, default=8, help="coupled views per image (8)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    parser.add_argument("--workers", type=workers_int, default=0, help="DataLoader workers (0 = main process)")
    parser.add_argument("--images", type=Path, default=None, help="folder of images (default: generated JPEGs)")
    parser.add_argument(
        "--num-synthetic",
        type=int,
        default=64,
        help="generated 500x375 JPEGs without --images (64: few partners repeat within an item, as on real data)",
    )
    parser.add_argument("--batches", type=int, default=10, help="batches timed per run of each of our modes (10)")
    parser.add_argument(
        "--baseline-batches",
        type=int,
        default=None,
        help="batches for the baseline (min(2, N) without workers; N with workers, where another count leaves "
        "the goals unmeasured)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each pipeline, best kept (1)")
    parser.add_argument(
        "--backend", choices=RESIZE_BACKENDS, default=None, help="resize backend of our modes (each mode's default)"
    )
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    return parser


def quantization_parser() -> argparse.ArgumentParser:
    """The ``raml bench quantization`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench quantization",
        description="fp32 vs int8 ONNX student x exact vs IVF-PQ teacher database: asymmetric mAP, R@1, query "
        "milliseconds per image on the CPU and bytes per database vector, in one run.",
    )
    parser.add_argument("--teacher-path", required=True, metavar="NETWORK", help="database network checkpoint")
    parser.add_argument("--student-path", required=True, metavar="NETWORK", help="query network checkpoint")
    parser.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding the datasets")
    parser.add_argument("--dataset", required=True, metavar="NAME", help="labelled test split, e.g. synth-test")
    parser.add_argument("--image-size", type=positive_int, required=True, metavar="QR", help="query size")
    parser.add_argument("--teacher-image-size", type=positive_int, required=True, metavar="DR", help="database size")
    parser.add_argument("--calibration-split", required=True, metavar="NAME", help="split of the calibration images")
    parser.add_argument("--calibration-images", type=positive_int, default=64, metavar="N", help="default 64")
    parser.add_argument("--nlist", type=positive_int, metavar="N", help="IVF cells of the ivfpq index")
    parser.add_argument(
        "--nprobe",
        type=lambda text: [positive_int(v) for v in text.split(",")],
        metavar="N[,N...]",
        help="IVF cells searched; several values give one set of rows each (default: the index's, nlist/8)",
    )
    parser.add_argument("--m", type=positive_int, metavar="M", help="PQ sub-quantisers")
    parser.add_argument("--nbits", type=positive_int, metavar="B", help="bits per PQ code")
    parser.add_argument("--k", type=positive_int, default=10, help="results per timed search (default 10)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed passes (median; default 20)")
    parser.add_argument(
        "--threads", type=threads_int, default=1, help="CPU threads of torch and onnxruntime (default 1: steadier)"
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="where exports and indexes are written")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table as Markdown")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def query_parser() -> argparse.ArgumentParser:
    """The ``raml bench query`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench query",
        description="Cost of a query: FLOPs, latency and throughput of the query network per resolution, and "
        "search time per query of each index type on a synthetic database.",
    )
    add_network_args(parser, "network", required=True)
    parser.add_argument("--not-pretrained", action="store_true", help="random weights for --network ARCH")
    parser.add_argument(
        "--pool", help="pooling for --network ARCH (default gem); for a checkpoint without meta, a hint"
    )
    parser.add_argument(
        "--whitening",
        type=int,
        help="whitening dimension for --network ARCH (default 512); for a checkpoint without meta, a hint",
    )
    parser.add_argument("--sizes", type=query_sizes, default=[224, 448], help="query resolutions (default 224,448)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="batch of the throughput figure (32)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed passes per figure (median; 5)")
    parser.add_argument("--database-size", type=positive_int, default=100_000, help="synthetic database size (100000)")
    parser.add_argument(
        "--index-types",
        type=index_types,
        default=list(INDEX_TYPES),
        help="comma-separated index types to time, or 'none' (default flat,ivf,hnsw,ivfpq)",
    )
    parser.add_argument("--queries", type=positive_int, default=100, help="single queries timed per index (100)")
    parser.add_argument("--k", type=positive_int, default=10, help="neighbours per query (10)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda:1', ...")
    parser.add_argument(
        "--threads", type=threads_int, help="CPU threads for torch and faiss (default: their own defaults)"
    )
    parser.add_argument("--data-root", default="data", help="folder holding networks/ for --network-path names")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH.png", help="also plot time against resolution")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def resolutions_parser() -> argparse.ArgumentParser:
    """The ``raml bench resolutions`` argument parser."""
    d = RESOLUTION_SETTINGS
    parser = argparse.ArgumentParser(
        prog="raml bench resolutions",
        description="One student for several query sizes against a dedicated student per size (same teacher, "
        "same total training budget) on the demo's synthetic data: resolutions.json, .md and .png in --out.",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run in seconds (tests): few images, 1 epoch")
    parser.add_argument(
        "--out", type=Path, default=d["out"], help=f"output folder; the teacher is cached there ({d['out']})"
    )
    parser.add_argument("--seeds", type=positive_int, help=f"student seeds (default {d['seeds']}; --quick 1)")
    parser.add_argument("--epochs", type=positive_int, help=f"epochs of each dedicated student (default {d['epochs']})")
    parser.add_argument(
        "--sizes", type=image_sizes_arg, help="query sizes, at least two (default 24,32,48; --quick 16,24)"
    )
    parser.add_argument(
        "--no-per-size-bn", action="store_true", help="skip the per-size BatchNorm statistics measurement"
    )
    parser.add_argument(
        "--no-same-steps",
        action="store_true",
        help="skip the second control: a dedicated student per size with the multi-size student's steps",
    )
    parser.add_argument(
        "--threads",
        type=threads_int,
        help=f"torch intra-op threads for the whole run (default {DEMO_THREADS})",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def serve_parser() -> argparse.ArgumentParser:
    """The ``raml bench serve`` argument parser."""
    d = SERVE_SETTINGS
    parser = argparse.ArgumentParser(
        prog="raml bench serve",
        description="The load curve of raml serve on loopback (closed loop at several client concurrencies, open "
        "loop at offered rates): queries/s, p50/p95/p99, errors, 503s, mean batch, with micro-batching and with "
        "--max-batch 1, on a demo-sized synthetic index; the client runs in separate processes and each row says "
        "whether it, not the server, was the limit.",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("bench-serve"), help="data, index, server logs")
    parser.add_argument(
        "--concurrency",
        type=positive_int_list("1,8,32"),
        default=d["concurrency"],
        help="clients (default 1,8,32,64)",
    )
    parser.add_argument("--duration", type=float, default=d["duration_s"], help="seconds measured per row (10)")
    parser.add_argument("--warmup", type=float, default=d["warmup_s"], help="seconds of warm-up per row (2)")
    parser.add_argument("--max-batch", type=positive_int, default=d["max_batch"], help="batched run's max (32)")
    parser.add_argument("--max-wait-ms", type=float, default=d["max_wait_ms"], help="batched run's wait (5)")
    parser.add_argument("--num-classes", type=positive_int, default=d["num_classes"], help="synthetic classes")
    parser.add_argument("--images-per-class", type=positive_int, default=d["images_per_class"])
    parser.add_argument("--architecture", default=d["architecture"], help="backbone of both networks")
    parser.add_argument("--whitening", type=positive_int, default=d["whitening"], help="embedding dimension")
    parser.add_argument("--query-size", type=positive_int, default=d["query_size"], help="QR (32)")
    parser.add_argument("--database-size", type=positive_int, default=d["database_size"], help="DR (64)")
    parser.add_argument(
        "--rates",
        type=rate_list,
        default=d["rates"],
        help="open-loop offered rates as multiples of the batched saturation rate (default 0.25,0.5,0.8,1,1.5,2; "
        "'none' for closed loop only)",
    )
    parser.add_argument(
        "--open-connections",
        type=positive_int,
        default=d["open_connections"],
        help="open loop: the most requests in flight (256; above --queue-size + --max-batch, or nothing is shed)",
    )
    parser.add_argument(
        "--client-processes", type=positive_int, default=d["client_processes"], help="client processes (2)"
    )
    parser.add_argument("--queue-size", type=positive_int, default=d["queue_size"], help="server's queue (64)")
    parser.add_argument("--http", choices=("auto", "httptools", "h11"), default=d["http"], help="server's --http")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default=d["loop"], help="server's --loop")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more raml serve argument for both servers (repeat; e.g. --server-arg=--max-decodes --server-arg=8)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also plot the open-loop curve as a PNG")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


#: benchmark name (``raml.cli.bench.BENCHMARKS``) -> its parser
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "eval": eval_parser,
    "extract": extract_parser,
    "methods": methods_parser,
    "pipeline": pipeline_parser,
    "resolutions": resolutions_parser,
    "query": query_parser,
    "quantization": quantization_parser,
    "index": index_parser,
    "serve": serve_parser,
    "adaptive": adaptive_parser,
}
