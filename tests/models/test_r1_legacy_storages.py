"""Legacy (non-zip) checkpoints must hold the data of every storage they declare: torch allocates each declared
storage (elements times element size) and fills only those in the list of storage keys, from the bytes after the
pickles."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from raml.models import load_checkpoint_file
from raml.models.checkpoints import InvalidCheckpointError


class _Anything:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Skipping(pickle.Unpickler):
    """Reads one of the legacy pickles without building torch's objects."""

    def find_class(self, module: str, name: str) -> Any:
        return _Anything

    def persistent_load(self, saved_id: Any) -> Any:
        return saved_id


def _legacy_parts(obj: Any) -> tuple[list[bytes], bytes]:
    """``obj`` saved in torch's legacy format: its five pickles, and the storages' data after them."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    buffer.seek(0)
    parts, start = [], 0
    for _ in range(5):
        _Skipping(buffer, encoding="latin1").load()
        parts.append(buffer.getvalue()[start : buffer.tell()])
        start = buffer.tell()
    return parts, buffer.getvalue()[start:]


def test_storages_missing_from_the_list_of_keys_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    """An empty list of keys: torch would load the weights uninitialised (whatever memory held)."""
    parts, data = _legacy_parts({"state_dict": {"w": torch.ones(64), "b": torch.ones(8)}})
    path = tmp_path / "nodata.pth"
    path.write_bytes(b"".join(parts[:4]) + pickle.dumps([], protocol=2) + data)
    with pytest.raises(InvalidCheckpointError, match=r"nodata.pth.*2 tensor storage\(s\) whose data it does not hold"):
        load_checkpoint_file(path)


def test_storages_declaring_more_than_the_data_after_the_pickles_are_refused(
    tmp_path: Path, no_torch_load: None
) -> None:
    """64 storages, each within the file's size, 64 times its data together."""
    parts, data = _legacy_parts({"state_dict": {f"w{i}": torch.ones(1024, dtype=torch.uint8) for i in range(64)}})
    path = tmp_path / "many.pth"
    keys = pickle.loads(parts[4])
    path.write_bytes(b"".join(parts) + data[: len(data) // 64])  # the data of one storage
    assert len(keys) == 64
    with pytest.raises(InvalidCheckpointError, match=r"many.pth.*declare 66048 bytes of data, but only 1032 bytes"):
        load_checkpoint_file(path)


def test_a_storages_element_size_counts(tmp_path: Path, no_torch_load: None) -> None:
    """complex128: 16 bytes an element; a storage of as many elements as the file has bytes is 16 times the file."""
    parts, data = _legacy_parts({"state_dict": {"w": torch.ones(1024, dtype=torch.complex128)}})
    forged = parts[3].replace(b"M\x00\x04", b"M\x00\x10", 1)  # BININT2 1024 -> 4096 elements (64 KiB)
    assert forged != parts[3]
    path = tmp_path / "complex.pth"
    path.write_bytes(b"".join(parts[:3]) + forged + parts[4] + data + bytes(48 * 1024 - len(data)))
    assert path.stat().st_size > 4096
    with pytest.raises(InvalidCheckpointError, match=r"complex.pth.*4096 elements of 16 bytes"):
        load_checkpoint_file(path)


def test_honest_legacy_checkpoints_of_several_types_load(tmp_path: Path) -> None:
    state = {
        "w": torch.arange(12.0).reshape(3, 4),
        "v": torch.arange(12.0).reshape(3, 4)[1],  # a view of a storage saved once
        "n": torch.tensor(7, dtype=torch.int64),
        "c": torch.ones(3, dtype=torch.complex128),
        "m": torch.tensor([True, False]),
    }
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint_file(path)["state_dict"]
    assert all(torch.equal(loaded[name], value) for name, value in state.items())
