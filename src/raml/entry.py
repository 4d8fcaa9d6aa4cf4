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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raml.utils import MAX_SEED, MAX_THREADS, MAX_WORKERS, atomic_write_text  # torch-free at import

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("raml")

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_WHITENING",
    "MAX_SEED",
    "MAX_THREADS",
    "MAX_WORKERS",
    "InputFiles",
    "add_network_args",
    "bounded_int",
    "check_output_file",
    "check_output_files",
    "dataset_inputs",
    "image_file_keys",
    "image_sizes_arg",
    "network_from_args",
    "network_inputs",
    "non_negative_int",
    "positive_int",
    "refuse_inputs",
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


def _real_folder(path: str | Path) -> str:
    """A folder's key: its normalised real path."""
    return os.path.normcase(os.path.realpath(path))


@dataclass(frozen=True)
class InputFiles:
    """Many files a command reads or owns, as one input of :func:`check_output_files`, matched by name without a
    stat per file: ``keys``, the files' :func:`_file_key`-style keys (their folders' real paths and their names),
    and/or ``owns(folder_key, name)``, whether the file ``name`` of the folder (its :func:`_real_folder` key) is
    one of them (the files of an index or a training run, named by their patterns).

    Attributes:
        flag: The flag that names the source, for the message.
        what: What the files are, e.g. ``"an image that --list 'a.txt' names"``.
    """

    flag: str
    what: str
    keys: frozenset[str] = frozenset()
    owns: Callable[[str, str], bool] | None = None

    def holds(self, path: str | Path) -> bool:
        """Whether the output ``path`` is one of these files."""
        key = _file_key(path)
        if key in self.keys:
            return True
        return self.owns is not None and self.owns(os.path.dirname(key), os.path.basename(key))


def image_file_keys(paths: Iterable[str | Path]) -> frozenset[str]:
    """:func:`_file_key` of each image path for :class:`InputFiles` (one real-path look-up per folder, not per file)."""
    folders: dict[str, str] = {}
    keys = set()
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        keys.add(os.path.normcase(os.path.join(folders[folder], name)))
    return frozenset(keys)


def _same_file(path: str | Path, source: str | Path) -> bool:
    """Whether the output ``path`` is the input file ``source``: :func:`os.path.samefile` when both exist, else the
    same real path (an output replaces its name)."""
    if os.path.lexists(path) and os.path.exists(source):
        with contextlib.suppress(OSError):  # vanished or unreadable: compared by name below
            if os.path.samefile(path, source):
                return True
    return _file_key(path) in (_file_key(source), os.path.normcase(os.path.realpath(source)))


#: the files beside a checkpoint that loading or testing it reads: the digests every load verifies it against
#: (raml.models.checkpoints) and the run's record that raml test / extract take --val-ratio from (engine.val_ratio)
_CHECKPOINT_SIBLINGS = ("SHA256SUMS", "config.yaml")


