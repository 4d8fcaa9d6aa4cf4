"""``raml bench <what>``: benchmarks that measure against a baseline timed in the same run."""

from __future__ import annotations

import argparse
import importlib

#: sub-benchmark -> module with ``main(argv) -> int``
BENCHMARKS = {
    "eval": ("raml.bench.eval", "retrieval evaluation vs the bare similarity matmul (SOP-sized)"),
    "extract": ("raml.bench.extract", "raml extract's images/s vs the reference's loader, same embeddings"),
    "methods": ("raml.bench.methods", "every distillation method and ablation side by side on the demo's data"),
    "pipeline": ("raml.bench.pipeline", "coupled-view data pipeline vs the reference's per-view decoding"),
    "resolutions": ("raml.bench.resolutions", "one student for several query sizes vs a dedicated student per size"),
    "query": ("raml.bench.query", "query cost per resolution (FLOPs, latency, throughput) and search time per index"),
    "quantization": ("raml.bench.quantization", "fp32 vs int8 ONNX student x exact vs IVF-PQ database: mAP, ms, bytes"),
    "index": ("raml.bench.index", "raml index: peak memory and images/s vs database size, single process vs Ray"),
    "serve": ("raml.bench.serve", "raml serve's queries/s and latency under concurrent clients, batched vs not"),
    "adaptive": ("raml.bench.adaptive", "raml serve at a fixed query size vs --latency-target-ms: p99, 503s, mAP"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        description="Run a benchmark; flags after the benchmark's name go to it (see raml bench NAME -h).",
    )
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="flags of that benchmark")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raml.bench.parsers import PARSERS

    # the benchmark's own parser first (torch-free): `raml bench NAME -h` and its usage errors exit here, before
    # the benchmark's module imports torch and the library; its main then parses the same flags again
    PARSERS[args.benchmark]().parse_args(args.rest)
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    return int(module.main(args.rest) or 0)
