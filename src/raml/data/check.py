"""Bad-image detection: find the files of a split that would stop a run, and a policy for what to do.

Contracts:

- :func:`check_image`: file -> ``None`` (fine) or a short reason (``"missing file"``, ``"truncated JPEG
  (...)"``, ...). The fast mode (default) reads headers and the file's structure (its end, or block lengths)
  only, never pixels, for the formats of :data:`TAIL_CHECKED_FORMATS` (JPEG, PNG, BMP, GIF, WebP), and decodes an
  image of any other format (TIFF, PPM, ...); ``full_decode=True`` decodes every image with
  :func:`raml.data.images.load_image`.
- :func:`scan_split`: :class:`~raml.data.splits.Split` -> ``list[BadImage]`` in split order.
- :func:`drop_bad_images`: split + bad images -> a new split without them (emptied classes removed, labels
  renumbered ``0..C'-1`` in class order).
- :func:`apply_bad_image_policy`: ``"error"`` raises :class:`BadImagesError` naming every bad file;
  ``"skip"`` drops them, logs each one and writes ``skipped_images_<split>.txt``.

What the fast mode finds: missing, empty or non-regular files; files PIL cannot identify (text, HTML error
pages, zero-size images); modes that cannot be converted to RGB; truncated JPEGs (no end-of-image marker
``FF D9`` after the start of the scan data), PNGs (no ``IEND`` chunk), BMPs (shorter than the pixel data
their header describes) and GIFs (the blocks, walked by their lengths, end before the trailer byte ``3B``);
truncated WebPs (PIL refuses to open them); a file of another format PIL reads (TIFF, PPM, ICO, ...) is decoded,
so a truncated one is found too. Grayscale, CMYK, palette, RGBA and 16-bit images are fine:
:func:`~raml.data.images.load_image` converts them.

What only ``full_decode=True`` finds: errors inside the compressed data, e.g. a stray marker in a JPEG's
scan (PIL: ``broken data stream``). Note that libjpeg only *warns* about most corrupt entropy-coded data
(bytes overwritten with zeros or noise): PIL then decodes such a JPEG to garbage pixels without an error, so
neither mode can detect it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from raml.data.image_limits import ImageTooLargeError, check_resized_size, check_size_within_limit
from raml.data.images import ImageLoadError, load_image, to_rgb
from raml.data.splits import Split
from raml.utils import atomic_write_text

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
"""Valid values of ``--bad-images``: stop with a list of the bad files, or leave them out of the split."""

TAIL_BYTES = 1024
"""How far from the end of a JPEG/PNG the end marker is first looked for (trailing bytes are tolerated)."""

MAX_LISTED = 50
"""Bad files listed in a :class:`BadImagesError` message when the full list is also written to a file."""

CHECK_IN_FLIGHT = 4096
"""Most images :func:`scan_split` has handed to its threads and not yet collected (bounds its memory)."""

_JPEG_FORMATS = ("JPEG", "MPO")
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND"
_BMP_UNCOMPRESSED = (0, 3, 6)  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows of raw pixels
_GIF_TRAILER = b"\x3b"
_GIF_TRUNCATED = "truncated GIF (its blocks end before the trailer byte 3B)"
TAIL_CHECKED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP")
"""PIL format names whose truncation the fast check finds without decoding pixels: from the file's structure, or
for WebP when PIL opens it (libwebp's demuxer parses the whole file and refuses a truncated one). An image of any
other format (TIFF, PPM, ICO, ...) is decoded by the fast check too, so a truncated one is found either way."""


@dataclass(frozen=True)
class BadImage:
    """An image file of a split that cannot be used.

    Attributes:
        path: The path as in the split (relative to the split's ``root``).
        reason: Why it is bad, in a few words.
    """

    path: str
    reason: str


# ------------------------------------------------------------------------------------------- single files


@functools.cache
def _mode_problem(mode: str) -> str | None:
    """None if :func:`to_rgb` converts ``mode``; else why not. Tried on a 1x1 image: no file pixels needed."""
    try:
        to_rgb(Image.new(mode, (1, 1)))
    except Exception as exc:  # PIL raises ValueError, KeyError, ... for modes it cannot create or convert
        return f"unsupported mode {mode!r}: cannot convert it to RGB ({type(exc).__name__}: {exc})"
    return None


def _find_from(f: BinaryIO, needle: bytes, start: int, chunk_size: int = 1 << 20) -> bool:
    """Whether ``needle`` occurs in the file at or after byte ``start`` (read in chunks, never all at once)."""
    f.seek(start)
    carry = b""
    while chunk := f.read(chunk_size):
        if needle in carry + chunk:
            return True
        carry = chunk[-(len(needle) - 1) :]
    return False


def _has_end_marker(f: BinaryIO, size: int, needle: bytes, start: int) -> bool:
    """Whether ``needle`` occurs at or after ``start``: the last :data:`TAIL_BYTES` first (the common case,
    one small read), then everything after ``start`` (files with a long trailer, e.g. a motion photo's video
    appended after the JPEG's end marker)."""
    tail_start = max(start, size - TAIL_BYTES)
    f.seek(tail_start)
    if needle in f.read():
        return True
    return tail_start > start and _find_from(f, needle, start)


def _jpeg_scan_start(f: BinaryIO, size: int) -> int:
    """Offset of the first entropy-coded byte (just after the first SOS segment), or ``size`` if none.

    Walking the marker segments by their lengths skips tables and embedded EXIF thumbnails, whose own
    ``FF D9`` must not count as the end of the image. Returns 0 when the structure is not understood (then
    the whole file is searched, as a plain tail search would).
    """
    f.seek(0)
    if f.read(2) != b"\xff\xd8":
        return 0
    pos = 2
    while pos + 4 <= size:
        f.seek(pos)
        head = f.read(4)
        if head[0] != 0xFF:
            return 0
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length field
            pos += 2
            continue
        length = int.from_bytes(head[2:4], "big")
        if length < 2:
            return 0
        pos += 2 + length
        if marker == 0xDA:  # start of scan
            return min(pos, size)
    return size


def _bmp_problem(f: BinaryIO, size: int) -> str | None:
    """A BMP shorter than its pixel data: for uncompressed data the extent is computed from the header (offset +
    padded row size x rows), for compressed data it is the header's image size (else its file size)."""
    f.seek(0)
    head = f.read(38)
    if len(head) < 26:
        return None  # PIL identified it; a header this short is not understood here
    file_size = int.from_bytes(head[2:6], "little")
    data_offset = int.from_bytes(head[10:14], "little")
    dib_size = int.from_bytes(head[14:18], "little")
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides, no compression field
        width = int.from_bytes(head[18:20], "little")
        height = int.from_bytes(head[20:22], "little")
        bits, compression, image_bytes = int.from_bytes(head[24:26], "little"), 0, 0
    elif len(head) >= 38:
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = int.from_bytes(head[22:26], "little", signed=True)
        bits = int.from_bytes(head[28:30], "little")
        compression = int.from_bytes(head[30:34], "little")
        image_bytes = int.from_bytes(head[34:38], "little")
    else:
        return None
    if compression in _BMP_UNCOMPRESSED:
        end = data_offset + (bits * abs(width) + 31) // 32 * 4 * abs(height)
        what = "its pixel data end"
    elif image_bytes > 0:
        end, what = data_offset + image_bytes, "its compressed pixel data end"
    else:
        end, what = file_size, "the file ends"
    if size < end:
        return f"truncated BMP ({size} bytes; the header says {what} at byte {end})"
    return None


def _gif_problem(f: BinaryIO) -> str | None:
    """A GIF whose blocks run out before the trailer byte ``3B`` (each block is walked by its lengths: a ``3B``
    byte inside the compressed data does not count)."""
    f.seek(10)
    flags = f.read(1)
    if not flags:
        return _GIF_TRUNCATED
    pos = 13 + (3 << ((flags[0] & 7) + 1) if flags[0] & 0x80 else 0)  # after the global colour table
    f.seek(pos)
    while True:
        introducer = f.read(1)
        if not introducer:
            return _GIF_TRUNCATED
        if introducer == _GIF_TRAILER:
            return None
        if introducer == b"\x21":  # extension: a label byte, then sub-blocks
            if not f.read(1):
                return _GIF_TRUNCATED
        elif introducer == b"\x2c":  # image: a 9-byte descriptor, a local colour table, the LZW code size
            descriptor = f.read(9)
            if len(descriptor) < 9:
                return _GIF_TRUNCATED
            table = 3 << ((descriptor[8] & 7) + 1) if descriptor[8] & 0x80 else 0
            f.seek(table, 1)
            if not f.read(1):
                return _GIF_TRUNCATED
        else:
            return None  # a structure not understood here: left to PIL (and to --full-decode)
        while True:  # sub-blocks: a length byte, that many bytes; a zero length ends them
            length = f.read(1)
            if not length:
                return _GIF_TRUNCATED
            if length[0] == 0:
                break
            f.seek(length[0], 1)


def _tail_problem(f: BinaryIO, size: int, fmt: str | None) -> str | None:
    if fmt in _JPEG_FORMATS:
        if not _has_end_marker(f, size, _JPEG_EOI, _jpeg_scan_start(f, size)):
            return "truncated JPEG (no end-of-image marker FF D9 after the scan data)"
    elif fmt == "PNG" and not _has_end_marker(f, size, _PNG_IEND, 8):
        return "truncated PNG (no IEND chunk)"
    elif fmt == "BMP":
        return _bmp_problem(f, size)
    elif fmt == "GIF":
        return _gif_problem(f)
    return None


def _header_problem(path: Path, image_size: int | None = None) -> tuple[str | None, str | None]:
    """The fast checks: file, header, size (and the size once resized to ``image_size``), mode and end marker; no
    pixel is decoded. Returns the problem (None: none found) and PIL's format name (None: not identified)."""
    if not path.exists():
        return "missing file", None
    if not path.is_file():
        return "not a regular file", None
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)", None
    with open(path, "rb") as f:
        try:
            img = Image.open(f)
        except UnidentifiedImageError:
            return "not an image (PIL cannot identify the format)", None
        except Exception as exc:  # DecompressionBombError, SyntaxError, struct.error, ...
            return f"unreadable image header ({type(exc).__name__}: {exc})", None
        with img:  # closing the image also closes ``f``: finish all reads inside
            fmt = img.format
            width, height = img.size
            if width <= 0 or height <= 0:
                return f"zero-size image ({width}x{height})", fmt
            if image_size is not None:
                try:
                    check_resized_size(width, height, image_size)
                except ImageTooLargeError as refused:
                    return f"too large once resized ({refused})", fmt
            problem = _mode_problem(img.mode)
            if problem is not None:
                return problem, fmt
            return _tail_problem(f, size, fmt), fmt


def _decode_problem(path: Path) -> str | None:
    try:
        load_image(path)
    except ImageLoadError as exc:
        cause = exc.__cause__
        if cause is not None:
            return f"decoding failed ({type(cause).__name__}: {cause})"
        return f"decoding failed ({exc})"
    return None


def _one_line(text: str) -> str:
    """Reasons go into ``path<TAB>reason`` report lines: no tabs or newlines."""
    return " ".join(text.split())


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not valid UTF-8 (lone surrogates, as Python decodes such a
    name) spelled as backslash escapes (``"caf\\udce9.jpg"`` -> ``"caf\\\\xe9.jpg"``): printable on any UTF-8
    stream."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (e.g. from a split file's "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_image(path: Path, full_decode: bool = False, image_size: int | None = None) -> str | None:
    """Check one image file.

    Args:
        path: The image file.
        full_decode: After the fast checks, also decode every pixel with :func:`raml.data.images.load_image`
            (slower; finds corrupt compressed data that the headers do not show).
        image_size: The largest evaluation size S the image will be used at (the resized size grows with S, so
            checking the largest covers the smaller ones): an image that the evaluation transform would resize
            to more than :data:`raml.data.image_limits.DEFAULT_MAX_PIXELS` pixels (an extreme aspect ratio) is
            bad. None: not checked. At a size where every image would be (even a square one), the reason blames
            the size; :func:`scan_split` refuses such a size before reading any file.

    Returns:
        None if the image is usable, else a short reason such as ``"missing file"``, ``"empty file (0
        bytes)"``, ``"not an image (...)"`` or ``"truncated JPEG (...)"``.
    """
    path = Path(path)
    try:
        problem, fmt = _header_problem(path, image_size)
        if problem is None and (full_decode or fmt not in TAIL_CHECKED_FORMATS):
            problem = _decode_problem(path)
    except OSError as exc:  # permission denied, I/O error, a file removed while being checked, ...
        problem = f"cannot read the file ({type(exc).__name__}: {exc})"
    return None if problem is None else _one_line(problem)


# -------------------------------------------------------------------------------------------------- splits


def scan_split(
    split: Split, full_decode: bool = False, workers: int = 1, progress: bool = False, image_size: int | None = None
) -> list[BadImage]:
    """Check every image of a split.

    Args:
        split: The split; its paths are checked under ``split.root``.
        full_decode: Decode every image too (see :func:`check_image`).
        workers: Threads checking files in parallel (the fast mode mostly waits on file reads).
        progress: Show a tqdm progress bar.
        image_size: The evaluation size the images will be used at (see :func:`check_image`), or None.

    Returns:
        The bad images, in split order (empty if all are fine).

    Raises:
        ImageSizeTooLargeError: (a ValueError) ``image_size`` is so large that every image would be too large
            once resized, even a square one: refused before any file is read, naming the largest size allowed.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    if image_size is not None:
        check_size_within_limit(image_size)  # the size itself, not every image in turn
    mode = "full decode" if full_decode else "headers"
    root = split.root

    def check(path: str) -> str | None:
        return check_image(root / path, full_decode=full_decode, image_size=image_size)

    # only the bad images are kept: at most CHECK_IN_FLIGHT paths are checked or waiting at once and a Path is
    # made just before its check, so memory does not grow with the number of images
    bad: list[BadImage] = []
    with tqdm(total=len(split), desc=f"check {split.name} ({mode})", unit="img", disable=not progress) as bar:
        if workers == 1:
            reasons: Iterable[str | None] = map(check, split.paths)
            bad = _collect_bad(split.paths, reasons, bar)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raml-check") as pool:
                reasons = _bounded_map(pool, check, split.paths, CHECK_IN_FLIGHT)
                bad = _collect_bad(split.paths, reasons, bar)
    logger.info("Checked %d images of %s (%s): %d bad.", len(split), split.name, mode, len(bad))
    return bad


def _collect_bad(paths: Sequence[str], reasons: Iterable[str | None], bar: tqdm) -> list[BadImage]:
    """The bad images of ``paths`` given each one's reason (None: usable), in order; ticks ``bar`` per image."""
    bad = []
    for path, reason in zip(paths, reasons, strict=True):
        bar.update(1)
        if reason is not None:
            bad.append(BadImage(path, reason))
    return bad


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[str], str | None], items: Iterable[str], in_flight: int
) -> Iterator[str | None]:
    """``fn`` of each item, in order, with at most ``in_flight`` submitted and not yet yielded.

    ``pool.map`` submits every item up front (one future per image, about 2 KiB each); this keeps the
    threads busy with a bounded queue instead. When ``fn`` raises, the error comes out at its item and the
    items not yet started are cancelled.
    """
    pending: deque[Future[str | None]] = deque()
    try:
        for item in items:
            if len(pending) >= in_flight:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:  # an error (or Ctrl-C, or a consumer that stops) cancels what has not started, as pool.map does
        for future in pending:
            future.cancel()


