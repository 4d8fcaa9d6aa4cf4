"""``raml data synth``: write the built-in synthetic fine-grained dataset (CUB-200-2011 format)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from raml.cli.common import positive_int, setup_logging

logger = logging.getLogger("raml")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="dataset utilities (synth)")
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    synth = commands.add_parser(
        "synth",
        help="generate the synthetic fine-grained dataset",
        description="Write a deterministic synthetic dataset in the CUB-200-2011 on-disk format; load it as "
        "'synth', 'synth-val', 'synth-test' with --data-root set to the folder above --out "
        "(when --out ends in /synth). See docs/synthetic_data.md.",
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder, e.g. data/synth")
    synth.add_argument("--classes", type=positive_int, default=None, help="number of classes (even)")
    synth.add_argument("--images-per-class", type=positive_int, default=None, metavar="N")
    synth.add_argument("--size", type=positive_int, default=None, metavar="PX", help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from raml.data.synth import generate_synthetic_dataset

    setup_logging(False)
    options = {
        "num_classes": args.classes,
        "images_per_class": args.images_per_class,
        "image_size": args.size,
    }
    kwargs = {k: v for k, v in options.items() if v is not None}
    try:
        out = generate_synthetic_dataset(args.out, seed=args.seed, progress=True, **kwargs)
    except ValueError as error:
        raise SystemExit(f"raml data synth: error: {error}") from error
    logger.info("Wrote the synthetic dataset to %s", out)
    return 0
