"""``raml index``: embed a database with the teacher at DR and create, update or rebuild an index directory.

Contract:
    ``index_images(network, paths, image_size, index_dir, ...)`` embeds ``paths`` (rows ``(N, D)`` float32,
    L2-normalised, in path order) and commits them as the next generation of the index stored in
    ``index_dir`` (layout, ids and commit protocol: :mod:`raml.deploy.store`; index types:
    :mod:`raml.deploy.faiss_index`). It also removes images (``remove``) and re-embeds indexed images whose
    file changed (size and modification time, or content with ``hash_images``).

The extraction streams: the images to embed are cut into fixed-size shards written to a work folder in the
index directory as they are produced (:mod:`raml.deploy.shards`), so a killed run resumes at the first missing
or damaged shard; the next generation's embeddings file and faiss index are then filled shard by shard from
a memory map, and the work folder is removed after the commit. Peak memory is one shard plus the faiss index
(plus the training sample of IVF types), not ``N x D`` floats.

An update holds the directory's lock (:class:`raml.deploy.lock.DirectoryLock`) from reading the current
generation to the commit, so a second writer is refused at once; readers take no lock.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from raml.deploy.bad_images import REPORT_NAMES, BadImagePolicy, screen_work
from raml.deploy.embed import embed_images
from raml.deploy.faiss_index import (
    IndexParams,
    add_with_ids,
    apply_search_params,
    empty_faiss_index,
    has_ids,
    remove_ids,
    train_faiss_index,
    training_sample,
)
from raml.deploy.image_files import check_images_exist, image_key
from raml.deploy.lock import DirectoryLock
from raml.deploy.ondisk_ivf import build_ondisk_ivf, extend_ondisk_ivf
from raml.deploy.shards import (
    DEFAULT_SHARD_SIZE,
    ShardPlan,
    embed_missing_shards,
    folder_bytes,
    plan_shards,
    remove_shard_folder,
    remove_stale_shards,
    shard_folders,
)
from raml.deploy.store import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_NAME,
    REMOVED,
    DatabaseIndex,
    IndexDirectoryError,
    generation_file,
    is_index_leftover,
    load_index,
    next_generation,
    remove_leftovers,
    write_generation,
)
from raml.models.forward_wrapper import NetworkWrapper
from raml.models.onnx_forward import OrtForward
from raml.retrieval.cache import file_stamps
from raml.retrieval.extract import forward_precision

logger = logging.getLogger(__name__)

__all__ = ["ShardEngine", "index_images", "local_engine"]

_NO_LABEL = -1
_CHUNK_ROWS = 8192  # rows copied / added to faiss per step when assembling a generation (16 MiB of 512-d float32)

ShardEngine = Callable[[ShardPlan], "dict[str, Any] | None"]
"""Fills every missing or damaged shard of a plan and may return figures about the run (the single-process
default: :func:`local_engine`; the Ray engine: :func:`raml.deploy.ray_engine.ray_engine`). An engine may have a
``key_fields(images) -> {"runtime": str, "batch": int}`` attribute: what its rows depend on for a job of ``images``
images, besides the network, size and precision; both go into the shard key."""


class _JobForward(NetworkWrapper):
    """An :class:`OrtForward` whose runtime was decided for a whole job (``expect`` called once with the job's
    size): it is no ``OrtForward`` to :func:`extract_embeddings`, so a shard's own size never decides again."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def _job_runtime(network: nn.Module, image_size: int, images: int) -> str:
    """``onnxruntime`` or ``torch``: what runs a job of ``images`` images at ``image_size`` on ``network`` (an
    :class:`OrtForward` with a warm-up, ``--cpu-runtime auto``, exports only for a job that repays it)."""
    if not isinstance(network, OrtForward):
        return "torch"
    if network.warmup_pixels == 0 or images * image_size * image_size >= 2 * network.warmup_pixels:
        return "onnxruntime"
    return "torch"


