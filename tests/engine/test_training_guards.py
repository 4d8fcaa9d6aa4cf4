"""What keeps a run's outputs trustworthy when something goes wrong: non-finite gradients or weights under a
finite loss, a full disk while a checkpoint is written, a signal after the batch loop, and a second run into
the same folder. Tiny runs of the machinery teacher (timm's test_resnet), one or two epochs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from raml import utils
from raml.cli.main import _user_errors
from raml.engine.guard import gradients_finite
from raml.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from raml.locking import LOCK_NAME, LockHeldError
from raml.models import load_checkpoint_file
from raml.utils import atomic_torch_save

CPU = torch.device("cpu")


def _config(machinery, teacher, directory, **changes):
    values = dict(epochs=2, val=False, test_datasets=[], query_size=8, update_every=1, save_freq=1)
    values.update(changes)
    return machinery.distill_config(directory, teacher, **values)


def _all_finite(path) -> bool:
    state = load_checkpoint_file(path)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nan_gradient_under_a_finite_loss_stops_before_the_step(machinery, machinery_teacher_path, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(_config(machinery, machinery_teacher_path, run), CPU, progress=False)
    original = trainer._batch_loss

    def sqrt_at_zero(batch, generator):  # a finite loss (the extra term is 0) whose gradient is NaN
        result = original(batch, generator)
        if trainer.history:  # epoch 2
            weight = next(trainer.student.parameters())
            result.loss = result.loss + torch.sqrt((weight - weight.detach()).pow(2).sum())
            assert torch.isfinite(result.loss)
        return result

    trainer._batch_loss = sqrt_at_zero
    with pytest.raises(NonFiniteLossError, match=r"gradients became NaN .* epoch 2, batch 1.*last good checkpoint"):
        trainer.run()
    assert load_checkpoint_file(run / "model_last.pth.tar")["epoch"] == 1 and _all_finite(run / "model_last.pth.tar")
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())  # the NaN never reached a weight


def test_a_step_to_infinite_weights_is_never_saved(machinery, machinery_teacher_path, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(_config(machinery, machinery_teacher_path, run), CPU, progress=False)
    step, steps = trainer.optimizer.step, []

    def overflowing_step(*args, **kwargs):  # the last step of epoch 2 overflows (a finite loss, a huge --lr)
        step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2 * trainer.steps_per_epoch:
            with torch.no_grad():
                next(trainer.student.parameters()).fill_(float("inf"))

    trainer.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteLossError, match=r"weights became NaN or infinite by epoch 2.*model_last.pth.tar was"):
        trainer.run()
    assert load_checkpoint_file(run / "model_last.pth.tar")["epoch"] == 1 and _all_finite(run / "model_last.pth.tar")
    assert not (run / "model_epoch2.pth.tar").exists() and not (run / "model_best.pth.tar").exists()


def test_the_gradient_check_tells_huge_finite_gradients_from_non_finite_ones():
    weights = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    weights[0].grad, weights[1].grad = torch.tensor([1e20, 1.0, 2.0]), torch.ones(2)
    assert not gradients_finite(weights) and gradients_finite(weights, exact=True)  # the fast 2-norm overflows
    for bad in (float("nan"), float("inf")):
        weights[1].grad = torch.tensor([1.0, bad])
        assert not gradients_finite(weights) and not gradients_finite(weights, exact=True)
    assert gradients_finite([torch.zeros(1, requires_grad=True)]) is None  # no gradients yet


def _failing_torch_save(monkeypatch, after: int = 0) -> None:
    """torch.save raises torch's own full-disk error (after writing a few bytes) from call ``after + 1`` on."""
    calls, save = [], torch.save

    def failing(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) <= after:
            return save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2395200 vs 2395092")

    monkeypatch.setattr(torch, "save", failing)


@pytest.mark.parametrize(("free", "code"), [(10, errno.ENOSPC), (10**12, errno.EIO)])
def test_a_failed_checkpoint_write_is_an_os_error_that_keeps_the_previous_file(tmp_path, monkeypatch, free, code):
    target = tmp_path / "model_last.pth.tar"
    atomic_torch_save({"w": torch.ones(4)}, target)
    _failing_torch_save(monkeypatch)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**13, 10**13 - free, free))
    with pytest.raises(OSError) as failed:
        atomic_torch_save({"w": torch.zeros(1000)}, target)
    assert failed.value.errno == code
    message = str(failed.value)
    assert str(target) in message and f"{free} bytes free" in message and "about 4000 bytes to write" in message
    assert "the previous model_last.pth.tar is kept as it was" in message and "\n" not in message
    assert torch.equal(torch.load(target)["w"], torch.ones(4)) and sorted(tmp_path.iterdir()) == [target]
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("not a write error")))
    with pytest.raises(RuntimeError, match="not a write error"):  # other errors of torch.save are left alone
        atomic_torch_save({"w": torch.zeros(1)}, target)


