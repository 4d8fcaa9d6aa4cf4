"""UGD's loss against an explicit float64 loop written from AIR-Distiller's ``ugd_loss``."""

from __future__ import annotations

import math

import pytest
import torch

from raml.losses import ugd_loss


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _distance(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(_unit(a), _unit(b), strict=True)))


def _loop(student, teacher, s_regions, t_regions, masks, alpha, beta) -> tuple[float, float, float]:
    n = len(student)
    global_term = sum(_distance(teacher[i], student[i]) for i in range(n)) / n
    local = 0.0
    for s_k, t_k, m_k in zip(s_regions, t_regions, masks, strict=True):
        kept = [_distance(t_k[i][r], s_k[i][r]) for i in range(n) for r in range(len(m_k[i])) if m_k[i][r]]
        local += sum(kept) / len(kept) if kept else 0.0
    return alpha * global_term + beta * local, global_term, local


def _case(seed: int, n: int = 5, dim: int = 6, regions: tuple[int, ...] = (4, 1)):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, dim, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, dim, generator=g, dtype=torch.float64)
    s_regions = [torch.randn(n, r, dim, generator=g, dtype=torch.float64) for r in regions]
    t_regions = [torch.randn(n, r, dim, generator=g, dtype=torch.float64) for r in regions]
    masks = [torch.rand(n, r, generator=g) < 0.5 for r in regions]
    return student, teacher, s_regions, t_regions, masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("alpha", "beta"), [(2.0, 2.0), (0.5, 3.0), (1.0, 0.0)])
def test_ugd_loss_equals_a_float64_loop(seed, alpha, beta):
    student, teacher, s_regions, t_regions, masks = _case(seed)
    got = ugd_loss(student, teacher, s_regions, t_regions, masks, alpha, beta)
    expected = _loop(student.tolist(), teacher.tolist(), [s.tolist() for s in s_regions],
                     [t.tolist() for t in t_regions], [m.tolist() for m in masks], alpha, beta)  # fmt: skip
    assert got["total"].item() == pytest.approx(expected[0], rel=1e-12)
    assert got["global"].item() == pytest.approx(expected[1], rel=1e-12)
    assert got["local"].item() == pytest.approx(expected[2], rel=1e-12)


def test_the_default_weights_are_the_authors_two_and_two():
    """AIR-Distiller's UGD.ALPHA = UGD.BETA = 2.0, as literal values (with local terms present, so beta counts)."""
    student, teacher, s_regions, t_regions, masks = _case(11)
    masks = [torch.ones_like(m) for m in masks]
    expected = _loop(student.tolist(), teacher.tolist(), [s.tolist() for s in s_regions],
                     [t.tolist() for t in t_regions], [m.tolist() for m in masks], 2.0, 2.0)  # fmt: skip
    assert expected[2] > 0
    assert ugd_loss(student, teacher, s_regions, t_regions, masks)["total"].item() == pytest.approx(
        expected[0], rel=1e-12
    )


def test_only_unambiguous_regions_count_and_none_gives_zero():
    student, teacher, s_regions, t_regions, masks = _case(7)
    nothing = [torch.zeros_like(m) for m in masks]
    got = ugd_loss(student, teacher, s_regions, t_regions, nothing)
    assert got["local"].item() == 0.0 and got["total"].item() == pytest.approx(2.0 * got["global"].item())
    # changing a masked-out region's features changes nothing; changing a kept one does
    masks[0][:] = False
    masks[0][0, 0] = True
    base = ugd_loss(student, teacher, s_regions, t_regions, masks)["total"].item()
    moved = [s.clone() for s in s_regions]
    moved[0][1, 2] += 5.0
    assert ugd_loss(student, teacher, moved, t_regions, masks)["total"].item() == base
    moved[0][0, 0] += 5.0
    assert ugd_loss(student, teacher, moved, t_regions, masks)["total"].item() != base


def test_gradient_reaches_the_student_side_only():
    student, teacher, s_regions, t_regions, masks = _case(8)
    masks = [torch.ones_like(m) for m in masks]
    for tensor in (student, teacher, *s_regions, *t_regions):
        tensor.requires_grad_(True)
    ugd_loss(student, teacher, s_regions, t_regions, masks)["total"].backward()
    assert student.grad is not None and all(s.grad is not None for s in s_regions)
    assert teacher.grad is None and all(t.grad is None for t in t_regions)


def test_bad_inputs():
    student, teacher, s_regions, t_regions, masks = _case(9)
    with pytest.raises(ValueError, match="one student, teacher and mask"):
        ugd_loss(student, teacher, s_regions, t_regions[:1], masks)
    with pytest.raises(ValueError, match=r"\(N, R, D\)"):
        ugd_loss(student, teacher, [s_regions[0][:, :, :3]], [t_regions[0]], [masks[0]])
    with pytest.raises(ValueError, match="bool"):
        ugd_loss(student, teacher, s_regions[:1], t_regions[:1], [masks[0].float()])
    with pytest.raises(ValueError, match="alpha"):
        ugd_loss(student, teacher, s_regions, t_regions, masks, alpha=-1.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ugd_loss(student, teacher[:2], s_regions, t_regions, masks)
