"""Two gloo processes training on small shares of a batch: every process must take part in every collective
(DDP's gradient all-reduce, a method's hand all-reduces of its own parameters' gradients), whatever its share
holds. The runs go through the ``small_batches`` scenario of the session's rank pair (tests/engine/conftest.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from raml.data.synth import generate_synthetic_dataset
from raml.models import build_network, save_checkpoint

HERE = Path(__file__).resolve().parent
DR, QR = 32, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny CUB-format dataset (16 training images) and a random test_resnet checkpoint."""
    root = tmp_path_factory.mktemp("small_batches")
    generate_synthetic_dataset(root / "data" / "cub", num_classes=8, images_per_class=4, image_size=DR, seed=1)
    torch.manual_seed(0)
    network = root / "resnet.pth"
    save_checkpoint(network, build_network("test_resnet", whitening=16, pretrained=False))
    return root / "data", network


def _base(data_root: Path, network: Path) -> dict[str, object]:
    return dict(
        student_path=str(network), teacher_path=str(network), training_dataset="cub", test_datasets=[],
        data_root=str(data_root), image_size=QR, teacher_image_size=DR, pos_num=2, batch_size=4, query_size=9,
        update_every=1, workers=0, val=False, epochs=1, optimizer="sgd", lr=0.05, print_freq=1, save_freq=1,
    )  # fmt: skip


def _two_ranks(data_root: Path, network: Path, runs: dict[str, dict[str, object]], out: Path, rank_pair) -> None:
    """The ``small_batches`` scenario of ``runs`` in the rank pair: each run finishes on both ranks, with finite
    losses and the same weights."""
    out.mkdir()
    settings = out.parent / f"{out.name}.json"
    settings.write_text(json.dumps({"base": _base(data_root, network), "runs": runs}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    # a rank left waiting in a collective must fail the test in seconds, not stall the suite
    result = rank_pair.run([str(HERE / "ddp_scenarios.py"), "small_batches", str(settings), str(out)], env, 60, 5)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert result.returncode == 0 and len(reports) == 2, result.stderr[-3000:]
    for name in runs:
        results = [report["runs"][name] for report in reports]
        assert all(math.isfinite(loss) for run in results for loss in run["losses"]), (name, results)
        assert results[0]["digest"] == results[1]["digest"], name  # both ranks end with the same weights


def test_ugd_projectors_without_gradients_on_one_rank_are_averaged_on_both(setup, tmp_path, rank_pair):
    """Rank 1's shares have no unambiguous region, so its loss never reaches the projectors (no gradients): it
    must still take part in rank 0's all-reduces of their gradients (a zero gradient), not skip them."""
    runs = {"ugd-ambiguous": {"mode": "ugd", "query_size": 8, "_ambiguous_rank": 1}}
    _two_ranks(*setup, runs, tmp_path / "out", rank_pair)
