"""A pickle cannot change the functions and classes the restricted unpickler hands it (BUILD on a global), which
would change every later load in the process."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.models import load_checkpoint_file, restricted_pickle
from raml.models.checkpoints import CheckpointError
from raml.models.restricted_pickle import (
    _BUILTINS,
    _NUMPY,
    _TORCH_REBUILDERS,
    UnsafeGlobalError,
    restricted_torch_load,
)


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _zip(path: Path, data: bytes) -> Path:
    """The hand-written pickle ``data`` as the data.pkl of torch's zip layout."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data, len(data))
    writer.write_record("version", b"3\n", 2)
    writer.write_end_of_file()
    del writer
    return path


def _build_on(module: str, name: str, state: bytes) -> bytes:
    """{"state_dict": {}, "max_map": <numpy float>, "b": <module.name after BUILD with ``state``>} (protocol 2):
    the numpy scalar makes weights_only refuse the file, so that it goes on to the restricted unpickler."""
    scalar = pickle.dumps(np.float64(0.5), protocol=2)[2:-1]  # the scalar's opcodes, without PROTO and STOP
    return (
        b"\x80\x02}(" + _text("state_dict") + b"}" + _text("max_map") + scalar + _text("b")
        + f"c{module}\n{name}\n".encode() + state + b"bu."
    )  # fmt: skip


# (None, {"__defaults__": ({"neg": True},)}): BUILD's slot state, set with setattr
_NEGATING = b"N}" + _text("__defaults__") + b"}" + _text("neg") + b"\x88s\x85s\x86"


def test_a_pickle_cannot_change_torchs_rebuild_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rebuild = torch._utils._rebuild_tensor_v2
    before = rebuild.__defaults__
    clean = tmp_path / "clean.pth"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "max_map": np.float64(0.5)}, clean)
    poison = _zip(tmp_path / "poison.pth", _build_on("torch._utils", "_rebuild_tensor_v2", _NEGATING))
    try:
        with pytest.raises(CheckpointError, match=r"poison.pth"):
            load_checkpoint_file(poison)
        # the loader itself refuses it too, were the size check ever got round (as it was, by a record named in
        # another case)
        with monkeypatch.context() as patch:
            patch.setattr(restricted_pickle, "check_declared_sizes", lambda file: None)
            with pytest.raises(UnsafeGlobalError, match=r"sets the state of torch._utils._rebuild_tensor_v2"):
                restricted_torch_load(poison)
        assert rebuild.__defaults__ == before
        loaded = load_checkpoint_file(clean)["state_dict"]["w"]
        assert not loaded.is_neg()
        assert loaded.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        rebuild.__defaults__ = before  # with the fix undone: leave later tests in this process a clean torch


_GLOBALS = (
    [("torch._utils", name) for name in _TORCH_REBUILDERS]
    + [("builtins", name) for name in _BUILTINS]
    + sorted(_NUMPY)
    + [("collections", "OrderedDict"), ("_codecs", "encode"), ("torch", "Size"), ("torch", "device")]
    + [("torch", "float32")]
)


@pytest.mark.parametrize(("module", "name"), _GLOBALS, ids=[f"{m}.{n}" for m, n in _GLOBALS])
def test_build_on_any_allowed_global_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str
) -> None:
    monkeypatch.setattr(restricted_pickle, "check_declared_sizes", lambda file: None)  # the loader on its own
    # {"raml_attack": 1} as BUILD's state (the object's __dict__), then as its slot state (setattr)
    for state in (b"}" + _text("raml_attack") + b"K\x01s", b"N}" + _text("raml_attack") + b"K\x01s\x86"):
        path = _zip(tmp_path / "build.pth", _build_on(module, name, state))
        with pytest.raises(Exception):  # noqa: B017 - refused by our stand-in, or by Python for a class of C
            restricted_torch_load(path)
    target = torch._utils if module == "torch._utils" else None
    if target is not None:
        assert not hasattr(getattr(target, name), "raml_attack")
