"""Admission control: a bounded number of uploads and decodes in flight, refused at once beyond it.

Contract: ``with slots.take():`` holds one of ``slots.limit`` slots for the block, or raises
:class:`ServiceBusyError` at once (never waits) when all are held; the HTTP layer answers that with 503 and
``Retry-After``. The service keeps one :class:`Slots` for request bodies being read (``--max-uploads``) and one
for images being decoded and transformed (``--max-decodes``), so that the memory a burst of requests can take
is bounded *before* any body is buffered or any pixel decoded (the batching queue's ``--queue-size`` only
bounds what waits after decoding).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["ServiceBusyError", "Slots"]


class ServiceBusyError(RuntimeError):
    """Every slot of a kind is held; try again shortly (HTTP 503 with ``Retry-After``)."""


class Slots:
    """``limit`` slots taken without waiting (thread-safe).

    Args:
        limit: Most holders at once (positive).
        what: What a slot holds, for the refusal message (e.g. ``"uploads being received"``).
        flag: The command-line flag that sets ``limit``, named in the refusal message.
    """

    def __init__(self, limit: int, what: str, flag: str) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"A slot limit must be a positive integer, got {limit!r}.")
        self.limit = limit
        self.what = what
        self.flag = flag
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Slots held now."""
        return self._held

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        """Hold a slot for the block.

        Raises:
            ServiceBusyError: At once, when all ``limit`` slots are held.
        """
        with self._lock:
            if self._held >= self.limit:
                raise ServiceBusyError(f"{self.limit} {self.what} already ({self.flag}); try again shortly.")
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
