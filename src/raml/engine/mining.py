"""Negative mining and class-grouped batches for the symmetric (triplet) mode.

- :func:`class_groups` draws an epoch's anchors as groups of ``group_size`` images of one class, so each
  anchor finds its positives (the rest of its group) inside the batch.
- :func:`distance_weighted_negatives` draws, for each anchor embedding (B, D), ``neg_num`` negatives from
  a pool (M, D) with probability proportional to the inverse of the density of pairwise distances between
  random points on the unit sphere in D dimensions (Wu et al., "Sampling matters in deep embedding
  learning", 2017), so negatives are spread over all distances instead of all being easy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def log_sphere_distance_density(distance: torch.Tensor, dim: int) -> torch.Tensor:
    """log q(d) up to a constant for the distance d between two uniform points on S^(dim-1).

    q(d) is proportional to d^(dim-2) * (1 - d^2 / 4)^((dim-3)/2) for 0 < d < 2.
    """
    return (dim - 2.0) * torch.log(distance) + (dim - 3.0) / 2.0 * torch.log1p(-(distance**2) / 4.0)


def distance_weighted_negatives(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    pool: torch.Tensor,
    pool_labels: torch.Tensor,
    neg_num: int,
    generator: torch.Generator,
    cutoff: float = 0.5,
) -> torch.Tensor:
    """Indices into ``pool`` of ``neg_num`` negatives per anchor, (B, neg_num) int64.

    Distances are clipped below at ``cutoff`` (and just below 2) so the weights stay finite; same-class
    pool items get weight 0. Sampling is without replacement when the anchor has enough candidates.

    Raises:
        ValueError: when an anchor has fewer than ``neg_num`` other-class items in the pool.
    """
    if anchors.ndim != 2 or pool.ndim != 2 or anchors.shape[1] != pool.shape[1]:
        raise ValueError(f"Expected anchors (B, D) and pool (M, D); got {tuple(anchors.shape)}, {tuple(pool.shape)}.")
    dim = anchors.shape[1]
    distance = torch.cdist(anchors.double(), pool.double()).clamp(min=cutoff, max=2.0 - 1e-4)
    log_weight = -log_sphere_distance_density(distance, dim)
    same = anchor_labels.view(-1, 1) == pool_labels.view(1, -1)
    log_weight = log_weight.masked_fill(same, -math.inf)
    valid = (~same).sum(1)
    if int(valid.min()) < neg_num:
        raise ValueError(
            f"An anchor has only {int(valid.min())} other-class images in the mining pool but --neg-num is "
            f"{neg_num}: increase --pool-size or lower --neg-num."
        )
    weight = torch.exp(log_weight - log_weight.max(dim=1, keepdim=True).values)
    return torch.multinomial(weight, neg_num, replacement=False, generator=generator)


def class_groups(
    labels: Sequence[int], num_images: int, group_size: int, generator: torch.Generator
) -> list[list[int]]:
    """About ``num_images`` anchor indices as groups of ``group_size`` images of one class.

    Classes are visited in random order (cycling if needed); each group is a random draw of the class's
    images without replacement (with replacement for classes smaller than ``group_size``).

    Raises:
        ValueError: when no class has at least two images (no positive pairs at all).
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    usable = [members for members in by_class.values() if len(members) >= 2]
    if not usable:
        raise ValueError("Triplet training needs classes with at least two images; this split has none.")
    groups: list[list[int]] = []
    target_groups = max(1, num_images // group_size)
    while len(groups) < target_groups:
        for c in torch.randperm(len(usable), generator=generator).tolist():
            members = usable[c]
            if len(members) >= group_size:
                pick = torch.randperm(len(members), generator=generator)[:group_size].tolist()
            else:
                pick = torch.randint(len(members), (group_size,), generator=generator).tolist()
            groups.append([members[i] for i in pick])
            if len(groups) == target_groups:
                break
    return groups
