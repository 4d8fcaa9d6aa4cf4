"""``raml export`` onto a full disk: a clear one-line error (exit 2), the previous file kept, nothing left over;
no interpreter abort (TorchScript) and no fallback to the other ONNX exporter (which would fail the same way)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from raml.cli import main as cli_main
from raml.deploy import export as export_module


@pytest.fixture(scope="module")
def checkpoint(random_network) -> Path:
    return random_network("timm/test_resnet", 8, 0)


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_onto_a_full_disk_is_a_clear_error(checkpoint, tmp_path, monkeypatch, capsys):
    target = tmp_path / "student.pt"
    target.write_bytes(b"previous export")

    class FullDiskFile:
        """What ``open(path, "wb")`` gives on a full disk: the first bytes are written, then ENOSPC."""

        def __init__(self, path: Path, mode: str) -> None:
            self._file = open(path, mode)  # noqa: SIM115 - closed in __exit__

        def __enter__(self) -> FullDiskFile:
            return self

        def __exit__(self, *exc_info: object) -> None:
            self._file.close()

        def write(self, data: bytes) -> int:
            self._file.write(bytes(data)[:100])
            _no_space()
            return 0

    monkeypatch.setattr(export_module, "open", FullDiskFile, raising=False)
    argv = ["export", "--network-path", str(checkpoint), "--image-size", "32", "--torchscript", str(target)]
    assert cli_main.main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err  # log lines, then the one-line error
    line = err.splitlines()[-1]
    assert line.startswith(f"raml export: error: [Errno 28] Could not write the TorchScript model {target} (")
    assert "no space left on its disk" in err and "Free some space" in err
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]  # no staged folder, no partial file


def test_onnx_export_onto_a_full_disk_does_not_fall_back_to_dynamo(checkpoint, tmp_path, monkeypatch, capsys):
    target = tmp_path / "student.onnx"
    target.write_bytes(b"previous export")
    exporters = []

    def full_disk_export(network, example, path, dynamic_size, opset, exporter, min_side=32):
        exporters.append(exporter)
        Path(path).write_bytes(b"partial")
        _no_space()

    monkeypatch.setattr(export_module, "_onnx_export", full_disk_export)
    argv = ["export", "--network-path", str(checkpoint), "--image-size", "32", "--output", str(target)]
    assert cli_main.main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err  # log lines, then the one-line error
    line = err.splitlines()[-1]
    # the file the user asked for, not the staged one (.student.onnx.<random>.staged/student.onnx), gone by now
    assert line.startswith(f"raml export: error: [Errno 28] Could not write the ONNX model {target} (")
    assert "no space left on its disk" in err
    assert exporters == ["torchscript"]  # the full disk is reported at once, with no second exporter tried
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]
