"""Safe unpacking of downloaded dataset files into a dataset folder.

Contract: an unpacker maps ``(file, dest)`` -> files written under ``dest``, and reports a lower bound of
the bytes it will write (for the free-space check) before writing anything.

- :class:`TarArchive`: ``.tar``/``.tgz``, optionally dropping the first ``strip_components`` path components
  of every member as GNU ``tar --strip-components`` does (members with fewer components are skipped).
- :class:`ZipArchive`: ``.zip``, optionally removing a leading ``strip_prefix`` from member names (the
  effect of the README's ``ln -s . Stanford_Online_Products && unzip ...``; other members keep their name).
- :class:`PlainFile`: a file that is not an archive (``cars_annos.mat``), copied into ``dest``.

Safety: no member may land outside ``dest``. Absolute names and ``..`` components are refused before
anything is written for them; tar members also go through Python's ``tarfile`` ``"data"`` filter (which
also refuses links that point outside, device files and unsafe modes); where this Python lacks it, links
are refused altogether. Zip members that are symbolic links (Unix mode in ``external_attr``) are refused. A
damaged archive (truncated, bad CRC, not an archive) raises :class:`ArchiveError` naming the file.
"""

from __future__ import annotations

import copy
import gzip
import logging
import re
import shutil
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

logger = logging.getLogger(__name__)

HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
"""Whether this Python's ``tarfile`` has the ``"data"`` extraction filter (3.10.12+, 3.11.4+, 3.12+)."""

_S_IFMT, _S_IFLNK = 0o170000, 0o120000


class ArchiveError(ValueError):
    """An archive is damaged or holds a member that would land outside the target folder."""


class Unpacker(Protocol):
    """How one downloaded file lands in the dataset folder."""

    def unpacked_size(self, path: Path) -> int:
        """A lower bound of the bytes :meth:`unpack` writes (for the free-space check)."""

    def unpack(self, path: Path, dest: Path, progress: bool = False) -> int:
        """Write the file's content under ``dest``; returns the number of files written."""


def safe_member_name(name: str, archive: Path) -> str:
    """``name`` normalised to ``a/b/c`` form; refuses absolute names, drive letters and ``..`` components."""
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
    return "/".join(parts)


def _strip(name: str, components: int) -> str | None:
    """GNU tar's ``--strip-components``: None when the name has no more than ``components`` parts."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) <= components:
        return None
    return "/".join(parts[components:])


def _damaged(archive: Path, error: BaseException) -> ArchiveError:
    return ArchiveError(
        f"{archive} is damaged ({type(error).__name__}: {error}); it is probably truncated or corrupt. Nothing "
        "was unpacked. Delete it and run the command again to download it anew (or fetch it from a mirror)."
    )


@dataclass(frozen=True)
class TarArchive:
    """A tar file (any compression ``tarfile`` reads), members optionally stripped of leading components."""

    strip_components: int = 0

    def unpacked_size(self, path: Path) -> int:
        """For gzip: the size in the gzip trailer (the true size modulo 2**32, hence a lower bound)."""
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return path.stat().st_size
            f.seek(-4, 2)
            return max(struct.unpack("<I", f.read(4))[0], path.stat().st_size)

    def unpack(self, path: Path, dest: Path, progress: bool = False) -> int:
        count = 0
        try:
            with (
                tarfile.open(path, "r:*") as tar,
                tqdm(desc=f"unpack {path.name}", unit="file", disable=not progress) as bar,
            ):
                for member in tar:  # streamed: each member is checked just before it is written
                    name = _strip(safe_member_name(member.name, path), self.strip_components)
                    if name is None:
                        continue
                    changes = {"name": name}
                    if member.islnk():
                        target = _strip(safe_member_name(member.linkname, path), self.strip_components)
                        if target is None:
                            raise ArchiveError(f"{path}: hard link {member.name!r} points outside the kept members.")
                        changes["linkname"] = target
                    member = copy.copy(member)  # renamed copy; the archive's own member list is untouched
                    for key, value in changes.items():
                        setattr(member, key, value)
                    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                        raise ArchiveError(f"{path}: member {member.name!r} is a device or special file; refusing.")
                    self._extract(tar, member, dest, path)
                    count += member.isfile()
                    bar.update(1)
        except ArchiveError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise _damaged(path, error) from error
        return count

    @staticmethod
    def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, path: Path) -> None:
        if HAS_DATA_FILTER:
            try:
                tar.extract(member, dest, filter="data")
            except tarfile.FilterError as error:
                raise ArchiveError(
                    f"{path}: member {member.name!r} is unsafe ({error}); refusing this archive (nothing of it is "
                    "kept)."
                ) from error
            return
        # No "data" filter in this Python: names were checked above; links are refused outright.
        if member.issym() or member.islnk():
            raise ArchiveError(
                f"{path}: member {member.name!r} is a link, and this Python's tarfile has no 'data' filter to check "
                "where it points; refusing it. Upgrade Python (3.10.12+, 3.11.4+ or 3.12+) to unpack archives "
                "with links."
            )
        tar.extract(member, dest, set_attrs=False)


@dataclass(frozen=True)
class ZipArchive:
    """A zip file; a leading ``strip_prefix`` (e.g. ``"Stanford_Online_Products/"``) is removed from names."""

    strip_prefix: str = ""

    def unpacked_size(self, path: Path) -> int:
        try:
            with zipfile.ZipFile(path) as archive:
                return sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, EOFError) as error:
            raise _damaged(path, error) from error

    def unpack(self, path: Path, dest: Path, progress: bool = False) -> int:
        try:
            with zipfile.ZipFile(path) as archive:
                plan = self._plan(archive, path)
                for info, name in tqdm(plan, desc=f"unpack {path.name}", unit="file", disable=not progress):
                    target = dest / name
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with archive.open(info) as src, open(target, "xb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                    except FileExistsError as error:
                        raise ArchiveError(f"{path}: two members land on {name!r}; refusing this archive.") from error
        except ArchiveError:
            raise
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise _damaged(path, error) from error
        return sum(1 for info, _ in plan if not info.is_dir())

    def _plan(self, archive: zipfile.ZipFile, path: Path) -> list[tuple[zipfile.ZipInfo, str]]:
        """Every member's target name, all checked before anything is written."""
        plan = []
        for info in archive.infolist():
            if (info.external_attr >> 16) & _S_IFMT == _S_IFLNK:
                raise ArchiveError(f"{path}: member {info.filename!r} is a symbolic link; refusing this archive.")
            name = safe_member_name(info.filename, path)
            prefix = self.strip_prefix.strip("/")
            if prefix and (name == prefix or name.startswith(prefix + "/")):
                name = name[len(prefix) + 1 :]
            if name:
                plan.append((info, name))
        return plan


@dataclass(frozen=True)
class PlainFile:
    """A file that is used as it is (e.g. ``cars_annos.mat``): copied into the dataset folder."""

    def unpacked_size(self, path: Path) -> int:
        return path.stat().st_size

    def unpack(self, path: Path, dest: Path, progress: bool = False) -> int:  # noqa: ARG002 - one file
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / path.name)
        return 1
