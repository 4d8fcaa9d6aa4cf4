"""Safe unpacking of downloaded dataset files into a dataset folder.

Contract: an unpacker maps ``(file, dest)`` -> regular files and folders written under ``dest``; on any error
it raises and removes everything it wrote (``dest`` is as it was before).

- :class:`TarArchive`: ``.tar``/``.tgz`` (plain or gzip), optionally dropping the first ``strip_components``
  path components of every member as GNU ``tar --strip-components`` does (members with fewer components are
  skipped).
- :class:`ZipArchive`: ``.zip`` (stored or deflated members), optionally removing a leading ``strip_prefix``
  from member names (the effect of the README's ``ln -s . Stanford_Online_Products && unzip ...``; other
  members keep their name).
- :class:`PlainFile`: a file that is not an archive (``cars_annos.mat``), copied into ``dest``.

Safety (the archive is untrusted: the official Cars URL is plain ``http://``):

1. Every member is checked before anything is written (a first pass over a tar's headers; a zip's central
   directory): only regular files and folders are accepted. Symbolic links, hard links, devices, FIFOs and
   sparse files (GNU type ``S`` and PAX-format sparse members alike) are refused whatever the Python version
   (the datasets hold none, and links are how ``tarfile``'s own ``"data"`` filter was bypassed before Python
   3.11.13 / 3.12.11, CVE-2025-4517). Absolute names, ``..`` components, NUL bytes and over-long names are
   refused; so are encrypted zip members, zip compression methods other than stored/deflated, and tar
   compressions other than gzip.
2. The members' sizes (from the headers, which are what gets written: ``tarfile`` reads exactly that many
   bytes and ``zipfile`` stops at the declared size) are added up before writing, each file and each folder
   it creates charged :data:`MEMBER_BYTES` more (a filesystem block and an inode: empty files and folders
   take disk space too, and an archive of a million of them is a few MB; the ratio does not charge the first
   :data:`RATIO_FREE_MEMBERS`); a member that creates nothing (a folder already made, a skipped member) is
   charged its header and name bytes instead, so that repeating one member costs too: more than the free space
   (:class:`InsufficientSpaceError`) or more than ``max_ratio`` times the archive's own size
   (:data:`MAX_UNPACK_RATIO`, ``--max-unpack-ratio``; not applied below :data:`UNPACK_GRACE_BYTES`) is
   refused. The gzip size trailer, which wraps at 4 GiB and can be forged, is not used. Bytes decompressed but
   never written (headers, members skipped by ``strip_components``) count too: a tar whose stream runs past the
   ratio's cap plus :data:`UNPACK_GRACE_BYTES` and the free entries' allowance is refused as it gets there.
3. Members are written by this module (never ``tarfile.extract``/``zipfile.extract``): into paths built
   from the checked name under the resolved ``dest``, every folder on the way checked to be a real folder
   (not a link; once per unpacking: later members under it find it among the checked ones), files created
   with ``O_EXCL | O_NOFOLLOW``. Bytes are counted while writing: past the
   limits (every created file and folder counted as :data:`MEMBER_BYTES` more), or when the disk's free
   space falls below what is left to write (checked at every member and every :data:`FREE_SPACE_CHECK_BYTES`),
   unpacking stops and what it wrote is removed.
4. Memory stays bounded: members are streamed (``tarfile``'s member list is not kept), no single read by
   ``tarfile`` may exceed :data:`MAX_READ_BYTES` (a PAX header or long name bigger than that is refused), and
   at most :data:`MAX_MEMBERS` members are accepted.

A damaged archive (truncated, bad CRC, wrong gzip length, not an archive) raises :class:`ArchiveError`
naming the file. The documented errors are :class:`ArchiveError` and :class:`InsufficientSpaceError`.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from tqdm import tqdm

logger = logging.getLogger(__name__)

MAX_UNPACK_RATIO = 20.0
"""Default ``--max-unpack-ratio``: the members may hold at most this many times the archive's size. The
datasets are JPEG photos, which gzip/deflate barely shrink; 16 MiB of zeros gzip about 1000 times."""
UNPACK_GRACE_BYTES = 1 << 20
"""The ratio is not applied to archives whose members hold less than this (small, very compressible files)."""
MAX_MEMBERS = 1_000_000
"""Most members an archive may hold (SOP, the largest dataset, has about 120,000 files)."""
MAX_NAME_BYTES = 1024
"""Longest member name (UTF-8 bytes); a single component may not exceed 255 bytes either."""
MAX_READ_BYTES = 1 << 20
"""Largest single read ``tarfile`` may make (PAX headers and GNU long names are read whole)."""
MEMBER_BYTES = 4096
"""What each created file and folder is charged beyond its content, in the ratio and free-space checks: a
filesystem block (and an inode), which an empty file or folder takes on disk although it holds no bytes."""
RATIO_FREE_MEMBERS = 4096
"""The first this many files and folders are not charged :data:`MEMBER_BYTES` in the ratio (16 MiB: small
archives of many tiny files stay accepted, as :data:`UNPACK_GRACE_BYTES` does for content); the free-space
check charges every one."""
FREE_SPACE_CHECK_BYTES = 64 << 20
"""While writing, the free space is checked again at every member and after this many bytes."""
CHUNK = 1 << 20
_ZIP_HEADER_BYTES = 30 + 46
"""A zip member's local header and central directory entry, without the name (which both hold)."""