def _job_forward(network: nn.Module, image_size: int, images: int) -> nn.Module:
    """The forward that embeds every shard of a job of ``images`` images: the runtime is the whole job's choice
    (:func:`_job_runtime`), so a resumed run, which has only the remaining shards to embed, chooses as the
    uninterrupted run did."""
    if not isinstance(network, OrtForward) or network.warmup_pixels == 0:
        return network
    if _job_runtime(network, image_size, images) == "torch":
        return network.network
    network.expect((3, image_size, image_size), images)
    return _JobForward(network)


def local_engine(
    network: nn.Module,
    image_size: int,
    devices: Sequence[torch.device] = (torch.device("cpu"),),
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
) -> ShardEngine:
    """The single-process engine: shard after shard through :func:`raml.deploy.embed.embed_images` (several
    CUDA devices split each shard). The CPU runtime is decided from the whole job (``plan.paths``).

    The engine's ``key_fields(images)`` names what its rows depend on beyond the network, size and precision
    (the runtime for a job of ``images`` images and the batch size): they are part of the shard key."""

    def run(plan: ShardPlan) -> dict[str, Any]:
        todo = len(plan.missing())
        forward = _job_forward(network, image_size, len(plan.paths))
        with tqdm(total=todo, desc=f"index@{image_size}", unit="shard", disable=not progress) as bar:
            computed = embed_missing_shards(
                plan,
                lambda paths: embed_images(forward, paths, image_size, list(devices), batch_size, workers, False),
                progress=lambda done, total: bar.update(1),
            )
        return {"engine": "local", "shards": plan.num_shards, "shards_computed": computed}

    run.key_fields = lambda images: {  # type: ignore[attr-defined]
        "runtime": _job_runtime(network, image_size, images),
        "batch": batch_size,
    }
    return run


