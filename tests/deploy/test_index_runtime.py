"""The CPU runtime and batch size of a resumable extraction (audit of `raml index`, 2026-12-05): a resumed run
embeds its remaining shards with the runtime the whole job chose, so it equals an uninterrupted run bit for bit;
the runtime and the batch size are part of the shard key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raml.deploy import index_images, load_index
from raml.deploy.shards import ShardPlan
from raml.models import build_network
from raml.models.onnx_forward import OrtForward

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32
SHA = "0" * 64
WARMUP = 8 * SIZE * SIZE  # a job of 16 images or more repays the export; the 4-image last shard alone does not


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("timm/test_resnet", pooling="gem", whitening=16, pretrained=False).eval()


def _auto(net: torch.nn.Module) -> OrtForward:
    """What `--cpu-runtime auto` builds, in a fresh process (nothing exported yet)."""
    return OrtForward(net, warmup_pixels=WARMUP)


def test_a_resumed_run_with_the_default_runtime_equals_an_uninterrupted_one(tmp_path: Path, image_factory, monkeypatch):
    paths = [
        image_factory(tmp_path / "db" / f"{i:02d}.png", color=(10 * i, 90, 200 - 7 * i), size=(40, 36))
        for i in range(24)
    ]
    net = _network()
    whole = index_images(_auto(net), paths, SIZE, tmp_path / "whole", SHA, shard_size=20, batch_size=4)
    assert whole["added"] == 24

    write = ShardPlan.write

    def killed_after_shard_0(self, i, rows):
        write(self, i, rows)
        if i == 0:
            raise KeyboardInterrupt("killed after shard 0")

    monkeypatch.setattr(ShardPlan, "write", killed_after_shard_0)
    with pytest.raises(KeyboardInterrupt):
        index_images(_auto(net), paths, SIZE, tmp_path / "resumed", SHA, shard_size=20, batch_size=4)
    monkeypatch.setattr(ShardPlan, "write", write)
    resumed = index_images(_auto(net), paths, SIZE, tmp_path / "resumed", SHA, shard_size=20, batch_size=4)
    assert resumed["shards_computed"] == 1  # only the 4-image last shard, in a fresh forward
    a, b = load_index(tmp_path / "whole"), load_index(tmp_path / "resumed")
    assert a.paths == b.paths
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))


def test_the_runtime_and_the_batch_size_are_part_of_the_shard_key(tmp_path: Path, image_factory):
    paths = [image_factory(tmp_path / "db" / f"{i}.png", color=(30 * i, 60, 90), size=(40, 36)) for i in range(4)]
    net = _network()
    folders = set()
    for forward, batch in ((net, 4), (net, 2), (OrtForward(net, warmup_pixels=0), 4)):
        report = index_images(forward, paths, SIZE, tmp_path / f"i{len(folders)}", SHA, shard_size=2, batch_size=batch)
        folders.add(load_index(report["index_dir"]).meta["work_folder"])
    assert len(folders) == 3
