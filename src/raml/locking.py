"""An exclusive lock that keeps a second writer off a directory while one updates it (``raml index``'s index
directory, ``raml train``'s run folder). In the lowest layer, so that the training engine and the deployment
package both use it (:mod:`raml.deploy.lock` re-exports it).

Contract:
    ``with DirectoryLock(directory, "raml index"):`` holds ``<directory>/.lock`` for the duration of the block
    (the directory is created if missing); a second writer raises :class:`LockHeldError` at once, naming
    the holder's PID, host and start time. Readers take no lock.

Mechanism: the lock is an advisory ``fcntl.flock`` on the lock file, and the file holds the holder's PID,
host and start time (one JSON line) so that a refused writer can say who holds it. The kernel drops the
flock when its holder exits, however it exits; a lock file left behind by a killed writer is therefore
stale by construction: the next writer gets the flock, logs the previous holder (and whether that PID is
still alive on this host) and takes the lock over. The lock file is removed on release, and so are the
folders the lock created if they are still empty (a refused or failed first build leaves nothing behind).
On NFS, Linux maps ``flock`` to byte-range locks that the server arbitrates across hosts.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "DirectoryLock", "LockFileError", "LockHeldError", "LockHolder", "pid_alive", "same_file"]

LOCK_NAME = ".lock"
"""Name of the lock file inside the locked directory."""

_ACQUIRE_ATTEMPTS = 20  # retries when a holder releases (removes the file) between our open and our flock
# open() errors meaning the lock path is not a regular file, and what to call it
_NOT_A_FILE = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a folder", errno.ENXIO: "not a regular file"}
_HOLDER_WAIT_S = 0.5  # how long a refused writer waits for a new holder to write its PID into the file


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock, as written in the lock file; None where the file did not say."""

    pid: int | None = None
    host: str | None = None
    since: str | None = None
    command: str | None = None

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder described by a lock file's text; None for an empty file, fields None where unreadable."""
        if not text.strip():
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return cls()
        if not isinstance(record, dict):
            return cls()
        pid = record.get("pid")
        return cls(
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            host=str(record["host"]) if record.get("host") is not None else None,
            since=str(record["since"]) if record.get("since") is not None else None,
            command=str(record["command"]) if record.get("command") is not None else None,
        )

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def describe(self) -> str:
        """E.g. ``raml index (PID 123 on host h, since 2024-05-01T10:00:00+02:00)``."""
        who = self.command or "another process"
        details = [f"PID {self.pid}" if self.pid is not None else "PID unknown"]
        if self.host:
            details[0] += f" on host {self.host}"
        if self.since:
            details.append(f"since {self.since}")
        return f"{who} ({', '.join(details)})"


