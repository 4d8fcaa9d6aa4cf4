"""Hand-mutation survivors of raml.deploy.index, now killed: the zeroed rows of removed images, and the shards'
rows written at their own ids when those are not in increasing order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.data import get_split
from raml.deploy import index_images, load_index
from raml.models import checkpoint_sha256, load_network
from raml.retrieval.extract import extract_embeddings

DR = 40
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(synth_and_networks) -> dict:
    root, nets = synth_and_networks("resnet18", {"teacher": (8, 0)})
    paths = [str(p) for p in get_split("synth-test", root).abspaths()[:5]]
    teacher = load_network(nets["teacher"])
    reference = extract_embeddings(teacher, paths, DR, CPU, progress=False).numpy()
    return {"teacher": teacher, "sha": checkpoint_sha256(nets["teacher"]), "paths": paths, "reference": reference}


def test_a_removed_image_leaves_a_zero_row_not_its_embedding(world, tmp_path: Path):
    index_dir = tmp_path / "index"
    paths = world["paths"]
    index_images(world["teacher"], paths, DR, index_dir, world["sha"], shard_size=2)
    index_images(world["teacher"], [], DR, index_dir, world["sha"], remove=[paths[1]], shard_size=2)
    rows = np.asarray(load_index(index_dir).embeddings)
    assert rows.shape == (5, 8)
    assert not rows[1].any()  # the removed image's embedding is gone from the file, not only from faiss
    np.testing.assert_allclose(rows[[0, 2, 3, 4]], world["reference"][[0, 2, 3, 4]], atol=1e-5)


def test_a_rebuild_in_another_order_keeps_each_embedding_at_its_path_id(world, tmp_path: Path):
    """--overwrite keeps every path's id: given in reverse order, the ids to embed decrease, and each shard's
    rows must still land at their own ids."""
    index_dir = tmp_path / "index"
    paths = world["paths"]
    index_images(world["teacher"], paths, DR, index_dir, world["sha"], shard_size=2)
    index_images(world["teacher"], paths[::-1], DR, index_dir, world["sha"], overwrite=True, shard_size=2)
    index = load_index(index_dir)
    assert index.paths == paths  # ids kept
    np.testing.assert_allclose(np.asarray(index.embeddings), world["reference"], atol=1e-5)
    _, ids = index.search(world["reference"], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_a_rerun_with_hash_images_and_nothing_new_records_the_content_stamps(world, tmp_path: Path):
    """Nothing to embed, but the stamps move from size+mtime to SHA-256: that is a change, committed."""
    index_dir = tmp_path / "index"
    paths = world["paths"][:3]
    index_images(world["teacher"], paths, DR, index_dir, world["sha"])
    before = load_index(index_dir)
    assert not any(s.startswith("sha256:") for s in before.stamps)
    summary = index_images(world["teacher"], paths, DR, index_dir, world["sha"], hash_images=True)
    after = load_index(index_dir)
    assert summary["added"] == summary["reembedded"] == 0 and after.generation == before.generation + 1
    assert all(s.startswith("sha256:") for s in after.stamps) and after.meta["file_stamps"] == "sha256"


def test_a_changed_file_reembedded_without_labels_keeps_its_label(world, tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i, source in enumerate(world["paths"][:3]):
        paths.append(str(images / f"img{i}{Path(source).suffix}"))
        Path(paths[-1]).write_bytes(Path(source).read_bytes())
    index_dir = tmp_path / "index"
    index_images(world["teacher"], paths, DR, index_dir, world["sha"], labels=[5, 6, 7])
    Path(paths[1]).write_bytes(Path(world["paths"][4]).read_bytes())  # the file changed
    os.utime(paths[1], ns=(1, 1))  # and its stamp surely with it
    summary = index_images(world["teacher"], paths, DR, index_dir, world["sha"])  # no labels given this time
    index = load_index(index_dir)
    assert summary["reembedded"] == 1
    assert index.labels.tolist() == [5, 6, 7]
    np.testing.assert_allclose(np.asarray(index.embeddings)[1], world["reference"][4], atol=1e-5)
