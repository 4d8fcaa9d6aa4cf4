"""Loader workers of a CUDA extraction start with forkserver (issue 23, item 11), tested on the CPU.

The extraction is run on the CPU with ``worker_start_method`` told the network is on CUDA, and the
``DataLoader`` it builds is recorded, so the start method it would get on a GPU machine is checked here.
"""

from __future__ import annotations

import torch
from torch import nn

from raml.retrieval import extract
from raml.retrieval.extract import worker_start_method


def test_cuda_with_workers_uses_forkserver_and_everything_else_the_default():
    assert worker_start_method(torch.device("cuda", 1), 4) == "forkserver"
    assert worker_start_method(torch.device("cuda"), 0) is None
    assert worker_start_method(torch.device("cpu"), 4) is None


class _Embed(nn.Module):
    """(B, 3, S, S) -> (B, 3): the mean colour, L2-normalised."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)


def test_extraction_hands_the_start_method_to_its_loader(monkeypatch, image_factory, tmp_path):
    paths = [image_factory(tmp_path / f"{i}.png", color=(10 * i, 50, 90)) for i in range(3)]
    seen: list[object] = []
    real_loader = extract.DataLoader

    def recording_loader(*args, **kwargs):
        seen.append(kwargs.get("multiprocessing_context"))
        kwargs["num_workers"] = 0  # the workers themselves are not under test; keep the run in-process
        kwargs["multiprocessing_context"] = None
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(extract, "DataLoader", recording_loader)
    monkeypatch.setattr(extract, "worker_start_method", lambda device, workers: "forkserver" if workers else None)
    out = extract.extract_embeddings(_Embed(), paths, 16, torch.device("cpu"), workers=2, progress=False)
    assert out.shape == (3, 3)
    assert seen == ["forkserver"]
