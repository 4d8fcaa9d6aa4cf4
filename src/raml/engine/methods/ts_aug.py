"""``--mode ts_aug``, the paper's method: coupled views, mixup, absolute + relative distillation terms.

Batches: :mod:`raml.engine.methods.coupled` (student views at ``--image-size`` QR, teacher views at
``--teacher-image-size`` DR). Loss: :func:`raml.losses.distillation_loss_terms` over the ``P`` views of each
image (absolute + ``--lam-1`` x relative_1 + ``--lam-2`` x relative_2), summed over the images. No labels.
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.base import BatchLoss
from raml.engine.methods.coupled import CoupledViewMethod
from raml.losses import distillation_loss_terms

#: logged name -> the term of raml.losses.distillation_loss_terms
_LOGGED = {"loss": "total", "absolute": "absolute", "relative_1": "relative_1", "relative_2": "relative_2"}


class CoupledViewDistillation(CoupledViewMethod):
    """The paper's distillation loss over the coupled views of each image."""

    searched = ("lr", "lam_1", "lam_2")  # the reference's search space (optimize.py)
    reads = CoupledViewMethod.reads | {"lam_1", "lam_2"}

    def batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:
        c = self.run.config
        student, teacher = self.view_embeddings(batch, generator)
        terms = distillation_loss_terms(student, teacher, c.lam_1, c.lam_2)
        # detached device tensors: no host-device sync per batch (the trainer reads them every --print-freq)
        logged = {name: terms[key].detach() for name, key in _LOGGED.items()}
        return BatchLoss(terms["total"], logged, student.shape[0])
