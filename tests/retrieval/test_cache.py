"""The embedding cache key changes with everything the embeddings depend on."""

from __future__ import annotations

import numpy as np
import torch

from raml.retrieval.cache import EmbeddingCache, cache_key


def test_key_depends_on_network_size_split_and_paths():
    base = cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"])
    assert base == cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"])
    assert base != cache_key("abd", 448, "cub-test", ["a.jpg", "b.jpg"])
    assert base != cache_key("abc", 224, "cub-test", ["a.jpg", "b.jpg"])
    assert base != cache_key("abc", 448, "cub-val", ["a.jpg", "b.jpg"])
    assert base != cache_key("abc", 448, "cub-test", ["b.jpg", "a.jpg"])
    assert base != cache_key("abc", 448, "cub-test", ["a.jpg"])


def test_get_or_compute_stores_once_and_ignores_bad_entries(tmp_path):
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2, 3)

    a = cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute)
    b = cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute)
    assert len(calls) == 1 and torch.equal(a, b)
    # a corrupt entry (wrong row count) is recomputed, not trusted
    key = cache_key("sha", 32, "x-test", ["p", "q"])
    np.save(cache.path_for(key), np.zeros((5, 3), dtype=np.float32))
    cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute)
    assert len(calls) == 2
    assert not list(tmp_path.glob("*.tmp"))
