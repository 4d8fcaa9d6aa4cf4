"""Checkpoints that ask the loader for far more memory than they hold are refused before anything is allocated."""

from __future__ import annotations

import codecs
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raml.models import CheckpointError, load_checkpoint_file
from raml.models.checkpoints import InvalidCheckpointError
from raml.models.restricted_pickle import DeclaredSizeError, check_declared_sizes, restricted_torch_load

_BIG = 1 << 24  # 16 MiB: what the crafted files below ask for, in a file of about a kilobyte


class _Call:
    """Pickles as ``function(*args)``: what a crafted file can make the unpickler call."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def _torch_zip(path: Path, obj: Any) -> Path:
    """``obj`` pickled into torch's zip layout (as torch.save writes it, without storages)."""
    return _raw_torch_zip(path, pickle.dumps(obj, protocol=2))


def _raw_torch_zip(path: Path, data: bytes) -> Path:
    """The pickle bytes ``data`` as the ``data.pkl`` of torch's zip layout (a pickle written by hand)."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data, len(data))
    writer.write_record("version", b"3\n", 2)
    writer.write_end_of_file()
    del writer
    return path


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.load, recording each call: a refused file must never reach it."""
    calls: list[str] = []
    real_load = torch.load

    def recording_load(source: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(source))
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return calls


@pytest.mark.parametrize("restricted", [False, True], ids=["weights_only", "restricted"])
def test_a_pickle_calling_bytearray_with_a_size_is_refused_before_loading(
    tmp_path: Path, torch_loads: list[str], restricted: bool
) -> None:
    obj: dict[str, Any] = {"state_dict": {}, "junk": _Call(bytearray, _BIG)}
    if restricted:  # a global weights_only refuses: the file goes on to the restricted unpickler
        obj["max_map"] = np.float64(0.5)
    path = _torch_zip(tmp_path / "bytearray.pth", obj)
    assert path.stat().st_size < 2048
    with pytest.raises(InvalidCheckpointError, match=r"bytearray.pth.*not a valid checkpoint.*bytearray with int"):
        load_checkpoint_file(path)
    with pytest.raises(DeclaredSizeError, match="bytes/bytearray"):
        restricted_torch_load(path)  # the restricted loader checks on its own too
    assert torch_loads == []


def test_a_chain_of_growing_codecs_is_refused(tmp_path: Path, torch_loads: list[str]) -> None:
    encode = codecs.encode
    grown: Any = _Call(encode, "ab", "latin1")  # what pickle writes for bytes: allowed
    for _ in range(3):  # hex_codec doubles the data at each call
        grown = _Call(encode, grown, "hex_codec")
    path = _torch_zip(tmp_path / "codecs.pth", {"state_dict": {}, "junk": grown})
    with pytest.raises(InvalidCheckpointError, match=r"codecs.pth.*_codecs.encode with the codec 'hex_codec'"):
        load_checkpoint_file(path)
    assert torch_loads == []


def test_numpy_arrays_larger_than_the_file_or_of_objects_are_refused(tmp_path: Path, torch_loads: list[str]) -> None:
    from numpy.core.multiarray import _reconstruct  # noqa: PLC0415 - numpy's own pickles name numpy.core

    huge = _torch_zip(tmp_path / "huge.pth", {"state_dict": {}, "a": _Call(_reconstruct, np.ndarray, (_BIG,), b"O")})
    with pytest.raises(InvalidCheckpointError, match=r"huge.pth.*numpy array declares"):
        load_checkpoint_file(huge)
    # an object array whose state promises more items than its list holds (numpy crashes on it)
    state = (1, (_BIG,), np.dtype("O"), False, [])

    class Crafted:
        def __reduce__(self) -> tuple[Any, ...]:
            return _reconstruct, (np.ndarray, (0,), b"b"), state

    objects = _torch_zip(tmp_path / "objects.pth", {"state_dict": {}, "a": Crafted()})
    with pytest.raises(InvalidCheckpointError, match=r"objects.pth.*numpy array .*not plain bytes"):
        load_checkpoint_file(objects)
    assert torch_loads == []


