"""benchmarks/gpu_check.py (issue 23, item 13): without CUDA it says so and exits 0; ``--device cpu --tiny``
runs every part at toy sizes (the figures mean nothing; the report's shape and consistency are checked)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_without_cuda_it_says_so_and_exits_0(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing run, nothing written


def test_tiny_cpu_run_reports_every_part(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    settings = report["settings"]
    assert [row["amp"] for row in report["training"]] == [False, True]
    for row in report["training"]:
        assert row["amp_active"] is False  # --amp is off on the CPU
        assert row["batches_measured"] >= settings["steps"]
        assert row["images_per_s"] > 0 and row["views_per_s"] == pytest.approx(
            row["images_per_s"] * settings["pos_num"], rel=1e-3
        )
        assert 0.0 < row["loader_wait_share"] < 1.0
    assert report["ddp"] == {"skipped": "fewer than two CUDA devices"}
    evaluation = report["evaluation"]
    assert evaluation["equal"] and evaluation["max_metric_difference"] == 0.0  # the CPU against itself here
    assert 0.0 <= evaluation["metrics"]["mAP"] <= 100.0
    assert {(r["role"], r["image_size"], r["batch_size"]) for r in report["latency"]} == {
        (role, size, batch)
        for role, size in (("student", settings["image_size"]), ("teacher", settings["teacher_image_size"]))
        for batch in settings["latency_batches"]
    }
    graph = report["service_graph"]
    assert graph["graph_sizes"] == [settings["image_size"]]  # kept on the CPU: equal bit for bit
    assert graph["service_ms_batch32"] > 0 and graph["eager_ms_batch32"] > 0
    out = capsys.readouterr().out
    assert "ts_aug --amp" in out and "exact evaluation" in out and "| teacher |" in out
    assert "trace kept" in out


def test_a_refused_amp_run_is_reported_not_fatal(gpu_check, monkeypatch):
    """On a GPU without native bf16 the --amp row says why it was refused; the rest of the report goes on."""

    def measure(settings, data_root, network, work, device, amp):
        if amp:
            raise ValueError("--amp trains in bf16, which Tesla T4 (compute capability 7.5) does not support")
        return {"amp": False, "amp_active": False, "images_per_s": 1.0, "views_per_s": 2.0,
                "loader_wait_share": 0.5, "peak_memory_gib": None}  # fmt: skip

    monkeypatch.setattr(gpu_check, "prepare_data", lambda settings, work: (work, work / "net.pth"))
    monkeypatch.setattr(gpu_check, "measure_training", measure)
    monkeypatch.setattr(gpu_check, "measure_evaluation", lambda settings, device: {"skipped": True})
    monkeypatch.setattr(gpu_check, "measure_latency", lambda settings, network, device: [])
    monkeypatch.setattr(gpu_check, "measure_service_graph", lambda settings, network, device: {})
    report = gpu_check.run_check(gpu_check.TINY, torch.device("cpu"), Path("/nonexistent"))
    assert report["training"][0]["amp"] is False and "images_per_s" in report["training"][0]
    assert "Tesla T4" in report["training"][1]["refused"]


def test_data_of_other_settings_in_the_same_folder_is_not_reused(gpu_check, tmp_path):
    """A full run after a --tiny run into the same --out measures data of its own sizes, not the tiny data."""
    from PIL import Image

    from raml.data.splits import get_split

    tiny = dataclasses.replace(gpu_check.TINY, num_classes=4, images_per_class=2, source_size=16)
    gpu_check.prepare_data(tiny, tmp_path)
    other = dataclasses.replace(tiny, num_classes=6, images_per_class=3, source_size=24)
    for settings in (other, tiny):  # and the first folder is still the tiny one
        data_root, network = gpu_check.prepare_data(settings, tmp_path)
        split = get_split("cub-trainval", str(data_root), 0.0)
        classes = settings.num_classes // 2  # trainval: the first half of the classes
        assert (split.num_classes, len(split)) == (classes, classes * settings.images_per_class)
        with Image.open(split.abspaths()[0]) as image:
            assert image.size == (settings.source_size, settings.source_size)
        assert network.exists()


@pytest.mark.parametrize(
    ("device", "available", "count", "message"),
    [
        ("cuda", False, 0, "--device cuda: no CUDA device is usable here"),
        ("cuda:1", True, 1, "--device cuda:1: only 1 CUDA device(s) are visible (cuda:0 to cuda:0)"),
        ("gpu", True, 1, "--device 'gpu' is not a device"),
        ("meta", True, 1, "gpu_check runs on CUDA or the CPU"),
    ],
)
def test_an_unusable_device_is_one_line_and_exit_2(
    gpu_check, monkeypatch, tmp_path, capsys, device, available, count, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main(["--device", device, "--tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing run, nothing written


def test_a_failing_part_is_recorded_and_the_others_are_kept_in_the_json(gpu_check, monkeypatch, tmp_path, capsys):
    """A GPU session's minutes are counted: one part that fails (or a time-out of the torchrun part) must not lose
    the others' figures; the JSON is written after each part."""
    seen_on_disk: list[list[str]] = []
    real_write = gpu_check.atomic_write_text

    def recording_write(path, text):  # noqa: ANN001
        seen_on_disk.append(sorted(json.loads(text)))
        real_write(path, text)

    def failing_evaluation(settings, device):  # noqa: ANN001
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "atomic_write_text", recording_write)
    monkeypatch.setattr(gpu_check, "measure_evaluation", failing_evaluation)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["evaluation"] == {"failed": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert report["latency"] and report["service_graph"]["service_ms_batch32"] > 0  # the parts after it ran
    assert len(seen_on_disk) >= 6 and "training" in seen_on_disk[0]  # saved part by part, from the first
    assert "exact evaluation: failed: RuntimeError" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("capability", "conv", "matmul", "label"),
    [
        ((9, 0), True, False, "fp32 (TF32 convs)"),  # an H100 at PyTorch's defaults
        ((9, 0), True, True, "fp32 (TF32 convs, TF32 matmuls)"),
        ((9, 0), False, False, "fp32"),
        ((7, 5), True, True, "fp32"),  # a T4: no TF32 whatever the switches say
    ],
)
def test_fp32_rows_say_where_tf32_was_used(gpu_check, monkeypatch, capability, conv, matmul, label):
    """On Ampere and later, PyTorch's default lets cuDNN convolve float32 in TF32: the "fp32" rows must say so."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # properties: no monkeypatch
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
        tf32 = gpu_check.tf32_settings(torch.device("cuda"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert tf32["gpu_has_tf32"] is (capability[0] >= 8)
    report = {
        "device_name": "GPU", "torch": torch.__version__, "cuda": "12", "tf32": tf32,
        "training": [{"amp": False, "refused": "x"}], "ddp": {"skipped": "one GPU"},
        "evaluation": {"failed": "x"}, "latency": {"failed": "x"},
    }  # fmt: skip
    out = gpu_check.format_report(report)
    assert f"| ts_aug {label} |" in out and f"| torchrun x2 ({label}) |" in out
    assert gpu_check.tf32_settings(torch.device("cpu")) is None
