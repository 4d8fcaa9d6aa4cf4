"""Hyper-parameter search (``--optimize``, SPEC section 5) with optuna.

TPE over lr in [1e-4, 2e-4] (log scale), lam-1 and lam-2 in [0.6, 0.8], maximising the validation mAP
with the val classes held out from training; the first trial is the values given on the command line, unclipped
(as the reference enqueues them). Our TPE sampler is seeded with ``--seed`` (the reference's is not). A
trial is scored by its last validation, as in the reference (``--search-objective best``: its best
epoch). The study lives in ``<directory>/optuna.db`` (SQLite), so an interrupted search resumes where it
stopped and several processes can work on one study; trials train in ``<directory>/trial_<n>``.
Afterwards the best values train a final model on train + val with the reference's protocol, written to
``<directory>`` itself, and that model is tested. A ``<directory>`` that already holds checkpoints is
refused before any trial runs, unless ``--overwrite`` or ``--resume-student`` says otherwise.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from raml.engine.config import TrainConfig
from raml.engine.run_lock import RUN_LOCK_COMMAND
from raml.engine.trainer import Trainer, TrainResult, refuse_existing_checkpoints
from raml.locking import DirectoryLock, LockFileError, LockHeldError

logger = logging.getLogger(__name__)

SEARCH_SPACE = {"lr": (1e-4, 2e-4), "lam_1": (0.6, 0.8), "lam_2": (0.6, 0.8)}


def _import_optuna():  # noqa: ANN202 - optional dependency
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "--optimize needs optuna, which is not installed: pip install optuna (or pip install 'raml[optimize]')"
        ) from error
    return optuna


def search(
    config: TrainConfig,
    device: torch.device,
    progress: bool = True,
    teacher_device: torch.device | None = None,
) -> dict[str, float]:
    """Run (or resume) the study until it holds ``config.trials`` finished trials; returns the best values."""
    optuna = _import_optuna()
    directory = Path(config.directory)
    directory.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(directory / 'optuna.db').resolve()}"
    study = optuna.create_study(
        study_name="raml",
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
    )
    if not study.trials:
        # The first trial evaluates the values the user gave, as given, as the reference enqueues them: a value
        # outside the range is kept (optuna warns), e.g. the reference's default --lam-1 0 --lam-2 0 makes the
        # first trial the absolute term alone.
        study.enqueue_trial({name: getattr(config, name) for name in SEARCH_SPACE})

    def objective(trial) -> float:  # noqa: ANN001 - optuna.Trial
        values = {
            "lr": trial.suggest_float("lr", *SEARCH_SPACE["lr"], log=True),
            "lam_1": trial.suggest_float("lam_1", *SEARCH_SPACE["lam_1"]),
            "lam_2": trial.suggest_float("lam_2", *SEARCH_SPACE["lam_2"]),
        }
        trial_config = config.replace(
            **values,
            directory=str(directory / f"trial_{trial.number}"),
            optimize=False,
            trainval=False,  # the search selects on the held-out val classes
            val=True,
            json=None,
            resume_student=None,
            overwrite=True,  # a trial's own folder: an interrupted trial starts over
        )
        trainer = Trainer(trial_config, device, progress=progress, teacher_device=teacher_device)
        try:
            result = trainer.run()
        finally:
            del trainer  # the last reference but the trainer <-> method cycle, which _free_memory collects
            _free_memory(device)
        score = result.best_map if config.search_objective == "best" else result.last_val_map
        if score is None:
            raise RuntimeError("A search trial produced no validation mAP.")
        return score

    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    remaining = max(0, config.trials - len(finished))
    if remaining:
        study.optimize(objective, n_trials=remaining)
    best = dict(study.best_params)
    logger.info("Best search values: %s (val mAP %.2f)", best, study.best_value)
    return best


def _free_memory(device: torch.device) -> None:
    """Free a finished trial's networks, gradients and optimizer state now, not when the cyclic garbage
    collector next runs (the trainer and its method refer to each other): on a GPU the next trial would
    otherwise start with the last one's memory still held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def optimize_and_train(
    config: TrainConfig,
    device: torch.device,
    progress: bool = True,
    teacher_device: torch.device | None = None,
) -> tuple[dict, TrainResult]:
    """Search, then train on train + val with the best values (the test datasets monitored) and test.

    The run folder is locked from before the study is opened to the end of the final test (one lock, handed to
    the final run's trainer): a second ``--optimize`` or ``raml train`` into the folder is refused at once,
    rather than after a whole search, and nothing of the first run's study or checkpoints is touched.
    """
    _import_optuna()
    lock = DirectoryLock(config.directory, f"{RUN_LOCK_COMMAND} --optimize")
    try:
        lock.acquire()
    except OSError as error:
        if not isinstance(error, (LockHeldError, LockFileError)):
            refuse_existing_checkpoints(config)  # a file where the folder should be: its own message
        raise
    try:
        refuse_existing_checkpoints(config)  # before any trial: the final run would replace them
        best = search(config, device, progress, teacher_device)
        final = config.replace(**best, optimize=False, trainval=True)
        # the run folder stays locked through the final test, as in a plain raml train
        trainer = Trainer(final, device, progress=progress, teacher_device=teacher_device, held_lock=lock)
        result = trainer.run()
        result.test = trainer.test() if final.test_datasets else {}
    finally:
        lock.release()
    return best, result
