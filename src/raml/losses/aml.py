"""Asymmetric metric learning (Budnik & Avrithis, "Asymmetric metric learning for knowledge transfer", CVPR 2021).

Tensor contract: student ``(N, D)`` and teacher ``(N, D)``, L2-normalised embeddings of the same ``N`` images
(row ``i`` of both is image ``i``), optional ``groups`` ``(N,)`` int -> scalar (the mean over the ``N`` anchors).

The student's embedding ``s_i`` of each image is pulled towards the teacher's embedding ``t_i`` of the same
image and pushed beyond a margin from the teacher's embeddings ``t_j`` of the other images of the batch: the
contrastive loss with asymmetric pairs (student query, teacher database item), no labels::

    loss = mean_i [ 1/2 ||s_i - t_i||^2  +  sum_{j : g_j != g_i} 1/2 max(0, m - ||s_i - t_j||)^2 ]

This is our own label-free construction, not the authors' loss. The official AML code (budnikm/aml, built on
Radenović et al.'s cnnimageretrieval-pytorch) trains with labels: each tuple holds a query, a labelled
positive (another image of the query's class) and mined hard negatives (images of other classes), with the
student embedding the query and the teacher the positive and the negatives, and the loss is summed per tuple.
Here, without labels, the positive of an anchor is the teacher's embedding of the same image (the same view);
every other image of the batch is a negative (no mining); rows of one ``group`` (the other views of the same
image) are neither positives nor negatives, as in every relational method of :mod:`raml.losses`; the loss is
a mean over the anchors. What we keep from the official code: the 1/2 factors and the sum over negatives of
the contrastive loss, and its margin default 0.7.

The paper's plain regression variant, ``sum_i (1 - s_i.t_i)^2``, is :func:`raml.losses.absolute_loss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["aml_contrastive_loss", "other_views_mask"]


def _check_embeddings(student: Tensor, teacher: Tensor) -> None:
    """Two floating ``(N, D)`` tensors of the same shape, ``N >= 2`` (relations need two images)."""
    for name, tensor in (("student", student), ("teacher", teacher)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (N, D) tensor of embeddings, got {_describe(tensor)}.")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must have the same shape (N, D), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}; embed the same images with both networks (same output dimension)."
        )
    if student.shape[0] < 2:
        raise ValueError(f"A batch of {student.shape[0]} embeddings has no pairs; give at least 2 images.")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def other_views_mask(groups: Tensor | None, n: int, device: torch.device) -> Tensor:
    """(N, N) bool: True where rows ``i != j`` belong to the same group (the other views of one image).

    Every relational loss of :mod:`raml.losses` leaves these entries out of its relations, so that the methods
    treat the other views of an image alike (AIR-Distiller's distillation batches hold distinct images, where
    no such rows exist). Without ``groups`` (``None``) every row is its own group: no entry is True.
    """
    return _group_mask(groups, n, device) & ~torch.eye(n, dtype=torch.bool, device=device)


def top_k_exclusions(k: int, groups: Tensor | None, n: int, device: torch.device, smallest: int = 1) -> Tensor:
    """Check a top-k size against the rows a row may rank and return :func:`other_views_mask`.

    Each row ranks the ``n`` rows less the other views of its image; ``k`` must lie in ``[smallest,
    candidates]`` for the row with the fewest candidates (itself included).

    Raises:
        ValueError: ``k`` is not an integer in that range (the message names the range and why).
    """
    excluded = other_views_mask(groups, n, device)
    candidates = n - int(excluded.sum(dim=1).max())
    if isinstance(k, bool) or not isinstance(k, int) or not smallest <= k <= candidates:
        raise ValueError(
            f"k must be an integer in [{smallest}, {candidates}] (each row's {candidates} candidates among the "
            f"batch's {n} embeddings, other views of its image excluded), got {k!r}."
        )
    return excluded


def _group_mask(groups: Tensor | None, n: int, device: torch.device) -> Tensor:
    """(N, N) bool: True where rows i and j belong to the same group (the diagonal included)."""
    if groups is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    if not isinstance(groups, Tensor) or groups.shape != (n,):
        raise ValueError(f"groups must be a tensor of shape ({n},), one group id per row, got {_describe(groups)}.")
    groups = groups.to(device)
    return groups[:, None] == groups[None, :]


def aml_contrastive_loss(student: Tensor, teacher: Tensor, margin: float = 0.7, groups: Tensor | None = None) -> Tensor:
    """The asymmetric contrastive loss (module docstring), the mean over the ``N`` student anchors.

    Args:
        student: ``(N, D)`` L2-normalised student (query) embeddings.
        teacher: ``(N, D)`` L2-normalised teacher (database) embeddings of the same images.
        margin: Distance beyond which a negative costs nothing.
        groups: Optional ``(N,)`` group ids: rows of one group are not negatives of each other (the views of
            one image). Default: every other row is a negative.

    Raises:
        ValueError: on shapes other than two equal ``(N, D)`` with ``N >= 2``, or a non-positive margin.
    """
    _check_embeddings(student, teacher)
    _check_positive("margin", margin)
    positive = 0.5 * (student - teacher).pow(2).sum(dim=1)
    # ||s_i - t_j|| from the inner products (unit vectors): sqrt(2 - 2 s_i.t_j), clamped away from 0
    distances = (2.0 - 2.0 * student @ teacher.T).clamp_min(1e-12).sqrt()
    negative_mask = ~_group_mask(groups, student.shape[0], student.device)
    negative = 0.5 * ((margin - distances).clamp_min(0.0).pow(2) * negative_mask).sum(dim=1)
    return (positive + negative).mean()
