"""``raml data synth``: write the built-in synthetic fine-grained dataset (CUB-200-2011 format).
``raml data download``: fetch CUB-200-2011, Cars196 or SOP, unpack, verify (see ``raml.data.download``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from raml.cli.common import default_workers, positive_int, setup_logging
from raml.entry import non_negative_int

logger = logging.getLogger("raml")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data")
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    synth = commands.add_parser(
        "synth",
        help="generate the synthetic fine-grained dataset",
        description="Write a deterministic synthetic dataset in the CUB-200-2011 on-disk format; load it as "
        "'synth', 'synth-val', 'synth-test' with --data-root set to the folder above --out "
        "(when --out ends in /synth). See docs/synthetic_data.md.",
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder, e.g. data/synth")
    synth.add_argument("--classes", type=_at_most(MAX_SYNTH_CLASSES), default=None, help="number of classes (even)")
    synth.add_argument("--images-per-class", type=_at_most(MAX_SYNTH_IMAGES_PER_CLASS), default=None, metavar="N")
    synth.add_argument("--size", type=_at_most(MAX_SYNTH_SIZE), default=None, metavar="PX", help="image side in pixels")
    synth.add_argument("--seed", type=non_negative_int, default=0)
    synth.add_argument(
        "--force",
        action="store_true",
        help="write into an --out folder that already holds files (the dataset's index files are replaced and its "
        "images mixed with those already there)",
    )
    synth.set_defaults(func=run_synth)
    _add_download_parser(commands)


#: bounds of ``raml data synth``'s sizes: far above any use (CUB has 200 classes of ~60 images, SOP 22,634 classes),
#: below what would exhaust the memory before the first image is written (10^20 classes hung the command)
MAX_SYNTH_CLASSES = 100_000
MAX_SYNTH_IMAGES_PER_CLASS = 10_000
MAX_SYNTH_SIZE = 4096


def _at_most(limit: int):  # noqa: ANN202 - an argparse type
    def parse(value: str) -> int:
        number = positive_int(value)
        if number > limit:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {limit}, got {value}")
        return number

    return parse


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return number


def _add_download_parser(commands: argparse._SubParsersAction) -> None:
    from raml.data.archives import MAX_UNPACK_RATIO
    from raml.data.download import DOWNLOADS_DIR, MIRROR_ENV, SOURCE_FILE
    from raml.data.sources import SOURCES

    files = "; ".join(f"{s.name}: {', '.join(f.name for f in s.files)}" for s in SOURCES.values())
    download = commands.add_parser(
        "download",
        help="download, unpack and verify CUB-200-2011, Cars196 or SOP",
        description=f"Fetch the published files of each dataset ({files}) into <data-root>/{DOWNLOADS_DIR}/ "
        "(resumable: an interrupted transfer continues where it stopped), unpack them safely into "
        "<data-root>/<name> in the layout of the README's commands, check every image the dataset's index "
        f"files list, and record each file's URL, size, SHA-256 and date in <data-root>/<name>/{SOURCE_FILE}. "
        "Each file is first compared with the MD5 published for it (pinned in raml); a file that differs is refused "
        "before anything is unpacked (--no-verify-digest to accept it). "
        "A dataset already in place is left alone. On any error no partial dataset folder is left. Archive members "
        "other than regular files and folders (links, devices) are refused, and so are archives that unpack past "
        "the free space or --max-unpack-ratio; see 'Security' in docs/deployment.md.",
    )
    download.add_argument("datasets", nargs="+", choices=list(SOURCES), metavar="NAME", help="cub, cars and/or sop")
    download.add_argument("--data-root", type=Path, default=Path("data"), metavar="DATA_DIR", help="default: data")
    download.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="FILE=URL",
        help="fetch the file FILE (its official name, e.g. CUB_200_2011.tgz) from URL instead (repeatable); "
        f"a mirror holding all files: set {MIRROR_ENV}=BASE_URL (then <BASE_URL>/<FILE>)",
    )
    download.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds of silence (default 60)")
    download.add_argument("--retries", type=positive_int, default=5, metavar="N", help="attempts per file (default 5)")
    download.add_argument(
        "--retry-wait",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds before the second attempt, doubled for each further one up to 60 (default 2)",
    )
    download.add_argument(
        "--keep-archives",
        action="store_true",
        help=f"keep the files raml downloads in <data-root>/{DOWNLOADS_DIR}/ (files placed there by hand are "
        "never deleted)",
    )
    download.add_argument(
        "--max-unpack-ratio",
        type=_positive_float,
        default=MAX_UNPACK_RATIO,
        metavar="R",
        help=f"refuse an archive whose members hold more than R times its size (a decompression bomb; default "
        f"{MAX_UNPACK_RATIO:g}; JPEG photos barely compress)",
    )
    download.add_argument(
        "--force", action="store_true", help="download again and replace an existing dataset folder once verified"
    )
    download.add_argument(
        "--no-verify-digest",
        action="store_true",
        help="use a file whose digest differs from the published one pinned in raml (a warning is logged) instead "
        "of refusing it; only for a file that differs on purpose and comes from a source you trust",
    )
    download.add_argument(
        "--workers", type=positive_int, default=default_workers(), metavar="N", help="threads checking images"
    )
    download.add_argument("--no-progress", action="store_true", help="hide progress bars")
    download.add_argument("--verbose", action="store_true", help="debug logging")
    download.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    from raml.data.archives import ArchiveError
    from raml.data.download import (
        MIRROR_ENV,
        DownloadSettings,
        InsufficientSpaceError,
        install_dataset,
        parse_url_overrides,
    )
    from raml.data.sources import IncompleteDatasetError, get_source
    from raml.models.backbones import DownloadError

    setup_logging(args.verbose)
    sources = [get_source(name) for name in dict.fromkeys(args.datasets)]
    overrides = parse_url_overrides(args.url, sources)
    settings = DownloadSettings(
        timeout=args.timeout, attempts=args.retries, retry_wait=args.retry_wait, progress=not args.no_progress
    )
    mirror = os.environ.get(MIRROR_ENV) or None
    for source in sources:
        try:
            report = install_dataset(
                source.name,
                args.data_root,
                overrides=overrides,
                mirror=mirror,
                settings=settings,
                keep_archives=args.keep_archives,
                force=args.force,
                workers=args.workers,
                max_unpack_ratio=args.max_unpack_ratio,
                skip_digest=args.no_verify_digest,
            )
        except (DownloadError, InsufficientSpaceError, ArchiveError, IncompleteDatasetError) as error:
            print(f"raml data download: error: {error}", file=sys.stderr)
            return 2
        print(report.message, flush=True)
        for record in report.files if report.installed else []:
            origin = f"from {record['url']}" if record.get("url") else str(record.get("obtained"))
            pinned = record.get("pinned_digest")
            check = (
                "not pinned"
                if not isinstance(pinned, dict)
                else f"{pinned['algorithm']} matches the published digest"
                if pinned.get("matched")
                else f"{pinned['algorithm']} DIFFERS from the published digest (--no-verify-digest)"
            )
            print(f"  {record['file']}: {record['size']} bytes, sha256 {record['sha256']}, {check}, {origin}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from raml.data.synth import generate_synthetic_dataset

    setup_logging(False)
    options = {
        "num_classes": args.classes,
        "images_per_class": args.images_per_class,
        "image_size": args.size,
    }
    kwargs = {k: v for k, v in options.items() if v is not None}
    out_dir: Path = args.out
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; expected a folder for the dataset (made if missing).")
    if out_dir.is_dir() and not args.force:
        held = sorted(entry.name for entry in out_dir.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise ValueError(
                f"--out {out_dir} already holds {len(held)} entries ({shown}); raml data synth writes images.txt, "
                "classes.txt, image_class_labels.txt, train_test_split.txt and images/ there, replacing a "
                "dataset's index files and mixing its images with the ones already there. Nothing was written. "
                "Choose an empty or new folder, or pass --force to write over it."
            )
    out = generate_synthetic_dataset(out_dir, seed=args.seed, progress=True, **kwargs)
    logger.info("Wrote the synthetic dataset to %s", out)
    return 0
