"""Flags and conversions shared by several commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from raml.utils import atomic_write_text, select_device

logger = logging.getLogger("raml")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced, e.g. by tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; the library only uses module loggers."""
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def default_workers() -> int:
    """The reference uses 8 loader workers; never more than the cores this machine has."""
    return min(8, os.cpu_count() or 1)


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding the datasets")
    group.add_argument(
        "--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    )
    group.add_argument("--workers", type=int, default=default_workers(), metavar="N", help="data loader workers")
    group.add_argument("--batch-size", type=int, default=batch_size, metavar="N", help="images per batch")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group.add_argument("--verbose", action="store_true", help="debug logging")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def optional_comma_list(value: str) -> list[str]:
    """Comma-separated names; an empty string gives an empty list."""
    return [item.strip() for item in value.split(",") if item.strip()]


def comma_list(value: str) -> list[str]:
    items = optional_comma_list(value)
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as 'cub-test,cars-test'")
    return items


def device_from_args(args: argparse.Namespace) -> torch.device:
    try:
        return select_device(args.device)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"raml: error: {error}") from error


def write_json(path: str | Path, payload: object) -> None:
    """Write JSON atomically (a temp file renamed into place)."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    logger.info("Wrote %s", path)


def add_bad_images_arg(parser: argparse.ArgumentParser, default: str | None = "error") -> None:
    """``--bad-images {error,skip}``: what to do with images that cannot be read (see raml.data.check)."""
    parser.add_argument(
        "--bad-images",
        choices=("error", "skip"),
        default=default,
        help="unreadable images: stop with the list of files (error, default) or leave them out (skip)",
    )
