"""Streaming, resumable extraction: embeddings written as they are produced, in fixed-size checksummed shards.

Contract:
    ``plan_shards(index_dir, paths, stamps, network_sha256, image_size, shard_size)`` -> :class:`ShardPlan`
    (a work folder ``index_dir/shards-<key>/`` that belongs to exactly this job); ``embed_missing_shards(plan,
    embed)`` embeds every shard that is missing or damaged with ``embed(paths) -> (n, D) float32`` and writes
    it; ``plan.read(i)`` -> the ``(n_i, D)`` float32 rows of shard ``i`` (paths ``plan.paths[start_i:stop_i]``),
    checked against their checksum. Peak memory is one shard (plus the network), whatever the number of images.

On-disk layout of a work folder::

    plan.json             the job: network SHA-256, image size, shard size, number of paths and shards, key
    shard-<i>.npy         (n_i, D) float32 rows of shard i, in path order
    shard-<i>.json        the shard's record, written last: its range, its paths, the SHA-256 of shard-<i>.npy

The key (folder name) is a hash of the network's content hash, the image size, the shard size, the precision,
the CPU runtime and the batch size (as the engine declares them) and every path with the stamp of its file
(size and modification time, or content hash), so a run with other inputs never
picks up these shards. Both files of a shard are written atomically (``raml.utils.atomic_path``), the record
after the rows: a killed run leaves either a complete shard or one that is recomputed. A shard whose record is
missing or unreadable, names other paths, or whose rows do not match the recorded SHA-256 (a damaged disk, a
truncated copy) is recomputed; finished shards are never recomputed. The caller removes the folder once the
index generation built from it is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raml.utils import atomic_numpy_save, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "SHARDS_PREFIX",
    "ShardPlan",
    "embed_missing_shards",
    "is_shards_folder",
    "plan_shards",
    "folder_bytes",
    "remove_shard_folder",
    "shard_folders",
    "write_shard",
]

DEFAULT_SHARD_SIZE = 4096
"""Rows per shard: 8 MiB of 512-d float32, so a killed run loses at most that much work per worker."""

SHARDS_PREFIX = "shards-"
_KEY_CHARS = 20

EmbedFn = Callable[[list[str]], np.ndarray]
"""``paths -> (len(paths), D) float32`` embeddings in path order."""


def is_shards_folder(name: str) -> bool:
    """A work folder of :func:`plan_shards` (``shards-<hex key>``)."""
    key = name[len(SHARDS_PREFIX) :]
    return name.startswith(SHARDS_PREFIX) and len(key) == _KEY_CHARS and all(c in "0123456789abcdef" for c in key)


def remove_shard_folder(folder: Path) -> None:
    """Delete one shard work folder (a committed job's)."""
    if folder.is_dir() and not folder.is_symlink() and is_shards_folder(folder.name):
        shutil.rmtree(folder, ignore_errors=True)


def shard_folders(index_dir: Path) -> list[Path]:
    """The shard work folders in ``index_dir``, by name."""
    entries = index_dir.iterdir()
    return sorted(e for e in entries if is_shards_folder(e.name) and e.is_dir() and not e.is_symlink())


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (a shard work folder has no subfolders)."""
    total = 0
    for entry in folder.iterdir():
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:
            pass
    return total


def _sha256_text(lines: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """One extraction job, cut into shards of ``shard_size`` consecutive paths.

    Attributes:
        directory: The work folder (``<index_dir>/shards-<key>``).
        paths: The images to embed, in row order.
        stamps: One stamp per path (part of the key).
        shard_size: Rows per shard (the last shard may be shorter).
    """

    directory: Path
    paths: list[str]
    stamps: list[str]
    shard_size: int

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return -(-len(self.paths) // self.shard_size)

    def bounds(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``i``."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range 0..{self.num_shards - 1}")
        return i * self.shard_size, min((i + 1) * self.shard_size, len(self.paths))

    def shard_paths(self, i: int) -> list[str]:
        """The paths of shard ``i``."""
        start, stop = self.bounds(i)
        return self.paths[start:stop]

    def _files(self, i: int) -> tuple[Path, Path]:
        return self.directory / f"shard-{i:06d}.npy", self.directory / f"shard-{i:06d}.json"

    def _record(self, i: int) -> dict | None:
        """The shard's record if it is complete and names this shard's paths, else None."""
        rows_file, record_file = self._files(i)
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            return None
        start, stop = self.bounds(i)
        if (
            not isinstance(record, dict)
            or record.get("start") != start
            or record.get("stop") != stop
            or record.get("paths") != self.paths[start:stop]
            or not rows_file.is_file()
        ):
            return None
        return record

    def is_valid(self, i: int) -> bool:
        """Whether shard ``i`` is complete and undamaged (its rows match the recorded SHA-256)."""
        record = self._record(i)
        if record is None:
            return False
        try:
            return file_sha256(self._files(i)[0]) == record.get("sha256")
        except OSError:
            return False

    def missing(self) -> list[int]:
        """Shards to (re)compute: missing, incomplete or damaged, in order."""
        return [i for i in range(self.num_shards) if not self.is_valid(i)]

    def write(self, i: int, rows: np.ndarray) -> None:
        """Write shard ``i``: its rows, then (the commit of the shard) its record with their SHA-256."""
        start, stop = self.bounds(i)
        write_shard(self.directory, i, start, self.paths[start:stop], rows)

    def read(self, i: int) -> np.ndarray:
        """The rows of shard ``i``, checked against the recorded SHA-256.

        Raises:
            ValueError: If the shard is missing or damaged (run :func:`embed_missing_shards` again).
        """
        record = self._record(i)
        rows_file = self._files(i)[0]
        data = rows_file.read_bytes() if record is not None else b""
        if record is None or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise ValueError(
                f"Shard {i} in {self.directory} is missing or damaged; run the same `raml index` command again to "
                "recompute it."
            )
        rows = np.load(rows_file, allow_pickle=False)
        if rows.shape != (record["rows"], record["dim"]) or rows.dtype != np.float32:
            raise ValueError(f"Shard {i} in {self.directory} holds {rows.dtype} {rows.shape}, not its record's.")
        return rows

    def iter_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start row, rows)`` of every shard in order, one shard in memory at a time."""
        for i in range(self.num_shards):
            yield self.bounds(i)[0], self.read(i)


def write_shard(directory: Path, i: int, start: int, paths: list[str], rows: np.ndarray) -> None:
    """Write shard ``i`` (rows ``start .. start + len(paths) - 1`` of its job) into the work folder ``directory``:
    the rows, then (the commit of the shard) its record with their SHA-256. A worker of a distributed engine
    calls this with its shard's paths only; rewriting a shard (a retried task) replaces it atomically."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != len(paths):
        raise ValueError(
            f"shard {i} needs {len(paths)} rows (paths {start}..{start + len(paths) - 1}), got shape {rows.shape}"
        )
    rows_file, record_file = directory / f"shard-{i:06d}.npy", directory / f"shard-{i:06d}.json"
    atomic_numpy_save(rows, rows_file)
    record = {
        "shard": i,
        "start": start,
        "stop": start + len(paths),
        "rows": int(rows.shape[0]),
        "dim": int(rows.shape[1]),
        "sha256": file_sha256(rows_file),
        "paths": list(paths),
    }
    atomic_write_text(record_file, json.dumps(record) + "\n")


def plan_shards(
    index_dir: Path,
    paths: Sequence[str],
    stamps: Sequence[str],
    network_sha256: str,
    image_size: int,
    shard_size: int = DEFAULT_SHARD_SIZE,
    precision: str = "fp32",
    runtime: str | None = None,
    batch_size: int | None = None,
) -> ShardPlan:
    """The shard plan of one extraction job; its work folder is created (or found, when resuming).

    Args:
        index_dir: The index directory the work folder goes in.
        paths: Images to embed, in row order.
        stamps: One stamp per path (a changed file changes the key, so its stale rows are never reused).
        network_sha256: Content hash of the network.
        image_size: Resolution of the embedding.
        shard_size: Rows per shard.
        precision: The forward's arithmetic (``fp32``, ``bf16``): rows of another precision are never reused
            (an fp32 key has no precision entry, as before bf16 existed).
        runtime: The CPU runtime that embeds the job (``torch``, ``onnxruntime``), when the engine says: rows of
            another runtime differ in their last bits and are never reused.
        batch_size: Images per forward pass, when the engine says (the batch changes the last bits too).

    The local and Ray engines give a runtime and a batch size since 2026-12-05, so a job interrupted under an
    earlier raml does not resume (its rows are recomputed; its old folder stays, named after each commit, until
    deleted).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of images, got {shard_size!r}.")
    if len(paths) != len(stamps):
        raise ValueError(f"Got {len(paths)} paths but {len(stamps)} stamps.")
    if not paths:
        raise ValueError("No images to embed: the list of paths is empty.")
    header = [f"network {network_sha256}", f"size {image_size}", f"shard {shard_size}", f"count {len(paths)}"]
    if precision != "fp32":
        header.append(f"precision {precision}")
    if runtime is not None:
        header.append(f"runtime {runtime}")
    if batch_size is not None:
        header.append(f"batch {batch_size}")
    key = _sha256_text([*header, *(f"{s} {p}" for p, s in zip(paths, stamps))])[:_KEY_CHARS]
    plan = ShardPlan(Path(index_dir) / f"{SHARDS_PREFIX}{key}", list(paths), list(stamps), shard_size)
    plan.directory.mkdir(parents=True, exist_ok=True)
    record = plan.directory / "plan.json"
    if not record.is_file():
        description = {
            "key": key,
            "network_sha256": network_sha256,
            "image_size": int(image_size),
            "precision": precision,
            "runtime": runtime,
            "batch_size": batch_size,
            "shard_size": shard_size,
            "count": len(paths),
            "shards": plan.num_shards,
        }
        atomic_write_text(record, json.dumps(description, indent=2) + "\n")
    return plan


def embed_missing_shards(plan: ShardPlan, embed: EmbedFn, progress: Callable[[int, int], None] | None = None) -> int:
    """Embed and write every shard of ``plan`` that is missing or damaged; finished shards are kept.

    Args:
        plan: The job.
        embed: ``paths -> (len(paths), D) float32`` rows in path order.
        progress: Called with ``(shards done, shards total)`` after each shard.

    Returns:
        The number of shards computed in this call.
    """
    todo = plan.missing()
    done = plan.num_shards - len(todo)
    if done:
        logger.info("Resuming from %s: %d of %d shards already done", plan.directory, done, plan.num_shards)
    for i in todo:
        rows = embed(plan.shard_paths(i))
        plan.write(i, rows)
        done += 1
        logger.debug("Shard %d written (%d of %d)", i, done, plan.num_shards)
        if progress is not None:
            progress(done, plan.num_shards)
    return len(todo)
