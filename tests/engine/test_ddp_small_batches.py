"""Two gloo processes training on batches of fewer images than processes: an epoch of 9 images at
``--batch-size 4`` (4, 4, 1) leaves rank 1 without an image of the last batch, and ``sym`` at ``--batch-size 4``
(one group of 4 images a batch, split by groups) without any image of any batch.

Such a process loads its share as a batch of no rows (``Trainer.load_shares``) and contributes a zero loss on
its graph, so that it still takes part in every collective (DDP's gradient all-reduce, the gathered mixup
partners of ``--mixup-partner batch``, UGD's and the proxies' hand all-reduces, the epoch's loss sums). Every
view-based mode and both ``sym`` losses run in one scenario of the session's rank pair (tests/engine/conftest.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from raml.engine.config import TrainConfig
from raml.engine.trainer import Trainer
from raml.models import load_checkpoint_file

HERE = Path(__file__).resolve().parent
DR, QR = 32, 16

#: each run's settings besides the base's: every view-based mode, --mixup-partner batch (a gather of the batch's
#: views over the processes), --train-bn (BatchNorm in train mode on no rows) and the two sym losses
RUNS: dict[str, dict[str, object]] = {
    **{mode: {"mode": mode} for mode in ("ts_aug", "ts_reg", "aml", "rkd", "d3", "rop", "ugd")},
    "csd-train-bn": {"mode": "csd", "freeze_bn": False},
    "ts_aug-batch": {"mode": "ts_aug", "mixup_partner": "batch"},
    "sym": {"mode": "sym", "loss": "normsoftmax", "image_size": DR},
    "sym-triplet": {"mode": "sym", "loss": "triplet", "image_size": DR, "neg_num": 1, "pool_size": 8},
}


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


def test_ugd_projectors_without_gradients_on_one_rank_are_averaged_on_both(tiny_cub, tmp_path, rank_pair):
    """Rank 1's shares have no unambiguous region, so its loss never reaches the projectors (no gradients): it
    must still take part in rank 0's all-reduces of their gradients (a zero gradient), not skip them."""
    runs = {"ugd-ambiguous": {"mode": "ugd", "query_size": 8, "_ambiguous_rank": 1}}
    _two_ranks(*tiny_cub, runs, tmp_path / "out", rank_pair)


def test_batches_of_fewer_images_than_processes_train_on_every_rank(tiny_cub, tmp_path, rank_pair):
    data_root, network = tiny_cub
    out = tmp_path / "out"
    _two_ranks(data_root, network, RUNS, out, rank_pair)
    # the run equals one process's: ts_aug's last batch of one image (rank 1 empty) and sym's empty rank 1
    for name in ("ts_aug-batch", "sym"):
        config = TrainConfig(**{**_base(data_root, network), "directory": str(tmp_path / name), **RUNS[name]})
        Trainer(config, torch.device("cpu"), progress=False).run()
        one = load_checkpoint_file(tmp_path / name / "model_last.pth.tar")["state_dict"]
        two = load_checkpoint_file(out / name / "model_last.pth.tar")["state_dict"]
        for key in one:
            torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
