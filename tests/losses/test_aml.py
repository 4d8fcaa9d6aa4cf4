"""The asymmetric contrastive loss (AML) against an explicit loop, its gradient, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raml.losses import absolute_loss, aml_contrastive_loss


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _loop(student, teacher, margin, groups):
    total = 0.0
    n = len(student)
    for i in range(n):
        s = student[i].tolist()
        loss = 0.5 * sum((a - b) ** 2 for a, b in zip(s, teacher[i].tolist()))
        for j in range(n):
            if groups is not None and groups[j] == groups[i] or groups is None and j == i:
                continue
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(s, teacher[j].tolist())))
            loss += 0.5 * max(0.0, margin - dist) ** 2
        total += loss
    return total / n


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 2, 2, 3]])
@pytest.mark.parametrize("margin", [0.7, 1.6])
def test_matches_a_loop(groups, margin):
    student, teacher = _unit(7, 5, 0), _unit(7, 5, 1)
    group_tensor = None if groups is None else torch.tensor(groups)
    got = aml_contrastive_loss(student, teacher, margin, group_tensor).item()
    assert got == pytest.approx(_loop(student, teacher, margin, groups), rel=1e-9)


def test_gradcheck():
    student = _unit(5, 4, 2).requires_grad_(True)
    teacher = _unit(5, 4, 3)
    assert torch.autograd.gradcheck(lambda s: aml_contrastive_loss(s, teacher, 1.2), (student,))


def test_regression_variant_is_the_absolute_term():
    student, teacher = _unit(6, 5, 4), _unit(6, 5, 5)
    expected = sum((1 - float(s @ t) + 1e-6) ** 2 for s, t in zip(student, teacher))
    assert absolute_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("student", "teacher", "kwargs", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), {}, "same shape"),
        (torch.zeros(1, 3), torch.zeros(1, 3), {}, "at least 2"),
        (torch.zeros(4), torch.zeros(4), {}, r"\(N, D\)"),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"margin": 0.0}, "margin"),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"groups": torch.zeros(3)}, "groups"),
    ],
)
def test_bad_inputs_are_refused(student, teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aml_contrastive_loss(student, teacher, **kwargs)
