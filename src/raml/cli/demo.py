"""``raml demo``: the paper's story on built-in synthetic data, on a CPU, in minutes (``make demo``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from raml.cli.choices import DEMO_SETTINGS
from raml.cli.common import (
    MAX_THREADS,
    MAX_WORKERS,
    bounded_int,
    check_output_files,
    device_from_args,
    positive_int,
    seed_int,
    setup_logging,
    threads_int,
    workers_int,
)
from raml.cli.data import MAX_SYNTH_CLASSES, MAX_SYNTH_IMAGES_PER_CLASS

logger = logging.getLogger("raml")


#: the files ``raml demo`` writes into --out
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = argparse.Namespace(**DEMO_SETTINGS)  # DemoSettings()'s fields, without importing the demo
    parser = subparsers.add_parser(
        "demo",
        description="Generate a synthetic fine-grained dataset, train a teacher at DR from random weights, "
        "distil a student at QR = DR/2 without labels, and compare five retrieval settings by accuracy and "
        "query cost. Writes results.json, results.md, settings.json, tradeoff.png and gallery.png (held-out "
        "queries with their top-5, teacher vs student) into --out, all at the end (results.json last). On a CPU "
        "a run with the same seed, --threads and software stack (recorded in results.json) gives the same "
        "numbers, timings aside.",
    )
    parser.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    parser.add_argument(
        "--classes",
        type=bounded_int(1, MAX_SYNTH_CLASSES),
        default=d.num_classes,
        help=f"number of classes (even, 4 to {MAX_SYNTH_CLASSES:,})",
    )
    parser.add_argument(
        "--images-per-class",
        type=bounded_int(1, MAX_SYNTH_IMAGES_PER_CLASS),
        default=d.images_per_class,
        metavar="N",
        help=f"images per class (2 to {MAX_SYNTH_IMAGES_PER_CLASS:,})",
    )
    parser.add_argument("--teacher-epochs", type=positive_int, default=d.teacher_epochs, metavar="N")
    parser.add_argument("--student-epochs", type=positive_int, default=d.student_epochs, metavar="N")
    parser.add_argument("--architecture", default=d.architecture, help="backbone of both networks")
    parser.add_argument("--seed", type=seed_int, default=d.seed, help=f"0 to 2**63 - 1 (default {d.seed})")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument(
        "--workers", type=workers_int, default=d.workers, metavar="N", help=f"data loader workers (0 to {MAX_WORKERS})"
    )
    parser.add_argument(
        "--threads",
        type=threads_int,
        default=d.threads,
        metavar="N",
        help=f"torch intra-op threads, 1 to {MAX_THREADS} (default {d.threads}); the numbers are reproducible for "
        "the same count",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raml.demo import RESULT_FILES, DemoSettings, run_demo, summary

    setup_logging(args.verbose)
    # the results are written at the end: a bad --out fails now, not after the training
    check_output_files([(f"--out's {name}", args.out / name, None) for name in RESULT_FILES])
    for noisy in ("raml.models.checkpoints", "raml.retrieval.cache"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = DemoSettings(
        out=args.out,
        num_classes=args.classes,
        images_per_class=args.images_per_class,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        architecture=args.architecture,
        seed=args.seed,
        workers=args.workers,
        threads=args.threads,
    )
    rows = run_demo(settings, device_from_args(args), progress=not args.no_progress)
    print((args.out / "results.md").read_text())
    logger.info("%s", summary(rows))
    written = [args.out / name for name in RESULT_FILES]
    logger.info("Wrote %s", ", ".join(str(path) for path in written))
    return 0