def index_images(
    network: nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    index_dir: str | Path,
    network_sha256: str,
    network_path: str | Path | None = None,
    labels: Sequence[int] | None = None,
    dataset: str | None = None,
    params: IndexParams | None = None,
    overwrite: bool = False,
    devices: Sequence[torch.device] = (torch.device("cpu"),),
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    before_commit: Callable[[], None] | None = None,
    remove: Sequence[str | Path] = (),
    hash_images: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    engine: ShardEngine | None = None,
    bad_images: BadImagePolicy = "error",
) -> dict[str, Any]:
    """Create an index of ``paths`` in ``index_dir``, or update the index already there.

    When ``index_dir`` holds an index (and ``overwrite`` is False) it is updated: the network's content hash,
    the image size and the forward's precision (fp32, or bf16 from ``inference_network``; an index that records
    none is fp32) must match the index's; new images are appended with new ids; images already indexed
    (same normalised absolute path) keep their id and are re-embedded only if their file changed (size and
    modification time, or SHA-256 of the content with ``hash_images``); repeats in ``paths`` are skipped;
    ``remove`` takes images out (their ids are never given again). ``overwrite`` rebuilds the index from
    ``paths`` alone (any network), keeping the id of every path the old index had. Every check runs before
    any image is embedded.

    Args:
        network: The database network (teacher), on ``devices[0]``; ``(B, 3, S, S)`` -> ``(B, D)``.
        paths: Image files (may be empty when only removing); stored absolute (a relative path is joined to the
            working directory).
        image_size: Database resolution DR.
        index_dir: The index directory (created if missing).
        network_sha256: Content hash of the network's checkpoint (see ``raml.models.checkpoint_sha256``).
        network_path: The checkpoint path, recorded for reference.
        labels: One class label per path (a dataset split), or None.
        dataset: Name of the split the images come from, recorded.
        params: Index type and parameters for a new index; None = flat for a new index, or the existing
            index's type when appending (a different explicit type is refused).
        overwrite: Build a new index even if ``index_dir`` holds one (replaced at the commit).
        devices: Devices for the extraction (several CUDA devices shard it).
        batch_size: Images per forward pass.
        workers: DataLoader workers.
        progress: Show progress bars.
        before_commit: Called after the data files are written and before ``index.json`` is replaced (tests
            use it to simulate a crash).
        remove: Images to take out of the index (paths as indexed; normalised like ``paths``).
        hash_images: Compare indexed files by content (SHA-256) instead of size and modification time.
        shard_size: Images per shard of the resumable extraction.
        engine: What fills the shards; default :func:`local_engine` over ``devices``.
        bad_images: The images to embed (new or changed) are checked first, headers only
            (:mod:`raml.deploy.bad_images`): ``"error"`` refuses the run if any is bad
            (:class:`~raml.deploy.bad_images.IndexBadImagesError`), ``"skip"`` leaves them out and lists them
            in ``skipped_images_index.txt``.

    Returns:
        A summary: ``{"index_dir", "added", "skipped", "reembedded", "removed", "not_found", "count",
        "index_type", "params", "generation", "bad_images_skipped", "bad_images_report"}``.

    Raises:
        IndexDirectoryError: On an incompatible existing index, or a non-empty folder that is not an index.
        ValueError: On bad arguments (no paths, wrong number of labels, infeasible parameters).
        ImageLoadError: If images are missing or unreadable.
        LockHeldError: If another process is writing to ``index_dir`` (a ``FileExistsError``; the message
            names its PID). A lock left by a killed writer is taken over, with a warning.
    """
    index_dir = Path(index_dir)
    # Stored absolute (a relative path joined to the working directory, not otherwise normalised), so that an
    # update from another working directory recognises the same file; an older index's relative paths are keyed
    # against the working directory, as they always were.
    paths = [_absolute(str(p)) for p in paths]
    remove = [str(p) for p in remove]
    if not paths and not remove:
        raise ValueError("No images to index: the list of paths is empty.")
    if remove and overwrite:
        raise ValueError(
            "--remove updates an existing index; --overwrite rebuilds it from the given images alone "
            "(leave the removed images out of them instead)."
        )
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"Got {len(paths)} paths but {len(labels)} labels; give one label per path (or none).")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}.")
    label_array = np.asarray(labels if labels is not None else [_NO_LABEL] * len(paths), dtype=np.int64)
    dim = int(getattr(network, "meta", {}).get("outputdim", 0)) or None
    precision = forward_precision(network)

    if index_dir.exists() and not index_dir.is_dir():
        raise IndexDirectoryError(
            f"--output {str(index_dir)!r} exists and is not a folder; choose a folder for the index."
        )

    # One writer at a time: the lock spans reading the current generation to committing the next one.
    with DirectoryLock(index_dir, "raml index"):
        # what killed writers left (a SIGKILL runs no clean-up of its own); the reports are a writer's own files
        remove_leftovers(index_dir, own_files=REPORT_NAMES)
        existing: DatabaseIndex | None = None  # the index being updated
        previous: DatabaseIndex | None = None  # the index being rebuilt (--overwrite): only its ids are kept
        if (index_dir / METADATA_NAME).exists() and not overwrite:
            existing = load_index(index_dir, mmap=False)  # updated in a copy, never in its mapped file
            _check_append(existing, network_sha256, image_size, precision, dim, params)
        elif (index_dir / METADATA_NAME).exists():
            try:
                previous = load_index(index_dir)
            except IndexDirectoryError as error:
                logger.warning("Rebuilding %s without its ids: the old index is unreadable (%s)", index_dir, error)
        else:
            # A folder holding only what a killed first build left (generation, temporary, lock files) is reused.
            names = (p.name for p in index_dir.iterdir())
            foreign = sorted(n for n in names if not (is_index_leftover(n) or n in REPORT_NAMES))
            if foreign:
                raise IndexDirectoryError(
                    f"--output {str(index_dir)!r} is a non-empty folder that holds no raml index (it holds "
                    f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder "
                    "(nothing was written)."
                )
        if remove and existing is None:
            raise IndexDirectoryError(f"--remove needs an index in {str(index_dir)!r}, and there is none.")

        base = existing if existing is not None else previous
        id_of = {image_key(p): i for i, p in enumerate(base.paths) if p != REMOVED} if base is not None else {}
        num_ids = len(base.paths) if base is not None else 0

        # Removals first: a path both removed and given is removed.
        removed_ids: list[int] = []
        not_found: list[str] = []
        for path in dict.fromkeys(remove):
            key = image_key(path)
            if key in id_of:
                removed_ids.append(id_of.pop(key))
            else:
                not_found.append(path)
        if not_found:
            logger.warning("%d image(s) to remove are not in the index (e.g. %r)", len(not_found), not_found[0])
        removed_keys = {image_key(p) for p in remove}

        # Classify the given paths: new (next ids), known and changed (same id, re-embedded), known and unchanged.
        seen: set[str] = set()
        work_paths: list[str] = []  # to embed, in this order
        work_ids: list[int] = []
        work_labels: list[int] = []
        known: list[tuple[int, str, int]] = []  # (id, path, position in the call) of indexed images, for stamps
        for i, path in enumerate(paths):
            key = image_key(path)
            if key in seen or key in removed_keys:
                continue
            seen.add(key)
            if key in id_of and existing is not None:
                known.append((id_of[key], path, i))
                continue
            image_id = id_of.get(key)  # --overwrite: the id this path had
            if image_id is None:
                image_id = num_ids
                num_ids += 1
            work_paths.append(path)
            work_ids.append(image_id)
            work_labels.append(int(label_array[i]))
        stamps_now: dict[int, str] = {}
        reembedded = 0
        if known and existing is not None:
            check_images_exist([p for _, p, _ in known])
            old_stamps = existing.stamps or [""] * len(existing)
            for image_id, path, i in known:
                changed, stamp = _compare_stamp(path, old_stamps[image_id], hash_images)
                if changed:
                    work_paths.append(path)
                    work_ids.append(image_id)
                    work_labels.append(int(label_array[i]) if labels is not None else int(existing.labels[image_id]))
                    reembedded += 1
                elif stamp != old_stamps[image_id]:
                    stamps_now[image_id] = stamp  # first stamp of a legacy index, or sha256 replacing size+mtime
        screened = screen_work(  # --bad-images: the files to embed, checked before any embedding
            bad_images,
            index_dir,
            (index_dir / METADATA_NAME).exists(),
            work_paths,
            work_ids,
            work_labels,
            reembedded,
            len(base.paths) if base is not None else 0,
            num_ids,
            image_size,
            progress,
        )
        work_paths, work_ids, work_labels = screened.paths, screened.ids, screened.labels
        reembedded, num_ids = screened.reembedded, screened.num_ids
        skipped = len(paths) - len(work_paths) - len(screened.bad)
        if skipped:
            logger.info("Skipping %d image(s) already in the index (unchanged) or repeated", skipped)
        if reembedded:
            logger.info("Re-embedding %d indexed image(s) whose file changed", reembedded)
        if existing is not None and not work_paths and not removed_ids and not stamps_now:
            logger.info("Nothing to change: all %d images are already in %s", len(paths), index_dir)
            return {**_summary(index_dir, existing.meta, 0, skipped, 0, 0, not_found), **screened.summary()}
        if existing is None and not work_paths:
            raise ValueError("No images to index: every given path is a repeat or removed.")
        check_images_exist(work_paths)
        live_after = (
            (existing.live_count if existing is not None else 0) - len(removed_ids) + len(work_paths) - reembedded
        )
        if live_after < 1:
            raise ValueError(f"Refusing to remove every image of {index_dir}; delete the folder instead.")
        if existing is None and dim is not None:
            (params or IndexParams()).resolve(live_after, dim)  # infeasible parameters fail before embedding

        plan = None
        engine_report: dict[str, Any] = {}
        if work_paths:
            work_stamps = file_stamps(work_paths, content_hash=hash_images)
            for image_id, stamp in zip(work_ids, work_stamps):
                stamps_now[image_id] = stamp
            run_engine = engine or local_engine(network, image_size, devices, batch_size, workers, progress)
            # what the engine's rows depend on besides the network, size and precision (runtime, batch size)
            key_fields = getattr(run_engine, "key_fields", None)
            fields = dict(key_fields(len(work_paths))) if callable(key_fields) else {}
            plan = plan_shards(
                index_dir,
                work_paths,
                work_stamps,
                network_sha256,
                image_size,
                shard_size,
                precision,
                runtime=fields.get("runtime"),
                batch_size=fields.get("batch"),
            )
            figures = run_engine(plan)
            engine_report = dict(figures) if isinstance(figures, dict) else {}
            missing = plan.missing()
            if missing:
                raise RuntimeError(f"The extraction engine left {len(missing)} shard(s) of {plan.directory} unwritten.")
            dim = int(plan.read(0).shape[1])
        elif existing is not None:
            dim = existing.dim
        assert dim is not None

        # Row layout of the next generation: row = id.
        new_paths = list(base.paths) if existing is not None else [REMOVED] * num_ids
        new_paths += [REMOVED] * (num_ids - len(new_paths))
        new_labels = np.full(num_ids, _NO_LABEL, dtype=np.int64)
        new_stamps = [""] * num_ids
        if existing is not None:
            new_labels[: len(existing)] = existing.labels
            new_stamps[: len(existing)] = existing.stamps or [""] * len(existing)
        for image_id in removed_ids:
            new_paths[image_id], new_labels[image_id], new_stamps[image_id] = REMOVED, _NO_LABEL, ""
        for image_id, path, label in zip(work_ids, work_paths, work_labels):
            new_paths[image_id], new_labels[image_id] = path, label
        for image_id, stamp in stamps_now.items():
            new_stamps[image_id] = stamp

        generation = next_generation(index_dir) if existing is None else int(existing.meta["generation"]) + 1
        emb_tmp = index_dir / f".{generation_file('embeddings', generation)}.{secrets.token_hex(4)}.tmp"
        # an on-disk index's lists file and the folder of its per-chunk parts, under temporary names
        lists_tmp = index_dir / f".{generation_file('invlists', generation)}.{secrets.token_hex(4)}.tmp"
        scratch = index_dir / f".{generation_file('invlists', generation)}.parts-{secrets.token_hex(4)}.tmp"
        try:
            rows = _assemble_embeddings(emb_tmp, num_ids, dim, existing, removed_ids, plan, work_ids)
            live_ids = np.asarray([i for i, p in enumerate(new_paths) if p != REMOVED], dtype=np.int64)
            if existing is None:
                index, resolved = _build_index(rows, live_ids, params or IndexParams(), lists_tmp, scratch)
            else:
                resolved = existing.params
                index = _update_index(
                    existing, rows, live_ids, removed_ids, work_ids, reembedded > 0, lists_tmp, scratch
                )
            del rows
            now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            if existing is None:
                meta: dict[str, Any] = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "generation": generation,
                    "index_type": resolved.index_type,
                    "faiss_factory": resolved.factory_string(),
                    "metric": "inner_product",
                    "params": asdict(resolved),
                    "dim": dim,
                    "dtype": "float32",
                    "network": {
                        "path": str(network_path) if network_path is not None else None,
                        "sha256": network_sha256,
                        "meta": dict(getattr(network, "meta", {}) or {}),
                    },
                    "image_size": int(image_size),
                    "precision": precision,
                    "transform": (
                        "resize shorter side to S*8/7 (Lanczos), centre crop S, normalise with the network's mean/std"
                    ),
                    "count": int(index.ntotal),
                    "datasets": [dataset] if dataset else [],
                    "created": now,
                    "updated": now,
                }
            else:
                meta = dict(existing.meta)
                meta["version"] = FORMAT_VERSION
                meta["generation"] = generation
                meta["count"] = int(index.ntotal)
                meta["updated"] = now
                if dataset and dataset not in meta.get("datasets", []):
                    if meta.get("datasets") and labels is not None:
                        logger.warning(
                            "Appending labelled images of %s to an index holding %s: class labels of different "
                            "splits are not comparable.",
                            dataset,
                            ", ".join(meta["datasets"]),
                        )
                    meta["datasets"] = [*meta.get("datasets", []), dataset]
            meta["file_stamps"] = "sha256" if hash_images else meta.get("file_stamps", "size+mtime_ns")
            # the shard folder this generation comes from: done once committed (removed by the next writer if
            # a kill comes between the commit and its removal)
            meta.pop("work_folder", None)
            if plan is not None:
                meta["work_folder"] = plan.directory.name
            write_generation(
                index_dir,
                meta,
                index,
                lambda target: os.replace(emb_tmp, target),
                new_paths,
                new_labels,
                before_commit,
                stamps=new_stamps,
                lists_file=lists_tmp if resolved.on_disk else None,
            )
        finally:
            emb_tmp.unlink(missing_ok=True)
            lists_tmp.unlink(missing_ok=True)
            shutil.rmtree(scratch, ignore_errors=True)
        if plan is not None:
            remove_shard_folder(plan.directory)  # committed: this job's work folder is done
            remove_stale_shards(plan)  # what earlier runs of it (other inputs, same settings) left unmatched
        _log_other_shard_folders(index_dir)  # another interrupted job's shards: kept for its rerun
        added = len(work_paths) - reembedded
        logger.info(
            "Index %s: %d added, %d re-embedded, %d removed, %d skipped, %d in total (%s)",
            index_dir,
            added,
            reembedded,
            len(removed_ids),
            skipped,
            meta["count"],
            meta["index_type"],
        )
        summary = _summary(index_dir, meta, added, skipped, reembedded, len(removed_ids), not_found)
        return {**summary, **screened.summary(), **engine_report}


