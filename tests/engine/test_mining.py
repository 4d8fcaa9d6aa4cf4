"""Mining: distance-weighted negatives and class groups against explicit computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raml.engine.mining import class_groups, distance_weighted_negatives, log_sphere_distance_density


def test_log_density_matches_formula():
    d = torch.tensor([0.3, 0.9, 1.4, 1.9], dtype=torch.float64)
    for dim in (3, 8, 64):
        expected = [math.log(x ** (dim - 2) * (1 - x * x / 4) ** ((dim - 3) / 2)) for x in d.tolist()]
        assert torch.allclose(log_sphere_distance_density(d, dim), torch.tensor(expected, dtype=torch.float64))


def test_negatives_never_share_the_anchor_class_and_follow_the_weights():
    g = torch.Generator().manual_seed(0)
    dim = 4
    anchors = F.normalize(torch.randn(1, dim, generator=g), dim=1)
    pool = F.normalize(torch.randn(6, dim, generator=g), dim=1)
    anchor_labels = torch.tensor([0])
    pool_labels = torch.tensor([0, 1, 2, 1, 3, 0])
    counts = torch.zeros(6)
    draws = 4000
    for _ in range(draws):
        counts[distance_weighted_negatives(anchors, anchor_labels, pool, pool_labels, 1, g)[0, 0]] += 1
    assert counts[0] == 0 and counts[5] == 0
    # explicit weights: 1 / q(d) with d clipped to [0.5, 2)
    weights = []
    for i in range(6):
        d = min(max(torch.dist(anchors[0].double(), pool[i].double()).item(), 0.5), 2 - 1e-4)
        q = d ** (dim - 2) * (1 - d * d / 4) ** ((dim - 3) / 2)
        weights.append(0.0 if pool_labels[i] == 0 else 1 / q)
    expected = torch.tensor(weights) / sum(weights)
    assert torch.allclose(counts / draws, expected.float(), atol=0.03)


def test_without_replacement_and_too_small_pool():
    g = torch.Generator().manual_seed(1)
    anchors = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    pool = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2])
    pool_labels = torch.arange(10) % 5
    picked = distance_weighted_negatives(anchors, labels, pool, pool_labels, 5, g)
    assert picked.shape == (3, 5)
    for row, label in zip(picked, labels):
        assert len(set(row.tolist())) == 5
        assert all(pool_labels[i] != label for i in row.tolist())
    with pytest.raises(ValueError, match="--pool-size"):
        distance_weighted_negatives(anchors, labels, pool, pool_labels, 9, g)


def test_class_groups_are_single_class_groups():
    labels = [0] * 5 + [1] * 4 + [2] * 2 + [3]
    groups = class_groups(labels, num_images=20, group_size=4, generator=torch.Generator().manual_seed(0))
    assert len(groups) == 5
    for group in groups:
        assert len(group) == 4
        assert len({labels[i] for i in group}) == 1
        assert labels[group[0]] != 3  # a one-image class has no positive: never an anchor group
    with pytest.raises(ValueError, match="at least two images"):
        class_groups([0, 1, 2], 8, 4, torch.Generator())
