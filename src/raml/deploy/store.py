"""The on-disk index store: committed generations of an index directory, read without a lock.

Contract:
    ``load_index(index_dir)`` -> :class:`DatabaseIndex` (faiss index, ``(N, D)`` float32 embeddings, paths,
    labels, metadata) of the committed generation; ``committed_generation(index_dir)`` -> its number, read
    cheaply (a reader polls it to notice a new commit); ``write_generation(...)`` writes and commits the next
    one. This is the whole interface readers (``raml search``, ``raml serve``) use.

On-disk layout (``index_dir``)::

    index.json               metadata; the commit record naming the files of the current generation
    index-<G>.faiss          the faiss index (faiss.write_index)
    invlists-<G>.ivfdata     an on-disk IVF index's inverted lists (``--on-disk``; raml.deploy.ondisk_ivf): the
                             .faiss file holds the quantiser and names this file
    embeddings-<G>.npy       (N, D) float32 embeddings, rows in index order (re-adding, exact re-ranking)
    paths-<G>.json           the N image paths, as given on the command line / resolved from a list file, made
                             absolute against the writer's working directory (older indexes: maybe relative)
    labels-<G>.npy           (N,) int64 class labels (-1 where the images did not come from a dataset split)
    stamps-<G>.json          the N file stamps (``"<size>:<mtime_ns>"`` or ``"sha256:<hex>"``): a changed file is
                             re-embedded (indexes written before stamps existed have none)
    shards-<key>/            the work folder of an extraction in progress (raml.deploy.shards), kept by a
                             killed run so that the next one resumes; removed after the commit
    .lock                    present while a writer holds the index (raml.deploy.lock)

Ids: row ``i`` of every file is the image with id ``i``, and the faiss index returns these ids (an
``IndexIDMap2`` around flat and HNSW indexes, the IVF indexes' own ids). Ids are stable and never reused: an
append gives new images the next ids, a re-embedded (changed) image keeps its id, a removed image leaves a
tombstone row (path ``""``, label -1, zero embedding, absent from the faiss index) whose id is never given
again, and a rebuild (``--overwrite``) keeps the id of every path it indexes again. ``count`` in
``index.json`` is the number of live images; ``len(DatabaseIndex)`` is the number of ids (rows).

``index.json`` holds the format version, the generation number, index type and effective parameters, the
embedding dimension and dtype, the network's checkpoint path, content SHA-256 and meta, the image size, the
count, the datasets added, and ``files`` (the names above). An update writes every file of the next
generation ``G + 1`` through temporary files that are fsynced, renamed into place and their directory
fsynced (``raml.utils.atomic_path``), and only then replaces ``index.json`` the same way: that rename is the
commit. A crash, an error or a power loss at any earlier point leaves the previous ``index.json`` and the
files it names untouched; files of an uncommitted generation are removed on error, and what a killed writer
leaves by the next writer (:func:`remove_leftovers`).
Writers hold the directory's lock (:mod:`raml.deploy.index`); readers take none (see :func:`load_index`).

Readers map the faiss index instead of reading it (``load_index(..., mmap=True)``, the default), so processes
serving the same generation share its pages: faiss 1.15's ``IO_FLAG_MMAP_IFC`` maps the codes of flat, HNSW
(vectors and graph) and in-memory IVF / IVF-PQ lists from the ``.faiss`` file, and an on-disk index's lists are
mapped read-only from ``invlists-<G>.ivfdata`` (``IO_FLAG_ONDISK_SAME_DIR | IO_FLAG_READ_ONLY``; its small
``.faiss`` part, the quantiser, is read). What stays in each process: the id map's reverse table of flat and
HNSW indexes (``IndexIDMap2``) and the IVF quantisers. A writer loads with ``mmap=False`` (it updates a copy).
A generation's files are never modified after the commit (the next one writes new files), so a mapped index
stays valid while it is served, even after a later commit has unlinked its files.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raml.deploy.faiss_index import IndexParams, apply_search_params, as_float32_matrix, import_faiss
from raml.deploy.lock import LOCK_NAME
from raml.deploy.ondisk_ivf import set_lists_name
from raml.deploy.shards import is_shards_folder
from raml.retrieval.cache import check_npy_size
from raml.utils import atomic_numpy_save, atomic_path, atomic_write_text, fsync_directory

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_NAME",
    "REMOVED",
    "DatabaseIndex",
    "IndexDirectoryError",
    "committed_generation",
    "generation_file",
    "is_index_leftover",
    "load_index",
    "next_generation",
    "remove_leftovers",
    "write_generation",
]

FORMAT = "raml-index"
FORMAT_VERSION = 3  # 2: stable ids with tombstone rows, stamps-<G>.json; 3: on-disk inverted lists
_PLAIN_VERSION = 2  # the version an index without on-disk lists is written as (older raml reads it)
METADATA_NAME = "index.json"

_FILE_KINDS = {
    "index": "faiss",
    "embeddings": "npy",
    "paths": "json",
    "labels": "npy",
    "stamps": "json",
    "invlists": "ivfdata",
}
REMOVED = ""
"""The path of a removed image's tombstone row."""
_LOAD_ATTEMPTS = 3  # loads of successive generations when writers keep committing during a load


