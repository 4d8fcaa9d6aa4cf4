"""D3still's decoupled differential loss against an explicit loop, its gradient, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raml.losses import d3_loss


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _loop(student, teacher, k, alpha, beta, gamma, groups=None):
    s, t = student.tolist(), teacher.tolist()
    n = len(s)
    first = alpha / n * math.sqrt(sum((_dot(t[i], t[i]) - _dot(s[i], t[i])) ** 2 for i in range(n)))
    hard = easy = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i and (groups is None or groups[j] != groups[i])]
        neighbours = sorted(others, key=lambda j: -_dot(t[i], t[j]))[: k - 1]
        hard_sq = easy_sq = 0.0
        for a in neighbours:
            for b in neighbours:
                if a == b:
                    continue
                d_t = _dot(t[i], t[b]) - _dot(t[i], t[a])
                d_s = _dot(s[i], t[b]) - _dot(s[i], t[a])
                r = (d_s - d_t) / (0.1 + abs(d_t))
                if d_s * d_t < 0:
                    hard_sq += r * r
                elif d_s * d_t > 0:
                    easy_sq += r * r
        hard += math.sqrt(hard_sq)
        easy += math.sqrt(easy_sq)
    hard *= beta / (k - 1) / n
    easy *= gamma / (k - 1) / n
    return first, hard, easy


@pytest.mark.parametrize(
    ("k", "alpha", "beta", "gamma"), [(2, 50.0, 2.0, 1.0), (4, 50.0, 2.0, 1.0), (9, 1.0, 3.0, 0.5)]
)
def test_matches_a_loop(k, alpha, beta, gamma):
    student, teacher = _unit(9, 5, 0), _unit(9, 5, 1)
    student = F.normalize(teacher + 0.6 * student, dim=1)  # a student near the teacher: hard and easy pairs both
    terms = d3_loss(student, teacher, k, alpha, beta, gamma)
    first, hard, easy = _loop(student, teacher, k, alpha, beta, gamma)
    assert terms["first_order"].item() == pytest.approx(first, rel=1e-9)
    assert terms["hard"].item() == pytest.approx(hard, rel=1e-9)
    assert terms["easy"].item() == pytest.approx(easy, rel=1e-9)
    assert terms["total"].item() == pytest.approx(first + hard + easy, rel=1e-9)
    if k > 2:
        assert hard > 0 and easy > 0  # the case exercises both kinds of pairs


def test_groups_leave_the_other_views_of_an_image_out_of_the_neighbours():
    groups = [0, 0, 1, 1, 2, 2, 3, 4, 5]
    teacher = F.normalize(_unit(9, 5, 6)[torch.tensor(groups)] + 0.1 * _unit(9, 5, 7), dim=1)
    student = F.normalize(teacher + 0.6 * _unit(9, 5, 8), dim=1)
    terms = d3_loss(student, teacher, 4, 100.0, 5.0, 1.0, torch.tensor(groups))
    first, hard, easy = _loop(student, teacher, 4, 100.0, 5.0, 1.0, groups)
    assert terms["hard"].item() == pytest.approx(hard, rel=1e-9)
    assert terms["easy"].item() == pytest.approx(easy, rel=1e-9)
    assert terms["total"].item() == pytest.approx(first + hard + easy, rel=1e-9)
    assert terms["total"].item() != pytest.approx(d3_loss(student, teacher, 4, 100.0, 5.0, 1.0)["total"].item())
    with pytest.raises(ValueError, match=r"k must be an integer in \[2, 8\]"):
        d3_loss(student, teacher, 9, groups=torch.tensor(groups))


def test_defaults_are_the_authors_fine_grained_setting():
    """AIR-Distiller's CUB-200 configs (ResNet-18 student): k 10, alpha 100, beta 5, gamma 1."""
    teacher = _unit(12, 5, 9)
    student = F.normalize(teacher + 0.6 * _unit(12, 5, 10), dim=1)
    first, hard, easy = _loop(student, teacher, 10, 100.0, 5.0, 1.0)
    assert d3_loss(student, teacher)["total"].item() == pytest.approx(first + hard + easy, rel=1e-9)


def test_zero_when_the_student_is_the_teacher():
    teacher = _unit(6, 4, 2)
    assert d3_loss(teacher.clone(), teacher, 4)["total"].item() == pytest.approx(0.0, abs=1e-12)


def test_gradcheck():
    teacher = _unit(6, 4, 4)
    student = F.normalize(teacher + 0.5 * _unit(6, 4, 3), dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: d3_loss(s, teacher, 4)["total"], (student,))


@pytest.mark.parametrize(("k", "kwargs", "match"), [(1, {}, "k must"), (7, {}, "k must"), (3, {"beta": -1.0}, "beta")])
def test_bad_inputs_are_refused(k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        d3_loss(torch.randn(6, 3), torch.randn(6, 3), k, **kwargs)