def drop_bad_images(split: Split, bad: Sequence[BadImage]) -> Split:
    """A new split without the bad images.

    Classes left without images are removed and the labels renumbered ``0..C'-1`` in the original class
    order (a warning names the removed classes). ``name`` and ``root`` are kept. Bad images whose path is
    not in the split are ignored with a warning.

    Args:
        split: The split.
        bad: The images to leave out (e.g. from :func:`scan_split`).

    Returns:
        The filtered split (``split`` itself when ``bad`` is empty).

    Raises:
        ValueError: Every image of the split is bad.
    """
    if not bad:
        return split
    drop = {b.path for b in bad}
    unknown = drop.difference(split.paths)
    if unknown:
        logger.warning(
            "Split %r: %d of the bad images are not in it and were ignored: %s",
            split.name,
            len(unknown),
            printable(", ".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else "")),
        )
    kept = [(p, y) for p, y in zip(split.paths, split.labels, strict=True) if p not in drop]
    if not kept:
        raise ValueError(
            f"Split {split.name!r}: all {len(split)} images are bad (under {split.root}); nothing is left. "
            "Fix the files or the split."
        )
    kept_labels = sorted({y for _, y in kept})
    new_label = {old: new for new, old in enumerate(kept_labels)}
    removed = sorted(set(split.labels).difference(new_label))
    if removed:
        first_image = {}
        for p, y in zip(split.paths, split.labels, strict=True):
            first_image.setdefault(y, p)
        logger.warning(
            "Split %r: removed %d class(es) whose images were all bad: %s; labels renumbered 0..%d.",
            split.name,
            len(removed),
            printable(", ".join(f"class {y} (first image {first_image[y]})" for y in removed)),
            len(kept_labels) - 1,
        )
    return Split(
        name=split.name,
        root=split.root,
        paths=tuple(p for p, _ in kept),
        labels=tuple(new_label[y] for _, y in kept),
    )


