"""Streaming, resumable extraction: embeddings written as they are produced, in fixed-size checksummed shards.

Contract:
    ``plan_shards(index_dir, paths, stamps, network_sha256, image_size, shard_size)`` -> :class:`ShardPlan`
    (a work folder ``index_dir/shards-<key>/`` that belongs to exactly this job); ``embed_missing_shards(plan,
    embed)`` embeds every shard that is missing or damaged with ``embed(paths) -> (n, D) float32`` and writes
    it; ``plan.read(i)`` -> the ``(n_i, D)`` float32 rows of shard ``i`` (paths ``plan.paths[start_i:stop_i]``),
    checked against their checksum. Peak memory is one shard (plus the network), whatever the number of images.

On-disk layout of a work folder::

    plan.json             the job: network SHA-256, image size, shard size, number of paths and shards, key,
                          settings (the key of the job's settings alone)
    shard-<i>.npy         (n_i, D) float32 rows of shard i, in path order
    shard-<i>.json        the shard's record, written last: its range, its paths and their stamps, its shard key,
                          the SHA-256 of shard-<i>.npy

The settings are the network's content hash, the image size, the shard size, the precision, the CPU runtime and
the batch size (as the engine declares them). The key (folder name) hashes them with every path and the stamp
of its file (size and modification time, or content hash); a shard's own key hashes them with the shard's
paths and stamps only: its rows depend on nothing else. A job whose inputs changed (a bad file taken out, a file
fixed) is another folder, but :func:`plan_shards` moves into it every finished shard of an earlier job with the
same settings whose shard key matches (the shards before the change), so only the shards from the change on are
recomputed; :func:`remove_stale_shards` then deletes, once the job is committed, what is left of such earlier
jobs' shards that name one of its images (they can never match again) and their emptied folders. Both files of a
shard are written atomically (``raml.utils.atomic_path``), the record after the rows: a killed run leaves either
a complete shard or one that is recomputed. A shard whose record is missing or unreadable, names other paths,
stamps or settings, or whose rows do not match the recorded SHA-256 (a damaged disk, a truncated copy) is
recomputed; finished shards are never recomputed. The caller removes the folder once the index generation built
from it is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
    "remove_stale_shards",
    "shard_folders",
    "write_shard",
]

DEFAULT_SHARD_SIZE = 4096
"""Rows per shard: 8 MiB of 512-d float32, so a killed run loses at most that much work per worker."""

SHARDS_PREFIX = "shards-"
_KEY_CHARS = 20
_SHARD_KEY_CHARS = 32

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
        settings: The job's settings as lines (network, size, shard size, ...): with a shard's paths and stamps,
            its shard key (:meth:`shard_key`).
    """

    directory: Path
    paths: list[str]
    stamps: list[str]
    shard_size: int
    settings: tuple[str, ...] = ()

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

    def shard_stamps(self, i: int) -> list[str]:
        """The stamps of shard ``i``'s paths."""
        start, stop = self.bounds(i)
        return self.stamps[start:stop]

    def shard_key(self, i: int) -> str:
        """What shard ``i``'s rows depend on: the job's settings, its paths and their stamps (not its place)."""
        return _shard_key(self.settings, self.shard_paths(i), self.shard_stamps(i))

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
            # a record of an earlier raml has no key and no stamps: the folder's key covers the stamps
            or (("key" in record or "stamps" in record) and record.get("key") != self.shard_key(i))
            or (("key" in record or "stamps" in record) and record.get("stamps") != self.stamps[start:stop])
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
        write_shard(self.directory, i, start, self.paths[start:stop], rows, self.stamps[start:stop], self.shard_key(i))

    def read(self, i: int) -> np.ndarray:
        """The rows of shard ``i``, checked against the recorded SHA-256.

        Raises:
            ValueError: If the shard is missing or damaged (run :func:`embed_missing_shards` again).
        """
        record = self._record(i)
        rows_file = self._files(i)[0]
        data = rows_file.read_bytes() if record is not None else b""
        damaged = ValueError(
            f"Shard {i} in {self.directory} is missing or damaged; run the same `raml index` command again to "
            "recompute it."
        )
        if record is None or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise damaged
        from raml.retrieval.cache import check_npy_size  # imports torch: not at the top of this light module

        try:  # before np.load allocates what the header declares (the hash only says the record matches the file)
            check_npy_size(rows_file)
        except ValueError as error:
            raise damaged from error
        rows = np.load(rows_file, allow_pickle=False)
        if rows.shape != (record["rows"], record["dim"]) or rows.dtype != np.float32:
            raise ValueError(f"Shard {i} in {self.directory} holds {rows.dtype} {rows.shape}, not its record's.")
        return rows

    def iter_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start row, rows)`` of every shard in order, one shard in memory at a time."""
        for i in range(self.num_shards):
            yield self.bounds(i)[0], self.read(i)


def write_shard(
    directory: Path, i: int, start: int, paths: list[str], rows: np.ndarray, stamps: list[str], key: str
) -> None:
    """Write shard ``i`` (rows ``start .. start + len(paths) - 1`` of its job) into the work folder ``directory``:
    the rows, then (the commit of the shard) its record with their SHA-256, the paths' ``stamps`` and the shard
    ``key`` (:meth:`ShardPlan.shard_key`). A worker of a distributed engine calls this with its shard's paths,
    stamps and key only; rewriting a shard (a retried task) replaces it atomically."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != len(paths):
        raise ValueError(
            f"shard {i} needs {len(paths)} rows (paths {start}..{start + len(paths) - 1}), got shape {rows.shape}"
        )
    if len(stamps) != len(paths):
        raise ValueError(f"shard {i} has {len(paths)} paths but {len(stamps)} stamps")
    rows_file, record_file = directory / f"shard-{i:06d}.npy", directory / f"shard-{i:06d}.json"
    atomic_numpy_save(rows, rows_file)
    record = {
        "shard": i,
        "start": start,
        "stop": start + len(paths),
        "rows": int(rows.shape[0]),
        "dim": int(rows.shape[1]),
        "sha256": file_sha256(rows_file),
        "key": key,
        "paths": list(paths),
        "stamps": list(stamps),
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
        stamps: One stamp per path (a changed file changes the key and its shard's key, so its stale rows are
            never reused).
        network_sha256: Content hash of the network.
        image_size: Resolution of the embedding.
        shard_size: Rows per shard.
        precision: The forward's arithmetic (``fp32``, ``bf16``): rows of another precision are never reused
            (an fp32 key has no precision entry, as before bf16 existed).
        runtime: The CPU runtime that embeds the job (``torch``, ``onnxruntime``), when the engine says: rows of
            another runtime differ in their last bits and are never reused.
        batch_size: Images per forward pass, when the engine says (the batch changes the last bits too).

    The finished shards of an earlier job with the same settings whose paths and stamps are one of this job's
    shards (a run stopped by a bad file, rerun without it) are moved into the new folder, not recomputed.

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
    settings = [f"network {network_sha256}", f"size {image_size}", f"shard {shard_size}"]
    if precision != "fp32":
        settings.append(f"precision {precision}")
    if runtime is not None:
        settings.append(f"runtime {runtime}")
    if batch_size is not None:
        settings.append(f"batch {batch_size}")
    # the folder's key as before the shard keys (the count after the shard size)
    header = [*settings[:3], f"count {len(paths)}", *settings[3:]]
    key = _sha256_text([*header, *(f"{s} {p}" for p, s in zip(paths, stamps))])[:_KEY_CHARS]
    settings_key = _sha256_text(settings)[:_KEY_CHARS]
    directory = Path(index_dir) / f"{SHARDS_PREFIX}{key}"
    plan = ShardPlan(directory, list(paths), list(stamps), shard_size, tuple(settings))
    plan.directory.mkdir(parents=True, exist_ok=True)
    record = plan.directory / "plan.json"
    if _read_json(record).get("settings") != settings_key:
        description = {
            "key": key,
            "settings": settings_key,
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
    _adopt_shards(plan, settings_key)
    return plan


def _shard_key(settings: Sequence[str], paths: Sequence[str], stamps: Sequence[str]) -> str:
    return _sha256_text([*settings, *(f"{s} {p}" for p, s in zip(paths, stamps))])[:_SHARD_KEY_CHARS]


def _read_json(file: Path) -> dict:
    """The JSON object in ``file``; ``{}`` when it is missing, unreadable or no object."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _same_settings_folders(plan: ShardPlan, settings_key: str) -> list[Path]:
    """The other work folders in ``plan``'s index directory whose jobs have ``plan``'s settings."""
    return [
        folder
        for folder in shard_folders(plan.directory.parent)
        if folder != plan.directory and _read_json(folder / "plan.json").get("settings") == settings_key
    ]


def _adopt_shards(plan: ShardPlan, settings_key: str) -> None:
    """Move into ``plan``'s folder every finished shard of an earlier job with the same settings whose shard key
    is one of ``plan``'s missing shards' (an interrupted run whose inputs then changed: a bad file taken out).
    The rows file moves as it is and the record is rewritten for its new place; their checksum is checked, as
    every shard's, by :meth:`ShardPlan.missing` before the engine runs."""
    wanted: dict[str, int] = {}
    for i in range(plan.num_shards):
        if not plan._files(i)[1].is_file():
            wanted.setdefault(plan.shard_key(i), i)
    if not wanted:
        return
    for folder in _same_settings_folders(plan, settings_key):
        adopted = 0
        for record_file in sorted(folder.glob("shard-*.json")):
            record = _read_json(record_file)
            i = wanted.get(record.get("key")) if isinstance(record.get("key"), str) else None
            if i is None:
                continue
            start, stop = plan.bounds(i)
            if record.get("paths") != plan.paths[start:stop] or record.get("stamps") != plan.stamps[start:stop]:
                continue
            rows_file, own_record = plan._files(i)
            try:
                os.replace(record_file.with_suffix(".npy"), rows_file)
            except OSError:
                continue
            atomic_write_text(own_record, json.dumps({**record, "shard": i, "start": start, "stop": stop}) + "\n")
            record_file.unlink(missing_ok=True)
            del wanted[record["key"]]
            adopted += 1
        if adopted:
            logger.info("Reusing %d finished shard(s) of an earlier job with the same settings (%s)", adopted, folder)
        if not wanted:
            return


def remove_stale_shards(plan: ShardPlan) -> int:
    """Once ``plan``'s job is committed: delete the shards of other jobs with the same settings that name one of
    its images (an earlier run of it whose inputs changed: such shards can never match again, since a later
    update skips the indexed images), then those folders if no shard is left in them. Returns the number of
    folders deleted."""
    if not plan.settings:
        return 0
    settings_key = _sha256_text(plan.settings)[:_KEY_CHARS]
    paths = set(plan.paths)
    removed = 0
    for folder in _same_settings_folders(plan, settings_key):
        for record_file in sorted(folder.glob("shard-*.json")):
            named = _read_json(record_file).get("paths")
            if isinstance(named, list) and not paths.isdisjoint(p for p in named if isinstance(p, str)):
                record_file.unlink(missing_ok=True)
                record_file.with_suffix(".npy").unlink(missing_ok=True)
        if not any(folder.glob("shard-*.json")):
            logger.info("Removing %s: an earlier run of this job, its shards reused or unmatchable now", folder)
            remove_shard_folder(folder)
            removed += 1
    return removed


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
