"""Rank order preservation (ROP) against an explicit float64 loop of AIR-Distiller's arithmetic, its gradient,
and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raml.losses import rop_loss


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _sigmoid(x: float, tau: float) -> float:
    z = x / tau
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _loop(student, teacher, k, temperature, rank_weight, groups=None):
    """AIR-Distiller's ROP, written out: for each row its teacher top-k g_1..g_k (itself first), the teacher's
    step indicator sigmoid((T_b - T_a) / 1e-6), the student's sigmoid((C_b - T_a) / tau), weights
    a * softmax(lambda T)_a, the weighted squared differences summed over (a, b), mean over rows, / k."""
    s, t = student.tolist(), teacher.tolist()
    n = len(s)
    total = 0.0
    for i in range(n):
        allowed = [j for j in range(n) if j == i or groups is None or groups[j] != groups[i]]
        gallery = sorted(allowed, key=lambda j: -_dot(t[i], t[j]))[:k]
        t_top = [_dot(t[i], t[j]) for j in gallery]
        c_top = [_dot(s[i], t[j]) for j in gallery]
        exps = [math.exp(rank_weight * v) for v in t_top]
        weights = [(a + 1) * e / sum(exps) for a, e in enumerate(exps)]
        row = 0.0
        for a in range(k):
            for b in range(k):
                teacher_indicator = _sigmoid(t_top[b] - t_top[a], 1e-6)
                student_indicator = _sigmoid(c_top[b] - t_top[a], temperature)
                row += weights[a] * (teacher_indicator - student_indicator) ** 2
        total += row
    return total / n / k


@pytest.mark.parametrize(
    ("k", "temperature", "rank_weight"), [(1, 0.1, 0.2), (4, 0.1, 0.2), (9, 0.05, 1.0), (6, 0.5, 0.0)]
)
def test_matches_a_loop(k, temperature, rank_weight):
    teacher = _unit(9, 6, 0)
    student = F.normalize(teacher + 0.7 * _unit(9, 6, 1), dim=1)
    got = rop_loss(student, teacher, k, temperature, rank_weight).item()
    assert got == pytest.approx(_loop(student, teacher, k, temperature, rank_weight), rel=1e-9, abs=1e-15)


def test_groups_leave_the_other_views_of_an_image_out_of_the_top_k():
    groups = [0, 0, 0, 1, 1, 2, 3, 4]
    teacher = F.normalize(_unit(8, 6, 2)[torch.tensor(groups)] + 0.1 * _unit(8, 6, 3), dim=1)
    student = F.normalize(teacher + 0.7 * _unit(8, 6, 4), dim=1)
    got = rop_loss(student, teacher, 4, groups=torch.tensor(groups)).item()
    assert got == pytest.approx(_loop(student, teacher, 4, 0.1, 0.2, groups), rel=1e-9)
    assert got != pytest.approx(rop_loss(student, teacher, 4).item())


def test_the_student_at_the_teacher_still_pays_for_its_soft_indicator():
    """At tau > 0 the student's indicator is a sigmoid, not a step: the loss is positive even for s = t, and falls
    as tau does (the loss's floor); with the student's ranking reversed it is larger."""
    teacher = _unit(8, 5, 5)
    at_teacher = rop_loss(teacher.clone(), teacher, 5, 0.1).item()
    assert 0 < rop_loss(teacher.clone(), teacher, 5, 0.01).item() < at_teacher
    assert rop_loss(-teacher, teacher, 5, 0.1).item() > at_teacher


def test_gradcheck():
    teacher = _unit(6, 4, 6)
    student = F.normalize(teacher + 0.5 * _unit(6, 4, 7), dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: rop_loss(s, teacher, 4, 0.2), (student,))


@pytest.mark.parametrize(
    ("k", "kwargs", "match"),
    [
        (0, {}, "k must"),
        (7, {}, "k must"),
        (3, {"temperature": 0.0}, "temperature"),
        (3, {"rank_weight": -1.0}, "rank"),
    ],
)
def test_bad_inputs_are_refused(k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rop_loss(torch.randn(6, 3), torch.randn(6, 3), k, **kwargs)
