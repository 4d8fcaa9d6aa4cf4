"""``--mode aml``: asymmetric metric learning (Budnik & Avrithis, CVPR 2021), without labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`; mixup unless ``--no-mixup``), the teacher
online on its DR views. Loss (``--aml-variant``): ``contrastive`` (default),
:func:`raml.losses.aml_contrastive_loss` with margin ``--aml-margin``: each student view against the teacher's
embedding of the same view (positive) and the teacher's embeddings of the other images' views (negatives; the other
views of the same image are neither, as in every relational method); or ``regression``, the paper's plain
regression :func:`raml.losses.absolute_loss` (``ts_reg``'s term, here on the views).
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.coupled import BatchRelationMethod
from raml.losses import absolute_loss, aml_contrastive_loss


class AsymmetricMetricLearning(BatchRelationMethod):
    """Student queries against teacher anchors: contrastive with a margin, or plain regression."""

    reads = BatchRelationMethod.reads | {"aml_variant", "aml_margin"}

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        c = self.run.config
        if c.aml_variant == "regression":
            return {"total": absolute_loss(student, teacher) / student.shape[0]}
        return {"total": aml_contrastive_loss(student, teacher, c.aml_margin, groups)}
