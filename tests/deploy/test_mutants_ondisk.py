"""Hand-mutation survivor of raml.deploy.ondisk_ivf, now killed: the check that the template of an on-disk build
is empty (its vectors would otherwise be copied into every part before the merge refuses it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raml.deploy.faiss_index import IndexParams, add_with_ids, empty_faiss_index, train_faiss_index
from raml.deploy.ondisk_ivf import build_ondisk_ivf


def test_an_on_disk_build_refuses_a_template_that_holds_vectors(tmp_path: Path):
    rows = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    params = IndexParams("ivf", nlist=2, nprobe=2, train_size=40)
    template = empty_faiss_index(params, 8)
    train_faiss_index(template, rows, params)
    add_with_ids(template, rows[:5], np.arange(5))
    chunks = iter([(rows[5:], np.arange(5, 40))])
    with pytest.raises(ValueError, match="needs an empty, trained IVF index as the template"):
        build_ondisk_ivf(template, chunks, tmp_path / "lists.ivfdata", tmp_path / "parts")
    assert not (tmp_path / "lists.ivfdata").exists()
    assert not (tmp_path / "parts").exists() or not any((tmp_path / "parts").iterdir())
