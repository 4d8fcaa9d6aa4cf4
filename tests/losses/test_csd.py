"""Contextual similarity distillation against an explicit loop, its gradient, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raml.losses import csd_loss


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def _loop(student, teacher, k, temperature, weight, groups=None):
    s, t = student.tolist(), teacher.tolist()
    n = len(s)
    context = first = 0.0
    for i in range(n):
        allowed = [j for j in range(n) if j == i or groups is None or groups[j] != groups[i]]
        ranked = sorted(allowed, key=lambda j: -_dot(t[i], t[j]))[:k]
        p = _softmax([_dot(t[i], t[j]) for j in ranked], temperature)
        q = _softmax([_dot(s[i], t[j]) for j in ranked], temperature)
        context += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        first += 1 - _dot(s[i], t[i])
    return context / n, first / n, context / n + weight * first / n


@pytest.mark.parametrize(("k", "temperature", "weight"), [(1, 0.1, 1.0), (3, 0.1, 1.0), (8, 0.5, 0.0), (5, 0.05, 2.0)])
def test_matches_a_loop(k, temperature, weight):
    student, teacher = _unit(8, 6, 0), _unit(8, 6, 1)
    terms = csd_loss(student, teacher, k, temperature, weight)
    context, first, total = _loop(student, teacher, k, temperature, weight)
    assert terms["context"].item() == pytest.approx(context, rel=1e-9, abs=1e-12)
    assert terms["first_order"].item() == pytest.approx(first, rel=1e-9)
    assert terms["total"].item() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("k", [2, 5])
def test_groups_leave_the_other_views_of_an_image_out_of_the_context(k):
    groups = [0, 0, 0, 1, 1, 2, 3, 3]
    teacher = _unit(8, 6, 5)
    # the other views of an image: near-duplicates at the teacher, which would fill the context otherwise
    teacher = F.normalize(teacher[torch.tensor(groups)] + 0.1 * _unit(8, 6, 6), dim=1)
    student = F.normalize(teacher + 0.5 * _unit(8, 6, 7), dim=1)
    got = csd_loss(student, teacher, k, 0.1, 1.0, torch.tensor(groups))
    context, first, total = _loop(student, teacher, k, 0.1, 1.0, groups)
    assert got["context"].item() == pytest.approx(context, rel=1e-9, abs=1e-12)
    assert got["total"].item() == pytest.approx(total, rel=1e-9)
    assert got["context"].item() != pytest.approx(csd_loss(student, teacher, k, 0.1, 1.0)["context"].item())
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 6\]"):
        csd_loss(student, teacher, 7, groups=torch.tensor(groups))


def test_zero_when_the_student_is_the_teacher():
    teacher = _unit(6, 4, 2)
    assert csd_loss(teacher.clone(), teacher, 4)["total"].item() == pytest.approx(0.0, abs=1e-12)


def test_gradcheck():
    student = _unit(5, 4, 3).requires_grad_(True)
    teacher = _unit(5, 4, 4)
    assert torch.autograd.gradcheck(lambda s: csd_loss(s, teacher, 3, 0.2)["total"], (student,))


@pytest.mark.parametrize(
    ("k", "kwargs", "match"), [(0, {}, "k must"), (7, {}, "k must"), (2, {"temperature": 0}, "temp")]
)
def test_bad_inputs_are_refused(k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        csd_loss(torch.randn(6, 3), torch.randn(6, 3), k, **kwargs)
