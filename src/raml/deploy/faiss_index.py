"""faiss index types and their parameters: build an inner-product index from embeddings, set search knobs.

Contract:
    ``build_faiss_index((N, D) float32 L2-normalised, IndexParams)`` -> (faiss index holding ids ``0..N-1``,
    resolved parameters). The similarity is the inner product (= cosine, the embeddings being L2-normalised).
    ``empty_faiss_index(params, D)`` / ``train_faiss_index`` / ``add_with_ids`` / ``remove_ids`` build and update
    an index in pieces (from shards, one shard in memory at a time); ids are the caller's (int64), never
    positions: flat and HNSW indexes are wrapped in ``IndexIDMap2``, IVF indexes carry ids themselves.

Index types (all inner product): ``flat`` (``IndexFlatIP``, exact), ``ivf`` (``IndexIVFFlat``: k-means
coarse quantiser with ``nlist`` cells, ``nprobe`` of them searched), ``hnsw`` (``IndexHNSWFlat``: a graph
with ``hnsw_m`` links per node, ``ef_search`` candidates kept while searching) and ``ivfpq``
(``IndexIVFPQ``: IVF cells whose vectors are compressed to ``m`` codes of ``nbits`` bits). The trained types
learn their quantisers from a random sample of at most ``train_size`` embeddings of the first build;
later appends reuse them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "C_INT_MAX",
    "HNSW_EF_MAX",
    "HNSW_M_RANGE",
    "INDEX_TYPES",
    "IndexParams",
    "apply_search_params",
    "as_float32_matrix",
    "add_with_ids",
    "build_faiss_index",
    "empty_faiss_index",
    "has_ids",
    "import_faiss",
    "remove_ids",
    "train_faiss_index",
]

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
"""Supported index types, see the module docstring."""

_DEFAULT_TRAIN_SIZE = 200_000

C_INT_MAX = 2**31 - 1
"""Largest value faiss takes as a C ``int`` (``nlist`` and PQ ``m`` are parsed from the factory string with
``std::stoi``); a larger one fails inside faiss (``C++ exception stoi``, ``OverflowError``)."""

HNSW_M_RANGE = (2, 512)
"""Accepted ``hnsw_m``. faiss sets its level multiplier to ``1 / ln(M)``: at M = 1 that is infinite, the graph
gets no level and adding a vector crashes the process (segmentation fault, faiss 1.15). Each vector stores 2M
int32 links on level 0 (8M bytes: 4 KB at 512, already twice a 512-d float32 embedding, while recall stops
improving well below it; the usual range is 16-64); nothing larger is of use."""

HNSW_EF_MAX = 1_000_000
"""Largest ``ef_search`` / ``ef_construction``. faiss allocates a heap of ``efSearch`` entries (8 bytes each) per
query searched in parallel: 8 MB at this bound, 800 MB at 10^8, 16 GB near the C ``int`` limit; a list this long
already visits most of any graph worth searching approximately (``flat`` is exact)."""


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
        hnsw_m: Graph links per node (hnsw), within :data:`HNSW_M_RANGE`.
        ef_construction: Candidate list size while building (hnsw), at most :data:`HNSW_EF_MAX`.
        ef_search: Candidate list size while searching (hnsw; raised to k when searching deeper), at most
            :data:`HNSW_EF_MAX`.
        train_size: Training sample size (ivf, ivfpq); default all embeddings up to 200,000.
        seed: Seed of the training sample (non-negative).
        on_disk: Store the inverted lists in their own file, built by merging per-chunk indexes and served
            memory-mapped (ivf, ivfpq; :mod:`raml.deploy.ondisk_ivf`), for an index larger than memory.
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
    on_disk: bool = False

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"Unknown index type {self.index_type!r}; choose one of {', '.join(INDEX_TYPES)}.")
        if not isinstance(self.on_disk, bool):
            raise ValueError(f"on_disk must be True or False, got {self.on_disk!r}.")
        if self.on_disk and self.index_type not in ("ivf", "ivfpq"):
            raise ValueError(
                f"--on-disk stores inverted lists, which only ivf and ivfpq indexes have (not {self.index_type}); "
                "use --index-type ivfpq (or ivf). Flat and HNSW indexes are memory-mapped when loaded anyway."
            )
        for name in ("nlist", "nprobe", "m", "nbits", "train_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (default), got {value!r}.")
        for name in ("hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        # what reaches faiss as a C int, checked here: before anything is embedded, not in faiss after it
        for name in ("nlist", "nprobe", "m"):
            value = getattr(self, name)
            if value is not None and value > C_INT_MAX:
                raise ValueError(
                    f"--{name} ({name}) must be at most {C_INT_MAX} (faiss takes it as a C int), got {value}."
                )
        if self.nbits is not None and self.nbits > 16:
            raise ValueError(f"--nbits (nbits) must be at most 16 (bits per PQ code), got {self.nbits}.")
        low, high = HNSW_M_RANGE
        if not low <= self.hnsw_m <= high:
            raise ValueError(
                f"--hnsw-m (hnsw_m) must be between {low} and {high} graph links per node, got {self.hnsw_m} "
                "(faiss crashes at 1; each vector stores 8*M bytes of links and 16-64 is usual)."
            )
        for name in ("ef_construction", "ef_search"):
            value = getattr(self, name)
            if value > HNSW_EF_MAX:
                flag = "--ef-search (ef_search)" if name == "ef_search" else name  # no flag sets ef_construction
                raise ValueError(
                    f"{flag} must be at most {HNSW_EF_MAX} candidates, got {value} (faiss allocates "
                    "8 bytes per candidate for each query; use --index-type flat for an exact search)."
                )

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


def empty_faiss_index(resolved: IndexParams, dim: int) -> Any:
    """An empty (untrained where the type needs training) inner-product index that stores caller ids."""
    faiss = import_faiss()
    wrap = resolved.index_type in ("flat", "hnsw")  # IVF indexes store ids themselves
    factory = ("IDMap2," if wrap else "") + resolved.factory_string()
    index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    if resolved.index_type == "hnsw":
        _hnsw(index).efConstruction = resolved.ef_construction
    return index


def training_sample(num_rows: int, resolved: IndexParams) -> np.ndarray | None:
    """Sorted row numbers of the training sample (None = every row), drawn with ``resolved.seed``."""
    if resolved.train_size is None or resolved.train_size >= num_rows:
        return None
    rng = np.random.default_rng(resolved.seed)
    return np.sort(rng.choice(num_rows, resolved.train_size, replace=False))


def train_faiss_index(index: Any, embeddings: np.ndarray, resolved: IndexParams) -> None:
    """Train ``index`` (if its type needs it) on a sample of ``embeddings`` (an array or a memory map: only the
    sampled rows are read)."""
    if index.is_trained:
        return
    rows = training_sample(embeddings.shape[0], resolved)
    sample = as_float32_matrix(embeddings if rows is None else embeddings[rows])
    logger.info("Training a %s index on %d embeddings", resolved.factory_string(), sample.shape[0])
    index.train(sample)


def add_with_ids(index: Any, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Add ``(n, D)`` rows under the int64 ``ids``."""
    x = as_float32_matrix(embeddings)
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))


