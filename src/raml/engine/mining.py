"""Epochs of class groups and distance-weighted negative mining for the symmetric (triplet) mode.

The reference's construction (its ``TuplesFineGrainDataset`` with ``spc = 4``, ``create_epoch_tuples`` and
``mine_dist``/``inverse_sphere_distances``; SPEC section 5, ``sym``), in our own code:

- :func:`grouped_classes`: only classes with at least ``samples_per_class`` images take part; fewer than two
  such classes is an error (every negative would be of the anchor's class).
- :func:`class_grouped_epoch`: every kept class gives ``min_class // spc * spc`` distinct images (each once),
  cut into groups of ``spc``; the classes are put in a random order and the epoch is group 0 of every class
  in that order, then group 1 of every class, and so on, cut at the epoch's size. Each anchor's positives are
  the rest of its group, so a batch of whole groups holds them.
- :func:`negative_probabilities` and :func:`distance_weighted_negatives`: for each anchor embedding (B, D),
  ``neg_num`` pool items (M, D) drawn without replacement with probability proportional to the inverse of the
  density of distances between random points on the unit sphere in D dimensions (Wu et al., "Sampling matters
  in deep embedding learning", 2017), with the reference's arithmetic: distances clamped below at 0.5,
  same-class log-weights set to 0 *before* the max is taken, same-class weights 0 after the exponential, then
  1e-6 added to every pool item (so a same-class item, even the anchor itself, can be drawn, rarely).

Randomness comes from a ``numpy.random.RandomState`` seeded like the reference's global numpy state at that
epoch, and is drawn in the reference's order (a permutation of each kept class, a permutation of the classes,
a permutation of the kept images for the pool, then one weighted draw without replacement per anchor), so
the anchors and the pool are the reference's for the same seed and split, and the negatives are too wherever
the probabilities agree (ours are float64, the reference's float32 on the GPU).
:func:`class_groups` is the sampler of our own ``--loss normsoftmax``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: set once the short-pool warning of :func:`distance_weighted_negatives` was logged (it is logged once a process)
_warned_short_pool = False
#: added to every pool item's weight before normalising (the reference's ``q_d_inv += 1e-6``)
WEIGHT_FLOOR = 1e-6
#: distances are clamped below at this value (the reference's ``clamp(min=0.5)``)
DISTANCE_CUTOFF = 0.5
#: the largest double below 2: only an exactly antipodal pair reaches it, where the reference's weights are NaN
DISTANCE_CEILING = math.nextafter(2.0, 0.0)


def log_sphere_distance_density(distance: torch.Tensor, dim: int) -> torch.Tensor:
    """log q(d) up to a constant for the distance d between two uniform points on S^(dim-1).

    q(d) is proportional to d^(dim-2) * (1 - d^2 / 4)^((dim-3)/2) for 0 < d < 2.
    """
    return (dim - 2.0) * torch.log(distance) + (dim - 3.0) / 2.0 * torch.log1p(-(distance**2) / 4.0)


def reference_epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the reference's numpy state at our (1-based) ``epoch``: it seeds ``seed + epoch`` with
    0-based epochs, so our epoch 1 draws what its first epoch draws (numpy seeds must lie in [0, 2**32))."""
    return (seed + epoch - 1) % 2**32


def grouped_classes(labels: Sequence[int], samples_per_class: int) -> list[list[int]]:
    """Indices of each class's images, in class (label) order, for the classes with at least
    ``samples_per_class`` images; the others take no part in ``sym`` training (neither anchor nor pool).

    Raises:
        ValueError: when fewer than two classes have ``samples_per_class`` images (with one, every negative
            would be of the anchor's own class: nothing to mine).
    """
    return _two_classes_of_at_least(
        labels,
        samples_per_class,
        by_label=True,
        training="Triplet training (--mode sym)",
        why="the anchors' negatives come from the other kept classes",
    )


