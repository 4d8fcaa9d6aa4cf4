"""Embed image files with a network at one size, optionally sharded over several devices.

Contract: ``embed_images(network, paths, S, devices)`` -> ``(N, D)`` float32 numpy rows in path order, each
image through the evaluation transform (:mod:`raml.retrieval.extract`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from raml.retrieval.extract import extract_embeddings

logger = logging.getLogger(__name__)

__all__ = ["embed_images"]


def _cpu_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` whose parameters and buffers are on the CPU, made without copying any of
    them on their own device (each tensor is moved to the CPU, then the module structure is copied)."""
    memo: dict[int, object] = {}
    for param in network.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to("cpu", copy=True), requires_grad=param.requires_grad)
    for buffer in network.buffers():
        memo[id(buffer)] = buffer.detach().to("cpu", copy=True)
    return copy.deepcopy(network, memo)


def embed_images(
    network: nn.Module,
    paths: Sequence[str],
    image_size: int,
    devices: Sequence[torch.device],
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    description: str = "embed",
) -> np.ndarray:
    """Embed ``paths`` at ``image_size``, sharding contiguous chunks over ``devices`` (one thread each).

    Args:
        network: ``(B, 3, S, S)`` -> ``(B, D)`` L2-normalised, on ``devices[0]``; copies are made for the
            other devices.
        paths: Image files; the rows follow this order.
        image_size: S.
        devices: Devices to use (several CUDA devices shard the work; a single entry runs in this thread).
        batch_size: Images per forward pass.
        workers: DataLoader workers per device.
        progress: Show progress bars.
        description: Label of the progress bar.

    Returns:
        ``(N, D)`` float32 embeddings.
    """
    if not devices:
        raise ValueError("embed_images needs at least one device.")
    paths = [str(p) for p in paths]
    shards = min(len(devices), len(paths))
    if shards <= 1:
        return extract_embeddings(
            network, paths, image_size, devices[0], batch_size, workers, progress, description
        ).numpy()
    bounds = np.linspace(0, len(paths), shards + 1).astype(int)
    # The replicas are built here, before any thread starts, from one CPU copy: a deep copy of the CUDA
    # model would first land on its GPU (GPU 0) and only then move, once per replica.
    template = _cpu_copy(network)
    replicas = [network] + [copy.deepcopy(template).to(device) for device in devices[1:shards]]
    del template
    results: list[np.ndarray | None] = [None] * shards
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = extract_embeddings(
                replicas[i],
                paths[bounds[i] : bounds[i + 1]],
                image_size,
                devices[i],
                batch_size,
                workers,
                progress and i == 0,
                f"{description} [{devices[i]}]",
            ).numpy()
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), name=f"raml-embed-{i}") for i in range(shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    logger.info("Embedded %d images on %d devices", len(paths), shards)
    return np.concatenate(results)  # type: ignore[arg-type]
