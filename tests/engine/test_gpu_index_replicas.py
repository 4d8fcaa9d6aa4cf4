"""Multi-device ``raml index`` (issue 23, item 11): the replicas are built before the worker threads start,
from one CPU copy of the network (a deep copy of a CUDA model lands on its GPU first, once per replica)."""

from __future__ import annotations

import copy
import threading
import types

import numpy as np
import torch
from PIL import Image

import raml.deploy.embed as embed_module
from raml.deploy.embed import embed_images
from raml.models import build_network

CPU = torch.device("cpu")


def test_replicas_come_from_one_cpu_copy_made_before_the_threads(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    torch.manual_seed(0)
    network = build_network("test_resnet", whitening=8, pretrained=False).eval()
    copies: list[dict] = []

    def recording_deepcopy(obj, memo=None):
        if isinstance(obj, torch.nn.Module):
            out = copy.deepcopy(obj, memo)
            copies.append(
                {
                    "thread": threading.current_thread().name,
                    "of_the_original": obj is network,
                    "shares_tensors": any(a is b for a, b in zip(out.parameters(), network.parameters())),
                    "devices": {t.device.type for t in (*out.parameters(), *out.buffers())},
                }
            )
            return out
        return copy.deepcopy(obj, memo)

    monkeypatch.setattr(embed_module, "copy", types.SimpleNamespace(deepcopy=recording_deepcopy))
    three = embed_images(network, paths, 32, [CPU, CPU, CPU], batch_size=2)
    one = embed_images(network, paths, 32, [CPU], batch_size=2)
    np.testing.assert_allclose(three, one, atol=1e-6)  # sharding changes nothing
    assert copies, "no replica was made"
    for entry in copies:
        assert entry["thread"] == threading.main_thread().name, entry  # before any worker thread
        assert not entry["shares_tensors"] and entry["devices"] == {"cpu"}, entry
    # one CPU copy of the original; the replicas are copies of that copy, not of the (CUDA) original
    assert sum(entry["of_the_original"] for entry in copies) == 1
