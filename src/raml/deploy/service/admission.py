"""Admission control: a bounded number of uploads and decodes in flight, refused at once beyond it.

Contract: ``with slots.take(n):`` holds ``n`` of ``slots.limit`` units for the block, or raises
:class:`ServiceBusyError` at once (never waits) when they do not fit; the HTTP layer answers that with 503 and
``Retry-After``. The service keeps three: request bodies being received (``--max-uploads``), images being
decoded and transformed (``--max-decodes``), and the pixels of those images, read from their headers
(``--max-decode-pixels``), so that the memory a burst of requests can take is bounded *before* any body is
buffered or any pixel decoded (the batching queue's ``--queue-size`` only bounds what waits after decoding).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["ServiceBusyError", "Slots"]


class ServiceBusyError(RuntimeError):
    """What a request needs is all held; try again shortly (HTTP 503 with ``Retry-After``).

    Attributes:
        flag: The command-line flag of the limit reached (the metrics count refusals by it).
    """

    def __init__(self, message: str, flag: str = "") -> None:
        super().__init__(message)
        self.flag = flag


class Slots:
    """``limit`` units taken without waiting (thread-safe): slots (one per holder) or a budget (e.g. pixels).

    Args:
        limit: Most units held at once (positive).
        what: What is held, for the refusal message (e.g. ``"request bodies being received"``).
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
        """Units held now."""
        return self._held

    @contextlib.contextmanager
    def take(self, amount: int = 1) -> Iterator[None]:
        """Hold ``amount`` units (one slot, or e.g. an image's pixels) for the block.

        ``amount`` is admitted when the units held plus ``amount`` stay within ``limit``, or when nothing is held
        (so that one request larger than the whole budget is still served, alone).

        Raises:
            ServiceBusyError: At once, when ``amount`` does not fit.
        """
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"amount must be a non-negative integer, got {amount!r}.")
        with self._lock:
            if self._held > 0 and self._held + amount > self.limit:
                raise ServiceBusyError(
                    f"The service is busy: {self._held} {self.what} in flight, {self.flag} is {self.limit}; "
                    "try again shortly.",
                    self.flag,
                )
            self._held += amount
        try:
            yield
        finally:
            with self._lock:
                self._held -= amount
