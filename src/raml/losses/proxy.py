"""Normalised-softmax (proxy) loss for the symmetric mode: embeddings + labels + class proxies -> scalar.

Contract: embeddings ``(B, D)`` L2-normalised, labels ``(B,)`` int64 in ``0..C-1``, proxies ``(C, D)`` (any
norm; they are L2-normalised here) -> the SUM over the B images of the cross-entropy of the cosine
similarities to every proxy divided by ``temperature`` (Zhai & Wu, "Classification is a strong baseline for
deep metric learning", BMVC 2019). Unlike the triplet loss it needs no mining and learns quickly from
random weights, which is why the CPU demo trains its teacher with it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def normalized_softmax_loss(embeddings: Tensor, labels: Tensor, proxies: Tensor, temperature: float = 0.05) -> Tensor:
    """Sum over images of ``-log softmax(e . p_c / T)[label]`` with unit-norm proxies ``p_c``."""
    if embeddings.dim() != 2 or proxies.dim() != 2 or embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"Expected embeddings (B, D) and proxies (C, D) with the same D, got {tuple(embeddings.shape)} and "
            f"{tuple(proxies.shape)}."
        )
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"Expected one label per embedding, got {tuple(labels.shape)} for {embeddings.shape[0]}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    logits = embeddings @ F.normalize(proxies, dim=1).T / temperature
    return F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
