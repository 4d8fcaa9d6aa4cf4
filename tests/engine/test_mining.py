"""Mining for ``--mode sym``: the reference's epochs of class groups and its negative-mining weights, each
checked against a plain re-implementation of the reference's arithmetic (pavelsuma/raml at ``ea0f00f``:
``TuplesFineGrainDataset`` with ``spc = 4``, ``create_epoch_tuples``, ``mine_dist``,
``inverse_sphere_distances``) written here in float64 / numpy, not against our own output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raml.engine.mining import (
    class_grouped_epoch,
    class_grouped_epoch_size,
    class_groups,
    distance_weighted_negatives,
    log_sphere_distance_density,
    mining_pool,
    negative_probabilities,
)

SPC = 4  # the reference's samples per class in sym mode (a constant there)


def _labels(sizes: list[int]) -> list[int]:
    """Labels of a split stored class by class (as raml's splits and the reference's lists are)."""
    return [label for label, size in enumerate(sizes) for _ in range(size)]


def _cub_shaped() -> list[int]:
    rng = np.random.default_rng(0)
    return _labels(rng.integers(41, 61, size=30).tolist())  # CUB: 41-60 images per class


def _sop_shaped() -> list[int]:
    rng = np.random.default_rng(1)
    sizes = rng.choice([2, 3, 4, 5, 6, 7, 8, 12], p=[0.3, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02], size=600)
    return _labels(sizes.tolist())  # SOP: many classes of 2-3 images (left out), the rest 4-12


def _reference_epoch(labels: list[int], query_size: int, pool_size: int, seed: int) -> tuple[list[int], list[int]]:
    """The reference's epoch, plainly: its image list keeps the classes with >= 4 images, concatenated; each
    class gives the first min_class // 4 * 4 of a permutation of its images; the classes' rows are permuted;
    the epoch walks (group, class, place in group); the pool is a permutation of the kept images."""
    rs = np.random.RandomState(seed)
    kept_classes = []
    for label in sorted(set(labels)):
        members = [i for i, x in enumerate(labels) if x == label]
        if len(members) >= SPC:
            kept_classes.append(members)
    images = [i for members in kept_classes for i in members]  # the reference's self.images (our indices)
    starts = np.cumsum([0] + [len(m) for m in kept_classes])
    per_class = min(len(m) for m in kept_classes) // SPC * SPC
    qsize = min(query_size, len(images), per_class * len(kept_classes))
    rows = np.asarray(
        [rs.permutation(np.arange(starts[c], starts[c + 1]))[:per_class] for c in range(len(kept_classes))]
    )
    rows = rs.permutation(rows)  # the classes in a random order (rows of a 2-D array)
    groups = per_class // SPC
    flat = rows.reshape(len(kept_classes), groups, SPC).transpose(1, 0, 2).reshape(-1)[:qsize]
    pool = rs.permutation(len(images))[:pool_size]
    return [images[k] for k in flat], [images[k] for k in pool]


@pytest.mark.parametrize(("shape", "query_size"), [("cub", 8000), ("cub", 1001), ("sop", 8000), ("sop", 300)], ids=str)
def test_epoch_and_pool_are_the_references(shape, query_size):
    labels = _cub_shaped() if shape == "cub" else _sop_shaped()
    for seed in (1234, 1235):
        expected_epoch, expected_pool = _reference_epoch(labels, query_size, 500, seed)
        rng = np.random.RandomState(seed)
        epoch = class_grouped_epoch(labels, SPC, query_size, rng)
        pool = mining_pool(labels, SPC, 500, rng)
        assert epoch == expected_epoch
        assert pool == expected_pool
        assert len(epoch) == class_grouped_epoch_size(labels, SPC, query_size)


def test_epoch_structure_cub_and_sop():
    # CUB-shaped: every class gives min_class // 4 * 4 distinct images, in groups of one class
    labels = _cub_shaped()
    sizes = np.bincount(labels)
    per_class = sizes.min() // 4 * 4
    epoch = class_grouped_epoch(labels, SPC, 10**6, np.random.RandomState(0))
    assert len(epoch) == per_class * len(sizes) == class_grouped_epoch_size(labels, SPC, 10**6)
    assert len(set(epoch)) == len(epoch)
    assert np.bincount([labels[i] for i in epoch]).tolist() == [per_class] * len(sizes)
    groups = [epoch[i : i + 4] for i in range(0, len(epoch), 4)]
    assert all(len({labels[i] for i in g}) == 1 for g in groups)
    # group after group: the first len(classes) groups are one of each class, in the order every round repeats
    first_round = [labels[g[0]] for g in groups[: len(sizes)]]
    assert sorted(first_round) == list(range(len(sizes)))
    assert [labels[g[0]] for g in groups[len(sizes) : 2 * len(sizes)]] == first_round
    # SOP-shaped: classes of 2-3 images never appear; min_class is 4, so one group per kept class, capped
    labels = _sop_shaped()
    sizes = np.bincount(labels)
    kept = int((sizes >= 4).sum())
    assert class_grouped_epoch_size(labels, SPC, 10**6) == 4 * kept
    epoch = class_grouped_epoch(labels, SPC, 300, np.random.RandomState(0))
    assert len(epoch) == 300 and all(sizes[labels[i]] >= 4 for i in epoch)
    assert len({labels[i] for i in epoch}) == 75  # 75 groups, 75 different classes
    with pytest.raises(ValueError, match="at least 4 images"):
        class_grouped_epoch_size(_labels([3, 2, 3]), SPC, 100)


def test_log_density_matches_formula():
    d = torch.tensor([0.3, 0.9, 1.4, 1.9], dtype=torch.float64)
    for dim in (3, 8, 64):
        expected = [math.log(x ** (dim - 2) * (1 - x * x / 4) ** ((dim - 3) / 2)) for x in d.tolist()]
        assert torch.allclose(log_sphere_distance_density(d, dim), torch.tensor(expected, dtype=torch.float64))


def _reference_probabilities(anchor: list[float], anchor_label: int, pool: list[list[float]], pool_labels: list[int]):
    """inverse_sphere_distances for one anchor, in float64 with plain loops."""
    dim = len(anchor)
    logs = []
    for vector, label in zip(pool, pool_labels):
        product = sum(a * b for a, b in zip(anchor, vector))
        d = max(math.sqrt(max(2.0 - 2.0 * product, 0.0)), 0.5)  # clamped below at 0.5, nowhere above
        log_w = (2.0 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1.0 - 0.25 * d * d)
        logs.append(0.0 if label == anchor_label else log_w)  # same class: 0 *before* the max
    top = max(logs)  # so the max is at least 0
    weights = [0.0 if label == anchor_label else math.exp(x - top) for x, label in zip(logs, pool_labels)]
    weights = [w + 1e-6 for w in weights]  # every pool item, same class included
    total = sum(weights)
    return [w / total for w in weights]


def _mining_example(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(3, dim, generator=g, dtype=torch.float64), dim=1)
    pool = F.normalize(torch.randn(12, dim, generator=g, dtype=torch.float64), dim=1)
    pool[0] = F.normalize(anchors[0] + 0.05 * pool[0], dim=0)  # closer than 0.5: the floor decides its weight
    pool[1] = F.normalize(anchors[1] + 0.1 * pool[1], dim=0)
    pool[2] = anchors[2]  # the anchor itself in the pool
    pool[3] = F.normalize(-anchors[0] + 0.02 * pool[3], dim=0)  # nearly antipodal: d in (1.99, 2), no cap there
    anchor_labels = torch.tensor([0, 1, 2])
    pool_labels = torch.tensor([3, 4, 2, 0, 1, 5, 0, 6, 7, 1, 8, 9])
    return anchors, anchor_labels, pool, pool_labels


@pytest.mark.parametrize("dim", [8, 512])
def test_probabilities_are_the_references(dim):
    anchors, anchor_labels, pool, pool_labels = _mining_example(dim, seed=dim)
    got = negative_probabilities(anchors, anchor_labels, pool, pool_labels)
    for b in range(3):
        expected = _reference_probabilities(
            anchors[b].tolist(), int(anchor_labels[b]), pool.tolist(), pool_labels.tolist()
        )
        assert torch.allclose(got[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert torch.dist(anchors[0], pool[0]).item() < 0.5 and 1.99 < torch.dist(anchors[0], pool[3]).item() < 2.0
    # same-class items (the anchor itself included) keep the 1e-6 floor: they can be drawn
    same = anchor_labels.view(-1, 1) == pool_labels.view(1, -1)
    assert bool((got[same] > 0).all())


def test_no_cap_below_two_and_an_exactly_antipodal_item_gets_finite_weights():
    """Distances just below 2 keep their own (huge) weights; exactly 2 is NaN in the reference (log of 0):
    ours stops at the largest double below 2 there."""
    dim = 32
    basis = torch.eye(dim, dtype=torch.float64)
    anchor = basis[:1]
    theta = math.pi - 1e-3  # d = 2 cos(5e-4), about 2 - 2.5e-7
    near = math.cos(theta) * basis[0] + math.sin(theta) * basis[1]
    pool = torch.stack([near, basis[2], basis[3], 0.6 * basis[0] + 0.8 * basis[4], basis[0]])
    pool_labels = [1, 2, 3, 4, 0]
    got = negative_probabilities(anchor, torch.tensor([0]), pool, torch.tensor(pool_labels))[0]
    expected = _reference_probabilities(anchor[0].tolist(), 0, pool.tolist(), pool_labels)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    pool = torch.cat([-anchor, pool])
    got = negative_probabilities(anchor, torch.tensor([0]), pool, torch.tensor([5, *pool_labels]))
    assert bool(torch.isfinite(got).all()) and got.sum().item() == pytest.approx(1.0)
    assert got[0, 0].item() > 0.99  # the farthest item dominates, as just below 2


def test_max_is_taken_after_same_class_log_weights_are_zero():
    """Near-orthogonal other-class items all have log-weights below 0 (about -0.35 at D = 8): the max is then
    the same-class 0, which changes every weight's scale and so the share of the 1e-6 floor."""
    dim = 8
    anchor = torch.zeros(1, dim, dtype=torch.float64)
    anchor[0, 0] = 1.0
    pool = torch.eye(dim, dtype=torch.float64)[1:]  # all at distance sqrt(2), log w = -0.35
    pool = torch.cat([pool, anchor])  # and the anchor itself, same class
    labels = torch.tensor([0])
    pool_labels = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    got = negative_probabilities(anchor, labels, pool, pool_labels)[0]
    expected = _reference_probabilities(anchor[0].tolist(), 0, pool.tolist(), pool_labels.tolist())
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    w = math.exp(-(6 * math.log(math.sqrt(2)) + 2.5 * math.log(0.5)))  # exp(log w - 0), not exp(0)
    assert got[-1].item() == pytest.approx(1e-6 / (7 * (w + 1e-6) + 1e-6), rel=1e-9)


