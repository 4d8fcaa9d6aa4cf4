"""A student trained for several query sizes: ``raml export`` writes one graph with a dynamic side, checked
against PyTorch at each trained size; ``raml search`` takes the query size per call."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from raml.cli import main as cli_main
from raml.deploy import export_onnx, read_sidecar
from raml.deploy.search import OnnxEmbedder
from raml.models import build_network, load_network, save_checkpoint

SIZES = [24, 32, 40]


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("multi_export")
    torch.manual_seed(0)
    network = build_network("timm/test_resnet", whitening=8, pretrained=False)
    network.meta["image_sizes"] = SIZES
    path = base / "multi.pth"
    save_checkpoint(path, network)
    rng = np.random.default_rng(0)
    for i in range(3):
        (base / "images").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)).save(base / "images" / f"{i}.png")
    return {"checkpoint": path, "images": base / "images", "base": base}


def test_the_sizes_survive_the_checkpoint(multi):
    assert load_network(multi["checkpoint"]).meta["image_sizes"] == SIZES


def test_export_is_dynamic_and_checked_at_every_trained_size(multi, tmp_path, capsys, caplog):
    onnx_file, report = tmp_path / "multi.onnx", tmp_path / "report.json"
    argv = ["export", "--network-path", str(multi["checkpoint"]), "--output", str(onnx_file)]
    code = cli_main.main([*argv, "--images", str(multi["images"]), "--json", str(report)])
    assert code == 0
    (entry,) = json.loads(report.read_text())
    for size in SIZES[1:]:  # the first size is the export's own: batch 2 and 1 at 24 px
        assert [2, 3, size, size] in entry["checked_shapes"]
    assert entry["max_abs_diff_random"] <= 1e-4 and entry["max_abs_diff_images"] <= 1e-4
    sidecar = read_sidecar(onnx_file)
    assert sidecar["dynamic_size"] is True and sidecar["image_sizes"] == SIZES and sidecar["image_size"] == SIZES[0]
    # independent check at each size: onnxruntime against PyTorch on the same random batch
    network = load_network(multi["checkpoint"])
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for size in SIZES:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            reference = network(x).numpy()
        assert np.abs(session.run(None, {"images": x.numpy()})[0] - reference).max() <= 1e-4
    # the query size is chosen per call; a size outside the trained ones is allowed with a warning
    assert OnnxEmbedder(onnx_file, 32).image_size == 32
    assert OnnxEmbedder(onnx_file).image_size == SIZES[0]
    search_logger = logging.getLogger("raml.deploy.search")
    search_logger.addHandler(caplog.handler)  # the CLI above replaced the root logger's handlers
    try:
        assert OnnxEmbedder(onnx_file, 56).image_size == 56
    finally:
        search_logger.removeHandler(caplog.handler)
    assert "outside them" in caplog.text


def test_export_at_a_size_outside_the_trained_ones_warns(multi, tmp_path, caplog):
    search_logger = logging.getLogger("raml.deploy.search")
    search_logger.addHandler(caplog.handler)  # the CLI replaces the root logger's handlers
    try:
        argv = ["export", "--network-path", str(multi["checkpoint"]), "--torchscript", str(tmp_path / "m.pt")]
        assert cli_main.main([*argv, "--image-size", "32"]) == 0
        assert "outside them" not in caplog.text
        assert cli_main.main([*argv, "--image-size", "56", "--overwrite"]) == 0
    finally:
        search_logger.removeHandler(caplog.handler)
    assert "trained for query sizes [24, 32, 40]; 56 px queries are outside them" in caplog.text


def test_parity_is_checked_at_each_size(multi, tmp_path, monkeypatch):
    from raml.deploy import export as export_module

    checked = []
    real = export_module._max_diff

    def spy(run, network, batches):
        checked.extend(tuple(b.shape[-2:]) for b in batches)
        return real(run, network, batches)

    monkeypatch.setattr(export_module, "_max_diff", spy)
    network = load_network(multi["checkpoint"])
    images = sorted(multi["images"].iterdir())
    export_onnx(network, 24, tmp_path / "m.onnx", dynamic_size=True, check_sizes=SIZES, image_paths=images)
    for size in SIZES:
        assert checked.count((size, size)) >= 2  # random inputs and real images at every trained size


def test_several_sizes_without_a_dynamic_side_are_refused(multi, tmp_path):
    network = load_network(multi["checkpoint"])
    target = tmp_path / "fixed.onnx"
    with pytest.raises(ValueError, match="dynamic side"):
        export_onnx(network, 24, target, check_sizes=SIZES)
    assert not target.exists()
