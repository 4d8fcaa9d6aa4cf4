"""The CUDA code paths, exercised on the CPU (issue 23): bf16 autocast (it exists on the CPU too), DDP in two
gloo processes (the code path NCCL takes; started by torchrun, or with torchrun's variables by the engine
conftest's session pair ``rank_pair``) and the device-selection branches with ``torch.cuda`` patched.

Tiny on purpose: 32 px teacher views, 16 px student views, timm ``test_*`` backbones, 16 training images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import raml.engine.device as device_module
from raml.data.synth import generate_synthetic_dataset
from raml.engine.config import TrainConfig
from raml.engine.trainer import Trainer
from raml.models import build_network, load_checkpoint_file, save_checkpoint

CPU = torch.device("cpu")
DR, QR = 32, 16
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny CUB-format dataset, a random test_resnet checkpoint and a random test_convnext checkpoint."""
    root = tmp_path_factory.mktemp("gpu_paths")
    generate_synthetic_dataset(root / "data" / "cub", num_classes=8, images_per_class=4, image_size=DR, seed=1)
    torch.manual_seed(0)
    resnet = root / "resnet.pth"
    save_checkpoint(resnet, build_network("test_resnet", whitening=16, pretrained=False))
    convnext = root / "convnext.pth"
    save_checkpoint(convnext, build_network("test_convnext", whitening=16, pretrained=False))
    return root / "data", resnet, convnext


def _config(data_root: Path, network: Path, directory: Path, **changes) -> TrainConfig:
    values = dict(
        mode="ts_aug", student_path=str(network), teacher_path=str(network), training_dataset="cub",
        test_datasets=[], data_root=str(data_root), directory=str(directory), image_size=QR,
        teacher_image_size=DR, pos_num=2, batch_size=4, update_every=1, workers=0, val=False, epochs=1,
        lr=1e-3, lam_1=0.5, lam_2=0.5, print_freq=1, save_freq=1,
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ----------------------------------------------------------------------------------------- 1: --amp
@pytest.mark.parametrize("mode", ["ts_aug", "csd", "d3"])
def test_amp_runs_the_student_in_bf16_and_every_loss_in_fp32(setup, tmp_path, monkeypatch, mode):
    """Under --amp the loss equals the fp32 loss of the same embeddings (bf16 similarities would be off by
    ~1e-3); the student's forward ran under autocast, the teacher's did not (its targets are fp32)."""
    data_root, resnet, _ = setup
    monkeypatch.setattr(device_module, "AMP_DEVICE_TYPES", ("cuda", "cpu"))  # the CUDA path, on the CPU
    trainer = Trainer(_config(data_root, resnet, tmp_path / mode, mode=mode, amp=True), CPU, progress=False)
    assert trainer.amp
    autocast_seen: dict[str, list[bool]] = {"student": [], "teacher": []}
    trainer.student.register_forward_hook(lambda *_: autocast_seen["student"].append(torch.is_autocast_enabled("cpu")))
    trainer.teacher.network.register_forward_hook(
        lambda *_: autocast_seen["teacher"].append(torch.is_autocast_enabled("cpu"))
    )
    method = trainer.method
    embeddings, losses = [], []
    view_embeddings, batch_loss = method.view_embeddings, trainer._batch_loss

    def recording_views(batch, generator):
        student, teacher = view_embeddings(batch, generator)
        embeddings.append((student.detach().clone(), teacher.detach().clone()))
        return student, teacher

    def recording_loss(batch, generator):
        result = batch_loss(batch, generator)
        losses.append(result.loss.detach().clone())
        return result

    monkeypatch.setattr(method, "view_embeddings", recording_views)
    monkeypatch.setattr(trainer, "_batch_loss", recording_loss)
    # The CPU's bf16 convolution backward (oneDNN; this emulates the CUDA path) gives NaN weight gradients in
    # layer4 of test_resnet here (finite when the same tensors go through torch.nn.grad.conv2d_weight, in bf16
    # or fp32), which the non-finite gradient check (raml.engine.guard) rightly stops on; this test is about
    # the forward's dtypes, so that check is off here.
    monkeypatch.setattr(trainer, "_mark_nonfinite_gradients", lambda *args: None)
    trainer.train_epoch(1)
    assert len(losses) == trainer.batches_per_epoch == 4
    assert autocast_seen["student"] and all(autocast_seen["student"])
    assert autocast_seen["teacher"] and not any(autocast_seen["teacher"])
    for (student, teacher), loss in zip(embeddings, losses, strict=True):
        assert student.dtype == teacher.dtype == loss.dtype == torch.float32
        # the same method's loss of the same embeddings, with autocast nowhere in sight
        monkeypatch.setattr(method, "view_embeddings", lambda *_, s=student, t=teacher: (s, t))
        assert not torch.is_autocast_enabled("cpu")
        expected = method.batch_loss(None, torch.Generator()).loss
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_amp_is_off_on_the_cpu_and_refused_on_gpus_without_native_bf16(monkeypatch):
    assert device_module.amp_active(True, CPU) is False  # --amp on the CPU: fp32, with a log line
    assert device_module.amp_active(False, torch.device("cuda", 0)) is False
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 0))
    with pytest.raises(ValueError, match=r"Tesla V100.*compute capability 7\.0.*without --amp"):
        device_module.amp_active(True, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))  # A100
    assert device_module.amp_active(True, torch.device("cuda", 0)) is True