class IndexDirectoryError(ValueError):
    """An index directory is missing, damaged, or incompatible with the requested operation."""


@dataclass
class DatabaseIndex:
    """A loaded index directory.

    Attributes:
        directory: The index directory.
        meta: Contents of ``index.json``.
        index: The faiss index (search parameters already applied).
        embeddings: ``(N, D)`` float32 embeddings, rows in index order.
        paths: N image paths as given when indexing.
        labels: ``(N,)`` int64 labels, -1 where unknown.
        params: The parameters the index was built with.
        stamps: N file stamps (``""`` where unknown), or None for an index written before stamps existed.
    """

    directory: Path
    meta: dict[str, Any]
    index: Any
    embeddings: np.ndarray
    paths: list[str]
    labels: np.ndarray
    params: IndexParams
    stamps: list[str] | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.meta["dim"])

    def __len__(self) -> int:
        """The number of ids (rows), removed ones included; ``live_count`` is the number of images."""
        return len(self.paths)

    @property
    def live_count(self) -> int:
        """The number of images in the faiss index (ids not removed)."""
        return int(self.index.ntotal)

    def is_removed(self, image_id: int) -> bool:
        """Whether the id ``image_id`` (``0 <= image_id < len(self)``) names a removed image (a tombstone row)."""
        return self.paths[image_id] == REMOVED

    def live_ids(self) -> np.ndarray:
        """``(live_count,)`` int64 ids of the images not removed, ascending."""
        return np.asarray([i for i, p in enumerate(self.paths) if p != REMOVED], dtype=np.int64)

    @property
    def generation(self) -> int:
        """The committed generation this index was loaded from."""
        return int(self.meta.get("generation", 0))

    @property
    def network_sha256(self) -> str | None:
        """Content hash of the checkpoint that embedded the database."""
        return self.meta.get("network", {}).get("sha256")

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search ``(Q, D)`` queries; returns ``(scores, ids)``, each ``(Q, min(k, live_count))``; id -1 = no
        result. Ids are the stable image ids (rows of ``paths``, ``labels``, ``embeddings``).

        Args:
            queries: L2-normalised query embeddings of dimension D.
            k: Results per query, an int or numpy integer (clamped to the index size).
            nprobe: Override the stored IVF ``nprobe`` for this search.
        """
        q = as_float32_matrix(queries)
        if q.shape[1] != self.dim:
            raise ValueError(
                f"Query embeddings have dimension {q.shape[1]} but the index at {self.directory} holds "
                f"{self.dim}-dimensional embeddings; use a query network with output dimension {self.dim}."
            )
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive integer (int or numpy integer), got {k!r}.")
        k = min(int(k), max(1, self.live_count))
        params = self.params
        if nprobe is not None and params.nlist is not None:
            params = replace(params, nprobe=min(int(nprobe), params.nlist))
        apply_search_params(self.index, params, k)
        scores, ids = self.index.search(q, k)
        return scores, ids


def _read_metadata(index_dir: Path) -> dict[str, Any]:
    meta_path = index_dir / METADATA_NAME
    if not meta_path.is_file():
        raise IndexDirectoryError(
            f"{str(index_dir)!r} is not a raml index: {METADATA_NAME} is missing. Build one with `raml index`."
        )
    try:
        meta = json.loads(meta_path.read_text())
    # ValueError: not JSON, or not UTF-8; RecursionError: nested deeper than the decoder goes
    except (OSError, ValueError, RecursionError) as error:
        raise IndexDirectoryError(
            f"{meta_path} is unreadable ({error}); rebuild the index with `raml index --overwrite`."
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexDirectoryError(f"{meta_path} is not a raml index description (format {FORMAT!r} expected).")
    _check_meta_fields(meta, meta_path)
    if meta.get("version", 0) > FORMAT_VERSION:
        raise IndexDirectoryError(
            f"{meta_path} has format version {meta.get('version')}, newer than this raml understands "
            f"({FORMAT_VERSION}); upgrade raml."
        )
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta_fields(meta: dict[str, Any], meta_path: Path) -> None:
    """Refuse (:class:`IndexDirectoryError`, naming the file and field) an ``index.json`` whose fields are not of
    the types :func:`write_generation` writes: ``count`` a non-negative integer, ``version`` and ``generation``
    too where present (an index of an early raml may lack them), ``params`` a table."""
    if "count" not in meta:
        raise IndexDirectoryError(
            f"{meta_path} has no 'count' field (the number of indexed images); the index description was edited "
            "or damaged: rebuild the index with `raml index --overwrite`."
        )
    for field in ("count", "version", "generation"):
        if field in meta and not _is_count(meta[field]):
            raise IndexDirectoryError(
                f"{meta_path}: its '{field}' field is {_shown_value(meta[field])}, a non-negative integer expected; "
                "the index description was edited or damaged: rebuild the index with `raml index --overwrite`."
            )
    if "params" in meta and not isinstance(meta["params"], dict):
        raise IndexDirectoryError(
            f"{meta_path}: its 'params' field is {_shown_value(meta['params'])}, a table of index parameters "
            "expected; the index description was edited or damaged: rebuild the index with `raml index --overwrite`."
        )


def _shown_value(value: Any) -> str:
    """``value`` for a message: its JSON type, and a scalar's text cut short (a crafted file may hold anything)."""
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value))
    if kind in ("object", "list"):
        return f"a JSON {kind}"
    text = json.dumps(value)
    return f"a JSON {kind or 'number'} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_string_list(value: Any, path: Path, what: str) -> list[str]:
    """``value`` (the contents of ``path``), refused unless it is a list of strings (:class:`IndexDirectoryError`)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        found = _shown_value(value) if not isinstance(value, list) else "a JSON list holding other values than strings"
        raise IndexDirectoryError(
            f"{path} holds {found}, a JSON list of {what} (strings) expected; the file was edited or damaged: "
            "rebuild the index with `raml index --overwrite`."
        )
    return value


def _params_from_meta(meta: dict[str, Any], index_dir: Path | None = None) -> IndexParams:
    stored = meta.get("params", {})
    where = f"{index_dir}/index.json" if index_dir is not None else "index.json"
    if not isinstance(stored, dict):  # load_index refuses it first (_check_meta_fields)
        raise IndexDirectoryError(f"{where}: its 'params' field is {_shown_value(stored)}, a table expected.")
    known = {f for f in IndexParams.__dataclass_fields__}
    try:
        return IndexParams(**{k: v for k, v in stored.items() if k in known})
    except (TypeError, ValueError) as error:  # e.g. a bound added since it was built (hnsw_m <= 512)
        raise IndexDirectoryError(
            f"{where} records index parameters this version refuses: {error} Rebuild the index (raml index "
            "--output a new folder) with parameters within the bounds."
        ) from None


def load_index(index_dir: str | Path, mmap: bool = True) -> DatabaseIndex:
    """Load an index directory written by :func:`index_images`.

    Reading takes no lock: ``index.json`` names one committed generation. Should a writer commit the next
    generation and remove this one's files between reading ``index.json`` and opening them, the load starts
    again from the new ``index.json``.

    Args:
        index_dir: The index directory.
        mmap: Map the faiss index's codes from its files (shared between processes; see the module docstring)
            rather than reading them into this process. A process that modifies the loaded faiss index must
            pass False (an on-disk index's lists are mapped read-only either way).

    Raises:
        IndexDirectoryError: If the directory is not an index, or its files are missing or inconsistent.
    """
    index_dir = Path(index_dir)
    meta = _read_metadata(index_dir)
    for attempt in range(1, _LOAD_ATTEMPTS + 1):
        try:
            return _load_generation(index_dir, meta, mmap)
        except IndexDirectoryError:
            current = _read_metadata(index_dir)
            if current.get("files") == meta.get("files") or attempt == _LOAD_ATTEMPTS:
                raise
            logger.info("The index at %s was updated while loading it; loading the new generation", index_dir)
            meta = current
    raise AssertionError("unreachable")  # pragma: no cover


def committed_generation(index_dir: str | Path) -> int:
    """The generation number ``index.json`` names now (one small file read; no index file is opened).

    Raises:
        IndexDirectoryError: If the directory holds no readable index description.
    """
    return int(_read_metadata(Path(index_dir)).get("generation", 0))


def _read_flags(faiss: Any, on_disk: bool, mmap: bool) -> int:
    """faiss.read_index flags: see the module docstring."""
    if on_disk:  # IO_FLAG_ONDISK_SAME_DIR: the lists file named in the .faiss, looked up next to it
        return faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    return int(getattr(faiss, "IO_FLAG_MMAP_IFC", 0)) if mmap else 0  # faiss < 1.10: no mapping, read


def _checked_files(index_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """The paths of the files ``index.json`` names, each checked to be what :func:`write_generation` writes: a
    regular file (not a link) in ``index_dir`` named ``<kind>-<generation>.<ext>``. A crafted ``index.json``
    naming an absolute path, ``..`` or a link would otherwise make a reader open files outside the folder.

    Raises:
        IndexDirectoryError: On a name of another form or a file that is not a regular file.
    """
    files = meta.get("files")
    if not isinstance(files, dict):
        raise IndexDirectoryError(
            f"{index_dir / METADATA_NAME} has no 'files' table naming the index's files; rebuild the index with "
            "`raml index --overwrite`."
        )
    checked: dict[str, Path] = {}
    for kind, name in files.items():
        ext = _FILE_KINDS.get(str(kind))
        stem, dot, suffix = name.partition(".") if isinstance(name, str) else ("", "", "")
        number = stem[len(str(kind)) + 1 :]
        if ext is None or not (dot and suffix == ext and stem == f"{kind}-{number}" and number.isdigit()):
            raise IndexDirectoryError(
                f"{index_dir / METADATA_NAME} names the {kind!r} file {name!r}; expected a file of this folder named "
                f"'{kind}-<generation>.{ext or '<ext>'}' (as `raml index` writes it). The index description was "
                "edited or crafted: rebuild the index with `raml index --overwrite`."
            )
        path = index_dir / name
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            checked[kind] = path  # reported by the load (a writer may have committed a new generation meanwhile)
            continue
        if not stat.S_ISREG(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise IndexDirectoryError(
                f"{path} is {what}; `raml index` writes the files of an index as regular files in its folder. "
                "Replace it with the file itself (e.g. copy the folder with `cp -rL`), or rebuild the index with "
                "`raml index --overwrite`."
            )
        checked[kind] = path
    return checked


def _check_lists_file(index: Any, lists_path: Path) -> None:
    """Check that the on-disk lists file an IVF index maps covers every inverted list it declares.

    faiss maps the file at the size recorded in the ``.faiss`` file without comparing it with the file's size:
    a truncated file (an interrupted copy, a full disk) would crash the process with SIGBUS at the first search
    of a list past its end, or return garbage. This reads the lists' offsets and capacities (metadata in
    memory) and the file's size, never the file itself.

    Raises:
        IndexDirectoryError: If the file is not the one ``index.json`` names, or too short.
    """
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise IndexDirectoryError(
            f"{METADATA_NAME} of {lists_path.parent} names the on-disk lists file {lists_path.name}, but its faiss "
            "index holds its lists in memory; rebuild the index with `raml index --overwrite`."
        )
    mapped = Path(str(lists.filename))
    if mapped.name != lists_path.name:
        raise IndexDirectoryError(
            f"{lists_path.with_name(mapped.name)} is the lists file that the faiss index of {lists_path.parent} "
            f"names, but {METADATA_NAME} names {lists_path.name}; rebuild the index with `raml index --overwrite`."
        )
    entry_bytes = int(lists.code_size) + 8  # the codes, then the int64 ids, of each slot
    needed = int(lists.totsize)
    for i in range(int(lists.nlist)):
        one = lists.lists.at(i)
        size, capacity, offset = int(one.size), int(one.capacity), int(one.offset)
        end = offset + capacity * entry_bytes
        if not (0 <= size <= capacity and offset >= 0 and end <= needed):
            raise IndexDirectoryError(
                f"The faiss index of {lists_path.parent} is damaged: its inverted list {i} ({size} of {capacity} "
                f"entries at byte {offset}) does not fit in the {needed} bytes of {lists_path.name}; rebuild the "
                "index with `raml index --overwrite`."
            )
    actual = os.stat(mapped).st_size
    if actual < needed:
        raise IndexDirectoryError(
            f"{lists_path} is truncated: the index's inverted lists need {needed} bytes, the file has {actual} "
            "(an interrupted copy or a full disk?). Copy the complete file again, or rebuild the index with "
            "`raml index --overwrite`."
        )


def _load_generation(index_dir: Path, meta: dict[str, Any], mmap: bool) -> DatabaseIndex:
    faiss = import_faiss()
    checked = _checked_files(index_dir, meta)
    files = meta["files"]
    reading: Path | None = None  # the file being read, named in the error
    try:
        paths_file, emb_file, labels_file, index_file = (checked[k] for k in ("paths", "embeddings", "labels", "index"))
        reading = paths_file
        paths = _check_string_list(json.loads(paths_file.read_text()), paths_file, "image paths")
        # memory-mapped: replicas on one node share the pages, and a later commit only unlinks the file
        reading = emb_file
        check_npy_size(emb_file)
        embeddings = np.load(emb_file, allow_pickle=False, mmap_mode="r")
        reading = labels_file
        check_npy_size(labels_file)  # before np.load allocates what its header declares
        labels = np.load(labels_file, allow_pickle=False)
        reading = checked.get("stamps")
        stamps = None
        if "stamps" in checked:
            stamps = _check_string_list(json.loads(checked["stamps"].read_text()), checked["stamps"], "file stamps")
        reading = checked.get("invlists")
        if "invlists" in checked and not checked["invlists"].is_file():
            raise OSError(f"{files['invlists']} (the inverted lists of {files['index']}) is missing")
        reading = index_file
        index = faiss.read_index(str(index_file), _read_flags(faiss, "invlists" in checked, mmap))
        reading = checked.get("invlists")
        if "invlists" in checked:  # before any search touches the mapped file
            _check_lists_file(index, checked["invlists"])
    # EOFError: np.load of an empty (0-byte) .npy file
    except (KeyError, OSError, ValueError, RuntimeError, EOFError) as error:
        if isinstance(error, IndexDirectoryError):
            raise
        where = "" if reading is None else f": {reading.name} is unreadable"
        raise IndexDirectoryError(
            f"The index at {index_dir} is damaged{where} ({type(error).__name__}: {error}); rebuild it with "
            "`raml index --overwrite`."
        ) from error
    for array, file, ndim, shape in ((embeddings, emb_file, 2, "(N, D)"), (labels, labels_file, 1, "(N,)")):
        if array.ndim != ndim:
            raise IndexDirectoryError(
                f"{file} holds an array of shape {array.shape}, {shape} expected; the file was replaced or damaged: "
                "rebuild the index with `raml index --overwrite`."
            )
    # what `raml index` writes (write_generation): float32 embeddings, int64 labels (any integer type is read)
    for array, file, wrong, expected in (
        (embeddings, emb_file, embeddings.dtype != np.float32, "float32"),
        (labels, labels_file, not np.issubdtype(labels.dtype, np.integer), "integer"),
    ):
        if wrong:
            raise IndexDirectoryError(
                f"{file} holds {array.dtype} values, {expected} expected; the file was replaced or damaged: "
                "rebuild the index with `raml index --overwrite`."
            )
    count = int(meta["count"])
    live = sum(1 for p in paths if p != REMOVED)
    stamps_ok = stamps is None or len(stamps) == len(paths)
    if not (len(paths) == embeddings.shape[0] == labels.shape[0] and index.ntotal == count == live and stamps_ok):
        raise IndexDirectoryError(
            f"The index at {index_dir} is inconsistent: {count} in {METADATA_NAME}, {len(paths)} paths ({live} not "
            f"removed), {embeddings.shape[0]} embeddings, {labels.shape[0]} labels, "
            f"{'' if stamps is None else f'{len(stamps)} file stamps, '}{index.ntotal} vectors in the faiss index; "
            "rebuild it with `raml index --overwrite`."
        )
    params = _params_from_meta(meta, index_dir)
    apply_search_params(index, params)
    return DatabaseIndex(
        index_dir,
        meta,
        index,
        embeddings,
        [str(p) for p in paths],
        labels.astype(np.int64),
        params,
        None if stamps is None else [str(s) for s in stamps],
    )


def generation_file(kind: str, generation: int) -> str:
    """The name of one file (``index``, ``embeddings``, ``paths``, ``labels``, ``stamps``, ``invlists``) of a
    generation."""
    return _generation_files(generation)[kind]


def _generation_files(generation: int) -> dict[str, str]:
    return {kind: f"{kind}-{generation:06d}.{ext}" for kind, ext in _FILE_KINDS.items()}


def _is_generation_file(name: str) -> bool:
    for kind, ext in _FILE_KINDS.items():
        stem, dot, suffix = name.partition(".")
        if dot and suffix == ext and stem.startswith(f"{kind}-") and stem[len(kind) + 1 :].isdigit():
            return True
    return False


def _is_index_temporary(name: str) -> bool:
    """A temporary file of ``atomic_path`` (``.<target name>.<random>.tmp``) for an index file; a kill leaves them."""
    target = name[1:].rsplit(".", 2)[0] if name.startswith(".") and name.endswith(".tmp") else ""
    return bool(target) and (_is_generation_file(target) or target == METADATA_NAME)


def is_index_leftover(name: str) -> bool:
    """A file a writer of this folder may leave behind: lock, generation file, temporary file, shard folder."""
    return name == LOCK_NAME or _is_generation_file(name) or _is_index_temporary(name) or is_shards_folder(name)


def _remove_unreferenced(index_dir: Path, keep: set[str] | None) -> None:
    """Delete generation files (and leftover temporary files and folders) that the current index.json does not
    name (``keep``; None: the temporaries only)."""
    for entry in index_dir.iterdir():
        name = entry.name
        if (keep is not None and _is_generation_file(name) and name not in keep) or _is_index_temporary(name):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as error:  # not fatal: the index itself is committed
                logger.warning("Could not remove stale index file %s: %s", entry, error)


def remove_leftovers(index_dir: Path, own_files: Collection[str] = ()) -> None:
    """Delete what killed writers left in ``index_dir``; call it holding the writer's lock.

    Removed: temporary files and folders of raml's naming (``.<generation file>.<random>.tmp``, the on-disk
    lists' ``.invlists-<G>.ivfdata.parts-<random>.tmp``, ``.index.json.<random>.tmp``), generation files that
    the committed ``index.json`` does not name (every one when there is no ``index.json`` and the folder holds
    nothing else than a writer's files; none when it is unreadable), and the shard work folder of the committed
    job (``work_folder`` in ``index.json``: a kill between the commit and its removal). Never a file that
    ``index.json`` names, nor any other name. ``own_files``: other names a writer puts there (its reports), which
    do not make the folder foreign; they are never removed here.
    """
    if not index_dir.is_dir():
        return
    meta_path = index_dir / METADATA_NAME
    keep: set[str] | None = set()
    meta: Any = None
    names = [entry.name for entry in index_dir.iterdir()]
    if not meta_path.exists() and not all(is_index_leftover(n) or n in own_files for n in names):
        return  # not an index folder: the caller refuses it, and nothing is removed
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        files = meta.get("files") if isinstance(meta, dict) else None
        keep = {str(name) for name in files.values()} if isinstance(files, dict) else None
    _remove_unreferenced(index_dir, keep)
    work_folder = meta.get("work_folder") if isinstance(meta, dict) else None
    if isinstance(work_folder, str) and is_shards_folder(work_folder):
        folder = index_dir / work_folder
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def write_generation(
    index_dir: Path,
    meta: dict[str, Any],
    index: Any,
    embeddings: np.ndarray | Callable[[Path], None],
    paths: list[str],
    labels: np.ndarray,
    before_commit: Callable[[], None] | None = None,
    stamps: list[str] | None = None,
    lists_file: Path | None = None,
) -> None:
    """Write the next generation's files, then commit by replacing ``index.json``; see the module docstring.

    ``embeddings`` is the ``(N, D)`` array, or a function that writes it as a ``.npy`` file to the path it is
    given (to stream it from shards without holding it in memory). ``stamps`` default to ``""`` (unknown).
    ``lists_file`` is the file holding the inverted lists of an on-disk ``index`` (written in ``index_dir``
    under a temporary name; it is fsynced and renamed to ``invlists-<G>.ivfdata``).
    """
    faiss = import_faiss()
    generation = int(meta["generation"])
    files = _generation_files(generation)
    if lists_file is None:
        del files["invlists"]
    meta["files"] = files
    meta["version"] = FORMAT_VERSION if lists_file is not None else _PLAIN_VERSION
    index_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for kind in ("embeddings", "labels", "paths", "stamps", "invlists", "index"):
            if kind not in files:
                continue
            target = index_dir / files[kind]
            written.append(target)
            if kind == "invlists":
                assert lists_file is not None
                with open(lists_file, "rb+") as handle:  # the lists were written through a shared mapping
                    os.fsync(handle.fileno())
                os.replace(lists_file, target)
                fsync_directory(index_dir)
                set_lists_name(index, files[kind])  # a base name: read back with IO_FLAG_ONDISK_SAME_DIR
            elif kind == "embeddings" and callable(embeddings):
                with atomic_path(target) as tmp:
                    embeddings(tmp)
            elif kind == "embeddings":
                atomic_numpy_save(np.ascontiguousarray(embeddings, dtype=np.float32), target)
            elif kind == "stamps":
                atomic_write_text(target, json.dumps(stamps if stamps is not None else [""] * len(paths)) + "\n")
            elif kind == "labels":
                atomic_numpy_save(np.asarray(labels, dtype=np.int64), target)
            elif kind == "paths":
                atomic_write_text(target, json.dumps(paths, indent=0) + "\n")
            else:
                with atomic_path(target) as tmp:
                    faiss.write_index(index, str(tmp))
        if before_commit is not None:
            before_commit()
        atomic_write_text(index_dir / METADATA_NAME, json.dumps(meta, indent=2) + "\n")  # the commit
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    _remove_unreferenced(index_dir, set(files.values()))


def next_generation(index_dir: Path) -> int:
    """The generation number a new index in ``index_dir`` gets: one after the committed one, else 1."""
    if (index_dir / METADATA_NAME).is_file():
        try:
            return int(json.loads((index_dir / METADATA_NAME).read_text()).get("generation", 0)) + 1
        except (OSError, ValueError):
            return 1
    return 1
