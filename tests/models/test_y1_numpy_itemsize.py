"""A numpy array's size is its elements times its dtype's element size: a dtype can be megabytes an element
(``V1000000``, object subarrays), so a 2 KB checkpoint made the loader allocate gigabytes. Only plain number dtypes
are accepted in a checkpoint's arrays and scalars, and an array's bytes must fit in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raml.models import load_checkpoint_file
from raml.models.checkpoints import InvalidCheckpointError

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct, scalar


class _Call:
    """Pickles as ``function(*args)``."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def _refused(path: Path, obj: Any) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": obj}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(InvalidCheckpointError, match=r"not a valid checkpoint.*not a plain number, string or date"):
        load_checkpoint_file(path)


def test_arrays_of_a_megabyte_an_element_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    # 400 elements each (fewer than the file's bytes), 1 MB an element: 4 GB for the ten of them
    _refused(tmp_path / "void.pth", [_Call(_reconstruct, np.ndarray, (400,), np.dtype("V1000000")) for _ in range(10)])


def test_arrays_of_object_subarrays_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    _refused(tmp_path / "objects.pth", _Call(_reconstruct, np.ndarray, (100,), np.dtype([("a", "O", (10**6,))])))


def test_an_array_state_of_a_void_dtype_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    class Array:
        def __reduce__(self) -> tuple[Any, ...]:
            return _reconstruct, (np.ndarray, (0,), b"b"), (1, (100,), np.dtype("V1000000"), False, b"")

    _refused(tmp_path / "state.pth", Array())


def test_scalars_of_a_megabyte_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    _refused(tmp_path / "scalars.pth", [_Call(scalar, np.dtype("V1000000")) for _ in range(10)])


def test_numeric_arrays_larger_than_the_file_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    # 1000 elements (fewer than the file's bytes) of 16 bytes each: more than the file
    path = tmp_path / "complex.pth"
    torch.save({"state_dict": {}, "x": _Call(_reconstruct, np.ndarray, (1000,), np.dtype("c16"))}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(InvalidCheckpointError, match=r"not a valid checkpoint.*of 16 bytes in a file of"):
        load_checkpoint_file(path)


def test_honest_numpy_arrays_and_scalars_load(tmp_path: Path) -> None:
    arrays = {
        str(dtype): np.arange(12).reshape(3, 4).astype(dtype)
        for dtype in (np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, np.complex128)
    }
    arrays["big-endian"] = np.arange(5, dtype=">f4")
    arrays["fortran"] = np.asfortranarray(np.ones((3, 2)))
    arrays["empty"] = np.zeros((0, 3), dtype=np.float32)
    scalars = [np.float64(0.5), np.float32(2), np.int64(3), np.bool_(True), np.uint8(7)]
    path = tmp_path / "honest.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "arrays": arrays, "scalars": scalars}, path)
    loaded = load_checkpoint_file(path)
    for name, array in arrays.items():
        # (numpy's own pickle gives the big-endian array back in the native byte order)
        assert loaded["arrays"][name].dtype.str[1:] == array.dtype.str[1:]
        assert np.array_equal(loaded["arrays"][name], array)
    assert loaded["scalars"] == scalars and [type(s) for s in loaded["scalars"]] == [type(s) for s in scalars]


def test_a_dtype_made_composite_after_its_arrays_are_built_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    import pickle  # noqa: PLC0415
    import pickletools  # noqa: PLC0415

    data = pickle.dumps({"state_dict": {}, "x": np.zeros(4, dtype=np.float64)}, protocol=2)
    ops = list(pickletools.genops(data))
    global_at = next(i for i, (op, arg, _) in enumerate(ops) if op.name == "GLOBAL" and arg == "numpy dtype")
    reduce_at = next(i for i, (op, _, _) in enumerate(ops) if i > global_at and op.name == "REDUCE")
    memo = next(arg for op, arg, _ in ops[reduce_at:] if op.name == "BINPUT")  # the dtype, once built
    # after the array: BUILD on the dtype again, with a state of a megabyte an element (then POP it)
    state = pickle.dumps((3, "|", None, None, None, 10**6, 1, 0), protocol=2)[2:-1]
    crafted = data[:-1] + b"h" + bytes([memo]) + state + b"b0."
    writer = torch._C.PyTorchFileWriter(str(tmp_path / "later.pth"))
    writer.write_record("data.pkl", crafted, len(crafted))
    writer.write_record("version", b"3\n", 2)
    writer.write_end_of_file()
    del writer
    with pytest.raises(InvalidCheckpointError, match=r"not a valid checkpoint.*composite after arrays"):
        load_checkpoint_file(tmp_path / "later.pth")
