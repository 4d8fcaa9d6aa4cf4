"""``--student-path NETWORK | --student ARCH`` style flags and how they become networks."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from raml.models import build_network, load_network


def add_network_args(parser: argparse.ArgumentParser, role: str, required: bool) -> None:
    """Add the seed's mutually exclusive ``--<role>-path NETWORK`` / ``--<role> ARCH`` pair."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        f"--{role}-path",
        metavar="NETWORK",
        help=f"{role} checkpoint: a file, a name in <data-root>/networks/, or a published model name",
    )
    group.add_argument(
        f"--{role}",
        metavar="ARCH",
        help=f"{role} built from a torchvision/timm architecture name (ImageNet weights unless --not-pretrained)",
    )


def network_from_args(
    path: str | None,
    architecture: str | None,
    data_root: str | Path,
    device: torch.device,
    pooling: str = "gem",
    whitening: int = 0,
    pretrained: bool = True,
) -> tuple[torch.nn.Module, Path | None]:
    """Load a checkpoint (``path``) or build an architecture; returns the network and its checkpoint file."""
    if path is not None:
        network = load_network(path, data_root=data_root, device=device)
        return network, getattr(network, "source_path", None)
    if architecture is None:
        raise ValueError("Give either a checkpoint (--*-path) or an architecture name.")
    network = build_network(architecture, pooling=pooling, whitening=whitening, pretrained=pretrained)
    return network.to(device).eval(), None
