"""``--mode sym --loss triplet`` builds its epochs as the reference does, and the schedule follows.

The reference (pavelsuma/raml ``ea0f00f``) keeps the classes with at least 4 images, takes
``min_class // 4 * 4`` images of each, and its ``len(dataset)`` (so OneCycle's ``steps_per_epoch =
ceil(len / batch_size / update_every)``) is ``min(--query-size, that * classes)``; its loader drops the last
incomplete batch in sym mode. The expected numbers are computed plainly here from the class sizes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raml.engine.config import TrainConfig
from raml.engine.mining import class_grouped_epoch, reference_epoch_seed
from raml.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
TRAIN_SIZES = [9, 6, 3, 7, 2, 5]  # classes of 3 and 2 images take no part; min_class = 5 -> 4 per class
VAL_SIZES = [8, 6]
SIZES = TRAIN_SIZES + VAL_SIZES  # the default run trains on train + val (the reference's protocol)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "mine"
    split: dict[str, list[list[str]]] = {}
    for part, sizes in (("train", TRAIN_SIZES), ("val", VAL_SIZES), ("test", [3, 3])):
        split[part] = []
        for c, size in enumerate(sizes):
            paths = [f"{part}_{c}/{i}.png" for i in range(size)]
            for p in paths:
                (folder / p).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / p)
            split[part].append(paths)
    (folder / "split.json").write_text(json.dumps(split))
    return tmp_path / "data"


def _trainer(root: Path, directory: Path, **changes) -> Trainer:
    values = dict(
        training_dataset="mine",
        test_datasets=[],
        data_root=str(root),
        directory=str(directory),
        mode="sym",
        loss="triplet",
        student="test_resnet",
        pretrained=False,
        whitening=16,
        image_size=32,
        workers=0,
        batch_size=8,
        update_every=1,
        neg_num=2,
        pool_size=10,
        epochs=3,
        lr=1e-3,
        val=False,
        seed=11,
    )
    values.update(changes)
    return Trainer(TrainConfig(**values), CPU, progress=False)


@pytest.mark.parametrize(("query_size", "update_every"), [(10**6, 1), (14, 1), (10**6, 2)])
def test_epoch_size_batches_and_onecycle_length(root, tmp_path, query_size, update_every):
    trainer = _trainer(root, tmp_path / "run", query_size=query_size, update_every=update_every)
    kept = [s for s in SIZES if s >= 4]
    epoch = min(query_size, min(kept) // 4 * 4 * len(kept))  # 24, or 14
    assert trainer.epoch_size == epoch
    assert trainer.batches_per_epoch == epoch // 8  # the last incomplete batch is dropped
    assert trainer.scheduler.total_steps == 3 * math.ceil(epoch / 8 / update_every)
    assert trainer.steps_per_epoch == epoch // 8 // update_every


def test_epoch_batches_are_the_reference_epoch_with_mined_negatives(root, tmp_path):
    trainer = _trainer(root, tmp_path / "run")
    trainer.loader = lambda dataset, batch_sampler: batch_sampler  # the index lists, no image loading
    labels = trainer.train_split.labels
    batches = list(trainer.method.epoch_batches(2, torch.Generator().manual_seed(0)))
    assert len(batches) == trainer.batches_per_epoch == 3
    expected = class_grouped_epoch(labels, 4, 24, np.random.RandomState(reference_epoch_seed(11, 2)))
    anchors = [index for batch in batches for index, _ in batch[:8]]
    assert anchors == expected
    for batch in batches:
        negatives = [index for index, _ in batch[8:]]
        assert len(negatives) == 8 * 2
        # the pool holds only the kept classes (the reference's image list leaves the small classes out)
        assert all(SIZES[labels[i]] >= 4 for i in negatives)
    # every item of the epoch has its own augmentation seed
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
