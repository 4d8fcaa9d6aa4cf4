"""A zip archive that Python's reader and torch's (miniz) would read two different ways is refused: the size
check (and the TorchScript check) read the archive with Python's zipfile, torch.load with miniz."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from raml.models import load_checkpoint_file
from raml.models.checkpoints import InvalidCheckpointError, run_record


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


# {"state_dict": {}, "x": bytearray(300 MB)}, written by hand (protocol 2)
_BOMB = b"\x80\x02}(" + _text("state_dict") + b"}" + _text("x") + b"cbuiltins\nbytearray\nJ"
_BOMB += struct.pack("<i", 300_000_000) + b"\x85Ru."


def _archive(pickled: bytes) -> tuple[bytes, bytes, bytes]:
    """torch's zip layout around the pickle ``pickled``: its records, central directory and end record."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, body in (("archive/data.pkl", pickled), ("archive/version", b"3\n"), ("archive/byteorder", b"le")):
            archive.writestr(name, body)
    data = buffer.getvalue()
    end = data.rindex(b"PK\x05\x06")
    size, offset = struct.unpack("<II", data[end + 12 : end + 20])
    return data[:offset], data[offset : offset + size], data[end:]


def test_two_central_directories_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    """The end record names the bomb's directory (at the start: what torch reads); a harmless one lies just before
    the end record, with the harmless records before it (what Python reads, taking the gap for data prepended)."""
    bomb_records, bomb_directory, _ = _archive(_BOMB)
    harmless = pickle.dumps({"state_dict": {}, "x": b"ok"}, protocol=2).ljust(len(_BOMB), b".")
    records, directory, end = _archive(harmless)
    assert len(directory) == len(bomb_directory)
    width = max(len(records), len(bomb_records))
    forged_end = bytearray(end)
    forged_end[16:20] = struct.pack("<I", width)  # the bomb's directory
    data = bomb_records.ljust(width, b"\0") + bomb_directory + records.ljust(width, b"\0") + directory + forged_end
    path = tmp_path / "two.pth"
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:  # Python's reader sees only the harmless pickle
        assert archive.read("archive/data.pkl") == harmless
    with pytest.raises(InvalidCheckpointError, match=r"two.pth.*central directory lies at \d+, not at \d+"):
        load_checkpoint_file(path)
    assert run_record(path) is None


def test_a_zip64_locator_pointing_elsewhere_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}}, buffer)  # torch writes zip64 end records
    data = bytearray(buffer.getvalue())
    locator = data.rindex(b"PK\x06\x07")
    pointed = int.from_bytes(data[locator + 8 : locator + 16], "little")
    assert pointed == locator - 56  # the zip64 end record, just before it
    data[locator + 8 : locator + 16] = (pointed - 1).to_bytes(8, "little")
    path = tmp_path / "zip64.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpointError, match=r"zip64.pth.*zip64 end records disagree"):
        load_checkpoint_file(path)


def test_the_private_zipfile_names_the_check_reads_exist() -> None:
    """The directory check reads the end record as ``zipfile.ZipFile`` itself does, through zipfile's private
    ``_EndRecData`` and ``_ECD_*`` indices (Python 3.10-3.13). A Python that renames them would make every checkpoint
    load fail with an AttributeError: this test names the cause first."""
    for name in ("_EndRecData", "_ECD_LOCATION", "_ECD_SIGNATURE", "_ECD_OFFSET", "stringEndArchive64"):
        assert hasattr(zipfile, name), f"zipfile.{name} is gone in this Python: rewrite _check_same_directory"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buffer)
    end = zipfile._EndRecData(buffer)
    assert end is not None and end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64  # torch writes zip64