class BadImagesError(ValueError):
    """A split holds bad images and the policy is ``"error"``.

    Args:
        split_name: The split's name.
        root: The split's root (paths are relative to it).
        bad: Every bad image.
        total: Number of images in the split (for the message), if known.
        report_file: A file listing all bad images; when given, the message lists at most
            :data:`MAX_LISTED` and points to it.
    """

    def __init__(
        self,
        split_name: str,
        root: Path,
        bad: Sequence[BadImage],
        total: int | None = None,
        report_file: Path | None = None,
    ) -> None:
        self.split_name = split_name
        self.root = Path(root)
        self.bad = list(bad)
        self.report_file = report_file
        of = f" of {total}" if total is not None else ""
        lines = [f"Split {split_name!r} (under {self.root}): {len(self.bad)}{of} images are bad:"]
        listed = self.bad if report_file is None else self.bad[:MAX_LISTED]
        lines += [f"  {b.path}: {b.reason}" for b in listed]
        if len(listed) < len(self.bad):
            lines.append(f"  ... and {len(self.bad) - len(listed)} more; full list in {report_file}")
        lines.append(
            "Fix or remove these files (and their entries in the split), or pass --bad-images skip to leave them "
            "out of the run (each skipped file is then logged and recorded with the run's outputs)."
        )
        # a file name that is not valid UTF-8 spelled with backslash escapes: the message prints anywhere
        super().__init__(printable("\n".join(lines)))


