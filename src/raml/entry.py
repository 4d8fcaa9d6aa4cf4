"""Helpers every entry point shares: ``raml``'s commands (:mod:`raml.cli`) and the benchmarks' ``main``
functions (:mod:`raml.bench`). Logging set-up, JSON output, and argparse value types.

Not part of the CLI: a benchmark may use these without importing :mod:`raml.cli` (which sits above every
other package, see README's Layout and ``tests/test_layering.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from raml.utils import atomic_write_text

logger = logging.getLogger("raml")

__all__ = ["image_sizes_arg", "positive_int", "setup_logging", "write_json"]


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


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def image_sizes_arg(value: str) -> int | list[int]:
    """``--image-size 32`` -> ``32``; ``--image-size 24,32,48`` -> ``[24, 32, 48]`` (several query sizes; see
    :func:`raml.data.sizes.parse_image_sizes`)."""
    from raml.data.sizes import parse_image_sizes

    try:
        sizes = parse_image_sizes(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return sizes if len(sizes) > 1 else sizes[0]


def write_json(path: str | Path, payload: object) -> None:
    """Write JSON atomically (a temp file renamed into place)."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    logger.info("Wrote %s", path)