def test_a_compressed_record_is_refused_before_it_is_inflated(tmp_path: Path, torch_loads: list[str]) -> None:
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(1 << 20, dtype=torch.uint8)}}, plain)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w") as target:
        for record in source.infolist():
            method = zipfile.ZIP_DEFLATED if record.filename.endswith("data/0") else zipfile.ZIP_STORED
            target.writestr(record.filename, source.read(record.filename), compress_type=method)
    assert bomb.stat().st_size < 16384  # a MiB of zeros, deflated
    with pytest.raises(InvalidCheckpointError, match=r"bomb.pth.*record plain/data/0 is compressed"):
        load_checkpoint_file(bomb)
    assert torch_loads == []


def test_records_declaring_more_than_the_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("data/0"))
    # the central directory's uncompressed size of that record: bytes 24-28 of its entry, the name at 46
    name = record.filename.encode()
    central = next(i for i in _central_entries(bytes(data)) if data[i + 46 : i + 46 + len(name)] == name)
    data[central + 24 : central + 28] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(DeclaredSizeError, match=r"records declare \d+ bytes in a file of"):
        check_declared_sizes(io.BytesIO(bytes(data)))


def _central_entries(data: bytes) -> list[int]:
    """The offsets of a zip's central-directory entries."""
    offsets, start = [], data.find(b"PK\x01\x02")
    while start != -1:
        offsets.append(start)
        start = data.find(b"PK\x01\x02", start + 4)
    return offsets


def test_a_legacy_storage_larger_than_the_file_is_refused(tmp_path: Path, torch_loads: list[str]) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"w": torch.ones(4)}}, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint_file(path)["state_dict"]["w"].tolist() == [1.0] * 4
    data = path.read_bytes()
    # the storage's element count (4) in the object's pickle, pickled as BININT1 4 after its location 'cpu'
    marker = b"X\x03\x00\x00\x00cpuq"
    at = data.index(marker)
    count = data.index(b"K\x04", at)
    forged = data[:count] + b"J" + (1 << 30).to_bytes(4, "little") + data[count + 2 :]
    (tmp_path / "forged.pth").write_bytes(forged)
    torch_loads.clear()
    with pytest.raises(InvalidCheckpointError, match=r"forged.pth.*tensor storage of 1073741824 elements"):
        load_checkpoint_file(tmp_path / "forged.pth")
    assert torch_loads == []


def test_checkpoints_of_every_supported_kind_still_load(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    for name, obj in {
        "plain": {"meta": {"architecture": "resnet18", "mean": [0.5]}, "state_dict": state},
        # the reference's: numpy max_map, bytes and bytearrays of protocol 2 (via _codecs.encode / bytearray(str))
        "reference": {"state_dict": state, "max_map": np.float64(0.25), "b": b"\x00\xff", "ba": bytearray(b"xy")},
        "arrays": {"state_dict": state, "a": np.arange(5, dtype=np.int64)},
        # protocol 2 writes b"" (an empty array's data) as a call bytes() with no argument
        "empty": {"state_dict": state, "e": np.array([]), "z": np.zeros((0, 3), dtype=np.float32), "b": b""},
    }.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path, pickle_protocol=2)
        loaded = load_checkpoint_file(path)
        assert torch.equal(loaded["state_dict"]["w"], state["w"]), name
    with pytest.raises(CheckpointError):
        load_checkpoint_file(_torch_zip(tmp_path / "list.pth", [1, 2]))


def test_the_run_record_reader_of_raml_test_never_loads_a_file_asking_for_more_than_it_holds(
    tmp_path: Path, torch_loads: list[str]
) -> None:
    from raml.engine.val_ratio import checkpoint_val_ratio

    path = _torch_zip(tmp_path / "bytearray.pth", {"state_dict": {}, "junk": _Call(bytearray, _BIG)})
    assert checkpoint_val_ratio(path) is None  # the network's own load names the problem
    assert torch_loads == []
    good = _torch_zip(tmp_path / "good.pth", {"state_dict": {}, "raml": {"val_ratio": 0.25}})
    assert checkpoint_val_ratio(good) == 0.25


