"""Distillation losses between a student and a frozen teacher (SPEC section 5, ``ts_aug`` and ``ts_reg``).

Tensor contract:

- :func:`distillation_loss` / :func:`distillation_loss_terms`: student ``(B, P, D)`` and teacher
  ``(B, P, D)``, L2-normalised embeddings of the ``P`` coupled views of each of ``B`` images
  -> scalar (summed over the ``B`` images). Similarities are taken only among the views of one
  image, never across images.
- :func:`absolute_loss`: student ``(B, D)`` and teacher ``(B, D)``, L2-normalised -> scalar (summed over
  ``B``).

With ``s_i``, ``t_i`` the student and teacher embeddings of view ``i`` of one image, that image's loss is::

    absolute   = mean_i        (1 - s_i.t_i + eps)^2
    relative_1 = mean_{i != j} (s_i.t_j - t_i.t_j + eps)^2
    relative_2 = mean_{i != j} (s_i.s_j - t_i.t_j + eps)^2
    total      = absolute + lam_1 * relative_1 + lam_2 * relative_2

The ``eps`` inside each square follows the reference implementation. With a single view (``P == 1``)
there are no pairs and both relative terms are 0.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["absolute_loss", "distillation_loss", "distillation_loss_terms"]


def _check_finite(name: str, value: float, non_negative: bool = True) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; the loss weights and eps are non-negative.")


def _check_pair(student: Tensor, teacher: Tensor, ndim: int, layout: str) -> None:
    for name, tensor in (("student", student), ("teacher", teacher)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}.")
        if tensor.dim() != ndim:
            raise ValueError(f"{name} must have shape {layout} ({ndim} dimensions), got shape {tuple(tensor.shape)}.")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of embeddings, got {tensor.dtype}.")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must have the same shape {layout}, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}; embed the same views with both networks and make the output "
            "dimensions match (same whitening)."
        )


def distillation_loss_terms(
    student: Tensor, teacher: Tensor, lam_1: float, lam_2: float, eps: float = 1e-6
) -> dict[str, Tensor]:
    """Compute the three terms of the ``ts_aug`` distillation loss and their weighted total.

    Args:
        student: ``(B, P, D)`` L2-normalised student embeddings of the ``P`` views of ``B`` images.
        teacher: ``(B, P, D)`` L2-normalised teacher embeddings of the same views.
        lam_1: Weight of the student-teacher relative term.
        lam_2: Weight of the student-student relative term.
        eps: Constant added inside every square (as in the reference implementation).

    Returns:
        ``{"absolute", "relative_1", "relative_2", "total"}``, each a scalar summed over the ``B`` images
        (``relative_*`` unweighted; ``total`` = absolute + lam_1 * relative_1 + lam_2 * relative_2).

    Raises:
        ValueError: On shapes other than two equal ``(B, P, D)`` tensors or on non-finite/negative weights.
        TypeError: On non-tensor or non-floating-point inputs.
    """
    _check_pair(student, teacher, 3, "(B, P, D)")
    _check_finite("lam_1", lam_1)
    _check_finite("lam_2", lam_2)
    _check_finite("eps", eps)
    num_views = student.shape[1]

    # Per-view agreement s_i . t_i -> (B, P).
    agreement = (student * teacher).sum(dim=-1)
    absolute = (1.0 - agreement + eps).pow(2).mean(dim=-1).sum()

    if num_views > 1:
        teacher_gram = teacher @ teacher.transpose(1, 2)  # (B, P, P): t_i . t_j
        cross_gram = student @ teacher.transpose(1, 2)  # (B, P, P): s_i . t_j
        student_gram = student @ student.transpose(1, 2)  # (B, P, P): s_i . s_j
        off_diagonal = ~torch.eye(num_views, dtype=torch.bool, device=student.device)
        num_pairs = num_views * (num_views - 1)
        relative_1 = ((cross_gram - teacher_gram + eps).pow(2) * off_diagonal).sum() / num_pairs
        relative_2 = ((student_gram - teacher_gram + eps).pow(2) * off_diagonal).sum() / num_pairs
    else:
        # No pairs of distinct views: the relative terms are empty means, defined as 0 (not NaN).
        relative_1 = student.new_zeros(())
        relative_2 = student.new_zeros(())

    total = absolute + lam_1 * relative_1 + lam_2 * relative_2
    return {"absolute": absolute, "relative_1": relative_1, "relative_2": relative_2, "total": total}


def distillation_loss(student: Tensor, teacher: Tensor, lam_1: float, lam_2: float, eps: float = 1e-6) -> Tensor:
    """The ``ts_aug`` distillation loss: absolute + weighted relative terms, summed over images.

    Args:
        student: ``(B, P, D)`` L2-normalised student embeddings of the ``P`` views of ``B`` images.
        teacher: ``(B, P, D)`` L2-normalised teacher embeddings of the same views.
        lam_1: Weight of the student-teacher relative term ``(s_i.t_j - t_i.t_j)^2``.
        lam_2: Weight of the student-student relative term ``(s_i.s_j - t_i.t_j)^2``.
        eps: Constant added inside every square (as in the reference implementation).

    Returns:
        Scalar loss, summed over the ``B`` images.
    """
    return distillation_loss_terms(student, teacher, lam_1, lam_2, eps)["total"]


def absolute_loss(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """The ``ts_reg`` loss: ``sum_b (1 - s_b.t_b + eps)^2``.

    Args:
        student: ``(B, D)`` L2-normalised student embeddings.
        teacher: ``(B, D)`` L2-normalised (typically cached) teacher embeddings of the same images.
        eps: Constant added inside the square.

    Returns:
        Scalar loss, summed over the ``B`` images.
    """
    _check_pair(student, teacher, 2, "(B, D)")
    _check_finite("eps", eps)
    return (1.0 - (student * teacher).sum(dim=-1) + eps).pow(2).sum()
