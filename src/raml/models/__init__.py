"""Embedding networks: backbone (torchvision / timm) -> pooling -> whitening -> embedding; checkpoints, zoo.

Tensor contract: ``(B, 3, H, W)`` float images normalised with ``network.mean``/``network.std``
-> ``(B, D)`` L2-normalised embeddings.

Entry points: ``build_network`` for a fresh network, ``load_network`` for a checkpoint file, a cached name
or a published name, ``save_checkpoint`` to write one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raml import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and tests/test_layering.py
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

# name -> the module that defines it; imported on first use (module __getattr__ below), so that importing
# one submodule (or a light command) does not import every other submodule's dependencies
_EXPORTS: dict[str, str] = {
    "Backbone": "raml.models.backbones",
    "DownloadError": "raml.models.backbones",
    "build_backbone": "raml.models.backbones",
    "resolve_timm_weights": "raml.models.backbones",
    "resolve_torchvision_weights": "raml.models.backbones",
    "PUBLISHED_NETWORKS": "raml.models.checkpoints",
    "CheckpointError": "raml.models.checkpoints",
    "checkpoint_sha256": "raml.models.checkpoints",
    "infer_meta": "raml.models.checkpoints",
    "load_checkpoint_file": "raml.models.checkpoints",
    "load_network": "raml.models.checkpoints",
    "network_from_checkpoint": "raml.models.checkpoints",
    "resolve_network_path": "raml.models.checkpoints",
    "save_checkpoint": "raml.models.checkpoints",
    "EmbeddingNetwork": "raml.models.network",
    "build_network": "raml.models.network",
    "POOLINGS": "raml.models.pooling",
    "build_pooling": "raml.models.pooling",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
