"""Training repeats itself: identical seeds give identical losses, and a run stopped after an epoch and resumed
from its last checkpoint ends with the weights of an uninterrupted run (CPU, the shared dataset of tests/engine/
conftest.py with its machinery teacher and students, timm's test_resnet: what is checked does not depend on the
network)."""

from __future__ import annotations

import pytest
import torch

from raml.engine.trainer import Trainer, TrainingInterrupted

CPU = torch.device("cpu")


def test_identical_seeds_give_identical_losses(machinery, machinery_teacher_path, tmp_path):
    histories = []
    for run in range(2):
        config = machinery.distill_config(tmp_path / f"run{run}", machinery_teacher_path, epochs=1, val=False)
        histories.append(Trainer(config, CPU, progress=False).run().history)
    assert histories[0][0]["loss"] == histories[1][0]["loss"]
    assert histories[0][0]["loss"] > 0


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
