"""``--mode d3``: D3still, decoupled differential distillation (Xie et al., CVPR 2024), without labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`), the teacher online on its DR views; the
batch's teacher embeddings are the gallery whose top-k orders the student must keep. Loss:
:func:`raml.losses.d3_loss` with ``--d3-k`` (at most the batch's view count), ``--d3-alpha`` (first order),
``--d3-beta`` (hard pairs) and ``--d3-gamma`` (easy pairs).
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.coupled import BatchRelationMethod
from raml.losses import d3_loss


class DecoupledDifferentialDistillation(BatchRelationMethod):
    """First-order term + the teacher's top-k similarity differences, hard and easy pairs weighted apart."""

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:  # noqa: ARG002
        c = self.run.config
        k = min(c.d3_k, student.shape[0])
        return d3_loss(student, teacher, k, c.d3_alpha, c.d3_beta, c.d3_gamma)
