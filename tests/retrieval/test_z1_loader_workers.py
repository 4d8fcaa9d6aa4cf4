"""Evaluation loaders start no more worker processes than they have batches (a DataLoader starts all
``num_workers`` processes, each importing torch, however few images it loads): ``loader_workers``'s
arithmetic, and the count the extraction's and the BatchNorm recalibration's loaders are built with."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from raml.retrieval import extract, size_bn
from raml.retrieval.extract import loader_workers


@pytest.mark.parametrize(
    ("workers", "items", "batch_size", "expected"),
    [
        (16, 1, 32, 1),  # one query: one batch, one worker
        (16, 64, 32, 2),  # exactly two batches
        (16, 65, 32, 3),  # a partial last batch is a batch
        (4, 1000, 32, 4),  # more batches than workers: unchanged
        (3, 96, 32, 3),  # as many batches as workers: unchanged
        (0, 1000, 32, 0),  # in-process loading stays in-process
        (8, 0, 32, 0),  # nothing to load: no workers
    ],
)
def test_workers_are_capped_at_the_number_of_batches(workers, items, batch_size, expected):
    assert loader_workers(workers, items, batch_size) == expected


def test_the_cap_is_logged_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger=extract.logger.name):
        loader_workers(16, 1, 32)
        loader_workers(2, 100, 32)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "16 loader workers" in messages[0]
    assert caplog.records[0].levelno == logging.DEBUG


def _recording(module, monkeypatch) -> list[int]:
    """Replace ``module.DataLoader`` by one that records ``num_workers`` and then loads in-process."""
    seen: list[int] = []
    real_loader = module.DataLoader

    def recording_loader(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        kwargs["num_workers"] = 0  # the workers themselves are not under test; keep the run in-process
        kwargs.pop("multiprocessing_context", None)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(module, "DataLoader", recording_loader)
    return seen


class _Embed(nn.Module):
    """(B, 3, S, S) -> (B, 3): the mean colour, L2-normalised."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)


def test_extraction_of_three_images_in_batches_of_two_starts_two_workers(monkeypatch, image_factory, tmp_path):
    paths = [image_factory(tmp_path / f"{i}.png", color=(10 * i, 50, 90)) for i in range(3)]
    seen = _recording(extract, monkeypatch)
    out = extract.extract_embeddings(_Embed(), paths, 16, torch.device("cpu"), batch_size=2, workers=16, progress=False)
    assert out.shape == (3, 3)
    assert seen == [2]


def test_batchnorm_recalibration_of_one_image_starts_one_worker(monkeypatch, image_factory, tmp_path):
    paths = [str(image_factory(tmp_path / "0.png", color=(10, 50, 90)))]
    network = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    network.meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    seen = _recording(size_bn, monkeypatch)
    size_bn.recalibrate_size_bn(network, paths, [16, 24], torch.device("cpu"), batch_size=8, workers=16)
    assert seen == [1, 1]
