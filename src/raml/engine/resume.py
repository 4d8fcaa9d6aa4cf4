"""Checks of ``--resume-student``: is the checkpoint one this run can continue, exactly?

A training checkpoint written by :class:`raml.engine.trainer.Trainer` records its run's settings in
``checkpoint["raml"]`` (mode, image sizes, teacher, training dataset, protocol, optimizer, scheduler). Resuming
it with other settings would go on silently with a run that is neither the old one nor a new one, so every
stored field is compared with the new configuration before anything is written, and the differences are
refused in one message. Fields a checkpoint lacks (the reference implementation's training checkpoints,
published networks, checkpoints of older versions) are not compared: such files resume as before.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raml.models.checkpoints import CheckpointError, InvalidCheckpointError, load_checkpoint_file
from raml.models.restricted_pickle import check_declared_sizes, is_torchscript_archive, torch_load_mapped

if TYPE_CHECKING:
    from raml.engine.config import TrainConfig

logger = logging.getLogger(__name__)

BEST_NAME = "model_best.pth.tar"

#: the run fields stored in ``checkpoint["raml"]`` that a resumed run must share, with the flag that sets each
RUN_FIELDS: dict[str, str] = {
    "mode": "--mode",
    "image_size": "--image-size",
    "image_sizes": "--image-size",
    "teacher_image_size": "--teacher-image-size",
    "teacher_sha256": "--teacher-path",
    "training_dataset": "--training-dataset",
    "trainval": "--select-on-val",
    "val_ratio": "--val-ratio",
    "optimizer": "--optimizer",
    "scheduler": "--scheduler",
    # the optimizer's state restores its parameter groups' own values: another value asked would be ignored
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "momentum": "--momentum",
    # the step after training: a finished run resumed with the flag flipped would keep (or add) per-size statistics
    # in a model_best the run's settings do not describe, and an interrupted one would end otherwise than it began
    "per_size_bn": "--per-size-bn",
}

#: parameter-group entries that each optimizer needs and the others lack: an optimizer state saved by another
#: optimizer (a checkpoint that does not store its optimizer's name) would fail in the first step
_OPTIMIZER_GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "dampening", "nesterov"),
    "adam": ("betas", "amsgrad"),
    "adamW": ("betas", "amsgrad"),
}


def resume_candidates(name: str, directory: Path) -> list[Path]:
    """Where ``--resume-student NAME`` (not ``last``) is looked for, in order: a relative name in ``--directory``
    first (the reference joins the two), then as given."""
    given = Path(name)
    return [given] if given.is_absolute() else [directory / given, given]


def resumes_inside(config: TrainConfig) -> bool:
    """Whether ``--resume-student`` continues a checkpoint of ``--directory`` itself (``last`` does; a file is
    compared resolved). A checkpoint found nowhere counts as inside: the resume refuses it before any write."""
    if config.resume_student is None:
        return False
    if config.resume_student == "last":
        return True
    directory = Path(config.directory)
    found = next((p for p in resume_candidates(config.resume_student, directory) if p.is_file()), None)
    return found is None or found.resolve().is_relative_to(directory.resolve())


def run_fields(config: TrainConfig, teacher_sha256: str | None) -> dict[str, Any]:
    """This run's values of :data:`RUN_FIELDS` (what :meth:`Trainer._save` stores). ``val_ratio`` only where it
    chooses the training classes (``--select-on-val``): a train + val run trains on every class whatever it is;
    ``momentum`` only for ``--optimizer sgd``, the one optimizer that reads it."""
    fields = {
        "mode": config.mode,
        "image_size": config.image_size,
        "image_sizes": config.student_sizes(),
        "teacher_image_size": config.teacher_image_size,
        "teacher_sha256": teacher_sha256,
        "training_dataset": config.training_dataset,
        "trainval": config.trainval,
        "optimizer": config.optimizer,
        "scheduler": config.scheduler,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "per_size_bn": config.per_size_bn,
    }
    if config.optimizer == "sgd":
        fields["momentum"] = config.momentum
    if not config.trainval:
        fields["val_ratio"] = config.val_ratio
    return fields


def _shown(name: str, value: Any) -> str:
    if name == "image_sizes" and isinstance(value, list):  # as --image-size is spelled: 32, or 16,24
        return ",".join(map(str, value))
    if name == "trainval":
        return "train + val (the reference's protocol)" if value else "--select-on-val (train only)"
    if name == "per_size_bn":
        return "on" if value else "off"
    if name == "teacher_sha256":
        return "no teacher file" if value is None else f"a teacher file of SHA-256 {str(value)[:12]}..."
    return repr(value)


def check_run_fields(stored: dict[str, Any], ours: dict[str, Any], path: Path) -> None:
    """Refuse (``ValueError``) a checkpoint whose stored run fields differ from this run's, listing each
    difference; fields the checkpoint does not store are not compared."""
    differing = [name for name, value in ours.items() if name in stored and stored[name] != value]
    if "image_sizes" in differing and "image_size" in differing:  # the list says it (its first size included)
        differing.remove("image_size")
    differences = [
        f"{RUN_FIELDS.get(name, name)}: checkpoint {_shown(name, stored[name])}, asked {_shown(name, ours[name])}"
        for name in differing
    ]
    if differences:
        raise ValueError(
            f"--resume-student {path} was written by a run with other settings; nothing was changed:\n  - "
            + "\n  - ".join(differences)
            + "\nResume with the checkpoint's own settings (its run's config.yaml lists them), or start a new run "
            "from its weights in another --directory with --student-path."
        )


_SETTINGS_HINT = (
    "Resume with the checkpoint's own --optimizer and --scheduler (its run's config.yaml lists them), or start a "
    "new run from its weights in another --directory with --student-path."
)


def check_optimizer_state(saved: dict[str, Any], optimizer_name: str, path: Path) -> None:
    """Refuse (``ValueError``) an optimizer state whose parameter groups lack what ``optimizer_name`` needs (it
    was saved by another optimizer), instead of a ``KeyError`` in the first step."""
    needed = _OPTIMIZER_GROUP_KEYS.get(optimizer_name, ())
    groups = saved.get("param_groups") or []
    absent = sorted({key for group in groups for key in needed if key not in group})
    if absent:
        found = sorted({key for group in groups for key in group if key not in ("params", "name")})
        raise ValueError(
            f"--resume-student {path}: its optimizer state was not saved by --optimizer {optimizer_name} (its "
            f"parameter groups lack {', '.join(absent)}; they hold {', '.join(found)}); nothing was changed. "
            + _SETTINGS_HINT
        )


def _shape(shape: Any) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def check_optimizer_tensors(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Refuse (:class:`CheckpointError`) an optimizer state whose tensors ``optimizer.load_state_dict`` would
    materialise beyond what the run holds, before it is given them.

    Each per-parameter tensor (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``; a 0-d ``step`` is
    fine) must have its parameter's shape, and no tensor may declare more elements than its storage holds (an
    optimizer writes its state whole; a stride-0 view of one stored value declaring millions of elements would be
    copied out, and cast to the parameter's dtype, by ``load_state_dict``). Parameters are matched to the saved
    indices as ``load_state_dict`` matches them (group by group, in order); groups that do not match are left to
    it, which refuses them.
    """
    state = saved.get("state")
    if not isinstance(state, dict):
        return
    groups = saved.get("param_groups")
    parameters: dict[Any, torch.Tensor] = {}
    if isinstance(groups, list) and len(groups) == len(optimizer.param_groups):
        for group, ours in zip(groups, optimizer.param_groups):
            indices = group.get("params") if isinstance(group, dict) else None
            if isinstance(indices, list) and len(indices) == len(ours["params"]):
                for index, parameter in zip(indices, ours["params"]):
                    if isinstance(index, (int, str)):
                        parameters[index] = parameter
    for index, entry in state.items():
        if not isinstance(entry, dict):
            continue
        parameter = parameters.get(index)
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            where = f"the state {name!r} of its parameter {index!r}"
            capacity = value.untyped_storage().nbytes() // max(value.element_size(), 1)
            if value.numel() > capacity:
                raise CheckpointError(
                    f"--resume-student {path}: its optimizer state is not one an optimizer saved: {where} declares "
                    f"{value.numel()} elements (shape {_shape(value.shape)}) over a storage of {capacity}; nothing "
                    "was changed. Resume from another checkpoint of the run, or start a new run from its weights "
                    "with --student-path."
                )
            if parameter is not None and value.dim() > 0 and value.shape != parameter.shape:
                raise CheckpointError(
                    f"--resume-student {path}: its optimizer state does not fit this run's network: {where} has "
                    f"shape {_shape(value.shape)}, the parameter {_shape(parameter.shape)}; nothing was changed. "
                    "Resume from a checkpoint of this run (--resume-student last), or start a new run from its "
                    "weights with --student-path."
                )


