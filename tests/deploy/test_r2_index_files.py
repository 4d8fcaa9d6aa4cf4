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


def _edit_meta(index_dir: Path, **fields) -> None:
    meta = json.loads((index_dir / "index.json").read_text())
    for field, value in fields.items():
        if value is _DROP:
            del meta[field]
        else:
            meta[field] = value
    (index_dir / "index.json").write_text(json.dumps(meta))


_DROP = object()


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"count": _DROP}, "has no 'count' field"),
        ({"count": "abc"}, """'count' field is a JSON string "abc", a non-negative integer expected"""),
        ({"count": [1]}, "'count' field is a JSON list, a non-negative integer expected"),
        ({"count": True}, "'count' field is a JSON boolean true"),
        ({"version": "x"}, """'version' field is a JSON string "x", a non-negative integer expected"""),
        ({"generation": 1.5}, "'generation' field is a JSON number 1.5"),
        ({"params": [1]}, "'params' field is a JSON list, a table of index parameters expected"),
    ],
)
def test_malformed_index_json_fields_are_refused_by_name(index_dir: Path, fields, refusal) -> None:
    _edit_meta(index_dir, **fields)
    with pytest.raises(IndexDirectoryError, match=r"index\.json: its|index\.json has no") as refused:
        load_index(index_dir)
    assert refusal in str(refused.value) and "rebuild the index" in str(refused.value)


def test_a_deeply_nested_index_json_is_refused(index_dir: Path) -> None:
    (index_dir / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IndexDirectoryError, match=r"index\.json is unreadable \(maximum recursion"):
        load_index(index_dir)


@pytest.mark.parametrize(
    ("kind", "text", "found"),
    [
        ("paths", "5", "holds a JSON number 5, a JSON list of image paths"),
        ("paths", '{"a": 1}', "holds a JSON object, a JSON list of image paths"),
        ("paths", "[1, 2, 3, 4, 5, 6]", "holds a JSON list holding other values than strings"),
        ("stamps", "5", "holds a JSON number 5, a JSON list of file stamps"),
    ],
)
def test_malformed_paths_and_stamps_files_are_refused_by_name(index_dir: Path, kind, text, found) -> None:
    name = _files(index_dir)[kind]
    (index_dir / name).write_text(text)
    with pytest.raises(IndexDirectoryError, match=rf"{name} {found}"):
        load_index(index_dir)


@pytest.mark.parametrize(("kind", "array"), [("embeddings", np.float32(1.0)), ("labels", np.zeros((6, 1), np.int64))])
def test_arrays_of_another_dimension_are_refused_by_name(index_dir: Path, kind, array) -> None:
    name = _files(index_dir)[kind]
    np.save(index_dir / name, array)
    with pytest.raises(IndexDirectoryError, match=rf"{name} holds an array of shape"):
        load_index(index_dir)


@pytest.mark.parametrize(
    ("kind", "array", "dtype"),
    [
        ("labels", np.array(["a"] * ROWS), "<U1"),  # was a ValueError traceback from labels.astype(np.int64)
        ("labels", np.ones(ROWS, np.complex128), "complex128"),
        ("embeddings", np.ones((ROWS, DIM), np.int8), "int8"),  # was loaded, and searched as int8
        ("embeddings", np.ones((ROWS, DIM), np.float64), "float64"),
    ],
)
def test_arrays_of_another_type_are_refused_by_name(index_dir: Path, kind, array, dtype) -> None:
    name = _files(index_dir)[kind]
    np.save(index_dir / name, array)
    with pytest.raises(IndexDirectoryError, match=rf"{name} holds {dtype} values, .* expected"):
        load_index(index_dir)