def test_the_epoch_reader_of_resume_last_never_loads_a_file_asking_for_more_than_it_holds(
    tmp_path: Path, torch_loads: list[str]
) -> None:
    from raml.engine.resume import checkpoint_epoch

    path = _torch_zip(tmp_path / "bytearray.pth", {"state_dict": {}, "epoch": 3, "junk": _Call(bytearray, _BIG)})
    with pytest.raises(InvalidCheckpointError, match="bytearray.pth"):
        checkpoint_epoch(path)
    assert torch_loads == []
    assert checkpoint_epoch(_torch_zip(tmp_path / "good.pth", {"state_dict": {}, "epoch": 3})) == 3


@pytest.mark.parametrize("reader", ["epoch", "val_ratio"])
def test_the_mapped_readers_load_the_file_they_checked_not_one_swapped_in_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    from raml.engine import resume as resume_module
    from raml.engine import val_ratio as val_ratio_module

    good = _torch_zip(tmp_path / "model_last.pth.tar", {"state_dict": {}, "epoch": 3, "raml": {"val_ratio": 0.25}})
    swapped = _torch_zip(tmp_path / "other.pth", {"state_dict": {}, "epoch": 7, "raml": {"val_ratio": 0.5}})
    module = resume_module if reader == "epoch" else val_ratio_module
    real_check = check_declared_sizes

    def check_then_swap(handle: Any) -> None:
        real_check(handle)  # the checked file passes...
        swapped.replace(good)  # ...and another is moved to its path before the load

    if reader == "epoch":
        monkeypatch.setattr(resume_module, "check_declared_sizes", check_then_swap)
        assert resume_module.checkpoint_epoch(good) == 3
    else:
        monkeypatch.setattr("raml.models.checkpoints.check_declared_sizes", check_then_swap)  # run_record
        assert module.checkpoint_val_ratio(good) == 0.25


def test_the_same_data_copied_over_and_over_is_refused(tmp_path: Path) -> None:
    """One 256 KiB string stored once, passed to bytearray() 64 times (9 pickle bytes a call): 16 MiB from a file
    of about 256 KiB, each copy within the file's size."""
    text = "x" * (1 << 18)
    data = (
        b"\x80\x02]q\x00cbuiltins\nbytearray\nq\x010X"
        + len(text).to_bytes(4, "little")
        + text.encode()
        + b"q\x020X\x07\x00\x00\x00latin-1q\x030"
        + b"h\x01h\x02h\x03\x86Ra" * 64
        + b"."
    )
    path = _raw_torch_zip(tmp_path / "copies.pth", data)
    with open(path, "rb") as handle, pytest.raises(DeclaredSizeError, match="copied over and over"):
        check_declared_sizes(handle)
    with pytest.raises(InvalidCheckpointError, match="copied over and over"):
        load_checkpoint_file(path)


def test_an_honest_checkpoint_made_of_numpy_arrays_loads(tmp_path: Path) -> None:
    """Protocol 2 writes an array's data as bytes (built once) that the load copies into the array (twice)."""
    arrays = {f"a{i}": np.arange(50_000, dtype=np.float64) + i for i in range(4)}
    path = tmp_path / "arrays.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, **arrays}, path, pickle_protocol=2)
    loaded = load_checkpoint_file(path)
    assert all(np.array_equal(loaded[name], value) for name, value in arrays.items())


@pytest.mark.parametrize("constructor", [b"builtins\nlist", b"builtins\nset", b"builtins\ntuple"])
def test_a_stored_string_passed_to_another_constructor_over_and_over_is_refused(
    tmp_path: Path, constructor: bytes
) -> None:
    """list(s) of one stored 256 KiB string, 64 times: 8 bytes a character each time (128 MiB) from ~256 KiB."""
    text = "x" * (1 << 18)
    data = (
        b"\x80\x02]q\x00c"
        + constructor
        + b"\nq\x010X"
        + len(text).to_bytes(4, "little")
        + text.encode()
        + b"q\x020h\x02\x85q\x030"
        + b"h\x01h\x03Ra" * 64
        + b"."
    )
    path = _raw_torch_zip(tmp_path / "copies.pth", data)
    with open(path, "rb") as handle, pytest.raises(DeclaredSizeError, match="copied over and over"):
        check_declared_sizes(handle)