# ------------------------------------------------------------------------- 2: timm students under DDP
def test_timm_backbone_has_no_trainable_parameter_outside_forward_features():
    """ConvNeXt's head norm (and other heads timm keeps with num_classes=0) would make DDP wait forever for
    their gradients; they are frozen, so every trainable parameter gets a gradient from one forward."""
    network = build_network("test_convnext", whitening=16, pretrained=False)
    assert "backbone.model.head.norm.weight" in dict(network.named_parameters())  # checkpoints keep the keys
    network(torch.rand(2, 3, DR, DR)).sum().backward()
    missing = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_convnext_student_trains_in_two_gloo_processes_like_one(setup, tmp_path, rank_pair):
    data_root, _, convnext = setup
    # the student from a checkpoint: a random --student ARCH would start from each process's own random state
    args = ["train", "--mode", "ts_aug", "--student-path", str(convnext), "--teacher-path", str(convnext),
            "--training-dataset", "cub", "--test-datasets", "", "--data-root", str(data_root),
            "--image-size", "32", "--teacher-image-size", "64", "--pos-num", "2", "--batch-size", "4",
            "--update-every", "1", "--optimizer", "sgd", "--lr", "0.05", "--workers", "0", "--no-val",
            "--epochs", "1", "--device", "cpu", "--no-progress"]  # fmt: skip
    from raml.cli.main import main

    assert main([*args, "--directory", str(tmp_path / "one")]) == 0
    # "Expected to have finished reduction in the prior iteration" came on the second batch; the session's two
    # ranks with torchrun's variables (tests/engine/conftest.py; the real torchrun launch of `-m raml` is tested by
    # test_reliability.py::test_extraction_shards_over_two_gloo_processes)
    result = rank_pair.run(["-m", "raml", *args, "--directory", str(tmp_path / "two")], _env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_checkpoint_file(tmp_path / "one" / "model_best.pth.tar")["state_dict"]
    two = load_checkpoint_file(tmp_path / "two" / "model_best.pth.tar")["state_dict"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0, msg=key)


# ------------------------------------------------------ 3, 4: non-finite loss on one rank; no_sync
def _scenario(
    name: str, config: TrainConfig, out: Path, rank_pair: Any, timeout: float = 300
) -> list[dict]:  # conftest's RankPair
    out.mkdir()
    config_file = out / "config.json"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    # the session's two ranks with torchrun's variables, without its launcher process (tests/engine/conftest.py)
    result = rank_pair.run([str(HERE / "ddp_scenarios.py"), name, str(config_file), str(out)], _env(), timeout=timeout)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(reports) == 2, f"a rank wrote no report (rc {result.returncode}): {result.stderr[-3000:]}"
    return reports


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_error(setup, tmp_path, rank_pair):
    data_root, resnet, _ = setup
    config = _config(data_root, resnet, tmp_path / "run", epochs=2)
    reports = _scenario("nan", config, tmp_path / "out", rank_pair)
    for report in reports:  # rank 0's loss was finite; it must stop too, not wait in an all-reduce
        assert report["outcome"] == "NonFiniteLossError", report
        assert "epoch 1, batch 2" in report["message"]
    # nothing of the bad batch reached the weights: the only checkpoint is none (epoch 1 never finished)
    assert not (tmp_path / "run" / "model_last.pth.tar").exists()


@pytest.mark.parametrize("scenario, when", [("signal_in_batch", "during epoch 1"), ("signal_in_save", "after epoch 1")])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_point(setup, tmp_path, rank_pair, scenario, when):
    """SIGTERM that reaches rank 1 only (torchrun forwards a signal to each worker, but not at the same batch):
    every rank stops at the same point; the one without the signal is not left waiting in an all-reduce."""
    data_root, resnet, _ = setup
    config = _config(data_root, resnet, tmp_path / "run", epochs=2)
    reports = _scenario(scenario, config, tmp_path / "out", rank_pair, timeout=120)
    for report in reports:
        assert report["outcome"] == "TrainingInterrupted", report
        origin = "this process" if report["rank"] == 1 else "another process"
        assert f"Stopped by signal {int(signal.SIGTERM)} (received by {origin} of 2) {when}" in report["message"]
    run = tmp_path / "run"
    if scenario == "signal_in_batch":  # rank 0 wrote the weights of the batch both stopped after
        assert (run / "model_interrupted.pth.tar").is_file() and not (run / "model_last.pth.tar").exists()
    else:  # epoch 1 finished and was saved; nothing more to save
        assert (run / "model_last.pth.tar").is_file() and not (run / "model_interrupted.pth.tar").exists()
        assert not (run / "model_epoch2.pth.tar").exists()


@pytest.mark.parametrize("update_every, flush", [(2, False), (3, True)])
def test_gradients_are_all_reduced_once_per_optimizer_step(setup, tmp_path, update_every, flush, rank_pair):
    data_root, resnet, _ = setup
    # 16 images, batches of 4 -> 4 batches per epoch -> 2 optimizer steps: update-every 2, or update-every 3
    # and the last (flushed) batch, which must be all-reduced too
    config = _config(data_root, resnet, tmp_path / "two", update_every=update_every, flush_accumulation=flush,
                     epochs=1, optimizer="sgd", lr=0.05)  # fmt: skip
    reports = _scenario("count", config, tmp_path / "out", rank_pair)
    for report in reports:
        assert report["batches"] == 4 and report["steps"] == 2, report
        assert report["reduces"] == report["steps"], report  # was one per batch (4)
    # the accumulated gradients are still the sum over both processes' images: the same weights as one process
    single = dataclasses.replace(config, directory=str(tmp_path / "one"))
    Trainer(single, CPU, progress=False).run()
    one = load_checkpoint_file(tmp_path / "one" / "model_last.pth.tar")["state_dict"]
    two = load_checkpoint_file(tmp_path / "two" / "model_last.pth.tar")["state_dict"]
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0, msg=key)


