"""Triplet loss on squared Euclidean distances of L2-normalised embeddings (SPEC section 5, ``sym``).

Tensor contract: anchor ``(B, D)``, positives ``(B, P, D)``, negatives ``(B, N, D)``, all L2-normalised;
optional validity masks ``(B, P)`` and ``(B, N)`` bool -> scalar.

For one anchor ``a`` with valid positives ``p`` and valid negatives ``n``::

    loss(a) = mean_{(p, n)} max(0, |a - p|^2 - |a - n|^2 + margin)

averaged over every valid (positive, negative) pair; the batch loss is the SUM over anchors. An anchor
without any valid pair contributes 0. Masked-out slots (padding) never touch the value or the gradient,
whatever they contain.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["triplet_loss"]


def _check_mask(name: str, mask: Tensor | None, shape: tuple[int, int], layout: str) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape {layout} (True = valid slot), got {got}.")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(mask.shape)}.")
    return mask


def triplet_loss(
    anchor: Tensor,
    positives: Tensor,
    negatives: Tensor,
    margin: float,
    positive_mask: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """Hinge triplet loss over all positive x negative pairs of each anchor, summed over anchors.

    Args:
        anchor: ``(B, D)`` L2-normalised anchor embeddings.
        positives: ``(B, P, D)`` L2-normalised positives of each anchor.
        negatives: ``(B, N, D)`` L2-normalised negatives of each anchor.
        margin: Hinge margin on squared distances (the reference default is 0.7); must be >= 0.
        positive_mask: Optional ``(B, P)`` bool, True where the positive slot is real (not padding).
        negative_mask: Optional ``(B, N)`` bool, True where the negative slot is real (not padding).

    Returns:
        Scalar loss: sum over anchors of the mean hinge over that anchor's valid pairs.

    Raises:
        ValueError: On inconsistent shapes or an invalid margin.
        TypeError: On non-tensor, non-floating-point inputs or non-bool masks.
    """
    for name, tensor, layout, ndim in (
        ("anchor", anchor, "(B, D)", 2),
        ("positives", positives, "(B, P, D)", 3),
        ("negatives", negatives, "(B, N, D)", 3),
    ):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}.")
        if tensor.dim() != ndim:
            raise ValueError(f"{name} must have shape {layout} ({ndim} dimensions), got shape {tuple(tensor.shape)}.")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of embeddings, got {tensor.dtype}.")
    batch, dim = anchor.shape
    for name, tensor in (("positives", positives), ("negatives", negatives)):
        if tensor.shape[0] != batch or tensor.shape[2] != dim:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but anchor has shape {tuple(anchor.shape)}: "
                f"expected ({batch}, *, {dim}), one row of candidates per anchor, same embedding size."
            )
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}.")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}; a negative margin rewards violated triplets.")
    num_pos, num_neg = positives.shape[1], negatives.shape[1]
    positive_mask = _check_mask("positive_mask", positive_mask, (batch, num_pos), "(B, P)")
    negative_mask = _check_mask("negative_mask", negative_mask, (batch, num_neg), "(B, N)")

    # Zero the padded slots first so that NaN/inf padding cannot leak into the gradient (0 * NaN = NaN).
    if positive_mask is not None:
        positives = torch.where(positive_mask.unsqueeze(-1), positives, positives.new_zeros(()))
    if negative_mask is not None:
        negatives = torch.where(negative_mask.unsqueeze(-1), negatives, negatives.new_zeros(()))

    pos_dist = (anchor.unsqueeze(1) - positives).pow(2).sum(dim=-1)  # (B, P)
    neg_dist = (anchor.unsqueeze(1) - negatives).pow(2).sum(dim=-1)  # (B, N)
    hinge = torch.relu(pos_dist.unsqueeze(2) - neg_dist.unsqueeze(1) + margin)  # (B, P, N)

    if positive_mask is None and negative_mask is None:
        if num_pos == 0 or num_neg == 0:
            return anchor.new_zeros(())
        return hinge.mean(dim=(1, 2)).sum()

    pos_valid = positive_mask if positive_mask is not None else anchor.new_ones((batch, num_pos), dtype=torch.bool)
    neg_valid = negative_mask if negative_mask is not None else anchor.new_ones((batch, num_neg), dtype=torch.bool)
    valid = pos_valid.unsqueeze(2) & neg_valid.unsqueeze(1)  # (B, P, N)
    count = valid.sum(dim=(1, 2))
    per_anchor = torch.where(valid, hinge, hinge.new_zeros(())).sum(dim=(1, 2)) / count.clamp(min=1)
    return per_anchor.sum()
