"""The size check reads what torch.load reads: a zip record torch finds whatever the case of its name, and a legacy
file whose magic number is built by a call (which torch's unpickler makes, the check's does not)."""

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
from raml.models.restricted_pickle import DeclaredSizeError, check_declared_sizes

_BIG = 300_000_000  # what the crafted files ask bytearray() for: far more than they hold


def _text(value: str) -> bytes:
    """BINUNICODE: a str in a hand-written pickle."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


# {"state_dict": {}, "x": bytearray(_BIG)}, written by hand (protocol 2)
_BOMB = b"\x80\x02}(" + _text("state_dict") + b"}" + _text("x") + b"cbuiltins\nbytearray\nJ"
_BOMB += struct.pack("<i", _BIG) + b"\x85Ru."


def _renamed(tmp_path: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    """A torch.save checkpoint (its folder: ``archive``) whose data.pkl is replaced by the bomb, stored under
    ``name``, with the records ``extra`` added."""
    plain = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    out = tmp_path / "renamed.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for record in source.infolist():
            body = source.read(record)
            if record.filename.endswith("/data.pkl"):
                record_name, body = record.filename[: -len("data.pkl")] + name, _BOMB
            else:
                record_name = record.filename
            target.writestr(record_name, body)
        for extra_name, extra_body in (extra or {}).items():
            target.writestr(extra_name, extra_body)
    return out


@pytest.mark.parametrize("name", ["DATA.PKL", "Data.pkl", "data.PKL"])
def test_a_pickle_record_named_in_another_case_is_checked(tmp_path: Path, no_torch_load: None, name: str) -> None:
    path = _renamed(tmp_path, name)
    assert path.stat().st_size < 2048
    with pytest.raises(InvalidCheckpointError, match=r"renamed.pth.*not a valid checkpoint.*bytearray with int"):
        load_checkpoint_file(path)
    assert run_record(path) is None  # raml test's reader: never loaded either


def test_record_names_differing_only_in_case_are_refused(tmp_path: Path, no_torch_load: None) -> None:
    harmless = pickle.dumps({"state_dict": {}}, protocol=2)
    path = _renamed(tmp_path, "DATA.pkl", extra={"archive/data.pkl": harmless})
    refusal = r"records .archive/DATA.pkl. and .archive/data.pkl. have the same name \(ignoring case"
    with pytest.raises(InvalidCheckpointError, match=refusal):
        load_checkpoint_file(path)


def _legacy(magic: bytes, obj: bytes) -> bytes:
    """torch's legacy format: the magic number, protocol version, system info, object and storage keys."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return magic + pickle.dumps(1001, protocol=2) + pickle.dumps(info, protocol=2) + obj + pickle.dumps([], protocol=2)


def test_a_legacy_magic_number_built_by_a_call_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    built = b"\x80\x02cbuiltins\nint\n(" + _text("1950a86a20f9469cfc6c") + b"K\x10tR."
    path = tmp_path / "legacy.pth"
    path.write_bytes(_legacy(built, _BOMB))
    with pytest.raises(InvalidCheckpointError, match=r"legacy.pth.*neither a zip archive nor torch's legacy format"):
        load_checkpoint_file(path)
    # a plain pickle of data is not torch's format whatever its unpickler: left to torch.load, which refuses it
    check_declared_sizes(io.BytesIO(pickle.dumps({"state_dict": {}, "n": 0x1950A86A20F9469CFC6C}, protocol=2)))
    # the same file with the number itself: the bomb is found
    plain = _legacy(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), _BOMB)
    with pytest.raises(DeclaredSizeError, match="bytearray with int"):
        check_declared_sizes(io.BytesIO(plain))
