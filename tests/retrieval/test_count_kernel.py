"""Tests of raml.retrieval.count_kernel (the CPU's compiled counting) against plain Python loops."""

from __future__ import annotations

import numpy as np
import pytest

from raml.retrieval.count_kernel import MAX_COLUMN_ROWS, count_columns, count_rows


def _loop_rows(sims: np.ndarray, thresholds: np.ndarray, num_pos: np.ndarray) -> list[list[int]]:
    return [
        [sum(1 for v in sims[r] if v >= thresholds[r, j]) if j < num_pos[r] else 0 for j in range(thresholds.shape[1])]
        for r in range(sims.shape[0])
    ]


def test_rows_against_a_loop_with_ties_minus_inf_and_varying_positives() -> None:
    rng = np.random.default_rng(0)
    sims = rng.integers(-3, 4, size=(7, 1000)).astype(np.float32)  # many exact ties with the thresholds
    sims[:, ::13] = -np.inf  # positives and junk
    num_pos = np.array([0, 1, 2, 3, 3, 1, 4], dtype=np.int64)
    thresholds = np.full((7, 4), np.inf, dtype=np.float32)
    for r, p in enumerate(num_pos):
        thresholds[r, :p] = np.sort(rng.integers(-4, 5, size=p))[::-1]
    start = rng.integers(0, 50, size=(7, 4)).astype(np.int64)
    counts = start.copy()
    count_rows(sims, thresholds, num_pos, counts)
    assert (counts - start).tolist() == _loop_rows(sims, thresholds, num_pos)  # added to what was there
    assert counts[0].tolist() == start[0].tolist()  # a row without positives is not touched


def test_rows_count_every_entry_of_a_long_row() -> None:
    """Counts past 2**8, 2**16 columns: the accumulator does not wrap."""
    sims = np.zeros((2, 70_001), dtype=np.float32)
    thresholds = np.array([[0.0, -1.0], [1.0, 0.0]], dtype=np.float32)
    counts = np.zeros((2, 2), dtype=np.int64)
    count_rows(sims, thresholds, np.array([2, 2]), counts)
    assert counts.tolist() == [[70_001, 70_001], [0, 70_001]]


def test_columns_against_a_loop() -> None:
    rng = np.random.default_rng(13)
    sims = rng.standard_normal((9, 3000)).astype(np.float32)
    sims[:, ::7] = -np.inf
    num_pos = np.sort(rng.integers(0, 4, 3000))
    thresholds = np.full((3000, 3), np.inf, dtype=np.float32)
    for c in range(3000):
        thresholds[c, : num_pos[c]] = np.sort(rng.standard_normal(num_pos[c]))[::-1]
    starts = np.searchsorted(num_pos, np.arange(3), side="right").astype(np.int64)
    tied = slice(starts[2], starts[2] + 50)
    sims[0, tied] = thresholds[tied, 2]  # exact ties count (>=)
    counts = np.zeros((3000, 3), dtype=np.int64)
    count_columns(sims, np.ascontiguousarray(thresholds.T), starts, counts)
    expected = [[int((sims[:, c] >= thresholds[c, j]).sum()) for j in range(3)] for c in range(3000)]
    assert counts.tolist() == expected


def test_columns_add_to_the_counts_they_are_given_chunk_after_chunk() -> None:
    rng = np.random.default_rng(3)
    sims = rng.integers(0, 5, size=(6, 4)).astype(np.float32)
    thresholds_t = np.array([[1, 2, 3, 4], [np.inf, 3, 2, 4]], dtype=np.float32)  # (P, columns)
    starts = np.array([0, 1], dtype=np.int64)  # column 0 has one positive, the others two
    counts = rng.integers(0, 9, size=(4, 2)).astype(np.int64)
    expected = counts.copy()
    for c in range(4):
        for j in range(2):
            if c >= starts[j]:
                expected[c, j] += sum(sims[r, c] >= thresholds_t[j, c] for r in range(6))
    count_columns(sims[:3], thresholds_t, starts, counts)
    count_columns(sims[3:], thresholds_t, starts, counts)
    assert counts.tolist() == expected.tolist()


def test_columns_count_the_most_rows_they_accept_without_wrapping() -> None:
    """255 rows all at or above the threshold: the 1-byte column sums reach 255 and do not wrap."""
    sims = np.ones((MAX_COLUMN_ROWS, 5), dtype=np.float32)
    counts = np.zeros((5, 1), dtype=np.int64)
    count_columns(sims, np.zeros((1, 5), dtype=np.float32), np.zeros(1, dtype=np.int64), counts)
    assert counts[:, 0].tolist() == [MAX_COLUMN_ROWS] * 5


def test_bad_inputs_are_refused_and_nothing_is_counted() -> None:
    counts = np.full((2, 1), 7, dtype=np.int64)
    sims = np.ones((2, 2), dtype=np.float32)
    thresholds = np.zeros((2, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="sims must be a 2-d float32"):
        count_rows(sims.astype(np.float64), thresholds, np.ones(2, dtype=np.int64), counts)
    with pytest.raises(ValueError, match="num_pos must lie in"):
        count_rows(sims, thresholds, np.array([1, 2]), counts)
    with pytest.raises(ValueError, match="one row per query"):
        count_rows(sims, thresholds, np.ones(3, dtype=np.int64), counts)
    with pytest.raises(ValueError, match="at most 255 rows"):
        count_columns(
            np.ones((MAX_COLUMN_ROWS + 1, 2), np.float32), np.zeros((1, 2), np.float32), np.zeros(1, np.int64), counts
        )
    with pytest.raises(ValueError, match="do not match"):
        count_columns(sims, np.zeros((1, 3), np.float32), np.zeros(1, np.int64), counts)
    assert counts.tolist() == [[7], [7]]
