"""``--logger tensorboard`` under torchrun: only rank 0 opens a SummaryWriter (the other ranks log nothing, and
each writer would leave its own event file in the run's ``tensorboard/`` folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raml.data.synth import generate_synthetic_dataset
from raml.distributed import DistContext
from raml.engine.config import TrainConfig
from raml.engine.trainer import Trainer
from raml.models import build_network, save_checkpoint


@pytest.fixture
def config(tmp_path: Path) -> TrainConfig:
    generate_synthetic_dataset(tmp_path / "data" / "cub", num_classes=4, images_per_class=4, image_size=32, seed=1)
    torch.manual_seed(0)
    network = tmp_path / "net.pth"
    save_checkpoint(network, build_network("test_resnet", whitening=16, pretrained=False))
    return TrainConfig(
        mode="ts_aug", student_path=str(network), teacher_path=str(network), training_dataset="cub",
        test_datasets=[], data_root=str(tmp_path / "data"), directory=str(tmp_path / "run"), image_size=16,
        teacher_image_size=32, pos_num=2, batch_size=4, update_every=1, epochs=1, workers=0, val=False,
        logger="tensorboard",
    )  # fmt: skip


@pytest.mark.parametrize(("rank", "writes"), [(0, True), (1, False)])
def test_only_rank_0_opens_a_tensorboard_writer(config, monkeypatch, rank, writes):
    trainer = Trainer(config, torch.device("cpu"), progress=False)
    trainer.dist = DistContext(rank=rank, world_size=1)  # a rank other than 0, without a process group
    opened = []
    monkeypatch.setattr(trainer, "_run_epochs", lambda: opened.append(trainer.writer))
    trainer.run()
    assert (opened[0] is not None) == writes
    assert (Path(config.directory) / "tensorboard").exists() == writes
