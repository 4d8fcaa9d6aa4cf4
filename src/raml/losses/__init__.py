"""Losses: embeddings -> scalar. They take embeddings (and masks), never images or a model.

- :func:`distillation_loss`, :func:`distillation_loss_terms`: ``(B, P, D)`` student/teacher -> scalar
  (``ts_aug``).
- :func:`absolute_loss`: ``(B, D)`` student/teacher -> scalar (``ts_reg``).
- :func:`triplet_loss`: anchor ``(B, D)``, positives ``(B, P, D)``, negatives ``(B, N, D)`` -> scalar
  (``sym``).
- :func:`normalized_softmax_loss`: ``(B, D)`` embeddings, labels, ``(C, D)`` proxies -> scalar (``sym`` with
  ``--loss normsoftmax``).
"""

from __future__ import annotations

from raml.losses.distillation import absolute_loss, distillation_loss, distillation_loss_terms
from raml.losses.proxy import normalized_softmax_loss
from raml.losses.triplet import triplet_loss

__all__ = ["absolute_loss", "distillation_loss", "distillation_loss_terms", "normalized_softmax_loss", "triplet_loss"]
