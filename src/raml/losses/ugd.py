"""Unambiguous granularity distillation (UGD: "Unambiguous granularity distillation for asymmetric image
retrieval", Neural Networks 2025), the loss.

Tensor contract: student ``(N, D)`` and teacher ``(N, D)`` embeddings of the same ``N`` views; per granularity
``k`` (a grid of regions), the student's projected region features ``(N, R_k, D)``, the teacher's region
features ``(N, R_k, D)`` and a boolean ``(N, R_k)`` mask of the *unambiguous* regions (those the teacher
assigns to the view's own class) -> ``{"total", "global", "local"}`` scalars.

Following UGD's implementation in AIR-Distiller (``distillers/UGD.py``, ``ugd_loss``, in SCY-X/D3still, the
authors' code)::

    global  = mean_n || l2(t_n) - l2(s_n) ||_2
    local_k = mean over unambiguous (n, r) of || l2(t_nr) - l2(s_nr) ||_2      (0 when there are none)
    total   = alpha * global + beta * sum_k local_k

with ``alpha = beta = 2`` (their ``UGD.ALPHA``, ``UGD.BETA``, every config) and two granularities (their grids
``QR/16`` and ``QR/32`` regions a side). The region features and the mask come from the method
(:mod:`raml.engine.methods.ugd`). The teacher side carries no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["UGD_ALPHA", "UGD_BETA", "ugd_loss"]

UGD_ALPHA = 2.0  # AIR-Distiller's UGD.ALPHA: the global term's weight
UGD_BETA = 2.0  # UGD.BETA: the local terms' weight


def ugd_loss(
    student: Tensor,
    teacher: Tensor,
    student_regions: Sequence[Tensor],
    teacher_regions: Sequence[Tensor],
    unambiguous: Sequence[Tensor],
    alpha: float = UGD_ALPHA,
    beta: float = UGD_BETA,
) -> dict[str, Tensor]:
    """The UGD loss (module docstring).

    Args:
        student: ``(N, D)`` student embeddings (normalised again here, as the authors do).
        teacher: ``(N, D)`` teacher embeddings of the same views.
        student_regions: Per granularity, ``(N, R_k, D)`` projected student region features.
        teacher_regions: Per granularity, ``(N, R_k, D)`` teacher region features.
        unambiguous: Per granularity, ``(N, R_k)`` bool: the regions whose distances are averaged.
        alpha: Weight of the global term (>= 0).
        beta: Weight of the local terms (>= 0).

    Returns:
        ``{"total": alpha * global + beta * local, "global": ..., "local": sum of the local terms}``.

    Raises:
        ValueError: On mismatched shapes or lengths, or negative weights.
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must be (N, D) of one shape, got {tuple(student.shape)}, {tuple(teacher.shape)}."
        )
    if not len(student_regions) == len(teacher_regions) == len(unambiguous):
        raise ValueError(
            f"Pass one student, teacher and mask per granularity; got {len(student_regions)}, "
            f"{len(teacher_regions)}, {len(unambiguous)}."
        )
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    n, dim = student.shape
    global_term = (F.normalize(teacher.detach(), dim=1) - F.normalize(student, dim=1)).norm(dim=1).mean()
    local_term = student.new_zeros(())
    for k, (s_regions, t_regions, mask) in enumerate(zip(student_regions, teacher_regions, unambiguous, strict=True)):
        if s_regions.ndim != 3 or s_regions.shape != t_regions.shape or s_regions.shape[::2] != (n, dim):
            raise ValueError(
                f"granularity {k}: student and teacher regions must be (N, R, D) = ({n}, R, {dim}), got "
                f"{tuple(s_regions.shape)} and {tuple(t_regions.shape)}."
            )
        if mask.shape != s_regions.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"granularity {k}: the mask must be bool {tuple(s_regions.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}.")  # fmt: skip
        if bool(mask.any()):
            distance = (F.normalize(t_regions.detach(), dim=2) - F.normalize(s_regions, dim=2)).norm(dim=2)
            local_term = local_term + distance[mask].mean()
    return {"total": alpha * global_term + beta * local_term, "global": global_term, "local": local_term}
