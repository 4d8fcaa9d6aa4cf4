"""The lock that keeps a second ``raml index`` off an index directory while one updates it: the shared
:class:`raml.locking.DirectoryLock` (also held by ``raml train`` on its run folder), re-exported here."""

from __future__ import annotations

from raml.locking import LOCK_NAME, DirectoryLock, LockFileError, LockHeldError, LockHolder, pid_alive

__all__ = ["LOCK_NAME", "DirectoryLock", "LockFileError", "LockHeldError", "LockHolder", "pid_alive"]
