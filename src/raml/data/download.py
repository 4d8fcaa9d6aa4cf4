"""``raml data download``: fetch a published dataset, unpack it safely, verify it, record where it came from.

Contract: :func:`install_dataset` (name, data root) -> :class:`InstallReport`; afterwards
``<data_root>/<name>`` holds exactly the layout of the reference README's commands plus ``SOURCE.json``
(per file: URL, size, SHA-256, date), or, on any error, is left as it was (never a partial folder).

Steps:

1. Fetch every file of the dataset (:data:`raml.data.sources.SOURCES`) into ``<data_root>/downloads/``
   with :func:`fetch`: the data goes to ``<file>.part``, an interrupted transfer continues from where it
   stopped (HTTP ``Range``, FTP ``REST``) on the next attempt or the next run, a server that ignores the
   request is read again from the start, transient failures are retried with exponential back-off, and the
   free space is checked against the size the server announces. A server that sends more than it announced
   (HTTP ``Content-Length``/``Content-Range``, FTP ``SIZE``) is stopped at the first byte too many (a
   :class:`~raml.errors.DownloadError`; the partial file is removed); with no size announced, the free space
   is checked as the data arrives (every :data:`SPACE_CHECK_BYTES`, which must stay free). A complete file
   found there (fetched earlier, or put there by hand) is used as it is.
   Each file is then compared with its pinned digest (:attr:`raml.data.sources.RemoteFile.digest`, the MD5
   published by other projects), in the same read that computes its SHA-256, before anything is unpacked: a
   mismatch is a :class:`DigestMismatchError` (a file raml downloaded is removed, one placed by hand is kept);
   ``skip_digest`` (``--no-verify-digest``) accepts it with a warning.
2. Unpack into a temporary sibling ``<data_root>/.<name>.partial``, safely (:mod:`raml.data.archives`:
   only regular files and folders, sizes checked against the free space and ``--max-unpack-ratio``).
3. Verify against the dataset's own index files (:func:`raml.data.sources.verify_dataset`), write
   ``SOURCE.json``, and rename the folder into place.
4. Delete the files this tool downloaded (unless ``--keep-archives``); a file it did not download (put into
   ``downloads/`` by hand) is never deleted, and is named as such, not by a URL that was not contacted.

Which version a partial file belongs to: when a transfer starts from byte 0, the server's validators (HTTP
``ETag`` / ``Last-Modified``; FTP ``SIZE`` / ``MDTM``) and the URL are written to ``<file>.part.json``. A
later attempt or run continues only with ``If-Range`` set to that ETag (or date); a server whose file
changed answers the whole new file, which is then written from byte 0 (a ``206`` whose validators or total
size differ from the record also restarts). A partial file without a record, from another URL, or from a
server that gave no validator, is started again from byte 0. On completion the record becomes
``<file>.download.json`` (plus the file's size and mtime): how a later run tells raml's own downloads from
files placed by hand.

URLs: ``--url FILE=URL`` > the mirror base URL in :data:`MIRROR_ENV` (``<base>/<file name>``) > official.

One run per dataset and data root: :func:`install_dataset` holds the exclusive lock
(:class:`raml.locking.DirectoryLock`) of ``<data_root>/.<name>.lock/`` from start to end, so a second run of
the same dataset is refused at once (:class:`raml.locking.LockHeldError`, naming the holder) instead of
deleting the first run's staging folder; a lock left by a killed run is taken over. ``--force`` swaps the
folders with two renames (``<name>`` -> ``.<name>.old``, staging -> ``<name>``): a failure or interrupt
between them puts ``.<name>.old`` back, and a run that finds ``.<name>.old`` without ``<name>`` (a run killed
there) restores it, with a warning, before anything else.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ftplib
import http.client
import json
import logging
import math
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from raml import __version__
from raml.data.archives import MAX_UNPACK_RATIO, InsufficientSpaceError, size_text
from raml.data.sources import (
    DatasetCounts,
    DatasetSource,
    IncompleteDatasetError,
    RemoteFile,
    get_source,
    verify_dataset,
)
from raml.data.splits import DOWNLOAD_COMMANDS
from raml.errors import DownloadError
from raml.locking import DirectoryLock, LockHeldError
from raml.utils import atomic_write_text, file_digests

logger = logging.getLogger(__name__)

MIRROR_ENV = "RAML_DATA_MIRROR"
"""Environment variable holding a mirror's base URL; a file's URL is then ``<base>/<official file name>``."""
SOURCE_FILE = "SOURCE.json"
"""Written into a downloaded dataset folder: where each file came from, its size, SHA-256 and date."""
DOWNLOADS_DIR = "downloads"
"""Folder under the data root where files are fetched (``<file>.part`` while incomplete)."""
PART_RECORD_SUFFIX = ".part.json"
"""``<file>.part.json``: the URL and validators of the transfer writing ``<file>.part``."""
DONE_RECORD_SUFFIX = ".download.json"
"""``<file>.download.json``: written when raml completes a download of ``<file>`` (see the module docstring)."""
CHUNK = 1 << 20
SPACE_CHECK_BYTES = 64 << 20
"""For a file whose size the server does not announce: the free space is checked before the first byte and
every this many bytes received, and must hold at least this many more."""
_USER_AGENT = f"raml/{__version__} (dataset download; Python urllib)"


class DigestMismatchError(DownloadError):
    """A dataset file's digest differs from the published one: it was substituted or corrupted."""


