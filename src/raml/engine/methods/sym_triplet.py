"""``--mode sym --loss triplet`` (the reference's symmetric training): labels, one image size.

An epoch is the reference's (:func:`raml.engine.mining.class_grouped_epoch`): only classes with at least
``GROUP_SIZE`` images, ``min_class // GROUP_SIZE * GROUP_SIZE`` distinct images of each, in groups of
``GROUP_SIZE`` of one class, group after group over the classes in a random order, cut at ``--query-size``; so
the epoch's size, and OneCycle's length, follow from the data. Each batch is ``batch_size // GROUP_SIZE``
consecutive groups (each anchor's positives are the rest of its group) followed by ``neg_num`` negatives per
anchor, drawn once per epoch by distance-weighted sampling from a random pool of the kept classes embedded by
the current network; an incomplete last batch is dropped, as the reference's loader does. Loss:
:func:`raml.losses.triplet_loss` with ``--loss-margin``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from raml.engine.methods.base import BatchLoss
from raml.engine.methods.labelled import GROUP_SIZE, LabelledMethod
from raml.engine.mining import (
    class_grouped_epoch,
    class_grouped_epoch_size,
    distance_weighted_negatives,
    mining_pool,
    reference_epoch_seed,
)
from raml.losses import triplet_loss


class TripletTraining(LabelledMethod):
    """Triplet loss with in-batch positives and distance-weighted negatives mined once per epoch."""

    reads = frozenset({"loss", "loss_margin", "neg_num", "pool_size"})

    def epoch_images(self) -> int:
        """``min(--query-size, min_class // GROUP_SIZE * GROUP_SIZE * kept_classes)``, the reference's."""
        return class_grouped_epoch_size(self.run.train_split.labels, GROUP_SIZE, self.run.config.query_size)

    def batches_per_epoch(self) -> int:
        """Whole batches only (the reference's loader drops the last incomplete one in ``sym`` mode)."""
        return self.run.epoch_size // (self.groups_per_batch() * GROUP_SIZE)

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:  # noqa: ARG002
        """Mine once per epoch with the current network, then yield (anchor groups, negatives) batches.

        The anchors, the pool and the negative draws come from a numpy ``RandomState`` seeded as the reference
        seeds its global numpy state at this epoch, in the reference's order (see :mod:`raml.engine.mining`).
        """
        run, c = self.run, self.run.config
        labels = torch.as_tensor(run.train_split.labels)
        rng = np.random.RandomState(reference_epoch_seed(c.seed, epoch))
        anchors = class_grouped_epoch(run.train_split.labels, GROUP_SIZE, run.epoch_size, rng)
        pool = torch.tensor(mining_pool(run.train_split.labels, GROUP_SIZE, c.pool_size, rng), dtype=torch.int64)
        embed_idx = sorted(set(anchors) | set(pool.tolist()))
        position = {index: row for row, index in enumerate(embed_idx)}
        embeddings = run.embed(
            run.student,
            [run.train_paths[i] for i in embed_idx],
            c.image_size,
            run.device,
            c.eval_batch_size,
            c.workers,
            run.progress,
            "mining",
        )
        # the float64 weights on the GPU where there is one (the reference's are on the GPU), the draws on the CPU
        where = run.device if run.device.type == "cuda" else torch.device("cpu")
        embeddings = embeddings.to(where)
        anchor_rows = torch.tensor([position[i] for i in anchors], dtype=torch.int64, device=where)
        pool_rows = torch.tensor([position[i] for i in pool.tolist()], dtype=torch.int64, device=where)
        # each anchor's own label (the reference passes labels of images 0..N-1 here: docs/fidelity.md)
        negatives = pool[
            distance_weighted_negatives(
                embeddings[anchor_rows], labels[anchors], embeddings[pool_rows], labels[pool], c.neg_num, rng
            )
        ]
        dataset = self.augmented_images()
        per_batch = self.groups_per_batch()
        seeds = iter(run.item_seeds(epoch, len(anchors) * (1 + c.neg_num)))
        batch_lists: list[list[tuple[int, int]]] = []
        stand_ins: list[tuple[int, int]] = []
        for batch in range(self.batches_per_epoch()):
            # every process draws the seeds of the whole batch, then keeps its share of the groups
            group_ids = list(range(batch * per_batch, (batch + 1) * per_batch))
            rows = [g * GROUP_SIZE + i for g in group_ids for i in range(GROUP_SIZE)]
            anchor_items = [(anchors[r], next(seeds)) for r in rows]
            negative_items = [[(int(n), next(seeds)) for n in negatives[r].tolist()] for r in rows]
            local_groups = run.local_share(group_ids)
            keep = [k for k, g in enumerate(group_ids) if g in local_groups]
            local_rows = [k * GROUP_SIZE + i for k in keep for i in range(GROUP_SIZE)]
            batch_lists.append(
                [anchor_items[r] for r in local_rows] + [item for r in local_rows for item in negative_items[r]]
            )
            stand_ins.append(anchor_items[0])
        # a process without a group of the batch (fewer groups than processes) gets a batch of no rows
        return run.load_shares(dataset, batch_lists, stand_ins, lambda loaded: {"batch_sampler": loaded})

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:  # noqa: ARG002
        c = self.run.config
        images, _ = batch
        n_anchor = images.shape[0] // (1 + c.neg_num)
        embeddings = self.run.model(images.to(self.run.device, non_blocking=True)).float()
        if n_anchor == 0:  # this process's share of the batch is empty: a zero loss on the graph
            loss = embeddings.sum() * 0.0
            return BatchLoss(loss, {"loss": loss.detach()}, 0)
        anchor, negatives = embeddings[:n_anchor], embeddings[n_anchor:].view(n_anchor, c.neg_num, -1)
        positives = group_positives(anchor, GROUP_SIZE)
        loss = triplet_loss(anchor, positives, negatives, c.loss_margin)
        return BatchLoss(loss, {"loss": loss.detach()}, n_anchor)  # no host-device sync per batch


def group_positives(anchor: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, D) anchors in groups of ``group_size`` -> (B, group_size - 1, D): each anchor's positives are the
    other images of its group (the triplet loss sums over them, so their order does not matter)."""
    b, d = anchor.shape
    groups = anchor.view(b // group_size, group_size, d)
    rows = []
    for g in range(groups.shape[0]):
        for i in range(group_size):
            rows.append(torch.cat([groups[g, :i], groups[g, i + 1 :]]))
    return torch.stack(rows)
