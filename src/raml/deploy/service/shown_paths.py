"""Server-side paths as an (unauthenticated) client of ``raml serve`` sees them: never an absolute one.

Contract: a database image's path in a ``/search`` answer is :meth:`DatabaseRoots.shown`, the path relative to
the *database root* of the generation that answered (:func:`database_root`: the deepest folder holding every
absolute path of that generation, e.g. ``001.Black_footed_Albatross/x.jpg`` for an index of
``/data/CUB_200_2011/images``); where that folder is the file system's root (images appended from unrelated
trees, e.g. ``/home/...`` and ``/mnt/...``), the image's folder and name alone (``001/x.jpg``). A path stored
relative (an index written before paths were made absolute) is shown as stored. A file the service was started
with (the index directory, the networks) is shown by its name only (:func:`shown_name`). The image's id stays
the stable way to name it (``GET /image/ID``); the root may change with a generation that adds or removes images
elsewhere.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

from raml.deploy.store import DatabaseIndex

__all__ = ["DatabaseRoots", "database_root", "shown_name"]


def database_root(paths: Sequence[str]) -> str | None:
    """The deepest folder holding every absolute path of ``paths`` (removed images' empty rows skipped), or None
    when none is absolute."""
    folders = {os.path.dirname(path) for path in paths if path and os.path.isabs(path)}
    return os.path.commonpath(sorted(folders)) if folders else None


def shown_name(path: str | Path | None) -> str | None:
    """The last component of ``path`` (a file's name), None for None."""
    return Path(path).name if path is not None else None


class DatabaseRoots:
    """The database root of each index being served, computed once per loaded generation (the watcher thread
    computes it when it accepts a generation: :meth:`root`), forgotten when that index is collected."""

    def __init__(self) -> None:
        self._roots: dict[int, str | None] = {}
        self._lock = threading.Lock()

    def root(self, index: DatabaseIndex) -> str | None:
        """:func:`database_root` of ``index.paths``."""
        key = id(index)
        with self._lock:
            if key in self._roots:
                return self._roots[key]
        root = database_root(index.paths)
        with self._lock:
            if key not in self._roots:
                self._roots[key] = root
                weakref.finalize(index, self._forget, key)  # before the id can name another object
        return root

    def _forget(self, key: int) -> None:
        with self._lock:
            self._roots.pop(key, None)

    def shown(self, index: DatabaseIndex, image_id: int) -> str:
        """The path of image ``image_id`` of ``index`` as a client sees it: relative to the index's root."""
        path = index.paths[image_id]
        if not os.path.isabs(path):
            return path
        root = self.root(index)
        if root is None or os.path.dirname(root) == root:  # images under unrelated trees: the common folder is
            return os.path.join(*Path(path).parts[-2:])  # the file system's root; show the folder and the name
        return os.path.relpath(path, root)