class _Permanent(Exception):
    """A failure that retrying cannot fix (HTTP 404, FTP 550, ...)."""


class _Restart(Exception):
    """The partial file cannot be continued (e.g. the server answered another range): start again at 0."""


class _Oversize(_Permanent):
    """The server sent more bytes than it announced: the transfer is refused and its partial file removed."""


@dataclass(frozen=True)
class DownloadSettings:
    """How hard to try.

    Attributes:
        timeout: Seconds a connection may stay silent.
        attempts: Attempts per file in one run (each continues from the bytes already received).
        retry_wait: Seconds before the second attempt, doubled for each further one, at most ``max_wait``.
        max_wait: Longest wait between attempts.
        progress: Show progress bars (size and rate).
    """

    timeout: float = 60.0
    attempts: int = 5
    retry_wait: float = 2.0
    max_wait: float = 60.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Expected attempts (--retries) >= 1, got {self.attempts}.")
        # not finite: nan passed the comparisons (a socket's "Invalid value NaN" deep inside, waits "in nan s")
        checks = (("timeout", "--timeout", True), ("retry_wait", "--retry-wait", False), ("max_wait", None, False))
        for name, flag, positive in checks:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                where = f"{name} ({flag})" if flag else name
                raise ValueError(
                    f"Expected {where} to be a finite number of seconds {'> 0' if positive else '>= 0'}, got {value}."
                )


@dataclass
class _Transfer:
    """One file's transfer across attempts (what the error message reports)."""

    url: str
    part: Path
    settings: DownloadSettings
    range_ignored: bool = False

    @property
    def record_path(self) -> Path:
        return self.part.with_name(self.part.name.removesuffix(".part") + PART_RECORD_SUFFIX)

    def received(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def record(self) -> dict[str, object] | None:
        """What was recorded when the partial file's transfer started (None: nothing usable)."""
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def start(self, record: dict[str, object]) -> None:
        """A transfer from byte 0: drop any partial file and record which version of the file it is."""
        self.part.unlink(missing_ok=True)
        atomic_write_text(self.record_path, json.dumps({"url": self.url, **record, "started": _now()}) + "\n")

    def restart(self, why: str) -> None:
        """The partial file is not continued: it and its record go."""
        logger.warning("%s: not continuing %s (%s); reading it again from byte 0.", self.url, self.part, why)
        self.part.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise :class:`InsufficientSpaceError` when ``folder``'s disk has fewer than ``needed`` free bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InsufficientSpaceError(
            f"Not enough free space for {what}: it needs {_size(needed)} but {folder} has {_size(free)} free. "
            "Free some space, or choose a --data-root on a larger disk. Nothing was written."
        )


_size = size_text


def _receive(
    transfer: _Transfer,
    read: Callable[[], bytes],
    out: BinaryIO,
    bar: tqdm,
    received: int,
    total: int | None,
    announced_by: str,
) -> int:
    """Copy ``read()`` chunks into ``out`` until an empty one; returns the bytes the partial file then holds.

    Never writes past ``total`` (the size ``announced_by`` the server): the first chunk that would raises
    :class:`_Oversize`. With no announced size, the free space is checked before the first chunk is written and every
    :data:`SPACE_CHECK_BYTES`, and must hold :data:`SPACE_CHECK_BYTES` more (else :class:`InsufficientSpaceError`;
    what was received stays in the partial file, for the next run to continue)."""
    next_check = received
    while chunk := read():
        if total is not None and received + len(chunk) > total:
            raise _Oversize(
                f"the server sent more than the {total} bytes it announced ({announced_by}): "
                f"{received + len(chunk)} bytes or more; stopped there and removed {transfer.part}. The file may have "
                "changed on the server during the transfer, or the server is misbehaving: run the command again "
                "later, or fetch the file from a mirror (--url FILE=URL)"
            )
        if total is None and received >= next_check:
            next_check = received + SPACE_CHECK_BYTES
            free = shutil.disk_usage(transfer.part.parent).free
            if free < SPACE_CHECK_BYTES:
                raise InsufficientSpaceError(
                    f"Not enough free space for downloading {transfer.url}: the server did not announce its size, "
                    f"and after {_size(received)} {transfer.part.parent} has {_size(free)} free, less than the "
                    f"{_size(SPACE_CHECK_BYTES)} kept free while it arrives. Free some space, or choose a "
                    f"--data-root on a larger disk; {transfer.part} keeps the {received} bytes received."
                )
        out.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))
    return received


