"""A damaged or hostile file of an index folder is refused with IndexDirectoryError naming it, never a traceback or
an allocation of what a header declares (a tiny flat index written by write_generation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from raml.deploy.store import IndexDirectoryError, load_index, write_generation

ROWS, DIM = 6, 8


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import faiss

    folder = tmp_path_factory.mktemp("r2_index") / "index"
    rows = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(rows, np.arange(ROWS, dtype=np.int64))
    meta = {
        "format": "raml-index",
        "generation": 1,
        "index_type": "flat",
        "faiss_factory": "Flat",
        "metric": "inner_product",
        "params": {"index_type": "flat"},
        "dim": DIM,
        "dtype": "float32",
        "count": ROWS,
        "datasets": [],
    }
    write_generation(folder, meta, index, rows, [f"img{i}.jpg" for i in range(ROWS)], np.arange(ROWS))
    assert len(load_index(folder).paths) == ROWS
    return folder


@pytest.fixture
def index_dir(written: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(written, copy)
    return copy


def _files(index_dir: Path) -> dict[str, str]:
    return json.loads((index_dir / "index.json").read_text())["files"]


def _declare(path: Path, descr: str, shape: tuple[int, ...]) -> None:
    """Rewrite ``path`` as a .npy header declaring ``shape`` followed by 64 bytes."""
    with open(path, "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": descr, "fortran_order": False, "shape": shape})
        handle.write(b"\0" * 64)


@pytest.mark.parametrize(("kind", "descr", "shape"), [("labels", "<i8", (10**11,)), ("embeddings", "<f4", (10**9, 8))])
def test_a_npy_header_declaring_more_than_the_file_holds_is_refused(index_dir: Path, kind, descr, shape) -> None:
    name = _files(index_dir)[kind]
    _declare(index_dir / name, descr, shape)
    with pytest.raises(IndexDirectoryError, match=rf"{name} is unreadable .*declares shape .* but the file holds 64"):
        load_index(index_dir)
