"""``raml check-data``: find the bad image files of dataset splits before a long run trips over them."""

from __future__ import annotations

import argparse
import logging

from raml.cli.common import (
    check_output_files,
    comma_list,
    default_workers,
    positive_int,
    setup_logging,
    write_json,
)
from raml.entry import dataset_inputs

logger = logging.getLogger("raml")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-data",
        description=(
            "Check every image of the named splits and print each bad file with the reason, then one summary "
            "line per split. The default fast check reads headers and the structure of each file (missing, empty "
            "or non-image files, unsupported modes, truncated JPEG/PNG/BMP/GIF/WebP; images of other formats are "
            "decoded); --full-decode also decodes every "
            "image. Exit status 1 if any image is bad, 0 otherwise. To train anyway, pass "
            "'--bad-images skip' to raml train."
        ),
    )
    parser.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding the datasets")
    parser.add_argument(
        "--datasets",
        type=comma_list,
        required=True,
        metavar="NAMES",
        help="comma-separated split names, e.g. 'cub,cub-val,cub-test' or 'mine/split.json:test'",
    )
    parser.add_argument("--val-ratio", type=float, default=0.5, help="share of training classes held out as val")
    parser.add_argument("--full-decode", action="store_true", help="also decode every image (slower, thorough)")
    parser.add_argument(
        "--workers", type=positive_int, default=default_workers(), metavar="N", help="threads checking files"
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="also report images the evaluation transform would resize to too many pixels at size N (an extreme "
        "aspect ratio); give the largest size the run uses, e.g. the teacher's --teacher-image-size "
        "(default: not checked)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help='write {split: [{"path", "reason"}, ...]}')
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(func=run)


def _trainval_name(name: str) -> str | None:
    """The ``trainval`` split name of a bare dataset name (``cub`` -> ``cub-trainval``, ``mine.json`` ->
    ``mine.json:trainval``): the split ``raml train -d NAME`` trains on; None for a name that selects a part."""
    from raml.data.splits import SPLIT_SUFFIXES

    if name.endswith(".json"):
        return f"{name}:trainval"
    if ":" in name:  # split.json:PART
        return None
    base, sep, suffix = name.rpartition("-")
    if sep and base and suffix in SPLIT_SUFFIXES:
        return None
    return f"{name}-trainval"


def run(args: argparse.Namespace) -> int:
    from raml.data.check import printable, scan_split
    from raml.data.splits import get_split

    setup_logging(args.verbose)
    if args.json is not None:  # before the scan, which may take minutes; never into a dataset it reads
        inputs = [source for name in args.datasets for source in dataset_inputs("--datasets", name, args.data_root)]
        check_output_files([("--json", args.json, None)], inputs)
    splits = [get_split(name, args.data_root, args.val_ratio) for name in args.datasets]  # fail early on names
    for name in args.datasets:
        trainval = _trainval_name(name)
        if trainval is not None and trainval not in args.datasets:
            logger.info(
                "%r is the train part of the dataset only, without its val classes; `raml train -d %s` trains on "
                "%s (train + val classes): check %r too, or instead, to cover every image the run reads",
                name,
                name,
                trainval,
                trainval,
            )
    report: dict[str, list[dict[str, str]]] = {}
    summary: list[str] = []
    for split in splits:
        bad = scan_split(
            split,
            full_decode=args.full_decode,
            workers=args.workers,
            progress=not args.no_progress,
            image_size=args.image_size,
        )
        for b in bad:
            # a file name that is not valid UTF-8 is printed with backslash escapes (a strict stdout would fail)
            print(printable(f"{split.name}: {split.root / b.path}: {b.reason}"), flush=True)
        report[split.name] = [{"path": b.path, "reason": b.reason} for b in bad]
        summary.append(f"{split.name}: {len(split)} images, {len(bad)} bad")
    print("\n".join(summary))
    if not args.full_decode:
        print("(fast check of headers and file ends; add --full-decode to decode every image)")
    if args.json is not None:
        write_json(args.json, report)
    return 1 if any(report.values()) else 0
