"""``raml.utils`` atomic writes: durable (fsync of file and folder), normal permissions, all-or-nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from raml import utils
from raml.utils import atomic_duplicate, atomic_numpy_save, atomic_path, atomic_torch_save, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it (pytest runs tests in one thread)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.fixture
def fsyncs(monkeypatch) -> list[tuple[str, int]]:
    """Record every os.fsync as ("dir" | "file", inode), then really fsync."""
    calls: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    written = [tmp_path / "a.txt", tmp_path / "b.npy", tmp_path / "c.pt"]
    atomic_write_text(written[0], "x")
    atomic_numpy_save(np.zeros(3), written[1])
    atomic_torch_save({"w": torch.zeros(2)}, written[2])
    assert _mode(plain) == 0o666 & ~mask
    assert [_mode(p) for p in written] == [_mode(plain)] * 3


def test_an_existing_files_mode_is_kept_like_a_plain_open_keeps_it(tmp_path, umask):
    umask(0o077)  # would drop the group/other bits of a new file
    target = tmp_path / "shared.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    atomic_write_text(target, json.dumps({"a": 1}))
    assert _mode(target) == 0o640 and json.loads(target.read_text()) == {"a": 1}
    os.chmod(target, 0o600)
    atomic_write_text(target, "{}")
    assert _mode(target) == 0o600


def test_the_umask_is_never_changed(tmp_path, monkeypatch):
    def no_umask(mask: int) -> int:
        raise AssertionError("atomic writes must not call os.umask (it is process-wide, not thread-safe)")

    monkeypatch.setattr(os, "umask", no_umask)
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    assert (tmp_path / "b.bin").read_bytes() == b"y"


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after_it(tmp_path, fsyncs, monkeypatch):
    target = tmp_path / "sub" / "data.npy"
    events: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst) -> None:
        events.append(f"replace after {len(fsyncs)} fsyncs")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    atomic_numpy_save(np.arange(4), target)
    inode = target.stat().st_ino
    folder = target.parent.stat().st_ino
    assert fsyncs == [("file", inode), ("dir", folder)]  # the rename keeps the inode of the temporary file
    assert events == ["replace after 1 fsyncs"]
    np.testing.assert_array_equal(np.load(target), np.arange(4))


def test_every_helper_is_durable(tmp_path, fsyncs):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_torch_save([1, 2], tmp_path / "b.pt")
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"z")
    files = {("file", (tmp_path / name).stat().st_ino) for name in ("a.txt", "b.pt", "c.bin")}
    assert set(fsyncs) == files | {("dir", tmp_path.stat().st_ino)}
    assert [kind for kind, _ in fsyncs] == ["file", "dir"] * 3


@pytest.mark.parametrize("where", ["in the block", "in fsync", "in the rename"])
def test_a_failure_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, where):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    if where == "in fsync":

        def failing_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
    elif where == "in the rename":

        def failing_replace(src, dst) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises((OSError, RuntimeError)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        if where == "in the block":
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_numpy_save_keeps_the_name_and_missing_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "embeddings.bin"
    atomic_numpy_save(np.eye(2, dtype=np.float32), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["embeddings.bin"]
    np.testing.assert_array_equal(np.load(target), np.eye(2, dtype=np.float32))


def test_directory_fsync_tolerates_file_systems_without_it(tmp_path, monkeypatch):
    def unsupported(fd: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", unsupported)
    utils.fsync_directory(tmp_path)  # EINVAL: skipped

    def io_error(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError, match="Input/output"):
        utils.fsync_directory(tmp_path)


@pytest.mark.parametrize("links", [True, False], ids=["hard link", "no links: a copy"])
def test_a_duplicate_holds_the_files_bytes_and_outlives_a_replacement_of_either_name(tmp_path, monkeypatch, links):
    source, twin = tmp_path / "model_epoch3.pth.tar", tmp_path / "model_last.pth.tar"
    source.write_bytes(b"epoch 3")
    twin.write_bytes(b"epoch 2")  # replaced whole
    if not links:

        def no_link(src, dst) -> None:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    atomic_duplicate(source, twin)
    assert twin.read_bytes() == b"epoch 3"
    assert (source.stat().st_ino == twin.stat().st_ino) is links  # no bytes written where links work
    atomic_write_text(twin, "epoch 4")  # the next epoch replaces one name: the other keeps its bytes
    assert source.read_bytes() == b"epoch 3" and twin.read_bytes() == b"epoch 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name, twin.name]  # no temporary file left


def test_a_failed_duplicate_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    source, twin = tmp_path / "new.pt", tmp_path / "old.pt"
    source.write_bytes(b"new")
    twin.write_bytes(b"old")

    def failing_replace(src, dst) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_duplicate(source, twin)
    assert twin.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pt", "old.pt"]
