"""Reliability: bad images fail fast or are skipped, kills and signals lose no finished epoch, non-finite
losses stop the run, and two gloo processes train exactly like one (CPU, tiny backbone, tiny images)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raml.cli.main import main
from raml.data.synth import generate_synthetic_dataset
from raml.engine.config import TrainConfig
from raml.engine.trainer import NonFiniteLossError, Trainer
from raml.models import load_checkpoint_file

CPU = torch.device("cpu")
DR, QR = 32, 16


def _train_args(data_root: Path, teacher: Path, directory: Path, *extra: str) -> list[str]:
    return [
        "train", "--mode", "ts_aug", "--student-path", str(teacher), "--teacher-path", str(teacher),
        "--training-dataset", "cub", "--test-datasets", "", "--data-root", str(data_root),
        "--directory", str(directory), "--image-size", str(QR), "--teacher-image-size", str(DR),
        "--pos-num", "2", "--batch-size", "4", "--update-every", "1", "--lr", "1e-3", "--lam-1", "0.5",
        "--lam-2", "0.5", "--workers", "0", "--no-val", "--save-freq", "1", "--device", "cpu", "--no-progress",
        "--epochs", "3", *extra,
    ]  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(path)["state_dict"]


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol:
            assert torch.allclose(wa[key], wb[key], atol=atol, rtol=0), key
        else:
            assert torch.equal(wa[key], wb[key]), key


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_corrupt_image_fails_first_with_its_name_and_skip_leaves_it_out(tiny_cub, tmp_path, capsys):
    data_root, teacher = tiny_cub
    data = tmp_path / "data"
    generate_synthetic_dataset(data / "cub", num_classes=8, images_per_class=4, image_size=DR, seed=1)
    victim = sorted((data / "cub" / "images").rglob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    run_dir = tmp_path / "run"
    code = main(_train_args(data, teacher, run_dir))
    assert code == 2
    assert victim.name in capsys.readouterr().err
    assert not run_dir.exists()  # it failed before creating anything
    test_victim = sorted((data / "cub" / "images").rglob("*.jpg"))[-1]  # the last class is a test class
    test_victim.write_bytes(b"")
    args = _train_args(data, teacher, run_dir, "--bad-images", "skip", "--epochs", "1")
    args[args.index("--test-datasets") + 1] = "cub-test"
    code = main([*args, "--json", str(tmp_path / "results.json")])
    assert code == 0
    report = (run_dir / "skipped_images_cub-trainval.txt").read_text()  # the training split: train + val
    assert victim.name in report and "truncated" in report.lower()
    assert test_victim.name in (run_dir / "skipped_images_cub-test.txt").read_text()
    assert (run_dir / "model_best.pth.tar").is_file()
    # the final test results state how many images the skipped files cover, as raml test's do
    results = json.loads((tmp_path / "results.json").read_text())
    assert {m["num_skipped_images"] for m in results["cub-test"].values()} == {1}


def test_an_image_too_large_once_resized_at_the_teachers_size_is_a_bad_image_before_epoch_1(tiny_cub, tmp_path, capsys):
    from PIL import Image

    _, teacher = tiny_cub
    data = tmp_path / "data"
    generate_synthetic_dataset(data / "cub", num_classes=8, images_per_class=4, image_size=DR, seed=1)
    victim = sorted((data / "cub" / "images").rglob("*.jpg"))[-1]  # the last class is a test class
    # a PNG under the .jpg name: 100000 x 1 is fine at QR = 16 (1828571 x 18, under 40 M pixels), not at the
    # teacher's DR = 32 (3657143 x 37), where the final test's database is embedded
    Image.new("L", (100_000, 1)).save(victim, format="PNG")
    args = _train_args(data, teacher, tmp_path / "run", "--epochs", "1")
    args[args.index("--test-datasets") + 1] = "cub-test"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "too large once resized" in err and "3657143x37" in err
    assert not (tmp_path / "run").exists()  # refused before epoch 1
    skip = [*args, "--bad-images", "skip"]
    skip[skip.index("--directory") + 1] = str(tmp_path / "skip")
    assert main(skip) == 0
    assert victim.name in (tmp_path / "skip" / "skipped_images_cub-test.txt").read_text()


def test_sigkill_then_resume_last_equals_an_uninterrupted_run(tiny_cub, tmp_path):
    data_root, teacher = tiny_cub
    assert main(_train_args(data_root, teacher, tmp_path / "full")) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "raml", *_train_args(data_root, teacher, killed)]
    proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        # kill -9 as soon as the first epoch's checkpoint is on disk (mid-way through epoch 2)
        while not (killed / "model_epoch1.pth.tar").exists():
            assert proc.poll() is None, "the training process ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for checkpoint in killed.glob("*.pth.tar"):  # whatever the moment of the kill, no target is half-written
        assert load_checkpoint_file(checkpoint)["epoch"] >= 1
    assert main([*_train_args(data_root, teacher, killed), "--resume-student", "last"]) == 0
    assert not list(killed.glob(".*.tmp"))  # a temporary file of the killed write is cleaned up
    _assert_same_weights(tmp_path / "full" / "model_epoch3.pth.tar", killed / "model_epoch3.pth.tar")


def test_sigterm_saves_a_checkpoint_and_stops(tiny_cub, tmp_path):
    data_root, teacher = tiny_cub
    run_dir = tmp_path / "term"
    cmd = [sys.executable, "-m", "raml", *_train_args(data_root, teacher, run_dir, "--epochs", "50")]
    proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "model_last.pth.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--resume-student last" in err
    last = load_checkpoint_file(run_dir / "model_last.pth.tar")["epoch"]
    assert last >= 1
    # the signal lands in a batch (the weights of that moment saved apart) or, on these tiny epochs often, while an
    # epoch's checkpoint is written (the run then stops at that epoch's end: nothing more to save; since cb240da)
    if "during epoch" in err:
        assert f"during epoch {last + 1}" in err and (run_dir / "model_interrupted.pth.tar").is_file()
    else:
        assert f"after epoch {last} (its checkpoint is saved)" in err
        assert not (run_dir / "model_interrupted.pth.tar").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cub, tmp_path, monkeypatch):
    data_root, teacher = tiny_cub
    config = TrainConfig(
        mode="ts_aug", student_path=str(teacher), teacher_path=str(teacher), training_dataset="cub",
        test_datasets=[], data_root=str(data_root), directory=str(tmp_path / "nan"), image_size=QR,
        teacher_image_size=DR, pos_num=2, batch_size=4, update_every=1, workers=0, val=False, epochs=3,
    )  # fmt: skip
    trainer = Trainer(config, CPU, progress=False)
    original = trainer._batch_loss

    def poisoned(batch, generator):
        result = original(batch, generator)
        if trainer.history:  # from epoch 2 on
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer, "_batch_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        trainer.run()
    last = load_checkpoint_file(tmp_path / "nan" / "model_last.pth.tar")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ts_aug", "ts_aug-batch", "sym", "sym-triplet"])
def test_two_gloo_processes_equal_one_process(tiny_cub, tmp_path, mode, rank_pair):
    data_root, teacher = tiny_cub
    # SGD: its step is linear in the gradient, so float summation-order noise stays noise (Adam divides by
    # the gradient's own scale and turns noise on near-zero gradients into full-size steps)
    extra = ["--epochs", "2", "--optimizer", "sgd", "--lr", "0.05"]
    if mode == "ts_aug-batch":  # mixup partners from the global batch, gathered over the processes
        extra += ["--mixup-partner", "batch"]
    if mode.startswith("sym"):
        loss = "triplet" if mode == "sym-triplet" else "normsoftmax"
        # triplet: the pool is embedded in shards and gathered, negatives mined from it on every process
        extra += ["--mode", "sym", "--loss", loss, "--image-size", str(DR), "--teacher-image-size", str(DR),
                  "--batch-size", "8", "--neg-num", "2", "--pool-size", "16"]  # fmt: skip
    single = tmp_path / "single"
    assert main([*_train_args(data_root, teacher, single), *extra]) == 0
    double = tmp_path / "double"
    # the session's two ranks with torchrun's variables, without its launcher process (tests/engine/conftest.py)
    result = rank_pair.run(["-m", "raml", *_train_args(data_root, teacher, double), *extra], _subprocess_env(), 600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_weights(single / "model_epoch2.pth.tar", double / "model_epoch2.pth.tar", atol=1e-5)


def test_extraction_shards_over_two_gloo_processes(tiny_cub, tmp_path):
    data_root, teacher = tiny_cub
    args = ["extract", "--network-path", str(teacher), "--dataset", "cub-test", "--data-root", str(data_root),
            "--image-size", str(DR), "--workers", "0", "--device", "cpu", "--no-progress", "--no-cache"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "one.npy")]) == 0
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "raml", *args, "--output", str(tmp_path / "two.npy"),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import numpy as np

    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == two.shape == (16, 16)  # 4 test classes x 4 images, 16-d
    np.testing.assert_allclose(one, two, atol=1e-5)
