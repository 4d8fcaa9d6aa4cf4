"""Relational knowledge distillation (distance- and angle-wise) against explicit loops, gradients, input checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from raml.losses import rkd_angle_loss, rkd_distance_loss, rkd_loss


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _dist(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _kept(groups, i, j) -> bool:
    """The official loss runs over every entry; with groups, two different rows of one group are left out."""
    return i == j or groups is None or groups[i] != groups[j]


def _distance_loop(student, teacher, groups=None):
    """The official arithmetic (lenscloth/RKD): the mean over all N^2 entries, d_ii = 0 included."""
    s, t = student.tolist(), teacher.tolist()
    n = len(s)
    entries = [(i, j) for i in range(n) for j in range(n) if _kept(groups, i, j)]
    pairs = [(i, j) for i, j in entries if i != j]
    mu_s = sum(_dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(_dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(_huber(_dist(s[i], s[j]) / mu_s - _dist(t[i], t[j]) / mu_t) for i, j in entries) / len(entries)


def _cos_angle(x, i, j, k) -> float:
    """The cosine at j of the triangle (i, j, k); 0 where i == j or k == j (a zero side has no direction)."""
    if i == j or k == j:
        return 0.0
    e_ij = [a - b for a, b in zip(x[i], x[j])]
    e_kj = [a - b for a, b in zip(x[k], x[j])]
    return sum(a * b for a, b in zip(e_ij, e_kj)) / (_dist(x[i], x[j]) * _dist(x[k], x[j]))


def _angle_loop(student, teacher, groups=None):
    """The official arithmetic: the mean over all N^3 entries, the degenerate triangles included."""
    s, t = student.tolist(), teacher.tolist()
    n = len(s)
    triples = [
        (i, j, k)
        for i, j, k in itertools.product(range(n), repeat=3)
        if _kept(groups, i, j) and _kept(groups, j, k) and _kept(groups, i, k)
    ]
    return sum(_huber(_cos_angle(s, *ijk) - _cos_angle(t, *ijk)) for ijk in triples) / len(triples)


def test_distance_term_matches_a_loop():
    # a scale factor on the teacher changes nothing: each side is normalised by its own mean distance
    student, teacher = _unit(6, 5, 0), 3.0 * _unit(6, 5, 1)
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(_distance_loop(student, teacher), rel=1e-9)


def test_angle_term_matches_a_loop():
    student, teacher = _unit(5, 4, 2), _unit(5, 4, 3)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(_angle_loop(student, teacher), rel=1e-9)


def test_the_means_run_over_all_entries_as_in_the_official_code():
    """Against distinct pairs and triples only, the official means are smaller by (N-1)/N and (N-1)(N-2)/N^2."""
    n = 7
    student, teacher = _unit(n, 5, 8), _unit(n, 5, 9)
    s, t = student.tolist(), teacher.tolist()
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(_dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(_dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    distinct_d = sum(_huber(_dist(s[i], s[j]) / mu_s - _dist(t[i], t[j]) / mu_t) for i, j in pairs) / len(pairs)
    triples = list(itertools.permutations(range(n), 3))
    distinct_a = sum(_huber(_cos_angle(s, *ijk) - _cos_angle(t, *ijk)) for ijk in triples) / len(triples)
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(distinct_d * (n - 1) / n, rel=1e-9)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(distinct_a * (n - 1) * (n - 2) / n**2, rel=1e-9)


def test_groups_leave_the_other_views_of_an_image_out():
    groups = [0, 0, 1, 1, 2, 2, 3]
    student, teacher = _unit(7, 5, 10), _unit(7, 5, 11)
    g = torch.tensor(groups)
    assert rkd_distance_loss(student, teacher, g).item() == pytest.approx(
        _distance_loop(student, teacher, groups), rel=1e-9
    )
    assert rkd_angle_loss(student, teacher, g).item() == pytest.approx(_angle_loop(student, teacher, groups), rel=1e-9)
    assert rkd_distance_loss(student, teacher, g).item() != pytest.approx(rkd_distance_loss(student, teacher).item())
    # every row its own group is the official loss
    assert rkd_loss(student, teacher, groups=torch.arange(7))["total"].item() == pytest.approx(
        rkd_loss(student, teacher)["total"].item(), rel=1e-12
    )


def test_weighted_total():
    student, teacher = _unit(5, 4, 4), _unit(5, 4, 5)
    terms = rkd_loss(student, teacher, distance_weight=3.0, angle_weight=0.5)
    assert terms["distance"].item() == pytest.approx(_distance_loop(student, teacher), rel=1e-9)
    assert terms["total"].item() == pytest.approx(3.0 * terms["distance"].item() + 0.5 * terms["angle"].item())


def test_the_distance_term_is_linear_beyond_delta():
    """Each side is divided by its own mean distance, so scaling one side changes nothing: the linear part of
    the Huber needs another *shape*. Teacher: four points within 0.03 and one 10 away (normalised: ~2.5 and
    ~0.01); student: a regular simplex (every normalised distance 1): differences of ~1.5 > 1."""
    teacher = torch.zeros(5, 5, dtype=torch.float64)
    teacher[1, 0], teacher[2, 1], teacher[3, 2], teacher[4, 3] = 0.01, 0.02, 0.03, 10.0
    student = torch.eye(5, dtype=torch.float64)  # the 5 vertices of a regular simplex
    s, t = torch.cdist(student, student), torch.cdist(teacher, teacher)
    off = ~torch.eye(5, dtype=torch.bool)
    diff = s / s[off].mean() - t / t[off].mean()
    assert diff.abs().max() > 1.4  # the linear part is reached
    assert rkd_loss(student, teacher)["distance"].item() == pytest.approx(_distance_loop(student, teacher), rel=1e-9)


def test_gradcheck():
    student = _unit(4, 3, 6).requires_grad_(True)
    teacher = _unit(4, 3, 7)
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, teacher)["total"], (student,))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        rkd_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="angle_weight"):
        rkd_loss(torch.randn(4, 3), torch.randn(4, 3), angle_weight=-1.0)
