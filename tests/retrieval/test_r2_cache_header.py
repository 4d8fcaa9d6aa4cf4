"""An embedding cache entry whose .npy header declares more than the file holds is unusable: it is ignored with a
warning (then recomputed), never allocated."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from raml.retrieval.cache import EmbeddingCache


def test_an_entry_declaring_a_huge_shape_is_ignored_with_a_warning(tmp_path, caplog) -> None:
    cache = EmbeddingCache(tmp_path)
    with open(cache.path_for("k"), "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 512)})
        handle.write(b"\0" * 64)
    with caplog.at_level(logging.WARNING, logger="raml.retrieval.cache"):
        assert cache.load("k", 6) is None
    assert "declares shape (100000000000, 512)" in caplog.text and "will be recomputed" in caplog.text


def test_a_stored_entry_still_loads(tmp_path) -> None:
    from raml.retrieval.cache import check_npy_size

    cache = EmbeddingCache(tmp_path)
    rows = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    cache.store("k", rows, {"what": "test"})
    check_npy_size(cache.path_for("k"))
    assert torch.equal(cache.load("k", 6), rows)


def test_a_truncated_entry_is_refused_by_its_size(tmp_path) -> None:
    from raml.retrieval.cache import check_npy_size

    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((4, 4), np.float32))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"\(64 bytes\), but the file holds 63"):
        check_npy_size(path)