def load_scheduler_state(scheduler: Any, saved: dict[str, Any], scheduler_name: str, path: Path) -> None:
    """``scheduler.load_state_dict(saved)``; a state saved by another kind of scheduler is refused
    (``ValueError``) rather than raising torch's ``KeyError``."""
    try:
        scheduler.load_state_dict(saved)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"--resume-student {path}: its learning-rate schedule was not saved by --scheduler {scheduler_name} "
            f"({type(error).__name__}: {error}); nothing was changed. " + _SETTINGS_HINT
        ) from error


#: the checkpoint a signal leaves part-way through an epoch
INTERRUPTED_NAME = "model_interrupted.pth.tar"


def check_not_interrupted(stored: dict[str, Any], path: Path) -> None:
    """Refuse (``ValueError``) a checkpoint saved part-way through an epoch (``model_interrupted.pth.tar``, which
    records ``interrupted_in``; one of an earlier raml version, without it, is known by its name), whatever the
    scheduler: its weights and optimizer state are those of the moment a
    signal stopped the run, not of the finished epoch it is labelled with, so resuming it would replay that epoch
    from there. A per-epoch schedule (or none) has not moved mid-epoch, so :func:`check_schedule_position` alone
    cannot tell."""
    epoch = stored.get("interrupted_in")
    if epoch is not None:
        when = f"epoch {epoch}"
    elif path.name == INTERRUPTED_NAME:  # an earlier raml version's: its name says what it is
        when = "an epoch (an earlier raml version wrote it, without the epoch)"
    else:
        return
    raise ValueError(
        f"--resume-student {path}: this checkpoint was saved part-way through {when}, when a signal stopped "
        "the run (model_interrupted.pth.tar); it cannot be resumed, since the run would replay that epoch from "
        "those weights. Nothing was changed. Resume from the last finished epoch: --resume-student last "
        "(model_last.pth.tar or model_epoch<N>.pth.tar), or start a new run from its weights with --student-path "
        "(a copy outside --directory, if the new run uses that folder with --overwrite)."
    )


