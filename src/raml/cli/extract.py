"""``raml extract``: embed a dataset split with a network and save the (N, D) embeddings as ``.npy``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from raml.cli.common import (
    add_bad_images_arg,
    check_output_files,
    devices_from_gpu_id,
    positive_int,
    setup_logging,
)
from raml.cli.networks import add_model_hint_args, add_multiscale_arg, add_runtime_args, check_multiscale_size
from raml.engine.config import RUN_CONFIG_NAME
from raml.engine.val_ratio import default_val_ratio, resolve_val_ratio, valid_val_ratio
from raml.entry import add_network_args, dataset_inputs, network_from_args, network_inputs
from raml.retrieval.scales import CPU_RUNTIMES

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger("raml")


def add_cpu_runtime_arg(parser: argparse.ArgumentParser) -> None:
    """``--cpu-runtime {auto,onnxruntime,torch}``: how the fp32 forward runs on the CPU (``raml extract``,
    ``raml test``, ``raml index``)."""
    parser.add_argument(
        "--cpu-runtime",
        choices=CPU_RUNTIMES,
        default="auto",
        help="how the fp32 forward runs on the CPU: auto (default): onnxruntime (~2x faster on this project's CPU; "
        "the export costs seconds per size) for a job of at least 64 images at 224 px (or as many pixels) once a "
        "check on its first images shows the network's embeddings within 1e-4, else PyTorch; onnxruntime: for "
        "every job, an error instead of the fallback; torch: PyTorch's eager forward. A GPU always runs PyTorch.",
    )


def _val_ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not valid_val_ratio(ratio):
        raise argparse.ArgumentTypeError(f"expected a share of the training classes in [0, 1), got {value!r}")
    return ratio


def add_val_ratio_arg(parser: argparse.ArgumentParser) -> None:
    """``--val-ratio R`` of ``raml test`` and ``raml extract``; see :func:`raml.engine.val_ratio.resolve_val_ratio`."""
    parser.add_argument(
        "--val-ratio",
        type=_val_ratio,
        metavar="R",
        help="share of the training classes held out as validation classes (the -val, -train and -trainval "
        "parts of cub, cars, sop and synth; split files and folder layouts define their own). Default: the "
        "val_ratio the checkpoint's training recorded (in the checkpoint itself; for an older checkpoint in the "
        f"{RUN_CONFIG_NAME} beside it), else "
        f"{default_val_ratio()}; a value that differs from the recorded one is used, with a warning",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``raml extract``: the reference's ``extract_features.py`` flags where they apply, one split per call."""
    parser = subparsers.add_parser(
        "extract",
        description=(
            "Embed every image of a split (rows in split order) and write them to --output as float32 .npy, "
            "with a JSON description (paths, labels, network, size, scales) beside it. Embeddings of a checkpoint "
            "are cached under <data-root>/cache/embeddings, keyed by the checkpoint's content hash, the network's "
            "configuration as loaded (pooling, whitening, ...: --pool/--whitening for a checkpoint without meta), "
            "the size, the scales, the split and each image's size and modification time, so later runs (e.g. a "
            "teacher's database side) reuse them."
        ),
    )
    add_network_args(parser, "network", required=True, path_short="-npath")
    add_model_hint_args(parser)
    parser.add_argument("--dataset", required=True, metavar="NAME", help="split to embed, e.g. 'cub-test'")
    parser.add_argument(
        "-imsize",
        "--image-size",
        type=positive_int,
        default=448,
        metavar="N",
        help="resolution (default 448)",
    )
    add_multiscale_arg(parser)
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="FILE.npy",
        help="where to write the embeddings; their description goes to FILE.json beside it",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing FILE.npy / FILE.json (refused otherwise, before any work)",
    )
    parser.add_argument("--not-pretrained", action="store_true", help="random weights with --network ARCH")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="opt-in: the forward in bfloat16 autocast (fast only on CPUs with AVX-512 BF16 or AMX, or a GPU with "
        "bf16); off by default, the paper's numbers are fp32; bf16 embeddings are not cached",
    )
    add_val_ratio_arg(parser)
    add_cpu_runtime_arg(parser)
    add_bad_images_arg(parser)
    add_runtime_args(parser, gpu_help="GPU id the network runs on (the first when several are listed; default: '0')")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raml.data.check import apply_bad_image_policy
    from raml.data.splits import get_split
    from raml.distributed import init_distributed
    from raml.retrieval.cache import EmbeddingCache
    from raml.retrieval.extract import extract_embeddings_sharded, multiscale_power
    from raml.utils import file_sha256

    setup_logging(args.verbose)
    if args.output.suffix != ".npy":
        raise SystemExit(f"raml extract: --output must end in .npy, got {args.output}")
    check_multiscale_size("raml extract", args.multiscale, args.image_size)
    # every output is checked before any work: a bad path fails now, not after the embedding; never an input
    sidecar = args.output.with_suffix(".json")
    inputs = [
        *network_inputs("--network-path", args.network_path, args.data_root),
        *dataset_inputs("--dataset", args.dataset, args.data_root),
    ]
    check_output_files(
        [("--output", args.output, args.overwrite), ("--output's sidecar", sidecar, args.overwrite)], inputs
    )
    # under torchrun every process embeds a share of the split; rank 0 writes the outputs
    dist, dist_device = init_distributed(args.device)
    device = dist_device or devices_from_gpu_id(args.gpu_id, args.device)[0]
    split, bad = apply_bad_image_policy(
        get_split(args.dataset, args.data_root, resolve_val_ratio(args.val_ratio, [args.network_path], "raml extract")),
        args.bad_images,
        workers=max(1, args.workers),
        image_size=args.image_size,
    )
    network, checkpoint = network_from_args(
        args.network_path,
        args.network,
        args.data_root,
        device,
        pooling=args.pool,
        whitening=args.whitening,
        pretrained=not args.not_pretrained,
    )
    paths = [str(p) for p in split.abspaths()]

    def compute():
        return extract_embeddings_sharded(
            network,
            paths,
            args.image_size,
            device,
            dist,
            args.batch_size,
            args.workers,
            progress=not args.no_progress,
            description=f"{split.name}@{args.image_size}",
            scales=args.multiscale,
            precision="bf16" if args.bf16 else "fp32",
            runtime=args.cpu_runtime,
        )

    sha = file_sha256(checkpoint) if checkpoint is not None else None
    if sha is not None and not args.no_cache and not args.bf16:
        cache = EmbeddingCache(Path(args.data_root) / "cache" / "embeddings")
        embeddings = cache.get_or_compute(
            sha,
            args.image_size,
            split.name,
            list(split.paths),
            compute,
            network_meta=network.meta,
            root=split.root,
            scales=args.multiscale,
            content_hash=args.hash_images,
        )
    else:
        embeddings = compute()
    if not dist.is_main:
        return 0
    description = {
        "embeddings": args.output.name,
        "split": split.name,
        "root": str(split.root),
        "image_size": args.image_size,
        "multiscale": list(args.multiscale),
        "multiscale_power": multiscale_power(network, args.multiscale),
        "precision": "bf16" if args.bf16 else "fp32",
        "network": str(checkpoint) if checkpoint is not None else args.network,
        "network_sha256": sha,
        "shape": list(embeddings.shape),
        "paths": list(split.paths),
        "labels": list(split.labels),
        "skipped_images": [{"path": b.path, "reason": b.reason} for b in bad],
    }
    write_pair(embeddings.numpy(), description, args.output, sidecar)
    logger.info("Wrote %s embeddings of %s to %s", tuple(embeddings.shape), split.name, args.output)
    return 0


def write_pair(array: np.ndarray, description: dict, output: Path, sidecar: Path) -> None:
    """Write the embeddings and their sidecar, each atomically: both are written in full to temporary files
    first, then the sidecar is renamed into place and the ``.npy`` last. A failure while writing leaves the
    previous pair as it was, and a new ``.npy`` never sits beside an old sidecar."""
    import numpy as np

    from raml.utils import atomic_path

    with atomic_path(output) as npy_tmp, atomic_path(sidecar) as json_tmp:
        with open(npy_tmp, "wb") as f:
            np.save(f, array)
        json_tmp.write_text(json.dumps(description, indent=2, sort_keys=False) + "\n")
    logger.debug("Wrote %s and %s", sidecar, output)
