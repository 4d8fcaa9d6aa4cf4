"""Query cost of a network at a resolution: FLOPs per image and measured latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (it counts multiply-adds as 2 FLOPs for
matmuls/convolutions); latency is the median wall time of repeated forward passes after warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def gflops_per_image(network: nn.Module, image_size: int, device: torch.device | str = "cpu") -> float:
    """GFLOPs of one forward pass of a single (1, 3, S, S) image."""
    was_training = network.training
    network.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        network(x)
    network.train(was_training)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def latency_ms_per_image(
    network: nn.Module,
    image_size: int,
    device: torch.device,
    batch_size: int = 1,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median milliseconds per image of a forward pass at ``batch_size`` (synchronising CUDA)."""
    was_training = network.training
    network.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        network(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    network.train(was_training)
    return statistics.median(times) * 1000.0 / batch_size
