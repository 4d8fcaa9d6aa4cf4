"""One writer per index (``raml.deploy.lock``), durable generations, and readers that race a commit.

Two real processes: this file is also the child's script (``python test_index_lock.py write ...``), which
indexes images with a tiny network and holds its write open (inside ``before_commit``) until told to go on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import raml
from raml.deploy import IndexDirectoryError, index_images, load_index
from raml.deploy import index as index_module
from raml.deploy import store as store_module
from raml.deploy.lock import LOCK_NAME, DirectoryLock, LockFileError, LockHeldError, LockHolder, pid_alive

SIZE = 16
SHA = "0" * 64  # the network's content hash, only compared between writers
CHILD_TIMEOUT_S = 120.0  # a child waiting for its release file gives up after this


class TinyNet(nn.Module):
    """``(B, 3, S, S)`` -> ``(B, 8)`` L2-normalised: mean colour, a fixed linear map; embeds in microseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 24).reshape(8, 3))
            self.proj.bias.copy_(torch.linspace(0.5, -0.5, 8))
        self.meta = {"outputdim": 8}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(x.mean(dim=(2, 3))), dim=1)


def make_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _start_writer(index_dir: Path, writing: Path, release: Path, paths: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    src = str(Path(raml.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = [sys.executable, __file__, "write", str(index_dir), str(writing), str(release), *paths]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_writing(proc: subprocess.Popen, writing: Path, timeout: float = CHILD_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not writing.exists():
        if proc.poll() is not None:
            pytest.fail(f"the writer process exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the writer process did not start writing within {timeout} s")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_second_writer_process_is_refused_at_once_naming_the_first(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", 6)
    index_dir, writing, release = tmp_path / "index", tmp_path / "writing", tmp_path / "release"
    proc = _start_writer(index_dir, writing, release, images[:4])
    try:
        _wait_until_writing(proc, writing)

        def no_embedding(*args, **kwargs):
            raise AssertionError("a refused writer must not embed anything")

        with monkeypatch.context() as patch:
            patch.setattr(index_module, "embed_images", no_embedding)
            started = time.monotonic()
            with pytest.raises(LockHeldError) as refused:
                index_images(TinyNet(), images[4:], SIZE, index_dir, SHA)
            assert time.monotonic() - started < 5  # fails fast, does not wait for the holder
        message = str(refused.value)
        assert f"raml index (PID {proc.pid} on host {socket.gethostname()}, since " in message
        assert "wait for it to finish" in message and str(index_dir / LOCK_NAME) in message
        assert refused.value.holder == LockHolder.parse((index_dir / LOCK_NAME).read_text())
        assert isinstance(refused.value, FileExistsError)  # the CLI reports it as a user error (exit status 2)
        assert not (index_dir / "index.json").exists()  # the first writer has not committed yet

        release.touch()
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]
    finally:
        _stop(proc)
    assert len(load_index(index_dir)) == 4 and not (index_dir / LOCK_NAME).exists()
    summary = index_images(TinyNet(), images, SIZE, index_dir, SHA)  # the lock is free again
    assert (summary["added"], summary["skipped"], summary["count"]) == (2, 4, 6)
    assert LOCK_NAME not in _names(index_dir)


def test_the_lock_of_a_killed_writer_is_taken_over_with_a_warning(tmp_path, caplog):
    images = make_images(tmp_path / "images", 5)
    index_dir, writing, release = tmp_path / "index", tmp_path / "writing", tmp_path / "release"
    proc = _start_writer(index_dir, writing, release, images)
    try:
        _wait_until_writing(proc, writing)
        proc.kill()  # SIGKILL in the middle of a first build: generation files written, no index.json
    finally:
        _stop(proc)
    left = LockHolder.parse((index_dir / LOCK_NAME).read_text())
    assert left is not None and left.pid == proc.pid and not pid_alive(proc.pid)
    assert "index.json" not in _names(index_dir) and len(_names(index_dir)) > 1

    with caplog.at_level(logging.WARNING, logger="raml.deploy.lock"):
        summary = index_images(TinyNet(), images, SIZE, index_dir, SHA)
    assert f"Taking over the stale lock {index_dir / LOCK_NAME}" in caplog.text
    assert f"PID {proc.pid}" in caplog.text and "no longer running" in caplog.text
    assert summary["count"] == 5
    index = load_index(index_dir)  # the killed build's leftovers are gone, nothing else remains
    assert _names(index_dir) == sorted(["index.json", *index.meta["files"].values()])


def _lock_file_naming(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier", "command": "raml index"})


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    assert done.wait(timeout=60) == 0  # waited for: its PID is free (and, within a test, not reused)
    return done.pid


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("dead", "which is no longer running (killed?)"),
        ("alive", "that PID is running but no longer holds the lock"),
        ("elsewhere", "on host another-host, since earlier), which no longer holds it"),
        ("garbage", "left by another process (PID unknown), which no longer holds it"),
    ],
)
def test_a_stale_lock_file_is_taken_over_and_described(tmp_path, caplog, who, expected):
    directory = tmp_path / "index"
    directory.mkdir()
    if who == "dead":
        text = _lock_file_naming(_dead_pid())
    elif who == "alive":
        text = _lock_file_naming(os.getpid())
    elif who == "elsewhere":
        text = _lock_file_naming(12345, "another-host")
    else:
        text = "not json"
    (directory / LOCK_NAME).write_text(text)
    with caplog.at_level(logging.WARNING, logger="raml.deploy.lock"), DirectoryLock(directory, "test") as lock:
        assert lock.held
        assert LockHolder.parse((directory / LOCK_NAME).read_text()).pid == os.getpid()
    assert expected in caplog.text
    assert _names(directory) == []


def test_locks_exclude_each_other_and_leave_no_trace(tmp_path):
    directory = tmp_path / "new" / "index"
    first = DirectoryLock(directory, "raml index")
    first.acquire()
    assert directory.is_dir() and _names(directory) == [LOCK_NAME]
    with pytest.raises(LockHeldError, match=rf"raml index \(PID {os.getpid()} on host "):
        DirectoryLock(directory).acquire()
    first.release()
    assert not (tmp_path / "new").exists()  # folders the lock created are removed while still empty
    with DirectoryLock(directory) as second:
        assert second.held
        (directory / "data.bin").write_bytes(b"x")
    assert _names(directory) == ["data.bin"]


def test_a_dead_holder_whose_child_keeps_the_lock_is_explained(tmp_path):
    directory = tmp_path / "index"
    with DirectoryLock(directory):
        # What a killed writer's surviving data-loader worker looks like: the lock held, its PID gone.
        fd = os.open(directory / LOCK_NAME, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _lock_file_naming(_dead_pid()).encode())
        finally:
            os.close(fd)
        with pytest.raises(LockHeldError, match="is no longer running, but a process it started"):
            DirectoryLock(directory).acquire()


def test_a_new_generation_is_on_disk_before_it_is_committed(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", 4)
    index_dir = tmp_path / "index"
    index_images(TinyNet(), images[:2], SIZE, index_dir, SHA)
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync dir" if stat.S_ISDIR(info.st_mode) else "fsync file", info.st_ino))
        real_fsync(fd)

    def recording_replace(src, dst) -> None:
        events.append(("rename", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    index_images(TinyNet(), images, SIZE, index_dir, SHA)
    monkeypatch.undo()

    files = load_index(index_dir).meta["files"]
    commit = events.index(("rename", "index.json"))
    before, after = events[:commit], events[commit:]
    # every file of the generation is fsynced, then renamed into place, then its folder fsynced ...
    for name in files.values():
        inode = (index_dir / name).stat().st_ino  # a rename keeps the temporary file's inode
        at = before.index(("fsync file", inode))
        assert before[at + 1 : at + 3] == [("rename", name), ("fsync dir", index_dir.stat().st_ino)]
    # ... before index.json (written and fsynced last) is renamed: the commit, itself made durable
    assert before[-3:] == [
        ("rename", files["index"]),
        ("fsync dir", index_dir.stat().st_ino),
        ("fsync file", (index_dir / "index.json").stat().st_ino),
    ]
    assert after == [("rename", "index.json"), ("fsync dir", index_dir.stat().st_ino)]


def test_a_reader_that_races_a_commit_loads_the_new_generation(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", 5)
    index_dir = tmp_path / "index"
    index_images(TinyNet(), images[:3], SIZE, index_dir, SHA)
    old_meta = json.loads((index_dir / "index.json").read_text())
    index_images(TinyNet(), images, SIZE, index_dir, SHA)  # commits generation 2, removes generation 1
    assert not (index_dir / old_meta["files"]["embeddings"]).exists()

    real_read = store_module._read_metadata
    reads: list[Path] = []

    def stale_first(directory: Path) -> dict:
        reads.append(directory)  # the first read happened just before the writer's commit
        return old_meta if len(reads) == 1 else real_read(directory)

    monkeypatch.setattr(store_module, "_read_metadata", stale_first)
    index = load_index(index_dir)
    assert len(index) == 5 and index.meta["generation"] == old_meta["generation"] + 1 and len(reads) == 2

    (index_dir / index.meta["files"]["labels"]).unlink()  # damage that no newer generation explains
    with pytest.raises(IndexDirectoryError, match="damaged"):
        load_index(index_dir)


def _child_write(index_dir: str, writing: str, release: str, *paths: str) -> None:
    """Index ``paths``; hold the write open (lock held, files written, not committed) until ``release`` exists."""

    def hold() -> None:
        Path(writing).touch()
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not Path(release).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release} never appeared; giving up after {CHILD_TIMEOUT_S} s")
            time.sleep(0.02)

    torch.set_num_threads(1)
    index_images(TinyNet(), list(paths), SIZE, index_dir, SHA, before_commit=hold)


if __name__ == "__main__":
    if sys.argv[1:2] != ["write"]:
        raise SystemExit("usage: test_index_lock.py write INDEX_DIR WRITING_FILE RELEASE_FILE IMAGE...")
    _child_write(*sys.argv[2:])


@pytest.mark.parametrize(
    ("kind", "what"), [("symlink", "a symbolic link"), ("fifo", "not a regular file"), ("folder", "a folder")]
)
def test_a_lock_path_that_is_not_a_regular_file_is_refused_and_nothing_is_written(tmp_path, kind, what):
    images = make_images(tmp_path / "images", 3)
    index_dir = tmp_path / "index"
    index_images(TinyNet(), images[:2], SIZE, index_dir, SHA)
    before = {name: (index_dir / name).read_bytes() for name in _names(index_dir)}
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = index_dir / LOCK_NAME
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(LockFileError, match=rf"lock file .*{LOCK_NAME} is {what}; .*remove it, and run the command"):
        index_images(TinyNet(), images, SIZE, index_dir, SHA)
    assert victim.read_text() == "precious"
    assert {name: (index_dir / name).read_bytes() for name in _names(index_dir) if name != LOCK_NAME} == before
    assert os.path.lexists(lock) and load_index(index_dir).live_count == 2
