"""Checks of ``--resume-student``: is the checkpoint one this run can continue, exactly?

A training checkpoint written by :class:`raml.engine.trainer.Trainer` records its run's settings in
``checkpoint["raml"]`` (mode, image sizes, teacher, training dataset, protocol, optimizer, scheduler). Resuming
it with other settings would go on silently with a run that is neither the old one nor a new one, so every
stored field is compared with the new configuration before anything is written, and the differences are
refused in one message. Fields a checkpoint lacks (the reference implementation's training checkpoints,
published networks, checkpoints of older versions) are not compared: such files resume as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from raml.engine.config import TrainConfig

#: the run fields stored in ``checkpoint["raml"]`` that a resumed run must share, with the flag that sets each
RUN_FIELDS: dict[str, str] = {
    "mode": "--mode",
    "image_size": "--image-size",
    "teacher_image_size": "--teacher-image-size",
    "teacher_sha256": "--teacher-path",
    "training_dataset": "--training-dataset",
    "trainval": "--select-on-val",
}


def run_fields(config: TrainConfig, teacher_sha256: str | None) -> dict[str, Any]:
    """This run's values of :data:`RUN_FIELDS` (what :meth:`Trainer._save` stores)."""
    return {
        "mode": config.mode,
        "image_size": config.image_size,
        "teacher_image_size": config.teacher_image_size,
        "teacher_sha256": teacher_sha256,
        "training_dataset": config.training_dataset,
        "trainval": config.trainval,
    }


def _shown(name: str, value: Any) -> str:
    if name == "trainval":
        return "train + val (the reference's protocol)" if value else "--select-on-val (train only)"
    if name == "teacher_sha256":
        return "no teacher file" if value is None else f"a teacher file of SHA-256 {str(value)[:12]}..."
    return repr(value)


def check_run_fields(stored: dict[str, Any], ours: dict[str, Any], path: Path) -> None:
    """Refuse (``ValueError``) a checkpoint whose stored run fields differ from this run's, listing each
    difference; fields the checkpoint does not store are not compared."""
    differences = [
        f"{RUN_FIELDS.get(name, name)}: checkpoint {_shown(name, stored[name])}, asked {_shown(name, value)}"
        for name, value in ours.items()
        if name in stored and stored[name] != value
    ]
    if differences:
        raise ValueError(
            f"--resume-student {path} was written by a run with other settings; nothing was changed:\n  - "
            + "\n  - ".join(differences)
            + "\nResume with the checkpoint's own settings (its run's config.yaml lists them), or start a new run "
            "from its weights in another --directory with --student-path."
        )
