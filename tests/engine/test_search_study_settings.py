"""``--optimize`` refuses to resume a study made with other search settings; ``--overwrite`` starts a new one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

optuna = pytest.importorskip("optuna")

from raml.engine import search as search_module  # noqa: E402
from raml.engine.config import TrainConfig  # noqa: E402


class _RecordingTrainer:
    """Stands in for the Trainer: records each trial's loss and scores it without training."""

    seen: list[str] = []

    def __init__(self, config: TrainConfig, device: torch.device, **kwargs) -> None:  # noqa: ARG002
        self.config = config

    def run(self) -> SimpleNamespace:
        _RecordingTrainer.seen.append(self.config.loss)
        score = 0.9 if self.config.loss == "normsoftmax" else 0.1  # the studies' best values differ
        return SimpleNamespace(best_map=score, last_val_map=score)


@pytest.fixture
def searcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setattr(search_module, "Trainer", _RecordingTrainer)
    monkeypatch.setattr(search_module, "_free_memory", lambda device: None)
    _RecordingTrainer.seen = []

    def run(**changes) -> dict[str, float]:
        config = TrainConfig(
            directory=str(tmp_path / "search"), data_root=str(tmp_path / "data"), teacher="resnet18", mode="sym",
            trials=2, optimize=True,
        ).replace(**changes)  # fmt: skip
        return search_module.search(config, torch.device("cpu"), progress=False)

    return run


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="raml", storage=f"sqlite:///{tmp_path / 'search' / 'optuna.db'}")


def test_a_study_of_another_loss_is_refused_and_overwrite_starts_a_new_one(tmp_path: Path, searcher) -> None:
    searcher(loss="normsoftmax")
    assert _RecordingTrainer.seen == ["normsoftmax"] * 2
    with pytest.raises(ValueError, match=r"optuna.db holds a search study made with other settings \(--loss: study "
                       r"'normsoftmax', asked 'triplet'\)\. Nothing was changed.*--overwrite") as refused:  # fmt: skip
        searcher(loss="triplet")
    assert "\n" not in str(refused.value)  # the CLI prints it as one line
    assert _RecordingTrainer.seen == ["normsoftmax"] * 2 and len(_study(tmp_path).trials) == 2  # nothing changed
    searcher(loss="triplet", overwrite=True)
    assert _RecordingTrainer.seen == ["normsoftmax"] * 2 + ["triplet"] * 2  # its own trials
    study = _study(tmp_path)
    assert len(study.trials) == 2 and study.best_value == pytest.approx(0.1)
    assert study.user_attrs[search_module.SETTINGS_ATTR]["loss"] == "triplet"


def test_the_same_search_resumes_whatever_its_per_run_settings(tmp_path: Path, searcher) -> None:
    searcher(loss="normsoftmax", trials=1, lr=1.5e-4)
    # more trials, another first lr (only a new study's first trial), other workers: the same search goes on
    searcher(loss="normsoftmax", trials=2, lr=1.2e-4, workers=1)
    assert _RecordingTrainer.seen == ["normsoftmax"] * 2 and len(_study(tmp_path).trials) == 2
    with pytest.raises(ValueError, match=r"--epochs: study 200, asked 3"):
        searcher(loss="normsoftmax", epochs=3)
    ranges = (
        r"\(--mode: study 'sym', asked 'ts_aug'; the searched ranges: study lr in \[0.0001, 0.0002\] \(log\), "
        r"asked lr in \[0.0001, 0.0002\] \(log\), lam_1 in \[0.6, 0.8\], lam_2 in \[0.6, 0.8\]\)"
    )
    with pytest.raises(ValueError, match=ranges):
        searcher(loss="normsoftmax", mode="ts_aug")


def test_a_study_that_records_no_settings_is_refused(tmp_path: Path, searcher) -> None:
    searcher(loss="normsoftmax", trials=1)
    study = _study(tmp_path)
    study._storage.set_study_user_attr(study._study_id, search_module.SETTINGS_ATTR, None)  # as an older raml left it
    with pytest.raises(ValueError, match=r"does not record its settings \(an older raml\).*--overwrite"):
        searcher(loss="normsoftmax", trials=2)


def test_overwrite_resumes_a_study_of_the_same_settings(tmp_path: Path, searcher) -> None:
    # a search started with --overwrite (over an earlier run's checkpoints, which stay until the final run) and
    # interrupted after one trial: the same command resumes it instead of deleting its finished trials
    searcher(loss="normsoftmax", trials=1, overwrite=True)
    searcher(loss="normsoftmax", trials=3, overwrite=True)
    assert _RecordingTrainer.seen == ["normsoftmax"] * 3 and len(_study(tmp_path).trials) == 3


def test_a_users_config_yaml_is_refused_before_any_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_module, "Trainer", _RecordingTrainer)
    _RecordingTrainer.seen = []
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "config.yaml").write_text("# my notes\nloss: normsoftmax\n", encoding="utf-8")
    config = TrainConfig(
        directory=str(folder), data_root=str(tmp_path / "data"), teacher="resnet18", mode="sym", trials=2,
        optimize=True, loss="normsoftmax",
    )  # fmt: skip
    with pytest.raises(FileExistsError, match="config.yaml"):
        search_module.optimize_and_train(config, torch.device("cpu"), progress=False)
    assert _RecordingTrainer.seen == [] and not (folder / "optuna.db").exists()
