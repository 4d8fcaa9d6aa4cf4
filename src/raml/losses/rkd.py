"""Relational knowledge distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019).

Tensor contract: student ``(N, D)`` and teacher ``(N, D)`` embeddings of the same ``N >= 3`` images -> scalar.

Distance-wise term: with ``d_ij`` the Euclidean distance between rows ``i`` and ``j`` and ``mu`` the mean of
``d_ij`` over the batch's pairs ``i != j`` (each network normalised by its own mean)::

    L_D = mean_{i != j} huber(d^s_ij / mu^s  -  d^t_ij / mu^t)

Angle-wise term: with ``e_ij = (x_i - x_j) / ||x_i - x_j||``, the cosine of the angle at ``j`` of the triangle
``(i, j, k)`` is ``a_ijk = e_ij . e_kj``::

    L_A = mean_{i, j, k distinct} huber(a^s_ijk - a^t_ijk)

    loss = w_D * L_D + w_A * L_A

``huber`` is the Huber loss with ``delta = 1`` (smooth L1), as in the paper. Choices: the means run over
distinct pairs and distinct triples only (the degenerate ``i == j`` entries carry no relation); the weights
default to the paper's metric-learning setting, ``w_D = 1`` and ``w_A = 2`` (the RKD-DA command line of the
authors' metric-learning code; 25 and 50 are their classification weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raml.losses.aml import _check_embeddings

__all__ = ["rkd_angle_loss", "rkd_distance_loss", "rkd_loss"]


def _pairwise_distances(x: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances, computed from differences (exact, with a gradient off the diagonal)."""
    diff = x[:, None, :] - x[None, :, :]
    return diff.pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``L_D``: Huber on the mean-normalised pairwise distances (module docstring)."""
    _check_embeddings(student, teacher)
    n = student.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    with torch.no_grad():
        dt = _pairwise_distances(teacher)[off]
        dt = dt / dt.mean()
    ds = _pairwise_distances(student)[off]
    ds = ds / ds.mean()
    return F.smooth_l1_loss(ds, dt, reduction="mean", beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """(N, D) -> (N, N, N) with ``[i, j, k] = e_ij . e_kj`` (0 where two indices coincide)."""
    diff = x[:, None, :] - x[None, :, :]  # [i, j] = x_i - x_j
    norm = diff.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12).sqrt()
    e = diff / norm  # e[i, j] = e_ij (0 on the diagonal)
    # a[i, j, k] = e_ij . e_kj
    return torch.einsum("ijd,kjd->ijk", e, e)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``L_A``: Huber on the cosines of the angles of all triangles of distinct rows (module docstring)."""
    _check_embeddings(student, teacher)
    n = student.shape[0]
    if n < 3:
        raise ValueError(f"The angle-wise term needs at least 3 embeddings (one triangle), got {n}.")
    idx = torch.arange(n, device=student.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[None, :, None] != idx[None, None, :])
    distinct &= idx[:, None, None] != idx[None, None, :]
    with torch.no_grad():
        at = _angles(teacher)[distinct]
    as_ = _angles(student)[distinct]
    return F.smooth_l1_loss(as_, at, reduction="mean", beta=1.0)


def rkd_loss(
    student: Tensor, teacher: Tensor, distance_weight: float = 1.0, angle_weight: float = 2.0
) -> dict[str, Tensor]:
    """``{"distance": L_D, "angle": L_A, "total": w_D L_D + w_A L_A}`` (module docstring)."""
    for name, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    distance = rkd_distance_loss(student, teacher)
    angle = rkd_angle_loss(student, teacher)
    return {"distance": distance, "angle": angle, "total": distance_weight * distance + angle_weight * angle}
