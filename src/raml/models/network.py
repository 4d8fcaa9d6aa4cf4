"""The embedding network: backbone -> global pooling -> L2 -> optional whitening -> L2.

Tensor contract: ``(B, 3, H, W)`` float, normalised with ``network.mean``/``network.std``
-> ``(B, D)`` L2-normalised embedding, D = ``network.output_dim``.

Submodules are named ``backbone``, ``pool`` and ``whiten`` so that state-dict keys are
``backbone.<...>``, ``pool.p``, ``whiten.weight``, ``whiten.bias``, the layout of the published
checkpoints. ``network.meta`` carries what is needed to rebuild the network (architecture, pooling,
whitening dimension, mean, std, output dimension) as plain Python values, and which ImageNet weights
initialised it (``pretrained_weights``, e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``, None for random ones).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raml.models.backbones import build_backbone
from raml.models.pooling import build_pooling

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingNetwork", "build_network"]


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` along dim 1: the reference's normalisation, kept exactly so that published
    checkpoints give the reference's embeddings (``F.normalize`` divides by ``max(||x||, eps)`` instead)."""
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


class EmbeddingNetwork(nn.Module):
    """Image -> L2-normalised global descriptor.

    Args:
        backbone: Maps ``(B, 3, H, W)`` -> ``(B, C, h, w)``.
        pool: Maps ``(B, C, h, w)`` -> ``(B, C)``.
        whiten: Optional ``nn.Linear(C, D, bias=True)`` applied after the first normalisation.
        meta: Plain-Python description of the network (see ``build_network``).
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, whiten: nn.Linear | None, meta: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.whiten = whiten
        self.meta: dict[str, Any] = dict(meta)
        self.source_path: Path | None = None

    @property
    def output_dim(self) -> int:
        """Embedding dimension D."""
        return int(self.meta["outputdim"])

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel input mean (RGB, inputs in [0, 1])."""
        return tuple(float(v) for v in self.meta["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel input standard deviation."""
        return tuple(float(v) for v in self.meta["std"])  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of normalised images ``(B, 3, H, W)`` -> ``(B, D)`` L2-normalised."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"EmbeddingNetwork expects a batch of RGB images of shape (B, 3, H, W), got "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) and convert images to RGB."
            )
        descriptor = l2_normalize(self.pool(self.backbone(x)))
        if self.whiten is not None:
            descriptor = l2_normalize(self.whiten(descriptor))
        return descriptor

    def extra_repr(self) -> str:
        return f"architecture={self.meta.get('architecture')!r}, outputdim={self.meta.get('outputdim')}"


def build_network(
    architecture: str,
    pooling: str = "gem",
    whitening: int = 512,
    pretrained: bool = True,
    pretrained_weights: str = "v1",
) -> EmbeddingNetwork:
    """Build an embedding network.

    Args:
        architecture: torchvision or timm model name (see ``raml.models.build_backbone``).
        pooling: Global pooling, one of ``raml.models.pooling.POOLINGS``.
        whitening: Output dimension of the whitening layer; 0 for none (D = backbone channels).
        pretrained: Initialise the backbone with ImageNet weights.
        pretrained_weights: Which ImageNet weights: ``"v1"`` (the reference's: torchvision's
            ``IMAGENET1K_V1``), ``"default"``, a torchvision weights name or a timm tag (see
            ``raml.models.build_backbone``). Recorded, resolved, in ``meta["pretrained_weights"]``.

    Returns:
        The network, in training mode, on the CPU.

    Raises:
        ValueError: For an unknown architecture, pooling or weights, or a negative whitening dimension.
        DownloadError: If the ImageNet weights cannot be downloaded.
    """
    if isinstance(whitening, bool) or not isinstance(whitening, int) or whitening < 0:
        raise ValueError(
            f"whitening must be a non-negative int (the output dimension, 0 for no whitening), got {whitening!r}."
        )
    backbone = build_backbone(architecture, pretrained=pretrained, pretrained_weights=pretrained_weights)
    pool = build_pooling(pooling, backbone.channels)
    whiten = nn.Linear(backbone.channels, whitening, bias=True) if whitening > 0 else None
    meta = {
        "architecture": architecture,
        "pooling": pooling.lower(),
        "whitening": int(whitening),
        "mean": [float(v) for v in backbone.mean],
        "std": [float(v) for v in backbone.std],
        "outputdim": int(whitening) if whitening > 0 else int(backbone.channels),
        "pretrained": bool(pretrained),
        "pretrained_weights": backbone.weights,
    }
    return EmbeddingNetwork(backbone.module, pool, whiten, meta)
