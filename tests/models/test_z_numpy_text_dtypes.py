"""numpy's fixed-width string (``U<n>``, ``S<n>``) and datetime / timedelta (``M8``, ``m8``) dtypes have a known
element size and loaded before the numpy size check: their arrays and scalars load again (a ``numpy.str_`` meta
value too, which ``save_checkpoint`` now stores as a plain ``str``), while void dtypes are still refused."""

from __future__ import annotations

import enum
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.models import build_network, load_checkpoint_file, load_network, save_checkpoint
from raml.models.checkpoints import InvalidCheckpointError


def test_a_numpy_str_meta_value_saves_and_loads(tmp_path: Path) -> None:
    network = build_network("test_resnet", whitening=8, pretrained=False)
    network.meta["dataset"] = np.array(["cub", "cars"])[0]
    save_checkpoint(tmp_path / "net.pth", network)
    loaded = load_network(tmp_path / "net.pth")
    assert loaded.meta["dataset"] == "cub" and type(loaded.meta["dataset"]) is str


def test_string_and_datetime_arrays_and_scalars_load(tmp_path: Path) -> None:
    arrays = {
        "unicode": np.array(["cat", "dog", ""]),
        "bytes": np.array([b"ab", b"c"]),
        "big-endian": np.array(["x", "yz"], dtype=">U2"),
        "datetime": np.array(["2024-01-01", "2025-06-30T12:00"], dtype="datetime64[ns]"),
        "timedelta": np.array([1, 2], dtype="timedelta64[s]"),
        "generic": np.array(["NaT"], dtype="M8"),
    }
    scalars = [np.str_("resnet"), np.bytes_(b"abc"), np.datetime64("2024-01-01", "D"), np.timedelta64(5, "m")]
    path = tmp_path / "text.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "arrays": arrays, "scalars": scalars}, path)
    loaded = load_checkpoint_file(path)
    for name, array in arrays.items():
        assert loaded["arrays"][name].dtype.str[1:] == array.dtype.str[1:]
        assert loaded["arrays"][name].tolist() == array.tolist()
    assert loaded["scalars"] == scalars and [type(s) for s in loaded["scalars"]] == [type(s) for s in scalars]


@pytest.mark.parametrize("elsize", [8 << 20, -1])
def test_a_string_dtype_whose_state_changes_its_size_is_refused(tmp_path: Path, elsize: int) -> None:
    # numpy takes a string dtype's element size from the pickled state: U2 with 8 MB an element (or -1, which the
    # state of a number dtype holds, and numpy takes as a size of -1)
    data = pickle.dumps({"state_dict": {}, "x": np.zeros(100, dtype="U2")}, protocol=2)
    honest = b"NNNK\x08K\x04K\x08t"  # the state's (None, None, None, 8, 4, 8)
    assert data.count(honest) == 1
    crafted = data.replace(honest, b"NNNJ" + elsize.to_bytes(4, "little", signed=True) + b"K\x04K\x08t")
    writer = torch._C.PyTorchFileWriter(str(tmp_path / "grown.pth"))
    writer.write_record("data.pkl", crafted, len(crafted))
    writer.write_record("version", b"3\n", 2)
    writer.write_end_of_file()
    del writer
    with pytest.raises(InvalidCheckpointError, match=r"not a valid checkpoint.*not a plain number, string or date"):
        load_checkpoint_file(tmp_path / "grown.pth")


def test_a_string_scalar_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar

    class Huge:
        def __reduce__(self) -> tuple:
            return scalar, (np.dtype("U100000000"),)

    torch.save({"state_dict": {}, "x": Huge()}, tmp_path / "huge.pth")
    with pytest.raises(InvalidCheckpointError, match=r"not a valid checkpoint.*numpy scalar of 400000000 bytes"):
        load_checkpoint_file(tmp_path / "huge.pth")


class _Pooling(str, enum.Enum):
    GEM = "gem"


def test_meta_values_of_str_int_float_subclasses_are_saved_as_their_values(tmp_path: Path) -> None:
    """A (str, Enum) member is saved as its value ('gem'), not as str() of it ('_Pooling.GEM'); an IntEnum as its
    int; a datetime64, whose .item() is a datetime the loader would refuse, is refused at save time instead."""
    network = build_network("test_resnet", whitening=8, pretrained=False)
    network.meta.update({"how": _Pooling.GEM, "count": enum.IntEnum("E", "A B")(2), "rate": np.float32(0.5)})
    save_checkpoint(tmp_path / "net.pth", network)
    meta = load_network(tmp_path / "net.pth").meta
    assert (meta["how"], meta["count"], meta["rate"]) == ("gem", 2, 0.5)
    assert (type(meta["how"]), type(meta["count"]), type(meta["rate"])) == (str, int, float)
    network.meta["when"] = np.datetime64("2026-12-05")
    with pytest.raises(TypeError, match=r"meta.*when.*datetime64"):
        save_checkpoint(tmp_path / "dated.pth", network)
    assert not (tmp_path / "dated.pth").exists()