def test_negative_draws_are_numpy_weighted_choices_in_anchor_order():
    anchors, anchor_labels, pool, pool_labels = _mining_example(16, seed=5)
    picked = distance_weighted_negatives(
        anchors, anchor_labels, pool, pool_labels, 4, np.random.RandomState(9), chunk=2
    )
    rs = np.random.RandomState(9)
    for b in range(3):
        p = _reference_probabilities(anchors[b].tolist(), int(anchor_labels[b]), pool.tolist(), pool_labels.tolist())
        assert picked[b].tolist() == rs.choice(12, size=4, replace=False, p=p).tolist()
        assert len(set(picked[b].tolist())) == 4
    with pytest.raises(ValueError, match="--pool-size"):
        distance_weighted_negatives(anchors, anchor_labels, pool, pool_labels, 13, np.random.RandomState(0))


def test_class_groups_are_single_class_groups():
    labels = [0] * 5 + [1] * 4 + [2] * 2 + [3]
    groups = class_groups(labels, num_images=20, group_size=4, generator=torch.Generator().manual_seed(0))
    assert len(groups) == 5
    for group in groups:
        assert len(group) == 4
        assert len({labels[i] for i in group}) == 1
        assert labels[group[0]] != 3  # a one-image class has no positive: never an anchor group
    with pytest.raises(ValueError, match="at least 2 classes with at least 2 images"):
        class_groups([0, 1, 2], 8, 4, torch.Generator())


