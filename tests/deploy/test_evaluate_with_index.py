"""evaluate_with_index against an index of the split (one to one, removed images, another teacher);
DatabaseIndex.search's k."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from raml.data import get_split
from raml.deploy import evaluate_with_index, index_images
from raml.deploy.store import IndexDirectoryError, load_index
from raml.models import checkpoint_sha256, load_network, save_checkpoint

QR, DR = 32, 48
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(indexed_synth_world, synth_and_networks) -> dict:
    """The shared teacher index of synth-test (built from the data root ``root``) and the student."""
    built = indexed_synth_world(DR)
    root, _ = synth_and_networks("resnet18", {"teacher": (16, 0), "student": (16, 1)})
    return {**built, "root": root, "student": load_network(built["nets"]["student"])}


def _evaluate(world: dict, data_root, index_dir=None) -> dict:
    split = get_split("synth-test", data_root)
    return evaluate_with_index(world["student"], split, QR, index_dir or world["index"], CPU, ks=(1, 2))


def test_a_symlinked_data_root_reaching_the_same_files_gives_the_direct_result(world, tmp_path):
    link = tmp_path / "linked_root"
    link.symlink_to(world["root"], target_is_directory=True)
    assert _evaluate(world, link) == _evaluate(world, world["root"])


def test_a_copied_data_root_is_refused_naming_a_path_of_each_side(world, tmp_path):
    copy = tmp_path / "copied_root"
    shutil.copytree(world["root"] / "synth", copy / "synth")
    with pytest.raises(IndexDirectoryError, match=r"built from '.*', evaluating '.*copied_root.*--overwrite"):
        _evaluate(world, copy)


def test_an_older_index_of_relative_paths_read_from_another_folder_says_so(world, tmp_path, monkeypatch):
    """An index written before paths were stored absolute holds them as given (relative to where it was built):
    from another working directory nothing matches, and the refusal says why rather than blaming --data-root."""
    index_dir = tmp_path / "old_index"
    shutil.copytree(world["index"], index_dir)
    meta = json.loads((index_dir / "index.json").read_text())
    paths_file = index_dir / meta["files"]["paths"]
    stored = json.loads(paths_file.read_text())
    paths_file.write_text(json.dumps([os.path.relpath(p, world["root"].parent) for p in stored]) + "\n")
    monkeypatch.chdir(world["root"].parent)  # where it was "built": the relative paths reach the files
    assert _evaluate(world, world["root"], index_dir) == _evaluate(world, world["root"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexDirectoryError, match="it stores relative paths .* run from the folder it was built in"):
        _evaluate(world, world["root"], index_dir)


@pytest.mark.parametrize("second_root", ["link", "copy"])
def test_an_index_holding_the_split_twice_is_refused(world, tmp_path, second_root):
    other = tmp_path / "other_root"
    if second_root == "link":
        other.symlink_to(world["root"], target_is_directory=True)
    else:
        shutil.copytree(world["root"] / "synth", other / "synth")
    index_dir = tmp_path / "index"
    shutil.copytree(world["index"], index_dir)
    split = get_split("synth-test", other)
    sha = checkpoint_sha256(world["nets"]["teacher"])
    paths = [str(p) for p in split.abspaths()]
    index_images(world["teacher"], paths, DR, index_dir, sha, labels=list(split.labels), dataset=split.name)
    index = load_index(index_dir)
    assert index.live_count == 2 * len(paths) and index.meta["datasets"] == ["synth-test"]
    expected = "more than once" if second_root == "link" else "holds 40 images, 'synth-test' has 20"
    with pytest.raises(IndexDirectoryError, match=expected):
        _evaluate(world, world["root"], index_dir)


def test_a_student_of_another_teacher_is_warned_about(world, tmp_path, caplog):
    other = tmp_path / "distilled_elsewhere.pth"
    save_checkpoint(other, world["student"], extra={"raml": {"teacher_sha256": "f" * 64}})
    with caplog.at_level(logging.WARNING, logger="raml.deploy.search"):
        _evaluate({**world, "student": load_network(other)}, world["root"])
    assert sum("different teacher" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raml.deploy.search"):
        split = get_split("synth-test", world["root"])
        evaluate_with_index(world["student"], split, QR, world["index"], CPU, teacher_sha256="f" * 64)
        sha = load_index(world["index"]).network_sha256
        evaluate_with_index(load_network(other), split, QR, world["index"], CPU, teacher_sha256=sha)
    assert sum("different teacher" in r.message for r in caplog.records) == 1


def test_an_index_with_a_removed_image_is_refused_as_such_and_its_rebuild_evaluates(world, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(world["index"], index_dir)
    split = get_split("synth-test", world["root"])
    sha = checkpoint_sha256(world["nets"]["teacher"])
    paths = [str(p) for p in split.abspaths()]
    index_images(world["teacher"], [], DR, index_dir, sha, remove=paths[:1])
    with pytest.raises(IndexDirectoryError, match="1 image was removed from it .*--overwrite") as refused:
        _evaluate(world, world["root"], index_dir)
    assert "unlabelled" not in str(refused.value)
    # the rebuild the message asks for keeps the removed image's tombstone row (ids are never reused) and
    # evaluates as the index built once, unreturned items (search_k < N) ranked among the live images only
    labels = list(split.labels)
    index_images(world["teacher"], paths, DR, index_dir, sha, labels=labels, dataset=split.name, overwrite=True)
    assert len(load_index(index_dir)) == len(paths) + 1
    for search_k in (None, 3):
        direct = evaluate_with_index(world["student"], split, QR, world["index"], CPU, search_k=search_k)
        assert evaluate_with_index(world["student"], split, QR, index_dir, CPU, search_k=search_k) == direct


@pytest.mark.parametrize("k", [np.int64(5), np.int32(5), 5])
def test_search_takes_numpy_integers_for_k(world, k):
    index = load_index(world["index"])
    scores, ids = index.search(np.asarray(index.embeddings[:2]), k)
    assert ids.shape == scores.shape == (2, 5) and (ids[:, 0] == [0, 1]).all()


@pytest.mark.parametrize("k", [True, np.bool_(True), 0, np.int64(-1), 2.0, "5"])
def test_search_refuses_a_k_that_is_not_a_positive_integer(world, k):
    index = load_index(world["index"])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(np.asarray(index.embeddings[:1]), k)