_DAMAGED = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    zipfile.BadZipFile,
    struct.error,
    UnicodeError,
    ValueError,
    NotImplementedError,
)
"""What the parsers raise on malformed input (``ArchiveError`` is a ``ValueError`` and is re-raised first;
``zipfile`` raises ``NotImplementedError`` for a version field it does not know, while reading the directory)."""

_TAR_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}
_MODE_KINDS = {
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}


class ArchiveError(ValueError):
    """An archive is damaged, too large for its size, or holds a member that is refused."""


class InsufficientSpaceError(OSError):
    """The disk lacks room for a download or an unpacked archive."""


class Unpacker(Protocol):
    """How one downloaded file lands in the dataset folder."""

    def unpack(self, path: Path, dest: Path, *, max_ratio: float = MAX_UNPACK_RATIO, progress: bool = False) -> int:
        """Write the file's content under ``dest``; returns the number of files written."""


def size_text(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def safe_member_name(name: str, archive: Path) -> str:
    """``name`` normalised to ``a/b/c`` form; refuses absolute names, drive letters, ``..`` components, NUL
    bytes and over-long names."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(
            f"{archive}: member {name!r} has an absolute path and would be written outside the target folder; "
            "refusing this archive (nothing of it is kept). Get the file from the official source."
        )
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"{archive}: member {name!r} climbs out of the target folder with '..'; refusing this archive "
            "(nothing of it is kept). Get the file from the official source."
        )
    if "\x00" in name:
        raise ArchiveError(f"{archive}: member {name!r} has a NUL byte in its name; refusing this archive.")
    encoded = [p.encode("utf-8", "surrogateescape") for p in parts]
    if sum(len(p) + 1 for p in encoded) > MAX_NAME_BYTES or any(len(p) > 255 for p in encoded):
        raise ArchiveError(
            f"{archive}: member {name[:80]!r}... has a name longer than {MAX_NAME_BYTES} bytes (or a component "
            "longer than 255); refusing this archive."
        )
    return "/".join(parts)


def _strip(name: str, components: int) -> str | None:
    """GNU tar's ``--strip-components``: None when the name has no more than ``components`` parts."""
    parts = [p for p in name.split("/") if p]
    if len(parts) <= components:
        return None
    return "/".join(parts[components:])


def _damaged(archive: Path, error: BaseException) -> ArchiveError:
    return ArchiveError(
        f"{archive} is damaged ({type(error).__name__}: {error}); it is probably truncated or corrupt. Nothing "
        "was unpacked. Delete it and run the command again to download it anew (or fetch it from a mirror)."
    )


def _refused_kind(archive: Path, name: str, kind: str, target: str = "") -> ArchiveError:
    to = f" to {target!r}" if target else ""
    return ArchiveError(
        f"{archive}: member {name!r} is a {kind}{to}; the datasets hold only regular files and folders, so "
        "anything else is refused (links can lead writes outside the target folder). Nothing of this archive "
        "was written. Get the file from the official source or a trusted mirror."
    )


def _free_space(folder: Path) -> int:
    """Free bytes on the disk of ``folder`` (or of its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(".").free


# --------------------------------------------------------------------------------------------------- limits
class _Budget:
    """The bytes an unpacking may write: checked on the planned total first, then counted while writing."""

    def __init__(self, archive: Path, dest: Path, max_ratio: float) -> None:
        if not max_ratio > 0:
            raise ValueError(f"Expected max_ratio (--max-unpack-ratio) > 0, got {max_ratio}.")
        self.archive, self.dest, self.max_ratio = archive, dest, max_ratio
        self.archive_size = archive.stat().st_size
        self.ratio_cap = max(int(max_ratio * self.archive_size), UNPACK_GRACE_BYTES)
        self.free = _free_space(dest)
        self.planned = 0  # content and MEMBER_BYTES of every entry: what the free space must hold
        self.planned_entries = 0  # of which MEMBER_BYTES charges
        self.written_entries = 0
        self.members = 0
        self._last_folders: list[str] = []  # the folders of the last planned member, to count the new ones
        self.written = 0
        self._next_check = 0

    def _too_large(self, total: int) -> ArchiveError:
        return ArchiveError(
            f"{self.archive}: its members take more than {size_text(total)} (each file and folder counted as "
            f"{size_text(MEMBER_BYTES)} more than its content, beyond the first {RATIO_FREE_MEMBERS}), more than "
            f"{self.max_ratio:g} times "
            f"the archive's {size_text(self.archive_size)} (--max-unpack-ratio {self.max_ratio:g}). Photos hardly "
            "compress, so this looks like a decompression bomb or a forged size; refusing it, and nothing of it "
            "is kept. If the file is genuine, raise --max-unpack-ratio."
        )

    def _no_room(self, total: int) -> InsufficientSpaceError:
        return InsufficientSpaceError(
            f"Not enough free space for unpacking {self.archive.name}: its members take {size_text(total)} but "
            f"{self.dest} has {size_text(self.free)} free. Free some space, or choose a --data-root on a larger "
            "disk. Nothing of it was kept."
        )

    def plan(self, size: int, name: str | None, *, folder: bool = False, header: int = 0) -> None:
        """One more member, before anything is written: ``size`` bytes of content written as ``name`` (None: the
        member is skipped), a file or a ``folder``. Every file, and every folder of ``name`` that the members
        before it (in writing order) did not pass through, is charged :data:`MEMBER_BYTES`: an upper bound of
        what :class:`_Writer` charges for the files and folders it creates. A member that creates nothing (a
        folder already on the way, a skipped member) is charged its ``header`` bytes (its header and name in
        the archive) instead, so that an archive repeating one member many times counts against the limits."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise ArchiveError(
                f"{self.archive}: holds more than {MAX_MEMBERS} members; a dataset has far fewer. Refusing it."
            )
        entries = 0
        if name is not None:
            parts = name.split("/")
            folders = parts if folder else parts[:-1]
            shared = 0
            for mine, last in zip(folders, self._last_folders, strict=False):
                if mine != last:
                    break
                shared += 1
            self._last_folders = folders
            entries = MEMBER_BYTES * (len(folders) - shared + (0 if folder else 1))
        entries = max(entries, header)  # the least a member costs: reading its header
        self.planned_entries += entries
        size += entries
        self.planned += size
        if self._for_ratio(self.planned, self.planned_entries) > self.ratio_cap:  # first: a bomb, not a lack of space
            raise self._too_large(self.planned)
        if self.planned > self.free:
            raise self._no_room(self.planned)

    def read_to(self, position: int) -> None:
        """The archive's decompressed stream has been read (or skipped) up to ``position``: stop once it passes
        the ratio's cap plus :data:`UNPACK_GRACE_BYTES` and the free entries' allowance (headers, and the data
        of members that are never written, are bytes to decompress too)."""
        limit = self.ratio_cap + UNPACK_GRACE_BYTES + RATIO_FREE_MEMBERS * MEMBER_BYTES
        if position > limit:
            raise ArchiveError(
                f"{self.archive}: its decompressed stream runs past {size_text(limit)} (headers and the data of "
                "skipped members included), more than "
                f"{self.max_ratio:g} times the archive's {size_text(self.archive_size)} (--max-unpack-ratio "
                f"{self.max_ratio:g}) allows. This looks like a decompression bomb; refusing it, and nothing of it "
                "is kept. If the file is genuine, raise --max-unpack-ratio."
            )

    @staticmethod
    def _for_ratio(total: int, entries: int) -> int:
        """What the ratio limits of ``total`` bytes of which ``entries`` are :data:`MEMBER_BYTES` charges."""
        return total - min(entries, RATIO_FREE_MEMBERS * MEMBER_BYTES)

    def wrote(self, size: int, *, entry: bool = False) -> None:
        """``size`` more bytes are about to be written (``entry``: the :data:`MEMBER_BYTES` of a file or folder
        about to be created): stop past the limits or when the disk fills up."""
        self.written += size
        self.written_entries += size if entry else 0
        if self._for_ratio(self.written, self.written_entries) > self.ratio_cap:
            raise self._too_large(self.written)
        if self.written > self.free:
            raise self._no_room(self.written)
        if self.written >= self._next_check:
            self.check_disk()

    def check_disk(self) -> None:
        """Stop when the disk's free space is less than what is left to write."""
        self._next_check = self.written + FREE_SPACE_CHECK_BYTES
        remaining = max(self.planned - self.written, 0)
        free = _free_space(self.dest)
        if free < remaining:
            raise InsufficientSpaceError(
                f"The free space on {self.dest} fell to {size_text(free)} while unpacking {self.archive.name}, "
                f"with {size_text(remaining)} of it still to write (another program is filling the disk?); "
                "stopped, and removed what was unpacked of it. Free some space and run the command again."
            )