def test_no_anchors_draw_nothing_and_leave_the_stream_untouched():
    pool, pool_labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    rng = np.random.RandomState(3)
    drawn = distance_weighted_negatives(
        torch.empty(0, 4, dtype=torch.float64), torch.empty(0), pool, pool_labels, 2, rng
    )
    assert drawn.shape == (0, 2) and drawn.dtype == torch.int64
    assert rng.randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)


def test_fewer_than_two_kept_classes_is_an_error_not_same_class_negatives():
    # only class 0 has >= 4 images: every pool item would be of the anchor's class
    labels = [0] * 4 + [1] * 3 + [2] * 2 + [3] * 3
    for call in (
        lambda: class_grouped_epoch(labels, SPC, 100, np.random.RandomState(0)),
        lambda: class_grouped_epoch_size(labels, SPC, 100),
        lambda: mining_pool(labels, SPC, 100, np.random.RandomState(0)),
    ):
        with pytest.raises(ValueError, match="at least 2 classes with at least 4 images.*has 1 such"):
            call()
    assert len(class_grouped_epoch(labels + [4] * 4, SPC, 100, np.random.RandomState(0))) == 8


def test_a_pool_short_of_other_class_images_warns_once(caplog, monkeypatch):
    import raml.engine.mining as mining

    monkeypatch.setattr(mining, "_warned_short_pool", False)
    pool, anchors = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    pool_labels, anchor_labels = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 1])
    with caplog.at_level("WARNING", logger="raml.engine.mining"):
        distance_weighted_negatives(anchors, anchor_labels, pool, pool_labels, 2, np.random.RandomState(0))
        assert not caplog.records  # every anchor has >= 2 images of another class
        distance_weighted_negatives(anchors, anchor_labels, pool, pool_labels, 3, np.random.RandomState(0))
        distance_weighted_negatives(anchors, anchor_labels, pool, pool_labels, 3, np.random.RandomState(0))
    assert len(caplog.records) == 1
    assert "1 of 3 anchors have fewer than --neg-num 3 images of another class" in caplog.text
    assert "(fewest: 2)" in caplog.text
