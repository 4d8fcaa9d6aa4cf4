"""``--mode d3``: D3still, decoupled differential distillation (Xie et al., CVPR 2024), without labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`), the teacher online on its DR views; the
batch's teacher embeddings (the other views of a view's own image left out) are the gallery whose top-k orders the
student must keep. Loss: :func:`raml.losses.d3_loss` with ``--d3-k`` (at most the gallery's size), ``--d3-alpha``
(first order), ``--d3-beta`` (hard pairs) and ``--d3-gamma`` (easy pairs).
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.coupled import BatchRelationMethod
from raml.losses import d3_loss


class DecoupledDifferentialDistillation(BatchRelationMethod):
    """First-order term + the teacher's top-k similarity differences, hard and easy pairs weighted apart."""

    reads = BatchRelationMethod.reads | {"d3_k", "d3_alpha", "d3_beta", "d3_gamma"}

    term_names = ("first_order", "hard", "easy")

    def relatable(self, images: int, rows: int) -> bool:
        """Two images at least: a top-k needs ``k >= 2`` rows, and a row ranks only itself and other images."""
        return images >= 2

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        c = self.run.config
        k = min(c.d3_k, self.candidates(groups))
        return d3_loss(student, teacher, k, c.d3_alpha, c.d3_beta, c.d3_gamma, groups)
