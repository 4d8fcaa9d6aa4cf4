"""The other training modes and settings end to end (CPU, the shared dataset of tests/engine/conftest.py):
``ts_reg`` without validation, the reference's triplet ``sym`` mode, ``--optimize`` (the search, then training
on train + val), and the teacher's device in every evaluation. The distillation runs use the machinery teacher
(timm's test_resnet): what they check does not depend on the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from raml.data.splits import get_split
from raml.engine.trainer import Trainer
from raml.models import load_checkpoint_file, load_network
from raml.retrieval.evaluate import evaluate_split

CPU = torch.device("cpu")


def test_ts_reg_and_no_val_still_write_model_best(machinery, machinery_teacher_path, tmp_path):
    # also: --logger tensorboard writes the run's scalars
    config = machinery.distill_config(
        tmp_path / "reg",
        machinery_teacher_path,
        mode="ts_reg",
        epochs=1,
        val=False,
        test_datasets=[],
        logger="tensorboard",
    )
    result = Trainer(config, CPU, progress=False).run()
    assert result.best_checkpoint == tmp_path / "reg" / "model_best.pth.tar"
    assert result.best_checkpoint.is_file() and result.best_map is None
    assert list((tmp_path / "reg" / "tensorboard").glob("events.out.tfevents.*"))


def test_triplet_sym_mode_mines_and_learns(training, tmp_path):
    """The reference's sym mode (triplet loss, distance-weighted negatives mined every epoch) learns: on the
    training classes, retrieval after three epochs beats the random-weights start by a wide margin."""
    dr = training.dr
    config = training.config(
        tmp_path / "triplet",
        mode="sym",
        loss="triplet",
        student="test_resnet",
        image_size=dr,
        teacher_image_size=dr,
        epochs=3,  # 20 classes x 6 images: the reference-built epoch is 4 images a class (80)
        lr=1e-3,
        neg_num=2,
        query_size=10**6,
        pool_size=200,
        batch_size=8,
        update_every=1,
        freeze_bn=False,
        scheduler="none",
        val=False,
        test_datasets=[],
    )
    torch.manual_seed(0)
    trainer = Trainer(config, CPU, progress=False)
    split = get_split("cub-trainval", training.data_root)
    before = evaluate_split(trainer.student, split, dr, CPU, sym=True, progress=False)["sym"]["mAP"]
    result = trainer.run()
    after = evaluate_split(load_network(result.best_checkpoint), split, dr, CPU, sym=True, progress=False)
    # 16.5 -> 44.1 mAP when tuned (20 classes x 6 images); a broken miner or loss stays near the start
    assert after["sym"]["mAP"] > before + 15.0
    assert all(h["loss"] > 0 for h in result.history)


def test_optimize_runs_the_search_then_trains_on_train_plus_val(
    machinery, machinery_teacher_path, tmp_path, monkeypatch
):
    from raml.engine.search import optimize_and_train
    from raml.engine.trainer import Trainer
    from raml.locking import DirectoryLock, LockHeldError

    config = machinery.distill_config(
        tmp_path / "search", machinery_teacher_path, epochs=2, trials=2, optimize=True, lr=1.5e-4, query_size=8
    )
    real_test, locked = Trainer.test, []

    def test_under_the_lock(self, *args, **kwargs):  # the final test runs with the run folder still locked
        with pytest.raises(LockHeldError):
            DirectoryLock(tmp_path / "search", "another run").acquire()
        locked.append(True)
        return real_test(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "test", test_under_the_lock)
    best, result = optimize_and_train(config, CPU, progress=False)
    assert locked == [True]
    after = DirectoryLock(tmp_path / "search", "after the run")
    after.acquire()  # and released once done
    after.release()
    assert set(best) == {"lr", "lam_1", "lam_2"}
    assert 1e-4 <= best["lr"] <= 2e-4 and 0.6 <= best["lam_1"] <= 0.8
    assert (tmp_path / "search" / "optuna.db").is_file()
    assert (tmp_path / "search" / "trial_0" / "model_best.pth.tar").is_file()
    assert (tmp_path / "search" / "model_best.pth.tar").is_file()
    assert "cub-test" in result.test
    # the study resumes: asking for the same number of trials runs no new one
    import optuna

    study = optuna.load_study(study_name="raml", storage=f"sqlite:///{tmp_path / 'search' / 'optuna.db'}")
    assert len(study.trials) == 2 and study.trials[0].params["lr"] == pytest.approx(1.5e-4)
    # a trial scores its last validation, as in the reference (not its best epoch)
    for trial in study.trials:
        history = load_checkpoint_file(tmp_path / "search" / f"trial_{trial.number}" / "model_last.pth.tar")
        assert trial.value == pytest.approx(history["raml"]["history"][-1]["val_mAP"])
    # the final run: train + val, the last epoch kept
    final = load_checkpoint_file(tmp_path / "search" / "model_best.pth.tar")
    assert final["epoch"] == 2 and final["raml"]["trainval"] is True


def test_optimize_into_a_locked_folder_is_refused_before_the_search(machinery, machinery_teacher_path, tmp_path):
    """A second --optimize (or any run) into a folder whose run holds the lock is refused before the study is
    opened or a trial runs: not after a whole search, at the final run."""
    import raml.engine.search as search_module
    from raml.locking import LOCK_NAME, DirectoryLock, LockHeldError

    folder = tmp_path / "search"
    config = machinery.distill_config(folder, machinery_teacher_path, epochs=1, trials=1, optimize=True)
    first = DirectoryLock(folder, "the first run")
    first.acquire()
    searched = []
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(search_module, "search", lambda *args, **kwargs: searched.append(True) or {})
            with pytest.raises(LockHeldError, match="the first run"):
                search_module.optimize_and_train(config, CPU, progress=False)
        assert searched == [] and sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
    finally:
        first.release()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (the teacher on the second)")
def test_teacher_on_a_second_gpu_trains_validates_and_tests(machinery, machinery_teacher_path, tmp_path):
    """-g 0,1: the student on cuda:0, the teacher on cuda:1, in training, monitoring and the final test."""
    config = machinery.distill_config(tmp_path / "two", machinery_teacher_path, epochs=1, val_freq=1, query_size=8)
    trainer = Trainer(config, torch.device("cuda", 0), progress=False, teacher_device=torch.device("cuda", 1))
    assert next(trainer.teacher.parameters()).device == torch.device("cuda", 1)
    result = trainer.run()
    assert "monitor_cub-test_mAP" in result.history[-1]
    assert set(trainer.test()["cub-test"]) == {"asym", "sym"}


def test_the_teacher_device_reaches_every_evaluation(machinery, machinery_teacher_path, tmp_path, monkeypatch):
    """Monitoring and the final test embed the database on the teacher's device, not the student's."""
    import raml.engine.trainer as trainer_module

    config = machinery.distill_config(tmp_path / "dev", machinery_teacher_path, epochs=1, val_freq=1, query_size=8)
    sentinel = torch.device("cpu", 0)  # a distinct object standing in for a second device
    trainer = Trainer(config, CPU, progress=False, teacher_device=sentinel)
    seen = []
    real = trainer_module.evaluate_split

    def spy(*args, **kwargs):
        seen.append(kwargs["teacher_device"])
        kwargs["teacher_device"] = CPU
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_split", spy)
    trainer.run()
    trainer.test()
    assert len(seen) == 2 and all(device == sentinel for device in seen)


def test_test_and_extract_use_the_val_ratio_of_the_checkpoint_not_of_a_later_runs_config(
    machinery, machinery_teacher_path, tmp_path, caplog
):
    """A run's model_best (val_ratio 0.25), then a later raml train --overwrite --val-ratio 0.5 into the same folder
    that rewrites config.yaml at its start and stops before replacing model_best: raml test / extract used 0.5 (the
    -val classes then include ones the checkpoint trained on). The checkpoint's own record now wins, with a
    warning naming the config.yaml that disagrees; config.yaml stays the fallback of a checkpoint without one."""
    import logging

    from raml.engine.val_ratio import resolve_val_ratio
    from raml.models import save_checkpoint

    folder = tmp_path / "run"
    first = machinery.distill_config(folder, machinery_teacher_path, epochs=1, val_ratio=0.25, test_datasets=[])
    best = Trainer(first, CPU, progress=False).run().best_checkpoint
    assert load_checkpoint_file(best)["raml"]["val_ratio"] == 0.25
    # --overwrite removes the run's own model_*.pth.tar at its start: a copy under another name stays beside it
    best = Path(shutil.copyfile(best, folder / "first_best.pth.tar"))
    later = machinery.distill_config(
        folder, machinery_teacher_path, epochs=5, val_ratio=0.5, overwrite=True, test_datasets=[]
    )
    Trainer(later, CPU, progress=False).release_lock()  # started (config.yaml written), stopped before any epoch
    assert "val_ratio: 0.5" in (folder / "config.yaml").read_text()
    # its --overwrite is of that invocation: a replay of the record must not overwrite another folder
    assert "overwrite: false" in (folder / "config.yaml").read_text()
    with caplog.at_level(logging.WARNING, logger="raml"):
        assert resolve_val_ratio(None, [str(best)], "raml test") == 0.25
    assert f"records val_ratio 0.25, but the {folder / 'config.yaml'} beside it says 0.5" in caplog.text
    older = folder / "older.pth.tar"  # a checkpoint without the record: config.yaml as before
    save_checkpoint(older, load_network(best), extra={"raml": {"mode": "ts_aug"}})
    assert resolve_val_ratio(None, [str(older)], "raml extract") == 0.5
