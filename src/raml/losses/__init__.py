"""Losses: embeddings -> scalar. They take embeddings (and masks), never images or a model.

- :func:`distillation_loss`, :func:`distillation_loss_terms`: ``(B, P, D)`` student/teacher -> scalar
  (``ts_aug``).
- :func:`absolute_loss`: ``(B, D)`` student/teacher -> scalar (``ts_reg``).
- :func:`triplet_loss`: anchor ``(B, D)``, positives ``(B, P, D)``, negatives ``(B, N, D)`` -> scalar
  (``sym``).
- :func:`normalized_softmax_loss`: ``(B, D)`` embeddings, labels, ``(C, D)`` proxies -> scalar (``sym`` with
  ``--loss normsoftmax``).
- :func:`aml_contrastive_loss`, :func:`rkd_loss`, :func:`csd_loss`, :func:`d3_loss`, :func:`rop_loss`: student
  ``(N, D)`` and teacher ``(N, D)`` embeddings of the same images, optional ``(N,)`` groups (the image of each
  view: its other views are left out of the relations) -> scalar (or a dict of terms with ``"total"``): the
  other asymmetric distillers (``--mode aml``, ``rkd``, ``csd``, ``d3``, ``rop``).
- :func:`ugd_loss`: student/teacher ``(N, D)`` embeddings plus per-granularity region features ``(N, R, D)``
  and masks ``(N, R)`` -> dict of terms (``--mode ugd``).
"""

from __future__ import annotations

from raml.losses.aml import aml_contrastive_loss
from raml.losses.csd import csd_loss
from raml.losses.d3 import d3_loss
from raml.losses.distillation import absolute_loss, distillation_loss, distillation_loss_terms
from raml.losses.proxy import normalized_softmax_loss
from raml.losses.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss
from raml.losses.rop import rop_loss
from raml.losses.triplet import triplet_loss
from raml.losses.ugd import ugd_loss

__all__ = [
    "absolute_loss",
    "aml_contrastive_loss",
    "csd_loss",
    "d3_loss",
    "distillation_loss",
    "distillation_loss_terms",
    "normalized_softmax_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "rop_loss",
    "triplet_loss",
    "ugd_loss",
]
