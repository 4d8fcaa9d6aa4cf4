"""The training loop, reading top to bottom; what is trained how is a method's (:mod:`raml.engine.methods`).

``--mode NAME`` selects a method through the registry :data:`raml.engine.methods.METHODS`: the paper's
``ts_aug`` (coupled views, mixup, distillation loss), ``ts_reg`` (regression on the teacher's cached
embeddings), ``sym`` (labels: triplet or normalised softmax), and the other asymmetric distillers (``aml``,
``rkd``, ``csd``, ``d3``). A method gives the epoch's batches and the loss of one batch; this module does the
rest.

Shared by all: the student's BatchNorm statistics stay frozen (eval mode) while its weights learn; the
teacher is frozen and always in eval mode; gradients accumulate over ``update_every`` batches (the last
incomplete accumulation of an epoch is dropped, as in the reference, unless ``--flush-accumulation``);
each epoch reseeds with ``seed + epoch`` so that a resumed run continues exactly as an uninterrupted one.

The protocol (SPEC section 3) is the reference's by default: train on train + val, evaluate the test
datasets every ``--val-freq`` epochs as monitoring only (nothing is selected on them), save the last
epoch as ``model_best.pth.tar`` and test it. ``--select-on-val`` (``trainval=False``) trains on the train
classes only, validates on the held-out val classes and keeps the epoch with the best val mAP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from raml.data.check import BadImage, apply_bad_image_policy, report_file_name, write_bad_image_report
from raml.data.splits import Split, get_split
from raml.distributed import (
    SINGLE,
    DistContext,
    all_reduce_min_,
    all_reduce_sum_,
    broadcast_object,
    no_rows,
    shard_bounds,
)
from raml.engine.config import MAX_CONFIG_BYTES, RUN_CONFIG_NAME, TrainConfig, part_name
from raml.engine.device import AutocastForward, amp_active
from raml.engine.guard import gradients_finite, nonfinite_parameters
from raml.engine.methods import method_class
from raml.engine.methods.base import BatchLoss, Method, check_batch_loss
from raml.engine.optim import PER_STEP_SCHEDULERS, build_optimizer, build_scheduler, reference_schedule_lengths
from raml.engine.resume import (
    check_not_interrupted,
    check_optimizer_state,
    check_optimizer_tensors,
    check_run_fields,
    check_schedule_position,
    last_checkpoint,
    load_resume_checkpoint,
    load_scheduler_state,
    resume_candidates,
    resumes_inside,
    run_fields,
)
from raml.engine.run_lock import RunLockRefusedError, acquire_run_lock
from raml.locking import DirectoryLock, LockFileError, LockHeldError
from raml.models import build_network, load_network, save_checkpoint
from raml.models.checkpoints import CheckpointError
from raml.retrieval.cache import EmbeddingCache
from raml.retrieval.evaluate import check_compatible, default_ks, evaluate_split
from raml.retrieval.extract import extract_embeddings_sharded, network_mean_std
from raml.retrieval.metrics import retrieval_metrics
from raml.utils import atomic_duplicate, atomic_write_text, file_sha256, seed_everything

logger = logging.getLogger(__name__)

BEST_NAME = "model_best.pth.tar"

#: the names of the training checkpoints a run writes into its folder (what ``--overwrite`` removes of a previous run)
_RUN_CHECKPOINT = re.compile(r"model_(best|last|interrupted|epoch\d+)\.pth\.tar")

#: the other files a run writes into its folder, besides config.yaml (replaced as a whole at every start): the
#: reports of the images --bad-images skip left out (raml.data.check.report_file_name), and the event files of
#: --logger tensorboard in its tensorboard/ subfolder (each run adds its own); --overwrite removes a previous run's
_RUN_REPORT = re.compile(r"skipped_images_[A-Za-z0-9._-]+\.txt")
_TENSORBOARD_FOLDER = "tensorboard"
_TENSORBOARD_EVENTS = re.compile(r"events\.out\.tfevents\..+")

#: the temporary files (raml.utils.atomic_path: ``.<name>.<8 hex>.tmp``) of the outputs a run writes in its folder
_RUN_TEMPORARY = re.compile(
    r"\.(config\.yaml|model_(best|last|interrupted|epoch\d+)\.pth\.tar|skipped_images_[A-Za-z0-9._-]+\.txt)"
    r"\.[0-9a-f]{8}\.tmp"
)

#: "no non-finite loss yet" in the device-side record of the first batch whose loss was NaN or infinite
_ALL_FINITE = 2**62


class TrainingInterrupted(RuntimeError):
    """Raised by a ``stop_after_epoch`` hook (tests) or a signal after the last checkpoint was saved."""


class NonFiniteLossError(RuntimeError):
    """The loss, its gradients or the weights became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------- networks
class FrozenTeacher(nn.Module):
    """A teacher that cannot learn and cannot leave eval mode, whatever ``.train()`` calls reach it."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval()
        self.network.requires_grad_(False)
        self.meta = getattr(network, "meta", {})

    def train(self, mode: bool = True) -> FrozenTeacher:  # noqa: ARG002 - the mode is ignored on purpose
        self.network.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def student_train_mode(student: nn.Module, freeze_bn: bool = True) -> None:
    """Train mode; with ``freeze_bn`` the BatchNorm running statistics stay frozen (eval mode).

    The reference starts from ImageNet weights and keeps their statistics, since batches of a few images
    (8 x P views of one image) would give noisy ones; their affine weights still learn. A network trained
    from random weights has no statistics worth keeping, so ``freeze_bn=False`` (``--train-bn``) lets them
    adapt.
    """
    student.train()
    if freeze_bn:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class Normalizer:
    """uint8 or [0, 1] images -> normalised float images with a network's mean/std, on a device."""

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        mean, std = network_mean_std(network)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


