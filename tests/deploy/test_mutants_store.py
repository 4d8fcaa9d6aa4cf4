"""Hand-mutation survivors of raml.deploy.store, now killed: a file name of index.json that reaches into a
(linked) subfolder, and an on-disk index whose inverted lists reach past the size its .faiss file declares."""

from __future__ import annotations

import io
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from torch import nn

from raml.deploy import IndexDirectoryError, IndexParams, index_images, load_index
from raml.deploy.shards import ShardPlan
from raml.deploy.store import remove_leftovers

DIM = 8
SHA = "0" * 64


def _rows(paths: list[str]) -> np.ndarray:
    rng = np.random.default_rng([int(Path(p).stem[3:]) for p in paths])
    x = rng.standard_normal((len(paths), DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _engine(plan: ShardPlan) -> dict:
    for i in plan.missing():
        plan.write(i, _rows(plan.shard_paths(i)))
    return {"engine": "test"}


def _build(tmp_path: Path, count: int, params: IndexParams | None = None) -> Path:
    header = io.BytesIO()
    Image.new("RGB", (1, 1)).save(header, format="BMP")
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i in range(count):
        paths.append(str(images / f"img{i:04d}.bmp"))
        Path(paths[-1]).write_bytes(header.getvalue() + f"image {i}".encode())
    index_dir = tmp_path / "index"
    index_images(nn.Identity(), paths, 32, index_dir, SHA, params=params, engine=_engine)
    return index_dir


def test_an_index_json_name_through_a_linked_subfolder_is_refused(tmp_path: Path):
    """``paths-<generation>`` must be a number: ``paths-x/p.json`` would read through a folder ``paths-x``, which
    may be a link to anywhere (only the file itself is checked to be no link)."""
    index_dir = _build(tmp_path, 3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "p.json").write_text(json.dumps(["/secret"] * 3))
    (index_dir / "paths-x").symlink_to(outside, target_is_directory=True)
    meta = json.loads((index_dir / "index.json").read_text())
    meta["files"]["paths"] = "paths-x/p.json"
    (index_dir / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexDirectoryError, match=r"names the 'paths' file 'paths-x/p.json'; expected a file"):
        load_index(index_dir)


def test_an_on_disk_list_past_the_declared_lists_size_is_refused(tmp_path: Path):
    """The .faiss file declares the lists file's size; a list placed beyond it (a damaged or crafted .faiss) is
    refused at the load, even when the file on disk happens to be long enough."""
    index_dir = _build(tmp_path, 80, IndexParams("ivf", nlist=2, train_size=80, on_disk=True))
    index_file = index_dir / "index-000001.faiss"
    index = faiss.read_index(str(index_file), faiss.IO_FLAG_ONDISK_SAME_DIR)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    entry_bytes = int(lists.code_size) + 8
    ends = [int(lists.lists.at(i).offset) + int(lists.lists.at(i).capacity) * entry_bytes for i in (0, 1)]
    assert max(ends) == int(lists.totsize)
    lists.totsize = min(ends)  # the last list now ends past the declared size
    faiss.write_index(index, str(index_file))
    del index, lists
    with pytest.raises(IndexDirectoryError, match=r"is damaged: its inverted list \d .*does not fit in the"):
        load_index(index_dir)


def test_a_faiss_file_mapping_another_lists_file_than_index_json_names_is_refused(tmp_path: Path):
    index_dir = _build(tmp_path, 80, IndexParams("ivf", nlist=2, train_size=80, on_disk=True))
    index_file = index_dir / "index-000001.faiss"
    other = index_dir / "invlists-000009.ivfdata"
    other.write_bytes((index_dir / "invlists-000001.ivfdata").read_bytes())
    index = faiss.read_index(str(index_file), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = other.name
    faiss.write_index(index, str(index_file))
    del index
    with pytest.raises(IndexDirectoryError, match=r"invlists-000009.ivfdata is the lists file that the faiss index"):
        load_index(index_dir)


def test_a_paths_file_whose_live_images_disagree_with_the_count_is_inconsistent(tmp_path: Path):
    """count, faiss vectors and rows agree, but the paths file marks one image removed: not loaded as is."""
    index_dir = _build(tmp_path, 3)
    paths_file = index_dir / "paths-000001.json"
    paths = json.loads(paths_file.read_text())
    paths[1] = ""  # the tombstone of a removed image
    paths_file.write_text(json.dumps(paths))
    with pytest.raises(IndexDirectoryError, match=r"is inconsistent: 3 in index.json, 3 paths \(2 not removed\)"):
        load_index(index_dir)


def test_a_stamps_file_of_another_length_is_inconsistent(tmp_path: Path):
    index_dir = _build(tmp_path, 3)
    stamps_file = index_dir / "stamps-000001.json"
    stamps_file.write_text(json.dumps(json.loads(stamps_file.read_text())[:2]))
    with pytest.raises(IndexDirectoryError, match=r"is inconsistent: .* 3 labels, 2 file stamps, 3 vectors"):
        load_index(index_dir)


def test_a_work_folder_of_index_json_that_is_no_shard_folder_is_never_deleted(tmp_path: Path):
    """The next writer removes the committed job's shard folder named in index.json; an edited entry naming any
    other folder (the images, a folder outside the index) is left alone."""
    index_dir = _build(tmp_path, 3)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("user data")
    meta = json.loads((index_dir / "index.json").read_text())
    meta["work_folder"] = "../precious"
    (index_dir / "index.json").write_text(json.dumps(meta))
    remove_leftovers(index_dir)
    assert (precious / "keep.txt").read_text() == "user data"