# --------------------------------------------------------------------------------------------------- writing
class _Writer:
    """Writes members into checked paths under ``dest``, counting bytes; :meth:`undo` removes all it wrote."""

    def __init__(self, archive: Path, dest: Path, budget: _Budget) -> None:
        self.archive, self.budget = archive, budget
        self.dest_existed = dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        self.root = os.path.realpath(dest)
        self.created: list[str] = []  # what undo removes: created paths whose parent was there before
        self._created_dirs: set[str] = set()
        self._folders: set[str] = {self.root}  # folders already checked to be real folders under the root
        self.files = 0

    def _folder(self, name: str, parts: list[str]) -> str:
        """The real path of folder ``parts`` under the root, made where missing; each level must be a folder.
        Each folder is checked once: later members under it (or repeating it) find it in ``_folders``."""
        full = os.path.join(self.root, *parts)
        if full in self._folders:
            return full
        path = self.root
        for part in parts:
            parent, path = path, os.path.join(path, part)
            if path in self._folders:
                continue
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                self.budget.wrote(MEMBER_BYTES, entry=True)  # a folder takes a block and an inode, empty or not
                os.mkdir(path)
                if parent not in self._created_dirs:
                    self.created.append(path)
                self._created_dirs.add(path)
                continue
            if not stat.S_ISDIR(mode):  # a link or a file: never followed
                raise ArchiveError(
                    f"{self.archive}: member {name!r} would be written under {path}, which is not a folder; "
                    "refusing this archive."
                )
        real = os.path.realpath(path)
        if os.path.commonpath([self.root, real]) != self.root:
            raise ArchiveError(f"{self.archive}: member {name!r} resolves outside {self.root}; refusing this archive.")
        # every level is now a real folder under the root; nothing of the archive can turn one into a link later
        # (links are refused, files are created with O_EXCL), so none needs checking again
        level = self.root
        for part in parts:
            level = os.path.join(level, part)
            self._folders.add(level)
        return path

    def directory(self, name: str) -> None:
        self._folder(name, name.split("/"))

    def file(self, name: str, source: BinaryIO) -> None:
        parts = name.split("/")
        folder = self._folder(name, parts[:-1])
        path = os.path.join(folder, parts[-1])
        self.budget.wrote(MEMBER_BYTES, entry=True)  # a file takes a block and an inode, even an empty one
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError as error:
            raise ArchiveError(
                f"{self.archive}: member {name!r} lands on {path}, which already exists (two members with one "
                "name, or a member over a folder); refusing this archive."
            ) from error
        if folder not in self._created_dirs:
            self.created.append(path)
        self.budget.check_disk()
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                self.budget.wrote(len(chunk))
                try:
                    out.write(chunk)
                except OSError as error:
                    if error.errno == errno.ENOSPC:
                        raise InsufficientSpaceError(
                            f"The disk of {self.root} filled up while unpacking {self.archive.name}; stopped, and "
                            "removed what was unpacked of it. Free some space and run the command again."
                        ) from error
                    raise
        self.files += 1

    def undo(self) -> None:
        if not self.dest_existed:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in reversed(self.created):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------- tar
