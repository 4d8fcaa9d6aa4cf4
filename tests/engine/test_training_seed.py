"""The same --seed gives the same run from random weights: a student built from an architecture name (not a
checkpoint) starts from the same weights (the reference seeds before building). Before, two ``sym`` runs of one
configuration from ``--student resnet18`` differed from their first mining pass on (found 2026-12-04)."""

from __future__ import annotations

import torch

from raml.engine.trainer import Trainer

CPU = torch.device("cpu")


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in trainer.student.state_dict().items()}


def test_a_student_from_an_architecture_starts_from_the_seed_s_weights(training, tmp_path):
    def build(name: str, seed: int) -> Trainer:
        config = training.config(tmp_path / name, mode="sym", student=training.arch, seed=seed, epochs=1)
        return Trainer(config, CPU, progress=False)

    torch.manual_seed(123)  # whatever ran before must not matter
    first = _weights(build("a", 7))
    torch.rand(1000)
    second = _weights(build("b", 7))
    other = _weights(build("c", 8))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].is_floating_point())