def check_schedule_position(
    saved: dict[str, Any], epoch: int, steps_per_epoch: int, per_step: bool, path: Path
) -> None:
    """Refuse (``ValueError``) a checkpoint whose learning-rate schedule is not where its epoch says.

    A checkpoint of epoch ``E`` must hold a schedule stepped ``E x steps_per_epoch`` times (per-step schedules)
    or ``E`` times (per-epoch ones). ``model_interrupted.pth.tar`` is labelled with the last finished epoch but
    holds the weights, optimizer and schedule of the moment a signal stopped the run, part-way through the
    next one: resuming it would replay that epoch from there and overrun the schedule near its end.
    """
    position = saved.get("last_epoch")
    if not isinstance(position, int):
        return
    expected = epoch * steps_per_epoch if per_step else epoch
    if position == expected:
        return
    unit = f"{steps_per_epoch} optimizer steps per epoch" if per_step else "one step per epoch"
    raise ValueError(
        f"--resume-student {path}: its learning-rate schedule was stepped {position} times, but a checkpoint of "
        f"epoch {epoch} of this run is at step {expected} ({unit}): it was saved part-way through an epoch "
        "(model_interrupted.pth.tar holds the moment a signal stopped the run, not a finished epoch) or by a run "
        "of other settings. Nothing was changed. Resume from the last finished epoch: --resume-student last "
        "(model_last.pth.tar or model_epoch<N>.pth.tar), or start a new run from its weights with --student-path "
        "(a copy outside --directory, if the new run uses that folder with --overwrite)."
    )