class LockHeldError(FileExistsError):
    """Another process holds the lock; ``holder`` says who (as far as the lock file tells)."""

    def __init__(self, message: str, path: Path, holder: LockHolder | None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class LockFileError(FileExistsError):
    """Something other than a regular file (a symbolic link, a FIFO, a folder) is at the lock file's path."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """Exclusive, non-blocking lock of a directory for one writer; a context manager.

    Args:
        directory: The directory to lock (created, with its parents, if missing).
        command: What the holder is doing, written into the lock file and shown to a refused writer
            (e.g. ``"raml index"``).
    """

    def __init__(self, directory: str | Path, command: str = "a raml writer") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`LockHeldError` at once if another writer holds it.

        Raises:
            LockHeldError: Another process (or another lock object in this one) holds the lock.
            OSError: The directory cannot be created, or its file system does not support locks.
        """
        if self._fd is not None:
            raise RuntimeError(f"The lock {self.path} is already held by this object.")
        if fcntl is None:  # pragma: no cover - Windows
            raise OSError(
                f"Locking {self.directory} for writing needs fcntl (Linux, macOS); run {self.command} on such a system."
            )
        for _ in range(_ACQUIRE_ATTEMPTS):
            self._make_directory()
            try:
                # O_NOFOLLOW: a link named .lock is refused, never followed to the file it names (which the lock
                # record would overwrite); O_NONBLOCK: a FIFO planted there does not hang the open
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the directory was removed by a releasing writer: make it again
                continue
            except OSError as error:
                self._remove_created_directories()
                what = _NOT_A_FILE.get(error.errno or 0)
                if what is not None:
                    raise LockFileError(self._not_a_file_message(what), self.path) from None
                raise
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                self._remove_created_directories()
                raise LockFileError(self._not_a_file_message("not a regular file"), self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                held = error.errno in (errno.EAGAIN, errno.EACCES)  # EACCES: some systems' "would block"
                holder = _wait_for_holder(fd) if held else None
                os.close(fd)
                self._remove_created_directories()
                if held:
                    raise LockHeldError(self._held_message(holder), self.path, holder) from None
                raise OSError(
                    error.errno,
                    f"Cannot lock {self.path} ({error.strerror}); the file system of {self.directory} does not "
                    "support file locks. Write on a local disk (or one with lock support) and copy the result.",
                ) from error
            if not same_file(fd, self.path):  # the holder released (and removed the file) before our flock
                os.close(fd)
                continue
            previous = LockHolder.parse(_read(fd))
            if previous is not None:
                logger.warning("Taking over the stale lock %s: %s", self.path, _stale_description(previous))
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": self.command,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd = fd
            logger.debug("Locked %s", self.path)
            return
        raise RuntimeError(  # pragma: no cover - needs 20 writers releasing in a row between our open and flock
            f"Could not take the lock {self.path} after {_ACQUIRE_ATTEMPTS} attempts (other writers kept "
            "releasing and retaking it); try again."
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock; remove the folders the lock created if they are empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Unlinked while still held: a writer waiting on this file notices it is gone and retries.
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        self._remove_created_directories()
        logger.debug("Unlocked %s", self.path)

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def _make_directory(self) -> None:
        missing = []
        for folder in (self.directory, *self.directory.parents):
            if folder.exists():
                break
            missing.append(folder)
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            self._created.append(folder)

    def _remove_created_directories(self) -> None:
        while self._created:
            folder = self._created.pop()
            try:
                folder.rmdir()
            except OSError:  # not empty (the writer wrote there) or already gone: keep the rest too
                self._created.clear()

    def _not_a_file_message(self, what: str) -> str:
        return (
            f"The lock file {self.path} is {what}; a writer creates it as a regular file and removes it when done, "
            "so it was put there by something else. Nothing was written (the file it points to, if any, is "
            "untouched). Check who made it, remove it, and run the command again."
        )

    def _held_message(self, holder: LockHolder | None) -> str:
        who = holder.describe() if holder is not None else "another process (which has not written its PID yet)"
        message = f"{self.directory} is being written by {who}; wait for it to finish and run the command again."
        if holder is not None and holder.pid is not None and holder.on_this_host and not pid_alive(holder.pid):
            message += (
                f" PID {holder.pid} is no longer running, but a process it started (e.g. a data loader worker) "
                "still holds the lock; wait for it to exit or stop it."
            )
        return f"{message} (Lock file: {self.path}.)"


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")


def _wait_for_holder(fd: int) -> LockHolder | None:
    """The holder recorded in the file; a new holder writes it just after its flock, so wait a moment for it."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while (holder := LockHolder.parse(_read(fd))) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, not replaced by another file or a
    link): a waiter that got its lock on a file its holder removed must lock the new one instead."""
    try:
        on_disk = os.lstat(path)  # a link put in place of the file since our open is not the file
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _stale_description(previous: LockHolder) -> str:
    where = previous.describe()
    if previous.pid is None or not previous.on_this_host:
        return f"left by {where}, which no longer holds it"
    if pid_alive(previous.pid):
        return f"left by {where}; that PID is running but no longer holds the lock (reused PID?)"
    return f"left by {where}, which is no longer running (killed?)"
