"""``--mode ts_reg``: the student at ``--image-size`` QR regresses the teacher's cached DR embeddings.

Batches: the evaluation-transformed training images at QR (no augmentation), ``batch_size`` per batch, in a
random order drawn from the epoch's generator; with several ``--image-size`` sizes, one size per batch
(:func:`raml.data.sizes.draw_batch_sizes`). The teacher embeds every training image once at
``--teacher-image-size`` DR (cached on disk by the teacher checkpoint's hash). Loss: the absolute term
:func:`raml.losses.absolute_loss`, summed over the images. No labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from raml.data.datasets import ImageDataset
from raml.data.images import EvalTransform
from raml.data.sizes import SizedImages, draw_batch_sizes
from raml.engine.methods.base import BatchLoss, Method
from raml.losses import absolute_loss


class CachedRegression(Method):
    """Absolute term against the teacher's cached embeddings of the same images."""

    teacher = "cached"
    reads = frozenset()
    teacher_cache: torch.Tensor | None = None

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        run, c = self.run, self.run.config
        if self.teacher_cache is None:
            self.teacher_cache = run.teacher_embeddings(run.train_split, run.train_paths)
        mean, std = run.student.meta["mean"], run.student.meta["std"]
        # the "label" of each image is its index: it selects the cached teacher row
        dataset = ImageDataset(
            run.train_paths, list(range(len(run.train_paths))), EvalTransform(c.image_size, mean, std)
        )
        order = torch.randperm(len(dataset), generator=generator)[: run.epoch_size].tolist()
        global_batches = run.global_batches(order)
        if len(c.student_sizes()) > 1:
            # several query sizes: one per global batch, drawn from a stream of its own (raml.data.sizes)
            dataset = SizedImages(run.train_paths, mean, std)
            drawn = draw_batch_sizes(c.student_sizes(), len(global_batches), c.seed, epoch)
            global_batches = [[(i, size) for i in batch] for batch, size in zip(global_batches, drawn, strict=True)]
        shares = [run.local_share(batch) for batch in global_batches]
        stand_ins = [batch[0] for batch in global_batches]
        return run.load_shares(dataset, shares, stand_ins, lambda loaded: {"batch_sampler": loaded})

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:  # noqa: ARG002
        assert self.teacher_cache is not None
        run = self.run
        images, indices = batch
        student = run.model(images.to(run.device, non_blocking=True)).float()
        loss = absolute_loss(student, self.teacher_cache[indices].to(run.device))
        return BatchLoss(loss, {"loss": loss.detach()}, images.shape[0])
