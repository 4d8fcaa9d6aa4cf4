"""The CPU's counting step of :mod:`raml.retrieval.metrics`, compiled (numba).

For a block of similarities with positives and junk already at ``-inf``, the rank of a query's j-th positive is
``j`` plus the number of entries of its row at or above that positive's similarity. Two kernels count them:

* :func:`count_rows`: ``counts[r, j] += #{c : sims[r, c] >= thresholds[r, j]}`` for ``j < num_pos[r]``: one
  pass over the row per positive, the row (at most a database's width of float32, 242 KB at SOP size) staying in
  the L2 cache across the passes. Each pass is a compare-and-add loop that LLVM vectorises (8 floats per AVX2
  instruction, 16 per AVX-512); numpy needed a boolean array per pass and a second pass to add it up.
* :func:`count_columns`: the transposed count of a symmetric test's block pair,
  ``counts[c, j] += #{r : sims[r, c] >= thresholds_t[j, c]}`` for the columns ``c >= starts[j]`` (columns
  sorted by their number of positives). Rows are added into a row of 1-byte counters (hence at most 255 rows
  per call), contiguous along the columns, widened once at the end.

Counts are integers, so the metrics do not depend on which kernel (this, the torch passes of the device path,
or the sorting path) produced them. Compiled on first use and cached on disk (``cache=True``, as
:mod:`raml.data.jitter_kernel`); ``nogil``: the callers split the rows over a thread pool.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["MAX_COLUMN_ROWS", "count_columns", "count_rows"]

# count_columns adds up at most this many rows in 1-byte counters.
MAX_COLUMN_ROWS = 255


@njit(cache=True, nogil=True)
def _count_rows(sims: np.ndarray, thresholds: np.ndarray, num_pos: np.ndarray, counts: np.ndarray) -> None:
    num_cols = sims.shape[1]
    for r in range(sims.shape[0]):
        row = sims[r]
        for j in range(num_pos[r]):
            threshold = thresholds[r, j]
            at_or_above = 0
            for c in range(num_cols):
                at_or_above += row[c] >= threshold
            counts[r, j] += at_or_above


@njit(cache=True, nogil=True)
def _count_columns(sims: np.ndarray, thresholds_t: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
    num_rows, num_cols = sims.shape
    column_sums = np.empty(num_cols, dtype=np.uint8)
    for j in range(thresholds_t.shape[0]):
        start = starts[j]
        if start >= num_cols:
            break  # starts are non-decreasing: no later pass has a column either
        width = num_cols - start
        sums = column_sums[:width]
        sums[:] = 0
        threshold = thresholds_t[j, start:]
        for r in range(num_rows):
            row = sims[r, start:]
            for c in range(width):
                sums[c] += row[c] >= threshold[c]
        for c in range(width):
            counts[start + c, j] += sums[c]


def _check(name: str, array: np.ndarray, dtype: type, ndim: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != ndim:
        got = f"{array.dtype} with {array.ndim} dimensions" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{name} must be a {ndim}-d {np.dtype(dtype)} numpy array, got {got}.")


def count_rows(sims: np.ndarray, thresholds: np.ndarray, num_pos: np.ndarray, counts: np.ndarray) -> None:
    """``counts[r, j] += #{c : sims[r, c] >= thresholds[r, j]}`` for every row ``r`` and ``j < num_pos[r]``.

    Args:
        sims: ``(R, N)`` float32 similarities (positives and junk at ``-inf``).
        thresholds: ``(R, P)`` float32, row ``r``'s positives' similarities in its first ``num_pos[r]`` entries.
        num_pos: ``(R,)`` int64, each ``<= P``.
        counts: ``(R, P)`` int64, added to in place.

    Raises:
        ValueError: On other dtypes or shapes (a caller's bug: nothing is counted).
    """
    _check("sims", sims, np.float32, 2)
    _check("thresholds", thresholds, np.float32, 2)
    _check("num_pos", num_pos, np.int64, 1)
    _check("counts", counts, np.int64, 2)
    rows = sims.shape[0]
    if thresholds.shape[0] != rows or num_pos.shape[0] != rows or counts.shape != thresholds.shape:
        raise ValueError(
            f"sims {sims.shape}, thresholds {thresholds.shape}, num_pos {num_pos.shape} and counts {counts.shape} "
            "must have one row per query, and counts the thresholds' shape."
        )
    if rows and (num_pos.min() < 0 or num_pos.max() > thresholds.shape[1]):
        raise ValueError(f"num_pos must lie in [0, {thresholds.shape[1]}] (the thresholds' width).")
    _count_rows(sims, thresholds, num_pos, counts)


def count_columns(sims: np.ndarray, thresholds_t: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
    """``counts[c, j] += #{r : sims[r, c] >= thresholds_t[j, c]}`` for every ``j`` and column ``c >= starts[j]``.

    Args:
        sims: ``(R, N)`` float32 similarities, ``R <= MAX_COLUMN_ROWS``.
        thresholds_t: ``(P, N)`` float32, row ``j`` holding each column's j-th positive's similarity.
        starts: ``(P,)`` int64, non-decreasing: the first column that has a j-th positive.
        counts: ``(N, P)`` int64, added to in place.

    Raises:
        ValueError: On other dtypes or shapes, or more than ``MAX_COLUMN_ROWS`` rows (nothing is counted).
    """
    _check("sims", sims, np.float32, 2)
    _check("thresholds_t", thresholds_t, np.float32, 2)
    _check("starts", starts, np.int64, 1)
    _check("counts", counts, np.int64, 2)
    rows, cols = sims.shape
    if rows > MAX_COLUMN_ROWS:
        raise ValueError(f"count_columns adds at most {MAX_COLUMN_ROWS} rows at once (1-byte sums), got {rows}.")
    if thresholds_t.shape[1] != cols or counts.shape != (cols, thresholds_t.shape[0]) or starts.size != counts.shape[1]:
        raise ValueError(
            f"sims {sims.shape}, thresholds_t {thresholds_t.shape}, starts {starts.shape} and counts {counts.shape} "
            "do not match: expected (R, N), (P, N), (P,) and (N, P)."
        )
    _count_columns(sims, thresholds_t, starts, counts)
