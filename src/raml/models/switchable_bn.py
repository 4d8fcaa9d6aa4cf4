"""Per-resolution BatchNorm statistics: one set of running statistics per query size, chosen by the input.

The idea of resolution-switchable networks: the activations of a network differ in their statistics from
one input resolution to another, so each resolution gets its own BatchNorm running mean and variance (the
affine weights stay shared). Here the statistics are estimated after training
(:func:`raml.retrieval.size_bn.recalibrate_size_bn`: a pass over training images at each size, cumulative
averages; a procedure over data, so it lives with extraction, not with the network), because
raml trains students with frozen statistics (``student_train_mode``): during distillation every size uses
the statistics the student started from, so per-size statistics can only come from a re-estimation.

Tensor contract: unchanged, ``(B, 3, H, W)`` -> ``(B, D)``. A forward pre-hook on the network reads the
input's side: a square input of a size with its own statistics (``H == W == S``, ``S`` in
``meta["bn_sizes"]``) is normalised with them; any other input with the shared statistics (the usual
``running_mean``/``running_var``). Training mode (statistics updated from the batch) is unaffected.

Checkpoint format (``save_checkpoint`` stores it as is): ``meta["bn_sizes"]`` lists the sizes, and every
BatchNorm layer ``<layer>`` has, besides its usual keys, ``<layer>.running_mean_s<S>`` and
``<layer>.running_var_s<S>`` for each size ``S`` (e.g. ``backbone.layer1.0.bn1.running_mean_s24``).
:func:`raml.models.load_network` rebuilds such a network (it calls :func:`enable_size_bn` before loading the
weights). Loading the state dict into a plain network (``build_network(...).load_state_dict``) fails with
``Unexpected key(s)`` naming those keys; :func:`strip_size_bn` gives the plain state dict (shared statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BN_SIZES_KEY",
    "SwitchableBatchNorm2d",
    "enable_size_bn",
    "size_bn_sizes",
    "switchable_layers",
    "strip_size_bn",
]

#: the ``meta`` key listing the sizes with their own BatchNorm statistics
BN_SIZES_KEY = "bn_sizes"
_SUFFIX = "_s"


class SwitchableBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` with extra running statistics per input size (buffers ``running_mean_s<S>``...).

    ``active_size`` (set by the network's pre-hook) selects the statistics used in eval mode; None or a size
    without its own statistics uses the shared ones.
    """

    sizes: tuple[int, ...]
    active_size: int | None

    def add_sizes(self, sizes: Sequence[int]) -> None:
        """Register statistics for ``sizes``, initialised to copies of the shared ones."""
        existing = set(getattr(self, "sizes", ()))
        for size in sizes:
            if size in existing:
                continue
            self.register_buffer(f"running_mean{_SUFFIX}{size}", self.running_mean.detach().clone())
            self.register_buffer(f"running_var{_SUFFIX}{size}", self.running_var.detach().clone())
        self.sizes = tuple(sorted(existing | {int(s) for s in sizes}))
        self.active_size = None

    def stats_for(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance of ``size``."""
        return getattr(self, f"running_mean{_SUFFIX}{size}"), getattr(self, f"running_var{_SUFFIX}{size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.active_size is None or self.active_size not in self.sizes:
            return super().forward(x)
        mean, var = self.stats_for(self.active_size)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def switchable_layers(network: nn.Module) -> list[SwitchableBatchNorm2d]:
    """The network's per-size BatchNorm layers, in module order (empty for a plain network)."""
    return [m for m in network.modules() if isinstance(m, SwitchableBatchNorm2d)]


def _select_size(network: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0]
    side = int(x.shape[-1]) if x.shape[-1] == x.shape[-2] else None
    for layer in switchable_layers(network):
        layer.active_size = side


def enable_size_bn(network: nn.Module, sizes: Sequence[int]) -> nn.Module:
    """Give every ``BatchNorm2d`` of ``network`` statistics per size (in place) and record ``meta["bn_sizes"]``.

    The new statistics start as copies of the shared ones (so the network computes what it did); fill them
    with :func:`raml.retrieval.size_bn.recalibrate_size_bn`, or load a checkpoint's. Calling it again adds sizes.

    Returns:
        ``network`` itself.
    """
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive image sides, got {sizes}.")
    layers = [m for m in network.modules() if type(m) is nn.BatchNorm2d or isinstance(m, SwitchableBatchNorm2d)]
    if not layers:
        raise ValueError("The network has no BatchNorm2d layer: per-size statistics would change nothing.")
    for layer in layers:
        if not isinstance(layer, SwitchableBatchNorm2d):
            layer.__class__ = SwitchableBatchNorm2d
        layer.add_sizes(sizes)
    if not getattr(network, "_size_bn_hook", None):
        network._size_bn_hook = network.register_forward_pre_hook(_select_size)
    meta = getattr(network, "meta", None)
    if isinstance(meta, dict):
        meta[BN_SIZES_KEY] = sorted(set(meta.get(BN_SIZES_KEY, [])) | set(sizes))
    return network


def size_bn_sizes(network: nn.Module) -> list[int]:
    """The sizes with their own BatchNorm statistics (empty for a plain network)."""
    layers = switchable_layers(network)
    return list(layers[0].sizes) if layers else []


def strip_size_bn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without per-size statistics: what a plain network loads (shared statistics)."""
    return {
        k: v
        for k, v in state_dict.items()
        if not any(k.rsplit(".", 1)[-1].startswith(f"running_{s}{_SUFFIX}") for s in ("mean", "var"))
    }
