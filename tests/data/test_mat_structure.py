"""``raml.data.mat_structure``: a MAT file whose nested cell or struct declares more entries than its bytes hold is
refused before ``scipy.io`` allocates them (a few bytes declaring 2^24 entries cost scipy 128 MB before it reads
one), in plain and compressed files; real files of every kind pass and still load; ``cars_annos.mat`` goes through
it before scipy sees the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse

from raml.data.mat_structure import MatStructureError, check_declared_sizes
from raml.data.splits import get_split

LIMIT = 1 << 26
HUGE = 1 << 24  # 128 MB of object pointers in scipy if the check were missing: survivable, far past the bytes


def _annotations() -> np.ndarray:
    """Two entries shaped like Cars196's annotations, one field a 1 x 3 cell (the array the tests forge)."""
    table = np.zeros((1, 2), dtype=[("relative_im_path", object), ("class", object), ("extra", object)])
    for i in range(2):
        extra = np.empty((1, 3), dtype=object)
        for k in range(3):
            extra[0, k] = np.array([[k]], dtype=np.uint8)
        table[0, i] = (f"car_ims/{i:06d}.jpg", np.array([[i + 1]], dtype=np.uint8), extra)
    return table


def _forged(path: Path, compressed: bool) -> None:
    """The annotations saved plain, each 1 x 3 cell's dimensions rewritten to 1 x HUGE; then, for ``compressed``,
    the variable packed into a ``miCOMPRESSED`` element as MATLAB writes it."""
    scipy.io.savemat(path, {"annotations": _annotations()}, do_compression=False)
    data = path.read_bytes()
    dims = struct.pack("<IIii", 5, 8, 1, 3)
    assert data.count(dims) == 2
    data = data.replace(dims, struct.pack("<IIii", 5, 8, 1, HUGE))
    if compressed:
        packed = zlib.compress(data[128:])
        data = data[:128] + struct.pack("<II", 15, len(packed)) + packed
    path.write_bytes(data)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_a_nested_cell_declaring_more_entries_than_its_bytes_is_refused(tmp_path, compressed):
    path = tmp_path / "forged.mat"
    _forged(path, compressed)
    assert path.stat().st_size < 2000
    with pytest.raises(MatStructureError, match=rf"declares a 1x{HUGE} cell array \({HUGE} elements\) in \d+ bytes"):
        check_declared_sizes(path, LIMIT)


def test_arrays_nested_deeper_than_the_limit_are_refused(tmp_path):
    value: object = np.arange(3.0)
    for _ in range(6):
        cell = np.empty((1, 1), dtype=object)
        cell[0, 0] = value
        value = cell
    path = tmp_path / "deep.mat"
    scipy.io.savemat(path, {"deep": value})
    check_declared_sizes(path, LIMIT, max_depth=7)
    with pytest.raises(MatStructureError, match="nests arrays more than 5 deep"):
        check_declared_sizes(path, LIMIT, max_depth=5)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_real_files_of_every_kind_pass_and_load(tmp_path, compressed):
    rng = np.random.default_rng(0)
    cells = np.empty((2, 3), dtype=object)
    for i in range(6):
        cells.flat[i] = rng.normal(size=(i, 2))
    variables = {
        "annotations": _annotations(),
        "cells": cells,
        "empty": np.zeros((0, 3)),
        "empty_cell": np.empty((0, 0), dtype=object),
        "text": "hello",
        "complex": np.array([1 + 2j, 3 - 1j]),
        "sparse": scipy.sparse.random(300, 300, density=0.001, format="csc", random_state=0),
        "nested": {"a": {"b": {"c": np.arange(10)}}},
        "flags": np.array([True, False]),
        "small_ints": np.arange(5, dtype=np.int8),
    }
    path = tmp_path / "real.mat"
    scipy.io.savemat(path, variables, do_compression=compressed)
    check_declared_sizes(path, LIMIT)
    assert scipy.io.loadmat(path)["small_ints"].tolist() == [[0, 1, 2, 3, 4]]


def test_cars_annos_with_a_forged_nested_cell_is_refused_before_scipy(tmp_path, monkeypatch):
    index = tmp_path / "cars" / "cars_annos.mat"
    index.parent.mkdir()
    _forged(index, compressed=True)
    before = index.read_bytes()

    def not_reached(*_: object, **__: object) -> None:
        raise AssertionError("scipy.io read the file")

    monkeypatch.setattr(scipy.io, "whosmat", not_reached)
    monkeypatch.setattr(scipy.io, "loadmat", not_reached)
    with pytest.raises(ValueError, match=r"cars_annos.mat declares a 1x16777216 cell array .*download it again"):
        get_split("cars", tmp_path)
    assert index.read_bytes() == before


def test_a_checked_cars_file_is_checked_again_once_it_changes(cars_root):
    """The check runs once a process per file version (path, size, modification time): a file replaced after a
    load that passed is checked again."""
    assert get_split("cars-test", cars_root).paths
    _forged(cars_root / "cars" / "cars_annos.mat", compressed=False)
    with pytest.raises(ValueError, match="declares a 1x16777216 cell array"):
        get_split("cars-test", cars_root)


def test_the_walk_holds_one_frame_per_nesting_level_not_one_per_entry(tmp_path):
    """A cell of 20,000 entries: the walk's memory beyond the file's own bytes stays under 256 KiB (it held a
    tuple per pending entry before: ~2.6 MiB here, ~100 MB for a 64 MiB file of small entries)."""
    import tracemalloc

    cells = np.empty((1, 20_000), dtype=object)
    for i in range(cells.size):
        cells[0, i] = np.uint8(i % 200)
    path = tmp_path / "cells.mat"
    scipy.io.savemat(path, {"cells": cells})
    tracemalloc.start()
    try:
        check_declared_sizes(path, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size + (256 << 10), (peak, path.stat().st_size)
