"""``raml index``: embed a database with the teacher at DR and create, or append to, an index directory.

Contract:
    ``index_images(network, paths, image_size, index_dir, ...)`` embeds ``paths`` (rows ``(N, D)`` float32,
    L2-normalised, in path order) and commits them as the next generation of the index stored in
    ``index_dir`` (layout and commit protocol: :mod:`raml.deploy.store`; index types: :mod:`raml.deploy.faiss_index`).

An update holds the directory's lock (:class:`raml.deploy.lock.DirectoryLock`) from reading the current
generation to the commit, so a second writer is refused at once; readers take no lock.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raml.deploy.embed import embed_images
from raml.deploy.faiss_index import IndexParams, build_faiss_index
from raml.deploy.image_files import check_images_exist, image_key
from raml.deploy.lock import DirectoryLock
from raml.deploy.store import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_NAME,
    DatabaseIndex,
    IndexDirectoryError,
    is_index_leftover,
    load_index,
    next_generation,
    write_generation,
)

logger = logging.getLogger(__name__)

__all__ = ["index_images"]

_NO_LABEL = -1


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
) -> dict[str, Any]:
    """Create an index of ``paths`` in ``index_dir``, or append them to the index already there.

    When ``index_dir`` holds an index (and ``overwrite`` is False) the images are appended: the network's
    content hash and the image size must match the index's, and images already indexed (same normalised
    absolute path) or repeated in ``paths`` are skipped. Every check runs before any image is embedded.

    Args:
        network: The database network (teacher), on ``devices[0]``; ``(B, 3, S, S)`` -> ``(B, D)``.
        paths: Image files.
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

    Returns:
        A summary: ``{"index_dir", "added", "skipped", "count", "index_type", "params"}``.

    Raises:
        IndexDirectoryError: On an incompatible existing index, or a non-empty folder that is not an index.
        ValueError: On bad arguments (no paths, wrong number of labels, infeasible parameters).
        ImageLoadError: If images are missing or unreadable.
        LockHeldError: If another process is writing to ``index_dir`` (a ``FileExistsError``; the message
            names its PID). A lock left by a killed writer is taken over, with a warning.
    """
    index_dir = Path(index_dir)
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("No images to index: the list of paths is empty.")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"Got {len(paths)} paths but {len(labels)} labels; give one label per path (or none).")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}.")
    label_array = np.asarray(labels if labels is not None else [_NO_LABEL] * len(paths), dtype=np.int64)
    dim = int(getattr(network, "meta", {}).get("outputdim", 0)) or None

    if index_dir.exists() and not index_dir.is_dir():
        raise IndexDirectoryError(
            f"--output {str(index_dir)!r} exists and is not a folder; choose a folder for the index."
        )

    # One writer at a time: the lock spans reading the current generation to committing the next one.
    with DirectoryLock(index_dir, "raml index"):
        existing: DatabaseIndex | None = None
        if (index_dir / METADATA_NAME).exists() and not overwrite:
            existing = load_index(index_dir)
            _check_append(existing, network_sha256, image_size, dim, params)
        elif not (index_dir / METADATA_NAME).exists():
            # A folder holding only what a killed first build left (generation, temporary, lock files) is reused.
            foreign = sorted(p.name for p in index_dir.iterdir() if not is_index_leftover(p.name))
            if foreign:
                raise IndexDirectoryError(
                    f"--output {str(index_dir)!r} is a non-empty folder that holds no raml index (it holds "
                    f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder "
                    "(nothing was written)."
                )

        # Duplicates: against the index, and within this call.
        seen = {image_key(p) for p in existing.paths} if existing is not None else set()
        keep: list[int] = []
        for i, path in enumerate(paths):
            key = image_key(path)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        skipped = len(paths) - len(keep)
        if skipped:
            logger.info("Skipping %d image(s) already in the index or repeated", skipped)
        new_paths = [paths[i] for i in keep]
        new_labels = label_array[keep]
        if existing is not None and not new_paths:
            logger.info("Nothing to add: all %d images are already in %s", len(paths), index_dir)
            return _summary(index_dir, existing.meta, 0, skipped)
        check_images_exist(new_paths)
        if existing is None and dim is not None:
            (params or IndexParams()).resolve(len(new_paths), dim)  # infeasible parameters fail before embedding

        embeddings = embed_images(
            network, new_paths, image_size, list(devices), batch_size, workers, progress, f"index@{image_size}"
        )
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        if existing is None:
            index, resolved = build_faiss_index(embeddings, params or IndexParams())
            meta: dict[str, Any] = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "generation": next_generation(index_dir),
                "index_type": resolved.index_type,
                "faiss_factory": resolved.factory_string(),
                "metric": "inner_product",
                "params": asdict(resolved),
                "dim": int(embeddings.shape[1]),
                "dtype": "float32",
                "network": {
                    "path": str(network_path) if network_path is not None else None,
                    "sha256": network_sha256,
                    "meta": dict(getattr(network, "meta", {}) or {}),
                },
                "image_size": int(image_size),
                "transform": (
                    "resize shorter side to S*8/7 (Lanczos), centre crop S, normalise with the network's mean/std"
                ),
                "count": int(embeddings.shape[0]),
                "datasets": [dataset] if dataset else [],
                "created": now,
                "updated": now,
            }
            all_embeddings, all_paths, all_labels = embeddings, new_paths, new_labels
        else:
            index = existing.index
            index.add(embeddings)
            meta = dict(existing.meta)
            meta["generation"] = int(meta["generation"]) + 1
            meta["count"] = int(index.ntotal)
            meta["updated"] = now
            if dataset and dataset not in meta.get("datasets", []):
                if meta.get("datasets") and labels is not None:
                    logger.warning(
                        "Appending labelled images of %s to an index holding %s: class labels of different splits "
                        "are not comparable.",
                        dataset,
                        ", ".join(meta["datasets"]),
                    )
                meta["datasets"] = [*meta.get("datasets", []), dataset]
            all_embeddings = np.concatenate([existing.embeddings, embeddings])
            all_paths = [*existing.paths, *new_paths]
            all_labels = np.concatenate([existing.labels, new_labels])
        write_generation(index_dir, meta, index, all_embeddings, all_paths, all_labels, before_commit)
        logger.info(
            "Index %s: %d added, %d skipped, %d in total (%s)",
            index_dir,
            len(new_paths),
            skipped,
            meta["count"],
            meta["index_type"],
        )
        return _summary(index_dir, meta, len(new_paths), skipped)


def _summary(index_dir: Path, meta: dict[str, Any], added: int, skipped: int) -> dict[str, Any]:
    return {
        "index_dir": str(index_dir),
        "added": added,
        "skipped": skipped,
        "count": int(meta["count"]),
        "index_type": meta["index_type"],
        "params": meta["params"],
    }


def _check_append(
    existing: DatabaseIndex, network_sha256: str, image_size: int, dim: int | None, params: IndexParams | None
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
            for name in ("nlist", "m", "nbits", "hnsw_m", "ef_construction", "train_size", "nprobe", "ef_search")
            if getattr(params, name) not in (None, getattr(stored, name))
            and getattr(params, name) != getattr(IndexParams(), name)
        ]
        if changed:
            logger.warning(
                "Appending keeps the parameters of the existing index %s; ignoring %s (use --overwrite to rebuild).",
                where,
                ", ".join(changed),
            )
