"""``--mode ugd``: unambiguous granularity distillation (UGD, Neural Networks 2025), with labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`), the teacher online on its DR views, and
the training labels of the batch's images. Loss: :func:`raml.losses.ugd_loss` on:

- the student's and teacher's embeddings of the views (the global term);
- per granularity (grids of ``g = QR // 16`` and ``g // 2`` regions a side, the authors' ``STUDENT_SIZE // 16``
  and half of it): the teacher's last feature map and the student's third stage (the authors'
  ``DISTILLATION_LAYER = 3``: the stage before the last), each average-pooled to ``g x g`` regions. Each teacher
  region goes through the teacher's own head; each student region through a projector of the authors' shape
  (``BatchNorm1d -> Linear(C, D, bias=False) -> BatchNorm1d``, Kaiming init), one per granularity, trained
  with the student and dropped after training;
- the *unambiguous* regions: those the teacher assigns to the view's own class.

What is the authors' and what is ours (docs/methods.md): the loss, the grids, the stage, the projectors and
``alpha = beta = 2`` are AIR-Distiller's (``distillers/UGD.py``). Their teacher has a classification head
(``ClassBlock``: BN, ReLU, Linear to 512, BN, then a linear classifier trained with cross-entropy) and a
region is unambiguous when that classifier's argmax is the label. Our teachers have no classifier: a region's
class is the nearest class prototype, the L2-normalised mean of the teacher's embeddings of each training
class's images (evaluation transform at DR), computed once before the first batch (the teacher is frozen), by
cosine similarity; and "the teacher's head" applied to a region vector is our embedding head (pooling of the
``1 x 1`` region, L2, whitening, L2). AIR-Distiller distils without mixup and adds its cross-entropy and
triplet terms on the student; here, like every view-based method, the views are mixed up as ``ts_aug``'s (a
view keeps its image's label) and the loss is UGD's alone.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raml.distributed import average_gradients_
from raml.engine.methods.base import BatchLoss
from raml.engine.methods.coupled import CoupledViewMethod
from raml.losses import ugd_loss

logger = logging.getLogger(__name__)

#: the stage of the student that is distilled, counted from the end of its trunk (the authors' layer 3 of 4)
STUDENT_STAGE = -2
#: the side of the finer grid: the student's input size divided by this (the authors' ``STUDENT_SIZE // 16``)
GRID_DIVISOR = 16


def _stage(backbone: nn.Module, index: int) -> nn.Module:
    """The backbone's stage ``index`` (from the end): its ``layerN`` modules (timm ResNets), else the items of a
    sequential trunk (torchvision ResNets as :mod:`raml.models.backbones` cuts them)."""
    stages = [module for name, module in backbone.named_modules() if re.fullmatch(r"(.*\.)?layer\d", name)]
    if len(stages) >= 2:
        return stages[index]
    if isinstance(backbone, nn.Sequential) and len(backbone) >= 2:
        return backbone[index]
    raise ValueError(
        "--mode ugd needs a ResNet-like backbone (stages layer1..layer4, or a sequence of stages); got "
        f"{type(backbone).__name__}."
    )


def _channels(stage: nn.Module) -> int:
    norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if norms:
        return int(norms[-1].num_features)
    if convs:
        return int(convs[-1].out_channels)
    raise ValueError(f"Cannot tell the output channels of the stage {type(stage).__name__} for --mode ugd.")


def ugd_projector(channels: int, dim: int, generator: torch.Generator) -> nn.Sequential:
    """AIR-Distiller's projector: BN1d(C) -> Linear(C, D, no bias) -> BN1d(D), Kaiming-normal (fan_out) init."""
    projector = nn.Sequential(nn.BatchNorm1d(channels), nn.Linear(channels, dim, bias=False), nn.BatchNorm1d(dim))
    nn.init.kaiming_normal_(projector[1].weight, a=0, mode="fan_out", generator=generator)
    return projector


def grid_regions(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N * grid * grid, C)``: average-pooled regions, row-major within each image."""
    pooled = F.adaptive_avg_pool2d(feature_map, grid)
    return pooled.flatten(2).transpose(1, 2).reshape(-1, feature_map.shape[1])


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, D)``: the L2-normalised mean embedding of each class."""
    sums = torch.zeros(num_classes, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, labels.to(embeddings.device), embeddings)
    return F.normalize(sums, dim=1)


