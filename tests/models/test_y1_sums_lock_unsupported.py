"""On a file system without file locks, recording a digest (the last step of a download) works without the lock,
with a warning, and leaves no lock file behind; it used to end in a bare OSError and leave .SHA256SUMS.lock."""

from __future__ import annotations

import errno
import fcntl
import logging
from pathlib import Path

import pytest

from raml.models.checkpoints import file_sha256, read_sha256sums, record_sha256


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_without_file_locks_the_digest_is_recorded_and_no_lock_file_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, "locks are not supported here")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / "old.pth").write_bytes(b"old")
    (tmp_path / "SHA256SUMS").write_text(f"{file_sha256(tmp_path / 'old.pth')}  old.pth\n")
    path = tmp_path / "net.pth"
    path.write_bytes(b"weights")
    with caplog.at_level(logging.WARNING, logger="raml.models.checkpoints"):
        digest = record_sha256(path)
    assert read_sha256sums(tmp_path) == {"old.pth": file_sha256(tmp_path / "old.pth"), "net.pth": digest}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SHA256SUMS", "net.pth", "old.pth"]
    assert "does not support file locks" in caplog.text
