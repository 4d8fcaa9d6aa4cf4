"""What ``raml export`` and the readers of its files refuse: a parity check that a NaN cannot pass, a sidecar that
does not describe its model graph, a malformed sidecar (one-line errors, exit 2)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.cli import main as cli_main
from raml.deploy import ParityError, export_onnx, sidecar_path
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


@pytest.mark.parametrize("outputdim", [None, 0, "8"])
def test_a_network_without_a_positive_outputdim_is_refused_before_any_export_work(small, tmp_path, outputdim):
    network = load_network(small["single"], device="cpu").eval()
    if outputdim is None:
        del network.meta["outputdim"]
    else:
        network.meta["outputdim"] = outputdim
    for export in (export_onnx, export_module.export_torchscript):
        with pytest.raises(ValueError, match="no positive integer 'outputdim'"):
            export(network, 32, tmp_path / "out.model")
    assert not any(tmp_path.iterdir())


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


@pytest.fixture(scope="module")
def exported(small) -> Path:
    """The 8-d checkpoint exported to ONNX at a fixed 32 px."""
    path = small["base"] / "single.onnx"
    export_onnx(load_network(small["single"], device="cpu"), 32, path, exporter="torchscript")
    return path


def _readers() -> dict[str, Callable[[Path], object]]:
    from raml.deploy.onnx_network import OnnxQueryNetwork
    from raml.deploy.search import OnnxEmbedder
    from raml.deploy.service import OnnxQueryEmbedder

    return {"search": OnnxEmbedder, "test": OnnxQueryNetwork, "serve": OnnxQueryEmbedder}


def _lying_copy(exported: Path, folder: Path, changes: dict, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the export whose sidecar has ``changes`` (and lacks the keys ``drop``)."""
    model = folder / "model.onnx"
    shutil.copyfile(exported, model)
    record = {**json.loads(sidecar_path(exported).read_text()), **changes}
    for key in drop:
        del record[key]
    sidecar_path(model).write_text(json.dumps(record))
    return model


@pytest.mark.parametrize("reader", ["search", "test", "serve"])
def test_the_untouched_export_loads(exported, reader):
    _readers()[reader](exported)


@pytest.mark.parametrize("reader", ["search", "test", "serve"])
@pytest.mark.parametrize(
    ("changes", "drop", "message"),
    [
        ({"output_dim": 16}, (), "outputs 8-d embeddings but its sidecar model.onnx.json says output_dim 16"),
        ({"image_size": 48}, (), "takes 32x32 images but its sidecar model.onnx.json says image_size 48"),
        ({"dynamic_size": True}, (), "a fixed-size graph) but its sidecar model.onnx.json claims a dynamic size"),
        ({"image_sizes": [32, 48]}, (), "claims several query sizes"),
        ({}, ("model_sha256",), "has no valid model_sha256"),
        ({"model_sha256": 123}, (), "has no valid model_sha256"),
        ({"model_sha256": "abc"}, (), "has no valid model_sha256"),
    ],
    ids=["output-dim", "image-size", "dynamic-size", "image-sizes", "no-sha", "int-sha", "short-sha"],
)
def test_a_sidecar_that_lies_about_its_graph_is_refused_at_load(exported, tmp_path, reader, changes, drop, message):
    model = _lying_copy(exported, tmp_path, changes, drop)
    with pytest.raises(ValueError, match=re.escape(message)):
        _readers()[reader](model)


