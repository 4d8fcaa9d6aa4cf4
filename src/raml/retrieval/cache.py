"""On-disk cache of embeddings that do not change: a frozen teacher's database side.

The key is derived from everything the embeddings depend on: the checkpoint's content hash (not its
name), the network's configuration as loaded (its ``meta``: pooling, whitening, architecture, ... -- what a
checkpoint without ``meta`` takes from ``--pool``/``--whitening`` changes the embeddings of the same file), the
image size, the scales of a multi-scale embedding, the split's name, the exact list of image
paths, a stamp of every image file, and the version of the evaluation transform.

The stamp of a file is its size and modification time (``st_size``, ``st_mtime_ns``) by default: an image
regenerated in place under the same name gets a new key, so its stale embeddings are not reused. The one
change this cannot see is a rewrite that keeps both the size and the modification time (``cp -p``/``rsync
-t`` of a same-sized file, ``touch -r``): ``content_hash=True`` stamps each file with the SHA-256 of its
bytes instead, which sees every change at the cost of reading every image once per lookup.

Entries are ``<key>.npy`` (float32, (N, D)) with a ``<key>.json`` description beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raml.utils import atomic_numpy_save, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

#: Bump when the evaluation transform changes so that old entries are not reused.
TRANSFORM_VERSION = "eval-lanczos-8/7-centrecrop-v1"

#: The stamp of a file that could not be read (it is still part of the key: if it appears, the key changes).
MISSING = "missing"


def check_npy_size(path: str | Path) -> None:
    """Refuse (``ValueError``) a ``.npy`` file whose header declares more data than the file holds.

    ``np.load`` allocates the declared shape before reading (a 136-byte file declaring ``(10**11,)`` int64 asked
    for 745 GiB), so the header is read on its own first (:mod:`numpy.lib.format`, versions 1.0 and 2.0, those
    ``np.save`` writes for plain dtypes) and shape x item size is compared with the bytes after it. A malformed
    header raises numpy's own ``ValueError``.
    """
    fmt = np.lib.format
    with open(path, "rb") as handle:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(handle)
        else:
            raise ValueError(f"{path}: .npy format version {version[0]}.{version[1]}; 1.0 or 2.0 expected")
        held = os.fstat(handle.fileno()).st_size - handle.tell()
    declared = dtype.itemsize
    for side in shape:
        declared *= int(side)
    if declared > held:
        raise ValueError(
            f"{path}: its header declares shape {tuple(shape)} of {dtype} ({declared} bytes), but the file holds "
            f"{held} bytes of data (a damaged or foreign file)"
        )


def file_stamps(files: Sequence[str | Path], content_hash: bool = False) -> list[str]:
    """One stamp per file: ``"<size>:<mtime_ns>"``, or ``"sha256:<hex>"`` with ``content_hash``.

    A file that cannot be read is stamped :data:`MISSING` and logged once (with a count), so a cache lookup
    never fails on its own; reading the images will report them properly.
    """
    stamps: list[str] = []
    missing: list[str] = []
    for file in files:
        try:
            if content_hash:
                stamps.append(f"sha256:{file_sha256(file)}")
            else:
                st = os.stat(file)
                stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            stamps.append(MISSING)
            missing.append(str(file))
    if missing:
        logger.warning(
            "Embedding cache: %d of %d image files could not be read (first: %s); a change to them will not be "
            "seen by the cache. Pass the dataset folder as root= when the paths are relative to it.",
            len(missing),
            len(stamps),
            missing[0],
        )
    return stamps


def network_meta_digest(meta: Mapping[str, Any] | None) -> str:
    """A hex digest of a network's resolved configuration (``network.meta``), ``"none"`` for None.

    The same checkpoint file gives other embeddings when it is loaded as another network (a checkpoint
    without ``meta`` takes its pooling from ``--pool``), so the cache key needs this beside the file's hash.
    """
    if meta is None:
        return "none"
    text = json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(
    network_sha256: str,
    image_size: int,
    split_name: str,
    paths: Sequence[str],
    *,
    scales: Sequence[float] = (1.0,),
    stamps: Sequence[str] | None = None,
    network_meta: Mapping[str, Any] | None = None,
) -> str:
    """A hex key that changes whenever the network (content or configuration), the size, the scales or the
    images change.

    Args:
        network_sha256: content hash of the checkpoint.
        image_size: the side S of the evaluation transform.
        split_name: e.g. ``cub-test``.
        paths: the split's image paths, in row order.
        scales: the multi-scale factors (``(1,)`` for single-scale).
        stamps: one :func:`file_stamps` entry per path (None: the paths alone identify the images).
        network_meta: the loaded network's ``meta`` (its pooling, whitening, ...; see
            :func:`network_meta_digest`).
    """
    if stamps is not None and len(stamps) != len(paths):
        raise ValueError(f"cache_key needs one stamp per path, got {len(stamps)} stamps for {len(paths)} paths.")
    digest = hashlib.sha256()
    scales_text = ",".join(repr(float(s)) for s in scales)
    parts = (
        network_sha256,
        f"meta={network_meta_digest(network_meta)}",
        str(image_size),
        split_name,
        TRANSFORM_VERSION,
        f"scales={scales_text}",
    )
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    for i, path in enumerate(paths):
        digest.update(str(path).encode())
        if stamps is not None:
            digest.update(b"\t")
            digest.update(stamps[i].encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


class EmbeddingCache:
    """A folder of cached embeddings keyed by :func:`cache_key`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def load(self, key: str, expected_rows: int) -> torch.Tensor | None:
        """The cached (N, D) embeddings, or None when absent or unusable (then it is recomputed)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            check_npy_size(path)  # before np.load allocates what the header declares
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            logger.warning("Ignoring unreadable cache entry %s (%s); it will be recomputed.", path, error)
            return None
        if array.ndim != 2 or array.shape[0] != expected_rows:
            logger.warning("Ignoring cache entry %s with shape %s; it will be recomputed.", path, array.shape)
            return None
        logger.info("Loaded cached embeddings %s", path)
        return torch.from_numpy(array)

    def store(self, key: str, embeddings: torch.Tensor, description: dict) -> Path:
        path = self.path_for(key)
        atomic_numpy_save(embeddings.float().cpu().numpy(), path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(description, indent=2, sort_keys=True, default=repr))
        logger.info("Cached embeddings %s", path)
        return path

    def get_or_compute(
        self,
        network_sha256: str,
        image_size: int,
        split_name: str,
        paths: Sequence[str],
        compute: Callable[[], torch.Tensor],
        *,
        network_meta: Mapping[str, Any] | None,
        root: str | Path | None = None,
        scales: Sequence[float] = (1.0,),
        content_hash: bool = False,
    ) -> torch.Tensor:
        """Return cached embeddings for these (network, size, scales, split, images), computing them if needed.

        Args:
            network_sha256: content hash of the checkpoint.
            network_meta: the loaded network's ``meta`` (``network.meta``): the same file loaded with another
                pooling or whitening is another entry. None only for a network without one.
            image_size: the side S of the evaluation transform.
            split_name: e.g. ``cub-test``.
            paths: the image paths, in row order (relative to ``root`` when it is given).
            compute: returns the (N, D) embeddings when the cache has no entry.
            root: the dataset folder the paths are relative to; the files stamped are ``root / path``.
            scales: the multi-scale factors the embeddings are computed with.
            content_hash: stamp the images by content (SHA-256) instead of size and modification time.
        """
        files = [Path(root) / p for p in paths] if root is not None else [Path(p) for p in paths]
        stamps = file_stamps(files, content_hash=content_hash)
        key = cache_key(
            network_sha256, image_size, split_name, paths, scales=scales, stamps=stamps, network_meta=network_meta
        )
        cached = self.load(key, expected_rows=len(paths))
        if cached is not None:
            return cached
        embeddings = compute()
        self.store(
            key,
            embeddings,
            {
                "network_sha256": network_sha256,
                "network_meta": dict(network_meta) if network_meta is not None else None,
                "image_size": image_size,
                "scales": [float(s) for s in scales],
                "split": split_name,
                "num_images": len(paths),
                "dim": int(embeddings.shape[1]),
                "transform": TRANSFORM_VERSION,
                "file_stamps": "sha256" if content_hash else "size+mtime_ns",
            },
        )
        return embeddings
