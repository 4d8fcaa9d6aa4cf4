"""``raml export`` with ``--exporter auto``: an ``OSError`` of the first ONNX exporter that is not a failed write of
the model file (a missing or unreadable file of its own) falls back to the other exporter; a failed write (a full
disk, also as a short write without an errno) does not, and its one-line error names --output, not the staged file."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from raml.cli import main as cli_main
from raml.deploy import export as export_module


@pytest.fixture(scope="module")
def checkpoint(random_network) -> Path:
    return random_network("timm/test_resnet", 8, 0)


def _argv(checkpoint: Path, target: Path) -> list[str]:
    return ["export", "--network-path", str(checkpoint), "--image-size", "32", "--output", str(target), "--overwrite"]


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/nonexistent/exporter_helper"),
        PermissionError(errno.EACCES, "Permission denied", "/root/.cache/exporter"),
        # onnx raises these with a message only (no errno): they are no short write either
        FileNotFoundError("Folder '/x/cache' does not exist."),
        PermissionError("cannot read /root/.cache/exporter"),
    ],
)
def test_an_exporters_own_os_error_falls_back_to_the_other_exporter(checkpoint, tmp_path, monkeypatch, error):
    target = tmp_path / "student.onnx"
    real_export = export_module._onnx_export
    exporters = []

    def first_fails(network, example, path, dynamic_size, opset, exporter, min_side=32):
        exporters.append(exporter)
        if exporter == "torchscript":
            raise error
        # a valid model in place of the (slow) dynamo exporter's, at the opset it writes
        real_export(network, example, path, dynamic_size, max(opset, 18), "torchscript", min_side)

    monkeypatch.setattr(export_module, "_onnx_export", first_fails)
    assert cli_main.main(_argv(checkpoint, target)) == 0
    assert exporters == ["torchscript", "dynamo"]
    assert target.is_file() and export_module.sidecar_path(target).is_file()


def test_a_short_write_is_a_possible_full_disk_naming_the_target(checkpoint, tmp_path, monkeypatch, capsys):
    target = tmp_path / "student.onnx"
    target.write_bytes(b"previous export")
    exporters = []

    def short_write(network, example, path, dynamic_size, opset, exporter, min_side=32):
        exporters.append(exporter)
        Path(path).write_bytes(b"partial")
        raise OSError("165888 requested and 152656 written")  # numpy's tofile on a full disk: no errno

    monkeypatch.setattr(export_module, "_onnx_export", short_write)
    assert cli_main.main(_argv(checkpoint, target)) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"raml export: error: Could not write the ONNX model {target} (165888 requested and ")
    assert "the disk may be full" in line and "Errno" not in line and ".staged" not in line
    assert exporters == ["torchscript"]  # a failed write: the other exporter would fail the same way
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]