def _log_other_shard_folders(index_dir: Path) -> None:
    """Log (info) the shard folders of other jobs, which a commit keeps: a rerun of an interrupted job reuses them."""
    others = shard_folders(index_dir)
    if others:
        sizes = ", ".join(f"{folder.name} ({folder_bytes(folder) / 2**20:.1f} MiB)" for folder in others)
        logger.info(
            "Kept %d shard folder(s) of other interrupted jobs in %s: %s. Rerunning such a job reuses its shards; "
            "if it will not be rerun, delete the folder (rm -r %s/shards-<key>).",
            len(others),
            index_dir,
            sizes,
            index_dir,
        )


def _absolute(path: str) -> str:
    """``path`` made absolute by joining it to the working directory (``..`` and links kept as given)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _compare_stamp(path: str, old: str, hash_images: bool) -> tuple[bool, str]:
    """``(changed, current stamp)`` of an indexed file against its recorded stamp ``old``.

    The current stamp is a SHA-256 one with ``hash_images`` or when ``old`` is one, else size+mtime. Moving
    from size+mtime to SHA-256 compares size+mtime once more; an unknown ``old`` (an index written before
    stamps) counts as unchanged.
    """
    by_content = hash_images or old.startswith("sha256:")
    stamp = file_stamps([path], content_hash=by_content)[0]
    if not old:
        return False, stamp
    if by_content and not old.startswith("sha256:"):
        return file_stamps([path], content_hash=False)[0] != old, stamp
    return stamp != old, stamp


class _RowsFile:
    """An ``(N, D)`` float32 ``.npy`` file read and written a chunk at a time through short-lived memory maps:
    mapped pages count towards a process's resident memory only while mapped, so peak memory stays one chunk
    (a long-lived map of the whole file would end up resident, ``N x D`` floats)."""

    def __init__(self, path: Path, shape: tuple[int, int] | None = None) -> None:
        self.path = path
        if shape is not None:
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()  # zeros: tombstones
        header = np.load(path, mmap_mode="r")
        self.shape: tuple[int, int] = (int(header.shape[0]), int(header.shape[1]))
        del header

    def __getitem__(self, rows: Any) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        try:
            chunk = mapped[rows]  # a view of the map for a slice, a copy for a list of rows
            return np.array(chunk) if np.may_share_memory(chunk, mapped) else np.asarray(chunk)
        finally:
            del mapped

    def write(self, rows: Any, values: np.ndarray) -> None:
        mapped = np.load(self.path, mmap_mode="r+")
        try:
            mapped[rows] = values
            mapped.flush()
        finally:
            del mapped


def _assemble_embeddings(
    target: Path,
    num_ids: int,
    dim: int,
    existing: DatabaseIndex | None,
    removed_ids: list[int],
    plan: ShardPlan | None,
    work_ids: list[int],
) -> _RowsFile:
    """Write the next generation's ``(num_ids, dim)`` embeddings to ``target`` (a .npy file) chunk by chunk:
    kept rows of ``existing``, zero tombstones, the shards' rows at their ids."""
    rows = _RowsFile(target, (num_ids, dim))
    if existing is not None:
        old = _RowsFile(existing.directory / existing.meta["files"]["embeddings"])
        for start in range(0, len(existing), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(existing))
            chunk = old[start:stop]
            chunk[np.isin(np.arange(start, stop), removed_ids)] = 0.0
            rows.write(slice(start, stop), chunk)
    if plan is not None:
        ids = np.asarray(work_ids, dtype=np.int64)
        for start, shard in plan.iter_rows():
            rows.write(ids[start : start + shard.shape[0]], shard)
    return rows


