"""Embedding extraction: a network and a list of images -> an (N, D) float32 matrix, rows in list order.

Images go through the evaluation transform (Lanczos resize of the shorter side to S + S/7, centre crop S)
with the network's own mean/std, in batches, on the device the caller chose.
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
from raml.distributed import DistContext, all_gather_rows, shard_bounds

logger = logging.getLogger(__name__)


def network_mean_std(network: nn.Module) -> tuple[list[float], list[float]]:
    """The input normalisation a network was trained with (its ``meta``), ImageNet defaults otherwise."""
    meta = getattr(network, "meta", {}) or {}
    mean = list(meta.get("mean", (0.485, 0.456, 0.406)))
    std = list(meta.get("std", (0.229, 0.224, 0.225)))
    return mean, std


@torch.inference_mode()
def extract_embeddings(
    network: nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    description: str = "extract",
) -> torch.Tensor:
    """Embed images with ``network`` at ``image_size``.

    Args:
        network: maps (B, 3, S, S) -> (B, D) L2-normalised embeddings; already on ``device``.
        paths: image files; the output rows follow this order.
        image_size: S, the side of the centre crop.
        device: where the network runs.
        batch_size: images per forward pass.
        workers: DataLoader worker processes (0 = load in this process).
        progress: show a progress bar.
        description: label of the progress bar.

    Returns:
        (N, D) float32 tensor on the CPU.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
    mean, std = network_mean_std(network)
    dataset = ImageDataset(list(paths), None, EvalTransform(image_size, mean, std))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    was_training = network.training
    network.eval()
    chunks: list[torch.Tensor] = []
    try:
        for images, _ in tqdm(loader, desc=description, unit="batch", disable=not progress, leave=False):
            embeddings = network(images.to(device, non_blocking=True))
            chunks.append(embeddings.float().cpu())
    finally:
        network.train(was_training)
    if not chunks:
        raise ValueError("No images to embed: the list of paths is empty.")
    return torch.cat(chunks)


def extract_embeddings_sharded(
    network: nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    device: torch.device,
    dist: DistContext,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    description: str = "extract",
) -> torch.Tensor:
    """:func:`extract_embeddings` split over ``torchrun`` processes: each embeds a contiguous share of
    ``paths`` and every process receives all (N, D) rows, in ``paths`` order (a collective call)."""
    if not dist.enabled:
        return extract_embeddings(network, paths, image_size, device, batch_size, workers, progress, description)
    start, stop = shard_bounds(len(paths), dist)
    if start < stop:
        local = extract_embeddings(
            network, list(paths)[start:stop], image_size, device, batch_size, workers, progress, description
        )
    else:
        local = torch.zeros(0, int(getattr(network, "meta", {})["outputdim"]))
    # nccl gathers device tensors; gloo is happy either way
    return all_gather_rows(local.to(device), dist).cpu()