def test_a_full_disk_during_training_stops_with_an_os_error(machinery, machinery_teacher_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(_config(machinery, machinery_teacher_path, run), CPU, progress=False)
    _failing_torch_save(monkeypatch, after=1)  # epoch 1's checkpoint is written, epoch 2's is not
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=r"Could not write .*model_last.pth.tar \(no space left.*previous model_last"):
        trainer.run()
    assert isinstance(OSError(), _user_errors())  # raml train prints the message in one line and exits 2
    assert load_checkpoint_file(run / "model_last.pth.tar")["epoch"] == 1
    assert not list(run.glob(".*.tmp")) and not (run / "model_epoch2.pth.tar").exists()


@pytest.mark.parametrize("evaluation", ["validate", "monitor"])
def test_a_signal_during_the_last_evaluation_stops_the_run_and_the_final_test(
    machinery, machinery_teacher_path, tmp_path, evaluation
):
    run = tmp_path / "run"
    protocol = dict(trainval=False) if evaluation == "validate" else dict(trainval=True, test_datasets=["cub-test"])
    config = _config(machinery, machinery_teacher_path, run, epochs=1, val=True, **protocol)
    trainer = Trainer(config, CPU, progress=False)

    def signalled(*args, **kwargs):  # SIGTERM arrives while the last epoch is evaluated
        trainer._stop_signal = signal.SIGTERM
        metrics = {"mAP": 0.5, "R@1": 0.5}
        return metrics if evaluation == "validate" else {split.name: metrics for split in trainer.monitor_splits}

    setattr(trainer, evaluation, signalled)
    with pytest.raises(TrainingInterrupted, match=rf"signal {int(signal.SIGTERM)} after epoch 1 .*--resume-student"):
        trainer.run()
    assert load_checkpoint_file(run / "model_last.pth.tar")["epoch"] == 1  # the finished epoch is saved
    with pytest.raises(TrainingInterrupted, match="before the final test"):
        trainer.test()


def _folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir())}


def test_a_second_run_into_a_locked_folder_is_refused_at_once(machinery, machinery_teacher_path, tmp_path):
    run = tmp_path / "run"
    config = _config(machinery, machinery_teacher_path, run, epochs=1)
    first = Trainer(config, CPU, progress=False, keep_lock=True)
    first.run()
    before = _folder_state(run)
    started = time.monotonic()
    with pytest.raises(LockHeldError) as refused:  # even with --overwrite, which the checkpoints would allow
        Trainer(config.replace(overwrite=True), CPU, progress=False)
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert f"{run} is being written by raml train (PID {os.getpid()} on host {socket.gethostname()}" in message
    assert "wait for it to finish" in message and isinstance(refused.value, OSError)  # raml train: exit 2
    assert _folder_state(run) == before  # nothing of the first run's folder changed
    first.release_lock()
    assert LOCK_NAME not in os.listdir(run)
    second = Trainer(config.replace(overwrite=True), CPU, progress=False)  # free again
    second.release_lock()


def test_a_refused_start_releases_the_lock_and_leaves_no_folder(machinery, tmp_path):
    config = machinery.config(
        tmp_path / "new" / "run", student=machinery.arch, mode="sym", test_datasets=["no-such"], epochs=1
    )
    with pytest.raises((ValueError, OSError)):
        Trainer(config, CPU, progress=False)
    assert not (tmp_path / "new").exists()  # the lock's folders are removed again; so is the lock
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        Trainer(machinery.config(file / "run", student=machinery.arch, mode="sym", epochs=1), CPU, progress=False)


def test_a_refused_run_lock_stops_every_process_not_only_the_main_one(tmp_path, monkeypatch):
    """Under torchrun only the main process takes the lock; the others learn its outcome (a broadcast, faked here)
    and stop too, rather than waiting for ever in the run's first collective."""
    from raml.distributed import DistContext
    from raml.engine import run_lock
    from raml.locking import DirectoryLock

    sent: list[object] = []

    def broadcast(obj, ctx, src=0):  # rank 0 sends, the others receive what it sent
        if ctx.is_main:
            sent.append(obj)
            return obj
        return sent[-1]

    monkeypatch.setattr(run_lock, "broadcast_object", broadcast)
    run = tmp_path / "run"
    holder = DirectoryLock(run, "raml train")
    holder.acquire()
    try:
        with pytest.raises(LockHeldError):
            run_lock.acquire_run_lock(object(), run, DistContext(rank=0, world_size=2))
        with pytest.raises(run_lock.RunLockRefusedError, match=r"process 1: the main process could not lock"):
            run_lock.acquire_run_lock(object(), run, DistContext(rank=1, world_size=2))
    finally:
        holder.release()
    owner = object.__new__(type("Owner", (), {}))  # a weak-referenceable owner
    lock = run_lock.acquire_run_lock(owner, run, DistContext(rank=0, world_size=2))
    assert lock is not None and sent[-1] is None  # the main process got it and said so
    assert run_lock.acquire_run_lock(owner, run, DistContext(rank=1, world_size=2)) is None
    lock.release()