def _progress_bar(transfer: _Transfer, total: int | None, initial: int) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=transfer.part.name.removesuffix(".part"),
        disable=not transfer.settings.progress,
    )


# ------------------------------------------------------------------------------------------------ HTTP(S)
def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """``'bytes 100-199/200'`` -> (100, 200); ``'bytes */200'`` -> (None, 200)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    start = span.split("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _validators(headers: object) -> dict[str, str | None]:
    """The response's ``ETag`` and ``Last-Modified`` (None where absent)."""
    get = headers.get  # type: ignore[attr-defined]
    return {"etag": get("ETag"), "last_modified": get("Last-Modified")}


def _if_range(record: dict[str, object] | None, url: str) -> str | None:
    """The ``If-Range`` value that ties a resumed transfer to the recorded version: a strong ETag, else the
    Last-Modified date; None when the partial file cannot be tied to a version (no record, another URL)."""
    if record is None or record.get("url") != url:
        return None
    etag, modified = record.get("etag"), record.get("last_modified")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    return modified if isinstance(modified, str) and modified else None


def _differs(record: dict[str, object], response: Mapping[str, str | None]) -> str | None:
    """Why a ``206`` answer belongs to another version than the recorded one (None: the same, as far as known)."""
    for key, label in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        if record.get(key) and response[key] and record[key] != response[key]:
            return f"its {label} changed from {record[key]} to {response[key]}"
    return None