# --------------------------------------------------------------- 7, 9, 10: the entry point's CUDA settings
class _Stop(Exception):
    """Raised by the fake Trainer: the test ends where training would start on the (absent) GPU."""


@pytest.fixture
def fake_two_gpus(monkeypatch):
    """torch.cuda patched to show two GPUs of the given capability; records set_device; no Trainer runs."""
    import raml.engine.trainer as trainer_module

    calls: dict[str, list] = {"set_device": [], "trainer": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(torch.device(device)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def fake_trainer(config, device, **kwargs):
        calls["trainer"].append((device, kwargs.get("teacher_device")))
        raise _Stop

    monkeypatch.setattr(trainer_module, "Trainer", fake_trainer)
    return calls


def _cli_args(data_root: Path, network: Path, directory: Path, *extra: str) -> list[str]:
    return ["train", "--student-path", str(network), "--teacher-path", str(network), "--training-dataset", "cub",
            "--test-datasets", "", "--data-root", str(data_root), "--directory", str(directory), "--image-size",
            str(QR), "--teacher-image-size", str(DR), "--workers", "0", "--no-val", "--no-progress",
            *extra]  # fmt: skip


def test_the_students_gpu_is_made_current_and_cudnn_benchmarks(setup, tmp_path, fake_two_gpus):
    from raml.cli.main import main

    data_root, resnet, _ = setup
    with pytest.raises(_Stop):
        main(_cli_args(data_root, resnet, tmp_path / "run", "-g", "1,0"))
    assert fake_two_gpus["trainer"] == [(torch.device("cuda", 1), torch.device("cuda", 0))]
    assert fake_two_gpus["set_device"] == [torch.device("cuda", 1)]  # not GPU 0, where the teacher is
    assert torch.backends.cudnn.benchmark is True


def test_deterministic_algorithms_keep_cudnn_benchmark_off(setup, tmp_path, fake_two_gpus, monkeypatch):
    from raml.cli.main import main

    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    data_root, resnet, _ = setup
    with pytest.raises(_Stop):
        main(_cli_args(data_root, resnet, tmp_path / "run", "-g", "0"))
    assert torch.backends.cudnn.benchmark is False


def test_amp_on_a_gpu_without_native_bf16_is_refused_before_anything_runs(setup, tmp_path, fake_two_gpus):
    from raml.cli.main import main

    data_root, resnet, _ = setup
    with pytest.raises(SystemExit, match=r"Tesla V100.*compute capability 7\.0.*without --amp"):
        main(_cli_args(data_root, resnet, tmp_path / "run", "-g", "0", "--amp"))
    assert fake_two_gpus["trainer"] == [] and fake_two_gpus["set_device"] == []


# ------------------------------------------------------------------- 12: --optimize frees each trial
def test_each_search_trial_is_freed_before_the_next_starts(setup, tmp_path, monkeypatch):
    """A trial's trainer (networks, optimizer state) is gone when the next trial starts, even with the cyclic
    garbage collector off (on a GPU its memory would otherwise stay held)."""
    import gc
    import weakref

    import raml.engine.search as search_module

    data_root, resnet, _ = setup
    trainers: list[weakref.ref] = []
    alive_at_start: list[int] = []

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            alive_at_start.append(sum(ref() is not None for ref in trainers))
            super().__init__(*args, **kwargs)
            trainers.append(weakref.ref(self))

    monkeypatch.setattr(search_module, "Trainer", RecordingTrainer)
    config = _config(data_root, resnet, tmp_path / "search", optimize=True, trials=2, epochs=1, val_freq=1)
    gc.disable()
    try:
        search_module.search(config, CPU, progress=False)
    finally:
        gc.enable()
    assert alive_at_start == [0, 0]


# ------------------------------------------------------------- 5: no host-device sync in a batch's views
def test_a_batchs_views_never_read_a_value_back_from_the_device(setup, tmp_path, monkeypatch):
    """The meta device holds no values: any read-back (``.item()``, ``bool()`` of a device tensor, such as the
    mixup weights' range check after ``.to(device)``) fails there. The views must come through it."""
    data_root, resnet, _ = setup
    trainer = Trainer(_config(data_root, resnet, tmp_path / "run"), CPU, progress=False)
    generator = torch.Generator().manual_seed(0)
    batch = next(iter(trainer.method.epoch_batches(1, generator)))
    monkeypatch.setattr(trainer, "device", torch.device("meta"))
    monkeypatch.setattr(trainer, "teacher_device", torch.device("meta"))
    student, teacher = trainer.method._views(batch, generator)
    assert student.device.type == teacher.device.type == "meta"
    assert student.shape == (4, 2, 3, QR, QR) and teacher.shape == (4, 2, 3, DR, DR)


def test_the_logged_terms_stay_on_the_device(setup, tmp_path):
    """A batch's logged terms are detached device tensors, summed by the trainer without ``.item()``."""
    data_root, resnet, _ = setup
    for mode in ("ts_aug", "csd"):
        trainer = Trainer(_config(data_root, resnet, tmp_path / mode, mode=mode), CPU, progress=False)
        generator = torch.Generator().manual_seed(0)
        batch = next(iter(trainer.method.epoch_batches(1, generator)))
        result = trainer._batch_loss(batch, generator)
        assert result.terms and all(torch.is_tensor(v) and not v.requires_grad for v in result.terms.values())
        torch.testing.assert_close(result.terms["loss"], result.loss.detach())


# ----------------------------------------------------------- 6: teacher views straight to the teacher's GPU
@pytest.mark.parametrize("mixup", ["dataset", "batch", "none"])
def test_teacher_views_go_straight_to_the_teachers_device(setup, tmp_path, monkeypatch, mixup):
    """With -g 0,1 the uint8 teacher views (and partners) go to the teacher's device and are mixed there; the
    student's device never holds them. The teacher's device is played by the meta device here."""
    data_root, resnet, _ = setup
    changes = {"mixup": False} if mixup == "none" else {"mixup_partner": mixup}
    trainer = Trainer(_config(data_root, resnet, tmp_path / "run", **changes), CPU, progress=False)
    generator = torch.Generator().manual_seed(0)
    batch = next(iter(trainer.method.epoch_batches(1, generator)))
    moved_to: list[str] = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.dim() == 5 and self.shape[-1] == DR:  # a teacher-resolution tensor
            moved_to.append(f"{out.device.type}:{out.dtype}")
        return out

    monkeypatch.setattr(trainer, "teacher_device", torch.device("meta"))
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    student, teacher = trainer.method._views(batch, generator)
    monkeypatch.undo()
    assert student.device == CPU and teacher.device.type == "meta"
    assert student.shape == (4, 2, 3, QR, QR) and teacher.shape == (4, 2, 3, DR, DR)
    assert moved_to and moved_to[0] == "meta:torch.uint8"  # the first move is of the uint8 views, to the teacher
    assert not any(entry.startswith("cpu:torch.float") for entry in moved_to)


# ------------------------------------------------------------ 8: under DDP rank 0 scores, the others receive
def test_under_ddp_only_rank_0_scores_and_every_rank_gets_its_metrics(setup, tmp_path, rank_pair):
    data_root, resnet, _ = setup
    # the reference's protocol: the test split monitored after the epoch, then the final test (asym + sym)
    config = _config(data_root, resnet, tmp_path / "run", val=True, val_freq=1, test_datasets=["cub-test"])
    reports = {report["rank"]: report for report in _scenario("eval", config, tmp_path / "out", rank_pair)}
    assert reports[1]["scored"] == []  # rank 1 embedded its shard but scored nothing
    assert len(reports[0]["scored"]) == 3  # monitoring (asym) + test (asym, sym), on rank 0's device
    for h0, h1 in zip(reports[0]["history"], reports[1]["history"], strict=True):
        h0.pop("seconds"), h1.pop("seconds")  # each process's own clock
        assert h0 == h1
    assert reports[0]["test"] == reports[1]["test"]
    assert {"asym", "sym"} <= set(reports[0]["test"]["cub-test"])
    assert "monitor_cub-test_mAP" in reports[0]["history"][0]
