"""``raml extract``: embed a dataset split with a network and save the (N, D) embeddings as ``.npy``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from raml.cli.common import (
    add_bad_images_arg,
    add_runtime_args,
    device_from_args,
    positive_int,
    setup_logging,
    write_json,
)
from raml.cli.networks import add_network_args, network_from_args
from raml.data.check import apply_bad_image_policy
from raml.data.splits import get_split
from raml.distributed import init_distributed
from raml.retrieval.cache import EmbeddingCache
from raml.retrieval.extract import extract_embeddings_sharded
from raml.utils import atomic_numpy_save, file_sha256

logger = logging.getLogger("raml")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="embed a dataset split and save the embeddings",
        description=(
            "Embed every image of a split (rows in split order) and write them to --output as float32 .npy, "
            "with a JSON description (paths, labels, network, size) beside it. Embeddings of a checkpoint are "
            "cached under <data-root>/cache/embeddings, keyed by the checkpoint's content hash, the size and "
            "the split, so later runs (e.g. a teacher's database side) reuse them."
        ),
    )
    add_network_args(parser, "network", required=True)
    parser.add_argument("--dataset", required=True, metavar="NAME", help="split to embed, e.g. 'cub-test'")
    parser.add_argument("--image-size", type=positive_int, default=448, metavar="N", help="resolution (default 448)")
    parser.add_argument("--output", type=Path, required=True, metavar="FILE.npy", help="where to write")
    parser.add_argument("--pool", default="gem", help="pooling for a network built with --network ARCH")
    parser.add_argument("--not-pretrained", action="store_true", help="random weights with --network ARCH")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    add_bad_images_arg(parser)
    add_runtime_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    if args.output.suffix != ".npy":
        raise SystemExit(f"raml extract: --output must end in .npy, got {args.output}")
    # under torchrun every process embeds a share of the split; rank 0 writes the outputs
    dist, dist_device = init_distributed(args.device)
    device = dist_device or device_from_args(args)
    split, bad = apply_bad_image_policy(
        get_split(args.dataset, args.data_root), args.bad_images, workers=max(1, args.workers)
    )
    network, checkpoint = network_from_args(
        args.network_path,
        args.network,
        args.data_root,
        device,
        pooling=args.pool,
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
        )

    sha = file_sha256(checkpoint) if checkpoint is not None else None
    if sha is not None and not args.no_cache:
        cache = EmbeddingCache(Path(args.data_root) / "cache" / "embeddings")
        embeddings = cache.get_or_compute(sha, args.image_size, split.name, list(split.paths), compute)
    else:
        embeddings = compute()
    if not dist.is_main:
        return 0
    atomic_numpy_save(embeddings.numpy(), args.output)
    write_json(
        args.output.with_suffix(".json"),
        {
            "embeddings": args.output.name,
            "split": split.name,
            "root": str(split.root),
            "image_size": args.image_size,
            "network": str(checkpoint) if checkpoint is not None else args.network,
            "network_sha256": sha,
            "shape": list(embeddings.shape),
            "paths": list(split.paths),
            "labels": list(split.labels),
            "skipped_images": [{"path": b.path, "reason": b.reason} for b in bad],
        },
    )
    logger.info("Wrote %s embeddings of %s to %s", tuple(embeddings.shape), split.name, args.output)
    return 0