def _http_attempt(transfer: _Transfer) -> None:
    offset = transfer.received()
    record = transfer.record() if offset else None
    validator = _if_range(record, transfer.url) if offset else None
    if offset and validator is None:
        transfer.restart(
            "no record of which version of the file it holds (no ETag or Last-Modified from the server, or another URL)"
            if record is None or record.get("url") == transfer.url
            else f"it came from {record.get('url')}"
        )
        offset = 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator or ""
    request = urllib.request.Request(transfer.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=transfer.settings.timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the validator matched and byte `offset` is past the end
            _, total = _content_range_start(error.headers.get("Content-Range"))
            if total == offset:
                return  # complete already (a run stopped between the last byte and the rename)
            transfer.restart(f"the server has no byte {offset} of this file (HTTP 416)")
            raise _Restart(f"the server has no byte {offset} of this file (HTTP 416)") from error
        if 400 <= error.code < 500 and error.code not in (408, 429):
            raise _Permanent(f"HTTP {error.code} {error.reason}") from error
        raise
    with response:
        length = response.headers.get("Content-Length")
        size = int(length) if length is not None and length.isdigit() else None
        now = _validators(response.headers)
        if offset and response.status == 206:
            assert record is not None
            start, total = _content_range_start(response.headers.get("Content-Range"))
            changed = _differs(record, now)
            if changed is None and total is not None and record.get("size") not in (None, total):
                changed = f"its size changed from {record.get('size')} to {total} bytes"
            if start != offset or changed:
                why = changed or f"asked for bytes from {offset}, the server sent them from {start}"
                transfer.restart(why)
                raise _Restart(why)
            total = total if total is not None else (offset + size if size is not None else None)
            mode = "ab"
        else:
            if offset:
                changed = _differs(record or {}, now)
                if changed:
                    logger.warning(
                        "%s changed on the server since the transfer began (%s; If-Range): reading it again "
                        "from byte 0.",
                        transfer.url,
                        changed,
                    )
                else:
                    logger.warning(
                        "%s ignored the request to continue at byte %d (HTTP %d); reading it again from the start.",
                        transfer.url,
                        offset,
                        response.status,
                    )
                    transfer.range_ignored = True
            offset, total, mode = 0, size, "wb"
        if total is not None:
            ensure_free_space(transfer.part.parent, total - offset, f"downloading {transfer.url}")
        if mode == "wb":  # a transfer from byte 0: record which version of the file it is
            transfer.start({**now, "size": size})
        announced_by = "Content-Range" if mode == "ab" else "Content-Length"
        with open(transfer.part, mode) as f, _progress_bar(transfer, total, offset) as bar:
            received = _receive(transfer, lambda: response.read(CHUNK), f, bar, offset, total, announced_by)
    if total is not None and received < total:
        raise ConnectionError(f"the connection closed after {received} of {total} bytes")


# ---------------------------------------------------------------------------------------------------- FTP
def _ftp_attempt(transfer: _Transfer) -> None:
    parts = urlsplit(transfer.url)
    path = unquote(parts.path)
    with ftplib.FTP(timeout=transfer.settings.timeout) as ftp:
        ftp.connect(parts.hostname or "", parts.port or 21)
        ftp.login(unquote(parts.username or "anonymous"), unquote(parts.password or "anonymous@"))
        ftp.voidcmd("TYPE I")
        try:
            total: int | None = ftp.size(path)
        except ftplib.error_perm as error:
            if str(error).startswith("550"):
                raise _Permanent(f"FTP {error}") from error
            total = None  # SIZE not supported
        try:
            modified: str | None = ftp.sendcmd(f"MDTM {path}").split()[-1]
        except ftplib.error_perm:
            modified = None  # MDTM not supported: a partial file cannot be tied to a version
        offset = transfer.received()
        if offset:
            record = transfer.record() or {}
            same = record.get("url") == transfer.url and modified is not None and total is not None
            if not (same and record.get("modified") == modified and record.get("size") == total):
                transfer.restart(
                    "the file on the server is not the one it was started from (or SIZE/MDTM cannot tell): "
                    f"recorded size {record.get('size')}, modified {record.get('modified')}; now {total}, {modified}"
                )
                offset = 0
            elif offset > total:
                transfer.restart(f"it is longer than the file on the server ({offset} > {total} bytes)")
                offset = 0
        if offset and offset == total:
            return
        if total is not None:
            ensure_free_space(transfer.part.parent, total - offset, f"downloading {transfer.url}")
        if not offset:
            transfer.start({"size": total, "modified": modified})
        if offset:
            try:
                ftp.sendcmd(f"REST {offset}")
            except ftplib.error_perm:
                logger.warning("%s does not support REST; reading it again from the start.", transfer.url)
                transfer.range_ignored = True
                offset = 0
        with open(transfer.part, "ab" if offset else "wb") as f, _progress_bar(transfer, total, offset) as bar:
            try:  # the REST above (if any) applies to this RETR
                with ftp.transfercmd(f"RETR {path}") as connection:
                    _receive(transfer, lambda: connection.recv(CHUNK), f, bar, offset, total, "FTP SIZE")
                ftp.voidresp()
            except _Oversize:
                ftp.close()  # no QUIT on leaving: the server's 426 for the aborted transfer would replace this error
                raise
            except ftplib.error_perm as error:
                if str(error).startswith("550"):
                    raise _Permanent(f"FTP {error}") from error
                raise
    received = transfer.received()
    if total is not None and received < total:
        raise ConnectionError(f"the transfer stopped after {received} of {total} bytes")


_PROTOCOLS: dict[str, Callable[[_Transfer], None]] = {
    "http": _http_attempt,
    "https": _http_attempt,
    "ftp": _ftp_attempt,
}
_TRANSIENT = (OSError, http.client.HTTPException, ftplib.Error, EOFError, _Restart)


def _complete_record(transfer: _Transfer, dest: Path) -> None:
    """``<file>.part.json`` -> ``<file>.download.json``, with the finished file's size and mtime."""
    done = dest.with_name(dest.name + DONE_RECORD_SUFFIX)
    status = dest.stat()
    record = {**(transfer.record() or {"url": transfer.url}), "completed": _now()}
    record.update(size=status.st_size, mtime_ns=status.st_mtime_ns)
    atomic_write_text(done, json.dumps(record) + "\n")
    transfer.record_path.unlink(missing_ok=True)


def downloaded_by_raml(path: Path) -> dict[str, object] | None:
    """The record of raml's own download of ``path`` if it still describes this file (size and mtime), else
    None (the file was put there by hand, or replaced since)."""
    try:
        record = json.loads(path.with_name(path.name + DONE_RECORD_SUFFIX).read_text())
        status = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("url"), str):
        return None
    if (record.get("size"), record.get("mtime_ns")) != (status.st_size, status.st_mtime_ns):
        return None
    return record


