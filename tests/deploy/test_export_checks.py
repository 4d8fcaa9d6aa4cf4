"""What ``raml export`` and the readers of its files refuse: a parity check that a NaN cannot pass, a sidecar that
does not describe its model graph, a malformed sidecar (one-line errors, exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raml.cli import main as cli_main
from raml.deploy import ParityError, export_onnx
from raml.deploy import export as export_module
from raml.models import build_network, load_network, save_checkpoint


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """An 8-d timm test_resnet checkpoint (seed 0), and a copy of it with one NaN whitening weight."""
    base = tmp_path_factory.mktemp("export_checks")
    torch.manual_seed(0)
    network = build_network("timm/test_resnet", whitening=8, pretrained=False)
    save_checkpoint(base / "single.pth", network)
    with torch.no_grad():
        network.whiten.weight[0, 0] = float("nan")
    save_checkpoint(base / "nan.pth", network)
    return {"base": base, "single": base / "single.pth", "nan": base / "nan.pth"}


def test_a_nan_row_of_the_exported_model_fails_the_parity_check(small):
    network = load_network(small["single"], device="cpu").eval()

    def nan_row(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            out = network(batch).numpy().copy()
        out[0, :] = np.nan
        return out

    assert export_module._max_diff(nan_row, network, [torch.randn(2, 3, 32, 32)]) == float("inf")
    with pytest.raises(ParityError, match="exported model outputs NaN/inf"):
        export_module._check_parity(nan_row, network, 32, False, [], 1e-4, "ONNX")


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_a_checkpoint_with_a_nan_weight_is_refused_and_nothing_is_written(small, tmp_path, capsys, kind):
    target = ["--output", str(tmp_path / "nan.onnx")] if kind == "onnx" else ["--torchscript", str(tmp_path / "n.pt")]
    argv = ["export", "--network-path", str(small["nan"]), "--image-size", "32", *target]
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("raml export: error: ") and "network outputs NaN/inf" in line
    assert "nothing was written" in line
    assert not any(tmp_path.iterdir())


def test_the_nan_checkpoint_export_through_the_library_raises(small, tmp_path):
    with pytest.raises(ParityError, match="NaN/inf"):
        export_onnx(load_network(small["nan"], device="cpu"), 32, tmp_path / "n.onnx", exporter="torchscript")
    assert not any(tmp_path.iterdir())
