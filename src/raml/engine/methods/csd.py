"""``--mode csd``: contextual similarity distillation (Wu et al., CVPR 2022), without labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`), the teacher online on its DR views. The
context of each view is its ``--csd-k`` nearest neighbours among the teacher's embeddings of the batch's views (at
most all of them), the other views of its own image left out. Loss: :func:`raml.losses.csd_loss` with
``--csd-temperature`` and ``--csd-first-order-weight``.
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.coupled import BatchRelationMethod
from raml.losses import csd_loss


class ContextualSimilarityDistillation(BatchRelationMethod):
    """Student similarities to the teacher's nearest neighbours matched to the teacher's (KL) + first order."""

    reads = BatchRelationMethod.reads | {"csd_k", "csd_temperature", "csd_first_order_weight"}

    term_names = ("context", "first_order")

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        c = self.run.config
        k = min(c.csd_k, self.candidates(groups))
        return csd_loss(student, teacher, k, c.csd_temperature, c.csd_first_order_weight, groups)