def has_ids(index: Any) -> bool:
    """Whether ``index`` stores caller ids (an id map or an IVF index); indexes written by raml before ids
    existed (plain flat / HNSW) number their vectors by position instead."""
    faiss = import_faiss()
    return isinstance(index, faiss.IndexIDMap) or _ivf_or_none(index) is not None


def remove_ids(index: Any, ids: np.ndarray) -> bool:
    """Remove ``ids`` from ``index`` in place where faiss supports it (id maps over flat, IVF).

    Returns:
        False when the index type cannot remove (HNSW): the caller rebuilds it from the remaining rows.
    """
    faiss = import_faiss()
    if len(ids) == 0:
        return True
    if not has_ids(index):
        return False
    try:
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
    except RuntimeError:  # HNSW: no removal in faiss
        return False
    return True


def build_faiss_index(
    embeddings: np.ndarray, params: IndexParams, ids: np.ndarray | None = None, chunk_rows: int = 65536
) -> tuple[Any, IndexParams]:
    """Build (train and fill) an inner-product faiss index.

    Args:
        embeddings: ``(N, D)`` float32, L2-normalised (an array or a memory map; read ``chunk_rows`` at a time).
        params: Index type and parameters; defaults are resolved from the data.
        ids: ``(N,)`` int64 ids of the rows; default ``0..N-1``.
        chunk_rows: Rows added per call.

    Returns:
        The faiss index holding all N vectors and the resolved parameters.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"Expected a non-empty (N, D) matrix of embeddings, got shape {embeddings.shape}.")
    n, dim = embeddings.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    resolved = params.resolve(n, dim)
    index = empty_faiss_index(resolved, dim)
    train_faiss_index(index, embeddings, resolved)
    for start in range(0, n, chunk_rows):
        add_with_ids(index, embeddings[start : start + chunk_rows], ids[start : start + chunk_rows])
    apply_search_params(index, resolved)
    return index, resolved


def _ivf_or_none(index: Any) -> Any:
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def _hnsw(index: Any) -> Any:
    """The HNSW graph of an HNSW index, wrapped in an id map or not."""
    faiss = import_faiss()
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    return index.hnsw


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
        _hnsw(index).efSearch = max(int(params.ef_search), int(k or 0))


def as_float32_matrix(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(N, D)`` embeddings as a contiguous float32 array; refuses empty, non-2-D or non-finite input."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"Expected a non-empty (N, D) matrix of embeddings, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("The embeddings contain NaN or infinite values; check the network and the images.")
    return x
