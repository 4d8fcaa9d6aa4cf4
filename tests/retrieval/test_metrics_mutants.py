"""Tests written for the survivors of mutation testing of raml.retrieval.metrics (scripts/mutate.py metrics).

Each test asserts behaviour against a plain computation written here (a full sort per query in a loop), so
that a one-line change of the module (a mutant) that keeps the shapes but changes a number fails it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raml.retrieval import metrics as metrics_module
from raml.retrieval.metrics import retrieval_metrics


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _check(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


@pytest.mark.parametrize("exclude_self", [False, True])
def test_string_labels_and_queries_without_positives_against_a_plain_sort(exclude_self: bool, plain_metrics) -> None:
    """Classes of 1 to 4 items (with exclude_self a singleton class has no positive), string labels."""
    rng = np.random.default_rng(0)
    labels = [f"c{c}" for c in [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5]]
    x = _unit(rng, len(labels), 6)
    q = _unit(rng, len(labels), 6)
    expected = plain_metrics(q @ x.T, labels, labels, (1, 2, 3, 5), exclude_self)
    if exclude_self:
        assert expected["num_no_positive"] == 2  # the singletons c3 and c5
    for block_size in (1, 4, None):
        got = retrieval_metrics(q, x, labels, labels, ks=(1, 2, 3, 5), exclude_self=exclude_self, block_size=block_size)
        _check(got, expected)


def test_symmetric_path_falls_back_to_blocks_when_the_whole_set_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, plain_metrics
) -> None:
    """The symmetric path keeps 12 bytes per query and positive; above the block budget the one-sided blocks
    run instead, with the same result."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 3)
    x = _unit(rng, labels.size, 5)
    expected = plain_metrics(x @ x.T, labels.tolist(), labels.tolist(), (1, 4), True)
    calls = []
    original = metrics_module._symmetric_scores
    monkeypatch.setattr(metrics_module, "_symmetric_scores", lambda *a: calls.append(1) or original(*a))
    # 12 * 15 queries * 2 positives = 360 bytes: exactly the budget still takes the symmetric path
    monkeypatch.setattr(metrics_module, "_BLOCK_BYTES", 360)
    _check(retrieval_metrics(x, x, labels, labels, ks=(1, 4), exclude_self=True, block_size=4), expected)
    assert calls == [1]
    monkeypatch.setattr(metrics_module, "_BLOCK_BYTES", 359)
    _check(retrieval_metrics(x, x, labels, labels, ks=(1, 4), exclude_self=True, block_size=4), expected)
    assert calls == [1]


def test_average_precision_errors_quote_the_first_ranks_only() -> None:
    """A bad list is quoted by its head: the first 5 ranks of a non-integral one, the first 10 of a non-increasing
    one (the whole list of a large query would flood the log)."""
    ranks = np.array([0, 1.5, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError) as bad_type:
        metrics_module.average_precision(ranks)
    assert f"({ranks[:5]}...)" in str(bad_type.value)
    with pytest.raises(ValueError) as bad_order:
        metrics_module.average_precision([*range(12), 3])
    assert str(bad_order.value).endswith(f"got {list(range(10))}.")


@pytest.mark.parametrize(("budget", "rows"), [(12 * 5 * 3, [3, 3, 1]), (12 * 5 * 3 - 1, [2, 2, 2, 1]), (1, [1] * 7)])
def test_sorting_path_sorts_at_most_the_budgeted_rows_at_once(monkeypatch, budget: int, rows: list[int]) -> None:
    """The sorting path holds ``rows x Nd`` values and int64 indices (12 bytes each) within _SORT_CHUNK_BYTES, at
    least one row at a time; the counts are those of a plain loop, ties counted (``>=``)."""
    rng = np.random.default_rng(2)
    sims = torch.from_numpy(rng.integers(0, 4, size=(7, 5)).astype(np.float32))
    thresholds = torch.from_numpy(rng.integers(0, 5, size=(7, 2)).astype(np.float32))
    counts = torch.zeros(7, 2, dtype=torch.int64)
    sorted_rows = []
    original_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: sorted_rows.append(x.shape[0]) or original_sort(x, *a, **k))
    monkeypatch.setattr(metrics_module, "_SORT_CHUNK_BYTES", budget)
    metrics_module._count_by_sorting(sims, thresholds, counts)
    assert sorted_rows == rows
    plain = [[sum(float(s) >= float(t) for s in sims[i]) for t in thresholds[i]] for i in range(7)]
    assert counts.tolist() == plain


