"""On-disk cache of embeddings that do not change: a frozen teacher's database side.

The key is derived from everything the embeddings depend on: the checkpoint's content hash (not its
name), the image size, the split's name and the exact list of image paths, and the version of the
evaluation transform. A different teacher, size or split therefore can never reuse a stale entry.
Entries are ``<key>.npy`` (float32, (N, D)) with a ``<key>.json`` description beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from raml.utils import atomic_numpy_save, atomic_write_text

logger = logging.getLogger(__name__)

#: Bump when the evaluation transform changes so that old entries are not reused.
TRANSFORM_VERSION = "eval-lanczos-8/7-centrecrop-v1"


def cache_key(network_sha256: str, image_size: int, split_name: str, paths: Sequence[str]) -> str:
    """A hex key that changes whenever the network content, the size or the split's images change."""
    digest = hashlib.sha256()
    for part in (network_sha256, str(image_size), split_name, TRANSFORM_VERSION):
        digest.update(part.encode())
        digest.update(b"\0")
    for path in paths:
        digest.update(str(path).encode())
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
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
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
        atomic_write_text(path.with_suffix(".json"), json.dumps(description, indent=2, sort_keys=True))
        logger.info("Cached embeddings %s", path)
        return path

    def get_or_compute(
        self,
        network_sha256: str,
        image_size: int,
        split_name: str,
        paths: Sequence[str],
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Return cached embeddings for this (network, size, split), computing and storing them if needed."""
        key = cache_key(network_sha256, image_size, split_name, paths)
        cached = self.load(key, expected_rows=len(paths))
        if cached is not None:
            return cached
        embeddings = compute()
        self.store(
            key,
            embeddings,
            {
                "network_sha256": network_sha256,
                "image_size": image_size,
                "split": split_name,
                "num_images": len(paths),
                "dim": int(embeddings.shape[1]),
                "transform": TRANSFORM_VERSION,
            },
        )
        return embeddings
