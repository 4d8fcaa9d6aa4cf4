"""The batches of the view-based distillation methods (``ts_aug``, ``aml``, ``rkd``, ``csd``, ``d3``, ``rop``).

Each batch holds ``batch_size`` training images, each as ``P = --pos-num`` coupled views (one crop box, flip
and colour jitter rendered at QR ``--image-size`` for the student and at DR ``--teacher-image-size`` for the
teacher; :class:`raml.data.views.CoupledViewDataset`). By default each view is mixed up with a partner at both
resolutions with the same weight: ``--mixup-partner dataset`` (the reference: a random image of the whole
training set rendered with the view's random draws) or ``batch`` (a view of another image of the batch). The
paper's ablations switch parts off: ``--no-mixup`` (the views as rendered) and ``--uncoupled-views``
(independent crop/flip/jitter draws for the teacher's view of an image). With several ``--image-size`` sizes
each batch's student views are rendered at one of them (:func:`raml.data.sizes.draw_batch_sizes`). No labels.

:meth:`CoupledViewMethod.view_embeddings` gives a batch's student ``(B, P, D)`` and teacher ``(B, P, D)``
embeddings, L2-normalised (the teacher frozen, no gradient); a subclass turns them into its loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from raml.data.buffers import BufferPool
from raml.data.sizes import draw_batch_sizes
from raml.data.views import CoupledViewDataset, batch_loader_arguments, mix_partner_views, mixup_views
from raml.distributed import all_gather_rows, shard_bounds
from raml.engine.methods.base import BatchLoss, Method

logger = logging.getLogger(__name__)


class CoupledViewMethod(Method):
    """Coupled student/teacher views of each image of the batch; the teacher runs online on its views."""

    teacher = "online"
    reads = frozenset({"pos_num", "mixup", "mixup_partner", "uncoupled_views", "fused_views"})

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        # the CPU mix's outputs (training on the CPU): memory recycled once the previous batch is freed
        self._mix_pool = BufferPool()

    def epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        run, c = self.run, self.run.config
        dataset = CoupledViewDataset(
            run.train_paths,
            c.image_size,
            c.teacher_image_size,
            c.pos_num,
            c.seed,
            partners=c.mixup and c.mixup_partner == "dataset",
            coupled=not c.uncoupled_views,
            fused=c.fused_views,
        )
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator)[: run.epoch_size].tolist()
        global_batches = run.global_batches(order)
        if len(c.student_sizes()) > 1:
            # several query sizes: one per global batch, from a stream of its own (raml.data.sizes), so every
            # process renders the same size and a single-size run's draws are untouched
            drawn = draw_batch_sizes(c.student_sizes(), len(global_batches), c.seed, epoch)
            global_batches = [[(i, size) for i in batch] for batch, size in zip(global_batches, drawn, strict=True)]
        shares = [run.local_share(batch) for batch in global_batches]
        # each batch rendered straight into its collated tensors (CoupledViewDataset.batch): no per-item arrays
        # and no stacking copy; the same tensors as batch_sampler=batches with the default collation. A share
        # left empty (a batch of fewer images than processes) comes as a batch of no rows (Trainer.load_shares)
        return run.load_shares(dataset, shares, [batch[0] for batch in global_batches], batch_loader_arguments)

    def _views(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's float [0, 1] student ``(B, P, 3, QR, QR)`` views on the student's device and teacher
        ``(B, P, 3, DR, DR)`` views on the teacher's (``-g 0,1``), mixed up unless ``--no-mixup``.

        The uint8 views (and partners) go straight to their network's device and are made float and mixed
        there: the 448-px teacher views never pass through the student's GPU.
        """
        run, c = self.run, self.run.config
        device, teacher_device = run.device, run.teacher_device
        if not c.mixup:
            student_views, teacher_views, _ = batch
            student_views = student_views.to(device, non_blocking=True).float().div_(255)
            teacher_views = teacher_views.to(teacher_device, non_blocking=True).float().div_(255)
            return student_views, teacher_views
        if c.mixup_partner == "dataset":
            # the reference: every view's partner (a random training image rendered with the view's draws)
            # and its weight come with the item, so nothing is shared across processes. The weights stay on the
            # CPU: their range check there does not wait for the device (mix_partner_views moves them).
            student_views, teacher_views, partner_student, partner_teacher, lam, _ = batch
            student_views, teacher_views = mix_partner_views(
                student_views.to(device, non_blocking=True),
                teacher_views.to(teacher_device, non_blocking=True),
                partner_student.to(device, non_blocking=True),
                partner_teacher.to(teacher_device, non_blocking=True),
                lam,
                pool=self._mix_pool,
            )
            return student_views.div_(255), teacher_views.div_(255)
        student_views, teacher_views, _ = batch
        student_views = student_views.to(device, non_blocking=True)
        teacher_views = teacher_views.to(teacher_device, non_blocking=True)
        if run.dist.enabled:
            # mixup partners come from the whole global batch, as in a single process: gather the (uint8)
            # views, mix them all with the shared generator, keep this process's share
            student_views = all_gather_rows(student_views.contiguous(), run.dist)
            teacher_views = all_gather_rows(teacher_views.contiguous(), run.dist)
        student_views, teacher_views = mixup_views(
            student_views.float().div_(255), teacher_views.float().div_(255), generator, pool=self._mix_pool
        )
        start, stop = shard_bounds(student_views.shape[0], run.dist)
        return student_views[start:stop], teacher_views[start:stop]

    def view_embeddings(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Student ``(B, P, D)`` (with gradient) and frozen teacher ``(B, P, D)`` embeddings of the batch's views."""
        run = self.run
        assert run.teacher is not None and run.teacher_norm is not None
        student_views, teacher_views = self._views(batch, generator)
        b, p = student_views.shape[:2]
        student_in = run.student_norm(student_views.flatten(0, 1))
        teacher_in = run.teacher_norm(teacher_views.flatten(0, 1))
        with torch.no_grad():
            teacher = run.teacher(teacher_in).to(run.device).float().unflatten(0, (b, p))
        # unflatten, not view(b, p, -1): a process's empty share of the batch (b = 0) has no size to infer
        student = run.model(student_in).float().unflatten(0, (b, p))
        return student, teacher


class BatchRelationMethod(CoupledViewMethod):
    """A loss over the relations of the whole batch: its ``B x P`` views flattened to ``N`` rows ``(N, D)``.

    The loss functions of :mod:`raml.losses` return a mean over the ``N`` rows; it is multiplied by ``B`` so
    that, as for every method, a batch's loss is a sum over its images (the learning rate means the same).
    With several processes the relations are those within each process's share of the batch.

    The ``groups`` passed to :meth:`relation_terms` give the image of each row: every relational loss leaves
    the other views of a row's image out of its relations (AIR-Distiller's distillation batches hold distinct
    images), so that the methods treat those near-duplicates alike.

    A batch whose rows cannot form the relations (:meth:`relatable`: e.g. the epoch's last batch holding one
    image, its views of one group) contributes a zero loss that keeps the graph (every term logged as 0; a
    warning once per run) instead of stopping the run: the reference keeps an epoch's last, smaller batch
    (``drop_last`` only in ``sym`` mode), and so do these methods.
    """

    #: the terms :meth:`relation_terms` returns besides ``"total"`` (logged as 0 for a batch without relations)
    term_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self._warned_no_relations = False

    @staticmethod
    def candidates(groups: torch.Tensor) -> int:
        """The fewest rows any row may relate to, itself included: ``N`` minus the largest group, plus one."""
        return int(groups.numel() - torch.bincount(groups).max() + 1)

    def relatable(self, images: int, rows: int) -> bool:
        """Whether :meth:`relation_terms` can be formed on ``rows`` views of ``images`` images: two rows at least
        (every loss of :mod:`raml.losses` relates pairs). A subclass needing more says so."""
        return rows >= 2

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        """``(N, D)`` student, ``(N, D)`` teacher, ``(N,)`` image of each row -> terms with ``"total"`` (means)."""
        raise NotImplementedError

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:
        student, teacher = self.view_embeddings(batch, generator)
        b, p = student.shape[:2]
        if b == 0 or not self.relatable(b, b * p):
            return self._no_relations(student, b, p)
        groups = torch.arange(b, device=student.device).repeat_interleave(p)
        terms = self.relation_terms(student.flatten(0, 1), teacher.flatten(0, 1), groups)
        loss = terms["total"] * b
        # detached device tensors: no host-device sync per batch (the trainer reads them every --print-freq)
        logged = {
            "loss": loss.detach(),
            **{name: value.detach() * b for name, value in terms.items() if name != "total"},
        }
        return BatchLoss(loss, logged, b)

    def _no_relations(self, student: torch.Tensor, images: int, views: int) -> BatchLoss:
        """A zero loss for a batch without relations, still on the student's graph (its backward gives zero
        gradients, so that every process of a distributed run takes part in the all-reduce). Also the loss of a
        process whose share of the batch is empty (``images == 0``, no warning: the processes that hold the
        batch's images warn if it is too small for them)."""
        if images and not self._warned_no_relations:
            self._warned_no_relations = True
            logger.warning(
                "A batch of %d image(s) x %d view(s) is too small for the relations of %s; it contributes a zero "
                "loss (this warning is given once per run). Use a --batch-size and --query-size for which the "
                "epoch's last batch holds at least 2 images (and 3 views for --mode rkd) to avoid it.",
                images, views, type(self).__name__,
            )  # fmt: skip
        loss = student.sum() * 0.0
        zero = loss.detach()
        return BatchLoss(loss, {"loss": zero, **{name: zero for name in self.term_names}}, images)
