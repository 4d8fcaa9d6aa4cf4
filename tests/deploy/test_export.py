"""``raml export``: ONNX and TorchScript exports match PyTorch within 1e-4 on the CPU, carry their
preprocessing, and a failed export writes nothing; ``raml search --onnx`` agrees with PyTorch search."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from raml.cli import main as cli_main
from raml.data import EvalTransform, load_image
from raml.deploy import ParityError, export_onnx, export_torchscript, read_sidecar, sidecar_path
from raml.deploy import export as export_module
from raml.models import checkpoint_sha256, load_network

REPO_IMAGES = 6


def _write_images(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def nets(tmp_path_factory, random_network) -> dict:
    """A resnet18 (GeM, 16-d whitening) and a timm test_resnet checkpoint (seed 0), and a folder of real images."""
    base = tmp_path_factory.mktemp("export")
    out = {"base": base, "images": base / "images"}
    _write_images(out["images"], REPO_IMAGES)
    for name, arch in (("resnet", "resnet18"), ("timm", "timm/test_resnet")):
        out[name] = random_network(arch, 16, 0)
    return out


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnx_and_torchscript_match_pytorch_with_sidecars(nets, tmp_path, capsys):
    onnx_file, ts_file, report = tmp_path / "student.onnx", tmp_path / "student.pt", tmp_path / "report.json"
    code = cli_main.main(
        [
            "export",
            "--network-path",
            str(nets["resnet"]),
            "--image-size",
            "32",
            "--output",
            str(onnx_file),
            "--torchscript",
            str(ts_file),
            "--images",
            str(nets["images"]),
            "--json",
            str(report),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "max abs difference" in out and "onnx" in out and "torchscript" in out
    reports = json.loads(report.read_text())
    assert [r["kind"] for r in reports] == ["onnx", "torchscript"]
    # written where asked (each first staged in a hidden folder next to it, removed once moved into place)
    assert [(r["path"], r["sidecar"]) for r in reports] == [
        (str(f), str(sidecar_path(f))) for f in (onnx_file, ts_file)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.json",
        "student.onnx",
        "student.onnx.json",
        "student.pt",
        "student.pt.json",
    ]
    for r in reports:
        assert r["max_abs_diff_random"] <= 1e-4 and r["max_abs_diff_images"] <= 1e-4 and r["num_images"] == REPO_IMAGES

    network = load_network(nets["resnet"])
    sidecar = read_sidecar(onnx_file)
    assert sidecar["image_size"] == 32 and sidecar["dynamic_size"] is False and sidecar["output_dim"] == 16
    assert sidecar["mean"] == pytest.approx(list(network.mean)) and sidecar["std"] == pytest.approx(list(network.std))
    assert sidecar["resize"]["shorter_side"] == pytest.approx(32 * 8 / 7) and sidecar["resize"]["filter"] == "lanczos"
    assert sidecar["network"]["sha256"] == checkpoint_sha256(nets["resnet"])
    assert sidecar["opset"] >= 17 and sidecar_path(ts_file).is_file()

    # Independent check: feed real images preprocessed from the sidecar alone, with a new batch size.
    transform = EvalTransform(sidecar["image_size"], sidecar["mean"], sidecar["std"])
    batch = torch.stack([transform(load_image(p)) for p in sorted(nets["images"].iterdir())[:3]])
    with torch.no_grad():
        reference = network(batch).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape][1:] == [3, 32, 32]
    onnx_out = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert np.abs(onnx_out - reference).max() <= 1e-4
    traced = torch.jit.load(str(ts_file))
    with torch.no_grad():
        assert np.abs(traced(batch).numpy() - reference).max() <= 1e-4


def test_a_failure_in_the_second_file_leaves_the_first_files_earlier_version(nets, tmp_path, monkeypatch, capsys):
    """--output and --torchscript: nothing replaces an existing file until both exports have passed their checks."""
    onnx_file, ts_file = tmp_path / "student.onnx", tmp_path / "student.pt"
    first = ["export", "--network-path", str(nets["resnet"]), "--image-size", "32", "--images", str(nets["images"])]
    assert cli_main.main([*first, "--output", str(onnx_file)]) == 0
    os.chmod(onnx_file, 0o640)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_trace(*args, **kwargs):
        raise ParityError("the traced network differs (forced by the test)")

    monkeypatch.setattr(export_module, "export_torchscript", failing_trace)
    again = ["export", "--network-path", str(nets["timm"]), "--image-size", "32", "--overwrite"]
    assert cli_main.main([*again, "--output", str(onnx_file), "--torchscript", str(ts_file)]) == 2
    assert "raml export: error: the traced network differs (forced by the test)" in capsys.readouterr().err
    # the ONNX export of the other network passed its check, but the first export's files are untouched
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert cli_main.main([*again, "--output", str(onnx_file), "--torchscript", str(ts_file)]) == 0
    assert onnx_file.read_bytes() != before["student.onnx"] and read_sidecar(onnx_file)["network"]["sha256"] == (
        checkpoint_sha256(nets["timm"])
    )
    assert os.stat(onnx_file).st_mode & 0o777 == 0o640  # the replaced file's permission bits are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "student.pt", "student.pt.json"])


def test_timm_model_with_dynamic_size(nets, tmp_path):
    network = load_network(nets["timm"])
    report = export_onnx(network, 32, tmp_path / "timm.onnx", dynamic_size=True, exporter="torchscript")
    assert report.max_abs_diff <= 1e-4 and [3, 3, 40, 56] in report.checked_shapes
    session = ort.InferenceSession(str(tmp_path / "timm.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 40, 64)
    with torch.no_grad():
        reference = network(x).numpy()
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - reference).max() <= 1e-4
    assert read_sidecar(tmp_path / "timm.onnx")["dynamic_size"] is True
    ts = export_torchscript(network, 32, tmp_path / "timm.pt")
    assert ts.max_abs_diff <= 1e-4


def test_parity_failure_writes_nothing_and_keeps_the_previous_file(nets, tmp_path, monkeypatch, capsys):
    onnx_file = tmp_path / "student.onnx"
    onnx_file.write_bytes(b"previous export")
    real_runner = export_module._onnx_runner

    def drifting_runner(path):
        run = real_runner(path)
        return lambda batch: run(batch) + 1e-3

    monkeypatch.setattr(export_module, "_onnx_runner", drifting_runner)
    argv = ["export", "--network-path", str(nets["resnet"]), "--image-size", "32", "--output", str(onnx_file)]
    code = cli_main.main([*argv, "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert "exceeds the tolerance 0.0001" in err and "nothing was written" in err
    assert onnx_file.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]
    with pytest.raises(ParityError):
        export_onnx(load_network(nets["resnet"]), 32, tmp_path / "other.onnx", exporter="torchscript")
    assert not (tmp_path / "other.onnx").exists()


def test_bad_export_inputs(nets, tmp_path, capsys):
    network = ["export", "--network-path", str(nets["resnet"])]
    with pytest.raises(SystemExit, match="must end in .onnx"):
        cli_main.main([*network, "--output", str(tmp_path / "model.bin")])
    with pytest.raises(SystemExit, match="--output FILE.onnx and/or --torchscript"):
        cli_main.main(network)
    assert cli_main.main([*network, "--output", str(tmp_path / "a.onnx"), "--images", str(tmp_path / "none")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli_main.main([*network, "--output", str(tmp_path / "b.onnx"), "--opset", "11"]) == 2
    assert "opset must be an integer >= 17" in capsys.readouterr().err
    # an opset newer than onnx knows: the dynamo exporter wrote opset 18 and the command exited 0
    assert cli_main.main([*network, "--output", str(tmp_path / "b.onnx"), "--opset", "99"]) == 2
    assert "opset 99 is newer than the installed onnx knows" in capsys.readouterr().err
    code = cli_main.main(
        ["export", "--network-path", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "b.onnx")]
    )
    assert code == 2 and "Unknown network" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_search_through_onnx_matches_pytorch(nets, tmp_path):
    from raml.deploy import index_images, load_index

    teacher = load_network(nets["resnet"])
    images = sorted(str(p) for p in nets["images"].iterdir())
    index_dir = tmp_path / "index"
    index_images(teacher, images, 48, index_dir, checkpoint_sha256(nets["resnet"]))
    onnx_file = tmp_path / "student.onnx"
    export_onnx(teacher, 32, onnx_file, exporter="torchscript", network_sha256=checkpoint_sha256(nets["resnet"]))
    torch_out, onnx_out = tmp_path / "torch.json", tmp_path / "onnx.json"
    common = ["--index", str(index_dir), "--k", "3", "--workers", "0", "--no-progress", *images[:2]]
    assert (
        cli_main.main(
            [
                "search",
                "--network-path",
                str(nets["resnet"]),
                "--image-size",
                "32",
                "--device",
                "cpu",
                "--json",
                str(torch_out),
                *common,
            ]
        )
        == 0
    )
    assert cli_main.main(["search", "--onnx", str(onnx_file), "--json", str(onnx_out), *common]) == 0
    a, b = json.loads(torch_out.read_text()), json.loads(onnx_out.read_text())
    assert [[h["path"] for h in q["results"]] for q in a] == [[h["path"] for h in q["results"]] for q in b]
    for qa, qb in zip(a, b):
        np.testing.assert_allclose([h["score"] for h in qa["results"]], [h["score"] for h in qb["results"]], atol=1e-5)
    assert len(load_index(index_dir)) == REPO_IMAGES
    # a fixed-size export refuses another query size
    assert cli_main.main(["search", "--onnx", str(onnx_file), "--image-size", "64", *common]) == 2


@pytest.mark.slow
def test_dynamo_exporter_matches_pytorch(nets, tmp_path):
    """The torch.export-based exporter (the fallback of --exporter auto) also passes the parity check."""
    report = export_onnx(load_network(nets["timm"]), 32, tmp_path / "d.onnx", dynamic_size=True, exporter="dynamo")
    assert report.exporter == "dynamo" and report.max_abs_diff <= 1e-4
    assert read_sidecar(tmp_path / "d.onnx")["opset"] >= 18
