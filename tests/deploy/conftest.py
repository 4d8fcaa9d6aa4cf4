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


@pytest.fixture(scope="session")
def synth_and_networks(build_once, random_network) -> Callable[[str, dict[str, tuple[int, int]]], tuple[Path, dict]]:
    """``make(architecture, {name: (whitening dim, torch seed)}) -> (data root, {name: checkpoint path})``: the
    synthetic dataset (synth-test: 4 classes x 5 images, 40 px) under the data root and one randomly initialised
    checkpoint per network (:func:`random_network`). Both are made once per session and shared: read them,
    write under the module's own folder."""

    def make(architecture: str, networks: dict[str, tuple[int, int]]) -> tuple[Path, dict]:
        from raml.data.synth import generate_synthetic_dataset

        def data(folder: Path) -> None:
            generate_synthetic_dataset(folder / "synth", num_classes=8, images_per_class=5, image_size=40)

        root = build_once("synth-data", data)
        return root, {name: random_network(architecture, dim, seed) for name, (dim, seed) in networks.items()}

    return make


@pytest.fixture(scope="session")
def indexed_synth_world(build_once, synth_and_networks) -> Callable[[int], dict]:
    """``make(database size) -> world``: generated data (synth-test: 4 classes x 5 images), a 16-d teacher and
    student (resnet18, seeds 0 and 1) and the teacher's index of synth-test at ``database size`` px, the world of
    the service tests; made once per session and size and shared (read it, never write to it). Returns
    ``{"base", "nets", "paths", "teacher", "index"}``, ``base`` the folder that holds the index."""

    def make(database_size: int) -> dict:
        from raml.data import get_split
        from raml.deploy import index_images
        from raml.models import checkpoint_sha256, load_network

        root, nets = synth_and_networks("resnet18", {"teacher": (16, 0), "student": (16, 1)})
        split = get_split("synth-test", root)
        paths = [str(p) for p in split.abspaths()]
        teacher = load_network(nets["teacher"])

        def index(folder: Path) -> None:
            sha = checkpoint_sha256(nets["teacher"])
            labels = list(split.labels)
            index_images(teacher, paths, database_size, folder / "index", sha, labels=labels, dataset=split.name)

        base = build_once(f"synth-index-{database_size}", index)
        return {"base": base, "nets": nets, "paths": paths, "teacher": teacher, "index": base / "index"}

    return make


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