# ------------------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What a run produced: the tested checkpoint, the history and the test results.

    ``best_map``/``best_epoch``: with ``--select-on-val`` the best validation mAP and its epoch; in the
    reference's protocol (train + val) the last epoch and its last monitoring mAP on the test datasets (or
    None without monitoring), as the reference stores in ``max_map``. ``last_val_map``: the mAP of the
    last validation (what the hyper-parameter search scores by default).
    """

    directory: Path
    best_checkpoint: Path
    best_map: float | None
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    last_val_map: float | None = None


def refuse_existing_checkpoints(config: TrainConfig) -> None:
    """Refuse a ``--directory`` that holds checkpoints, unless ``--overwrite`` or a ``--resume-student`` of that
    folder's own checkpoints (``last``, or a file inside it) says to go on; checked before anything is written
    (by the trainer, and by the search before any trial). Resuming another folder's checkpoint into a folder of
    checkpoints would overwrite them (model_best, model_epochN, model_last), so it is refused too."""
    directory = Path(config.directory)
    blocking = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise FileExistsError(
            f"--directory {directory}: {blocking} is a file, not a folder. Nothing was changed. Give a folder (it is "
            "made if missing)."
        )
    existing = sorted(p.name for p in directory.glob("*.pth.tar")) if directory.is_dir() else []
    if existing and config.resume_student is not None and not config.overwrite and not resumes_inside(config):
        raise FileExistsError(
            f"--resume-student {config.resume_student} is not a checkpoint of --directory {directory}, which already "
            f"holds checkpoints ({', '.join(existing[:3])}...) that the resumed run would overwrite. Nothing was "
            "changed. Resume into another (new or empty) --directory, resume that folder's own checkpoint "
            "(--resume-student last), or pass --overwrite to replace them."
        )
    if existing and config.resume_student is None and not config.overwrite:
        raise FileExistsError(
            f"{directory} already holds checkpoints ({', '.join(existing[:3])}...). Nothing was changed. Use "
            "another --directory, continue with --resume-student last (or a checkpoint file), or pass "
            "--overwrite to replace them."
        )
    if config.overwrite and directory.is_dir():
        for flag, given in (("--student-path", config.student_path), ("--teacher-path", config.teacher_path)):
            if given is None:
                continue
            # the path as given (a link named like a checkpoint is removed too) and the file it names
            for source in (Path(given).absolute(), Path(given).resolve()):
                if source.parent.resolve() == directory.resolve() and _RUN_CHECKPOINT.fullmatch(source.name):
                    raise FileExistsError(
                        f"{flag} {given} is a checkpoint in --directory {directory}, whose checkpoints --overwrite "
                        "removes at the start (the run then writes its own there): the input would be lost. "
                        "Nothing was changed. Copy it out of the folder and pass the copy, or use another "
                        "--directory."
                    )


def refuse_replacing_run_config(config: TrainConfig) -> None:
    """Refuse (``FileExistsError``) a ``--directory`` whose ``config.yaml`` this run would replace with other
    content, unless ``--overwrite`` says to, or the run resumes that folder's own checkpoints (whose record it
    is): the file may be the user's (a ``--config`` file with comments) or the record of an earlier run of other
    settings. Checked before anything is written."""
    path = Path(config.directory) / RUN_CONFIG_NAME
    if config.overwrite or resumes_inside(config) or not path.is_file():
        return
    if path.stat().st_size <= MAX_CONFIG_BYTES and _is_run_record(path.read_bytes(), config):
        return
    raise FileExistsError(
        f"{path} already exists and is not a record raml train wrote (a file of yours: comments, other keys or "
        "layout), and the run would replace it. Nothing was changed. Use another --directory, or pass "
        "--overwrite to replace it (copy it elsewhere first if you want to keep it)."
    )


def _is_run_record(data: bytes, config: TrainConfig) -> bool:
    """Whether ``data`` is a ``config.yaml`` as a run writes it (:meth:`TrainConfig.record_text`: every setting,
    in its order, without comments), of this run's settings or of an earlier start's: replacing it loses nothing
    the user wrote. A folder with such a record but no checkpoint is a start that stopped before its first epoch
    ended (the checkpoints themselves are guarded by :func:`refuse_existing_checkpoints`)."""
    if data == config.record_text().encode("utf-8"):
        return True
    try:
        values = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(values, dict) or list(values) != list(config.record()):
        return False
    return yaml.safe_dump(values, sort_keys=False).encode("utf-8") == data


def _state_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The keys of ``ours`` absent from ``theirs``, those of ``theirs`` absent from ``ours``, and the shared keys
    whose tensors differ in shape."""
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    mismatched = [
        k
        for k in ours
        if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(ours[k].shape)
    ]
    return missing, unexpected, mismatched


def _describe_network(meta: dict[str, Any] | None) -> str:
    """``resnet50, gem pooling, whitening 512`` from a checkpoint's or network's meta."""
    if not meta:
        return "architecture unknown: no meta"
    parts = [str(meta.get("architecture", "architecture unknown"))]
    if meta.get("pooling"):
        parts.append(f"{meta['pooling']} pooling")
    if "whitening" in meta:
        parts.append(f"whitening {meta['whitening']}")
    return ", ".join(parts)


def _key_summary(keys: list[str], what: str, shown: int = 3) -> str:
    """``N keys WHAT (a, b, c, ...)``: a count and a few names."""
    if not keys:
        return f"0 keys {what}"
    names = ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} {what} ({names})"


# ---------------------------------------------------------------------------------------------- trainer
#: how our checkpoints' ``max_map`` is written: a fraction in [0, 1], as the reference's ``compute_map`` returns and
#: its ``save_checkpoint`` stores (the run's own figures, logs and history are in percent)
MAX_MAP_UNIT = "fraction"


