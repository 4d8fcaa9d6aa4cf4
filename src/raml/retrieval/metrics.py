"""Exact retrieval metrics (mAP, Recall@k) in bounded memory, normally without sorting similarity rows.

Contract:
    ``query (Nq, D)`` and ``database (Nd, D)`` float embeddings (L2-normalised; the similarity is the dot
    product, computed in float32) with one label per row -> ``{"mAP": %, "R@k": %, "num_queries": n,
    "num_no_positive": m}``.

Definitions (SPEC section 4):
    * The positives of a query are the database items with its label; with ``exclude_self`` the i-th
      database item is junk for the i-th query (ignored: neither positive nor negative). Everything else
      is a negative.
    * Ranks are 0-based positions in the database sorted by decreasing similarity, junk removed.
    * AP is the trapezoid rule of the revisited Oxford/Paris ``compute_ap``: for the j-th positive
      (0-based, in rank order) at rank ``r_j``, ``precision_0 = 1 if r_j == 0 else j / r_j``,
      ``precision_1 = (j + 1) / (r_j + 1)``, ``AP = sum_j (precision_0 + precision_1) / 2 / n_pos``.
    * R@k is the share of queries with at least one positive among their k nearest neighbours.
    * Queries without any positive in the database are left out of mAP and R@k and counted in
      ``num_no_positive``.
    * Ties (pessimistic): a positive whose similarity equals a negative's is ranked after that negative.
      Ties among positives do not matter, since they do not change the set of ranks.

Method: the result is exactly that of a full sort of every row, but no row is sorted. Queries are grouped
by their number of positives (sorted by it) and processed in blocks; for a block the similarities
``S = Q_b @ X^T`` are computed once (the only ``(B, Nd)`` float buffer, about 256 MB by default), the
positives' similarities are gathered and sorted decreasingly (``s_0 >= s_1 >= ...``), positives and junk
are overwritten with ``-inf``, and ``r_j = j + #{negatives with similarity >= s_j}``. The counts take one
comparison pass per positive over the row: on the CPU by a compiled compare-and-add loop
(:mod:`raml.retrieval.count_kernel`), the row staying in the L2 cache across its passes, over
``torch.get_num_threads()`` threads; on other devices, and for small evaluations (below
``_COMPILED_MIN_COMPARISONS``, where loading the kernels would cost more than they save), with torch. For
queries with very many positives (``>= _SORT_MIN_POSITIVES``) the rows are sorted instead and the counts read
off by binary search. Extra memory beyond ``S``: a few KB per thread.

Symmetric tests (``exclude_self`` with the same embeddings and labels on both sides): ``S`` is symmetric, so
each pair of blocks is computed once (:func:`_symmetric_scores`). Items are ordered by (number of positives,
class); the positives' similarities come from per-class products through the same GEMM kind; for blocks
``i <= j`` the square ``S_ij = X_i @ X_j^T`` (about 67 MB) has class-mates and self set to ``-inf`` (in both
directions at once) and is counted along its rows for the queries of block ``i`` and along its columns for
those of block ``j`` (a few rows at a time, summed per column in 1-byte counters). Every query's AP is computed
along its row sequentially and the per-query APs are summed in query order, so both paths give bit-identical
results. The sums stay on the embeddings' device; one transfer to the host at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["average_precision", "retrieval_metrics"]

# Budget of one block of similarities (float32) when block_size is not given.
_BLOCK_BYTES = 256 * 2**20
# On CPU tensors, count with the compiled kernels (raml.retrieval.count_kernel) from this many comparisons (entries
# x positives) on. Loading them costs about 0.5 s once per process (numba's import and LLVM); torch's passes take
# about 1.7 ns per comparison on one thread, so below this an evaluation spends at most ~50 ms in them (the tests'
# and the demo's evaluations, 1e5-1e7 comparisons, never load numba), and a process that evaluates a larger set
# every epoch recovers the load within a few evaluations. Tests set it to 0 (compiled) or beyond any size (the
# torch path, the one a CUDA device takes).
_COMPILED_MIN_COMPARISONS = 3 * 10**7
# Rows of similarities counted at once on the CPU: small enough to stay in the L2 cache across the passes.
_CHUNK_BYTES = 2**20
# Above this many positives per query, sorting rows is cheaper than one comparison pass per positive.
_SORT_MIN_POSITIVES = 512
# Rows sorted at once on the sorting path (values + int64 indices, kept small).
_SORT_CHUNK_BYTES = 64 * 2**20
# Symmetric tests (queries = database, self excluded) compute each pair of blocks once; tests switch it off
# to compare with the one-sided path.
_SYMMETRIC_PAIRS = True
# Budget of one square block of similarities (float32) of a symmetric test when block_size is not given.
_PAIR_BYTES = 64 * 2**20
# Rows of one product of class-mates when the symmetric path gathers the positives' similarities.
_GRAM_ROWS = 256


def average_precision(ranks: Sequence[int] | np.ndarray) -> float:
    """Average precision of one query by the trapezoid rule (revisited Oxford/Paris ``compute_ap``).

    Args:
        ranks: 0-based ranks of the query's positives in the ranked database (junk removed), strictly
            increasing; one entry per positive.

    Returns:
        AP in [0, 1] (not a percentage).

    Raises:
        ValueError: if ``ranks`` is empty, not 1-D, not integral, negative or not strictly increasing.
    """
    arr = np.asarray(ranks)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"average_precision expects a non-empty 1-D list of ranks (one per positive), got shape "
            f"{arr.shape}; a query without positives has no AP: leave it out."
        )
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"average_precision expects integer ranks, got dtype {arr.dtype} ({arr[:5]}...).")
        arr = arr.astype(np.int64)
    if arr[0] < 0 or np.any(np.diff(arr) <= 0):
        raise ValueError(
            "average_precision expects 0-based, non-negative, strictly increasing ranks (the positions of "
            f"the positives sorted ascending), got {arr.tolist()[:10]}."
        )
    r = arr.astype(np.float64)
    j = np.arange(r.size, dtype=np.float64)
    precision_0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    precision_1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((precision_0 + precision_1) / 2.0) / r.size)


def _as_embeddings(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be a float array of embeddings, got dtype {x.dtype}.")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    elif isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a float tensor of embeddings, got dtype {x.dtype}.")
        x = x.detach().to(torch.float32).contiguous()
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray of shape (N, D), got {type(x).__name__}.")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D) (one embedding per row), got shape {tuple(x.shape)}.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); it needs at least one row and one dimension.")
    # A float64 sum is finite iff every entry is (NaN and inf propagate); one cheap reduction.
    if not bool(torch.isfinite(x.sum(dtype=torch.float64))):
        raise ValueError(f"{name} contains NaN or infinite values; check the embedding extraction.")
    return x


def _as_labels(labels: object, name: str, expected: int, what: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row of {what}), got shape {arr.shape}.")
    if arr.shape[0] != expected:
        raise ValueError(
            f"{name} has {arr.shape[0]} labels but {what} has {expected} rows; give exactly one label per row."
        )
    return arr


def _encode_labels(query_labels: np.ndarray, database_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels of any comparable type to class ids ``0..C-1`` shared by both sides."""
    try:
        _, inverse = np.unique(np.concatenate([query_labels, database_labels]), return_inverse=True)
    except TypeError as exc:
        raise ValueError(
            "query_labels and database_labels must be of one comparable type (e.g. all ints or all strings)."
        ) from exc
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse[: query_labels.shape[0]], inverse[query_labels.shape[0] :]