def _damaged(path: Path, detail: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(
        f"--resume-student {path}: this training checkpoint is damaged ({detail}), e.g. truncated by a full disk "
        "or a copy cut short. Resume from another checkpoint of the run: --resume-student last skips damaged "
        "ones, or name a model_epoch<N>.pth.tar; or start a new run without --resume-student.",
        detail,
    )


def _check_image_sizes(meta: Any, path: Path) -> None:
    """Refuse (:class:`CheckpointError`) a ``meta["image_sizes"]`` that is not a list of positive integers: read by
    :func:`trained_image_sizes`, it would end in a bare ``ValueError`` or ``TypeError``."""
    sizes = meta.get("image_sizes") if isinstance(meta, dict) else None
    if sizes is None:
        return
    if isinstance(sizes, list):
        if all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            return
        shown = "a list holding other values than positive integers"
    else:
        shown = repr(sizes)[:60] if isinstance(sizes, (str, int, float)) else f"a {type(sizes).__name__}"
    raise CheckpointError(
        f"--resume-student {path}: its meta's 'image_sizes' is {shown}, a list of positive integers (the student "
        "sizes it was trained at) expected; the file was damaged or not written by raml. Resume from another "
        "checkpoint of the run (--resume-student last), or start a new run without --resume-student."
    )


def load_resume_checkpoint(path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint_file`, with a message for a damaged file that fits a training checkpoint.

    The run fields of its ``raml`` section get ``image_sizes``, the student sizes it was trained at (see
    :func:`trained_image_sizes`), so that :func:`check_run_fields` compares the whole ``--image-size`` list.
    """
    try:
        checkpoint = load_checkpoint_file(path)
    except InvalidCheckpointError as error:
        raise _damaged(path, error.detail) from error
    stored = checkpoint.get("raml")
    _check_image_sizes(checkpoint.get("meta"), path)
    if isinstance(stored, dict) and "image_sizes" not in stored:
        sizes = trained_image_sizes(stored, checkpoint.get("meta"))
        if sizes is not None:
            stored["image_sizes"] = sizes
    return checkpoint


def trained_image_sizes(stored: dict[str, Any], meta: Any) -> list[int] | None:
    """The student sizes a raml training checkpoint was trained at: ``meta["image_sizes"]`` (written for several
    sizes), else its one ``image_size``; ``None`` for a checkpoint that records no size (the reference's, a
    published network): not compared, as every field such files lack."""
    sizes = meta.get("image_sizes") if isinstance(meta, dict) else None
    if isinstance(sizes, list) and sizes:
        return [int(size) for size in sizes]
    if isinstance(stored.get("image_size"), int):
        return [stored["image_size"]]
    return None


def _declares_no_more_than_it_holds(handle: Any) -> bool:
    """Whether the open checkpoint passes :func:`check_declared_sizes` (a file asking for more memory than it holds,
    or one whose pickle cannot be read, is left to :func:`load_checkpoint_file`, which refuses it by name)."""
    handle.seek(0)
    try:
        check_declared_sizes(handle)
    except Exception:  # noqa: BLE001 - DeclaredSizeError, or any error of an unreadable pickle: the loader decides
        return False
    return True


def checkpoint_epoch(path: Path) -> int:
    """The ``epoch`` of a training checkpoint, read without loading its tensors where possible: a file that
    loads with ``weights_only=True`` is memory-mapped (its tensors stay on disk); any other (one that needs the
    restricted unpickler, as the reference's, or one in torch's legacy non-zip format) is read by
    :func:`load_checkpoint_file`. A file that cannot be read
    raises :class:`CheckpointError`."""
    with open(path, "rb") as handle:
        try:
            torchscript = is_torchscript_archive(handle)
        except zipfile.BadZipFile as error:
            raise _damaged(path, str(error)) from error
        sized = torchscript is None and _declares_no_more_than_it_holds(handle)
        checkpoint: Any = None
        if sized:
            try:
                checkpoint = torch_load_mapped(handle)  # the very file checked
            except Exception:  # noqa: BLE001 - the fast path declined it: the full reader decides
                # a checkpoint that needs the restricted unpickler (the reference's), one in torch's legacy non-zip
                # format (mmap needs the zip format) or a damaged file: load_checkpoint_file reads the first two and
                # names damage
                sized = False
    if not sized:  # never given to torch.load here; load_checkpoint_file says why
        checkpoint = load_resume_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise _damaged(path, f"it holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return int(checkpoint.get("epoch", 0))


def last_checkpoint(directory: Path) -> Path:
    """The newest finished-epoch checkpoint in ``directory`` (``--resume-student last``): the highest epoch,
    ``model_last.pth.tar`` before a ``model_epoch<N>.pth.tar`` of the same epoch. Damaged candidates are skipped
    with a warning naming them."""
    candidates = sorted(
        p for p in directory.glob("model_*.pth.tar") if p.name != BEST_NAME and "interrupted" not in p.name
    )
    if not candidates:
        raise FileNotFoundError(
            f"--resume-student last: {directory} holds no training checkpoint (model_last.pth.tar or "
            "model_epoch<N>.pth.tar); start without --resume-student or name a checkpoint file."
        )
    epochs: dict[Path, int] = {}
    damaged: list[str] = []
    for path in candidates:
        try:
            epochs[path] = checkpoint_epoch(path)
        except CheckpointError as error:
            damaged.append(f"{path.name} ({getattr(error, 'detail', error)})")
    if damaged:
        logger.warning("--resume-student last: skipped damaged checkpoints: %s", "; ".join(damaged))
    if not epochs:
        raise CheckpointError(
            f"--resume-student last: every training checkpoint in {directory} is damaged: {'; '.join(damaged)}. "
            "Start a new run (without --resume-student, with --overwrite), or restore a checkpoint from a backup."
        )
    return max(epochs, key=lambda p: (epochs[p], p.name == "model_last.pth.tar"))
