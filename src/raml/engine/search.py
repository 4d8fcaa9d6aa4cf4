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

The study records the settings that define its trials (:func:`search_settings`: the method, loss, data, schedule,
the searched ranges, ...) in its ``user_attrs``; a search resumed with other settings is refused before any
trial (its trials scored another objective, and its best values would be reported as this search's). With
``--overwrite`` the old study is deleted and a new one started, once every check before the first trial passed.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch

from raml.engine.config import PER_INVOCATION, TrainConfig
from raml.engine.methods import method_class
from raml.engine.run_lock import RUN_LOCK_COMMAND
from raml.engine.trainer import Trainer, TrainResult, refuse_existing_checkpoints, refuse_replacing_run_config
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


#: the study's user attribute that holds :func:`search_settings`
SETTINGS_ATTR = "raml_search_settings"
#: settings that do not change what a trial scores: where and how often things are written or shown, the
#: machine, the number of trials, what only the final run reads (its train + val protocol, its test datasets);
#: the searched settings' given values only start a new study (its first trial)
_NOT_SEARCH_SETTINGS = (
    *PER_INVOCATION,
    "directory",
    "data_root",
    "optimize",
    "val",
    "trials",
    "trainval",
    "test_datasets",
    "save_freq",
    "workers",
    "device",
    "gpu_id",
    "print_freq",
    "comment",
    "logger",
    "eval_batch_size",
)


def search_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings that define ``config``'s search, as a study stores them (JSON values): every setting that
    changes what a trial scores, and the searched ranges (``search_space``) with their scale."""
    space = search_space(config)
    settings = {
        name: value
        for name, value in config.to_dict().items()
        if name not in _NOT_SEARCH_SETTINGS and name not in space
    }
    settings["search_space"] = {name: [low, high, name in LOG_SCALE] for name, (low, high) in space.items()}
    return json.loads(json.dumps(settings))


def _flag(name: str) -> str:
    return "the searched ranges" if name == "search_space" else f"--{name.replace('_', '-')}"


def _shown(value: Any) -> str:
    if isinstance(value, dict):  # search ranges: lr in [0.0001, 0.0002] (log), ...
        return (
            ", ".join(
                f"{name} in [{bounds[0]:g}, {bounds[1]:g}]{' (log)' if bounds[2] else ''}"
                if isinstance(bounds, list) and len(bounds) == 3
                else f"{name} {bounds!r}"
                for name, bounds in value.items()
            )
            or "none"
        )
    return repr(value)


def _study_mismatch(study: Any, ours: dict[str, Any]) -> str | None:
    """Why a stored study is not this search's (other settings, or trials without a record of them: an older raml
    version), or None when it is (or when it is empty and records nothing)."""
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        return "a search study that does not record its settings (an older raml)" if study.trials else None
    # a setting searched on one side only is absent from the other's settings: the ranges tell that difference
    differing = sorted(name for name in set(stored) & set(ours) if stored[name] != ours[name])
    if not differing:
        return None
    shown = "; ".join(f"{_flag(n)}: study {_shown(stored[n])}, asked {_shown(ours[n])}" for n in differing)
    return f"a search study made with other settings ({shown})"


def _check_study_settings(study: Any, ours: dict[str, Any], path: Path) -> None:
    """Refuse (``ValueError``, one line) a study made with other search settings, or one with trials that records
    none (made by an older version): its trials would be counted and its best values reported as this search's."""
    mismatch = _study_mismatch(study, ours)
    if mismatch is not None:
        raise ValueError(
            f"{path} holds {mismatch}. Nothing was changed. Use another --directory for this search, or pass "
            "--overwrite to start a new study in this one (the old study's trials are deleted)."
        )


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
    """Run (or resume) the study until it holds ``config.trials`` finished trials; returns the best values.

    Raises:
        ValueError: ``<directory>/optuna.db`` holds a study made with other search settings (see
            :func:`search_settings`), or one with trials that records none, and ``config.overwrite`` is not set
            (with it, that study is deleted and a new one started; a study of the same settings resumes either
            way).
    """
    optuna = _import_optuna()
    space = search_space(config)
    settings = search_settings(config)
    directory = Path(config.directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "optuna.db"
    storage = f"sqlite:///{path.resolve()}"
    if config.overwrite and path.exists():
        try:
            old = optuna.load_study(study_name="raml", storage=storage)
        except KeyError:  # the file holds no study of that name
            old = None
        if old is not None and _study_mismatch(old, settings) is not None:
            optuna.delete_study(study_name="raml", storage=storage)
            logger.info("--overwrite: deleted the search study of other settings in %s; a new one starts.", path)
        elif old is not None and old.trials:
            # the same search, interrupted (e.g. started with --overwrite over an earlier run's checkpoints, which
            # stay until the final run): it resumes; delete optuna.db to search again from scratch
            logger.info("The search study in %s has these settings: it resumes (%d trials).", path, len(old.trials))
    study = optuna.create_study(
        study_name="raml",
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
    )
    _check_study_settings(study, settings, path)
    study.set_user_attr(SETTINGS_ATTR, settings)
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
        refuse_replacing_run_config(config)  # and its config.yaml: refused after the whole search otherwise
        best = search(config, device, progress, teacher_device)
        final = config.replace(**best, optimize=False, trainval=True)
        # the run folder stays locked through the final test, as in a plain raml train
        trainer = Trainer(final, device, progress=progress, teacher_device=teacher_device, held_lock=lock)
        result = trainer.run()
        result.test = trainer.test() if final.test_datasets else {}
    finally:
        lock.release()
    return best, result
