"""``raml export --int8`` writes its fp32 model (and quantize_onnx its prepared copy) inside the staging folder of
--output, which the next export removes if this one is killed, never in the system's temporary folder."""

from __future__ import annotations

import tempfile

from raml.cli import main as cli_main
from raml.deploy import quantize as quantize_module


def test_the_fp32_model_of_an_int8_export_is_in_the_staging_folder(synth_and_networks, tmp_path, monkeypatch):
    root, nets = synth_and_networks("timm/test_resnet", {"student": (16, 0)})
    system_temp = tmp_path / "tmp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    real_quantize = quantize_module.quantize_onnx
    seen = {}

    def quantize(fp32_path, output, *args, **kwargs):
        # while the export runs (a kill now leaves what is there)
        seen["fp32"], seen["temp"] = fp32_path, sorted(p.name for p in system_temp.iterdir())
        seen["work_dir"] = kwargs.get("work_dir")  # where quantize_onnx makes its own temporary folder
        return real_quantize(fp32_path, output, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_onnx", quantize)
    out = tmp_path / "out" / "student.int8.onnx"
    argv = ["export", "--network-path", str(nets["student"]), "--image-size", "32", "--output", str(out)]
    calibration = ["--int8", "--calibration-split", "synth-train", "--calibration-images", "4"]
    assert cli_main.main([*argv, "--data-root", str(root), "--exporter", "torchscript", *calibration]) == 0
    stage = seen["fp32"].parent.parent
    assert stage.parent == out.parent
    assert stage.name.startswith(".student.int8.onnx.") and stage.name.endswith(".staged")
    assert seen["work_dir"] is not None and stage in seen["work_dir"].parents
    assert not [name for name in seen["temp"] if name.startswith("raml-")]
    assert not [p.name for p in system_temp.iterdir() if p.name.startswith("raml-")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.int8.onnx", "student.int8.onnx.json"]
