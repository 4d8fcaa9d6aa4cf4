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


def _indexed_synth_world(base: Path, database_size: int) -> dict:
    """Generated data (synth-test: 4 classes x 5 images), a 16-d teacher and student (resnet18, seeds 0 and 1)
    and the teacher's index of synth-test at ``database_size`` px under ``base``: the world of the service tests.
    Returns ``{"base", "nets", "paths", "teacher", "index"}``."""
    from raml.data import get_split
    from raml.deploy import index_images
    from raml.models import checkpoint_sha256, load_network

    root, nets = _synth_and_networks(base, "resnet18", {"teacher": (16, 0), "student": (16, 1)})
    split = get_split("synth-test", root)
    paths = [str(p) for p in split.abspaths()]
    teacher = load_network(nets["teacher"])
    index_dir = base / "index"
    index_images(
        teacher,
        paths,
        database_size,
        index_dir,
        checkpoint_sha256(nets["teacher"]),
        labels=list(split.labels),
        dataset=split.name,
    )
    return {"base": base, "nets": nets, "paths": paths, "teacher": teacher, "index": index_dir}


@pytest.fixture(scope="session")
def indexed_synth_world() -> Callable[[Path, int], dict]:
    """``make(base, database size) -> world``: see :func:`_indexed_synth_world`."""
    return _indexed_synth_world


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(
    scope="module",
    params=[
        pytest.param({"http": "h11", "loop": "asyncio"}, id="h11"),
        pytest.param(
            {"http": "httptools", "loop": "auto"},
            id="httptools",
            marks=pytest.mark.skipif(not _installed("httptools"), reason="httptools is not installed"),
        ),
    ],
)
def front_end(request) -> dict[str, str]:
    """``raml serve``'s HTTP front ends, for :func:`raml.deploy.service.connections.server_options`: h11 on
    asyncio's loop (the pure-Python fallback) and httptools on uvloop where installed (the default)."""
    return request.param
