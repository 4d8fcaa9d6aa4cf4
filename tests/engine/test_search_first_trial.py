"""``--optimize``: the first trial is the given values, unclipped, as the reference enqueues them
(pavelsuma/raml ``ea0f00f``, ``optimize.py``: ``study.enqueue_trial({"lr": args.lr, "lam_1": args.lam_1,
"lam_2": args.lam_2})``, with its defaults ``--lam-1 0 --lam-2 0``); optuna keeps an out-of-range value."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("optuna")

from raml.engine import search as search_module  # noqa: E402
from raml.engine.config import TrainConfig  # noqa: E402


class _RecordingTrainer:
    """Stands in for the Trainer: records each trial's values and scores them without training."""

    seen: list[dict[str, float]] = []

    def __init__(self, config: TrainConfig, device: torch.device, **kwargs) -> None:  # noqa: ARG002
        self.config = config

    def run(self) -> SimpleNamespace:
        c = self.config
        _RecordingTrainer.seen.append({"lr": c.lr, "lam_1": c.lam_1, "lam_2": c.lam_2})
        score = -abs(c.lam_1 - 0.7)  # any deterministic score
        return SimpleNamespace(best_map=score, last_val_map=score)


@pytest.mark.parametrize(
    ("lr", "lam_1", "lam_2"),
    [(5e-4, 0.0, 0.0), (1.4025e-4, 0.7718, 0.6684), (5e-5, 0.95, 0.6)],
    ids=["reference-defaults", "inside", "below-and-above"],
)
def test_first_trial_is_the_given_values_unclipped(tmp_path: Path, monkeypatch, lr, lam_1, lam_2):
    monkeypatch.setattr(search_module, "Trainer", _RecordingTrainer)
    # the stand-in holds no networks: no full garbage collection after each trial (0.2-0.5 s each in a test
    # worker's heap; test_gpu_paths.py checks that a real trial is freed)
    monkeypatch.setattr(search_module, "_free_memory", lambda device: None)
    _RecordingTrainer.seen = []
    config = TrainConfig(
        directory=str(tmp_path / "search"),
        data_root=str(tmp_path / "data"),
        teacher="resnet18",
        lr=lr,
        lam_1=lam_1,
        lam_2=lam_2,
        trials=3,
        optimize=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna warns about the out-of-range first values, which is the point
        search_module.search(config, torch.device("cpu"), progress=False)
    assert _RecordingTrainer.seen[0] == {"lr": lr, "lam_1": lam_1, "lam_2": lam_2}
    # later trials are TPE's, inside the range
    for values in _RecordingTrainer.seen[1:]:
        assert 1e-4 <= values["lr"] <= 2e-4 and 0.6 <= values["lam_1"] <= 0.8 and 0.6 <= values["lam_2"] <= 0.8
    assert len(_RecordingTrainer.seen) == 3


@pytest.mark.parametrize("mode", ["csd", "ts_reg"])
def test_a_mode_that_reads_no_lambda_searches_lr_alone(tmp_path: Path, monkeypatch, mode):
    """Only ts_aug's loss reads lam_1 / lam_2: the other modes' trials and best values hold lr alone, and their
    lambdas stay as given."""
    import optuna

    monkeypatch.setattr(search_module, "Trainer", _RecordingTrainer)
    monkeypatch.setattr(search_module, "_free_memory", lambda device: None)
    _RecordingTrainer.seen = []
    config = TrainConfig(
        directory=str(tmp_path / "search"), data_root=str(tmp_path / "data"), teacher="resnet18", mode=mode,
        lr=1.5e-4, lam_1=0.3, lam_2=0.4, trials=3, optimize=True,
    )  # fmt: skip
    best = search_module.search(config, torch.device("cpu"), progress=False)
    assert set(best) == {"lr"}
    study = optuna.load_study(study_name="raml", storage=f"sqlite:///{tmp_path / 'search' / 'optuna.db'}")
    assert [set(trial.params) for trial in study.trials] == [{"lr"}] * 3
    assert all((values["lam_1"], values["lam_2"]) == (0.3, 0.4) for values in _RecordingTrainer.seen)
    assert search_module.search_space(config.replace(mode="ts_aug")) == search_module.SEARCH_SPACE
