"""Hyper-parameter search (``--optimize``, SPEC section 5) with optuna.

TPE over lr in [1e-4, 2e-4] (log scale), and for ``--mode ts_aug`` lam-1 and lam-2 in [0.6, 0.8] (the
settings the method reads, its ``Method.searched``: the other modes search lr alone, where the reference also
draws lambdas its ts_reg and sym losses never read), maximising the validation mAP
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
from raml.engine.methods import method_class
from raml.engine.run_lock import RUN_LOCK_COMMAND
from raml.engine.trainer import Trainer, TrainResult, refuse_existing_checkpoints
from raml.locking import DirectoryLock, LockFileError, LockHeldError

logger = logging.getLogger(__name__)

#: every searchable setting and its range (lr on a log scale); a method searches those it names (Method.searched)
SEARCH_SPACE = {"lr": (1e-4, 2e-4), "lam_1": (0.6, 0.8), "lam_2": (0.6, 0.8)}
#: the settings searched on a log scale
LOG_SCALE = ("lr",)


def search_space(config: TrainConfig) -> dict[str, tuple[float, float]]:
    """The ranges ``--optimize`` searches for ``config``'s method, in :data:`SEARCH_SPACE`'s order.

    Raises:
        ValueError: the method names a setting :data:`SEARCH_SPACE` does not hold.
    """
    cls = method_class(config.mode, config.loss)
    unknown = [name for name in cls.searched if name not in SEARCH_SPACE]
    if unknown:
        raise ValueError(
            f"{cls.__name__}.searched names {', '.join(unknown)}, which --optimize cannot search; name settings of "
            f"raml.engine.search.SEARCH_SPACE ({', '.join(SEARCH_SPACE)})."
        )
    return {name: bounds for name, bounds in SEARCH_SPACE.items() if name in cls.searched}


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
    space = search_space(config)
    if not study.trials:
        # The first trial evaluates the values the user gave, as given, as the reference enqueues them: a value
        # outside the range is kept (optuna warns), e.g. the reference's default --lam-1 0 --lam-2 0 makes the
        # first trial the absolute term alone.
        study.enqueue_trial({name: getattr(config, name) for name in space})

    def objective(trial) -> float:  # noqa: ANN001 - optuna.Trial
        values = {name: trial.suggest_float(name, *bounds, log=name in LOG_SCALE) for name, bounds in space.items()}
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
    # only this method's settings (a study resumed from an older version may hold others)
    best = {name: value for name, value in study.best_params.items() if name in space}
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
