"""``--mode sym --loss normsoftmax`` (ours): labels, one image size, a learnable proxy per class.

Each batch: groups of ``GROUP_SIZE`` images of one class, ``batch_size`` images in all; no mining. Loss:
:func:`raml.losses.normalized_softmax_loss` against the proxies (Zhai & Wu, BMVC 2019), which are trained with
the network at ``PROXY_LR_MULTIPLIER`` x ``--lr`` and kept in the checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raml.distributed import average_gradients_
from raml.engine.methods.base import BatchLoss
from raml.engine.methods.labelled import GROUP_SIZE, LabelledMethod
from raml.engine.mining import class_groups, proxy_classes
from raml.losses import normalized_softmax_loss

PROXY_TEMPERATURE = 0.05  # normalised-softmax temperature (Zhai & Wu 2019)
PROXY_LR_MULTIPLIER = 10.0  # proxies start random and must move faster than the network


class ProxyTraining(LabelledMethod):
    """Normalised softmax over one learnable proxy per training class."""

    reads = frozenset({"loss"})

    proxies: nn.Parameter

    def add_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        """One learnable proxy per training class, drawn from the run's seed (not the global generator)."""
        run, c = self.run, self.run.config
        dim = int(run.student.meta["outputdim"])
        init = torch.randn(run.train_split.num_classes, dim, generator=torch.Generator().manual_seed(c.seed))
        self.proxies = nn.Parameter(init.to(run.device))
        optimizer.add_param_group(
            {"name": "proxies", "params": [self.proxies], "lr": c.lr * PROXY_LR_MULTIPLIER, "weight_decay": 0.0}
        )

    def epoch_images(self) -> int:
        """The base's; first refuses a split with fewer than two trainable classes, at the start of the run."""
        proxy_classes(self.run.train_split.labels)
        return super().epoch_images()

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        """Groups of GROUP_SIZE images per class, ``batch_size`` images per batch; no mining needed."""
        run = self.run
        groups = class_groups(run.train_split.labels, run.epoch_size, GROUP_SIZE, generator)
        dataset = self.augmented_images()
        items = list(zip([i for group in groups for i in group], run.item_seeds(epoch, len(groups) * GROUP_SIZE)))
        size = self.groups_per_batch() * GROUP_SIZE
        global_batches = [items[i : i + size] for i in range(0, len(items), size)]
        shares = [run.local_share(batch) for batch in global_batches]
        stand_ins = [batch[0] for batch in global_batches]
        return run.load_shares(dataset, shares, stand_ins, lambda loaded: {"batch_sampler": loaded})

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:  # noqa: ARG002
        run = self.run
        images, indices = batch
        labels = torch.as_tensor(run.train_split.labels)[indices].to(run.device)
        embeddings = run.model(images.to(run.device, non_blocking=True)).float()
        loss = normalized_softmax_loss(embeddings, labels, self.proxies, PROXY_TEMPERATURE)
        return BatchLoss(loss, {"loss": loss.detach()}, images.shape[0])  # no host-device sync per batch

    def before_optimizer_step(self) -> None:
        # the proxies are outside DDP: sum their gradients over processes by hand (loss was scaled by W), every
        # process taking part in the all-reduce whether or not its loss reached them
        average_gradients_([self.proxies], self.run.dist)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"proxies": self.proxies.detach().cpu()}

    def load_checkpoint_state(self, extra: dict[str, Any], path: Path) -> None:
        if "proxies" not in extra:
            raise ValueError(f"{path} has no proxies for --loss normsoftmax; it was trained with another loss.")
        with torch.no_grad():
            self.proxies.copy_(extra["proxies"])
