"""benchmarks/mining_floor.py: its counts on embeddings built so that the answer is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mining_floor.py"


def _script():
    spec = importlib.util.spec_from_file_location("mining_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_embeddings_leave_the_floor_no_draw():
    # every pair within d = 0.5 of each other: every weight is clamped to the maximum, the floor decides nothing
    rng = np.random.default_rng(0)
    base = rng.normal(size=512)
    x = base + 0.001 * rng.normal(size=(24, 512))
    x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    labels = np.repeat(np.arange(6), 4)
    report = _script().measure(x, labels, neg_num=4, seed=0)
    assert report["draws"] == 96 and report["draws_on_floor_dominated_items"] == 0
    assert report["draws_on_same_class_items"] == 0
    # floor mass = M * 1e-6 / (20 other-class items of weight 1 + M * 1e-6), by hand
    assert np.isclose(report["floor_mass"]["mean"], 24e-6 / (20 + 24e-6))
    assert report["items_above_floor_per_anchor"]["min"] == 20


def test_an_isolated_anchor_must_draw_floor_items():
    # two tight clusters far apart (classes 0-1 in one, 2-5 in the other): an anchor of class 0 has only the
    # 4 class-1 items near it; with neg_num 6 it must take 2 floor-dominated items
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=512), rng.normal(size=512)
    b -= (b @ a) / (a @ a) * a  # orthogonal: d = sqrt(2) between the clusters
    centres = np.stack([a / np.linalg.norm(a), b / np.linalg.norm(b)])
    labels = np.repeat(np.arange(6), 4)
    x = centres[(labels >= 2).astype(int)] + 0.001 * rng.normal(size=(24, 512))
    x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    report = _script().measure(x, labels, neg_num=6, seed=0)
    assert report["anchors_with_fewer_items_above_floor_than_neg_num"] == 8  # the 8 anchors of classes 0 and 1
    assert report["draws_on_floor_dominated_items"] == 16  # 2 forced draws each
    assert report["share_of_draws_on_floor_dominated_items"] == 16 / 144
