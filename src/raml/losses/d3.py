"""D3still (Xie et al., "D3still: Decoupled Differential Distillation for Asymmetric Image Retrieval", CVPR 2024).

Tensor contract: student ``(N, D)`` and teacher ``(N, D)``, L2-normalised embeddings of the same ``N`` images
-> scalar.

With ``T_ij = t_i . t_j`` (the teacher's similarities, the gallery side) and ``C_ij = s_i . t_j`` (student
query against teacher gallery), and for each image ``i`` its ``k - 1`` nearest neighbours ``n_1 .. n_{k-1}``
in the teacher's space among the other images (the image itself is the teacher's top-1)::

    first order:   L_F = alpha / N * || (T_ii - C_ii)_i ||_2            (T_ii = 1)
    differences:   dT_iab = T_{i n_b} - T_{i n_a},   dC_iab = C_{i n_b} - C_{i n_a}    (a != b)
    relative error r_iab = (dC_iab - dT_iab) / (0.1 + |dT_iab|)
    hard pairs:    dC_iab * dT_iab < 0   (the student orders the two neighbours the other way round)
    easy pairs:    dC_iab * dT_iab > 0
    L_H = beta  / (k - 1) * mean_i || r_i on hard pairs ||_2
    L_E = gamma / (k - 1) * mean_i || r_i on easy pairs ||_2
    loss = L_F + L_H + L_E

The three parts are the paper's feature-representation knowledge and its inconsistent (hard) and consistent
(easy) pairwise similarity-differential knowledge, weighted separately. Formulas, the ``0.1`` offset and the
norms (not squared) follow the authors' released implementation (AIR-Distiller, ``distillers/D3.py`` in
SCY-X/D3still). Defaults: ``k = 10, alpha = 100, beta = 5, gamma = 1``, the authors' fine-grained setting
(``Training_Configs/CUB200/ResNet101_256x256_ResNet18_128x128/D3.yaml``: a ResNet-18 student at 128 px, 256
distinct images per distillation batch); their code's global defaults ``alpha = 50, beta = 2`` are the
MSMT17 person re-identification setting, and their SOP configs use ``alpha = 200, beta = 10, gamma = 2``.
Choices: the neighbours come from the current batch, which is the gallery (as in the authors' code); with
``groups`` (the views of one image) the other rows of the row's group are left out of its neighbours (the
authors' distillation batches hold distinct images, so no such near-duplicates exist there); pairs with
``dT = 0`` (ties) or ``dC = 0`` count as neither hard nor easy; the hard/easy split is a constant of the
step (no gradient through the selection).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raml.losses.aml import _check_embeddings, top_k_exclusions

__all__ = ["d3_loss"]

DIFFERENCE_OFFSET = 0.1  # keeps the relative error finite where the teacher's two similarities nearly tie


def d3_loss(
    student: Tensor,
    teacher: Tensor,
    k: int = 10,
    alpha: float = 100.0,
    beta: float = 5.0,
    gamma: float = 1.0,
    groups: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{"first_order": L_F, "hard": L_H, "easy": L_E, "total": L_F + L_H + L_E}`` (module docstring).

    Args:
        student: ``(N, D)`` L2-normalised student embeddings.
        teacher: ``(N, D)`` L2-normalised teacher embeddings of the same images (the gallery).
        k: The teacher's top-k, the image itself included: ``k - 1`` neighbours, ``2 <= k <= N``.
        alpha: Weight of the first-order term.
        beta: Weight of the hard (inconsistently ordered) pairs.
        gamma: Weight of the easy (consistently ordered) pairs.
        groups: Optional ``(N,)`` group ids (the image of each view): the other rows of a row's group are not
            its neighbours. Default: every other row is a candidate.

    Raises:
        ValueError: on bad shapes, ``k`` outside ``[2, candidates]`` (``candidates``: the fewest rows a row
            may rank, itself included) or a negative weight.
    """
    _check_embeddings(student, teacher)
    n = student.shape[0]
    excluded = top_k_exclusions(k, groups, n, student.device, smallest=2)
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    teacher = teacher.detach()
    teacher_sim = teacher @ teacher.T
    cross = student @ teacher.T
    first_order = alpha / n * (teacher_sim.diagonal() - cross.diagonal()).norm()
    # the k - 1 nearest other images: the diagonal is pushed out of the ranking
    others = teacher_sim.masked_fill(excluded | torch.eye(n, dtype=torch.bool, device=teacher.device), float("-inf"))
    t_top, neighbours = others.topk(k - 1, dim=1)  # (N, k - 1)
    c_top = cross.gather(1, neighbours)
    d_teacher = t_top[:, None, :] - t_top[:, :, None]  # [i, a, b] = T_{i n_b} - T_{i n_a}
    d_student = c_top[:, None, :] - c_top[:, :, None]
    relative = (d_student - d_teacher) / (DIFFERENCE_OFFSET + d_teacher.abs())
    agreement = (d_student * d_teacher).detach()
    hard = (relative * (agreement < 0)).flatten(1).norm(dim=1).mean() * beta / (k - 1)
    easy = (relative * (agreement > 0)).flatten(1).norm(dim=1).mean() * gamma / (k - 1)
    return {"first_order": first_order, "hard": hard, "easy": easy, "total": first_order + hard + easy}
