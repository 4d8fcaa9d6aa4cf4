"""Small shared helpers: atomic, durable file output; device selection; content hashing; seeding."""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import logging
import os
import platform
import random
import secrets
import shutil
import stat
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the command line's parsers use this module and import neither
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

# Bounds of counts a user gives (flags, --config files, library arguments), one home for every layer: the parsers
# (raml.entry), TrainConfig, DemoSettings and the service check against these.
#: the largest --workers: data loader worker processes, far above any use (the default is at most 8); past it a
#: machine only runs out of memory starting them (99999999999 was OOM-killed, leaving orphaned workers)
MAX_WORKERS = 256
#: the largest --threads: torch's intra-op threads, far above any machine's cores (torch.set_num_threads
#: overflows past 2**31 - 1 with a message that names no flag)
MAX_THREADS = 4096
#: the largest --seed: seed_everything seeds torch with ``seed + epoch`` (at most 2**64 - 1)
MAX_SEED = 2**63 - 1


_TEMPORARY_ATTEMPTS = 100


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path``, durably, only if the block succeeds.

    Readers never see a half-written file, and a failure (or a kill) leaves any previous file intact. The
    temporary file is fsynced before the rename and the directory after it, so that a power loss cannot
    leave a renamed but empty file. It gets the permissions a plain ``open()`` would give: those of an
    existing ``path``, else ``0o666`` less the process umask (which is never changed here).

    The temporary file is ``.<name>.<random hex>.tmp`` in the same folder (the index cleans up such files
    left by a kill).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        keep_mode = None
    tmp = _create_temporary(path, 0o666 if keep_mode is None else keep_mode)
    try:
        yield tmp
        if keep_mode is not None:  # the umask may have removed bits of the existing file's mode
            os.chmod(tmp, keep_mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _new_temporary(path: Path, make: Callable[[Path], object]) -> Path:
    """A new temporary name next to ``path`` (``.<name>.<random hex>.tmp``, the pattern the index and the trainer
    clean up after a kill), made into a file by ``make(name)``, which raises ``FileExistsError`` when the name is
    taken (another is then tried)."""
    for _ in range(_TEMPORARY_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            make(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(  # pragma: no cover - 100 collisions of 32 random bits
        f"Could not create a temporary file next to {path}: {_TEMPORARY_ATTEMPTS} names were taken; remove the "
        f"leftover .{path.name}.*.tmp files."
    )


def _create_temporary(path: Path, mode: int) -> Path:
    """Create an empty, new file next to ``path`` with ``mode`` (less the umask, applied by the kernel)."""
    return _new_temporary(path, lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories cannot be opened.

    File systems that do not support fsync on a directory (``EINVAL``) are skipped; other errors are raised.
    """
    if os.name == "nt":  # pragma: no cover - Windows cannot open a directory; its renames are journalled
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        logger.debug("fsync is not supported on the directory %s (%s); skipped", directory, error)
    finally:
        os.close(fd)


_BYTES_OR_ESCAPED = "raml.surrogateescape-or-backslashreplace"


def _bytes_or_escaped(error: UnicodeError) -> tuple[bytes, int]:
    """A codec error handler: a lone surrogate that stands for a byte (U+DC80-U+DCFF, how Python decodes a file
    name that is not valid UTF-8) is written as that byte, as ``surrogateescape`` does; any other (e.g. U+D800,
    which stands for no byte: a split file's ``"\\ud800"``) as its escape ``\\ud800``, as ``backslashreplace``
    does, where ``surrogateescape`` would raise."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for char in error.object[error.start : error.end]:
        code = ord(char)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}".encode("ascii")
    return bytes(out), error.end


codecs.register_error(_BYTES_OR_ESCAPED, _bytes_or_escaped)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, in UTF-8.

    Lone surrogates (a file name that is not valid UTF-8, as Python decodes it: ``b"caf\\xe9"`` ->
    ``"caf\\udce9"``) are written back as the bytes they stand for (as ``errors="surrogateescape"`` does), so a
    report that lists such a file names it byte for byte instead of failing with ``UnicodeEncodeError``. A lone
    surrogate that stands for no byte (U+D800-U+DC7F, e.g. from a JSON ``"\\ud800"``) is written as its escape
    ``\\ud800``.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=_BYTES_OR_ESCAPED)


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically.

    Raises:
        OSError: The file could not be written (torch says so with a ``RuntimeError`` from its C++ writer, e.g.
            ``[enforce fail at inline_container.cc:672] . unexpected pos`` on a full disk): ``ENOSPC`` when its
            disk has less free space than the tensors being saved, else ``EIO``; the message names the path,
            the bytes free and what was kept (a previous file at ``path`` is left as it was).
    """
    import torch

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError as error:
        if not any(sign in str(error) for sign in _TORCH_WRITE_FAILURES):
            raise
        # the failed writer (in the traceback's frames) still holds the deleted temporary file open, and with it
        # the disk space it took: let it go before the free space is measured
        cause: BaseException | None = error
        while cause is not None:
            traceback.clear_frames(cause.__traceback__)
            cause = cause.__context__
        raise _failed_save_error(path, _tensor_bytes(obj), error) from error


#: what torch's C++ writer says when the file cannot be written (a full disk, an I/O error)
_TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "iostream error", "unexpected pos")


def _tensor_bytes(obj: object) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): about what ``torch.save`` writes."""
    import torch

    if torch.is_tensor(obj):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def _failed_save_error(path: Path, needed: int, error: BaseException) -> OSError:
    """An OSError for a write of about ``needed`` bytes to ``path`` that failed with ``error``."""
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = free is not None and free < needed
    free_text = f"{free} bytes" if free is not None else "unknown bytes"
    kept = f"the previous {path.name} is kept as it was" if path.exists() else f"no {path.name} was written"
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        errno.ENOSPC if full else errno.EIO,
        f"Could not write {path} ({'no space left on its disk' if full else 'a write error'}: {free_text} free "
        f"there, about {needed} bytes to write; {cause}); {kept}. Free some space (or write elsewhere) and run "
        "again",
    )


def atomic_duplicate(source: str | Path, path: str | Path) -> None:
    """Make ``path`` hold what the finished file ``source`` holds, atomically: a second name for the same file (a
    hard link: no bytes written) where the file system allows it, else a copy. Either way ``path`` is replaced
    only once complete, and a later atomic replacement of either name leaves the other as it was."""
    source, path = Path(source), Path(path)
    try:
        tmp = _new_temporary(path, lambda name: os.link(source, name))
    except OSError:  # no hard links here (or across devices): copy
        with atomic_path(path) as copy:
            shutil.copyfile(source, copy)
        return
    try:
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_numpy_save(array: np.ndarray, path: str | Path) -> None:
    """``np.save`` to ``path`` atomically (the file name is kept exactly, no ``.npy`` appended)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def select_device(name: str = "auto") -> torch.device:
    """Resolve a device name once, at the entry point: ``auto`` is CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N (N a GPU index) or mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asked for CUDA, but no CUDA device is visible; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(
            f"--device {name!r}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}; pick one of them."
        )
    return device


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    return file_digests(path, ("sha256",), chunk_size)["sha256"]


def file_digests(path: str | Path, algorithms: Sequence[str], chunk_size: int = 1 << 20) -> dict[str, str]:
    """Hex digests of a file's content for several ``hashlib`` algorithms (e.g. ``("sha256", "md5")``), computed
    in one read of the file (a multi-GB archive is read once, not once per algorithm)."""
    digests = {name: hashlib.new(name) for name in dict.fromkeys(algorithms)}
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cpu_model() -> str:
    """The processor's model name (for benchmark reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
