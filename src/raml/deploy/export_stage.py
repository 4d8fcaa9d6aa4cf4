"""Where ``raml export`` writes before anything replaces a file: a locked staging folder next to each target.

An export writes each model and its sidecar into a hidden folder beside the target, checks them, and only then
moves them into place (:class:`ExportStage`). Each folder holds an exclusive ``flock`` for the export's life, so
that the next export can remove the folders a killed one left (``.<name>.<random>.staged``) without touching a
running export's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["ExportStage"]

logger = logging.getLogger(__name__)


#: the suffix of an export's staging folder (``.<name>.<8 random characters>.staged``), and of the same folder in
#: the instant between its creation and its lock (``.staging``: never removed by another export)
_STAGED, _STAGING = ".staged", ".staging"
_STAGE_TOKEN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")  # tempfile.mkdtemp's random characters


class ExportStage:
    """Where ``raml export`` writes its models and sidecars before any of them replaces a file: a hidden folder
    next to each target (``.<name>.<hex>.staged``). :meth:`commit` moves a finished model and its sidecar into
    place; it is called only once every export has passed its parity check, so that a failure in the second file
    (e.g. the TorchScript trace after the ONNX export) leaves the first one's previous version in place. The
    folders are removed on the way out, whatever happened.

    An export holds an exclusive ``flock`` on each of its folders (the kernel drops it when the export exits,
    however it exits), and removes, before it stages anything, the folders of the same target that no export
    holds: those a killed export left."""

    def __init__(self, targets: list[Path]) -> None:
        self._targets = targets
        self._folders: dict[Path, Path] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ExportStage:
        with self._stack as stack:
            for target in self._targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_stages(target)
                self._folders[target] = _locked_stage(target, stack)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def path(self, target: Path) -> Path:
        """Where the export of ``target`` is written first."""
        return self._folders[target] / target.name

    def commit(self, report: Any) -> Any:
        """Move the staged model of ``report`` and its sidecar onto their targets (an existing target's permission
        bits kept); ``report`` with the final paths."""
        import dataclasses
        import stat

        from raml.deploy.export import sidecar_path
        from raml.utils import fsync_directory

        target = next(t for t in self._targets if self.path(t) == Path(report.path))
        moves = ((Path(report.path), target), (Path(report.sidecar), sidecar_path(target)))
        for staged, final in moves:
            with contextlib.suppress(FileNotFoundError):  # a new file keeps the mode it was created with
                os.chmod(staged, stat.S_IMODE(os.stat(final).st_mode))
            os.replace(staged, final)
        fsync_directory(target.parent)
        logger.info("Moved %s and %s into place from %s", target, sidecar_path(target).name, Path(report.path).parent)
        return dataclasses.replace(report, path=target, sidecar=sidecar_path(target))


def _is_stage_of(target: Path, name: str) -> bool:
    """Whether ``name`` is that of a staging folder of ``target`` (``.<target name>.<8 characters>.staged``)."""
    prefix = f".{target.name}."
    token = name[len(prefix) : -len(_STAGED)]
    return name.startswith(prefix) and name.endswith(_STAGED) and len(token) == 8 and set(token) <= _STAGE_TOKEN


def _flock_directory(folder: Path) -> int | None:
    """An open descriptor of ``folder`` with an exclusive ``flock`` on it; None if another process holds one (or
    the folder is gone or not a folder)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_stale_stages(target: Path) -> None:
    """Remove the staging folders of ``target`` that no export holds (left by a killed ``raml export``)."""
    import shutil

    for folder in sorted(target.parent.iterdir()):
        if not _is_stage_of(target, folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        fd = _flock_directory(folder)
        if fd is None:  # a running export's folder
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        logger.info("Removed %s, which a stopped export of %s left", folder, target.name)


def _locked_stage(target: Path, stack: contextlib.ExitStack) -> Path:
    """A new staging folder of ``target``, locked (see :class:`ExportStage`) and removed when ``stack`` closes.
    Made as ``.staging`` and renamed only once locked, so that another export never takes it for a stale one."""
    import shutil
    import tempfile

    made = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=_STAGING))
    fd = _flock_directory(made)
    if fd is None:  # pragma: no cover - nothing else locks a .staging folder
        shutil.rmtree(made, ignore_errors=True)
        raise OSError(f"Could not lock the staging folder {made}; run the export again.")
    folder = made.with_name(made.name[: -len(_STAGING)] + _STAGED)
    try:
        os.rename(made, folder)
    except OSError:
        os.close(fd)
        shutil.rmtree(made, ignore_errors=True)
        raise
    stack.callback(os.close, fd)  # callbacks run last first: the folder is removed, then the lock dropped
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    return folder
