"""Tests of raml.retrieval.metrics against a slow, obvious full-sort implementation and hand-computed cases."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from raml.retrieval import count_kernel
from raml.retrieval import metrics as metrics_module
from raml.retrieval.metrics import average_precision, retrieval_metrics


def _reference_metrics(
    query: np.ndarray,
    database: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    ks: list[int],
    exclude_self: bool,
) -> dict[str, float]:
    """Full sort per query, pessimistic ties, trapezoid AP in a plain loop."""
    sims = (query.astype(np.float32) @ database.astype(np.float32).T).astype(np.float64)
    ap_total, hits, scored, empty = 0.0, dict.fromkeys(ks, 0), 0, 0
    for i in range(query.shape[0]):
        keep = [c for c in range(database.shape[0]) if not (exclude_self and c == i)]
        s = sims[i, keep]
        is_pos = np.array([database_labels[c] == query_labels[i] for c in keep])
        if not is_pos.any():
            empty += 1
            continue
        scored += 1
        # Decreasing similarity; on ties negatives (is_pos False) first: the pessimistic convention.
        order = np.lexsort((is_pos, -s))
        ranked_pos = is_pos[order]
        pos_ranks = [r for r in range(len(ranked_pos)) if ranked_pos[r]]
        n_pos = len(pos_ranks)
        ap = 0.0
        for j, r in enumerate(pos_ranks):
            precision_0 = 1.0 if r == 0 else j / r
            precision_1 = (j + 1) / (r + 1)
            ap += (precision_0 + precision_1) / 2.0 / n_pos
        ap_total += ap
        for k in ks:
            if ranked_pos[:k].any():
                hits[k] += 1
    out = {"mAP": 100.0 * ap_total / scored}
    for k in ks:
        out[f"R@{k}"] = 100.0 * hits[k] / scored
    out["num_queries"] = scored
    out["num_no_positive"] = empty
    return out


def _assert_close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(params=["compiled", "torch", "sorting"])
def counting_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per counting strategy (compiled passes, torch passes, row sorting)."""
    monkeypatch.setattr(metrics_module, "_COMPILED_MIN_COMPARISONS", 0 if request.param == "compiled" else 10**30)
    monkeypatch.setattr(metrics_module, "_SORT_MIN_POSITIVES", 1 if request.param == "sorting" else 10**9)
    return request.param


CASES = [
    # (num_query, num_database, dim, query classes, database classes, exclude_self)
    (23, 41, 8, 6, 6, False),  # Nq != Nd
    (40, 40, 6, 9, 9, True),  # the same images on both sides, self is junk
    (30, 30, 5, 25, 25, True),  # many singleton classes: queries without positives
    (17, 50, 4, 3, 8, False),  # some database classes never queried
    (25, 12, 7, 10, 4, False),  # some query classes absent from the database
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [1, 3, None])
def test_matches_full_sort_reference(case: tuple, block_size: int | None, counting_path: str) -> None:
    num_q, num_d, dim, q_classes, d_classes, exclude_self = case
    rng = np.random.default_rng(CASES.index(case) * 10 + (block_size or 0))
    database = _unit(rng, num_d, dim)
    database_labels = rng.integers(0, d_classes, num_d)
    if exclude_self:
        query = _unit(rng, num_q, dim)  # e.g. student embeddings of the same images
        query_labels = database_labels.copy()
    else:
        query = _unit(rng, num_q, dim)
        query_labels = rng.integers(0, q_classes, num_q)
    ks = [1, 2, 5, 1000]
    got = retrieval_metrics(query, database, query_labels, database_labels, ks, exclude_self, block_size)
    expected = _reference_metrics(query, database, query_labels, database_labels, ks, exclude_self)
    _assert_close(got, expected)


def test_block_smaller_than_positives_and_mixed_positive_counts(counting_path: str) -> None:
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 9, 14]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    database = _unit(rng, labels.size, 6)
    query = database + 0.3 * _unit(rng, labels.size, 6)
    for block_size in (2, 5):
        got = retrieval_metrics(query, database, labels, labels, (1, 4, 8), exclude_self=True, block_size=block_size)
        expected = _reference_metrics(query, database, labels, labels, [1, 4, 8], True)
        _assert_close(got, expected)


