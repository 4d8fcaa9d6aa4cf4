"""Training repeats itself: identical seeds give identical losses, and a run stopped after an epoch and resumed
from its last checkpoint ends with the weights of an uninterrupted run (CPU, the shared dataset of tests/engine/
conftest.py with its machinery teacher and students, timm's test_resnet: what is checked does not depend on the
network)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raml.engine import trainer as trainer_module
from raml.engine.trainer import Trainer, TrainingInterrupted
from raml.models import save_checkpoint

CPU = torch.device("cpu")


def test_identical_seeds_give_identical_losses(machinery, machinery_teacher_path, tmp_path, monkeypatch):
    written: list[str] = []

    def counting_save(path, *args, **kwargs):
        written.append(Path(path).name)
        return save_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", counting_save)
    histories = []
    for run in range(2):
        config = machinery.distill_config(tmp_path / f"run{run}", machinery_teacher_path, epochs=1, val=False)
        histories.append(Trainer(config, CPU, progress=False).run().history)
    assert histories[0][0]["loss"] == histories[1][0]["loss"]
    assert histories[0][0]["loss"] > 0
    # the last epoch's checkpoint, kept as the model without validation, is serialised once per run; its other
    # names are the same file
    assert written == ["model_last.pth.tar"] * 2
    names = ("model_last.pth.tar", "model_epoch1.pth.tar", "model_best.pth.tar")
    assert len({(tmp_path / "run0" / name).stat().st_ino for name in names}) == 1


def test_resume_reproduces_an_uninterrupted_run(machinery, machinery_teacher_path, tmp_path):
    full = machinery.distill_config(tmp_path / "full", machinery_teacher_path, epochs=2, scheduler="onecycle")
    Trainer(full, CPU, progress=False).run()
    part = machinery.distill_config(tmp_path / "part", machinery_teacher_path, epochs=2, scheduler="onecycle")
    with pytest.raises(TrainingInterrupted):
        Trainer(part, CPU, progress=False, stop_after_epoch=1).run()
    resumed = part.replace(resume_student=str(tmp_path / "part" / "model_last.pth.tar"))
    Trainer(resumed, CPU, progress=False).run()
    a = torch.load(tmp_path / "full" / "model_epoch2.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "model_epoch2.pth.tar", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _folder_state(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_start_leaves_the_run_folder_as_it_was(machinery, machinery_teacher_path, tmp_path):
    """Every refusal before training (no checkpoint, an empty one, one of another network, no optimizer step
    per epoch) happens before anything is written: config.yaml keeps describing the folder's checkpoints."""
    from raml.models import build_network, save_checkpoint
    from raml.models.checkpoints import CheckpointError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 2\n# the run that wrote model_last.pth.tar\n")
    (run / "model_last.pth.tar").write_bytes(b"the finished run's checkpoint")
    (run / "empty.pth").write_bytes(b"")  # in the run's folder: another folder's checkpoint is refused first
    other = build_network("test_efficientnet", pooling="gem", whitening=32, pretrained=False)
    save_checkpoint(run / "other.pth", other)
    before = _folder_state(run)
    base = machinery.distill_config(run, machinery_teacher_path, epochs=1, val=False)

    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Trainer(base.replace(resume_student=str(tmp_path / "missing.pth")), CPU, progress=False)
    with pytest.raises(CheckpointError):
        Trainer(base.replace(resume_student=str(run / "empty.pth")), CPU, progress=False)
    with pytest.raises(CheckpointError) as refused:
        Trainer(base.replace(resume_student=str(run / "other.pth")), CPU, progress=False)
    message = str(refused.value)
    assert "test_efficientnet" in message and "test_resnet" in message
    assert "--student" in message and "--directory" in message
    assert re.search(r"\d+ keys missing \([^)]*, \.\.\.\)", message), message
    assert len(message) < 1000 and "\n" not in message  # not torch's hundreds of lines
    with pytest.raises(ValueError, match="--update-every"):
        Trainer(base.replace(overwrite=True, update_every=10**6), CPU, progress=False)
    assert _folder_state(run) == before
