"""One ``raml train`` per run folder: the folder's lock (:class:`raml.locking.DirectoryLock`), held by the main
process from the start of a :class:`raml.engine.trainer.Trainer` to the end of its run.

Two runs into one ``--directory`` would overwrite each other's checkpoints, ``config.yaml`` and history; the second
is refused at once, before it reads or writes anything there, with a message naming the first (its PID, host,
start time and command). The lock of a killed run is taken over with a warning (the kernel drops a dead
process's lock). With several processes (torchrun) only the main one, the only writer, takes it.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from raml.distributed import DistContext
from raml.locking import DirectoryLock

__all__ = ["RUN_LOCK_COMMAND", "acquire_run_lock"]

RUN_LOCK_COMMAND = "raml train"


def acquire_run_lock(owner: object, directory: str | Path, dist: DistContext) -> DirectoryLock | None:
    """Lock ``directory`` for ``owner`` (a trainer), or raise :class:`raml.locking.LockHeldError` at once.

    Returns the held lock (None on the processes other than the main one). It is released by
    :meth:`DirectoryLock.release`, or at the latest when ``owner`` is garbage-collected (a trainer that was built
    but never run must not keep its folder locked for the rest of the process).
    """
    if not dist.is_main:
        return None
    lock = DirectoryLock(directory, RUN_LOCK_COMMAND)
    lock.acquire()
    weakref.finalize(owner, lock.release)
    return lock