class UnambiguousGranularityDistillation(CoupledViewMethod):
    """Global + region-level distances, the regions restricted to those the teacher assigns to the label."""

    labels = True
    projectors: nn.ModuleList

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self._warned_single_region = False

    def _networks(self) -> tuple[nn.Module, nn.Module]:
        run = self.run
        teacher = getattr(run.teacher, "network", run.teacher)
        return run.student, teacher

    def grids(self, student_size: int) -> list[int]:
        """The region grids' sides for a student input of ``student_size`` pixels (at least one region)."""
        fine = max(1, student_size // GRID_DIVISOR)
        return [fine, max(1, fine // 2)]

    def add_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        """One projector per granularity, seeded from the run's seed, trained at ``--lr`` with the student."""
        run, c = self.run, self.run.config
        student, teacher = self._networks()
        self._student_stage = _stage(student.backbone, STUDENT_STAGE)
        self._teacher_stage = _stage(teacher.backbone, -1)
        dim = int(teacher.meta["outputdim"])
        generator = torch.Generator().manual_seed(c.seed)
        channels = _channels(self._student_stage)
        self.projectors = nn.ModuleList([ugd_projector(channels, dim, generator) for _ in range(2)]).to(run.device)
        optimizer.add_param_group({"name": "ugd_projectors", "params": list(self.projectors.parameters()), "lr": c.lr})
        self._prototypes: torch.Tensor | None = None

    def prototypes(self) -> torch.Tensor:
        """The teacher's class prototypes ``(K, D)`` on the teacher's device (computed once)."""
        if self._prototypes is None:
            run, c = self.run, self.run.config
            embeddings = run.embed(
                run.teacher, run.train_paths, c.teacher_image_size, run.teacher_device, c.batch_size, c.workers,
                False, "ugd prototypes",
            )  # fmt: skip
            labels = torch.as_tensor(run.train_split.labels)
            self._prototypes = class_prototypes(embeddings.float(), labels, run.train_split.num_classes).to(
                run.teacher_device
            )
        return self._prototypes

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:
        run = self.run
        assert run.teacher is not None and run.teacher_norm is not None
        student_net, teacher_net = self._networks()
        prototypes = self.prototypes()
        labels = torch.as_tensor(run.train_split.labels)[batch[-1]]
        student_views, teacher_views = self._views(batch, generator)
        b, p = student_views.shape[:2]
        labels = labels.repeat_interleave(p)
        maps: dict[str, torch.Tensor] = {}
        hooks = [
            self._student_stage.register_forward_hook(lambda _m, _i, out: maps.__setitem__("student", out)),
            self._teacher_stage.register_forward_hook(lambda _m, _i, out: maps.__setitem__("teacher", out)),
        ]
        try:
            with torch.no_grad():
                teacher = run.teacher(run.teacher_norm(teacher_views.flatten(0, 1))).float()
            student = run.model(run.student_norm(student_views.flatten(0, 1))).float()
        finally:
            for hook in hooks:
                hook.remove()
        self.projectors.train()
        student_regions, teacher_regions, unambiguous = [], [], []
        # a granularity of one region row in all (a batch of one image x one view, a 1 x 1 grid) cannot pass the
        # projector's BatchNorm1d in training: its local term is left out of this batch (0), the projector kept
        # on the graph with a zero weight so that its gradients exist (zero) on every process
        skipped = student.new_zeros(())
        for grid, projector in zip(self.grids(student_views.shape[-1]), self.projectors, strict=True):
            if b * p * grid * grid < 2:
                if b:  # not for a process whose share of the batch is empty
                    self._warn_single_region(b, p)
                skipped = skipped + sum(parameter.sum() for parameter in projector.parameters()) * 0.0
                continue
            with torch.no_grad():
                regions = grid_regions(maps["teacher"].float(), grid)[:, :, None, None]
                t_regions = teacher_net.pool(regions)
                t_regions = F.normalize(t_regions, dim=1)
                if teacher_net.whiten is not None:
                    t_regions = F.normalize(teacher_net.whiten(t_regions), dim=1)
                predicted = (t_regions @ prototypes.T).argmax(dim=1)
                hits = predicted.cpu() == labels.repeat_interleave(grid * grid)
            s_regions = projector(grid_regions(maps["student"].float(), grid))
            student_regions.append(s_regions.view(b * p, grid * grid, -1))
            teacher_regions.append(t_regions.to(run.device).view(b * p, grid * grid, -1))
            unambiguous.append(hits.to(run.device).view(b * p, grid * grid))
        if b == 0:  # this process's share of the batch is empty: a zero loss on the graph (the projectors too)
            zero = student.sum() * 0.0
            loss = zero + skipped
            return BatchLoss(loss, {"loss": loss.detach(), "global": zero.detach(), "local": zero.detach()}, 0)
        terms = ugd_loss(student, teacher.to(run.device), student_regions, teacher_regions, unambiguous)
        loss = (terms["total"] + skipped) * b
        logged = {"loss": loss.detach(), "global": terms["global"].detach() * b, "local": terms["local"].detach() * b}
        return BatchLoss(loss, logged, b)

    def _warn_single_region(self, images: int, views: int) -> None:
        if not self._warned_single_region:
            self._warned_single_region = True
            logger.warning(
                "A batch of %d image(s) x %d view(s) gives a single region per granularity, too few for the "
                "projectors' BatchNorm1d: its local term is left out (0), the global term kept (this warning is "
                "given once per run). Use a --batch-size and --query-size for which the epoch's last batch holds "
                "at least 2 images, or --pos-num 2 or more, to avoid it.",
                images, views,
            )  # fmt: skip

    def before_optimizer_step(self) -> None:
        # the projectors are outside DDP: average their gradients over processes by hand, every process taking
        # part in every all-reduce (a share without an unambiguous region leaves the projectors without gradients)
        average_gradients_(self.projectors.parameters(), self.run.dist)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"ugd_projectors": {k: v.detach().cpu() for k, v in self.projectors.state_dict().items()}}

    def load_checkpoint_state(self, extra: dict[str, Any], path: Path) -> None:
        if "ugd_projectors" not in extra:
            raise ValueError(f"{path} has no UGD projectors; it was not trained with --mode ugd.")
        self.projectors.load_state_dict(extra["ugd_projectors"])
