"""One ``raml train`` per run folder: the folder's lock (:class:`raml.locking.DirectoryLock`), held by the main
process from the start of a :class:`raml.engine.trainer.Trainer` to the end of its run.

Two runs into one ``--directory`` would overwrite each other's checkpoints, ``config.yaml`` and history; the second
is refused at once, before it reads or writes anything there, with a message naming the first (its PID, host,
start time and command). The lock of a killed run is taken over with a warning (the kernel drops a dead
process's lock). With several processes (torchrun) only the main one, the only writer, takes it, and tells the
others whether it got it: a refused run stops on every process.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from raml.distributed import DistContext, broadcast_object
from raml.locking import DirectoryLock

__all__ = ["RUN_LOCK_COMMAND", "RunLockRefusedError", "acquire_run_lock"]

RUN_LOCK_COMMAND = "raml train"


class RunLockRefusedError(FileExistsError):
    """On a process other than the main one: the main process was refused the run folder's lock."""


def acquire_run_lock(owner: object, directory: str | Path, dist: DistContext) -> DirectoryLock | None:
    """Lock ``directory`` for ``owner`` (a trainer), or raise :class:`raml.locking.LockHeldError` at once.

    Returns the held lock (None on the processes other than the main one). It is released by
    :meth:`DirectoryLock.release`, or at the latest when ``owner`` is garbage-collected (a trainer that was built
    but never run must not keep its folder locked for the rest of the process).
    """
    lock: DirectoryLock | None = None
    refusal: OSError | None = None
    if dist.is_main:
        lock = DirectoryLock(directory, RUN_LOCK_COMMAND)
        try:
            lock.acquire()
        except OSError as error:  # held by another run, or no lock file can be made there
            refusal = error
    # every process learns the outcome: the others would otherwise go on into the run and wait for ever in its
    # first collective on a main process that has stopped
    refused = broadcast_object(None if refusal is None else str(refusal), dist)
    if refusal is not None:
        raise refusal
    if refused is not None:
        raise RunLockRefusedError(f"process {dist.rank}: the main process could not lock the run folder: {refused}")
    if lock is not None:
        weakref.finalize(owner, lock.release)
    return lock
