"""``raml export --int8``: a failed write of the int8 model or its sidecar names --output, not the hidden staged
file, and onnxruntime's own temporary folders (``pre.quant.*``, ``ort.quant.*`` with a copy of the model) are made
in the staging folder (which the next export removes if this one is killed), not in the system's."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import onnxruntime.quantization as ort_quantization
import pytest

from raml.cli import main as cli_main
from raml.deploy import quantize as quantize_module


def _argv(root: Path, network: Path, out: Path) -> list[str]:
    return [
        *("export", "--network-path", str(network), "--image-size", "32", "--output", str(out)),
        *("--data-root", str(root), "--exporter", "torchscript"),
        *("--int8", "--calibration-split", "synth-train", "--calibration-images", "4"),
    ]


@pytest.mark.parametrize("failing", ["model", "sidecar"])
def test_a_full_disk_names_the_output_not_the_staged_file(synth_and_networks, tmp_path, monkeypatch, capsys, failing):
    root, nets = synth_and_networks("timm/test_resnet", {"student": (16, 0)})
    out = tmp_path / "out" / "student.int8.onnx"

    def full(path: str, *args, **kwargs) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if failing == "model":
        monkeypatch.setattr(ort_quantization, "quantize_static", lambda src, dst, *a, **k: full(dst))
    else:
        monkeypatch.setattr(quantize_module, "atomic_write_text", lambda path, text: full(str(path)))
    assert cli_main.main(_argv(root, nets["student"], out)) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    what = f"int8 model {out}" if failing == "model" else f"sidecar {quantize_module.sidecar_path(out)}"
    assert line.startswith(f"raml export: error: [Errno 28] Could not write the {what} (no space left on its disk)")
    assert ".staged" not in line and ".tmp" not in line
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_onnxruntimes_temporary_folders_are_in_the_staging_folder(synth_and_networks, tmp_path, monkeypatch):
    root, nets = synth_and_networks("timm/test_resnet", {"student": (16, 0)})
    system_temp = tmp_path / "tmp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    out = tmp_path / "out" / "student.int8.onnx"
    seen = {}
    real_reader = quantize_module._calibration_reader

    def reader(input_name, images):
        made = real_reader(input_name, images)
        real_next = made.get_next

        def get_next():  # during calibration: what a kill now would leave
            if not seen:
                seen["staged"] = sorted(p.name for p in out.parent.rglob("*"))
                seen["temp"] = sorted(p.name for p in system_temp.iterdir())
            return real_next()

        made.get_next = get_next
        return made

    monkeypatch.setattr(quantize_module, "_calibration_reader", reader)
    assert cli_main.main(_argv(root, nets["student"], out)) == 0
    assert [name for name in seen["staged"] if name.startswith("ort.quant.")], seen
    assert not [name for name in seen["temp"] if name.startswith(("ort.quant.", "pre.quant.", "raml-"))], seen
    assert tempfile.tempdir == str(system_temp)  # restored
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.int8.onnx", "student.int8.onnx.json"]
