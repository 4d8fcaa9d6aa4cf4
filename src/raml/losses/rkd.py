"""Relational knowledge distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019).

Tensor contract: student ``(N, D)`` and teacher ``(N, D)`` embeddings of the same ``N >= 3`` images, optional
``groups`` ``(N,)`` -> scalar.

Distance-wise term: with ``d_ij`` the Euclidean distance between rows ``i`` and ``j`` (``d_ii = 0``) and ``mu``
the mean of ``d_ij`` over the pairs ``i != j`` (each network normalised by its own mean)::

    L_D = mean_{i, j} huber(d^s_ij / mu^s  -  d^t_ij / mu^t)            (all N^2 entries)

Angle-wise term: with ``e_ij = (x_i - x_j) / ||x_i - x_j||`` (``e_ii = 0``), the cosine of the angle at ``j``
of the triangle ``(i, j, k)`` is ``a_ijk = e_ij . e_kj``::

    L_A = mean_{i, j, k} huber(a^s_ijk - a^t_ijk)                         (all N^3 entries)

    loss = w_D * L_D + w_A * L_A

``huber`` is the Huber loss with ``delta = 1`` (smooth L1), as in the paper. The arithmetic is the official
code's (lenscloth/RKD, ``metric/loss.py``; AIR-Distiller's ``distillers/RKD.py`` is the same): the means run
over all ``N^2`` and ``N^3`` entries, the degenerate ones included. Those (``i == j``, or two equal indices of
a triangle) are equal for student and teacher and add 0, so they only scale the terms: by ``N / (N - 1)``
against a mean over distinct pairs (x1.07 at N = 16) and ``N^2 / ((N - 1)(N - 2))`` against distinct triples
(x1.22 at N = 16).

Choices that differ from the official metric-learning recipe, with the reason:

- **The student is L2-normalised.** The RKD authors' metric-learning command lines train the student
  unnormalised (their option ``l2normalize false``); here every network ends with L2 normalisation, because
  the student's queries are compared with the teacher's L2-normalised database at test time (asymmetric
  retrieval): an unnormalised student would be searched with a different metric than it was trained for.
  The distance term is scale-invariant (each side divided by its mean), so only the angles and the
  distances' spread see it.
- **The other views of one image** (``groups``) are left out: an entry ``(i, j)`` or triangle whose rows
  include two different rows of one group is dropped from the means (the degenerate entries of a single row
  stay, as in the official code); ``mu`` is the mean over pairs of different groups. This treats an image's
  other views as every relational loss of :mod:`raml.losses` does. Without ``groups`` the loss is the
  official one.
- **Weights** default to the paper's metric-learning setting, ``w_D = 1`` and ``w_A = 2`` (the RKD-DA
  command line of the authors' metric-learning code; 25 and 50 are their classification weights and
  AIR-Distiller's defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raml.losses.aml import _check_embeddings, other_views_mask

__all__ = ["rkd_angle_loss", "rkd_distance_loss", "rkd_loss"]


def _pairwise_distances(x: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances, computed from differences (exact, with a gradient off the diagonal)."""
    diff = x[:, None, :] - x[None, :, :]
    return diff.pow(2).sum(dim=-1).clamp_min(1e-12).sqrt() * ~torch.eye(len(x), dtype=torch.bool, device=x.device)


def _kept_pairs(groups: Tensor | None, n: int, device: torch.device) -> Tensor:
    """(N, N) bool: the entries the means run over: the diagonal and every pair of different groups."""
    return ~other_views_mask(groups, n, device)


def rkd_distance_loss(student: Tensor, teacher: Tensor, groups: Tensor | None = None) -> Tensor:
    """``L_D``: Huber on the mean-normalised pairwise distances, over all kept entries (module docstring)."""
    _check_embeddings(student, teacher)
    n = student.shape[0]
    kept = _kept_pairs(groups, n, student.device)
    pairs = kept & ~torch.eye(n, dtype=torch.bool, device=student.device)
    if not pairs.any():
        raise ValueError("The distance-wise term needs two rows of different groups; every row is of one group.")
    with torch.no_grad():
        dt = _pairwise_distances(teacher)
        dt = dt / dt[pairs].mean()
    ds = _pairwise_distances(student)
    ds = ds / ds[pairs].mean()
    return F.smooth_l1_loss(ds[kept], dt[kept], reduction="mean", beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """(N, D) -> (N, N, N) with ``[i, j, k] = e_ij . e_kj`` (``e_jj = 0``, so 0 where ``i == j`` or ``k == j``)."""
    diff = x[:, None, :] - x[None, :, :]  # [i, j] = x_i - x_j
    norm = diff.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12).sqrt()
    e = diff / norm  # e[i, j] = e_ij (0 on the diagonal)
    # a[i, j, k] = e_ij . e_kj
    return torch.einsum("ijd,kjd->ijk", e, e)


def rkd_angle_loss(student: Tensor, teacher: Tensor, groups: Tensor | None = None) -> Tensor:
    """``L_A``: Huber on the cosines of the angles of all kept triangles (module docstring)."""
    _check_embeddings(student, teacher)
    n = student.shape[0]
    if n < 3:
        raise ValueError(f"The angle-wise term needs at least 3 embeddings (one triangle), got {n}.")
    kept = _kept_pairs(groups, n, student.device)
    triangles = kept[:, :, None] & kept[None, :, :] & kept[:, None, :]  # every pair of (i, j, k) kept
    with torch.no_grad():
        at = _angles(teacher)[triangles]
    as_ = _angles(student)[triangles]
    return F.smooth_l1_loss(as_, at, reduction="mean", beta=1.0)


def rkd_loss(
    student: Tensor,
    teacher: Tensor,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
    groups: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{"distance": L_D, "angle": L_A, "total": w_D L_D + w_A L_A}`` (module docstring).

    Args:
        student: ``(N, D)`` student embeddings.
        teacher: ``(N, D)`` teacher embeddings of the same images.
        distance_weight: ``w_D`` (>= 0).
        angle_weight: ``w_A`` (>= 0).
        groups: Optional ``(N,)`` group ids (the image of each view): relations between two different rows of
            one group are left out. Default: the official loss over all entries.
    """
    for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    distance = rkd_distance_loss(student, teacher, groups)
    angle = rkd_angle_loss(student, teacher, groups)
    return {"distance": distance, "angle": angle, "total": distance_weight * distance + angle_weight * angle}
