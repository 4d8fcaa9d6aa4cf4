"""Embedding networks: backbone (torchvision / timm) -> pooling -> whitening -> embedding; checkpoints, zoo.

Tensor contract: ``(B, 3, H, W)`` float images normalised with ``network.mean``/``network.std``
-> ``(B, D)`` L2-normalised embeddings.

Entry points: ``build_network`` for a fresh network, ``load_network`` for a checkpoint file, a cached name
or a published name, ``save_checkpoint`` to write one.
"""

from __future__ import annotations

from raml.models.backbones import (
    Backbone,
    DownloadError,
    build_backbone,
    resolve_timm_weights,
    resolve_torchvision_weights,
)
from raml.models.checkpoints import (
    PUBLISHED_NETWORKS,
    CheckpointError,
    checkpoint_sha256,
    infer_meta,
    load_checkpoint_file,
    load_network,
    network_from_checkpoint,
    resolve_network_path,
    save_checkpoint,
)
from raml.models.network import EmbeddingNetwork, build_network
from raml.models.pooling import POOLINGS, build_pooling

__all__ = [
    "POOLINGS",
    "PUBLISHED_NETWORKS",
    "Backbone",
    "CheckpointError",
    "DownloadError",
    "EmbeddingNetwork",
    "build_backbone",
    "build_network",
    "build_pooling",
    "checkpoint_sha256",
    "infer_meta",
    "load_checkpoint_file",
    "load_network",
    "network_from_checkpoint",
    "resolve_network_path",
    "resolve_timm_weights",
    "resolve_torchvision_weights",
    "save_checkpoint",
]
