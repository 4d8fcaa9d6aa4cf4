"""``--mode rkd``: relational knowledge distillation (Park et al., CVPR 2019), without labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`), the teacher online on its DR views; the
relations are those of the batch's views, between different images (an image's other views are left out). Loss:
:func:`raml.losses.rkd_loss`, ``--rkd-distance-weight`` x distance-wise + ``--rkd-angle-weight`` x angle-wise.
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.coupled import BatchRelationMethod
from raml.losses import rkd_loss


class RelationalDistillation(BatchRelationMethod):
    """Distance- and angle-wise relations of the batch's student embeddings matched to the teacher's."""

    reads = BatchRelationMethod.reads | {"rkd_distance_weight", "rkd_angle_weight"}

    term_names = ("distance", "angle")

    def relatable(self, images: int, rows: int) -> bool:
        """Two images (a distance between different images) and three rows (a triangle) at least."""
        return images >= 2 and rows >= 3

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        c = self.run.config
        return rkd_loss(student, teacher, c.rkd_distance_weight, c.rkd_angle_weight, groups)
