"""How the forward runs at extraction (issue 21, items 2 and 3): ``--cpu-runtime`` (PyTorch or the checked
fp32 onnxruntime graph) on ``raml extract`` / ``raml test`` / ``raml index``, and ``raml index --bf16`` with the
semantics of ``raml extract --bf16``; on tiny networks and images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raml.cli.main import main
from raml.models import build_network, save_checkpoint
from raml.models.onnx_forward import AUTO_WARMUP_PIXELS, OrtForward
from raml.retrieval.extract import Bf16Forward, extract_embeddings, inference_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def _network(whitening: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network("timm/test_resnet", pooling="gem", whitening=whitening, pretrained=False).eval()


def _checkpoint(folder: Path, name: str, seed: int) -> Path:
    path = folder / f"{name}.pth"
    save_checkpoint(path, _network(seed=seed))
    return path


def test_extract_embeddings_through_onnxruntime_equal_pytorchs(tmp_path: Path, image_factory) -> None:
    paths = [image_factory(tmp_path / f"{i}.png", color=(40 * i, 90, 200 - 30 * i), size=(50, 40)) for i in range(5)]
    for net, scales in ((_network(), (1.0,)), (_network(whitening=0), (1.0, 0.75))):  # GeM power read through
        torch_rows = extract_embeddings(net, paths, 40, CPU, batch_size=2, progress=False, scales=scales)
        ort = inference_network(net, CPU, "fp32", "onnxruntime")
        ort_rows = extract_embeddings(ort, paths, 40, CPU, batch_size=2, progress=False, scales=scales)
        torch.testing.assert_close(ort_rows, torch_rows, rtol=0, atol=1e-5)
        assert len(ort.checks) == len(scales)  # one graph per size the scales make
        assert not net.training


def test_inference_network_chooses_the_forward() -> None:
    net = _network()
    assert inference_network(net, CPU, "fp32", "torch") is net
    assert inference_network(net, torch.device("cuda"), "fp32", "auto") is net  # a GPU runs PyTorch
    auto = inference_network(net, CPU, "fp32", "auto")
    assert isinstance(auto, OrtForward) and not auto.strict and auto.warmup_pixels == AUTO_WARMUP_PIXELS
    strict = inference_network(net, CPU, "fp32", "onnxruntime")
    assert isinstance(strict, OrtForward) and strict.strict and strict.warmup_pixels == 0
    assert inference_network(auto, CPU, "fp32", "auto") is auto  # already wrapped
    low = inference_network(net, CPU, "bf16", "auto")
    assert isinstance(low, Bf16Forward) and low.network is net
    parameterless = torch.nn.Identity()
    assert inference_network(parameterless, CPU, "fp32", "onnxruntime") is parameterless
    with pytest.raises(ValueError, match="runtime must be one of auto, onnxruntime, torch, got 'ort'"):
        inference_network(net, CPU, "fp32", "ort")


def test_bf16_over_onnxruntime_is_bf16_autocast_of_the_network() -> None:
    net = _network()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 path written plainly
        plain = F.normalize(net(images.contiguous(memory_format=torch.channels_last)).float(), dim=1)
    with torch.inference_mode():
        got = inference_network(inference_network(net, CPU, "fp32", "onnxruntime"), CPU, "bf16")(images)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)


def _cli_extract(root: Path, net: Path, out: Path, *extra: str) -> np.ndarray:
    base = ["extract", "--network-path", str(net), "--dataset", "cub-test", "--data-root", str(root)]
    code = main([*base, "--image-size", "32", "--output", str(out), "--workers", "0", "--no-progress", *extra])
    assert code == 0
    return np.load(out)


def test_raml_extract_and_test_give_the_same_results_with_either_runtime(cub_root: Path, tmp_path: Path) -> None:
    student, teacher = _checkpoint(tmp_path, "student", 1), _checkpoint(tmp_path, "teacher", 0)
    common = ["--device", "cpu", "--no-cache"]
    torch_rows = _cli_extract(cub_root, student, tmp_path / "t.npy", *common, "--cpu-runtime", "torch")
    ort_rows = _cli_extract(cub_root, student, tmp_path / "o.npy", *common, "--cpu-runtime", "onnxruntime")
    np.testing.assert_allclose(ort_rows, torch_rows, rtol=0, atol=1e-5)
    results = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / f"{runtime}.json"
        argv = ["test", "--datasets", "cub-test", "--data-root", str(cub_root), "--sym", "--student-path", str(student)]
        argv += ["--teacher-path", str(teacher), "--image-size", "32", "--teacher-image-size", "40", "--workers", "0"]
        assert main([*argv, "--json", str(out), "--no-progress", *common, "--cpu-runtime", runtime]) == 0
        results[runtime] = json.loads(out.read_text())["cub-test"]
    for test in ("asym", "sym"):
        for metric in ("mAP", "R@1", "R@4"):
            assert results["onnxruntime"][test][metric] == pytest.approx(results["torch"][test][metric], abs=1e-3)


def _index(root: Path, net: Path, out: Path, *extra: str) -> int:
    argv = ["index", "--network-path", str(net), "--image-size", "32", "--data-root", str(root), "--dataset"]
    return main([*argv, "cub-test", "--output", str(out), "--workers", "0", "--no-progress", "--device", "cpu", *extra])


def test_raml_index_bf16_embeds_as_raml_extract_bf16(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raml.deploy.store import load_index

    teacher = _checkpoint(tmp_path, "teacher", 0)
    extracted = _cli_extract(cub_root, teacher, tmp_path / "bf16.npy", "--device", "cpu", "--bf16")
    assert _index(cub_root, teacher, tmp_path / "index-bf16", "--bf16") == 0
    assert _index(cub_root, teacher, tmp_path / "index-fp32", "--cpu-runtime", "torch") == 0
    low, full = load_index(tmp_path / "index-bf16"), load_index(tmp_path / "index-fp32")
    order = [low.paths.index(p) for p in full.paths]
    np.testing.assert_allclose(low.embeddings, extracted, rtol=0, atol=1e-6)
    assert 0 < np.abs(low.embeddings[order] - full.embeddings).max() < 0.05  # bf16: close to fp32, not equal
    # the Ray engine builds its own network from the checkpoint: --bf16 is refused there, before any work
    with pytest.raises(SystemExit, match="--bf16 runs with --engine local"):
        _index(cub_root, teacher, tmp_path / "index-ray", "--bf16", "--engine", "ray")
    assert not (tmp_path / "index-ray").exists()


def test_extract_embeddings_tells_the_forward_the_jobs_size(tmp_path: Path, image_factory) -> None:
    paths = [image_factory(tmp_path / f"{i}.png", color=(50 * i, 80, 120), size=(50, 40)) for i in range(4)]
    net = _network()
    small = OrtForward(net, warmup_pixels=3 * 40 * 40)  # 4 images < twice the warm-up: never exported
    extract_embeddings(small, paths, 40, CPU, batch_size=1, progress=False)
    assert not small.checks and small._warmup == {(3, 40, 40): 4 * 40 * 40}
    large = OrtForward(net, warmup_pixels=2 * 40 * 40)  # 4 images = twice the warm-up: exported at once
    rows = extract_embeddings(large, paths, 40, CPU, batch_size=1, progress=False, scales=(1.0, 0.5))
    assert set(large.checks) == {(3, 40, 40)} and large._warmup == {(3, 20, 20): 4 * 20 * 20}
    torch.testing.assert_close(rows, extract_embeddings(net, paths, 40, CPU, progress=False, scales=(1.0, 0.5)))