def test_quantize_refuses_a_lying_fp32_sidecar(exported, tmp_path):
    from raml.deploy.quantize import quantize_onnx

    model = _lying_copy(exported, tmp_path, {"output_dim": 16})
    with pytest.raises(ValueError, match="says output_dim 16"):
        quantize_onnx(model, tmp_path / "q.onnx", [str(exported)], [str(model)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]


def _nested(model: Path) -> None:
    sidecar_path(model).write_text("[" * 100_000 + "]" * 100_000)


def _huge(model: Path) -> None:
    sidecar_path(model).write_text(json.dumps({"format": "raml-preprocessing", "padding": "x" * 2**20}))


@pytest.mark.parametrize(
    ("changes", "write", "message"),
    [
        ({"mean": None}, None, "mean must be three finite numbers"),
        ({"mean": [0.5, 0.5]}, None, "mean must be three finite numbers"),
        ({"std": [0.5, 0.0, 0.5]}, None, "std must be three positive finite numbers"),
        ({"std": "0.5"}, None, "std must be three positive finite numbers"),
        ({"image_size": [32]}, None, "image_size must be a positive integer"),
        ({"image_size": 0}, None, "image_size must be a positive integer"),
        ({"image_size": True}, None, "image_size must be a positive integer"),
        ({"output_dim": "8"}, None, "output_dim must be a positive integer"),
        ({"dynamic_size": "no"}, None, "dynamic_size must be true or false"),
        ({"image_sizes": [32, "48"]}, None, "image_sizes must be a list of positive integers"),
        ({"image_sizes": 32}, None, "image_sizes must be a list of positive integers"),
        ({}, _nested, "nested too deeply"),
        ({}, _huge, "more than a preprocessing sidecar can be"),
    ],
    ids=[
        "mean-null",
        "mean-two",
        "std-zero",
        "std-string",
        "size-list",
        "size-zero",
        "size-bool",
        "dim-string",
        "dynamic-string",
        "sizes-string",
        "sizes-int",
        "nested",
        "huge",
    ],
)
def test_a_malformed_sidecar_is_a_one_line_error(exported, tmp_path, changes, write, message):
    from raml.deploy import read_sidecar
    from raml.deploy.search import OnnxEmbedder

    model = _lying_copy(exported, tmp_path, changes)
    if write is not None:
        write(model)
    for reader in (read_sidecar, OnnxEmbedder):
        with pytest.raises(ValueError, match=re.escape(message)) as caught:
            reader(model)
        assert "\n" not in str(caught.value) and "re-export the model with `raml export`" in str(caught.value)


@pytest.fixture(scope="module")
def multi_export(tmp_path_factory) -> Path:
    """A student trained for 24, 32 and 40 px queries, exported at its second size (32) with a dynamic side."""
    base = tmp_path_factory.mktemp("multi_default")
    torch.manual_seed(0)
    network = build_network("timm/test_resnet", whitening=8, pretrained=False)
    network.meta["image_sizes"] = [24, 32, 40]
    path = base / "multi.onnx"
    export_onnx(network, 32, path, dynamic_size=True, exporter="torchscript", check_sizes=[24, 32, 40])
    return path


def test_serve_defaults_to_the_exported_size_of_a_multi_size_export(multi_export):
    from raml.deploy.onnx_network import OnnxQueryNetwork
    from raml.deploy.search import OnnxEmbedder
    from raml.deploy.service import OnnxQueryEmbedder

    served = OnnxQueryEmbedder(multi_export)
    assert served.default_size == 32 == OnnxEmbedder(multi_export).image_size
    assert OnnxQueryNetwork(multi_export).image_size == 32
    assert served.sizes == (24, 32, 40)
    assert OnnxQueryEmbedder(multi_export, 40).default_size == 40


def test_serve_onnx_runs_onnxruntime_on_the_serving_threads(indexed_synth_world, tmp_path):
    """`raml serve --onnx FILE --threads N`: the onnxruntime session has N intra-op threads and does not spin."""
    pytest.importorskip("faiss")
    from raml.cli.main import build_parser
    from raml.cli.serve import build_service
    from raml.deploy.service.embedders import use_serving_threads

    world = indexed_synth_world(32)
    onnx_file = tmp_path / "student.onnx"
    export_onnx(load_network(world["nets"]["student"], device="cpu"), 32, onnx_file, exporter="torchscript")
    for threads in (2, 1):
        args = build_parser().parse_args(
            ["serve", "--index", str(world["index"]), "--onnx", str(onnx_file), "--threads", str(threads)]
        )
        use_serving_threads(args.threads)  # what run_serve does before build_service
        embedder = build_service(args).embedder
        options = embedder._model.session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert embedder.describe()["threads"] == threads  # /health says it
