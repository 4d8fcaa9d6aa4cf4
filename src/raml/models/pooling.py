"""Global pooling of a backbone feature map into one descriptor per image.

Tensor contract: ``(B, C, h, w)`` float feature map -> ``(B, C)`` descriptor (not normalised).

- ``gem``: generalized mean with one learnable exponent ``p`` (state-dict key ``p``, shape ``(1,)``):
  ``(mean_{h,w} clamp(x, eps) ** p) ** (1 / p)``.
- ``gemmp``: the same with one learnable exponent per channel (``p`` of shape ``(C,)``).
- ``mac``: global max.  ``spoc``: global average.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["GeM", "GeMmp", "MAC", "SPoC", "POOLINGS", "build_pooling"]


def _check_feature_map(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{name} expects a feature map of shape (B, C, h, w), got a tensor of shape {tuple(x.shape)}; "
            "apply pooling to the backbone output, before any flattening."
        )


class GeM(nn.Module):
    """Generalized-mean pooling with a single learnable exponent.

    Args:
        p: Initial exponent (1 = average pooling, large = max pooling).
        eps: Lower clamp applied before raising to ``p`` (keeps the power defined and differentiable).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM needs a positive initial exponent p, got {p}.")
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, C, h, w)`` -> ``(B, C)``."""
        _check_feature_map(x, "GeM")
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.detach().cpu().tolist()}, eps={self.eps}"


class GeMmp(nn.Module):
    """Generalized-mean pooling with one learnable exponent per channel.

    Args:
        channels: Number of feature-map channels C.
        p: Initial exponent of every channel.
        eps: Lower clamp applied before raising to ``p``.
    """

    def __init__(self, channels: int, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"GeMmp needs a positive number of channels, got {channels}.")
        if p <= 0:
            raise ValueError(f"GeMmp needs a positive initial exponent p, got {p}.")
        self.p = nn.Parameter(torch.full((channels,), float(p)))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, C, h, w)`` -> ``(B, C)``."""
        _check_feature_map(x, "GeMmp")
        if x.shape[1] != self.p.numel():
            raise ValueError(
                f"GeMmp was built for {self.p.numel()} channels but got a feature map with {x.shape[1]}; "
                "build it with the backbone's channel count."
            )
        p = self.p.view(1, -1, 1, 1)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / self.p.view(1, -1))

    def extra_repr(self) -> str:
        return f"channels={self.p.numel()}, eps={self.eps}"


class MAC(nn.Module):
    """Global max pooling (maximum activation of convolutions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, C, h, w)`` -> ``(B, C)``."""
        _check_feature_map(x, "MAC")
        return x.amax(dim=(2, 3))


class SPoC(nn.Module):
    """Global average pooling (sum-pooled convolutional features, up to a constant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, C, h, w)`` -> ``(B, C)``."""
        _check_feature_map(x, "SPoC")
        return x.mean(dim=(2, 3))


def _gem(channels: int) -> nn.Module:
    return GeM()


def _gemmp(channels: int) -> nn.Module:
    return GeMmp(channels)


def _mac(channels: int) -> nn.Module:
    return MAC()


def _spoc(channels: int) -> nn.Module:
    return SPoC()


POOLINGS: dict[str, Callable[[int], nn.Module]] = {
    "gem": _gem,
    "gemmp": _gemmp,
    "mac": _mac,
    "spoc": _spoc,
}
"""Pooling name -> factory taking the backbone channel count."""


def build_pooling(name: str, channels: int) -> nn.Module:
    """Build a pooling layer by name.

    Args:
        name: One of ``POOLINGS`` (``gem``, ``gemmp``, ``mac``, ``spoc``).
        channels: Channel count C of the feature map it will pool.

    Returns:
        A module mapping ``(B, C, h, w)`` -> ``(B, C)``.

    Raises:
        ValueError: If the name is unknown.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in POOLINGS:
        raise ValueError(f"Unknown pooling {name!r}; valid poolings are: {', '.join(sorted(POOLINGS))}.")
    return POOLINGS[key](channels)
