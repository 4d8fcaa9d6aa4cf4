"""``--mode rop``: rank order preservation (Wu et al., ICLR 2023), without labels.

Batches: ts_aug's coupled views (:mod:`raml.engine.methods.coupled`), the teacher online on its DR views; the
batch's teacher embeddings (the other views of a view's own image left out) are the gallery whose top-k ranking
the student must keep. Loss: :func:`raml.losses.rop_loss` with ``--rop-k`` (at most the gallery's size),
``--rop-temperature`` and ``--rop-rank-weight``.
"""

from __future__ import annotations

from typing import Any

import torch

from raml.engine.methods.coupled import BatchRelationMethod
from raml.losses import rop_loss


class RankOrderPreservation(BatchRelationMethod):
    """The student's similarities to the teacher's top-k, as a soft ranking, matched to the teacher's ranking."""

    reads = BatchRelationMethod.reads | {"rop_k", "rop_temperature", "rop_rank_weight"}

    def relation_terms(self, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        c = self.run.config
        k = min(c.rop_k, self.candidates(groups))
        return {"total": rop_loss(student, teacher, k, c.rop_temperature, c.rop_rank_weight, groups)}
