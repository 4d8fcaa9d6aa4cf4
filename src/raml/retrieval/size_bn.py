"""Per-size BatchNorm statistics estimated on images: the procedure over data behind
:mod:`raml.models.switchable_bn` (which defines the layers and knows no data).

Contract: a network ``(B, 3, H, W) -> (B, D)`` and image files -> the same network with one set of BatchNorm
running statistics per size (:func:`raml.models.switchable_bn.enable_size_bn`), estimated by one pass of the
images through the evaluation transform at that size; and the same for a checkpoint file, in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from raml.data.datasets import ImageDataset
from raml.data.images import EvalTransform
from raml.models.checkpoints import _RESERVED_KEYS, load_checkpoint_file, network_from_checkpoint, save_checkpoint
from raml.models.switchable_bn import enable_size_bn, switchable_layers
from raml.retrieval.extract import loader_workers

logger = logging.getLogger(__name__)

__all__ = ["recalibrate_checkpoint", "recalibrate_size_bn"]


@torch.no_grad()
def recalibrate_size_bn(
    network: nn.Module,
    paths: Sequence[str | Path],
    sizes: Sequence[int],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Estimate each size's BatchNorm statistics on ``paths`` (evaluation transform at that size).

    Per size: every BatchNorm layer runs in training mode with a cumulative average (``momentum=None``) over
    one pass of the images, only the statistics change (no gradients), and the result is stored as that
    size's statistics; the shared statistics and the weights are left as they were.

    Returns:
        ``network`` (with :func:`enable_size_bn` applied), in eval mode.
    """
    enable_size_bn(network, sizes)
    network.eval()
    layers = switchable_layers(network)
    shared = [
        (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone(), layer.momentum)
        for layer in layers
    ]
    mean, std = network.meta["mean"], network.meta["std"]
    try:
        for size in sizes:
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None
                layer.train()
            dataset = ImageDataset(paths, None, EvalTransform(size, mean, std))
            loader = DataLoader(
                dataset, batch_size=batch_size, num_workers=loader_workers(workers, len(dataset), batch_size)
            )
            for images, _ in tqdm(loader, desc=f"BN statistics @{size}", disable=not progress, leave=False):
                network(images.to(device))
            for layer in layers:
                size_mean, size_var = layer.stats_for(size)
                size_mean.copy_(layer.running_mean)
                size_var.copy_(layer.running_var)
    finally:
        for layer, (m, v, n, momentum) in zip(layers, shared, strict=True):
            layer.running_mean.copy_(m)
            layer.running_var.copy_(v)
            layer.num_batches_tracked.copy_(n)
            layer.momentum = momentum
        network.eval()
    logger.info("Per-size BatchNorm statistics estimated at %s on %d images", list(sizes), len(paths))
    return network


def recalibrate_checkpoint(
    path: str | Path,
    paths: Sequence[str | Path],
    sizes: Sequence[int],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> None:
    """Add per-size BatchNorm statistics (estimated on ``paths``) to the checkpoint file ``path``, in place.

    Everything else in the file (training state, ``raml`` records) is kept; the file is replaced atomically.
    """
    checkpoint = load_checkpoint_file(path)
    network = network_from_checkpoint(checkpoint, str(path)).to(device)
    recalibrate_size_bn(network, paths, sizes, device, batch_size=batch_size, workers=workers, progress=progress)
    extra = {k: v for k, v in checkpoint.items() if k not in _RESERVED_KEYS}
    save_checkpoint(
        path,
        network.cpu(),
        epoch=checkpoint.get("epoch"),
        max_map=checkpoint.get("max_map"),
        optimizer=checkpoint.get("optimizer"),
        scheduler=checkpoint.get("scheduler"),
        extra=extra,
    )
