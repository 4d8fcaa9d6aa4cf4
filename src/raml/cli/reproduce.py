"""``raml reproduce {cub,cars,sop}``: the paper's table row for one dataset (see ``raml.reproduce``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from raml.cli.choices import REPRODUCE_DATASETS
from raml.cli.common import (
    check_output_files,
    default_workers,
    device_from_args,
    positive_int,
    setup_logging,
    workers_int,
)

logger = logging.getLogger("raml")

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
"""The ``configs/`` folder of a source checkout, used when ``configs/<name>.yaml`` is not in the working folder."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        description="Test the published teacher (symmetric, at DR) and the published student (asymmetric against "
        "the teacher's database, and symmetric), distil a student with the dataset's config (the paper's "
        "hyper-parameters), test it, and write <out>/reproduce.md and reproduce.json: one row per network with "
        "asym/sym mAP and R@1, the paper's numbers beside them and the difference, the wall time and the device. "
        "Run it again to continue an interrupted distillation; the teacher's embeddings are cached. A rough "
        "duration estimate for the device comes first.",
    )
    parser.add_argument("dataset", choices=list(REPRODUCE_DATASETS), help="cub, cars or sop")
    parser.add_argument("--data-root", type=Path, default=Path("data"), metavar="DATA_DIR", help="default: data")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="reports and the distillation (default: exp/reproduce-<dataset>)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.yaml",
        help="the distillation's settings (default: configs/<dataset>.yaml, from the working folder or the checkout)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        metavar="N",
        help="shorten the distillation to N epochs (a smoke run; the report says so)",
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=None, metavar="QR", help="query size (default: the config's, 224)"
    )
    parser.add_argument(
        "--teacher-image-size",
        type=positive_int,
        default=None,
        metavar="DR",
        help="database size (default: the config's, 448)",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per test batch")
    parser.add_argument(
        "--workers",
        type=workers_int,
        default=default_workers(),
        metavar="N",
        help="data loader workers (default: up to 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(func=run)


def resolve_config(path: Path | None, dataset: str) -> Path:
    """``--config``, or ``configs/<dataset>.yaml`` in the working folder, else in the source checkout."""
    if path is not None:
        return path
    for candidate in (Path("configs") / f"{dataset}.yaml", CHECKOUT_CONFIGS / f"{dataset}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"No configs/{dataset}.yaml in the working folder or in {CHECKOUT_CONFIGS}; pass --config FILE.yaml "
        "(the settings of 'raml train --config')."
    )


def run(args: argparse.Namespace) -> int:
    from raml.reproduce import ReproduceOptions, run_reproduction

    setup_logging(args.verbose)
    out = args.out if args.out is not None else Path("exp") / f"reproduce-{args.dataset}"
    # the reports are rewritten after every step: a bad --out fails now, not after the first test
    check_output_files([(f"--out's {name}", out / name, None) for name in ("reproduce.json", "reproduce.md")])
    options = ReproduceOptions(
        dataset=args.dataset,
        data_root=args.data_root,
        out=out,
        config=resolve_config(args.config, args.dataset),
        device=device_from_args(args),
        epochs=args.epochs,
        image_size=args.image_size,
        teacher_image_size=args.teacher_image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
    )
    report = run_reproduction(options, notify=lambda message: print(message, flush=True))
    print((options.out / "reproduce.md").read_text())
    logger.info(
        "Wrote %s and %s (wall time %.0f s)",
        options.out / "reproduce.md",
        options.out / "reproduce.json",
        report.wall_time_s,
    )
    return 0
