"""A training checkpoint's ``max_map`` is a fraction, as the reference's ``save_checkpoint`` stores it; resume reads
the reference's, ours and those of earlier raml versions (percent) in their own unit."""

from __future__ import annotations

import pytest
import torch

from raml.engine.trainer import MAX_MAP_UNIT, Trainer, recorded_best_map
from raml.models import load_checkpoint_file


@pytest.mark.parametrize(
    ("checkpoint", "percent"),
    [
        ({"max_map": 0.5157}, 51.57),  # the reference's: a fraction, no "raml" record
        ({"max_map": 0.5157, "raml": {"max_map_unit": MAX_MAP_UNIT}}, 51.57),  # ours
        ({"max_map": 51.57, "raml": {"history": []}}, 51.57),  # an earlier raml version's: percent
        ({"raml": {"max_map_unit": MAX_MAP_UNIT}}, None),
    ],
)
def test_resume_reads_max_map_in_the_unit_its_writer_used(checkpoint, percent):
    value = recorded_best_map(checkpoint)
    assert value == pytest.approx(percent) if percent is not None else value is None


def test_a_run_selecting_on_val_writes_its_best_map_as_a_fraction(machinery, machinery_teacher_path, tmp_path):
    config = machinery.distill_config(tmp_path / "run", machinery_teacher_path, epochs=1, trainval=False)
    result = Trainer(config, torch.device("cpu"), progress=False).run()
    assert result.best_map is not None and result.best_map > 1.0  # percent in the run's own figures
    checkpoint = load_checkpoint_file(tmp_path / "run" / "model_best.pth.tar")
    assert checkpoint["max_map"] == pytest.approx(result.best_map / 100.0)
    assert checkpoint["raml"]["max_map_unit"] == MAX_MAP_UNIT
    assert recorded_best_map(checkpoint) == pytest.approx(result.best_map)
