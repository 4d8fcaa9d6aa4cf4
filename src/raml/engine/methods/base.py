"""What a training method is: the batches of an epoch and the loss of one batch (see :mod:`raml.engine.methods`).

A method is built once per run with the :class:`~raml.engine.trainer.Trainer` as its context: the trainer owns
the networks (``student``, ``model`` (the student, wrapped by DDP when distributed), ``teacher``), the
devices, the configuration, the training split and the helpers that shard batches over processes
(``local_share``, ``load_shares``, ``global_batches``, ``item_seeds``, ``embed``, ``loader``). A method reads
these, never re-creates them, and draws randomness only from the generator it is given (the epoch's, seeded with
``seed + epoch``) or from seeds derived from the epoch, so that a resumed or multi-process run equals an
uninterrupted single-process one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from raml.engine.trainer import Trainer

__all__ = ["TEACHER_USES", "BatchLoss", "Method", "check_batch_loss"]

#: how a method uses the teacher: not at all, run online on each batch's views, or as embeddings cached once
TEACHER_USES = ("none", "online", "cached")


@dataclass
class BatchLoss:
    """One batch's loss (summed over its images), the terms to log (also sums) and the number of images.

    The terms are best left as 0-d tensors on the device (detached): the trainer sums them there and reads
    them every ``--print-freq`` batches, while a ``float`` (``.item()``) stops the host until the device has
    finished the batch's forward pass, on every batch.
    """

    loss: torch.Tensor
    terms: dict[str, float | torch.Tensor]
    images: int


def check_batch_loss(result: Any, method: Method) -> None:
    """Check what ``method.batch_loss`` returned against the :class:`BatchLoss` contract: a ``BatchLoss`` whose
    ``loss`` is a 0-d floating-point tensor on the graph (requiring grad, while gradients are enabled) and whose
    ``images`` is an ``int``. Only the tensor's metadata is read (no wait for the device).

    Raises:
        TypeError: naming the method's class, what it returned and the contract.
    """
    name = type(method).__name__
    contract = (
        "batch_loss must return BatchLoss(loss, terms, images) with loss a 0-d floating-point tensor computed "
        "from the student's output (requiring grad; not .item(), not detached) summed over the batch's images, "
        "and images an int"
    )
    if not isinstance(result, BatchLoss):
        raise TypeError(f"{name}.batch_loss returned a {type(result).__name__}; {contract}.")
    loss = result.loss
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{name}.batch_loss returned a loss of type {type(loss).__name__}; {contract}.")
    if loss.dim() != 0 or not loss.is_floating_point():
        raise TypeError(
            f"{name}.batch_loss returned a loss of shape {tuple(loss.shape)} and dtype {loss.dtype}; {contract} "
            "(sum a per-image loss: .sum())."
        )
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise TypeError(f"{name}.batch_loss returned a loss that does not require grad (detached); {contract}.")
    if isinstance(result.images, bool) or not isinstance(result.images, int):
        raise TypeError(f"{name}.batch_loss returned images={result.images!r}; {contract}.")


class Method:
    """Base class of a training recipe. Subclasses set the class attributes and implement the two methods.

    Attributes:
        teacher: :data:`TEACHER_USES`: ``"online"`` (the teacher embeds each batch's views), ``"cached"``
            (its embeddings of the training images, computed once) or ``"none"``.
        labels: whether the method reads the training labels.
        searched: the settings ``--optimize`` searches for it (keys of :data:`raml.engine.search.SEARCH_SPACE`):
            ``lr`` alone by default; ``ts_aug``, whose loss reads λ1 and λ2, adds ``lam_1`` and ``lam_2``.
        reads: the method settings (:data:`raml.engine.config.METHOD_SETTINGS`) it reads; ``TrainConfig.validate``
            warns about a non-default value of the others. ``None`` (the default of a plug-in that does not say):
            not checked.
    """

    teacher: ClassVar[str] = "none"
    labels: ClassVar[bool] = False
    searched: ClassVar[tuple[str, ...]] = ("lr",)
    reads: ClassVar[frozenset[str] | None] = None

    def __init__(self, run: Trainer) -> None:
        self.run = run

    @property
    def asymmetric(self) -> bool:
        """Distillation: validated and monitored asymmetrically (student queries, teacher database)."""
        return self.teacher != "none"

    def epoch_images(self) -> int:
        """Images drawn per epoch (the trainer's ``epoch_size``): ``--query-size``, at most the split's size."""
        return min(self.run.config.query_size, len(self.run.train_split))

    def batches_per_epoch(self) -> int:
        """How many batches :meth:`epoch_batches` yields (``epoch_size / batch_size``, rounded up)."""
        return math.ceil(self.run.epoch_size / self.run.config.batch_size)

    def add_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the method's own learnable parameters (e.g. class proxies) to the optimizer; none by default."""

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        """The epoch's batches (this process's share), drawing randomness from ``generator`` only."""
        raise NotImplementedError

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:
        """The loss of one batch from :meth:`epoch_batches`, summed over its images."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called before each optimizer step (after the gradients of the accumulated batches are summed)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Entries saved in the checkpoint's ``raml`` section (e.g. the proxies); none by default."""
        return {}

    def load_checkpoint_state(self, extra: dict[str, Any], path: Path) -> None:
        """Restore what :meth:`checkpoint_state` saved, from the ``raml`` section of checkpoint ``path``."""