class _BoundedReads:
    """A read-only file object for ``tarfile`` that refuses any single read of more than :data:`MAX_READ_BYTES`
    (``tarfile`` reads PAX headers and long names whole, at the size their header claims)."""

    def __init__(self, raw: BinaryIO, archive: Path, budget: _Budget | None = None) -> None:
        self.raw, self.archive, self.budget = raw, archive, budget

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_READ_BYTES:
            raise ArchiveError(
                f"{self.archive}: holds a header (PAX or long name) of {size} bytes, more than {MAX_READ_BYTES}; "
                "refusing it."
            )
        if self.budget is not None:  # every read, headers included: a chain of them is read within one member
            self.budget.read_to(self.raw.tell() + size)
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.budget is not None:  # a forward seek in a gzip stream decompresses up to it
            target = offset if whence == 0 else self.raw.tell() + offset if whence == 1 else None
            if target is not None:
                self.budget.read_to(target)
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _next_member(tar: tarfile.TarFile, path: Path) -> tarfile.TarInfo | None:
    """``tar.next()``; tarfile reads a chain of extended headers (PAX, GNU long names) by recursion, so a chain of
    thousands ends in a RecursionError: refused as a damaged archive."""
    try:
        return tar.next()
    except RecursionError:
        raise _header_chain(path) from None