def _two_classes_of_at_least(
    labels: Sequence[int], min_images: int, *, by_label: bool, training: str, why: str
) -> list[list[int]]:
    """Indices of each class's images, for the classes with at least ``min_images`` images, in label order
    (``by_label``) or first-seen order; a ValueError naming ``training`` and ``why`` when fewer than two."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    order = sorted(by_class) if by_label else list(by_class)
    kept = [by_class[label] for label in order if len(by_class[label]) >= min_images]
    if len(kept) < 2:
        largest = sorted((len(members) for members in by_class.values()), reverse=True)[:3]
        raise ValueError(
            f"{training} needs at least 2 classes with at least {min_images} images ({why}); this split has "
            f"{len(kept)} such class(es) of {len(by_class)} (largest class sizes {largest}). Use a split with more "
            "or larger classes."
        )
    return kept


def class_grouped_epoch_size(labels: Sequence[int], samples_per_class: int, max_images: int) -> int:
    """Images in a ``sym`` epoch: ``min(max_images, min_class // spc * spc * kept_classes)`` (the reference's
    ``qsize``; OneCycle's length follows from it)."""
    classes = grouped_classes(labels, samples_per_class)
    per_class = min(len(members) for members in classes) // samples_per_class * samples_per_class
    return min(max_images, per_class * len(classes))


def class_grouped_epoch(
    labels: Sequence[int], samples_per_class: int, max_images: int, rng: np.random.RandomState
) -> list[int]:
    """One epoch's anchors (indices into ``labels``), in groups of ``samples_per_class`` images of one class.

    Draws, in this order: a permutation of each kept class's images (class order), then a permutation of the
    classes. The epoch is group g of every class (in the permuted order) for g = 0, 1, ..., cut at
    :func:`class_grouped_epoch_size` images.
    """
    classes = grouped_classes(labels, samples_per_class)
    per_class = min(len(members) for members in classes) // samples_per_class * samples_per_class
    picks = [[members[j] for j in rng.permutation(len(members))[:per_class]] for members in classes]
    order = rng.permutation(len(classes)).tolist()
    epoch: list[int] = []
    for start in range(0, per_class, samples_per_class):
        for c in order:
            epoch.extend(picks[c][start : start + samples_per_class])
    return epoch[: class_grouped_epoch_size(labels, samples_per_class, max_images)]


def mining_pool(labels: Sequence[int], samples_per_class: int, pool_size: int, rng: np.random.RandomState) -> list[int]:
    """The epoch's negative pool: ``pool_size`` random images of the kept classes (drawn after the anchors)."""
    kept = [index for members in grouped_classes(labels, samples_per_class) for index in members]
    return [kept[j] for j in rng.permutation(len(kept))[:pool_size].tolist()]


def negative_probabilities(
    anchors: torch.Tensor, anchor_labels: torch.Tensor, pool: torch.Tensor, pool_labels: torch.Tensor
) -> torch.Tensor:
    """(B, M) float64: each anchor's probability of drawing each pool item, the reference's arithmetic.

    ``anchors`` (B, D) and ``pool`` (M, D) are L2-normalised embeddings; d = sqrt(max(2 - 2 a.p, 0)) clamped
    below at 0.5 (and at the largest double below 2, where the reference's weights would be NaN);
    log w = -log q(d) with q the unit-sphere distance density; same-class log w = 0; w = exp(log w - max_row);
    same-class w = 0; w += 1e-6; normalised per row.
    """
    if anchors.ndim != 2 or pool.ndim != 2 or anchors.shape[1] != pool.shape[1]:
        raise ValueError(f"Expected anchors (B, D) and pool (M, D); got {tuple(anchors.shape)}, {tuple(pool.shape)}.")
    dim = anchors.shape[1]
    product = anchors.double() @ pool.double().T
    distance = (2.0 - 2.0 * product).clamp(min=0.0).sqrt().clamp(min=DISTANCE_CUTOFF, max=DISTANCE_CEILING)
    log_weight = -log_sphere_distance_density(distance, dim)
    same = anchor_labels.to(anchors.device).view(-1, 1) == pool_labels.to(anchors.device).view(1, -1)
    log_weight = log_weight.masked_fill(same, 0.0)
    weight = torch.exp(log_weight - log_weight.max(dim=1, keepdim=True).values)
    weight = weight.masked_fill(same, 0.0) + WEIGHT_FLOOR
    return weight / weight.sum(dim=1, keepdim=True)


def count_short_anchors(anchor_labels: torch.Tensor, pool_labels: torch.Tensor, neg_num: int) -> tuple[int, int]:
    """How many anchors have fewer than ``neg_num`` pool items of another class, and the fewest any anchor has
    (``(0, M)`` without anchors); counted per class, without a (B, M) matrix."""
    pool_np = pool_labels.detach().cpu().numpy().reshape(-1)
    anchor_np = anchor_labels.detach().cpu().numpy().reshape(-1)
    if anchor_np.size == 0:
        return 0, int(pool_np.size)
    classes, counts = np.unique(pool_np, return_counts=True)
    where = np.clip(np.searchsorted(classes, anchor_np), 0, max(len(classes) - 1, 0))
    same = np.where(classes[where] == anchor_np, counts[where], 0) if len(classes) else np.zeros_like(anchor_np)
    other = pool_np.size - same
    return int((other < neg_num).sum()), int(other.min())


def distance_weighted_negatives(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    pool: torch.Tensor,
    pool_labels: torch.Tensor,
    neg_num: int,
    rng: np.random.RandomState,
    chunk: int = 256,
) -> torch.Tensor:
    """Indices into ``pool`` of ``neg_num`` distinct negatives per anchor, (B, neg_num) int64.

    One ``rng.choice(M, neg_num, replace=False, p=...)`` per anchor, in anchor order, with the probabilities
    of :func:`negative_probabilities` (computed on the embeddings' device, ``chunk`` anchors at a time, so
    memory stays at chunk x M).

    Logs a warning (once a process, see :func:`count_short_anchors`) when some anchor has fewer than
    ``neg_num`` pool items of another class: its draw then takes same-class items, whose weight is the 1e-6
    floor (false negatives).

    Raises:
        ValueError: when the pool has fewer than ``neg_num`` images.
    """
    if pool.shape[0] < neg_num:
        raise ValueError(
            f"The mining pool has {pool.shape[0]} images but --neg-num is {neg_num}: increase --pool-size (or use "
            "a larger training split) or lower --neg-num."
        )
    global _warned_short_pool
    short, fewest = count_short_anchors(anchor_labels, pool_labels, neg_num)
    if short and not _warned_short_pool:
        _warned_short_pool = True
        logger.warning(
            "Mining: %d of %d anchors have fewer than --neg-num %d images of another class in the pool of %d "
            "(fewest: %d), so their negatives include images of their own class. Increase --pool-size, lower "
            "--neg-num or use a split with more classes of at least 4 images (warned once).",
            short,
            anchors.shape[0],
            neg_num,
            pool.shape[0],
            fewest,
        )
    rows: list[np.ndarray] = []
    for start in range(0, anchors.shape[0], chunk):
        stop = start + chunk
        probabilities = negative_probabilities(anchors[start:stop], anchor_labels[start:stop], pool, pool_labels)
        for row in probabilities.cpu().numpy():
            rows.append(rng.choice(pool.shape[0], size=neg_num, replace=False, p=row))
    if not rows:
        return torch.empty(0, neg_num, dtype=torch.int64)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def proxy_classes(labels: Sequence[int]) -> list[list[int]]:
    """Indices of each class's images, in first-seen order, for the classes ``--loss normsoftmax`` trains on:
    those with at least two images.

    Raises:
        ValueError: when fewer than two classes have two images: with one class, its proxy is the only one, the
            softmax over the proxies is 1 and the loss exactly 0 (nothing is learnt).
    """
    return _two_classes_of_at_least(
        labels,
        2,
        by_label=False,
        training="Normalised-softmax training (--loss normsoftmax)",
        why="with one class the softmax over the class proxies is 1 and the loss 0: nothing to learn",
    )


def class_groups(
    labels: Sequence[int], num_images: int, group_size: int, generator: torch.Generator
) -> list[list[int]]:
    """About ``num_images`` anchor indices as groups of ``group_size`` images of one class (ours, the sampler
    of ``--loss normsoftmax``; the triplet loss uses :func:`class_grouped_epoch`, the reference's).

    Classes are visited in random order (cycling if needed); each group is a random draw of the class's
    images without replacement (with replacement for classes smaller than ``group_size``).

    Raises:
        ValueError: when fewer than two classes have at least two images (see :func:`proxy_classes`).
    """
    usable = proxy_classes(labels)
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
