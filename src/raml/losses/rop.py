"""Rank order preservation (Wu et al., "A General Rank Preserving Framework for Asymmetric Image Retrieval",
ICLR 2023).

Tensor contract: student ``(N, D)`` and teacher ``(N, D)``, L2-normalised embeddings of the same ``N`` images,
optional ``groups`` ``(N,)`` -> scalar.

With ``T_ij = t_i . t_j`` (the teacher's similarities; the batch's teacher embeddings are the gallery) and
``C_ij = s_i . t_j`` (student query against teacher gallery), let ``g_1 .. g_k`` be the teacher's top-k of row
``i`` (the image itself first) and ``T_a = T_{i g_a}``, ``C_a = C_{i g_a}``. The teacher's ranking as an
indicator matrix, and the student's soft version of it, both against the teacher's similarities::

    I^T_ab = sigmoid((T_b - T_a) / 1e-6)        (a step: 1 where g_b ranks above g_a, 1/2 on the diagonal)
    I^S_ab = sigmoid((C_b - T_a) / tau)
    w_a    = a * softmax_a(lambda * T_a)                  (rank weights: position a = 1..k times a softmax)
    L_i    = sum_{a, b} w_a (I^T_ab - I^S_ab)^2
    loss   = mean_i L_i / k

``tau`` is ``temperature`` (0.1) and ``lambda`` ``rank_weight`` (0.2). Everything follows the implementation
of ROP in AIR-Distiller (``distillers/ROP.py`` in SCY-X/D3still, the code of the D3still and UGD authors, which
re-implements the ICLR paper's Eqs. (8)-(10)): the student's similarity to ``g_b`` is compared with the
teacher's to ``g_a`` (not the student's own), the teacher's indicator is a sigmoid at temperature 1e-6, the
positional weight grows with the rank (``a = 1..k``), and the sum is divided by ``k``. Defaults from its
fine-grained configs (``Training_Configs/CUB200/*/ROP.yaml``): ``k = 256``, ``tau = 0.1``, ``lambda = 0.2``.

Choices: as in AIR-Distiller (and unlike the paper, which embeds the training set offline) the gallery is the
current batch; with ``groups`` (the views of one image) the other rows of the row's group are left out of its
top-k, as every relational loss of :mod:`raml.losses` does; the teacher side carries no gradient. We compute
the sigmoids with :func:`torch.sigmoid` (the same values as ``1 / (1 + exp(-x / tau))`` without its overflow)
in the embeddings' own precision (AIR-Distiller casts to float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raml.losses.aml import _check_embeddings, _check_positive, top_k_exclusions

__all__ = ["TEACHER_INDICATOR_TEMPERATURE", "rop_loss"]

TEACHER_INDICATOR_TEMPERATURE = 1e-6  # AIR-Distiller's: the teacher's indicator is (almost) a step function


def rop_loss(
    student: Tensor,
    teacher: Tensor,
    k: int,
    temperature: float = 0.1,
    rank_weight: float = 0.2,
    groups: Tensor | None = None,
) -> Tensor:
    """The rank order preservation loss (module docstring), a scalar.

    Args:
        student: ``(N, D)`` L2-normalised student (query) embeddings.
        teacher: ``(N, D)`` L2-normalised teacher embeddings of the same images (the gallery).
        k: The teacher's top-k, the image itself included: ``1 <= k <= candidates``.
        temperature: ``tau`` of the student's indicator.
        rank_weight: ``lambda``, the scale of the teacher's similarities in the rank weights' softmax (>= 0).
        groups: Optional ``(N,)`` group ids (the image of each view): the other rows of a row's group are not in
            its top-k. Default: every row is a candidate.

    Raises:
        ValueError: on bad shapes, ``k`` outside ``[1, candidates]`` (the fewest rows a row may rank, itself
            included), a non-positive temperature or a negative rank weight.
    """
    _check_embeddings(student, teacher)
    n = student.shape[0]
    excluded = top_k_exclusions(k, groups, n, student.device)
    _check_positive("temperature", temperature)
    if isinstance(rank_weight, bool) or not isinstance(rank_weight, (int, float)) or not rank_weight >= 0:
        raise ValueError(f"rank_weight must be a number >= 0, got {rank_weight!r}.")
    teacher = teacher.detach()
    teacher_sim = teacher @ teacher.T
    _, gallery = teacher_sim.masked_fill(excluded, float("-inf")).topk(k, dim=1)  # (N, k), the image first
    t_top = teacher_sim.gather(1, gallery)
    c_top = (student @ teacher.T).gather(1, gallery)
    # [i, a, b]: the teacher's (resp. the student's) similarity to g_b minus the teacher's to g_a
    teacher_indicator = torch.sigmoid((t_top[:, None, :] - t_top[:, :, None]) / TEACHER_INDICATOR_TEMPERATURE)
    student_indicator = torch.sigmoid((c_top[:, None, :] - t_top[:, :, None]) / temperature)
    positions = torch.arange(1, k + 1, dtype=t_top.dtype, device=t_top.device)
    weights = torch.softmax(t_top * rank_weight, dim=1) * positions  # (N, k): w_a
    per_row = ((teacher_indicator - student_indicator).pow(2) * weights[:, :, None]).sum(dim=(1, 2))
    return per_row.mean() / k
