"""Contextual similarity distillation (Wu et al., "Contextual Similarity Distillation for Asymmetric Image
Retrieval", CVPR 2022).

Tensor contract: student ``(N, D)`` and teacher ``(N, D)``, L2-normalised embeddings of the same ``N`` images
-> scalar (means over the ``N`` images).

The context of image ``i`` is its ``k`` nearest neighbours ``K_i`` in the teacher's space among the teacher's
embeddings ``t_j`` (the image itself, at similarity 1, is the first of them). Teacher and student each give a
distribution over that context, from the teacher's and the student's similarities to the same teacher
embeddings, and the student's is matched to the teacher's::

    p_ij = softmax_{j in K_i}(t_i . t_j / tau)      q_ij = softmax_{j in K_i}(s_i . t_j / tau)
    L_ctx = mean_i KL(p_i || q_i) = mean_i sum_{j in K_i} p_ij (log p_ij - log q_ij)
    L_1   = mean_i (1 - s_i . t_i)                                  (first order: the same image)
    loss  = L_ctx + w_1 * L_1

Choices the paper leaves open or that differ (ours): the neighbours are searched among the teacher's
embeddings of the current batch (the paper searches an offline teacher-embedded training set; a batch-wide
gallery keeps the teacher online on the same views as every other method here); one temperature for both
distributions (default 0.1); ``L_1`` is written out explicitly with weight ``w_1`` (default 1), although the
image itself in ``K_i`` already ties ``s_i`` to ``t_i``; with ``groups`` (the views of one image) the other
rows of the row's group are left out of its context (AIR-Distiller's distillation batches hold distinct
images, so no such near-duplicates exist there).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from raml.losses.aml import _check_embeddings, _check_positive, top_k_exclusions

__all__ = ["csd_loss"]


def csd_loss(
    student: Tensor,
    teacher: Tensor,
    k: int,
    temperature: float = 0.1,
    first_order_weight: float = 1.0,
    groups: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{"context": L_ctx, "first_order": L_1, "total": L_ctx + w_1 L_1}`` (module docstring).

    Args:
        student: ``(N, D)`` L2-normalised student embeddings.
        teacher: ``(N, D)`` L2-normalised teacher embeddings of the same images (the neighbours' gallery).
        k: Context size, ``1 <= k <= N`` (the image itself included).
        temperature: Softmax temperature of both distributions.
        first_order_weight: ``w_1`` (>= 0).
        groups: Optional ``(N,)`` group ids (the image of each view): the other rows of a row's group are not
            in its context. Default: every row is a candidate.

    Raises:
        ValueError: on bad shapes, ``k`` outside ``[1, candidates]`` (the fewest rows a row may rank, itself
            included), a non-positive temperature or a negative weight.
    """
    _check_embeddings(student, teacher)
    n = student.shape[0]
    excluded = top_k_exclusions(k, groups, n, student.device)
    _check_positive("temperature", temperature)
    if isinstance(first_order_weight, bool) or not first_order_weight >= 0:
        raise ValueError(f"first_order_weight must be a number >= 0, got {first_order_weight!r}.")
    teacher = teacher.detach()
    teacher_sim = teacher @ teacher.T
    # (N, k), the image itself first; the other views of its image cannot be drawn
    _, neighbours = teacher_sim.masked_fill(excluded, float("-inf")).topk(k, dim=1)
    top_sim = teacher_sim.gather(1, neighbours)
    cross = (student @ teacher.T).gather(1, neighbours)
    log_p = F.log_softmax(top_sim / temperature, dim=1)
    log_q = F.log_softmax(cross / temperature, dim=1)
    context = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    first_order = (1.0 - (student * teacher).sum(dim=1)).mean()
    return {"context": context, "first_order": first_order, "total": context + first_order_weight * first_order}