def report_file_name(prefix: str, split_name: str) -> str:
    """``<prefix>_<split name>.txt`` with characters unsafe in file names (``/``, ``:``, ...) replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", split_name).strip("._") or "split"
    return f"{prefix}_{safe}.txt"


def write_bad_image_report(path: Path, bad: Sequence[BadImage]) -> None:
    """Write ``path<TAB>reason`` lines, one per bad image (atomically, in UTF-8; a file name that is not valid
    UTF-8 is written as its own bytes, a lone surrogate that stands for no byte as its escape ``\\ud800``, see
    :func:`raml.utils.atomic_write_text`)."""
    atomic_write_text(path, "".join(f"{b.path}\t{_one_line(b.reason)}\n" for b in bad))


def apply_bad_image_policy(
    split: Split,
    policy: str,
    full_decode: bool = False,
    workers: int = 1,
    report_dir: Path | None = None,
    progress: bool = False,
    image_size: int | None = None,
) -> tuple[Split, list[BadImage]]:
    """Scan a split and apply a bad-image policy, before a long run starts rather than hours into it.

    Args:
        split: The split.
        policy: ``"error"``: raise if any image is bad (with ``report_dir``, the full list is also written to
            ``<report_dir>/bad_images_<split>.txt``). ``"skip"``: leave the bad images out, log a warning
            naming each one, and (with ``report_dir``) write ``<report_dir>/skipped_images_<split>.txt`` with
            ``path<TAB>reason`` lines (an empty file when nothing was skipped).
        full_decode: Decode every image too (see :func:`check_image`).
        workers: Threads checking files in parallel.
        report_dir: Where to write the list of bad files, or None.
        progress: Show a tqdm progress bar.
        image_size: The evaluation size the images will be used at: images too large once resized to it are bad
            (see :func:`check_image`). None: not checked.

    Returns:
        The split to use (filtered with ``"skip"``) and the bad images found.

    Raises:
        ValueError: Unknown policy, or (with ``"skip"``) every image is bad, or ``image_size`` too large for any
            image (:class:`~raml.data.image_limits.ImageSizeTooLargeError`, before any file is read).
        BadImagesError: Policy ``"error"`` and at least one bad image.
    """
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"Unknown bad-image policy {policy!r}; valid policies: {', '.join(BAD_IMAGE_POLICIES)}.")
    bad = scan_split(split, full_decode=full_decode, workers=workers, progress=progress, image_size=image_size)
    if policy == "error":
        if not bad:
            return split, bad
        report = None
        if report_dir is not None:
            report = Path(report_dir) / report_file_name("bad_images", split.name)
            write_bad_image_report(report, bad)
        raise BadImagesError(split.name, split.root, bad, total=len(split), report_file=report)

    report = None
    if report_dir is not None:
        report = Path(report_dir) / report_file_name("skipped_images", split.name)
        write_bad_image_report(report, bad)
    if bad:
        listing = "\n".join(printable(f"  {b.path}: {b.reason}") for b in bad)
        where = f" (list in {report})" if report is not None else ""
        logger.warning(
            "Split %r (under %s): skipping %d of %d images that are bad%s:\n%s",
            split.name,
            printable(str(split.root)),
            len(bad),
            len(split),
            printable(where),
            listing,
        )
    return drop_bad_images(split, bad), bad