def recorded_best_map(checkpoint: dict[str, Any]) -> float | None:
    """The best (or last monitored) mAP a training checkpoint records, in percent as the trainer keeps it.

    ``max_map`` is a fraction in the reference's checkpoints (no ``"raml"`` record) and in ours that say
    ``max_map_unit: fraction``; checkpoints of earlier raml versions (a ``"raml"`` record without the unit)
    wrote percent."""
    value = checkpoint.get("max_map")
    if value is None:
        return None
    record = checkpoint.get("raml")
    if isinstance(record, dict) and record.get("max_map_unit") != MAX_MAP_UNIT:
        return float(value)  # an earlier raml checkpoint: percent
    return 100.0 * float(value)


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    Args:
        config: the run's settings (validated here).
        device: where the student trains.
        teacher_device: where the teacher runs (the reference's ``--gpu-id 0,1`` puts it on a second GPU);
            default: ``device``. Every embedding by the teacher (training, validation, test) happens there.
        progress: show progress bars.
        stop_after_epoch: stop (raising :class:`TrainingInterrupted`) after this epoch's checkpoint, as a
            killed job would; used to test that resuming reproduces an uninterrupted run.
        dist: this process's place among ``torchrun`` processes (default: a single process).
        keep_lock: keep the run folder's lock (:mod:`raml.engine.run_lock`, taken here: a second run into the
            folder is refused at once) after :meth:`run`, until :meth:`release_lock` (``raml train`` holds it
            through the final test); by default :meth:`run` releases it when it ends, however it ends.
        held_lock: the run folder's lock, already held by the caller (``raml train --optimize`` takes it before
            its search): not taken again, and kept after :meth:`run` (the caller releases it).
        resume_hint: the sentence a signal's :class:`TrainingInterrupted` ends with, saying how the command that
            runs this trainer continues (``raml demo`` starts over, ``raml reproduce`` resumes by itself when run
            again); by default ``raml train``'s: continue with ``--resume-student last``.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        progress: bool = True,
        stop_after_epoch: int | None = None,
        dist: DistContext = SINGLE,
        teacher_device: torch.device | None = None,
        keep_lock: bool = False,
        held_lock: DirectoryLock | None = None,
        resume_hint: str | None = None,
    ) -> None:
        config.validate()
        self.resume_hint = resume_hint
        if dist.is_main:
            config.warn_about_rounding()
        self.keep_lock = keep_lock or held_lock is not None
        if held_lock is not None:  # the caller locked the folder (raml train --optimize, for its whole search)
            if dist.enabled or not held_lock.held or held_lock.directory.resolve() != Path(config.directory).resolve():
                raise ValueError(f"held_lock must be a held lock of {config.directory}, in a single process.")
            self._lock: DirectoryLock | None = held_lock
        try:  # before anything is read or written in the folder
            if held_lock is None:
                self._lock = acquire_run_lock(self, config.directory, dist)
        except OSError as error:
            if not isinstance(error, (LockHeldError, LockFileError, RunLockRefusedError)):
                refuse_existing_checkpoints(config)  # a file where the folder should be: its own message
            raise
        try:
            self._build(config, device, progress, stop_after_epoch, dist, teacher_device)
        except BaseException:
            self.release_lock()
            raise

    def release_lock(self) -> None:
        """Release the run folder's lock (a no-op when not held)."""
        if self._lock is not None:
            self._lock.release()

    def _build(
        self,
        config: TrainConfig,
        device: torch.device,
        progress: bool,
        stop_after_epoch: int | None,
        dist: DistContext,
        teacher_device: torch.device | None,
    ) -> None:
        """The rest of :meth:`__init__`, under the run folder's lock (``config`` already validated)."""
        self.config = config
        self.device = device
        self.dist = dist
        self.progress = progress and dist.is_main
        self._stop_signal: int | None = None
        # under several processes: the signal they agreed to stop for (_check_finite, _stop_if_signalled)
        self._agreed_stop: int | None = None
        self.stop_after_epoch = stop_after_epoch
        self.directory = Path(config.directory)
        self.history: list[dict[str, Any]] = []
        self.writer = None

        # Data first: a missing dataset fails before any network is built.
        base = config.training_dataset
        train_part = "trainval" if config.trainval else "train"
        # Bad images are found now, in seconds, not after hours (headers only; see raml.data.check).
        self.skipped: dict[str, list[BadImage]] = {}
        self.train_split: Split = self._checked_split(part_name(base, train_part))
        self.val_split: Split | None = None
        if config.val and not config.trainval:
            self.val_split = self._checked_split(part_name(base, "val"))
        # the final test's splits too: a bad test image must stop the run now, not after training
        self.test_splits = [self._checked_split(name) for name in config.test_datasets]
        # The reference's protocol evaluates the test datasets every --val-freq epochs, as a printout only.
        self.monitor_splits = self.test_splits if (config.val and config.trainval) else []
        logger.info(
            "Training on %s: %d classes, %d images (%s)",
            self.train_split.name,
            self.train_split.num_classes,
            len(self.train_split),
            "train + val, the reference's protocol" if config.trainval else "train only, --select-on-val",
        )
        self.train_paths = [str(p) for p in self.train_split.abspaths()]

        # nothing is written before every check that can refuse the run has passed (_record_start, below)
        refuse_existing_checkpoints(self.config)
        refuse_replacing_run_config(self.config)
        # A network built from an architecture name starts from random weights: the same ones for the same
        # --seed, on every rank (the reference's main.py seeds torch and numpy with --seed before building).
        seed_everything(config.seed)
        self.student = self._build_student().to(device)
        if dist.enabled and not config.freeze_bn and device.type == "cuda":
            self.student = convert_sync_batchnorm(self.student)
        self.teacher: FrozenTeacher | None = None
        self.teacher_sha: str | None = None
        self.teacher_device = teacher_device if teacher_device is not None else device
        if config.teacher_path is not None or config.teacher is not None:
            self.teacher = FrozenTeacher(self._build_teacher()).to(self.teacher_device)
            check_compatible(self.student, self.teacher.network)
        self.cache = EmbeddingCache(Path(config.data_root) / "cache" / "embeddings")

        # the recipe: batches and loss (see raml.engine.methods); it reads what it needs from this trainer
        self.method: Method = method_class(config.mode, config.loss)(self)
        self.epoch_size = self.method.epoch_images()  # sym's follows from its class groups (the reference's)
        self.distill = self.method.asymmetric
        self.batches_per_epoch = self.method.batches_per_epoch()
        # optimizer steps per epoch: the last incomplete accumulation is dropped (the reference) or flushed
        rounding = math.ceil if config.flush_accumulation else math.floor
        self.steps_per_epoch = rounding(self.batches_per_epoch / config.update_every)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"An epoch has {self.batches_per_epoch} batches, fewer than --update-every {config.update_every}: "
                "no optimizer step would ever be taken (the reference drops an incomplete accumulation). Lower "
                "--update-every, raise --query-size, or pass --flush-accumulation."
            )
        self.optimizer = build_optimizer(
            self.student, config.optimizer, config.lr, config.weight_decay, config.momentum
        )
        self.method.add_parameters(self.optimizer)  # e.g. sym's class proxies, in their own group
        self.scheduler = self._build_scheduler()
        self.start_epoch = 1
        self.best_map: float | None = None
        self.best_epoch = 0
        if config.resume_student is not None:
            self._resume(config.resume_student)
        # The module that trains: with --amp the student's forward runs in bf16 and returns float32, so that
        # every loss is computed in float32 (raml.engine.device); DDP averages gradients over processes.
        self.amp = amp_active(config.amp, device)
        forward: nn.Module = AutocastForward(self.student, device.type) if self.amp else self.student
        self.model: nn.Module = forward
        if dist.enabled:
            self.model = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.student_norm = Normalizer(self.student, device)
        self.teacher_norm = Normalizer(self.teacher, self.teacher_device) if self.teacher is not None else None
        self._record_start()

    # ------------------------------------------------------------------------------------------ setup
    def _record_start(self) -> None:
        """Write the run's folder: its ``config.yaml`` and skipped-image reports.

        Called last in ``__init__``, once the data are checked, the networks built, the optimizer made and the
        resume checkpoint loaded: a start that fails leaves the folder as it was, so its ``config.yaml`` keeps
        describing the checkpoints beside it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.dist.is_main:
            return
        # a job killed while writing (kill -9) leaves its temporary file behind, never a half target; removing
        # them is safe: this run holds the folder's lock (raml.engine.run_lock), so no other run is writing them.
        # Only the temporaries of the run's own outputs: any other hidden .tmp file is not ours to delete.
        for stale in self.directory.glob(".*.tmp"):
            if _RUN_TEMPORARY.fullmatch(stale.name) and stale.is_file():
                stale.unlink(missing_ok=True)
        if self.config.overwrite and not resumes_inside(self.config):
            self._remove_previous_outputs()
        for name, bad in self.skipped.items():
            write_bad_image_report(self.directory / report_file_name("skipped_images", name), bad)
        # The resolved configuration travels with the outputs; it is also a valid ``--config`` file, so it records
        # --overwrite, --json and --resume-student at their defaults (TrainConfig.record): a replay never inherits them
        atomic_write_text(self.directory / RUN_CONFIG_NAME, self.config.record_text())

    def _remove_previous_outputs(self) -> None:
        """``--overwrite`` (a new run, not a resume of this folder's checkpoints): remove the previous run's
        outputs, now that every start check has passed: its training checkpoints, its skipped-image reports and
        its TensorBoard event files (:data:`_RUN_CHECKPOINT`, :data:`_RUN_REPORT`, :data:`_TENSORBOARD_EVENTS`);
        nothing else (a file of another name is not a run's). Left beside the new run's, its higher
        ``model_epoch<N>`` would be what ``--resume-student last`` resumes, its ``model_best`` the result of a new
        run stopped early, a report of a split the new run reads without bad images would describe the new run,
        and its TensorBoard scalars would be drawn as the new run's. A file this run reads (``--student-path``,
        ``--teacher-path``) is never among them: :func:`refuse_existing_checkpoints` refuses such a run at the
        start."""
        removed = []
        for path in sorted(self.directory.iterdir()):
            if (_RUN_CHECKPOINT.fullmatch(path.name) or _RUN_REPORT.fullmatch(path.name)) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path.name)
        events = self.directory / _TENSORBOARD_FOLDER
        if events.is_dir() and not events.is_symlink():
            for path in sorted(events.iterdir()):
                if _TENSORBOARD_EVENTS.fullmatch(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(f"{_TENSORBOARD_FOLDER}/{path.name}")
        if removed:
            logger.info(
                "--overwrite: removed the previous run's checkpoints, reports and TensorBoard events from %s: %s",
                self.directory,
                ", ".join(removed),
            )

    def _checked_split(self, name: str) -> Split:
        """Load a split and apply the ``--bad-images`` policy to it (skipped files are remembered)."""
        c = self.config
        split = get_split(name, c.data_root, c.val_ratio)
        split, bad = apply_bad_image_policy(
            split, c.bad_images, workers=max(1, c.workers), image_size=self._largest_image_size()
        )
        if bad:
            self.skipped[split.name] = bad
        return split

    def _largest_image_size(self) -> int:
        """The largest size this run's images go through the evaluation transform at: the student's sizes, and
        the teacher's when there is one. The scan checks each image at it (the resized size grows with the
        size), so an image too large once resized (an extreme aspect ratio) is a bad image before epoch 1."""
        c = self.config
        sizes = list(c.image_sizes) if c.image_sizes else [c.image_size]
        if c.teacher_path is not None or c.teacher is not None:
            sizes.append(c.teacher_image_size)
        return max(sizes)

    def _build_student(self) -> nn.Module:
        c = self.config
        if c.student_path is not None:
            # --pool only matters for a reference checkpoint without meta (mac and spoc store no weights)
            return load_network(c.student_path, data_root=c.data_root, device="cpu", pooling=c.pool)
        return self._build_architecture(c.student)

    def _build_teacher(self) -> nn.Module:
        c = self.config
        if c.teacher_path is not None:
            network = load_network(c.teacher_path, data_root=c.data_root, device="cpu", pooling=c.pool)
            source = getattr(network, "source_path", None)
            self.teacher_sha = file_sha256(source) if source is not None else None
            return network
        return self._build_architecture(c.teacher)

    def _build_architecture(self, name: str) -> nn.Module:
        c = self.config
        return build_network(
            name,
            pooling=c.pool,
            whitening=c.whitening,
            pretrained=c.pretrained,
            pretrained_weights=c.pretrained_weights,
        )

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        c = self.config
        if c.group_lr_peaks:  # ours: each group peaks at its own lr, the length is the steps actually taken
            return build_scheduler(self.optimizer, c.scheduler, self.steps_per_epoch * c.epochs)
        # The reference: one max_lr for every group, lengths computed from the epoch's image count.
        total, cycle_up = reference_schedule_lengths(c.epochs, self.epoch_size, c.batch_size, c.update_every)
        return build_scheduler(
            self.optimizer,
            c.scheduler,
            max(total, self.steps_per_epoch * c.epochs),  # never fewer steps than are taken (OneCycle raises)
            shared_max_lr=c.lr,
            cycle_up_steps=cycle_up,
        )

    def resume_path(self, name: str) -> Path:
        """Where ``--resume-student NAME`` points: ``last`` is the newest finished epoch of ``--directory``;
        a relative name is looked up in ``--directory`` first (the reference joins the two), then as given."""
        if name == "last":
            return self.last_checkpoint()
        candidates = resume_candidates(name, self.directory)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"--resume-student {name}: no such checkpoint (looked for {' and '.join(map(str, candidates))}). "
            "Name a file in --directory (e.g. model_last.pth.tar), a path, or 'last'."
        )

    def _resume(self, name: str) -> None:
        path = self.resume_path(name)
        checkpoint = load_resume_checkpoint(path)
        stored = checkpoint.get("raml") if isinstance(checkpoint.get("raml"), dict) else {}
        check_not_interrupted(stored, path)
        check_run_fields(stored, run_fields(self.config, self.teacher_sha), path)
        self._load_student_state(checkpoint, path)
        if checkpoint.get("optimizer"):
            check_optimizer_state(checkpoint["optimizer"], self.config.optimizer, path)
            check_optimizer_tensors(checkpoint["optimizer"], self.optimizer, path)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scheduler") and self.scheduler is not None:
            saved_total = checkpoint["scheduler"].get("total_steps")
            ours = getattr(self.scheduler, "total_steps", None)
            if saved_total is not None and ours is not None and saved_total != ours:
                raise ValueError(
                    f"{path} was trained with a {saved_total}-step learning-rate schedule, this run's is {ours} "
                    "steps: --epochs, --query-size, --batch-size or --update-every differ from the checkpoint's "
                    "run. Resume with the same settings, or start a new run from its weights with --student-path."
                )
            check_schedule_position(
                checkpoint["scheduler"],
                int(checkpoint.get("epoch", 0)),
                self.steps_per_epoch,
                self.config.scheduler in PER_STEP_SCHEDULERS,
                path,
            )
            load_scheduler_state(self.scheduler, checkpoint["scheduler"], self.config.scheduler, path)
        self.start_epoch = int(checkpoint.get("epoch", 0)) + 1
        extra = checkpoint.get("raml", {}) or {}
        self.method.load_checkpoint_state(extra, path)
        self.best_map = recorded_best_map(checkpoint)
        self.best_epoch = int(extra.get("best_epoch", 0))
        self.history = list(extra.get("history", []))
        logger.info("Resumed from %s at epoch %d", path, self.start_epoch)

    def _load_student_state(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Load the resumed weights into the student; a checkpoint of another network is refused in a few lines
        (torch's own message lists every missing and unexpected key: hundreds of lines)."""
        state = checkpoint["state_dict"]
        missing, unexpected, mismatched = _state_differences(self.student.state_dict(), state)
        their_meta = checkpoint.get("meta")
        sizes = their_meta.get("bn_sizes") if isinstance(their_meta, dict) else None
        if sizes and not (getattr(self.student, "meta", None) or {}).get("bn_sizes"):
            raise CheckpointError(
                f"--resume-student {path}: this checkpoint's BatchNorm statistics were re-estimated per query "
                f"size ({sizes}) after training ended (--per-size-bn writes them into model_best.pth.tar and the "
                "final checkpoint), so training cannot continue from it. Resume from an epoch's checkpoint "
                "(--resume-student last, or model_epoch_N.pth.tar), or start a new run from these weights "
                "(--student-path)."
            )
        if missing or unexpected or mismatched:
            theirs = _describe_network(their_meta)
            ours = _describe_network(getattr(self.student, "meta", None))
            raise CheckpointError(
                f"--resume-student {path}: its network ({theirs}) is not this run's student ({ours}): "
                f"{_key_summary(missing, 'missing')}, {_key_summary(unexpected, 'unexpected')}, "
                f"{_key_summary(mismatched, 'of another shape')}. Resume with the checkpoint's own --student "
                "(and the settings of its run), or start a new run in another --directory (its weights can "
                "start it: --student-path)."
            )
        self.student.load_state_dict(state)

    def last_checkpoint(self) -> Path:
        """The newest finished-epoch checkpoint in the run's directory (for ``--resume-student last``); damaged
        candidates are skipped with a warning (:func:`raml.engine.resume.last_checkpoint`)."""
        return last_checkpoint(self.directory)

    # -------------------------------------------------------------------------------------- running
    def run(self) -> TrainResult:
        """Train for the configured epochs (from the resume point), validate, save; returns the result."""
        c = self.config
        if c.logger == "tensorboard" and self.dist.is_main:  # one writer: rank 0 logs (_log_epoch), the others not
            self.writer = _tensorboard_writer(self.directory / _TENSORBOARD_FOLDER, c)
        if self.start_epoch > c.epochs:
            logger.info("Nothing to train: the checkpoint already finished %d epochs.", c.epochs)
        try:
            previous = self._install_signal_handlers()
            try:
                self._run_epochs()
            finally:
                self._restore_signal_handlers(previous)
            if self.writer is not None:
                self.writer.close()
            self._stop_if_signalled("after the last epoch")  # a signal between the last check and the restore
            best = self.directory / BEST_NAME
            if not best.exists():  # e.g. resumed a finished run without validation
                self._save(best, c.epochs)
            self.dist.barrier()
        finally:
            if not self.keep_lock:
                self.release_lock()
        last_val = next((h["val_mAP"] for h in reversed(self.history) if "val_mAP" in h), None)
        return TrainResult(self.directory, best, self.best_map, self.best_epoch, self.history, last_val_map=last_val)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM: finish the current batch, save a checkpoint, stop (see :meth:`train_epoch`)."""
        previous: dict[int, Any] = {}

        def request_stop(signum: int, frame: Any) -> None:  # noqa: ARG001
            self._stop_signal = signum

        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, request_stop)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _run_epochs(self) -> None:
        c = self.config
        for epoch in range(self.start_epoch, c.epochs + 1):
            seed_everything(c.seed + epoch)
            stats = self.train_epoch(epoch)
            evaluate_now = epoch % c.val_freq == 0 or epoch == c.epochs
            if self.val_split is not None and evaluate_now:  # --select-on-val: held-out classes select
                metrics = self.validate()
                stats["val_mAP"], stats["val_R@1"] = metrics["mAP"], metrics["R@1"]
                if self.best_map is None or stats["val_mAP"] > self.best_map:
                    self.best_map, self.best_epoch = stats["val_mAP"], epoch
                    self._save(self.directory / BEST_NAME, epoch)
            if self.monitor_splits and epoch % c.val_freq == 0:  # the reference's printout: selects nothing
                monitored = self.monitor()
                for name, metrics in monitored.items():
                    stats[f"monitor_{name}_mAP"], stats[f"monitor_{name}_R@1"] = metrics["mAP"], metrics["R@1"]
                # the reference stores the mean of the last such evaluation as the checkpoint's max_map
                self.best_map = sum(m["mAP"] for m in monitored.values()) / len(monitored)
            if self.val_split is None:
                self.best_epoch = epoch  # the model kept is the last one
            self.history.append(stats)
            self._log_epoch(stats)
            # the same checkpoint under each of its names: written once, then linked (or copied)
            names = [f"model_epoch{epoch}.pth.tar"] if epoch % c.save_freq == 0 or epoch == c.epochs else []
            if self.val_split is None and epoch == c.epochs:
                names.append(BEST_NAME)
            self._save(self.directory / "model_last.pth.tar", epoch, also=[self.directory / n for n in names])
            # a signal during the validation, the monitoring or the save: the batch loop no longer reads the flag
            self._stop_if_signalled(f"after epoch {epoch} (its checkpoint is saved)")
            if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch and epoch < c.epochs:
                raise TrainingInterrupted(f"Stopped after epoch {epoch} as asked.")

    def _signal_origin(self) -> str:
        """Where the stop signal came from, in a stop message: said only under several processes."""
        if not self.dist.enabled:
            return ""
        where = "this process" if self._stop_signal is not None else "another process"
        return f" (received by {where} of {self.dist.world_size})"

    def _stop_if_signalled(self, when: str) -> None:
        """Raise :class:`TrainingInterrupted` if SIGINT/SIGTERM asked to stop (outside the batch loop, which stops
        on its own); what is on disk is then a finished epoch's consistent checkpoint. Several processes agree
        first (one all-reduce): a signal that reached some of them stops them all here."""
        signum = self._stop_signal
        if self.dist.enabled:
            flag = torch.tensor([-(signum or 0)], dtype=torch.int64, device=self.device)
            signum = -int(all_reduce_min_(flag, self.dist).item()) or None
            self._agreed_stop = signum
        if signum is None:
            return
        hint = self.resume_hint or (
            "Continue with --resume-student last (a finished run then only writes model_best and tests it), or "
            "test the checkpoint with raml test."
        )
        raise TrainingInterrupted(
            f"Stopped by signal {signum}{self._signal_origin()} {when}; the last finished epoch's checkpoint is "
            f"{self.directory / 'model_last.pth.tar'} (the final test was not run). {hint}"
        )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        c = self.config
        generator = torch.Generator().manual_seed(c.seed + epoch)
        batches = self._epoch_batches(epoch, generator)
        student_train_mode(self.student, self.config.freeze_bn)
        self.optimizer.zero_grad(set_to_none=True)
        self._lr_peaks: dict[str, float] = {}
        # Sums of the logged terms, kept on the device (tensors) and read every --print-freq batches only: no
        # host-device sync between one batch's forward and backward.
        totals: dict[str, torch.Tensor | float] = {}
        # The first batch whose loss, and the first whose accumulated gradients, were not finite (on the device;
        # read at each optimizer step, see _check_finite): the check neither stops the device on every batch nor
        # lets one process raise alone. The third entry carries a stop signal to the same agreement.
        first_nonfinite = torch.full((3,), _ALL_FINITE, dtype=torch.int64, device=self.device)
        images_seen, pending, synced, start = 0, 0, True, time.perf_counter()
        bar = tqdm(
            total=self.batches_per_epoch,
            desc=f"epoch {epoch}/{c.epochs}",
            unit="batch",
            disable=not self.progress,
            leave=False,
        )
        for index, batch in enumerate(batches, start=1):
            pending += 1
            # DDP all-reduces the gradients in backward; of an accumulation only its last batch needs to (the
            # others accumulate locally under no_sync), so one all-reduce per optimizer step, not per batch.
            synced = pending == c.update_every or (c.flush_accumulation and index == self.batches_per_epoch)
            with self._gradient_sync(synced):
                result = self._batch_loss(batch, generator)  # forward (bf16 with --amp), loss in float32
                loss = result.loss.detach()
                first_nonfinite[0] = torch.where(
                    torch.isfinite(loss), first_nonfinite[0], torch.clamp(first_nonfinite[0], max=index)
                )
                # Losses are summed over images; gradients accumulate until an optimizer step. With several
                # processes DDP averages gradients, so scale by the world size to get the sum over all images.
                (result.loss * self.dist.world_size).backward()
            if pending == c.update_every:
                self._mark_nonfinite_gradients(first_nonfinite, index)
                self._check_finite(first_nonfinite, epoch)
                self._optimizer_step()
                pending = 0
            images_seen += result.images
            for name, value in result.terms.items():
                totals[name] = totals.get(name, 0.0) + (value.detach().double() if torch.is_tensor(value) else value)
            bar.update(1)
            if index % c.print_freq == 0 or index == self.batches_per_epoch:
                bar.set_postfix(loss=f"{float(totals['loss']) / max(images_seen, 1):.4f}")
            # one process: the flag its handler set, after any batch; several: the processes' agreement at the
            # last optimizer step (_check_finite), so that all stop after the same batch, none left in an all-reduce
            signum = self._agreed_stop if self.dist.enabled else self._stop_signal
            if signum is not None and (pending == 0 or not self.dist.enabled):
                bar.close()
                self._save(self.directory / "model_interrupted.pth.tar", epoch - 1, interrupted_in=epoch)
                hint = self.resume_hint or "Continue exactly from the last finished epoch with --resume-student last."
                raise TrainingInterrupted(
                    f"Stopped by signal {signum}{self._signal_origin()} during epoch {epoch}; the weights of that "
                    f"moment are in {self.directory / 'model_interrupted.pth.tar'}. {hint}"
                )
        # a non-finite loss in the epoch's last (dropped or flushed) accumulation stops the run too
        self._check_finite(first_nonfinite, epoch)
        if pending and c.flush_accumulation:  # ours: the epoch's last images still make a step
            if not synced:  # fewer batches than batches_per_epoch said: average the local gradients by hand
                self._average_gradients()
            self._mark_nonfinite_gradients(first_nonfinite, index)
            self._check_finite(first_nonfinite, epoch)
            self._optimizer_step()
        # The reference drops an incomplete accumulation: its gradients are discarded, never applied.
        self.optimizer.zero_grad(set_to_none=True)
        bar.close()
        if self.scheduler is not None and c.scheduler not in PER_STEP_SCHEDULERS:
            self.scheduler.step()
        stats: dict[str, Any] = {"epoch": epoch, "seconds": round(time.perf_counter() - start, 3)}
        sums = [float(value) for value in totals.values()]
        if self.dist.enabled:  # the epoch's mean loss over every process's images
            counts = torch.tensor([images_seen, *sums], dtype=torch.float64, device=self.device)
            summed = all_reduce_sum_(counts, self.dist).cpu()
            images_seen, sums = int(summed[0]), summed[1:].tolist()
        stats.update({name: value / max(images_seen, 1) for name, value in zip(totals, sums)})
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        # the highest rate each parameter group stepped with this epoch (the schedule's shape, per group)
        stats.update({f"lr_max_{name}": value for name, value in self._lr_peaks.items()})
        return stats

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` (gradients accumulate locally, nothing is all-reduced) unless ``sync``; a single
        process always accumulates locally."""
        if self.dist.enabled and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _average_gradients(self) -> None:
        """All-reduce (average) the gradients by hand: the rare flushed accumulation that no batch synced."""
        for param in self.student.parameters():
            if param.grad is not None:
                all_reduce_sum_(param.grad, self.dist).div_(self.dist.world_size)

    def _mark_nonfinite_gradients(self, first_nonfinite: torch.Tensor, index: int) -> None:
        """Record ``index`` in ``first_nonfinite[1]`` when the accumulated gradients hold a NaN or an infinity (a
        finite loss can have them: a square root at 0, an overflow in backward). On the device, no sync; one
        fused max-abs reduction over the gradients (:func:`raml.engine.guard.gradients_finite`). There is no AMP
        GradScaler to leave inf gradients to (``--amp`` is bf16, which needs no loss scaling)."""
        finite = gradients_finite(p for group in self.optimizer.param_groups for p in group["params"])
        if finite is not None:
            first_nonfinite[1] = torch.where(
                finite.to(first_nonfinite.device), first_nonfinite[1], torch.clamp(first_nonfinite[1], max=index)
            )

    def _check_finite(self, first_nonfinite: torch.Tensor, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` on every process when any process saw a non-finite loss (or
        non-finite gradients: ``first_nonfinite[1]``, see :meth:`_mark_nonfinite_gradients`).

        Called before each optimizer step (so a bad gradient never reaches the weights) and at the end of the
        epoch. The processes agree first (an all-reduce of the first bad batch): a process that raised alone
        would leave the others waiting in DDP's next all-reduce until a watchdog killed them.
        """
        if self._stop_signal is not None:  # a stop signal as a negative number: the agreement keeps the largest
            first_nonfinite[2] = -self._stop_signal
        agreed = all_reduce_min_(first_nonfinite.clone(), self.dist)
        loss_batch, gradient_batch, stop = (int(v) for v in agreed.tolist())  # one host-device sync for all
        if stop < 0:
            self._agreed_stop = -stop
        if gradient_batch < loss_batch and self._gradients_overflowed_only():
            first_nonfinite[1] = _ALL_FINITE  # huge but finite gradients: the fast check's norm overflowed
            gradient_batch = _ALL_FINITE
        if loss_batch == _ALL_FINITE and gradient_batch == _ALL_FINITE:
            return
        where = f" (on at least one of the {self.dist.world_size} processes)" if self.dist.enabled else ""
        if loss_batch <= gradient_batch:
            what, batch, which = "The loss became NaN or infinite", loss_batch, "that batch's"
        else:
            what, batch, which = "The gradients became NaN or infinite (under a finite loss)", gradient_batch, "those"
        raise NonFiniteLossError(
            f"{what} at epoch {epoch}, batch {batch}{where}; training stopped before {which} gradients were "
            f"applied, and the last good checkpoint in {self.directory} is kept. {self._nonfinite_advice()}"
        )

    def _nonfinite_advice(self) -> str:
        """What to change after a non-finite loss, gradient or weight: ``--lr``, and the settings of ``--mode``
        given away from their defaults (an extreme one, e.g. ``--csd-temperature 1e-40``, is as likely a cause)."""
        changed = self.config.changed_method_settings()
        if not changed:
            return "Lower --lr or check the data."
        return (
            f"Lower --lr, or bring the --mode {self.config.mode} settings given away from their defaults "
            f"({', '.join(changed)}) back towards them, or check the data."
        )

    def _gradients_overflowed_only(self) -> bool:
        """Whether the gradients the fast check called non-finite are finite after all (the exact, slower check;
        the gradients are the same on every process after DDP's all-reduce, so every process agrees)."""
        exact = gradients_finite((p for group in self.optimizer.param_groups for p in group["params"]), exact=True)
        return exact is not None and bool(exact)

    def _optimizer_step(self) -> None:
        self.method.before_optimizer_step()
        for index, group in enumerate(self.optimizer.param_groups):
            name = str(group.get("name", index))
            self._lr_peaks[name] = max(self._lr_peaks.get(name, 0.0), float(group["lr"]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.config.scheduler in PER_STEP_SCHEDULERS:
            self.scheduler.step()

    # ------------------------------------------------------------------------- the method's batches and loss
    def _epoch_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        return self.method.epoch_batches(epoch, generator)

    def _batch_loss(self, batch: Any, generator: torch.Generator) -> BatchLoss:
        result = self.method.batch_loss(batch, generator)
        check_batch_loss(result, self.method)  # a plug-in's wrong loss: a TypeError naming it, not torch's
        return result

    # ------------------------------------------------------------------- helpers the methods build batches with
    def local_share(self, batch: list[Any]) -> list[Any]:
        """This process's contiguous share of a global batch (all of it for a single process). It is empty on
        the last processes when the batch holds fewer items than there are processes (an epoch's last batch of
        one image over two processes): :meth:`load_shares` loads such a share as a batch of no rows."""
        start, stop = shard_bounds(len(batch), self.dist)
        return batch[start:stop]

    def load_shares(
        self,
        dataset: Dataset,
        shares: list[list[Any]],
        stand_ins: list[Any],
        arguments: Callable[[list[list[Any]]], dict[str, Any]],
    ) -> Iterator[Any]:
        """This process's batches: ``shares`` (one list of items per global batch, from :meth:`local_share`)
        loaded by ``self.loader(dataset, **arguments(shares))``.

        An empty share (a global batch of fewer items than processes) is loaded as its batch's ``stand_ins``
        item (an item of that global batch: the same structure and image size) and yielded with every tensor
        cut to no rows, so that the process still runs the batch's forward, backward and collectives (DDP's
        gradient all-reduce, a method's gathers) in step with the others and contributes a zero loss.
        """
        empty = {index for index, share in enumerate(shares) if not share}
        loaded = [share or [stand_in] for share, stand_in in zip(shares, stand_ins, strict=True)]
        for index, batch in enumerate(self.loader(dataset, **arguments(loaded))):
            yield no_rows(batch) if index in empty else batch

    def global_batches(self, order: list[int]) -> list[list[int]]:
        size = self.config.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def item_seeds(self, epoch: int, count: int) -> list[int]:
        """One seed per position of the epoch's global sample list (same on every process)."""
        base = (self.config.seed * 1_000_003 + epoch) * 10_000_019
        return [(base + position) % 2**62 for position in range(count)]

    def embed(
        self,
        network: nn.Module,
        paths: list[str],
        image_size: int,
        device: torch.device,
        batch_size: int,
        workers: int,
        progress: bool,
        description: str,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``extract_embeddings`` sharded over processes and gathered (rows in ``paths`` order)."""
        return extract_embeddings_sharded(
            network, paths, image_size, device, self.dist, batch_size, workers, progress, description, **kwargs
        )

    def loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        workers = self.config.workers
        return DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            **kwargs,
        )

    def teacher_embeddings(self, split: Split, paths: list[str]) -> torch.Tensor:
        """The teacher's embeddings of ``paths`` at DR, cached on disk when the teacher is a checkpoint file."""
        assert self.teacher is not None
        size = self.config.teacher_image_size

        def compute() -> torch.Tensor:
            return self.embed(
                self.teacher.network,
                paths,
                size,
                self.teacher_device,
                self.config.eval_batch_size,
                self.config.workers,
                self.progress,
                f"teacher@{size}",
            )

        if self.teacher_sha is None:
            return compute()
        return self.cache.get_or_compute(
            self.teacher_sha,
            size,
            split.name,
            list(split.paths),
            compute,
            network_meta=getattr(self.teacher.network, "meta", None),
            root=split.root,
        )

    # ----------------------------------------------------------------------------------- validation
    def _evaluate(self, network: nn.Module, split: Split, asym: bool, sym: bool) -> dict[str, dict[str, float]]:
        """The test protocol on one split: student queries at QR; the teacher's database at DR, embedded on
        the teacher's device (cached: the teacher never changes)."""
        c = self.config
        teacher = self.teacher.network if (asym and self.teacher is not None) else None
        if self.dist.enabled:
            return self._evaluate_distributed(network, split, teacher, sym=sym or teacher is None)
        return evaluate_split(
            network,
            split,
            c.image_size,
            self.device,
            teacher=teacher,
            teacher_image_size=c.teacher_image_size,
            teacher_device=self.teacher_device,
            sym=sym or teacher is None,
            batch_size=c.eval_batch_size,
            workers=c.workers,
            cache=self.cache,
            teacher_sha256=self.teacher_sha,
            progress=self.progress,
            embed=self.embed,
        )

    def _evaluate_distributed(
        self, network: nn.Module, split: Split, teacher: nn.Module | None, sym: bool
    ) -> dict[str, dict[str, float]]:
        """:meth:`_evaluate` under DDP: every process embeds its shard (gathered), the teacher's database
        comes from the cache as in a single process, and rank 0 alone scores on its device; the other ranks
        receive its metrics (they used to repeat the whole scoring, on the CPU, each on one thread)."""
        c = self.config
        if teacher is not None:
            check_compatible(network, teacher)
        paths = [str(p) for p in split.abspaths()]
        description = f"{split.name} student@{c.image_size}"
        query = self.embed(
            network, paths, c.image_size, self.device, c.eval_batch_size, c.workers, self.progress, description
        )
        database = self.teacher_embeddings(split, paths) if teacher is not None else None
        results: dict[str, dict[str, float]] | None = None
        if self.dist.is_main:
            labels, ks = torch.as_tensor(split.labels), default_ks(split.name)
            query = query.to(self.device)
            results = {}
            if database is not None:
                database = database.to(self.device)
                results["asym"] = retrieval_metrics(query, database, labels, labels, ks=ks, exclude_self=True)
            if sym:
                results["sym"] = retrieval_metrics(query, query, labels, labels, ks=ks, exclude_self=True)
            logger.info("%s: %s", split.name, results)
        return broadcast_object(results, self.dist)

    def validate(self) -> dict[str, float]:
        """Validation metrics (mAP, R@k) on the held-out val classes (``--select-on-val``): asymmetric for
        distillation, symmetric for ``sym``."""
        assert self.val_split is not None
        results = self._evaluate(self.student, self.val_split, asym=self.distill, sym=not self.distill)
        return results["asym" if self.distill else "sym"]

    def monitor(self) -> dict[str, dict[str, float]]:
        """The reference's periodic evaluation of the test datasets during training: asymmetric for
        distillation, symmetric for ``sym``. A printout only: nothing is selected on it."""
        key = "asym" if self.distill else "sym"
        return {
            split.name: self._evaluate(self.student, split, asym=self.distill, sym=not self.distill)[key]
            for split in self.monitor_splits
        }

    def test(self, checkpoint: Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """Test the kept (or given) checkpoint on the configured test datasets: symmetric, and asymmetric
        when there is a teacher. Each result states how many images ``--bad-images skip`` left out.

        Raises :class:`TrainingInterrupted` at once if a signal asked the run to stop (e.g. during the last
        epoch's validation): the final test is not started.
        """
        self._stop_if_signalled("before the final test")
        network = load_network(checkpoint or self.directory / BEST_NAME, device=self.device)
        results = {}
        for split in self.test_splits:
            results[split.name] = self._evaluate(network, split, asym=True, sym=True)
            skipped = len(self.skipped.get(split.name, []))
            for metrics in results[split.name].values():
                metrics["num_skipped_images"] = skipped
        return results

    # -------------------------------------------------------------------------------------- outputs
    def _save(self, path: Path, epoch: int, also: Sequence[Path] = (), interrupted_in: int | None = None) -> None:
        """Write the training checkpoint of ``epoch`` to ``path``, and the same file under the names ``also``.

        ``interrupted_in``: the epoch a signal stopped part-way through (``model_interrupted.pth.tar``); recorded
        as ``raml.interrupted_in`` so that ``--resume-student`` refuses the file whatever the scheduler."""
        # a finite loss and gradients can still step to inf (a huge --lr); checked on every rank, which hold the same
        # weights, so that all of them stop together rather than the others waiting in the next all-reduce
        bad = nonfinite_parameters(self.student)
        if bad:
            raise NonFiniteLossError(
                f"The weights became NaN or infinite by epoch {epoch} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}: {len(bad)} tensors) under a finite loss: the steps were too "
                f"large. {path.name} was not written, and the last good checkpoint in {self.directory} is kept. "
                f"{self._nonfinite_advice()}"
            )
        if not self.dist.is_main:  # one writer; every process holds the same weights
            return
        extra = {
            "raml": {
                "mode": self.config.mode,
                "trainval": self.config.trainval,
                # the -train/-val/-trainval classes of raml test and raml extract (engine.val_ratio.recorded_val_ratio):
                # the config.yaml beside it is rewritten by a later run into the same folder
                "val_ratio": self.config.val_ratio,
                "train_split": self.train_split.name,
                "train_classes": self.train_split.num_classes,
                "image_size": self.config.image_size,
                "teacher_image_size": self.config.teacher_image_size,
                "teacher_sha256": self.teacher_sha,
                "training_dataset": self.config.training_dataset,
                "optimizer": self.config.optimizer,
                "scheduler": self.config.scheduler,
                # the optimizer state holds them too; stored to refuse a resume that asks others (it would ignore them)
                "lr": self.config.lr,
                "weight_decay": self.config.weight_decay,
                # the step after training that rewrites model_best: compared on resume as the settings above
                "per_size_bn": self.config.per_size_bn,
                "best_epoch": self.best_epoch,
                "history": self.history,
            }
        }
        extra["raml"]["max_map_unit"] = MAX_MAP_UNIT
        if self.config.optimizer == "sgd":  # the one optimizer that reads --momentum
            extra["raml"]["momentum"] = self.config.momentum
        if interrupted_in is not None:
            extra["raml"]["interrupted_in"] = interrupted_in
        extra["raml"].update(self.method.checkpoint_state())
        # a student for several query sizes: meta["image_sizes"] (read by raml test, search, export and serve)
        sizes = self.config.student_sizes()
        if len(sizes) > 1:
            self.student.meta["image_sizes"] = sizes
        else:
            self.student.meta.pop("image_sizes", None)
        save_checkpoint(
            path,
            self.student,
            epoch=epoch,
            max_map=self.best_map / 100.0 if self.best_map is not None else None,  # a fraction, as the reference
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            extra=extra,
        )
        for other in also:
            atomic_duplicate(path, other)

    def _log_epoch(self, stats: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        logger.info("%s", text)
        if self.writer is not None:
            for name, value in stats.items():
                if name != "epoch" and isinstance(value, (int, float)):
                    tag = f"val/{name[4:]}" if name.startswith("val_") else f"train/{name}"
                    self.writer.add_scalar(tag, value, stats["epoch"])
            self.writer.flush()


def convert_sync_batchnorm(network: nn.Module) -> nn.Module:
    """``network`` with its BatchNorm layers synchronised across processes (``--train-bn`` under torchrun on CUDA).

    Every layer keeps what it computes and its state dict keys: timm's converter maps a plain BatchNorm to
    ``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d`` (BatchNorm followed by its activation, in EfficientNets)
    to ``SyncBatchNormAct`` with the same activation (torch's own converter would drop it). A BatchNorm subclass
    of any other kind, such as the per-size layers of a ``meta["bn_sizes"]`` student
    (:class:`raml.models.switchable_bn.SwitchableBatchNorm2d`, whose per-size statistics have no synchronised
    variant), is refused with a ValueError rather than silently changed.
    """
    from timm.layers import BatchNormAct2d, SyncBatchNormAct
    from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

    convertible = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNormAct2d, SyncBatchNormAct)
    others = sorted(
        {
            type(m).__name__
            for m in network.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in convertible
        }
    )
    if others:
        meta = getattr(network, "meta", None)
        sizes = meta.get("bn_sizes") if isinstance(meta, dict) else None
        detail = f" (per-size BatchNorm statistics for sizes {sizes})" if sizes else ""
        raise ValueError(
            f"--train-bn under torchrun on CUDA synchronises the student's BatchNorm across processes, but its "
            f"{', '.join(others)} layers{detail} have no synchronised variant that keeps their statistics. "
            "Train with frozen BatchNorm (leave out --train-bn), train in one process, or start from the "
            "student without per-size statistics (raml.models.switchable_bn.strip_size_bn)."
        )
    keys = list(network.state_dict())
    converted = timm_convert_sync_batchnorm(network)
    if list(converted.state_dict()) != keys:  # pragma: no cover - a guard against a converter's change
        raise RuntimeError(
            "Synchronising the student's BatchNorm changed its state dict keys; train without --train-bn."
        )
    return converted


def _tensorboard_writer(directory: Path, config: TrainConfig):  # noqa: ANN202 - optional dependency
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--logger tensorboard needs the tensorboard package: pip install 'raml[tensorboard]'"
        ) from error
    writer = SummaryWriter(str(directory))
    writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")
    return writer