def _build_index(
    rows: _RowsFile, live_ids: np.ndarray, params: IndexParams, lists_file: Path, scratch: Path
) -> tuple[Any, IndexParams]:
    """A new faiss index of the live rows: trained on a sample, filled a chunk at a time (on-disk: one part
    index per chunk, merged into ``lists_file``; see :mod:`raml.deploy.ondisk_ivf`)."""
    resolved = params.resolve(len(live_ids), rows.shape[1])
    index = empty_faiss_index(resolved, rows.shape[1])
    sample = training_sample(len(live_ids), resolved)
    if not index.is_trained:
        train_faiss_index(index, rows[live_ids if sample is None else live_ids[sample]], resolved)
    if resolved.on_disk:
        index = build_ondisk_ivf(index, _chunks(rows, live_ids), lists_file, scratch)
    else:
        _add_rows(index, rows, live_ids)
    apply_search_params(index, resolved)
    return index, resolved


def _chunks(rows: _RowsFile, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, ids)`` of ``ids`` a chunk at a time, in order."""
    for start in range(0, len(ids), _CHUNK_ROWS):
        chunk = ids[start : start + _CHUNK_ROWS]
        yield rows[chunk], chunk


def _add_rows(index: Any, rows: _RowsFile, ids: np.ndarray) -> None:
    for chunk_rows, chunk in _chunks(rows, ids):
        add_with_ids(index, chunk_rows, chunk)


def _update_index(
    existing: DatabaseIndex,
    rows: _RowsFile,
    live_ids: np.ndarray,
    removed_ids: list[int],
    work_ids: list[int],
    reembedded: bool,
    lists_file: Path,
    scratch: Path,
) -> Any:
    """The existing faiss index with the removed and re-embedded ids taken out and the new rows added; rebuilt
    from the rows (same trained quantiser) where faiss cannot remove (HNSW) or the index has no ids (legacy).
    An on-disk index gets a new lists file (``lists_file``, parts in ``scratch``): the committed one is never
    modified."""
    index = existing.index
    outdated = np.asarray(sorted({*removed_ids, *(work_ids if reembedded else [])}), dtype=np.int64)
    if existing.params.on_disk:
        new_ids = np.asarray(sorted(set(work_ids)), dtype=np.int64)
        index = extend_ondisk_ivf(
            index, outdated[np.isin(outdated, existing.live_ids())], _chunks(rows, new_ids), lists_file, scratch
        )
    elif not has_ids(index) or not remove_ids(index, outdated[np.isin(outdated, existing.live_ids())]):
        logger.info("Rebuilding the %s faiss index from its %d rows", existing.meta["index_type"], len(live_ids))
        index = empty_faiss_index(existing.params, rows.shape[1])
        if not index.is_trained:  # pragma: no cover - IVF indexes have ids and remove in place
            raise AssertionError("an untrained index type cannot be rebuilt here")
        _add_rows(index, rows, live_ids)
    else:
        _add_rows(index, rows, np.asarray(sorted(set(work_ids)), dtype=np.int64))
    apply_search_params(index, existing.params)
    return index


def _summary(
    index_dir: Path,
    meta: dict[str, Any],
    added: int,
    skipped: int,
    reembedded: int,
    removed: int,
    not_found: list[str],
) -> dict[str, Any]:
    return {
        "index_dir": str(index_dir),
        "added": added,
        "skipped": skipped,
        "reembedded": reembedded,
        "removed": removed,
        "not_found": not_found,
        "count": int(meta["count"]),
        "index_type": meta["index_type"],
        "params": meta["params"],
        "generation": int(meta["generation"]),
    }


def _check_append(
    existing: DatabaseIndex,
    network_sha256: str,
    image_size: int,
    precision: str,
    dim: int | None,
    params: IndexParams | None,
) -> None:
    where = existing.directory
    if existing.network_sha256 != network_sha256:
        raise IndexDirectoryError(
            f"Refusing to append to {where}: it was built by the network {existing.meta['network'].get('path')!r} "
            f"(sha256 {str(existing.network_sha256)[:12]}...), not by this one (sha256 {network_sha256[:12]}...); "
            "embeddings of different networks are not comparable. Use the same network, or --overwrite to "
            "rebuild the index."
        )
    if int(existing.meta["image_size"]) != int(image_size):
        raise IndexDirectoryError(
            f"Refusing to append to {where}: it was built at --image-size {existing.meta['image_size']}, not "
            f"{image_size}; use the same size, or --overwrite to rebuild the index."
        )
    stored_precision = existing.meta.get("precision", "fp32")  # indexes written before it was recorded: fp32
    if stored_precision != precision:
        flag = "--bf16" if stored_precision == "bf16" else "no --bf16"
        raise IndexDirectoryError(
            f"Refusing to append {precision} embeddings to {where}: its rows were embedded in {stored_precision}; "
            f"rows of both kinds in one index would rank by a mix. Use {flag}, or --overwrite to rebuild the index."
        )
    if dim is not None and dim != existing.dim:
        raise IndexDirectoryError(
            f"Refusing to append {dim}-dimensional embeddings to the {existing.dim}-dimensional index {where}."
        )
    if params is not None and params.index_type != existing.meta["index_type"]:
        raise IndexDirectoryError(
            f"Refusing to append with --index-type {params.index_type} to the {existing.meta['index_type']} index "
            f"{where}; omit --index-type to append, or use --overwrite to rebuild it as {params.index_type}."
        )
    if params is not None:
        stored = existing.params
        changed = [
            name
            for name in (
                "nlist",
                "m",
                "nbits",
                "hnsw_m",
                "ef_construction",
                "train_size",
                "nprobe",
                "ef_search",
                "on_disk",
            )
            if getattr(params, name) not in (None, getattr(stored, name))
            and getattr(params, name) != getattr(IndexParams(), name)
        ]
        if changed:
            logger.warning(
                "Appending keeps the parameters of the existing index %s; ignoring %s (use --overwrite to rebuild).",
                where,
                ", ".join(changed),
            )