def test_large_database_compiled_and_sort_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4500 columns, compiled counting; tiny row chunks count and sort one row at a time.
    monkeypatch.setattr(metrics_module, "_COMPILED_MIN_COMPARISONS", 0)
    monkeypatch.setattr(metrics_module, "_SORT_CHUNK_BYTES", 1)
    monkeypatch.setattr(metrics_module, "_CHUNK_BYTES", 1)
    rng = np.random.default_rng(4)
    database = _unit(rng, 4500, 5)
    query = _unit(rng, 9, 5)
    database_labels = rng.integers(0, 30, 4500)
    query_labels = rng.integers(0, 30, 9)
    expected = _reference_metrics(query, database, query_labels, database_labels, [1, 10, 100], False)
    for threshold in (1, 10**9):
        monkeypatch.setattr(metrics_module, "_SORT_MIN_POSITIVES", threshold)
        got = retrieval_metrics(query, database, query_labels, database_labels, (1, 10, 100), block_size=4)
        _assert_close(got, expected)


def test_exclude_self_junk_is_removed_even_when_labels_differ() -> None:
    rng = np.random.default_rng(5)
    x = _unit(rng, 20, 4)
    query_labels = rng.integers(0, 3, 20)
    database_labels = rng.integers(0, 3, 20)
    got = retrieval_metrics(x, x, query_labels, database_labels, (1, 3), exclude_self=True)
    _assert_close(got, _reference_metrics(x, x, query_labels, database_labels, [1, 3], True))


def _vectors(cosines: list[float]) -> np.ndarray:
    """Unit vectors whose dot product with (1, 0) is exactly the given cosine."""
    return np.array([[c, math.sqrt(1.0 - c * c)] for c in cosines], dtype=np.float32)


def test_hand_computed_example(counting_path: str) -> None:
    database = _vectors([0.875, 0.75, 0.625, 0.5, 0.375, 0.25])  # ranks 0..5 for the query (1, 0)
    database_labels = ["a", "b", "a", "b", "b", "a"]
    query = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    query_labels = ["a", "b", "c"]  # "c" has no positive
    got = retrieval_metrics(query, database, query_labels, database_labels, ks=(1, 2, 3))
    # "a": positives at ranks 0, 2, 5: ((1 + 1) / 2 + (1/2 + 2/3) / 2 + (2/5 + 3/6) / 2) / 3 = 61/90.
    # "b": positives at ranks 1, 3, 4: ((0 + 1/2) / 2 + (1/3 + 2/4) / 2 + (2/4 + 3/5) / 2) / 3 = 73/180.
    assert got["mAP"] == pytest.approx(100 * (61 / 90 + 73 / 180) / 2, rel=1e-12)
    assert got["R@1"] == 50.0 and got["R@2"] == 100.0 and got["R@3"] == 100.0
    assert got["num_queries"] == 2 and got["num_no_positive"] == 1
    assert average_precision([0, 2, 5]) == pytest.approx(61 / 90, rel=1e-12)
    assert average_precision([1, 3, 4]) == pytest.approx(73 / 180, rel=1e-12)


def test_ties_are_pessimistic(counting_path: str) -> None:
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    # A positive tied with a negative (0.5) ranks after it: negatives 0.75 and 0.5 come first, rank 2.
    database = _vectors([0.5, 0.5, 0.75])
    got = retrieval_metrics(query, database, [1], [1, 0, 0], ks=(1, 2, 3))
    assert got["mAP"] == pytest.approx(100 * (0 + 1 / 3) / 2, rel=1e-12)
    assert (got["R@1"], got["R@2"], got["R@3"]) == (0.0, 0.0, 100.0)
    # Two positives tied with a negative: ranks 1 and 2: ((0 + 1/2) / 2 + (1/2 + 2/3) / 2) / 2 = 5/12.
    got = retrieval_metrics(query, _vectors([0.5, 0.5, 0.5]), [1], [1, 1, 0], ks=(1, 2))
    assert got["mAP"] == pytest.approx(100 * 5 / 12, rel=1e-12)
    assert (got["R@1"], got["R@2"]) == (0.0, 100.0)
    # The same with exclude_self: the query's own (tied) database item is junk, not a negative.
    x = _vectors([0.5, 0.5])
    got = retrieval_metrics(x, x, [1, 1], [1, 1], ks=(1,), exclude_self=True)
    assert got["mAP"] == 100.0 and got["R@1"] == 100.0


