"""Shared set-up of the deployment tests."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_and_clean_logging():
    """One torch thread (steadier on a small shared machine); the root logger's handlers, which the CLI's
    setup_logging replaces, are restored afterwards."""
    threads = torch.get_num_threads()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    root.handlers[:] = handlers
    root.setLevel(level)


def _synth_and_networks(base: Path, architecture: str, networks: dict[str, tuple[int, int]]) -> tuple[Path, dict]:
    from raml.data.synth import generate_synthetic_dataset
    from raml.models import build_network, save_checkpoint

    root = base / "data"
    generate_synthetic_dataset(root / "synth", num_classes=8, images_per_class=5, image_size=40)
    nets = {}
    for name, (dim, seed) in networks.items():
        torch.manual_seed(seed)
        nets[name] = base / f"{name}.pth"
        save_checkpoint(nets[name], build_network(architecture, whitening=dim, pretrained=False))
    return root, nets


@pytest.fixture(scope="session")
def synth_and_networks() -> Callable[[Path, str, dict[str, tuple[int, int]]], tuple[Path, dict]]:
    """``make(base, architecture, {name: (whitening dim, torch seed)}) -> (data root, {name: checkpoint path})``:
    the synthetic dataset (synth-test: 4 classes x 5 images, 40 px) under ``base/data`` and one randomly
    initialised checkpoint ``base/<name>.pth`` per network."""
    return _synth_and_networks