def fetch(url: str, dest: Path, settings: DownloadSettings = DownloadSettings()) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, continuing any partial file already there.

    Args:
        url: ``http://``, ``https://`` or ``ftp://`` address.
        dest: The final file; created only when the transfer is complete.
        settings: Timeouts, attempts, back-off and progress bars.

    Returns:
        ``dest`` (beside it ``dest.download.json``: the URL, validators, size and mtime).

    Raises:
        DownloadError: Every attempt failed, or the server refused for good (e.g. 404); the message names the
            URL and the bytes kept in ``dest.part`` for the next run.
        InsufficientSpaceError: The disk lacks room for the rest of the file.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _PROTOCOLS or not parts.hostname:
        raise DownloadError(
            f"Cannot download {url!r}: expected an address such as https://host/path/file; supported are "
            f"{', '.join(_PROTOCOLS)}."
        )
    transfer = _Transfer(url, dest.with_name(dest.name + ".part"), settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: BaseException | None = None
    for attempt in range(1, settings.attempts + 1):
        try:
            _PROTOCOLS[scheme](transfer)
            os.replace(transfer.part, dest)
            _complete_record(transfer, dest)
            logger.info("Downloaded %s (%s) to %s", url, _size(dest.stat().st_size), dest)
            return dest
        except (InsufficientSpaceError, DownloadError):
            raise
        except _Oversize as error:  # the partial file is of no known version: it goes, with its record
            transfer.part.unlink(missing_ok=True)
            transfer.record_path.unlink(missing_ok=True)
            raise DownloadError(f"Could not download {url}: {error}.") from error
        except _Permanent as error:
            raise DownloadError(f"Could not download {url}: {error}.") from error
        except _TRANSIENT as error:
            last = error
        if attempt < settings.attempts:
            wait = (
                0.0 if isinstance(last, _Restart) else min(settings.retry_wait * 2 ** (attempt - 1), settings.max_wait)
            )
            logger.warning(
                "Download of %s failed (%s); attempt %d of %d in %.0f s, continuing from byte %d.",
                url,
                last,
                attempt + 1,
                settings.attempts,
                wait,
                transfer.received(),
            )
            time.sleep(wait)
    kept = transfer.received()
    note = (
        " The server ignored the request to continue a partial transfer, so every attempt started again from "
        "byte 0; try a mirror that supports resuming (HTTP Range, FTP REST)."
        if transfer.range_ignored
        else ""
    )
    record = transfer.record()
    tied = _if_range(record, url) is not None or bool(record and record.get("url") == url and record.get("modified"))
    resume = (
        f" {transfer.part} keeps the {kept} bytes received; running again continues from there (if the file on "
        "the server is unchanged)."
        if kept and tied
        else f" The server identifies no version of the file (no ETag, Last-Modified or MDTM), so running again "
        f"starts from byte 0 ({transfer.part} holds {kept} bytes)."
        if kept
        else ""
    )
    raise DownloadError(
        f"Could not download {url} in {settings.attempts} attempt{'s' if settings.attempts > 1 else ''} (last error: "
        f"{last}).{note}{resume}"
    )


# ----------------------------------------------------------------------------------------------- installing
@dataclass
class InstallReport:
    """What :func:`install_dataset` did.

    Attributes:
        name: The dataset.
        folder: ``<data_root>/<name>``.
        installed: True if it was downloaded now; False if it was already in place (nothing done).
        counts: Images and classes, when verified in this run.
        files: The ``SOURCE.json`` records of the files (empty when the folder was placed by hand).
        message: What was done, for the user (one line, plus one per file kept that raml did not download).
        kept: Files in ``downloads/`` that raml did not download and therefore kept.
    """

    name: str
    folder: Path
    installed: bool
    counts: DatasetCounts | None
    files: list[dict[str, object]] = field(default_factory=list)
    message: str = ""
    kept: list[Path] = field(default_factory=list)


def parse_url_overrides(items: Sequence[str], sources: Sequence[DatasetSource]) -> dict[str, str]:
    """``["FILE=URL", ...]`` -> ``{FILE: URL}``; FILE must be an official file name of the datasets asked for."""
    known = [f.name for s in sources for f in s.files]
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ValueError(
                f"--url expects FILE=URL (e.g. {known[0]}=https://mirror.example/{known[0]}), got {item!r}."
            )
        if name not in known:
            raise ValueError(
                f"--url {item}: {name!r} is not a file of the datasets asked for; their files: {', '.join(known)}."
            )
        overrides[name] = url
    return overrides


def file_urls(
    source: DatasetSource, overrides: Mapping[str, str] | None = None, mirror: str | None = None
) -> dict[str, str]:
    """Each file's URL: an override, else ``<mirror>/<file name>``, else the official address."""
    overrides = overrides or {}
    mirror = mirror.rstrip("/") if mirror else None
    return {f.name: overrides.get(f.name) or (f"{mirror}/{f.name}" if mirror else f.url) for f in source.files}


def _manual_help(name: str, data_root: Path, files: Sequence[str]) -> str:
    return (
        f"To place the files by hand, run the README's commands (from the folder above a data root named 'data'):\n"
        f"{DOWNLOAD_COMMANDS[name]}\n"
        f"or put {', '.join(files)} into {data_root / DOWNLOADS_DIR} and run this again, or use a mirror: "
        f"--url FILE=URL or {MIRROR_ENV}=BASE_URL."
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def install_dataset(
    name: str,
    data_root: str | Path,
    *,
    overrides: Mapping[str, str] | None = None,
    mirror: str | None = None,
    settings: DownloadSettings = DownloadSettings(),
    keep_archives: bool = False,
    force: bool = False,
    workers: int = 1,
    max_unpack_ratio: float = MAX_UNPACK_RATIO,
    skip_digest: bool = False,
) -> InstallReport:
    """Download, unpack and verify dataset ``name`` into ``<data_root>/<name>`` (see the module docstring).

    Args:
        name: ``cub``, ``cars`` or ``sop``.
        data_root: The folder holding the datasets.
        overrides: Official file name -> URL.
        mirror: A mirror's base URL (``<mirror>/<file name>``); ``overrides`` win.
        settings: Download settings.
        keep_archives: Keep the downloaded files in ``<data_root>/downloads`` (default: delete them once the
            dataset is verified, as the README's commands do). Files raml did not download are always kept.
        force: Replace an existing dataset folder (only once the new one is verified).
        workers: Threads checking image headers.
        max_unpack_ratio: An archive's members may hold at most this many times its size
            (:data:`raml.data.archives.MAX_UNPACK_RATIO`).
        skip_digest: Use a file whose digest differs from its pinned one (a warning is logged) instead of
            refusing it; for a file that differs on purpose (e.g. re-packed by a mirror you trust).

    Returns:
        What was done.

    Raises:
        DownloadError: A file could not be fetched; the message names the URL and how to place it by hand.
        DigestMismatchError: A file differs from its pinned digest (and ``skip_digest`` is off); nothing was
            unpacked.
        ArchiveError: An archive is damaged, unsafe, or unpacks to more than ``max_unpack_ratio`` times its size.
        IncompleteDatasetError: The unpacked folder lacks images its index lists.
        InsufficientSpaceError: Not enough disk space.
        FileExistsError: ``<data_root>/<name>`` exists but is not complete (and ``force`` is off).
        LockHeldError: Another run is installing ``name`` into ``data_root`` (a ``FileExistsError`` naming its
            PID, host and start time); nothing was changed.
    """
    get_source(name)  # an unknown name is refused before the lock's folder is made
    data_root = Path(data_root)
    folder = data_root / name
    if folder.exists() and not force:
        # in place (renames are atomic: a run replacing it under its lock never leaves it half there): said
        # without the lock, which a read-only data root (a shared mount) or one without file locks could not take
        return _already_there(name, folder, workers, settings.progress)
    lock = DirectoryLock(data_root / f".{name}.lock", f"raml data download {name}")
    try:
        lock.acquire()
    except LockHeldError as error:
        raise LockHeldError(
            f"{folder} is being installed by {_holder(error)}; wait for it to finish and run the command again "
            f"(nothing was changed). Lock file: {error.path}.",
            error.path,
            error.holder,
        ) from None
    try:
        return _install_locked(
            name,
            data_root,
            overrides=overrides,
            mirror=mirror,
            settings=settings,
            keep_archives=keep_archives,
            force=force,
            workers=workers,
            max_unpack_ratio=max_unpack_ratio,
            skip_digest=skip_digest,
        )
    finally:
        lock.release()
        # the lock removes the folder it made; this one was left by a killed run whose lock it took over (gone
        # already, or another run's lock file in it now: kept)
        with contextlib.suppress(OSError):
            lock.directory.rmdir()


def _holder(error: LockHeldError) -> str:
    """Who holds a refused lock, for the message."""
    if error.holder is None:
        return "another raml data download (which has not written its PID yet)"
    return error.holder.describe()


def _install_locked(
    name: str,
    data_root: Path,
    *,
    overrides: Mapping[str, str] | None,
    mirror: str | None,
    settings: DownloadSettings,
    keep_archives: bool,
    force: bool,
    workers: int,
    max_unpack_ratio: float,
    skip_digest: bool,
) -> InstallReport:
    """:func:`install_dataset`'s work, holding the dataset's lock."""
    source = get_source(name)
    folder = data_root / name
    _restore_orphaned_old(folder)
    shutil.rmtree(_deleting_folder(folder), ignore_errors=True)  # a replaced folder whose removal was stopped
    if folder.exists() and not force:
        return _already_there(name, folder, workers, settings.progress)
    urls = file_urls(source, overrides, mirror)
    downloads = data_root / DOWNLOADS_DIR
    fetched: dict[str, _Obtained] = {}
    for remote in source.files:
        dest = downloads / remote.name
        if dest.is_file():
            earlier = downloaded_by_raml(dest)
            if earlier is not None:
                logger.info("Using %s, downloaded from %s by an earlier run.", dest, earlier["url"])
                how = f"downloaded by an earlier run ({earlier.get('completed', 'date unknown')})"
                fetched[remote.name] = _Obtained(dest, str(earlier["url"]), how, ours=True)
            else:
                logger.info("Using %s, found there (placed by hand: it will be kept).", dest)
                fetched[remote.name] = _Obtained(dest, None, f"placed by hand in {downloads}", ours=False)
            continue
        try:
            fetch(urls[remote.name], dest, settings)
        except DownloadError as error:
            raise DownloadError(
                f"{error}\nNothing was unpacked: {folder} was not created.\n"
                + _manual_help(name, data_root, [f.name for f in source.files])
            ) from error
        fetched[remote.name] = _Obtained(dest, urls[remote.name], "downloaded", ours=True)
    checked = {remote.name: _check_digest(remote, fetched[remote.name], folder, skip_digest) for remote in source.files}

    staging = data_root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    try:
        records = []
        for remote in source.files:
            got = fetched[remote.name]
            count = remote.unpacker.unpack(got.path, staging, max_ratio=max_unpack_ratio, progress=settings.progress)
            logger.info("Unpacked %s: %d files.", got.path.name, count)
            records.append(
                {
                    "file": remote.name,
                    "url": got.url,
                    "size": got.path.stat().st_size,
                    "sha256": checked[remote.name]["sha256"],
                    "date": _dt.datetime.fromtimestamp(got.path.stat().st_mtime, _dt.timezone.utc)
                    .replace(microsecond=0)
                    .isoformat()
                    .replace("+00:00", "Z"),
                    "obtained": got.how,
                    "pinned_digest": checked[remote.name]["pinned"],
                }
            )
        counts = verify_dataset(name, staging, workers=workers, progress=settings.progress)
        record = {"dataset": name, "created": _now(), "files": records, "counts": counts.__dict__}
        atomic_write_text(staging / SOURCE_FILE, json.dumps(record, indent=2) + "\n")
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kept = [got.path for got in fetched.values() if not got.ours]
    if not keep_archives:
        for got in fetched.values():
            if got.ours:  # never a file raml did not download: it may be the user's only copy
                got.path.unlink(missing_ok=True)
                got.path.with_name(got.path.name + DONE_RECORD_SUFFIX).unlink(missing_ok=True)
    message = f"{name}: {counts.describe()}, all present and readable, in {folder}."
    for path in kept:
        message += f"\n  kept {path}: it was placed there by hand, and raml deletes only files it downloaded itself."
    return InstallReport(name, folder, True, counts, records, message, kept)


@dataclass(frozen=True)
class _Obtained:
    """A dataset file in ``downloads/``: where it came from, and whether raml downloaded it (may delete it)."""

    path: Path
    url: str | None
    how: str
    ours: bool


def _check_digest(remote: RemoteFile, got: _Obtained, folder: Path, skip_digest: bool) -> dict[str, object]:
    """Compare ``got`` with ``remote``'s pinned digest, in the read that computes its SHA-256.

    Returns:
        ``{"sha256": hex, "pinned": None | {"algorithm", "expected", "actual", "matched", "published_by"}}``.

    Raises:
        DigestMismatchError: The digests differ and ``skip_digest`` is off; a file raml downloaded is removed
            (with its download record), one placed by hand is kept.
    """
    pinned = remote.digest
    actual = file_digests(got.path, ["sha256", *([pinned.algorithm] if pinned else [])])
    if pinned is None:
        logger.info("%s has no pinned digest; not verified (SHA-256 %s recorded).", remote.name, actual["sha256"])
        return {"sha256": actual["sha256"], "pinned": None}
    matched = actual[pinned.algorithm] == pinned.hex
    record = {
        "algorithm": pinned.algorithm,
        "expected": pinned.hex,
        "actual": actual[pinned.algorithm],
        "matched": matched,
        "published_by": pinned.published_by,
    }
    origin = f"from {got.url}" if got.url else got.how
    if matched:
        logger.info("%s matches its published %s.", remote.name, pinned.describe())
    elif skip_digest:
        logger.warning(
            "%s (%s) differs from its published %s (%s): its %s is %s. Used anyway, as --no-verify-digest asks.",
            got.path,
            origin,
            pinned.describe(),
            pinned.published_by,
            pinned.algorithm.upper(),
            actual[pinned.algorithm],
        )
    else:
        if got.ours:
            got.path.unlink(missing_ok=True)
            got.path.with_name(got.path.name + DONE_RECORD_SUFFIX).unlink(missing_ok=True)
            fate = f"it was removed (raml downloaded it {origin})"
            fix = f"run again to download it afresh, or from another mirror with --url {remote.name}=URL"
        else:
            fate = f"it was left in place ({got.how}; raml never deletes a file it did not download)"
            fix = f"replace it with the published file, or delete it to let raml download {remote.name}"
        raise DigestMismatchError(
            f"{remote.name} is not the published file: expected {pinned.describe()} ({pinned.published_by}), "
            f"got {pinned.algorithm.upper()} {actual[pinned.algorithm]} for {got.path}; {fate}. Nothing was "
            f"unpacked: {folder} was {'left as it was' if folder.exists() else 'not created'}. The file was "
            f"substituted or damaged: {fix}; or, if it differs on "
            "purpose and you trust where it came from, pass --no-verify-digest."
        )
    return {"sha256": actual["sha256"], "pinned": record}


def _already_there(name: str, folder: Path, workers: int, progress: bool) -> InstallReport:
    """A dataset folder exists: say so and do nothing, or refuse to touch an incomplete one."""
    record_path = folder / SOURCE_FILE
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            when = record.get("created", "an earlier run")
        except (OSError, ValueError):
            record, when = {}, "an earlier run"
        return InstallReport(
            name,
            folder,
            False,
            None,
            list(record.get("files", [])) if isinstance(record, dict) else [],
            f"{name}: already in place in {folder} (downloaded {when}, see {SOURCE_FILE}); nothing to do. "
            f"'raml check-data --datasets {name},{name}-test' checks its images; --force downloads it again.",
        )
    try:
        counts = verify_dataset(name, folder, workers=workers, progress=progress)
    except IncompleteDatasetError as error:
        raise FileExistsError(
            f"{folder} exists but is not a complete dataset ({error}). Nothing was changed. Move it away, or pass "
            "--force to download it again and replace it once the new copy is verified."
        ) from error
    return InstallReport(
        name,
        folder,
        False,
        counts,
        [],
        f"{name}: already in place in {folder} (placed by hand, no {SOURCE_FILE}): {counts.describe()}, all present "
        "and readable; nothing to do.",
    )


def _old_folder(folder: Path) -> Path:
    """Where ``--force`` parks the dataset folder it replaces until the new one is in place."""
    return folder.with_name(f".{folder.name}.old")


def _restore_orphaned_old(folder: Path) -> None:
    """Put back ``.<name>.old`` left without ``<name>`` by a run stopped between ``--force``'s two renames."""
    old = _old_folder(folder)
    if old.is_dir() and not os.path.lexists(folder):
        logger.warning(
            "Found %s without %s: an earlier --force run was stopped while replacing the dataset folder. "
            "Restoring it to %s (nothing in it was deleted).",
            old,
            folder,
            folder,
        )
        os.replace(old, folder)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename the verified staging folder to ``folder``; an old ``folder`` (``--force``) goes only after.

    If anything stops the second rename (an error, Ctrl-C), the old folder is renamed back first."""
    old = _old_folder(folder)
    if old.exists():  # the previous dataset of a --force run killed after both renames: already replaced
        logger.info("Removing %s, left by an earlier --force run after it replaced the dataset.", old)
        _remove_replaced(old)
    parked = False
    if folder.exists():
        os.replace(folder, old)
        parked = True
    try:
        os.replace(staging, folder)
    except BaseException:
        if parked:
            os.replace(old, folder)
        raise
    if parked:
        _remove_replaced(old)


def _deleting_folder(folder: Path) -> Path:
    """Where a replaced dataset folder is deleted from (never restored, unlike ``.<name>.old``)."""
    return folder.with_name(f".{folder.name}.deleting")


def _remove_replaced(old: Path) -> None:
    """Delete a replaced dataset folder under a name :func:`_restore_orphaned_old` never touches, so that a
    removal stopped half-way (Ctrl-C in a long ``rmtree``) is not taken for a whole folder to restore later."""
    doomed = _deleting_folder(old.with_name(old.name[1 : -len(".old")]))
    shutil.rmtree(doomed, ignore_errors=True)  # one left by an earlier run stopped while deleting
    os.replace(old, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