def test_tensor_numpy_and_label_types_agree() -> None:
    rng = np.random.default_rng(6)
    x = _unit(rng, 30, 5)
    y = _unit(rng, 30, 5)
    labels = rng.integers(0, 5, 30)
    base = retrieval_metrics(x, y, labels, labels, exclude_self=True)
    from_torch = retrieval_metrics(
        torch.from_numpy(x), torch.from_numpy(y).double(), torch.from_numpy(labels), list(labels), exclude_self=True
    )
    as_strings = retrieval_metrics(x, y, [f"c{v}" for v in labels], [f"c{v}" for v in labels], exclude_self=True)
    assert base == from_torch == as_strings
    assert list(base) == ["mAP", "R@1", "R@2", "R@4", "R@8", "num_queries", "num_no_positive"]


def test_progress_bar_runs() -> None:
    rng = np.random.default_rng(7)
    x = _unit(rng, 10, 3)
    labels = np.arange(10) % 3
    assert retrieval_metrics(x, x, labels, labels, exclude_self=True, block_size=4, progress=True)["num_queries"] == 10


def test_average_precision_against_loop() -> None:
    rng = np.random.default_rng(8)
    for _ in range(20):
        ranks = np.sort(rng.choice(50, size=rng.integers(1, 10), replace=False))
        expected = 0.0
        for j, r in enumerate(ranks):
            expected += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(ranks)
        assert average_precision(ranks) == pytest.approx(expected, rel=1e-12)
    assert average_precision([0, 1, 2]) == 1.0
    assert average_precision(np.array([0.0, 3.0])) == pytest.approx(((1 + 1) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


@pytest.mark.parametrize(
    ("ranks", "match"),
    [
        ([], "non-empty"),
        ([[0, 1]], "1-D"),
        ([2, 1], "strictly increasing"),
        ([0, 0], "strictly increasing"),
        ([-1, 2], "non-negative"),
        ([0.5, 2], "integer ranks"),
    ],
)
def test_average_precision_bad_input(ranks: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        average_precision(ranks)


def test_bad_inputs_are_clear_errors() -> None:
    x = np.eye(3, dtype=np.float32)
    labels = [0, 0, 1]
    with pytest.raises(ValueError, match="differ in dimension"):
        retrieval_metrics(x, np.eye(3, 4, dtype=np.float32), labels, labels)
    with pytest.raises(ValueError, match="has 2 labels but query has 3 rows"):
        retrieval_metrics(x, x, labels[:2], labels)
    with pytest.raises(ValueError, match="database_labels has 4 labels"):
        retrieval_metrics(x, x, labels, labels + [1])
    with pytest.raises(ValueError, match="exclude_self=True .* got 2 queries and 3 database items"):
        retrieval_metrics(x[:2], x, labels[:2], labels, exclude_self=True)
    with pytest.raises(ValueError, match="query is empty"):
        retrieval_metrics(np.zeros((0, 3), np.float32), x, [], labels)
    with pytest.raises(ValueError, match="database is empty"):
        retrieval_metrics(x, np.zeros((0, 3), np.float32), labels, [])
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        retrieval_metrics(x[0], x, labels, labels)
    with pytest.raises(ValueError, match="integer >= 1"):
        retrieval_metrics(x, x, labels, labels, ks=(1, 0))
    with pytest.raises(ValueError, match="integer >= 1"):
        retrieval_metrics(x, x, labels, labels, ks=(1.5,))
    with pytest.raises(ValueError, match="sequence of integers"):
        retrieval_metrics(x, x, labels, labels, ks=5)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        retrieval_metrics(x, x, labels, labels, block_size=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        retrieval_metrics(x, x, labels, labels, block_size=2.5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieval_metrics(np.full((3, 3), np.nan, np.float32), x, labels, labels)
    with pytest.raises(ValueError, match="none of the 3 queries has a positive"):
        retrieval_metrics(x, x, [5, 6, 7], labels)
    with pytest.raises(ValueError, match="one label per row"):
        retrieval_metrics(x, x, np.zeros((3, 1)), labels)
    with pytest.raises(ValueError, match="one comparable type"):
        retrieval_metrics(x, x, np.array([0, 1, 2], dtype=object), np.array(["a", 1, None], dtype=object))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        retrieval_metrics([[1.0, 0.0]], x, [0], labels)
    with pytest.raises(ValueError, match="float array"):
        retrieval_metrics(np.array([["a", "b", "c"]]), x, [0], labels)


# --- symmetric tests: each pair of blocks computed once (queries = database, self excluded) -------------


def _layout(name: str, rng: np.random.Generator) -> np.ndarray:
    """Labels of one class layout, in random order."""
    sizes = {
        "sop_like": rng.integers(2, 13, 12),
        "singletons": [1] * 9 + [2, 3, 5],  # queries without positives, still negatives for the others
        "mixed": [1, 2, 3, 9, 14, 30],  # one class wider than the blocks
        "one_class": [37],
        "two_classes": [20, 21],
    }[name]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    return labels


def _tied_embeddings(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Small integer coordinates (dot products exact in float32, so equal pairs tie exactly) and duplicated
    rows: ties within classes, between classes and with the query's own row."""
    x = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    dup = rng.choice(n, size=n // 3, replace=False)
    x[dup[1:]] = x[dup[:-1]]
    return x


LAYOUTS = ["sop_like", "singletons", "mixed", "one_class", "two_classes"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("block_size", [3, 8, None])
def test_symmetric_pairs_equal_one_sided_path_and_full_sort(
    layout: str, ties: bool, block_size: int | None, counting_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(LAYOUTS.index(layout) * 7 + ties)
    labels = _layout(layout, rng)
    x = _tied_embeddings(rng, labels.size, 3) if ties else _unit(rng, labels.size, 6)
    ks = [1, 2, 5, 1000]
    calls = []
    real = metrics_module._symmetric_scores
    monkeypatch.setattr(metrics_module, "_symmetric_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pairs = retrieval_metrics(x, x, labels, labels, ks, exclude_self=True, block_size=block_size)
    assert calls, "the symmetric path was not taken"
    monkeypatch.setattr(metrics_module, "_SYMMETRIC_PAIRS", False)
    one_sided = retrieval_metrics(x, x, labels, labels, ks, exclude_self=True, block_size=block_size)
    assert len(calls) == 1
    assert pairs == one_sided  # identical, not just close: the same ranks and the same sums
    _assert_close(pairs, _reference_metrics(x, x, labels, labels, ks, True))


def test_symmetric_pairs_computes_half_the_similarities(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    labels = _layout("sop_like", rng)
    x = _unit(rng, labels.size, 8)
    n, block = labels.size, 5
    computed = []
    real_matmul = torch.Tensor.__matmul__

    def counting_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real_matmul(a, b)
        computed.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting_matmul)
    monkeypatch.setattr(metrics_module, "_GRAM_ROWS", 1)  # the positives' similarities: one class at a time
    retrieval_metrics(x, x, labels, labels, (1, 4), exclude_self=True, block_size=block)
    sizes = np.bincount(labels)
    blocks = -(-n // block)
    assert len(computed) == blocks * (blocks + 1) // 2 + sizes.size
    # the upper triangle of blocks, diagonal included, and each class against itself
    assert sum(computed) <= (n * n + n * block) / 2 + int((sizes**2).sum())
    computed.clear()
    monkeypatch.setattr(metrics_module, "_SYMMETRIC_PAIRS", False)
    retrieval_metrics(x, x, labels, labels, (1, 4), exclude_self=True, block_size=block)
    assert sum(computed) == n * n  # the one-sided path: every query row in full


def test_symmetric_path_only_when_both_sides_are_the_same() -> None:
    rng = np.random.default_rng(12)
    labels = _layout("sop_like", rng)
    x = _unit(rng, labels.size, 5)
    y = x.copy()
    y[3, 0] += 1e-3  # one row differs: an asymmetric test that must not be taken for a symmetric one
    got = retrieval_metrics(x, y, labels, labels, (1, 4), exclude_self=True, block_size=4)
    _assert_close(got, _reference_metrics(x, y, labels, labels, [1, 4], True))
    other = labels.copy()
    other[[0, 1]] = other[[1, 0]] if other[0] != other[1] else other[[0, 2]]
    got = retrieval_metrics(x, x, labels, other, (1, 4), exclude_self=True, block_size=4)
    _assert_close(got, _reference_metrics(x, x, labels, other, [1, 4], True))


# --- the device path: sums stay on the device, one transfer to the host at the end ----------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_device_path_reads_the_host_a_fixed_number_of_times(symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every read of a device value on the host is a synchronisation. The torch (device) path runs
    here on the CPU with the same functions; its host reads must not grow with the number of blocks."""
    monkeypatch.setattr(metrics_module, "_COMPILED_MIN_COMPARISONS", 10**30)  # the path a CUDA device takes
    rng = np.random.default_rng(14)
    labels = _layout("sop_like", rng)
    x = _unit(rng, labels.size, 6)
    y = x if symmetric else _unit(rng, labels.size, 6)
    reads: list[str] = []
    for name in ("cpu", "numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _real=real, _name=name, **kw: reads.append(_name) or _real(self, *a, **kw),
        )
    per_block_size = {}
    for block_size in (3, 40):
        reads.clear()
        got = retrieval_metrics(x, y, labels, labels, (1, 4), exclude_self=True, block_size=block_size)
        per_block_size[block_size] = list(reads)
    assert per_block_size[3] == per_block_size[40]
    assert len(per_block_size[3]) <= 6  # the finiteness check of each side; the AP sum and the hits, to the host
    monkeypatch.undo()
    _assert_close(got, _reference_metrics(x, y, labels, labels, [1, 4], True))


def test_the_test_protocol_counts_on_a_cuda_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """raml test hands the embeddings to the metrics on a CUDA device (counting there), elsewhere on the CPU
    (the compiled path; other accelerators lack the float64 sums)."""
    from raml.retrieval.evaluate import _on_eval_device

    x = torch.ones(2, 3)
    moved: list[tuple] = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: moved.append(a) or self)
    assert _on_eval_device(x, torch.device("cuda", 1)) is x and moved == [(torch.device("cuda", 1),)]
    moved.clear()
    assert _on_eval_device(x, torch.device("cpu")) is x and _on_eval_device(x, torch.device("meta")) is x
    assert moved == []


# --- cases found by mutation testing (scripts/mutate.py metrics; docs/benchmarks.md) -----------------------


@pytest.fixture
def three_torch_threads():
    """Three torch threads: retrieval_metrics then counts on a pool of threads (the default under make test's
    OMP_NUM_THREADS=1 is one thread and no pool)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("chunk_bytes", [1, 200, None])
def test_thread_pool_counting_matches_the_reference(three_torch_threads, monkeypatch, chunk_bytes) -> None:
    """The CPU counting split over a pool of threads, in jobs of one or several rows, gives the full-sort
    reference's numbers, with classes of 1 to 20 images (runs of rows with different numbers of positives)."""
    monkeypatch.setattr(metrics_module, "_COMPILED_MIN_COMPARISONS", 0)
    if chunk_bytes is not None:
        monkeypatch.setattr(metrics_module, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(11)
    sizes = [1, 2, 2, 3, 5, 8, 13, 20]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    database = _unit(rng, labels.size, 4)
    query = _unit(rng, labels.size, 4)
    ks = [1, 3, 10]
    for block_size in (None, 7):
        got = retrieval_metrics(query, database, labels, labels, ks, exclude_self=True, block_size=block_size)
        _assert_close(got, _reference_metrics(query, database, labels, labels, ks, True))
    counter = metrics_module._Counter(torch.device("cpu"), max_rows=labels.size, num_cols=labels.size, comparisons=0)
    with counter:
        assert counter.compiled and counter.threads == 3 and counter.pool is not None
    assert counter.pool._shutdown  # leaving the block shuts the pool down


def test_counter_sizes_its_chunks_and_threads() -> None:
    """Chunks of about _CHUNK_BYTES of similarities, at most 255 rows (the column count's 1-byte sums); never more
    threads than rows; no pool on one thread or off the compiled path (a non-CPU device, a small evaluation)."""
    big_job = metrics_module._COMPILED_MIN_COMPARISONS
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        counter = metrics_module._Counter(torch.device("cpu"), max_rows=3, num_cols=3000, comparisons=big_job)
        with counter:
            assert counter.compiled and counter.threads == 3 and counter.pool is not None
            assert counter.chunk == min(3, metrics_module._CHUNK_BYTES // (4 * 3000))
        big = metrics_module._Counter(torch.device("cpu"), max_rows=10**6, num_cols=1000, comparisons=big_job)
        assert big.chunk == min(255, metrics_module._CHUNK_BYTES // (4 * 1000)) and big.threads == 4
        assert big.chunk <= count_kernel.MAX_COLUMN_ROWS
        big.__exit__(None, None, None)
        narrow = metrics_module._Counter(torch.device("cpu"), max_rows=10**6, num_cols=10, comparisons=big_job)
        assert narrow.chunk == 255
        narrow.__exit__(None, None, None)
        small = metrics_module._Counter(torch.device("cpu"), max_rows=10**6, num_cols=10, comparisons=big_job - 1)
        assert not small.compiled and small.threads == 1 and small.pool is None
        torch.set_num_threads(1)
        single = metrics_module._Counter(torch.device("cpu"), max_rows=50, num_cols=10, comparisons=big_job)
        assert single.threads == 1 and single.pool is None and single.chunk == 50
    finally:
        torch.set_num_threads(before)
    off = metrics_module._Counter(torch.device("meta"), max_rows=5, num_cols=10, comparisons=big_job)
    assert not off.compiled and off.threads == 1 and off.pool is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_compiled_kernels_count_from_the_budgeted_comparisons_on(symmetric: bool, monkeypatch) -> None:
    """An evaluation of at least _COMPILED_MIN_COMPARISONS comparisons (each query's positives x the database, all
    queries) counts with the compiled kernels, a smaller one with torch; the metrics are the same."""
    rng = np.random.default_rng(15)
    labels = np.repeat(np.arange(6), [2, 3, 3, 4, 5, 7])  # 24 items; a query has its class size - 1 positives
    x = _unit(rng, labels.size, 5)
    y = x if symmetric else _unit(rng, labels.size, 5)
    comparisons = int((np.bincount(labels)[labels] - 1).sum()) * labels.size
    calls: list[str] = []
    for name in ("count_rows", "count_columns"):
        real = getattr(count_kernel, name)
        monkeypatch.setattr(count_kernel, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    expected = _reference_metrics(x, y, labels, labels, [1, 4], True)
    for budget, compiled in ((comparisons, True), (comparisons + 1, False)):
        calls.clear()
        monkeypatch.setattr(metrics_module, "_COMPILED_MIN_COMPARISONS", budget)
        got = retrieval_metrics(x, y, labels, labels, (1, 4), exclude_self=True, block_size=10)
        assert bool(calls) == compiled
        if compiled and symmetric:
            assert "count_columns" in calls  # the block pairs counted both ways
        _assert_close(got, expected)


def test_sorting_path_in_chunks_of_rows_matches_the_reference(monkeypatch) -> None:
    """The sorting path with a chunk budget of a few rows (not one row, not all of them)."""
    monkeypatch.setattr(metrics_module, "_SORT_MIN_POSITIVES", 1)
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 4, 60)
    database = _unit(rng, 60, 5)
    query = _unit(rng, 60, 5)
    monkeypatch.setattr(metrics_module, "_SORT_CHUNK_BYTES", 3 * 12 * 60)  # three rows per sort
    got = retrieval_metrics(query, database, labels, labels, (1, 5), exclude_self=True)
    _assert_close(got, _reference_metrics(query, database, labels, labels, [1, 5], True))


def test_similarities_are_float32_even_for_float64_inputs() -> None:
    """float64 embeddings are compared in float32 (the contract): two similarities that differ only beyond
    float32's precision tie, and the tie is pessimistic."""
    query = np.array([[1.0, 0.0]])
    database = np.array([[1.0, 0.0], [1.0 + 1e-12, 0.0]])  # the positive is ahead in float64, equal in float32
    got = retrieval_metrics(query, database, [0], [1, 0], ks=(1,))
    # float32: the positive ties with the negative and ranks after it (rank 1, AP (0 + 1/2) / 2); float64 would
    # rank it first (AP 1)
    assert got["R@1"] == 0.0 and got["mAP"] == pytest.approx(25.0)
    tensors = retrieval_metrics(torch.from_numpy(query), torch.from_numpy(database), [0], [1, 0], ks=(1,))
    assert tensors == got


def test_large_finite_embeddings_are_accepted_and_one_dimension_is_enough() -> None:
    """The finiteness check sums in float64: entries whose float32 sum overflows are still finite. D = 1 works."""
    query = np.array([[1e-30, 0.0]], dtype=np.float32)
    database = np.array([[3e38, 0.0], [3e38, 0.0]], dtype=np.float32)
    assert retrieval_metrics(query, database, [0], [0, 1], ks=(1,))["num_queries"] == 1
    x = np.array([[1.0], [-1.0], [1.0]], dtype=np.float32)
    got = retrieval_metrics(x, x, [0, 1, 0], [0, 1, 0], ks=(1,), exclude_self=True)
    assert got["num_queries"] == 2 and got["num_no_positive"] == 1 and got["R@1"] == 100.0


def test_more_bad_inputs_name_the_argument() -> None:
    x = np.eye(3, dtype=np.float32)
    labels = [0, 0, 1]
    with pytest.raises(ValueError, match="^query_labels has 2 labels but query has 3 rows"):
        retrieval_metrics(x, x, labels[:2], labels)
    with pytest.raises(ValueError, match="^database_labels has 4 labels but database has 3 rows"):
        retrieval_metrics(x, x, labels, labels + [1])
    with pytest.raises(ValueError, match="^query must be a float tensor of embeddings, got dtype torch.bool"):
        retrieval_metrics(torch.ones(3, 3, dtype=torch.bool), x, labels, labels)
    with pytest.raises(ValueError, match="^database must be a float tensor of embeddings, got dtype torch.complex64"):
        retrieval_metrics(x, torch.ones(3, 3, dtype=torch.complex64), labels, labels)
    with pytest.raises(TypeError, match="got list"):
        retrieval_metrics([[1.0, 0.0]], x, [0], labels)
    with pytest.raises(ValueError, match="mAP and Recall@k are undefined"):
        retrieval_metrics(x, x, [5, 6, 7], labels)
    with pytest.raises(ValueError, match="^query_labels and database_labels must be of one comparable type"):
        retrieval_metrics(x, x, np.array([0, 1, 2], dtype=object), np.array(["a", 1, None], dtype=object))
    with pytest.raises(ValueError, match="integer ranks"):
        average_precision([0.0, np.inf])
    with pytest.raises(ValueError, match=r"^average_precision expects 0-based.*got \[3, 2, 1, 0\]"):
        average_precision([3, 2, 1, 0])


def test_no_progress_bar_unless_asked(capsys) -> None:
    rng = np.random.default_rng(13)
    x = _unit(rng, 10, 3)
    labels = np.arange(10) % 3
    retrieval_metrics(x, x, labels, labels, exclude_self=True, block_size=4)
    assert capsys.readouterr().err == ""
    retrieval_metrics(x, x, labels, labels, exclude_self=True, block_size=4, progress=True)
    assert "retrieval metrics" in capsys.readouterr().err


# --- raml.bench.eval (kept here, next to the metrics it measures) --------------------------------------


def test_clustered_embeddings_have_sop_like_classes() -> None:
    from raml.bench.eval import make_clustered_embeddings

    x, labels = make_clustered_embeddings(500, 16, 100, seed=1)
    sizes = np.bincount(labels)
    assert x.shape == (500, 16) and x.dtype == np.float32 and labels.shape == (500,)
    assert sizes.size == 100 and sizes.min() >= 2 and sizes.max() <= 12 and sizes.sum() == 500
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    again, _ = make_clustered_embeddings(500, 16, 100, seed=1)
    assert np.array_equal(x, again)
    with pytest.raises(ValueError, match="cannot form 100 classes of 2..12"):
        make_clustered_embeddings(150, 16, 100)


#: the tiny benchmark run the tests below read (each phase is a fresh process: one run for the module)
TINY_BENCH = {"num_images": 500, "dim": 32, "num_classes": 100, "seed": 0}


@pytest.fixture(scope="module")
def tiny_eval_bench(tmp_path_factory) -> dict:
    """``raml bench eval`` on :data:`TINY_BENCH` with every phase, CUDA asked for: its JSON and printed report."""
    from raml.bench.eval import main

    out = tmp_path_factory.mktemp("bench_eval") / "bench.json"
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_BENCH.items()]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--device", "cuda", "--json", str(out)]) == 0
    return {"result": json.loads(out.read_text()), "report": printed.getvalue()}


def test_eval_benchmark_cli_tiny(tiny_eval_bench: dict) -> None:
    result = tiny_eval_bench["result"]
    for key in ("matmul_s", "eval_s", "ratio", "matmul_peak_rss_gb", "eval_peak_rss_gb", "torch_threads", "cpu_model"):
        assert key in result
    assert result["phases"] == ["matmul", "sym", "sym_one_sided", "asym"]
    for phase in ("sym", "sym_one_sided", "asym"):
        assert result[f"{phase}_s"] > 0 and result[f"{phase}_ratio"] > 0 and result[f"{phase}_peak_rss_gb"] > 0
        assert result[f"{phase}_metrics"]["num_queries"] == 500
        assert set(result[f"{phase}_metrics"]) >= {"mAP", "R@1", "R@1000"}
        assert 0.0 <= result[f"{phase}_metrics"]["mAP"] <= 100.0
    assert result["sym_metrics_equal"] is True and result["sym_max_abs_diff"] == 0.0
    assert result["asym_metrics"] != result["sym_metrics"]  # other queries, other figures
    assert result["cpu_ratio"] > 0 and len(result["runs"]) == 1
    report = tiny_eval_bench["report"]
    assert "symmetric, pairs once" in report and "x matmul (CPU)" in report
    cuda = torch.cuda.is_available()
    assert result["device"] == ("cuda" if cuda else "cpu") and result["cuda_unavailable"] is (not cuda)
    assert ("CUDA was asked for but is not available" in report) is (not cuda)


def test_eval_benchmark_cli_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    from raml.bench.eval import main

    with pytest.raises(SystemExit):
        main(["--num-images", "10", "--num-classes", "100"])
    assert "choose --num-images between 200 and 1200" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--num-images", "500", "--num-classes", "100", "--repeat", "0"])
    assert "--repeat must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--num-images", "500", "--num-classes", "100", "--device", "tpu"])
    assert "--device must be 'cpu' or 'cuda'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--num-images", "500", "--num-classes", "100", "--phases", "sort"])
    assert "unknown --phases ['sort']" in capsys.readouterr().err


def test_eval_benchmark_metrics_are_those_of_its_embeddings(tiny_eval_bench: dict) -> None:
    """The benchmark's metrics are measured on its data, not filled in: they equal a direct ``retrieval_metrics``
    call and the plain reference on the same seeded embeddings (fixed numbers in their place failed here)."""
    from raml.bench.eval import _KS, make_clustered_embeddings

    measured = tiny_eval_bench["result"]["metrics"]  # the symmetric phase's
    x, labels = make_clustered_embeddings(*(TINY_BENCH[k] for k in ("num_images", "dim", "num_classes", "seed")))
    direct = retrieval_metrics(x, x, labels, labels, ks=_KS, exclude_self=True)
    reference = _reference_metrics(x, x, labels, labels, list(_KS), exclude_self=True)
    assert set(measured) == set(direct)
    for key, value in direct.items():
        assert measured[key] == pytest.approx(value, abs=1e-9), key
    for key, value in reference.items():
        assert measured[key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 < measured["mAP"] < 100.0  # neither trivial end: the data has hard and easy queries
