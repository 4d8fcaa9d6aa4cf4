"""Image files to index or query: a folder's images, a list file's paths, duplicate keys, existence checks.

Contract: each function returns or checks plain path strings (``str``), in a stable order (a folder: sorted by
the path relative to it; a list file: its line order).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from raml.data.images import ImageLoadError
from raml.data.splits import IMAGE_EXTENSIONS

__all__ = ["check_images_exist", "collect_images", "image_key", "read_image_list"]


def collect_images(directory: str | Path) -> list[str]:
    """Image files under ``directory`` (recursively), sorted by their path relative to it.

    Args:
        directory: A folder; files with an extension in ``raml.data.splits.IMAGE_EXTENSIONS`` (any case)
            are taken, hidden files and folders are skipped.

    Returns:
        Paths as ``str(directory / relative_path)`` (relative when ``directory`` is relative).

    Raises:
        FileNotFoundError: If ``directory`` is not a folder.
        ValueError: If it holds no image.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {str(directory)!r} is not a folder; give a folder of images.")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(directory)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    if not found:
        raise ValueError(
            f"No images found under {str(directory)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)."
        )
    return [str(directory / rel) for rel in sorted(found)]


def read_image_list(list_file: str | Path, flag: str = "--list") -> list[str]:
    """Image paths listed in a text file, one per line.

    Lines end at ``\n`` only; ASCII spaces, tabs and a ``\r`` (Windows line ends) at either end of a line are
    dropped, and every other character is part of the path, Unicode separators (U+2028, U+0085,
    ``\x1c``-``\x1e``) and non-breaking spaces included. A blank line is skipped, and so is a comment: a line
    whose first character other than blanks is ``#`` (list a path that starts so as ``./#name``). Relative paths are
    relative to the list file's folder (returned as ``str(list_folder / path)``), absolute paths are kept.

    Args:
        list_file: The text file.
        flag: The command-line flag that named it, for the error messages.

    Raises:
        FileNotFoundError: If the list file does not exist.
        ValueError: If it is a folder, is not UTF-8 text, or lists no path.
    """
    list_file = Path(list_file)
    if list_file.is_dir():
        raise ValueError(f"{flag} {str(list_file)!r} is a folder; give a text file with one image path per line.")
    if not list_file.is_file():
        raise FileNotFoundError(
            f"{flag} {str(list_file)!r} does not exist; give a text file with one image path per line."
        )
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{flag} {str(list_file)!r} is not UTF-8 text (byte {error.start} cannot be decoded); give a text file "
            "with one image path per line."
        ) from None
    paths = []
    for line in text.split("\n"):
        entry = line.strip(_LINE_BLANKS)  # a hand-edited list's stray spaces; other characters are the path's
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        paths.append(str(path if path.is_absolute() else list_file.parent / path))
    if not paths:
        raise ValueError(f"{flag} {str(list_file)!r} lists no image paths (one path per line expected).")
    return paths


_LINE_BLANKS = " \t\r"
"""What :func:`read_image_list` removes at either end of a line: ASCII spaces, tabs and a Windows line end."""


def image_key(path: str) -> str:
    """Identity of an image file for duplicate detection: its normalised absolute path.

    The normalisation is lexical (fast: no file system access), except where a ``..`` component follows a
    symbolic link: ``a/link/..`` is the folder that ``link`` points into, not ``a``. So a path with a ``..``
    (rare in practice; no other path is resolved) has the part up to its last ``..`` resolved with
    :func:`os.path.realpath`, and if that differs from the resolved lexical form, the resolved part is the key's
    (a file reached through linked folders under two names may still have two identities, never two files one).
    """
    lexical = os.path.normcase(os.path.abspath(path))
    if ".." not in path:  # a cheap test first: most paths have no '..' at all
        return lexical
    parts = re.split(_SEPARATORS, path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    if ".." not in parts:  # e.g. 'a..b.jpg'
        return lexical
    last = len(parts) - 1 - parts[::-1].index("..")
    head = os.sep.join(parts[: last + 1]) or os.sep
    real_head = os.path.realpath(head)
    if real_head == os.path.realpath(os.path.normpath(head)):  # no '..' stepped out of a linked folder
        return lexical
    return os.path.normcase(os.path.abspath(os.path.join(real_head, *parts[last + 1 :])))


_SEPARATORS = "[" + re.escape(os.sep + (os.altsep or "")) + "]"
"""A path separator of this system (Windows: either slash)."""


def check_images_exist(paths: Sequence[str]) -> None:
    """Raise :class:`~raml.data.images.ImageLoadError` naming the missing files, before any embedding."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5])
        raise ImageLoadError(
            f"{len(missing)} of {len(paths)} images do not exist (e.g. {shown}); fix the paths (relative paths "
            "in a list file are relative to the list file's folder)."
        )
