"""A database index: images embedded once by the teacher at DR, stored with faiss for student queries.

Contract:
    ``index_images(network, paths, image_size, index_dir, ...)`` embeds ``paths`` (rows ``(N, D)`` float32,
    L2-normalised, in path order) and creates or appends to the index stored in ``index_dir``;
    ``load_index(index_dir)`` -> :class:`DatabaseIndex` (faiss index, embeddings, paths, labels, metadata).
    The similarity is the inner product (= cosine, the embeddings being L2-normalised).

On-disk layout (``index_dir``)::

    index.json               metadata; the commit record naming the files of the current generation
    index-<G>.faiss          the faiss index (faiss.write_index)
    embeddings-<G>.npy       (N, D) float32 embeddings, rows in index order (re-adding, exact re-ranking)
    paths-<G>.json           the N image paths, as given on the command line / resolved from a list file
    labels-<G>.npy           (N,) int64 class labels (-1 where the images did not come from a dataset split)
    .lock                    present while a writer holds the index (raml.deploy.lock)

``index.json`` holds the format version, index type and effective parameters, the embedding dimension and
dtype, the network's checkpoint path, content SHA-256 and meta, the image size, the count, the datasets
added, and ``files`` (the names above). An update writes every file of the next generation ``G + 1``
through temporary files that are fsynced, renamed into place and their directory fsynced
(``raml.utils.atomic_path``), and only then replaces ``index.json`` the same way: that rename is the
commit. A crash, an error or a power loss at any earlier point leaves the previous ``index.json`` and the
files it names untouched; files of an uncommitted generation are removed on error or at the next update.
An update holds the directory's lock (:class:`raml.deploy.lock.DirectoryLock`) from reading the current
generation to the commit, so a second writer is refused at once; readers take no lock (see
:func:`load_index`).

Index types (all inner product): ``flat`` (``IndexFlatIP``, exact), ``ivf`` (``IndexIVFFlat``: k-means
coarse quantiser with ``nlist`` cells, ``nprobe`` of them searched), ``hnsw`` (``IndexHNSWFlat``: a graph
with ``hnsw_m`` links per node, ``ef_search`` candidates kept while searching) and ``ivfpq``
(``IndexIVFPQ``: IVF cells whose vectors are compressed to ``m`` codes of ``nbits`` bits). The trained types
learn their quantisers from a random sample of at most ``train_size`` embeddings of the first build;
later appends reuse them.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.data.images import ImageLoadError
from raml.data.splits import IMAGE_EXTENSIONS
from raml.deploy.lock import LOCK_NAME, DirectoryLock
from raml.retrieval.extract import extract_embeddings
from raml.utils import atomic_numpy_save, atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "METADATA_NAME",
    "DatabaseIndex",
    "IndexDirectoryError",
    "IndexParams",
    "apply_search_params",
    "build_faiss_index",
    "check_images_exist",
    "collect_images",
    "embed_images",
    "image_key",
    "import_faiss",
    "index_images",
    "load_index",
    "read_image_list",
]

FORMAT = "raml-index"
FORMAT_VERSION = 1
METADATA_NAME = "index.json"
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
"""Supported index types, see the module docstring."""

_FILE_KINDS = {"index": "faiss", "embeddings": "npy", "paths": "json", "labels": "npy"}
_DEFAULT_TRAIN_SIZE = 200_000
_NO_LABEL = -1
_LOAD_ATTEMPTS = 3  # loads of successive generations when writers keep committing during a load


class IndexDirectoryError(ValueError):
    """An index directory is missing, damaged, or incompatible with the requested operation."""


def import_faiss() -> Any:
    """Import faiss, with a clear error when it is not installed."""
    # faiss logs every CPU-specific library it tries at INFO level; only its warnings are of interest.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss is installed in the dev environment
        raise ImportError(
            "The deployment index needs faiss; install it with `pip install faiss-cpu` (or `pip install "
            "raml[index]`; faiss-gpu works too)."
        ) from error
    return faiss


@dataclass(frozen=True)
class IndexParams:
    """How to build a faiss index; ``None`` means a default derived from the data (see :meth:`resolve`).

    Attributes:
        index_type: One of :data:`INDEX_TYPES`.
        nlist: IVF cells (ivf, ivfpq); default ``round(4 * sqrt(N))``, at most one per 39
            training vectors.
        nprobe: IVF cells searched per query (ivf, ivfpq); default ``max(1, nlist // 8)``.
        m: PQ sub-quantisers (ivfpq); must divide D; default the largest divisor of D up to ``D // 8``.
        nbits: Bits per PQ code (ivfpq); default 8, fewer when the training sample has under 256 vectors.
        hnsw_m: Graph links per node (hnsw).
        ef_construction: Candidate list size while building (hnsw).
        ef_search: Candidate list size while searching (hnsw; raised to k when searching deeper).
        train_size: Training sample size (ivf, ivfpq); default all embeddings up to 200,000.
        seed: Seed of the training sample.
    """

    index_type: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    m: int | None = None
    nbits: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    train_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"Unknown index type {self.index_type!r}; choose one of {', '.join(INDEX_TYPES)}.")
        for name in ("nlist", "nprobe", "m", "nbits", "train_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (default), got {value!r}.")
        for name in ("hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.nbits is not None and self.nbits > 16:
            raise ValueError(f"nbits must be at most 16 (bits per PQ code), got {self.nbits}.")

    def resolve(self, num_vectors: int, dim: int) -> IndexParams:
        """Fill in the defaults for ``num_vectors`` embeddings of dimension ``dim``; check feasibility.

        Raises:
            ValueError: When the parameters cannot work with this data (e.g. more IVF cells than training
                vectors, or ``m`` not dividing ``dim``); the message says what to change.
        """
        if num_vectors < 1:
            raise ValueError("Cannot build an index without any embeddings.")
        out = self
        if self.index_type in ("ivf", "ivfpq"):
            train = min(num_vectors, self.train_size or _DEFAULT_TRAIN_SIZE)
            # ~4 sqrt(N) cells, but no fewer than ~39 training vectors per cell (faiss's k-means minimum)
            default_nlist = max(1, min(round(4 * math.sqrt(num_vectors)), train // 39))
            nlist = self.nlist if self.nlist is not None else default_nlist
            if nlist > train:
                raise ValueError(
                    f"--nlist {nlist} needs at least {nlist} training vectors but only {train} are available "
                    f"({num_vectors} images, --train-size {self.train_size}); lower --nlist (about 4 * sqrt(N) "
                    "is usual) or index more images."
                )
            nprobe = self.nprobe if self.nprobe is not None else max(1, nlist // 8)
            if nprobe > nlist:
                raise ValueError(f"--nprobe {nprobe} exceeds --nlist {nlist}; choose nprobe <= nlist.")
            out = replace(out, train_size=train, nlist=nlist, nprobe=nprobe)
            if self.index_type == "ivfpq":
                m = self.m if self.m is not None else max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
                if dim % m != 0:
                    raise ValueError(
                        f"--m {m} must divide the embedding dimension {dim} (each PQ sub-quantiser codes "
                        f"{dim}/m dimensions); choose a divisor such as "
                        f"{', '.join(str(d) for d in range(1, dim + 1) if dim % d == 0 and d <= 64)}."
                    )
                nbits = self.nbits if self.nbits is not None else min(8, int(math.log2(train)))
                if 2**nbits > train:
                    raise ValueError(
                        f"--nbits {nbits} needs at least {2**nbits} training vectors (one per PQ centroid) "
                        f"but only {train} are available; lower --nbits or index more images."
                    )
                out = replace(out, m=m, nbits=nbits)
        return out

    def factory_string(self) -> str:
        """The ``faiss.index_factory`` description of a resolved parameter set."""
        if self.index_type == "flat":
            return "Flat"
        if self.index_type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        if self.index_type == "ivf":
            return f"IVF{self.nlist},Flat"
        # "np": no polysemous training (a slow code-reordering step for Hamming filtering, which we do not use)
        return f"IVF{self.nlist},PQ{self.m}x{self.nbits}np"


def build_faiss_index(embeddings: np.ndarray, params: IndexParams) -> tuple[Any, IndexParams]:
    """Build (train and fill) an inner-product faiss index.

    Args:
        embeddings: ``(N, D)`` float32, L2-normalised.
        params: Index type and parameters; defaults are resolved from the data.

    Returns:
        The faiss index holding all N vectors (ids 0..N-1) and the resolved parameters.
    """
    faiss = import_faiss()
    x = _as_float32(embeddings)
    resolved = params.resolve(x.shape[0], x.shape[1])
    index = faiss.index_factory(x.shape[1], resolved.factory_string(), faiss.METRIC_INNER_PRODUCT)
    if resolved.index_type == "hnsw":
        index.hnsw.efConstruction = resolved.ef_construction
    if not index.is_trained:
        rng = np.random.default_rng(resolved.seed)
        sample = (
            x
            if resolved.train_size >= x.shape[0]
            else x[np.sort(rng.choice(x.shape[0], resolved.train_size, replace=False))]
        )
        logger.info("Training a %s index on %d embeddings", resolved.factory_string(), sample.shape[0])
        index.train(sample)
    index.add(x)
    apply_search_params(index, resolved)
    return index, resolved


def apply_search_params(index: Any, params: IndexParams, k: int | None = None) -> None:
    """Set the search-time knobs (``nprobe``, ``efSearch``) of ``index`` from ``params``.

    Args:
        index: A faiss index built by :func:`build_faiss_index`.
        params: Resolved parameters (what the index was built with, ``nprobe`` possibly overridden).
        k: Results wanted per query; HNSW keeps at least k candidates.
    """
    faiss = import_faiss()
    if params.index_type in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params.nprobe)
    elif params.index_type == "hnsw":
        index.hnsw.efSearch = max(int(params.ef_search), int(k or 0))


def _as_float32(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"Expected a non-empty (N, D) matrix of embeddings, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("The embeddings contain NaN or infinite values; check the network and the images.")
    return x


# ---------------------------------------------------------------------------------------------- image lists


def collect_images(directory: str | Path) -> list[str]:
    """Image files under ``directory`` (recursively), sorted by their path relative to it.

    Args:
        directory: A folder; files with an extension in ``raml.data.splits.IMAGE_EXTENSIONS`` (any case)
            are taken, hidden files and folders are skipped.

    Returns:
        Paths as ``str(directory / relative_path)`` (relative when ``directory`` is relative).

    Raises:
        FileNotFoundError: If ``directory`` is not a folder.
        ValueError: If it holds no image.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {str(directory)!r} is not a folder; give a folder of images.")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(directory)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    if not found:
        raise ValueError(
            f"No images found under {str(directory)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)."
        )
    return [str(directory / rel) for rel in sorted(found)]


def read_image_list(list_file: str | Path) -> list[str]:
    """Image paths listed in a text file, one per line.

    Blank lines and lines starting with ``#`` are skipped; relative paths are relative to the list file's
    folder (returned as ``str(list_folder / path)``), absolute paths are kept.

    Raises:
        FileNotFoundError: If the list file does not exist.
        ValueError: If it lists no path.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(
            f"--list {str(list_file)!r} does not exist; give a text file with one image path per line."
        )
    paths = []
    for line in list_file.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        paths.append(str(path if path.is_absolute() else list_file.parent / path))
    if not paths:
        raise ValueError(f"--list {str(list_file)!r} lists no image paths (one path per line expected).")
    return paths


def image_key(path: str) -> str:
    """Identity of an image file for duplicate detection: its normalised absolute path."""
    return os.path.normcase(os.path.abspath(path))


def check_images_exist(paths: Sequence[str]) -> None:
    """Raise :class:`~raml.data.images.ImageLoadError` naming the missing files, before any embedding."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5])
        raise ImageLoadError(
            f"{len(missing)} of {len(paths)} images do not exist (e.g. {shown}); fix the paths (relative paths "
            "in a list file are relative to the list file's folder)."
        )


# ---------------------------------------------------------------------------------------------- embedding


def embed_images(
    network: nn.Module,
    paths: Sequence[str],
    image_size: int,
    devices: Sequence[torch.device],
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    description: str = "embed",
) -> np.ndarray:
    """Embed ``paths`` at ``image_size``, sharding contiguous chunks over ``devices`` (one thread each).

    Args:
        network: ``(B, 3, S, S)`` -> ``(B, D)`` L2-normalised, on ``devices[0]``; copies are made for the
            other devices.
        paths: Image files; the rows follow this order.
        image_size: S.
        devices: Devices to use (several CUDA devices shard the work; a single entry runs in this thread).
        batch_size: Images per forward pass.
        workers: DataLoader workers per device.
        progress: Show progress bars.
        description: Label of the progress bar.

    Returns:
        ``(N, D)`` float32 embeddings.
    """
    if not devices:
        raise ValueError("embed_images needs at least one device.")
    paths = [str(p) for p in paths]
    shards = min(len(devices), len(paths))
    if shards <= 1:
        return extract_embeddings(
            network, paths, image_size, devices[0], batch_size, workers, progress, description
        ).numpy()
    bounds = np.linspace(0, len(paths), shards + 1).astype(int)
    results: list[np.ndarray | None] = [None] * shards
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            replica = network if i == 0 else copy.deepcopy(network).to(devices[i])
            results[i] = extract_embeddings(
                replica,
                paths[bounds[i] : bounds[i + 1]],
                image_size,
                devices[i],
                batch_size,
                workers,
                progress and i == 0,
                f"{description} [{devices[i]}]",
            ).numpy()
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), name=f"raml-embed-{i}") for i in range(shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    logger.info("Embedded %d images on %d devices", len(paths), shards)
    return np.concatenate(results)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the index


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
    """

    directory: Path
    meta: dict[str, Any]
    index: Any
    embeddings: np.ndarray
    paths: list[str]
    labels: np.ndarray
    params: IndexParams

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def network_sha256(self) -> str | None:
        """Content hash of the checkpoint that embedded the database."""
        return self.meta.get("network", {}).get("sha256")

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search ``(Q, D)`` queries; returns ``(scores, ids)``, each ``(Q, min(k, N))``; id -1 = no result.

        Args:
            queries: L2-normalised query embeddings of dimension D.
            k: Results per query (clamped to the index size).
            nprobe: Override the stored IVF ``nprobe`` for this search.
        """
        q = _as_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(
                f"Query embeddings have dimension {q.shape[1]} but the index at {self.directory} holds "
                f"{self.dim}-dimensional embeddings; use a query network with output dimension {self.dim}."
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        k = min(k, len(self))
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
    except (OSError, json.JSONDecodeError) as error:
        raise IndexDirectoryError(
            f"{meta_path} is unreadable ({error}); rebuild the index with `raml index --overwrite`."
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexDirectoryError(f"{meta_path} is not a raml index description (format {FORMAT!r} expected).")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise IndexDirectoryError(
            f"{meta_path} has format version {meta.get('version')}, newer than this raml understands "
            f"({FORMAT_VERSION}); upgrade raml."
        )
    return meta


def _params_from_meta(meta: dict[str, Any]) -> IndexParams:
    stored = dict(meta.get("params", {}))
    known = {f for f in IndexParams.__dataclass_fields__}
    return IndexParams(**{k: v for k, v in stored.items() if k in known})


def load_index(index_dir: str | Path) -> DatabaseIndex:
    """Load an index directory written by :func:`index_images`.

    Reading takes no lock: ``index.json`` names one committed generation. Should a writer commit the next
    generation and remove this one's files between reading ``index.json`` and opening them, the load starts
    again from the new ``index.json``.

    Raises:
        IndexDirectoryError: If the directory is not an index, or its files are missing or inconsistent.
    """
    index_dir = Path(index_dir)
    meta = _read_metadata(index_dir)
    for attempt in range(1, _LOAD_ATTEMPTS + 1):
        try:
            return _load_generation(index_dir, meta)
        except IndexDirectoryError:
            current = _read_metadata(index_dir)
            if current.get("files") == meta.get("files") or attempt == _LOAD_ATTEMPTS:
                raise
            logger.info("The index at %s was updated while loading it; loading the new generation", index_dir)
            meta = current
    raise AssertionError("unreachable")  # pragma: no cover


def _load_generation(index_dir: Path, meta: dict[str, Any]) -> DatabaseIndex:
    faiss = import_faiss()
    files = meta.get("files", {})
    try:
        paths_file, emb_file, labels_file, index_file = (
            index_dir / files[k] for k in ("paths", "embeddings", "labels", "index")
        )
        paths = json.loads(paths_file.read_text())
        embeddings = np.load(emb_file, allow_pickle=False)
        labels = np.load(labels_file, allow_pickle=False)
        index = faiss.read_index(str(index_file))
    except (KeyError, OSError, ValueError, RuntimeError) as error:
        raise IndexDirectoryError(
            f"The index at {index_dir} is damaged ({type(error).__name__}: {error}); rebuild it with "
            "`raml index --overwrite`."
        ) from error
    count = int(meta["count"])
    if not (len(paths) == embeddings.shape[0] == labels.shape[0] == index.ntotal == count):
        raise IndexDirectoryError(
            f"The index at {index_dir} is inconsistent: {count} in {METADATA_NAME}, {len(paths)} paths, "
            f"{embeddings.shape[0]} embeddings, {labels.shape[0]} labels, {index.ntotal} vectors in the faiss "
            "index; rebuild it with `raml index --overwrite`."
        )
    params = _params_from_meta(meta)
    apply_search_params(index, params)
    return DatabaseIndex(index_dir, meta, index, embeddings, [str(p) for p in paths], labels.astype(np.int64), params)


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


def _is_index_leftover(name: str) -> bool:
    """A file a writer of this folder may leave behind: lock, generation file or temporary file."""
    return name == LOCK_NAME or _is_generation_file(name) or _is_index_temporary(name)


def _remove_unreferenced(index_dir: Path, keep: set[str]) -> None:
    """Delete generation files (and leftover temporary files) that the current index.json does not name."""
    for entry in index_dir.iterdir():
        name = entry.name
        if (_is_generation_file(name) and name not in keep) or _is_index_temporary(name):
            try:
                entry.unlink()
            except OSError as error:  # not fatal: the index itself is committed
                logger.warning("Could not remove stale index file %s: %s", entry, error)


def _write_generation(
    index_dir: Path,
    meta: dict[str, Any],
    index: Any,
    embeddings: np.ndarray,
    paths: list[str],
    labels: np.ndarray,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Write the next generation's files, then commit by replacing ``index.json``; see the module docstring."""
    faiss = import_faiss()
    generation = int(meta["generation"])
    files = _generation_files(generation)
    meta["files"] = files
    index_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for kind in ("embeddings", "labels", "paths", "index"):
            target = index_dir / files[kind]
            written.append(target)
            if kind == "embeddings":
                atomic_numpy_save(np.ascontiguousarray(embeddings, dtype=np.float32), target)
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


def index_images(
    network: nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    index_dir: str | Path,
    network_sha256: str,
    network_path: str | Path | None = None,
    labels: Sequence[int] | None = None,
    dataset: str | None = None,
    params: IndexParams | None = None,
    overwrite: bool = False,
    devices: Sequence[torch.device] = (torch.device("cpu"),),
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Create an index of ``paths`` in ``index_dir``, or append them to the index already there.

    When ``index_dir`` holds an index (and ``overwrite`` is False) the images are appended: the network's
    content hash and the image size must match the index's, and images already indexed (same normalised
    absolute path) or repeated in ``paths`` are skipped. Every check runs before any image is embedded.

    Args:
        network: The database network (teacher), on ``devices[0]``; ``(B, 3, S, S)`` -> ``(B, D)``.
        paths: Image files.
        image_size: Database resolution DR.
        index_dir: The index directory (created if missing).
        network_sha256: Content hash of the network's checkpoint (see ``raml.models.checkpoint_sha256``).
        network_path: The checkpoint path, recorded for reference.
        labels: One class label per path (a dataset split), or None.
        dataset: Name of the split the images come from, recorded.
        params: Index type and parameters for a new index; None = flat for a new index, or the existing
            index's type when appending (a different explicit type is refused).
        overwrite: Build a new index even if ``index_dir`` holds one (replaced at the commit).
        devices: Devices for the extraction (several CUDA devices shard it).
        batch_size: Images per forward pass.
        workers: DataLoader workers.
        progress: Show progress bars.
        before_commit: Called after the data files are written and before ``index.json`` is replaced (tests
            use it to simulate a crash).

    Returns:
        A summary: ``{"index_dir", "added", "skipped", "count", "index_type", "params"}``.

    Raises:
        IndexDirectoryError: On an incompatible existing index, or a non-empty folder that is not an index.
        ValueError: On bad arguments (no paths, wrong number of labels, infeasible parameters).
        ImageLoadError: If images are missing or unreadable.
        LockHeldError: If another process is writing to ``index_dir`` (a ``FileExistsError``; the message
            names its PID). A lock left by a killed writer is taken over, with a warning.
    """
    index_dir = Path(index_dir)
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("No images to index: the list of paths is empty.")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"Got {len(paths)} paths but {len(labels)} labels; give one label per path (or none).")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}.")
    label_array = np.asarray(labels if labels is not None else [_NO_LABEL] * len(paths), dtype=np.int64)
    dim = int(getattr(network, "meta", {}).get("outputdim", 0)) or None

    if index_dir.exists() and not index_dir.is_dir():
        raise IndexDirectoryError(
            f"--output {str(index_dir)!r} exists and is not a folder; choose a folder for the index."
        )

    # One writer at a time: the lock spans reading the current generation to committing the next one.
    with DirectoryLock(index_dir, "raml index"):
        existing: DatabaseIndex | None = None
        if (index_dir / METADATA_NAME).exists() and not overwrite:
            existing = load_index(index_dir)
            _check_append(existing, network_sha256, image_size, dim, params)
        elif not (index_dir / METADATA_NAME).exists():
            # A folder holding only what a killed first build left (generation, temporary, lock files) is reused.
            foreign = sorted(p.name for p in index_dir.iterdir() if not _is_index_leftover(p.name))
            if foreign:
                raise IndexDirectoryError(
                    f"--output {str(index_dir)!r} is a non-empty folder that holds no raml index (it holds "
                    f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder "
                    "(nothing was written)."
                )

        # Duplicates: against the index, and within this call.
        seen = {image_key(p) for p in existing.paths} if existing is not None else set()
        keep: list[int] = []
        for i, path in enumerate(paths):
            key = image_key(path)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        skipped = len(paths) - len(keep)
        if skipped:
            logger.info("Skipping %d image(s) already in the index or repeated", skipped)
        new_paths = [paths[i] for i in keep]
        new_labels = label_array[keep]
        if existing is not None and not new_paths:
            logger.info("Nothing to add: all %d images are already in %s", len(paths), index_dir)
            return _summary(index_dir, existing.meta, 0, skipped)
        check_images_exist(new_paths)
        if existing is None and dim is not None:
            (params or IndexParams()).resolve(len(new_paths), dim)  # infeasible parameters fail before embedding

        embeddings = embed_images(
            network, new_paths, image_size, list(devices), batch_size, workers, progress, f"index@{image_size}"
        )
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        if existing is None:
            index, resolved = build_faiss_index(embeddings, params or IndexParams())
            meta: dict[str, Any] = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "generation": _next_generation(index_dir),
                "index_type": resolved.index_type,
                "faiss_factory": resolved.factory_string(),
                "metric": "inner_product",
                "params": asdict(resolved),
                "dim": int(embeddings.shape[1]),
                "dtype": "float32",
                "network": {
                    "path": str(network_path) if network_path is not None else None,
                    "sha256": network_sha256,
                    "meta": dict(getattr(network, "meta", {}) or {}),
                },
                "image_size": int(image_size),
                "transform": (
                    "resize shorter side to S*8/7 (Lanczos), centre crop S, normalise with the network's mean/std"
                ),
                "count": int(embeddings.shape[0]),
                "datasets": [dataset] if dataset else [],
                "created": now,
                "updated": now,
            }
            all_embeddings, all_paths, all_labels = embeddings, new_paths, new_labels
        else:
            index = existing.index
            index.add(embeddings)
            meta = dict(existing.meta)
            meta["generation"] = int(meta["generation"]) + 1
            meta["count"] = int(index.ntotal)
            meta["updated"] = now
            if dataset and dataset not in meta.get("datasets", []):
                if meta.get("datasets") and labels is not None:
                    logger.warning(
                        "Appending labelled images of %s to an index holding %s: class labels of different splits "
                        "are not comparable.",
                        dataset,
                        ", ".join(meta["datasets"]),
                    )
                meta["datasets"] = [*meta.get("datasets", []), dataset]
            all_embeddings = np.concatenate([existing.embeddings, embeddings])
            all_paths = [*existing.paths, *new_paths]
            all_labels = np.concatenate([existing.labels, new_labels])
        _write_generation(index_dir, meta, index, all_embeddings, all_paths, all_labels, before_commit)
        logger.info(
            "Index %s: %d added, %d skipped, %d in total (%s)",
            index_dir,
            len(new_paths),
            skipped,
            meta["count"],
            meta["index_type"],
        )
        return _summary(index_dir, meta, len(new_paths), skipped)


def _next_generation(index_dir: Path) -> int:
    if (index_dir / METADATA_NAME).is_file():
        try:
            return int(json.loads((index_dir / METADATA_NAME).read_text()).get("generation", 0)) + 1
        except (OSError, ValueError):
            return 1
    return 1


def _summary(index_dir: Path, meta: dict[str, Any], added: int, skipped: int) -> dict[str, Any]:
    return {
        "index_dir": str(index_dir),
        "added": added,
        "skipped": skipped,
        "count": int(meta["count"]),
        "index_type": meta["index_type"],
        "params": meta["params"],
    }


def _check_append(
    existing: DatabaseIndex, network_sha256: str, image_size: int, dim: int | None, params: IndexParams | None
) -> None:
    where = existing.directory
    if existing.network_sha256 != network_sha256:
        raise IndexDirectoryError(
            f"Refusing to append to {where}: it was built by the network {existing.meta['network'].get('path')!r} "
            f"(sha256 {str(existing.network_sha256)[:12]}...), not by this one (sha256 {network_sha256[:12]}...); "
            "embeddings of different networks are not comparable. Use the same network, or --overwrite to "
            "rebuild the index."
        )
    if int(existing.meta["image_size"]) != int(image_size):
        raise IndexDirectoryError(
            f"Refusing to append to {where}: it was built at --image-size {existing.meta['image_size']}, not "
            f"{image_size}; use the same size, or --overwrite to rebuild the index."
        )
    if dim is not None and dim != existing.dim:
        raise IndexDirectoryError(
            f"Refusing to append {dim}-dimensional embeddings to the {existing.dim}-dimensional index {where}."
        )
    if params is not None and params.index_type != existing.meta["index_type"]:
        raise IndexDirectoryError(
            f"Refusing to append with --index-type {params.index_type} to the {existing.meta['index_type']} index "
            f"{where}; omit --index-type to append, or use --overwrite to rebuild it as {params.index_type}."
        )
    if params is not None:
        stored = existing.params
        changed = [
            name
            for name in ("nlist", "m", "nbits", "hnsw_m", "ef_construction", "train_size", "nprobe", "ef_search")
            if getattr(params, name) not in (None, getattr(stored, name))
            and getattr(params, name) != getattr(IndexParams(), name)
        ]
        if changed:
            logger.warning(
                "Appending keeps the parameters of the existing index %s; ignoring %s (use --overwrite to rebuild).",
                where,
                ", ".join(changed),
            )