def _header_chain(path: Path) -> ArchiveError:
    return ArchiveError(
        f"{path}: holds a chain of thousands of extended headers (PAX or long-name records) before a member; "
        "refusing it."
    )


@dataclass(frozen=True)
class TarArchive:
    """A tar file (plain or gzip), members optionally stripped of leading components."""

    strip_components: int = 0

    def _open(self, path: Path, raw: BinaryIO, budget: _Budget) -> tuple[tarfile.TarFile, BinaryIO]:
        magic = raw.read(6)
        raw.seek(0)
        if magic.startswith(b"\x1f\x8b"):
            stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif magic.startswith((b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")):
            raise ArchiveError(f"{path}: compressed with bzip2, xz or zstd; expected a plain or gzip tar file.")
        else:
            stream = raw
        try:  # opening reads the first member already
            tar = tarfile.open(fileobj=_BoundedReads(stream, path, budget), mode="r:")  # type: ignore[arg-type]  # noqa: SIM115 - returned to the caller, which closes it
        except RecursionError:
            raise _header_chain(path) from None
        return tar, stream

    def _members(
        self, path: Path, tar: tarfile.TarFile, budget: _Budget
    ) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
        """Every member and its checked, stripped name (None: skipped), without keeping the member list; the
        stream's position (past the member's data, read or skipped) is checked against the budget first."""
        while (member := _next_member(tar, path)) is not None:
            tar.members.clear()  # tarfile keeps every member it has read; a header pass must not
            budget.read_to(tar.offset)  # before the next member makes tarfile decompress past a skipped one
            name = _strip(safe_member_name(member.name, path), self.strip_components)
            if member.type in _TAR_KINDS or member.issparse() or not (member.isreg() or member.isdir()):
                kind = _TAR_KINDS.get(member.type, f"member of tar type {member.type!r}")
                if member.issparse():  # GNU type 'S', or a PAX-format sparse member (of type '0')
                    kind = "sparse file"
                raise _refused_kind(path, member.name, kind, member.linkname)
            yield member, name

    def unpack(self, path: Path, dest: Path, *, max_ratio: float = MAX_UNPACK_RATIO, progress: bool = False) -> int:
        budget = _Budget(path, dest, max_ratio)
        try:
            with open(path, "rb") as raw:  # pass 1: every header checked and every size added up
                tar, stream = self._open(path, raw, budget)
                with tar:
                    for member, name in self._members(path, tar, budget):
                        budget.plan(
                            member.size if name is not None and member.isreg() else 0,
                            name,
                            folder=member.isdir(),
                            header=member.offset_data - member.offset,
                        )
                    self._check_end(path, stream, tar.offset)
                    self._drain(path, stream, budget)
        except ArchiveError:
            raise
        except _DAMAGED as error:
            raise _damaged(path, error) from error
        writer = _Writer(path, dest, budget)
        try:
            with (
                open(path, "rb") as raw,
                tqdm(desc=f"unpack {path.name}", unit="file", disable=not progress) as bar,
            ):
                tar, _ = self._open(path, raw, budget)
                with tar:
                    for member, name in self._members(path, tar, budget):  # pass 2: checked again, then written
                        if name is None:
                            continue
                        if member.isdir():
                            writer.directory(name)
                            continue
                        source = tar.extractfile(member)
                        assert source is not None  # a regular file always has one
                        with source:
                            writer.file(name, source)  # type: ignore[arg-type]
                        bar.update(1)
        except BaseException as error:
            writer.undo()
            if isinstance(error, _DAMAGED) and not isinstance(error, ArchiveError):
                raise _damaged(path, error) from error
            raise
        return writer.files

    @staticmethod
    def _check_end(path: Path, stream: BinaryIO, offset: int) -> None:
        """A plain tar must end with the end-of-archive zero block: ``tarfile`` ends quietly where the file
        does, so a file cut at a member boundary would pass for a smaller archive (a gzip stream is checked by
        its CRC and length trailer instead, in :meth:`_drain`)."""
        if isinstance(stream, gzip.GzipFile):
            return
        stream.seek(offset)
        if stream.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise ArchiveError(
                f"{path} is damaged: it ends at byte {offset} without the tar end-of-archive block; it is probably "
                "truncated. Nothing was unpacked. Delete it and run the command again to download it anew (or "
                "fetch it from a mirror)."
            )

    @staticmethod
    def _drain(path: Path, stream: BinaryIO, budget: _Budget) -> None:
        """Read a gzip stream to its end, so that its CRC and length trailer are checked (bounded)."""
        if not isinstance(stream, gzip.GzipFile):
            return
        limit = stream.tell() + budget.ratio_cap
        while stream.read(CHUNK):
            if stream.tell() > limit:
                raise ArchiveError(
                    f"{path}: more than {size_text(budget.ratio_cap)} of data follow the end of the tar archive; "
                    "refusing it."
                )


# ------------------------------------------------------------------------------------------------------- zip
@dataclass(frozen=True)
class ZipArchive:
    """A zip file; a leading ``strip_prefix`` (e.g. ``"Stanford_Online_Products/"``) is removed from names."""

    strip_prefix: str = ""

    def unpack(self, path: Path, dest: Path, *, max_ratio: float = MAX_UNPACK_RATIO, progress: bool = False) -> int:
        budget = _Budget(path, dest, max_ratio)
        try:
            with zipfile.ZipFile(path) as archive:
                plan = self._plan(archive, path, budget)
                writer = _Writer(path, dest, budget)
                try:
                    for info, name in tqdm(plan, desc=f"unpack {path.name}", unit="file", disable=not progress):
                        if info.is_dir():
                            writer.directory(name)
                            continue
                        with archive.open(info) as source:
                            writer.file(name, source)  # type: ignore[arg-type]
                except BaseException:
                    writer.undo()
                    raise
        except ArchiveError:
            raise
        except _DAMAGED as error:
            raise _damaged(path, error) from error
        return writer.files

    def _plan(self, archive: zipfile.ZipFile, path: Path, budget: _Budget) -> list[tuple[zipfile.ZipInfo, str]]:
        """Every member's target name, all checked (and their sizes added up) before anything is written."""
        plan, seen = [], set()
        prefix = self.strip_prefix.strip("/")
        for info in archive.infolist():
            if not info.filename:
                raise ArchiveError(f"{path}: holds a member without a name; the archive is damaged. Refusing it.")
            mode = info.external_attr >> 16
            if info.create_system == 3 and stat.S_IFMT(mode) in _MODE_KINDS:  # Unix mode bits
                raise _refused_kind(path, info.filename, _MODE_KINDS[stat.S_IFMT(mode)])
            if info.flag_bits & (0x1 | 0x20 | 0x40):  # encrypted, patched data, strong encryption
                raise ArchiveError(
                    f"{path}: member {info.filename!r} is encrypted or patched data (zip flags {info.flag_bits:#x}); "
                    "refusing this archive."
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArchiveError(
                    f"{path}: member {info.filename!r} uses zip compression method {info.compress_type}; only "
                    "stored and deflated members are unpacked (the datasets use those). Refusing this archive."
                )
            if not 0 <= info.header_offset <= budget.archive_size - 30 or info.compress_size > budget.archive_size:
                raise ArchiveError(
                    f"{path}: member {info.filename!r} lies outside the file (offset {info.header_offset}, "
                    f"{info.compress_size} bytes); the archive is damaged. Refusing it."
                )
            name = safe_member_name(info.filename, path)
            if prefix and (name == prefix or name.startswith(prefix + "/")):
                name = name[len(prefix) + 1 :]
            budget.plan(
                0 if info.is_dir() else info.file_size,
                name or None,
                folder=info.is_dir(),
                header=_ZIP_HEADER_BYTES + 2 * len(info.orig_filename.encode("utf-8", "surrogateescape")),
            )
            if not name:
                continue
            if not info.is_dir():
                if name in seen:
                    raise ArchiveError(f"{path}: two members land on {name!r}; refusing this archive.")
                seen.add(name)
            plan.append((info, name))
        return plan


# ------------------------------------------------------------------------------------------------ plain file
@dataclass(frozen=True)
class PlainFile:
    """A file that is used as it is (e.g. ``cars_annos.mat``): copied into the dataset folder."""

    def unpack(self, path: Path, dest: Path, *, max_ratio: float = MAX_UNPACK_RATIO, progress: bool = False) -> int:  # noqa: ARG002
        budget = _Budget(path, dest, max_ratio)
        name = safe_member_name(path.name, path)
        budget.plan(path.stat().st_size, name)
        writer = _Writer(path, dest, budget)
        try:
            with open(path, "rb") as source:
                writer.file(name, source)
        except BaseException:
            writer.undo()
            raise
        return 1