def network_inputs(flag: str, name_or_path: str | Path | None, data_root: str | Path) -> list[tuple[str, Path]]:
    """The checkpoint file a ``--*-path NETWORK`` flag reads, as an input of :func:`check_output_files`: the path as
    given, or where it is not a file, the cached ``<data_root>/networks/<name>.pth`` it names (as
    :func:`raml.models.resolve_network_path` finds it; nothing is downloaded here); and the files beside it that
    are read with it (:data:`_CHECKPOINT_SIBLINGS`). Empty for None."""
    if name_or_path is None:
        return []
    given = Path(name_or_path)
    name = str(name_or_path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    cached = Path(data_root) / "networks" / f"{name}.pth"
    files = [given] if given.is_file() else [cached] if given.is_dir() else [given, cached]  # a folder: no checkpoint
    siblings = [file.parent / sibling for file in files for sibling in _CHECKPOINT_SIBLINGS]
    return [(flag, path) for path in [*files, *siblings]]


#: the list files the registered datasets' loaders read in their folder (raml.data.splits: load_cub, load_synth,
#: load_cars, load_sop), and an own dataset folder's split file
_DATASET_LIST_FILES = ("images.txt", "cars_annos.mat", "Ebay_train.txt", "Ebay_test.txt", "split.json")


def dataset_inputs(
    flag: str, name: str | None, data_root: str | Path, val_ratio: float = 0.5
) -> list[tuple[str, Path] | InputFiles]:
    """The files a dataset split name reads, as inputs of :func:`check_output_files`: its list files (the
    ``FILE.json`` of ``FILE.json[:PART]`` as :func:`raml.data.splits.get_split` finds it, or the existing index
    files of ``<data_root>/<name>``, with and without its part suffix) and its images, resolved as ``get_split``
    resolves them (for a train or val part, those of train and val together: which images are val depends on the
    val ratio). No folder is guarded: a new report anywhere is fine unless it is one of these files. A split that
    does not resolve gives its list files only (the command reports the problem itself). Empty for None."""
    if not name:
        return []
    from raml.data.splits import SPLIT_SUFFIXES, get_split  # here: a parser must not import the data package

    root = Path(data_root).expanduser()
    inputs: list[tuple[str, Path] | InputFiles] = []
    spec, sep, part = name.rpartition(":")
    json_file = name if name.endswith(".json") else spec if sep and spec.endswith(".json") else None
    if json_file is not None:
        given = Path(json_file).expanduser()
        inputs += [(flag, candidate) for candidate in ([given] if given.is_absolute() else [given, root / given])]
        wider = f"{json_file}:trainval" if part in ("", "train", "val") or not sep else None
    else:
        base, dash, suffix = name.rpartition("-")
        folders = [root / name, *([root / base] if dash and base and suffix in SPLIT_SUFFIXES else [])]
        lists = [folder / list_name for folder in folders for list_name in _DATASET_LIST_FILES]
        inputs += [(flag, path) for path in lists if path.is_file()]
        has_part = bool(dash and base and suffix in SPLIT_SUFFIXES)
        wider = None if has_part and suffix not in ("train", "val") else f"{base if has_part else name}-trainval"
    for candidate in [wider, name] if wider is not None else [name]:
        try:
            split = get_split(candidate, root, val_ratio, allow_absolute_paths=True)
        except (OSError, ValueError, ImportError) as error:  # reported by the command itself
            logger.debug("Output check: split %r not resolved (%s)", candidate, error)
            continue
        inputs.append(InputFiles(flag, f"an image of {flag} {name!r}", image_file_keys(split.abspaths())))
        break
    return inputs


def check_output_files(
    targets: Sequence[tuple[str, str | Path, bool | None]],
    inputs: Sequence[tuple[str, str | Path | None] | InputFiles] = (),
) -> None:
    """:func:`check_output_file` for each ``(flag, path, overwrite)`` of a command; they must name different files
    (compared by their folders' real paths, so a linked folder is no second name, and their file names: an output
    is written by replacing the name, never through a link there).

    ``inputs`` are the files the command reads or owns: ``(flag, path)`` single files (checkpoints, models and
    their sidecars, query images, list files, a config file; None entries are skipped) and :class:`InputFiles`
    (the images of a dataset split or list, the files of an index or a training run). No output may be one of
    those files, even with ``--overwrite`` (which replaces a previous output, never an input); any other file,
    also a new one in a folder the command reads, is fine. Checked before an output's other checks, so the
    refusal of an existing file does not suggest ``--overwrite`` for an input.

    Raises:
        ValueError: an output is an input; see also :func:`check_output_file`.
    """
    seen: dict[str, str] = {}
    for flag, path, overwrite in targets:
        refuse_inputs([(flag, path, overwrite)], inputs)
        check_output_file(path, flag, overwrite)
        key = _file_key(path)
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} name the same file {str(path)!r}; give different paths.")
        seen[key] = flag


def refuse_inputs(
    targets: Sequence[tuple[str, str | Path, bool | None]],
    inputs: Sequence[tuple[str, str | Path | None] | InputFiles],
) -> None:
    """The input half of :func:`check_output_files`: raise ``ValueError`` (naming both flags) when an output of
    ``targets`` is one of ``inputs``. Alone, for inputs known only once the command has read something (the
    database images of a loaded index), after :func:`check_output_files` checked the outputs themselves."""
    for flag, path, overwrite in targets:
        never = " (--overwrite replaces a previous output, never an input)" if overwrite else ""
        for source in inputs:
            if isinstance(source, InputFiles):
                if source.holds(path):
                    raise ValueError(
                        f"{flag} {str(path)!r} is {source.what}, a file the command must not replace{never}; give "
                        f"{flag} another path."
                    )
                continue
            source_flag, source_path = source
            if source_path is not None and _same_file(path, source_path):
                raise ValueError(
                    f"{flag} {str(path)!r} is {source_flag}'s {str(source_path)!r}, an input the command must not "
                    f"replace{never}; give {flag} another path."
                )


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
