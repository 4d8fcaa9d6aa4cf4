"""Distillation losses against slow explicit loops over images, views and pairs."""

from __future__ import annotations

import pytest
import torch

from raml.losses import absolute_loss, distillation_loss, distillation_loss_terms


def _normalised(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _dot(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum(float(a) * float(b) for a, b in zip(u.tolist(), v.tolist(), strict=True))


def _slow_terms(student, teacher, lam_1, lam_2, eps):
    out = {"absolute": 0.0, "relative_1": 0.0, "relative_2": 0.0}
    batch, views, _ = student.shape
    for b in range(batch):
        s, t = student[b], teacher[b]
        out["absolute"] += sum((1 - _dot(s[i], t[i]) + eps) ** 2 for i in range(views)) / views
        pairs = [(i, j) for i in range(views) for j in range(views) if i != j]
        if pairs:
            rel_1 = [(_dot(s[i], t[j]) - _dot(t[i], t[j]) + eps) ** 2 for i, j in pairs]
            rel_2 = [(_dot(s[i], s[j]) - _dot(t[i], t[j]) + eps) ** 2 for i, j in pairs]
            out["relative_1"] += sum(rel_1) / len(pairs)
            out["relative_2"] += sum(rel_2) / len(pairs)
    out["total"] = out["absolute"] + lam_1 * out["relative_1"] + lam_2 * out["relative_2"]
    return out


@pytest.mark.parametrize(("batch", "views", "dim"), [(3, 4, 5), (2, 1, 6), (1, 2, 3)])
@pytest.mark.parametrize("eps", [1e-6, 0.0, 0.1])
def test_terms_match_slow_loop(batch, views, dim, eps):
    student, teacher = _normalised(batch, views, dim, seed=1), _normalised(batch, views, dim, seed=2)
    terms = distillation_loss_terms(student, teacher, 0.77, 0.66, eps)
    expected = _slow_terms(student, teacher, 0.77, 0.66, eps)
    assert set(terms) == {"absolute", "relative_1", "relative_2", "total"}
    for key, value in expected.items():
        assert terms[key].shape == ()
        assert abs(terms[key].item() - value) < 1e-10, key
    total = distillation_loss(student, teacher, 0.77, 0.66, eps)
    assert abs(total.item() - expected["total"]) < 1e-10


def test_single_view_relative_terms_are_zero_not_nan():
    student, teacher = _normalised(4, 1, 8, seed=3), _normalised(4, 1, 8, seed=4)
    terms = distillation_loss_terms(student, teacher, 1.0, 1.0)
    assert terms["relative_1"].item() == 0.0 and terms["relative_2"].item() == 0.0
    assert torch.isfinite(terms["total"])
    assert terms["total"].item() == pytest.approx(terms["absolute"].item())


def test_similarities_never_cross_images():
    # Changing image 1's embeddings must leave image 0's share of the loss unchanged.
    student, teacher = _normalised(2, 3, 4, seed=5), _normalised(2, 3, 4, seed=6)
    other = student.clone()
    other[1] = _normalised(3, 4, seed=7)
    first = distillation_loss(student[:1], teacher[:1], 0.5, 0.5)
    rest = distillation_loss(student[1:], teacher[1:], 0.5, 0.5)
    total_a = distillation_loss(student, teacher, 0.5, 0.5) - rest
    rest_other = distillation_loss(other[1:], teacher[1:], 0.5, 0.5)
    total_b = distillation_loss(other, teacher, 0.5, 0.5) - rest_other
    assert torch.allclose(total_a, first, atol=1e-12) and torch.allclose(total_b, first, atol=1e-12)


def test_identical_embeddings_give_only_eps():
    x = _normalised(2, 3, 4, seed=8)
    terms = distillation_loss_terms(x, x.clone(), 1.0, 1.0, eps=0.0)
    assert terms["total"].item() == pytest.approx(0.0, abs=1e-24)


def test_gradient_reaches_student():
    student = _normalised(2, 3, 4, seed=9).requires_grad_(True)
    teacher = _normalised(2, 3, 4, seed=10)
    distillation_loss(student, teacher, 0.7, 0.6).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_gradcheck():
    student = _normalised(2, 3, 4, seed=11).requires_grad_(True)
    teacher = _normalised(2, 3, 4, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, t: distillation_loss(s, t, 0.7, 0.6), (student, teacher))
    single = _normalised(2, 1, 4, seed=13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher[:, :1], 0.7, 0.6), (single,))


def test_absolute_loss_matches_slow_loop_and_gradcheck():
    student, teacher = _normalised(5, 7, seed=14), _normalised(5, 7, seed=15)
    expected = sum((1 - _dot(student[b], teacher[b]) + 1e-6) ** 2 for b in range(5))
    assert abs(absolute_loss(student, teacher).item() - expected) < 1e-10
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: absolute_loss(s, teacher), (student,))


def test_float32_works():
    student, teacher = _normalised(2, 3, 4, seed=16).float(), _normalised(2, 3, 4, seed=17).float()
    assert distillation_loss(student, teacher, 0.5, 0.5).dtype == torch.float32


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "match"),
    [
        ((2, 3, 4), (2, 3, 5), "same shape"),
        ((2, 3, 4), (2, 2, 4), "same shape"),
        ((3, 4), (3, 4), r"\(B, P, D\)"),
        ((1, 2, 3, 4), (1, 2, 3, 4), r"\(B, P, D\)"),
    ],
)
def test_shape_errors(student_shape, teacher_shape, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.zeros(student_shape), torch.zeros(teacher_shape), 0.5, 0.5)


def test_bad_inputs():
    x = _normalised(2, 3, 4)
    with pytest.raises(TypeError, match="floating-point"):
        distillation_loss(torch.zeros(2, 3, 4, dtype=torch.long), x, 0.5, 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        distillation_loss(x.tolist(), x, 0.5, 0.5)
    with pytest.raises(ValueError, match="lam_1"):
        distillation_loss(x, x, float("nan"), 0.5)
    with pytest.raises(ValueError, match="lam_2 must be >= 0"):
        distillation_loss(x, x, 0.5, -1.0)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        absolute_loss(x, x)
    with pytest.raises(ValueError, match="same shape"):
        absolute_loss(torch.zeros(2, 4), torch.zeros(3, 4))