def _check_ks(ks: Sequence[int]) -> list[int]:
    if isinstance(ks, (int, np.integer, str)):
        raise ValueError(f"ks must be a sequence of integers such as (1, 2, 4, 8), got {ks!r}.")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k in ks must be an integer >= 1 (Recall@k), got {k!r} in {list(ks)}.")
        out.append(int(k))
    return out


def _count_by_passes(sims: torch.Tensor, thresholds: torch.Tensor, counts: torch.Tensor) -> None:
    """``counts[i, j] += #{c : sims[i, c] >= thresholds[i, j]}``, one torch comparison pass per threshold.

    The device-agnostic path (GPU); on the CPU :func:`raml.retrieval.count_kernel.count_rows` does the same faster.
    """
    for j in range(thresholds.shape[1]):
        counts[:, j] += (sims >= thresholds[:, j : j + 1]).sum(1)


def _count_by_sorting(sims: torch.Tensor, thresholds: torch.Tensor, counts: torch.Tensor) -> None:
    """Same contract as :func:`_count_by_passes`, by sorting chunks of rows and binary search."""
    num_rows, num_cols = sims.shape
    rows = max(1, min(num_rows, _SORT_CHUNK_BYTES // (12 * num_cols)))
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        ascending = torch.sort(sims[r0:r1], dim=1).values
        below = torch.searchsorted(ascending, thresholds[r0:r1].contiguous(), side="left")
        counts[r0:r1] += num_cols - below


def _runs(num_pos: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, stop, positives)`` of the runs of equal values in the non-decreasing ``num_pos``."""
    cuts = (np.flatnonzero(np.diff(num_pos)) + 1).tolist()
    return [(r0, r1, int(num_pos[r0])) for r0, r1 in zip([0, *cuts], [*cuts, num_pos.size])]


def retrieval_metrics(
    query: torch.Tensor | np.ndarray,
    database: torch.Tensor | np.ndarray,
    query_labels: Sequence[object] | np.ndarray | torch.Tensor,
    database_labels: Sequence[object] | np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    exclude_self: bool = False,
    block_size: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Exact mAP and Recall@k (in %) of every query against the database, in bounded memory.

    Args:
        query: ``(Nq, D)`` query embeddings (L2-normalised), tensor (any device) or array.
        database: ``(Nd, D)`` database embeddings, same ``D`` (and device, for tensors).
        query_labels: ``Nq`` class labels (ints, strings, ...).
        database_labels: ``Nd`` class labels of the same type.
        ks: the k of Recall@k, each >= 1.
        exclude_self: ignore the i-th database item for the i-th query (junk); needs ``Nq == Nd``. Use it
            when both sides embed the same images (e.g. student queries against the teacher database).
            When moreover the query embeddings and labels equal the database's (the symmetric test), each
            pair of blocks is computed once and counted both ways (see the module docstring).
        block_size: queries per block; by default as many as keep one block of float32 similarities near
            256 MB (64 MB for a symmetric test's square blocks). Smaller blocks lower the memory, never
            change the result.
        progress: show a tqdm bar over the blocks.

    Returns:
        ``{"mAP": ..., "R@k": ... for k in ks, "num_queries": scored queries, "num_no_positive": queries
        without any positive, left out of mAP and R@k}``; percentages in [0, 100].

    Raises:
        ValueError: on mismatched or empty inputs, non-finite embeddings, bad ``ks`` or ``block_size``, or
            when no query has a positive.
    """
    q = _as_embeddings(query, "query")
    x = _as_embeddings(database, "database")
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"query and database embeddings differ in dimension: query {tuple(q.shape)}, database "
            f"{tuple(x.shape)}; both must come from networks with the same output dimension."
        )
    if q.device != x.device:
        raise ValueError(f"query is on {q.device} but database is on {x.device}; move both to one device.")
    num_q, num_d = q.shape[0], x.shape[0]
    q_lab = _as_labels(query_labels, "query_labels", num_q, "query")
    d_lab = _as_labels(database_labels, "database_labels", num_d, "database")
    if exclude_self and num_q != num_d:
        raise ValueError(
            f"exclude_self=True pairs the i-th query with the i-th database item, so it needs as many queries "
            f"as database items; got {num_q} queries and {num_d} database items."
        )
    k_list = _check_ks(ks)
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer (queries per block) or None, got {block_size!r}.")

    q_cls, d_cls = _encode_labels(q_lab, d_lab)
    num_classes = int(max(q_cls.max(), d_cls.max())) + 1
    class_size = np.bincount(d_cls, minlength=num_classes)

    self_positive = np.zeros(num_q, dtype=bool)
    if exclude_self:
        self_positive = q_cls == d_cls
    num_pos = class_size[q_cls] - self_positive
    scored = np.flatnonzero(num_pos > 0)
    num_no_positive = num_q - scored.size
    if scored.size == 0:
        raise ValueError(
            f"none of the {num_q} queries has a positive in the database (no database item shares its label), "
            "so mAP and Recall@k are undefined; check that the labels of both sides use the same classes."
        )
    device = q.device
    k_tensor = torch.tensor(k_list, dtype=torch.int64, device=device)
    symmetric = (
        exclude_self
        and _SYMMETRIC_PAIRS
        and np.array_equal(q_cls, d_cls)
        and (q.data_ptr() == x.data_ptr() or torch.equal(q, x))
        # the per-query thresholds and counts of the whole set are kept: bounded like one block
        and 12 * num_q * int(num_pos.max()) <= _BLOCK_BYTES
    )
    if symmetric:
        ap, hits = _symmetric_scores(x, d_cls, k_tensor, block_size, progress)
    else:
        ap, hits = _blocked_scores(
            q, x, q_cls, d_cls, class_size, exclude_self, num_pos, k_tensor, block_size, progress
        )

    # The one transfer of results to the host: sums accumulate on the embeddings' device.
    ap_total = float(ap.sum().cpu())  # every path sums the same per-query vector in query order
    hits_host = hits.cpu().tolist()
    result: dict[str, float] = {"mAP": 100.0 * ap_total / scored.size}
    for k, h in zip(k_list, hits_host):
        result[f"R@{k}"] = 100.0 * float(h) / scored.size
    result["num_queries"] = int(scored.size)
    result["num_no_positive"] = int(num_no_positive)
    return result


def _blocked_scores(
    q: torch.Tensor,
    x: torch.Tensor,
    q_cls: np.ndarray,
    d_cls: np.ndarray,
    class_size: np.ndarray,
    exclude_self: bool,
    num_pos: np.ndarray,
    k_tensor: torch.Tensor,
    block_size: int | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AP of every query ``(Nq,)`` (0 without positives) and the R@k hits, one ``(B, Nd)`` block of query rows
    at a time; both on the embeddings' device."""
    num_q, num_d = q.shape[0], x.shape[0]
    class_start = np.concatenate([[0], np.cumsum(class_size)[:-1]])
    db_by_class = np.argsort(d_cls, kind="stable")
    scored = np.flatnonzero(num_pos > 0)
    # Group queries with similar numbers of positives so that a block pads little.
    order = scored[np.argsort(num_pos[scored], kind="stable")]
    if block_size is None:
        block_size = max(1, _BLOCK_BYTES // (4 * num_d))
    block_size = int(block_size)
    device = q.device
    ap = torch.zeros(num_q, dtype=torch.float64, device=device)
    hits = torch.zeros(k_tensor.numel(), dtype=torch.int64, device=device)
    starts = range(0, order.size, block_size)
    logger.debug(
        "retrieval_metrics: %d queries (%d without positives) x %d database items, %d blocks of %d",
        num_q,
        num_q - scored.size,
        num_d,
        len(starts),
        block_size,
    )
    comparisons = int(num_pos.sum()) * num_d  # queries without positives add 0
    with _Counter(device, min(block_size, order.size), num_d, comparisons) as counter:
        for b0 in tqdm(starts, desc="retrieval metrics", unit="block", disable=not progress):
            idx = order[b0 : b0 + block_size]
            ap_block, hits_block = _score_block(
                q, x, idx, q_cls, class_size, class_start, db_by_class, exclude_self, k_tensor, counter
            )
            ap[torch.from_numpy(idx).to(device)] = ap_block
            hits += hits_block
    return ap, hits


def _positive_thresholds(x: torch.Tensor, members: torch.Tensor, num_pos: np.ndarray, p_max: int) -> torch.Tensor:
    """Each item's similarities to the other members of its class, sorted decreasingly, ``+inf`` padded.

    ``members`` lists the items class after class (each class contiguous, ``num_pos + 1`` members, classes
    of equal size together); row ``i`` of the ``(N, p_max)`` result belongs to ``members[i]``.
    """
    n = members.numel()
    out = torch.full((n, max(p_max, 1)), math.inf, dtype=torch.float32, device=x.device)
    for r0, r1, p in _runs(num_pos):
        if p == 0:
            continue
        size = p + 1
        off_diagonal = ~torch.eye(size, dtype=torch.bool, device=x.device)
        # Whole classes, about _GRAM_ROWS rows at a time, through the same matrix product as the similarity
        # blocks (a plain GEMM with the same inner dimension), so that a positive's threshold is the very number
        # the blocks hold for it: ties with negatives then resolve exactly as in the one-sided path.
        per_chunk = max(1, _GRAM_ROWS // size)
        for c0 in range(r0, r1, size * per_chunk):
            c1 = min(c0 + size * per_chunk, r1)
            e = x[members[c0:c1]]
            k = (c1 - c0) // size
            gram = (e @ e.T).view(k, size, k, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (k, size, size)
            others = gram[:, off_diagonal].view(-1, p)  # row i: its class-mates, self left out
            out[c0:c1, :p] = torch.sort(others, dim=1, descending=True).values
    return out


def _same_class_entries(first: np.ndarray, end: np.ndarray, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
    """Block coordinates of the entries whose column lies in its row's class range.

    Row ``r`` of a block (columns ``j0:j1`` of the class-ordered items) has its class-mates and itself in
    the columns ``first[r]:end[r]``; returns the ``(row, column)`` indices of those that fall in the block.
    """
    lo = np.clip(first, j0, j1) - j0
    length = np.clip(end, j0, j1) - j0 - lo
    rows = np.repeat(np.arange(first.size), length)
    offsets = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    return rows, np.repeat(lo, length) + offsets


def _symmetric_scores(
    x: torch.Tensor, cls: np.ndarray, k_tensor: torch.Tensor, block_size: int | None, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric test (queries = database, self excluded) with each pair of blocks computed once.

    Items are ordered by (number of positives, class): every class is contiguous, so a block of rows has
    positives only in the few column blocks its classes reach. For blocks ``i <= j`` the similarities
    ``S = X_i @ X_j^T`` are computed once; positives and self (same class) drop to ``-inf`` in both
    directions at once (the relation is symmetric); the rows of ``S`` count negatives for the queries of
    block ``i``, its columns for those of block ``j``. A block's counts are final once its row of pairs is
    done, and its AP and R@k are taken then.
    """
    n = x.shape[0]
    device = x.device
    class_size = np.bincount(cls)
    num_pos_all = class_size[cls] - 1
    order = np.lexsort((cls, num_pos_all))  # stable: by positives, then class, then index
    num_pos = num_pos_all[order]
    cls_sorted = cls[order]
    new_class = np.concatenate([[True], cls_sorted[1:] != cls_sorted[:-1]])
    class_first = np.flatnonzero(new_class)
    class_end = np.concatenate([class_first[1:], [n]])
    run = np.cumsum(new_class) - 1
    first_of, end_of = class_first[run], class_end[run]  # the class range of every position

    members = torch.from_numpy(order).to(device)
    p_max = int(num_pos.max())
    thresholds = _positive_thresholds(x, members, num_pos, p_max)
    if block_size is None:
        block_size = max(1, math.isqrt(_PAIR_BYTES // 4))
    block = int(min(block_size, n))
    counter = _Counter(device, block, block, int(num_pos.sum()) * n)
    if counter.compiled:
        counts = torch.from_numpy(np.zeros(thresholds.shape, dtype=np.int64))
    else:
        counts = torch.zeros(thresholds.shape, dtype=torch.int64, device=device)
    num_pos_t = torch.from_numpy(num_pos).to(device)
    ap = torch.zeros(n, dtype=torch.float64, device=device)
    hits = torch.zeros(k_tensor.numel(), dtype=torch.int64, device=device)
    bounds = [(b0, min(b0 + block, n)) for b0 in range(0, n, block)]
    logger.debug(
        "retrieval_metrics (symmetric): %d items, %d blocks of %d, %d block pairs",
        n,
        len(bounds),
        block,
        len(bounds) * (len(bounds) + 1) // 2,
    )
    with counter:
        for i, (i0, i1) in enumerate(tqdm(bounds, desc="retrieval metrics", unit="block", disable=not progress)):
            xi = x[members[i0:i1]]
            for j0, j1 in bounds[i:]:
                if num_pos[i1 - 1] == 0 and num_pos[j1 - 1] == 0:
                    continue  # neither side has a query to score (num_pos is non-decreasing)
                xj = xi if j0 == i0 else x[members[j0:j1]]
                sims = xi @ xj.T  # (Bi, Bj) float32
                if first_of[i0] < j1 and end_of[i1 - 1] > j0:  # some row has class-mates (or itself) here
                    rows, cols = _same_class_entries(first_of[i0:i1], end_of[i0:i1], j0, j1)
                    sims[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -math.inf
                if j0 == i0:
                    counter.count(sims, thresholds[i0:i1], num_pos[i0:i1], counts[i0:i1])
                else:
                    counter.count_pair(
                        sims,
                        (thresholds[i0:i1], num_pos[i0:i1], counts[i0:i1]),
                        (thresholds[j0:j1], num_pos[j0:j1], counts[j0:j1]),
                    )
                del sims
            block_counts = counts[i0:i1].to(device)
            ap_block, hits_block = _ap_and_hits(block_counts, num_pos_t[i0:i1], k_tensor)
            ap[members[i0:i1]] = ap_block
            hits += hits_block
    return ap, hits


class _Counter:
    """Counts, per row of a block, the negatives at or above each positive's similarity.

    Holds what the blocks share; on the CPU, for an evaluation of at least ``_COMPILED_MIN_COMPARISONS``
    comparisons (``comparisons``: entries x positives, all blocks), the compiled kernels of
    :mod:`raml.retrieval.count_kernel` (imported here, so that importing this module does not import numba) and a
    thread pool: the kernels release the GIL, so the rows are split over ``torch.get_num_threads()`` threads.
    Smaller evaluations count with torch's passes, as a CUDA device does.
    """

    def __init__(self, device: torch.device, max_rows: int, num_cols: int, comparisons: int) -> None:
        self.compiled = device.type == "cpu" and comparisons >= _COMPILED_MIN_COMPARISONS
        self.pool: ThreadPoolExecutor | None = None
        self.threads = 1
        self.chunk = max(1, max_rows)  # rows per kernel call and least rows per job: compiled path only
        if self.compiled:
            from raml.retrieval import count_kernel

            self.kernels = count_kernel
            # A few rows at a time (~1 MiB of similarities) stay in the L2 cache between the row and the column
            # count of a block pair; at most the column count's limit (1-byte sums).
            self.chunk = max(1, min(max_rows, count_kernel.MAX_COLUMN_ROWS, _CHUNK_BYTES // (4 * num_cols)))
            self.threads = max(1, min(torch.get_num_threads(), max_rows))
            if self.threads > 1:
                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="raml-metrics")

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _run_jobs(self, num_rows: int, work: Callable[[int, int], object]) -> list[object]:
        """``work(lo, hi)`` over row ranges covering ``0..num_rows``, on the pool; their results in order."""
        if self.pool is None:
            return [work(0, num_rows)]
        # Many small jobs, taken by whichever thread is free: balanced even when a core is busy elsewhere.
        step = max(self.chunk, -(-num_rows // (8 * self.threads)))
        jobs = [self.pool.submit(work, lo, min(lo + step, num_rows)) for lo in range(0, num_rows, step)]
        return [job.result() for job in jobs]

    def count(self, sims: torch.Tensor, thresholds: torch.Tensor, num_pos: np.ndarray, out: torch.Tensor) -> None:
        """``out += `` the counts of entries of ``sims`` (``(B, N)``, positives and junk at -inf) ``>=``
        each of the ``(B, P)`` thresholds (sorted decreasingly per row, +inf padding past ``num_pos``, which
        is non-decreasing). ``out`` is ``(B, P)`` int64 on the device, or a numpy-backed CPU tensor."""
        p_max = thresholds.shape[1]
        if p_max >= _SORT_MIN_POSITIVES:
            _count_by_sorting(sims, thresholds, out)
            return
        if not self.compiled:
            for r0, r1, p in _runs(num_pos):
                if p:
                    _count_by_passes(sims[r0:r1], thresholds[r0:r1, :p], out[r0:r1, :p])
            return
        sims_np, thr_np, out_np = sims.numpy(), thresholds.numpy(), out.numpy()
        pos_np = np.ascontiguousarray(num_pos, dtype=np.int64)

        def work(lo: int, hi: int) -> None:
            self.kernels.count_rows(sims_np[lo:hi], thr_np[lo:hi], pos_np[lo:hi], out_np[lo:hi])

        self._run_jobs(sims_np.shape[0], work)

    def count_pair(
        self,
        sims: torch.Tensor,
        rows: tuple[torch.Tensor, np.ndarray, torch.Tensor],
        cols: tuple[torch.Tensor, np.ndarray, torch.Tensor],
    ) -> None:
        """:meth:`count` for the rows of ``sims`` (``rows`` = thresholds, num_pos, out) and for its
        columns (``cols``, as if for ``sims.T``), in one sweep over the rows on the CPU."""
        thr_r, pos_r, out_r = rows
        thr_c, pos_c, out_c = cols
        if not self.compiled or max(thr_r.shape[1], thr_c.shape[1]) >= _SORT_MIN_POSITIVES:
            self.count(sims, thr_r, pos_r, out_r)
            self.count(sims.T.contiguous(), thr_c, pos_c, out_c)
            return
        sims_np = sims.numpy()
        thr_r_np, out_r_np = thr_r.numpy(), out_r.numpy()
        pos_r_np = np.ascontiguousarray(pos_r, dtype=np.int64)
        thr_c_t = np.ascontiguousarray(thr_c.numpy().T)  # (P, Bj): one contiguous row per pass
        col_starts = np.searchsorted(pos_c, np.arange(thr_c_t.shape[0]), side="right").astype(np.int64)

        def work(lo: int, hi: int) -> np.ndarray:
            partial = np.zeros(out_c.shape, dtype=np.int64)
            # A chunk of rows is counted along its rows and then along its columns while it is in the L2 cache.
            for c0 in range(lo, hi, self.chunk):
                c1 = min(c0 + self.chunk, hi)
                self.kernels.count_rows(sims_np[c0:c1], thr_r_np[c0:c1], pos_r_np[c0:c1], out_r_np[c0:c1])
                self.kernels.count_columns(sims_np[c0:c1], thr_c_t, col_starts, partial)
            return partial

        out_c_np = out_c.numpy()
        for partial in self._run_jobs(sims_np.shape[0], work):
            out_c_np += partial


def _ap_and_hits(
    neg_at_or_above: torch.Tensor, num_pos: torch.Tensor, k_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """AP of each query ``(B,)`` float64 and R@k hits ``(len(ks),)`` from ``(B, P)`` counts of negatives at or
    above each positive.

    Rows with ``num_pos == 0`` (no positive) get AP 0 and no hit. Both results stay on the counts' device.
    """
    device = neg_at_or_above.device
    p_max = neg_at_or_above.shape[1]
    j = torch.arange(p_max, dtype=torch.float64, device=device)
    ranks = j + neg_at_or_above.to(torch.float64)  # 0-based rank of the j-th positive, junk removed
    precision_0 = torch.where(ranks == 0, torch.ones_like(ranks), j / ranks.clamp(min=1.0))
    precision_1 = (j + 1.0) / (ranks + 1.0)
    pos_valid = j.unsqueeze(0) < num_pos.unsqueeze(1)
    terms = torch.where(pos_valid, (precision_0 + precision_1) / 2.0, torch.zeros_like(ranks))
    scored = num_pos > 0
    # A sequential sum along the row (cumsum), so that the padding zeros at the end change no bit: every path
    # gives a query the same AP, whatever the width of its block.
    ap = terms.cumsum(1)[:, -1] / num_pos.clamp(min=1).to(torch.float64)
    # R@k: the best positive (j = 0) has rank c_0, and is within the k nearest iff c_0 < k.
    first_rank = neg_at_or_above[scored, 0]
    hits = (first_rank.unsqueeze(1) < k_tensor.unsqueeze(0)).sum(0)
    return ap, hits


def _score_block(
    q: torch.Tensor,
    x: torch.Tensor,
    idx: np.ndarray,
    q_cls: np.ndarray,
    class_size: np.ndarray,
    class_start: np.ndarray,
    db_by_class: np.ndarray,
    exclude_self: bool,
    k_tensor: torch.Tensor,
    counter: _Counter,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AP of each of the queries ``idx`` (all with at least one positive) and their number of R@k hits, as
    tensors on the embeddings' device (no transfer to the host)."""
    device = q.device
    cls = q_cls[idx]
    size = class_size[cls]
    width = int(size.max())
    # Database columns of each query's class, padded with the class's first column (a positive, harmless).
    offsets = np.arange(width)
    valid = offsets[None, :] < size[:, None]
    slots = class_start[cls][:, None] + np.where(valid, offsets[None, :], 0)
    cols = db_by_class[slots]
    if exclude_self:
        valid &= cols != idx[:, None]
    num_pos = valid.sum(1)

    idx_t = torch.from_numpy(idx).to(device)
    cols_t = torch.from_numpy(cols).to(device)
    valid_t = torch.from_numpy(valid).to(device)
    sims = q[idx_t] @ x.T  # (B, Nd) float32, the only large buffer
    pos_sims = sims.gather(1, cols_t).masked_fill_(~valid_t, -math.inf)
    # Positive similarities in decreasing order; padding (-inf) goes last and becomes +inf (counts 0).
    p_max = int(num_pos.max())
    pos_sims = torch.sort(pos_sims, dim=1, descending=True).values[:, :p_max].contiguous()
    pos_sims.masked_fill_(pos_sims == -math.inf, math.inf)

    # Only negatives may be counted: positives and junk drop to -inf (below every finite threshold).
    sims.scatter_(1, cols_t, -math.inf)
    if exclude_self:
        sims.scatter_(1, idx_t.unsqueeze(1), -math.inf)
    if counter.compiled:
        counts = torch.from_numpy(np.zeros((idx.size, p_max), dtype=np.int64))
    else:
        counts = torch.zeros(idx.size, p_max, dtype=torch.int64, device=device)
    counter.count(sims, pos_sims, num_pos, counts)
    del sims
    return _ap_and_hits(counts.to(device), torch.from_numpy(num_pos).to(device), k_tensor)
