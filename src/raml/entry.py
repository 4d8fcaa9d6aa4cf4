"""Helpers every entry point shares: ``raml``'s commands (:mod:`raml.cli`) and the benchmarks' ``main``
functions (:mod:`raml.bench`). Logging set-up, JSON output, argparse value types, and the
``--<role>-path NETWORK`` / ``--<role> ARCH`` flag pair with how it becomes a network.

Not part of the CLI: a benchmark may use these without importing :mod:`raml.cli` (which sits above every
other package, see README's Layout and ``tests/test_layering.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("raml")

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_WHITENING",
    "MAX_SEED",
    "MAX_THREADS",
    "MAX_WORKERS",
    "add_network_args",
    "bounded_int",
    "check_output_file",
    "check_output_files",
    "dataset_inputs",
    "image_sizes_arg",
    "network_from_args",
    "network_inputs",
    "non_negative_int",
    "positive_int",
    "seed_int",
    "setup_logging",
    "threads_int",
    "workers_int",
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


#: the largest --workers: data loader worker processes, far above any use (the default is at most 8); past it a
#: machine only runs out of memory starting them (99999999999 was OOM-killed, leaving orphaned workers)
MAX_WORKERS = 256
#: the largest --threads: torch's intra-op threads, far above any machine's cores (torch.set_num_threads
#: overflows past 2**31 - 1 with a message that names no flag)
MAX_THREADS = 4096
#: the largest --seed: ``raml.engine.config.MAX_SEED`` (torch seeds ``seed + epoch``, at most 2**64 - 1)
MAX_SEED = 2**63 - 1


def bounded_int(low: int, high: int, high_text: str | None = None) -> Callable[[str], int]:
    """argparse type: an integer from ``low`` to ``high``; argparse's message names the flag
    (``argument --workers: expected an integer from 0 to 256, got 100000``). ``high_text``: how the message
    spells ``high`` (``2**63 - 1``)."""
    upper = high_text or str(high)

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {upper}, got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {upper}, got {value}")
        return number

    parse.__name__ = f"integer from {low} to {upper}"
    return parse


#: ``--workers``: data loader worker processes, 0 (the main process) to :data:`MAX_WORKERS`
workers_int = bounded_int(0, MAX_WORKERS)
#: ``--threads``: torch intra-op threads, 1 to :data:`MAX_THREADS`
threads_int = bounded_int(1, MAX_THREADS)
#: ``--seed``: 0 to :data:`MAX_SEED`
seed_int = bounded_int(0, MAX_SEED, "2**63 - 1")


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


def _file_key(path: str | Path) -> str:
    """``path`` by its folder's real path and its own name (an output replaces the name, never a link's target)."""
    absolute = os.path.abspath(path)
    return os.path.normcase(os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute)))


def _input_conflict(path: str | Path, source: str | Path) -> str | None:
    """How the output ``path`` would overwrite the input ``source`` (a file or a folder the command reads), or
    None: the same file (:func:`os.path.samefile` when both exist, else the same real path), or a file inside the
    folder ``source``."""
    if os.path.lexists(path) and os.path.exists(source):
        with contextlib.suppress(OSError):  # vanished or unreadable: compared by name below
            if os.path.samefile(path, source):
                return "is"
    key = _file_key(path)
    if key in (_file_key(source), os.path.normcase(os.path.realpath(source))):
        return "is"
    if os.path.isdir(source):
        folder = os.path.normcase(os.path.realpath(source))
        if os.path.commonpath([key, folder]) == folder:
            return "inside"
    return None


def network_inputs(flag: str, name_or_path: str | Path | None, data_root: str | Path) -> list[tuple[str, Path]]:
    """The checkpoint file a ``--*-path NETWORK`` flag reads, as an input of :func:`check_output_files`: the path as
    given, or where it is not a file, the cached ``<data_root>/networks/<name>.pth`` it names (as
    :func:`raml.models.resolve_network_path` finds it; nothing is downloaded here). Empty for None."""
    if name_or_path is None:
        return []
    given = Path(name_or_path)
    if given.is_file():
        return [(flag, given)]
    name = str(name_or_path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    cached = (flag, Path(data_root) / "networks" / f"{name}.pth")
    return [cached] if given.is_dir() else [(flag, given), cached]  # a folder is no checkpoint: not guarded


def dataset_inputs(flag: str, name: str | None, data_root: str | Path) -> list[tuple[str, Path]]:
    """The folders (and split file) a dataset split name reads, as inputs of :func:`check_output_files`, without
    reading the dataset: ``<data_root>/<name>`` with and without its part suffix (``cub-test`` -> ``cub``), or for
    ``FILE.json[:PART]`` the file and its folder (as given and under ``data_root``). The data root itself and a
    folder holding the working directory are left out: a report next to the datasets, or in the folder the
    command runs from, is fine. Empty for None."""
    if name is None:
        return []
    from raml.data.splits import SPLIT_SUFFIXES  # here: a parser must not import the data package

    data_root = Path(data_root).expanduser()
    paths: list[Path] = []
    spec, sep, _part = name.rpartition(":")
    json_file = name if name.endswith(".json") else spec if sep and spec.endswith(".json") else None
    if json_file is not None:
        given = Path(json_file).expanduser()
        for candidate in [given] if given.is_absolute() else [given, data_root / given]:
            paths += [candidate, candidate.parent]
    else:
        base, dash, suffix = name.rpartition("-")
        paths.append(data_root / name)
        if dash and base and suffix in SPLIT_SUFFIXES:
            paths.append(data_root / base)
    cwd = os.path.realpath(os.getcwd())
    spared = {os.path.normcase(os.path.realpath(data_root))}
    kept = []
    for path in paths:
        real = os.path.normcase(os.path.realpath(path))
        if real in spared or os.path.commonpath([real, os.path.normcase(cwd)]) == real:
            continue
        kept.append((flag, path))
    return kept


def check_output_files(
    targets: Sequence[tuple[str, str | Path, bool | None]],
    inputs: Sequence[tuple[str, str | Path | None]] = (),
) -> None:
    """:func:`check_output_file` for each ``(flag, path, overwrite)`` of a command; they must name different files
    (compared by their folders' real paths, so a linked folder is no second name, and their file names: an output
    is written by replacing the name, never through a link there).

    ``inputs`` are the ``(flag, path)`` files and folders the command reads (checkpoints, models and their sidecars,
    query images, list files, an index folder, dataset folders, a config file; None entries are skipped): no output
    may be one of those files or lie inside one of those folders, even with ``--overwrite`` (which replaces a
    previous output, never an input). Checked before an output's other checks, so the refusal of an existing
    file does not suggest ``--overwrite`` for an input.

    Raises:
        ValueError: an output is an input or inside an input folder; see also :func:`check_output_file`.
    """
    given = [(flag, Path(path)) for flag, path in inputs if path is not None]
    seen: dict[str, str] = {}
    for flag, path, overwrite in targets:
        for source_flag, source in given:
            conflict = _input_conflict(path, source)
            if conflict == "is":
                raise ValueError(
                    f"{flag} {str(path)!r} is {source_flag}'s {str(source)!r}, an input the command must not replace"
                    f"{' (--overwrite replaces a previous output, never an input)' if overwrite else ''}; give "
                    f"{flag} another path."
                )
            if conflict == "inside":
                raise ValueError(
                    f"{flag} {str(path)!r} lies inside {str(source)!r}, the folder {source_flag} reads; give "
                    f"{flag} a path outside it."
                )
        check_output_file(path, flag, overwrite)
        key = _file_key(path)
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
