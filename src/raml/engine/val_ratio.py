"""The ``val_ratio`` a checkpoint's training recorded (its own ``"raml"`` record, else the ``config.yaml`` beside
it), and the one ``raml test`` and ``raml extract`` use for their splits (:func:`resolve_val_ratio`)."""

from __future__ import annotations

import logging
from pathlib import Path

from raml.engine.config import RUN_CONFIG_NAME

logger = logging.getLogger(__name__)


def default_val_ratio() -> float:
    """The library's default ``val_ratio`` (:attr:`raml.engine.config.TrainConfig.val_ratio`)."""
    from raml.engine.config import TrainConfig

    return TrainConfig.val_ratio


def valid_val_ratio(value: object) -> bool:
    """Whether ``value`` is a number (not a bool) in [0, 1)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0.0 <= value < 1.0


def checkpoint_val_ratio(path: Path) -> float | None:
    """The ``val_ratio`` a ``raml train`` checkpoint records in its own ``"raml"`` record (written by
    :meth:`raml.engine.trainer.Trainer._save`), or None: an older checkpoint, another program's, or a file this
    cannot read (the network's own load reports that). The tensors are memory-mapped, not read
    (:func:`raml.models.checkpoints.run_record`)."""
    from raml.models.checkpoints import run_record

    record = run_record(path)
    value = record.get("val_ratio") if record is not None else None
    return float(value) if valid_val_ratio(value) else None


def _config_val_ratio(path: Path) -> tuple[float, Path] | None:
    """The ``val_ratio`` of the ``config.yaml`` beside the checkpoint ``path``, with that file; None without one.
    A ``config.yaml`` that cannot be read or holds no valid ``val_ratio`` is ignored, with a warning."""
    config = path.parent / RUN_CONFIG_NAME
    if not config.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        logger.warning("Ignoring %s beside the checkpoint %s: cannot read it (%s).", config, path, error)
        return None
    value = data.get("val_ratio") if isinstance(data, dict) else None
    if value is None:
        return None
    if not valid_val_ratio(value):
        logger.warning("Ignoring val_ratio %r in %s: expected a number in [0, 1).", value, config)
        return None
    return float(value), config


def recorded_val_ratio(checkpoint: str | Path | None) -> tuple[float, Path] | None:
    """The ``val_ratio`` of the training run a checkpoint file comes from, with the file that records it; None for
    a name, a missing file, or nothing recorded.

    The checkpoint's own record comes first (:func:`checkpoint_val_ratio`): the ``config.yaml`` in its folder
    is rewritten at the start of every ``raml train`` into that folder (``--overwrite``), before that run
    replaces (or without it ever replacing) an older run's ``model_best``. A ``config.yaml`` that disagrees is
    named in a warning; for a checkpoint without a record (written before the record held ``val_ratio``) it is
    the fallback."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        return None
    own = checkpoint_val_ratio(path)
    config = _config_val_ratio(path)
    if own is None:
        return config
    if config is not None and config[0] != own:
        logger.warning(
            "The checkpoint %s records val_ratio %s, but the %s beside it says %s (a later raml train into that "
            "folder, which has not replaced this checkpoint): the checkpoint's own %s is used.",
            path,
            own,
            config[1],
            config[0],
            own,
        )
    return own, path


def resolve_val_ratio(given: float | None, checkpoints: list[str | None], command: str) -> float:
    """The val_ratio a command's splits use: ``given`` (``--val-ratio``) when set, else the one recorded by the
    first of ``checkpoints`` that has one (:func:`recorded_val_ratio`), else the library's default. A given
    value that differs from the recorded one is used, with a warning (its -val classes are not the run's)."""
    recorded = next((r for r in map(recorded_val_ratio, checkpoints) if r is not None), None)
    if given is None:
        if recorded is None:
            return default_val_ratio()
        logger.info("%s: --val-ratio %s, as recorded in %s.", command, recorded[0], recorded[1])
        return recorded[0]
    if recorded is not None and recorded[0] != given:
        logger.warning(
            "%s: --val-ratio %s differs from the val_ratio %s the checkpoint's training used (%s): the -val, "
            "-train and -trainval parts of registered datasets then hold other classes than that run's (a -val "
            "split may include classes it trained on). Drop --val-ratio to use the recorded value.",
            command,
            given,
            recorded[0],
            recorded[1],
        )
    return given