@pytest.mark.parametrize(("budget", "blocks"), [(4 * 6 * 3, [3, 3, 2]), (4 * 6 * 3 - 1, [2, 2, 2, 2]), (1, [1] * 8)])
def test_default_blocks_hold_the_budgeted_float32_similarities(
    monkeypatch, budget: int, blocks: list[int], plain_metrics
) -> None:
    """Without ``block_size`` a block holds as many queries as keep its (B, Nd) float32 similarities within
    _BLOCK_BYTES, at least one; the result is the plain one whatever the blocks."""
    rng = np.random.default_rng(4)
    labels = [0, 0, 1, 1, 2, 2, 0, 1]
    q, x = _unit(rng, 8, 4), _unit(rng, 6, 4)
    sizes = []
    original = metrics_module._score_block
    monkeypatch.setattr(
        metrics_module, "_score_block", lambda q_, x_, idx, *a: sizes.append(idx.size) or original(q_, x_, idx, *a)
    )
    monkeypatch.setattr(metrics_module, "_BLOCK_BYTES", budget)
    got = retrieval_metrics(q, x, labels, labels[:6], ks=(1, 2))
    assert sizes == blocks
    _check(got, plain_metrics(q @ x.T, labels, labels[:6], (1, 2), False))


def test_the_debug_log_states_the_problem_size_and_the_blocks(caplog, monkeypatch) -> None:
    rng = np.random.default_rng(5)
    q, x = _unit(rng, 5, 3), _unit(rng, 6, 3)
    monkeypatch.setattr(metrics_module, "_BLOCK_BYTES", 4 * 6 * 2)
    with caplog.at_level("DEBUG", logger="raml.retrieval.metrics"):
        retrieval_metrics(q, x, [0, 1, 2, 0, 9], [0, 1, 2, 0, 1, 2], ks=(1,))
    assert caplog.messages == ["retrieval_metrics: 5 queries (1 without positives) x 6 database items, 2 blocks of 2"]


def test_the_one_sided_path_shows_its_bar_only_when_asked(capsys) -> None:
    """The symmetric path's bar is tested in test_metrics.py; this is the blocked (one-sided) path's."""
    rng = np.random.default_rng(6)
    q, x = _unit(rng, 6, 3), _unit(rng, 7, 3)
    labels = [0, 1, 2, 0, 1, 2]
    retrieval_metrics(q, x, labels, [*labels, 0], block_size=2)
    assert capsys.readouterr().err == ""
    retrieval_metrics(q, x, labels, [*labels, 0], block_size=2, progress=True)
    err = capsys.readouterr().err
    assert "retrieval metrics" in err and "3/3" in err and "block" in err


@pytest.mark.parametrize(
    ("n", "block_size", "pair_bytes", "expected"),
    [
        (8, 3, None, "8 items, 3 blocks of 3, 6 block pairs"),
        # the default block: the widest square of float32 similarities within _PAIR_BYTES: isqrt(4 * 3000**2 / 4)
        (4500, None, 4 * 3000 * 3000, "4500 items, 2 blocks of 3000, 3 block pairs"),
        (4500, None, 4 * 3000 * 3000 - 1, "4500 items, 2 blocks of 2999, 3 block pairs"),
    ],
)
def test_the_symmetric_paths_debug_log_states_its_blocks(
    caplog, monkeypatch, n, block_size, pair_bytes, expected, plain_metrics
):
    if pair_bytes is not None:
        monkeypatch.setattr(metrics_module, "_PAIR_BYTES", pair_bytes)
    rng = np.random.default_rng(7)
    x = _unit(rng, n, 4)
    labels = [i // 5 for i in range(n)]
    with caplog.at_level("DEBUG", logger="raml.retrieval.metrics"):
        got = retrieval_metrics(x, x, labels, labels, ks=(1,), exclude_self=True, block_size=block_size)
    assert f"retrieval_metrics (symmetric): {expected}" in caplog.messages
    if n <= 8:
        sims = x @ x.T
        _check(got, plain_metrics(sims, labels, labels, (1,), True))
