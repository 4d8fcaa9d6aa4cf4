"""The index a running service searches, switched to each new generation ``raml index`` commits.

Contract: :attr:`LiveIndex.current` is always one fully loaded :class:`~raml.deploy.store.DatabaseIndex`. A
watcher thread reads the committed generation number every ``poll_interval_s`` (one small file:
:func:`raml.deploy.store.committed_generation`); when it changed, it loads that generation completely
(:func:`raml.deploy.store.load_index`, no lock taken), checks it with ``accept`` and only then replaces the
reference. A reader that took :attr:`current` keeps a consistent index for as long as it holds it, so a
batch never sees a half-loaded or mixed index. A generation that fails to load or is refused is logged and
the previous one stays in service (it is tried again when the generation number changes again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from raml.deploy.store import DatabaseIndex, IndexDirectoryError, committed_generation, load_index

logger = logging.getLogger(__name__)

__all__ = ["LiveIndex"]


class LiveIndex:
    """Holds the served index and swaps in newly committed generations.

    Args:
        directory: The index directory.
        accept: Called with a newly loaded index before it is served; raises ``ValueError`` to refuse it
            (e.g. a dimension the query network cannot search).
        poll_interval_s: Seconds between two reads of the committed generation number.
    """

    def __init__(
        self,
        directory: str | Path,
        accept: Callable[[DatabaseIndex], None] | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s!r}.")
        self.directory = Path(directory)
        self._accept = accept or (lambda index: None)
        self.poll_interval_s = float(poll_interval_s)
        first = load_index(self.directory)
        self._accept(first)
        self._current = first
        self._refused: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> DatabaseIndex:
        """The index to search now (a plain reference read: atomic)."""
        return self._current

    def check(self) -> bool:
        """Swap in the committed generation if it is new; returns True when a new one is now served."""
        try:
            generation = committed_generation(self.directory)
        except IndexDirectoryError as error:
            logger.warning(
                "Cannot read the index generation at %s (%s); still serving generation %d",
                self.directory,
                error,
                self._current.generation,
            )
            return False
        if generation == self._current.generation or generation == self._refused:
            return False
        try:
            candidate = load_index(self.directory)
            self._accept(candidate)
        except (IndexDirectoryError, ValueError) as error:
            self._refused = generation
            logger.error(
                "Not serving generation %d of %s: %s; still serving generation %d",
                generation,
                self.directory,
                error,
                self._current.generation,
            )
            return False
        previous = self._current.generation
        self._current = candidate
        logger.info(
            "Serving generation %d of %s (%d images; was generation %d)",
            candidate.generation,
            self.directory,
            len(candidate),
            previous,
        )
        return True

    def start(self) -> None:
        """Start the watcher thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="raml-index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.poll_interval_s + 10)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check()
            except Exception:  # never let the watcher die: the service keeps the index it has
                logger.exception("Unexpected error while checking %s for a new generation", self.directory)
