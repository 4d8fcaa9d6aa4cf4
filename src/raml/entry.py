"""Helpers every entry point shares: ``raml``'s commands (:mod:`raml.cli`) and the benchmarks' ``main``
functions (:mod:`raml.bench`). Logging set-up, JSON output, argparse value types, and the
``--<role>-path NETWORK`` / ``--<role> ARCH`` flag pair with how it becomes a network.

Not part of the CLI: a benchmark may use these without importing :mod:`raml.cli` (which sits above every
other package, see README's Layout and ``tests/test_layering.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("raml")

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_WHITENING",
    "add_network_args",
    "check_output_file",
    "check_output_files",
    "image_sizes_arg",
    "network_from_args",
    "non_negative_int",
    "positive_int",
    "setup_logging",
    "write_json",
]


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


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
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
    from raml.utils import atomic_write_text  # here: raml.utils imports torch, which a parser must not

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    logger.info("Wrote %s", path)


def check_output_file(path: str | Path, flag: str, overwrite: bool | None = None) -> Path:
    """Check, before any work, that a command can later write the file ``path`` (``flag`` names it in errors).

    ``path`` must not be a folder; its nearest existing ancestor must be a folder (the missing ones are made
    when the file is written, as :func:`raml.utils.atomic_path` does) in which a file can be created: checked
    with :func:`os.access` and by creating (and removing) an empty temporary file there, which also catches a
    read-only file system or a full inode table. With ``overwrite=False`` an existing ``path`` is refused
    (``--overwrite`` replaces it); ``None`` allows replacing it (reports such as ``--json``).

    Raises:
        ValueError: ``path`` is a folder, or no file can be created in its folder.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file path such as {str(path / 'out.json')!r}.")
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(folder)!r} is not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: the folder {str(folder)!r} is not writable.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".raml-write-check-", suffix=".tmp", dir=folder)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"{flag} {str(path)!r}: cannot create a file in {str(folder)!r} ({reason}).") from None
    os.close(handle)
    os.unlink(probe)
    if overwrite is False and os.path.lexists(path):
        raise FileExistsError(f"{flag} {str(path)!r} exists; pass --overwrite to replace it.")
    return path


def check_output_files(targets: Sequence[tuple[str, str | Path, bool | None]]) -> None:
    """:func:`check_output_file` for each ``(flag, path, overwrite)`` of a command; they must name different files
    (compared by their folders' real paths, so a linked folder is no second name, and their file names: an output
    is written by replacing the name, never through a link there)."""
    seen: dict[str, str] = {}
    for flag, path, overwrite in targets:
        check_output_file(path, flag, overwrite)
        absolute = os.path.abspath(path)
        key = os.path.normcase(os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute)))
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} name the same file {str(path)!r}; give different paths.")
        seen[key] = flag


#: What ``--pool`` and ``--whitening`` mean when they are not given (the reference's defaults).
DEFAULT_POOL = "gem"
DEFAULT_WHITENING = 0


def add_network_args(
    parser: argparse.ArgumentParser,
    role: str,
    required: bool,
    short: str | None = None,
    path_short: str | None = None,
    onnx: bool = False,
) -> None:
    """Add the seed's mutually exclusive ``--<role>-path NETWORK`` / ``--<role> ARCH`` pair.

    Args:
        parser: the command's parser.
        role: ``student``, ``teacher`` or ``network``.
        required: one of the two must be given.
        short: the reference's alias of ``--<role>`` (e.g. ``-s``).
        path_short: the reference's alias of ``--<role>-path`` (e.g. ``-spath``).
        onnx: also offer ``--<role>-onnx FILE``, a model written by ``raml export`` run by onnxruntime.
    """
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        *([path_short] if path_short else []),
        f"--{role}-path",
        metavar="NETWORK",
        help=f"{role} checkpoint: a file, a name in <data-root>/networks/, or a published model name",
    )
    group.add_argument(
        *([short] if short else []),
        f"--{role}",
        metavar="ARCH",
        help=f"{role} built from a torchvision/timm architecture name (ImageNet weights unless --not-pretrained)",
    )
    if onnx:
        group.add_argument(
            f"--{role}-onnx",
            type=Path,
            metavar="FILE.onnx",
            help=f"{role} exported by `raml export` (fp32 or --int8), run by onnxruntime on the CPU with the "
            "preprocessing of its sidecar",
        )


def network_from_args(
    path: str | None,
    architecture: str | None,
    data_root: str | Path,
    device: torch.device,
    pooling: str | None = None,
    whitening: int | None = None,
    pretrained: bool = True,
) -> tuple[torch.nn.Module, Path | None]:
    """Load a checkpoint (``path``) or build an architecture; returns the network and its checkpoint file.

    ``pooling``/``whitening`` build an architecture (defaults :data:`DEFAULT_POOL`, :data:`DEFAULT_WHITENING`)
    and are passed to :func:`raml.models.load_network` as hints only when given (not None).
    """
    from raml.models import build_network, load_network

    if path is not None:
        hints: dict[str, Any] = {}
        if pooling is not None:
            hints["pooling"] = pooling
        if whitening is not None:
            hints["whitening"] = whitening
        network = load_network(path, data_root=data_root, device=device, **hints)
        return network, getattr(network, "source_path", None)
    if architecture is None:
        raise ValueError("Give either a checkpoint (--*-path) or an architecture name.")
    network = build_network(
        architecture,
        pooling=pooling if pooling is not None else DEFAULT_POOL,
        whitening=whitening if whitening is not None else DEFAULT_WHITENING,
        pretrained=pretrained,
    )
    return network.to(device).eval(), None
