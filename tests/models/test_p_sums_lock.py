"""Processes that record digests in the same ``SHA256SUMS`` at once keep each other's lines (its read and
rewrite hold a lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from raml.models.checkpoints import read_sha256sums, record_sha256

FILES = 40  # per process
SRC = Path(__file__).resolve().parents[2] / "src"  # the children import this checkout's raml

_WORKER = """
import sys, time
from pathlib import Path
from raml.models.checkpoints import record_sha256
folder, tag = Path(sys.argv[1]), sys.argv[2]
(folder.parent / f"ready-{tag}").touch()
deadline = time.monotonic() + 60
while not (folder.parent / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.005)
for i in range(int(sys.argv[3])):
    path = folder / f"{tag}{i}.pth"
    path.write_bytes(f"{tag}{i}".encode())
    record_sha256(path)
"""


def test_two_processes_recording_at_once_keep_every_line(tmp_path):
    folder = tmp_path / "networks"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-c", _WORKER, str(folder)]
    workers = [subprocess.Popen([*command, tag, str(FILES)], cwd=tmp_path, env=env) for tag in "ab"]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{tag}").exists() for tag in "ab") and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp_path / "go").touch()  # both start recording together
        assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()
    sums = read_sha256sums(folder)
    assert sorted(sums) == sorted(f"{tag}{i}.pth" for tag in "ab" for i in range(FILES))


def test_the_lock_file_is_removed_and_the_sums_are_right(tmp_path):
    path = tmp_path / "net.pth"
    path.write_bytes(b"weights")
    digest = record_sha256(path)
    assert read_sha256sums(tmp_path) == {"net.pth": digest}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SHA256SUMS", "net.pth"]
