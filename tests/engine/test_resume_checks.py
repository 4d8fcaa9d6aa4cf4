"""``--resume-student`` continues only the run that wrote the checkpoint: other settings, a foreign checkpoint
outside ``--directory``, a scheduler out of step with the epoch or a damaged candidate of ``last`` are refused (or
skipped) with a message, before anything is written (CPU, the machinery teacher of tests/engine/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from raml.engine.trainer import Trainer

CPU = torch.device("cpu")


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_checkpoint_of_other_run_settings_is_refused_with_every_difference(
    machinery, machinery_teacher_path, finished, tmp_path
):
    run = _copy(finished, tmp_path)
    before = _folder_state(run)
    other_teacher = tmp_path / "other_teacher.pth.tar"
    shutil.copyfile(machinery_teacher_path, other_teacher)
    with open(other_teacher, "ab") as handle:  # same weights, another file: another SHA-256
        handle.write(b"\0")
    config = machinery.distill_config(
        run,
        other_teacher,
        epochs=2,
        val=False,
        scheduler="exponential",
        resume_student="last",
        mode="aml",
        image_size=24,
        trainval=False,
        training_dataset="cub",
    )
    with pytest.raises(ValueError, match="other settings") as refused:
        Trainer(config, CPU, progress=False)
    message = str(refused.value)
    for flag in (
        "--mode: checkpoint 'ts_aug', asked 'aml'",
        "--image-size: checkpoint 32, asked 24",
        "--teacher-path",
        "--select-on-val",
        "--student-path",
    ):
        assert flag in message, message
    assert "--training-dataset" not in message  # the same
    assert _folder_state(run) == before

    # the teacher's own file (a sym run) is not a checkpoint of this distillation run
    teacher_resume = machinery.distill_config(
        tmp_path / "new",
        machinery_teacher_path,
        epochs=2,
        val=False,
        scheduler="exponential",
        resume_student=str(machinery_teacher_path),
    )
    with pytest.raises(ValueError, match="--mode: checkpoint 'sym', asked 'ts_aug'"):
        Trainer(teacher_resume, CPU, progress=False)
    assert not (tmp_path / "new").exists()


def test_another_image_size_list_is_refused(machinery, machinery_teacher_path, finished, tmp_path):
    """The whole --image-size list is compared, not its first size: a run trained at 32,24 resumed at 32,16 or
    at 32 alone (or a run trained at 32 resumed at 32,24) is refused; the same list resumes."""
    multi = tmp_path / "multi"
    config = machinery.distill_config(
        multi, machinery_teacher_path, epochs=1, val=False, image_sizes=[32, 24], query_size=8, pos_num=2
    )
    Trainer(config, CPU, progress=False).run()
    config = config.replace(epochs=2)
    before = _folder_state(multi)
    for sizes, shown in (([32, 16], "32,16"), (None, "32")):
        with pytest.raises(ValueError, match="other settings") as refused:
            Trainer(config.replace(image_sizes=sizes, resume_student="last"), CPU, progress=False)
        assert f"--image-size: checkpoint 32,24, asked {shown}" in str(refused.value)
        assert str(refused.value).count("--image-size") == 1
    assert _folder_state(multi) == before
    resumed = Trainer(config.replace(resume_student="last"), CPU, progress=False)
    assert resumed.start_epoch == 2
    resumed.release_lock()

    run = _copy(finished, tmp_path)
    single = machinery.distill_config(
        run, machinery_teacher_path, epochs=2, val=False, scheduler="exponential", resume_student="last"
    )
    with pytest.raises(ValueError, match="--image-size: checkpoint 32, asked 32,24"):
        Trainer(single.replace(image_sizes=[32, 24]), CPU, progress=False)


def test_another_val_ratio_is_refused_where_it_chooses_the_training_classes(
    machinery, machinery_teacher_path, finished, tmp_path
):
    """--select-on-val trains on the train part of a --val-ratio split: resuming with another ratio would train on
    other classes, and is refused; a train + val run (every class whatever the ratio) resumes with any."""
    run = tmp_path / "select"
    config = machinery.distill_config(run, machinery_teacher_path, epochs=1, trainval=False, val_ratio=0.5)
    Trainer(config, CPU, progress=False).run()
    before = _folder_state(run)
    with pytest.raises(ValueError, match="--val-ratio: checkpoint 0.5, asked 0.25"):
        Trainer(config.replace(epochs=2, val_ratio=0.25, resume_student="last"), CPU, progress=False)
    assert _folder_state(run) == before
    resumed = Trainer(config.replace(epochs=2, resume_student="last"), CPU, progress=False)
    assert resumed.start_epoch == 2
    resumed.release_lock()
    whole = _copy(finished, tmp_path)  # train + val
    config = machinery.distill_config(whole, machinery_teacher_path, epochs=2, val=False, scheduler="exponential")
    resumed = Trainer(config.replace(val_ratio=0.25, resume_student="last"), CPU, progress=False)
    assert resumed.start_epoch == 2
    resumed.release_lock()


def test_a_flipped_per_size_bn_is_refused_as_another_run_setting(machinery, machinery_teacher_path, tmp_path):
    """--per-size-bn rewrites model_best after training: resumed with the flag flipped, a finished run kept (or
    added) per-size statistics its settings did not ask for, and an interrupted one ended otherwise than it began."""
    run = tmp_path / "sizes"
    config = machinery.distill_config(
        run, machinery_teacher_path, epochs=1, val=False, scheduler="exponential", image_sizes=[32, 24]
    )
    Trainer(config, CPU, progress=False).run()
    before = _folder_state(run)
    resume = config.replace(epochs=2, resume_student="last")
    with pytest.raises(ValueError, match="other settings.*\n  - --per-size-bn: checkpoint off, asked on\n"):
        Trainer(resume.replace(per_size_bn=True), CPU, progress=False)
    assert _folder_state(run) == before
    resumed = Trainer(resume, CPU, progress=False)
    assert resumed.start_epoch == 2
    resumed.release_lock()


def test_another_optimizer_or_scheduler_is_refused_also_for_a_checkpoint_without_their_names(
    machinery, machinery_teacher_path, finished, tmp_path
):
    run = _copy(finished, tmp_path)
    base = machinery.distill_config(
        run, machinery_teacher_path, epochs=1, val=False, scheduler="exponential", resume_student="last"
    )
    with pytest.raises(ValueError, match="--scheduler: checkpoint 'exponential', asked 'cyclic'"):
        Trainer(base.replace(scheduler="cyclic"), CPU, progress=False)
    with pytest.raises(ValueError, match="--optimizer: checkpoint 'adamW', asked 'sgd'"):
        Trainer(base.replace(optimizer="sgd"), CPU, progress=False)

    # a checkpoint of an older version stores neither name: its states are checked instead
    checkpoint = torch.load(run / "model_last.pth.tar", weights_only=True)
    del checkpoint["raml"]["optimizer"], checkpoint["raml"]["scheduler"]
    torch.save(checkpoint, run / "model_last.pth.tar")
    before = _folder_state(run)
    with pytest.raises(ValueError, match="not saved by --optimizer sgd .*lack dampening, momentum, nesterov"):
        Trainer(base.replace(optimizer="sgd"), CPU, progress=False)
    with pytest.raises(ValueError, match="not saved by --scheduler cyclic"):
        Trainer(base.replace(scheduler="cyclic"), CPU, progress=False)
    assert _folder_state(run) == before
    Trainer(base, CPU, progress=False).release_lock()  # its own settings still resume (the folder's lock freed)


def test_another_lr_or_weight_decay_is_refused_rather_than_ignored(
    machinery, machinery_teacher_path, finished, tmp_path
):
    """The optimizer's state restores its groups' lr and weight decay: a resume that asked others went on with the
    checkpoint's while config.yaml recorded the new ones. --momentum is compared only where the optimizer reads it."""
    run = _copy(finished, tmp_path)
    base = machinery.distill_config(
        run, machinery_teacher_path, epochs=1, val=False, scheduler="exponential", resume_student="last"
    )
    before = _folder_state(run)
    with pytest.raises(ValueError, match=r"--lr: checkpoint 0\.0003, asked 0\.05\n  - --weight-decay: checkpoint"):
        Trainer(base.replace(lr=5e-2, weight_decay=1e-3), CPU, progress=False)
    assert _folder_state(run) == before
    Trainer(base.replace(momentum=0.5), CPU, progress=False).release_lock()  # adamW reads no momentum
    from raml.engine.resume import check_run_fields, run_fields

    sgd = base.replace(optimizer="sgd")
    with pytest.raises(ValueError, match=r"--momentum: checkpoint 0\.9, asked 0\.5"):
        check_run_fields(run_fields(sgd, None), run_fields(sgd.replace(momentum=0.5), None), run)

    # a checkpoint of an older version stores none of them: not compared, it resumes as before
    checkpoint = torch.load(run / "model_last.pth.tar", weights_only=True)
    del checkpoint["raml"]["lr"], checkpoint["raml"]["weight_decay"]
    torch.save(checkpoint, run / "model_last.pth.tar")
    Trainer(base.replace(lr=5e-2), CPU, progress=False).release_lock()


def test_another_folders_checkpoint_does_not_overwrite_a_finished_run(
    machinery, machinery_teacher_path, finished, tmp_path
):
    run = _copy(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(finished, elsewhere)
    before = _folder_state(run)
    base = machinery.distill_config(run, machinery_teacher_path, epochs=1, val=False, scheduler="exponential")
    with pytest.raises(FileExistsError, match="is not a checkpoint of --directory .*would overwrite"):
        Trainer(base.replace(resume_student=str(elsewhere / "model_last.pth.tar")), CPU, progress=False)
    assert _folder_state(run) == before
    # the folder's own checkpoints, by name, by a path through another spelling, or 'last', resume; so does
    # another folder's checkpoint into a new folder
    for resume in ("model_epoch1.pth.tar", str(run / ".." / "run" / "model_last.pth.tar"), "last"):
        Trainer(base.replace(resume_student=resume), CPU, progress=False).release_lock()  # each takes the lock
    fresh = base.replace(directory=str(tmp_path / "fresh"), resume_student=str(elsewhere / "model_last.pth.tar"))
    Trainer(fresh, CPU, progress=False).release_lock()


@pytest.mark.parametrize("scheduler", ["onecycle", "exponential", "none"])
def test_an_interrupted_checkpoint_is_refused_and_last_resumes(machinery, machinery_teacher_path, tmp_path, scheduler):
    """model_interrupted.pth.tar is labelled with the last finished epoch, its weights are part-way into the next:
    resuming it used to replay the epoch (and overrun the one-cycle schedule near its end). A per-epoch schedule
    (exponential) or none has not moved mid-epoch, so the schedule's position cannot tell: the file says it."""
    from raml.engine.trainer import TrainingInterrupted

    config = machinery.distill_config(
        tmp_path / "run", machinery_teacher_path, epochs=2, val=False, scheduler=scheduler, update_every=1
    )
    trainer = Trainer(config, CPU, progress=False)
    assert trainer.steps_per_epoch >= 2
    batch_loss, seen = trainer.method.batch_loss, []

    def stopping(*args, **kwargs):
        seen.append(1)
        if len(seen) == trainer.batches_per_epoch + 1:  # the first batch of epoch 2: one step into it
            trainer._stop_signal = 15
        return batch_loss(*args, **kwargs)

    trainer.method.batch_loss = stopping
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    before = _folder_state(tmp_path / "run")
    with pytest.raises(ValueError, match=r"part-way through epoch 2.*cannot be resumed.*--resume-student last"):
        Trainer(config.replace(resume_student="model_interrupted.pth.tar"), CPU, progress=False)
    assert _folder_state(tmp_path / "run") == before
    resumed = Trainer(config.replace(resume_student="last"), CPU, progress=False)
    assert resumed.start_epoch == 2
    resumed.run()


def test_an_interrupted_checkpoint_of_an_earlier_version_is_known_by_its_name(tmp_path):
    """Before ``interrupted_in`` was recorded, model_interrupted.pth.tar said what it was only by its name."""
    from raml.engine.resume import INTERRUPTED_NAME, check_not_interrupted

    stored = {"lr": 3e-4, "history": []}  # the raml record of an earlier version: no interrupted_in
    with pytest.raises(ValueError, match=r"part-way through an epoch \(an earlier raml version wrote it.*resumed"):
        check_not_interrupted(stored, tmp_path / INTERRUPTED_NAME)
    check_not_interrupted(stored, tmp_path / "model_last.pth.tar")  # a finished epoch's checkpoint resumes


def test_last_skips_a_damaged_checkpoint_and_a_damaged_file_is_named_a_training_checkpoint(
    machinery, machinery_teacher_path, finished, tmp_path, caplog
):
    run = _copy(finished, tmp_path)
    last = run / "model_last.pth.tar"
    last.write_bytes(last.read_bytes()[:5000])  # truncated
    base = machinery.distill_config(run, machinery_teacher_path, epochs=1, val=False, scheduler="exponential")
    with caplog.at_level("WARNING"):
        trainer = Trainer(base.replace(resume_student="last"), CPU, progress=False)
    assert trainer.resume_path("last") == run / "model_epoch1.pth.tar" and trainer.start_epoch == 2
    assert "skipped damaged checkpoints: model_last.pth.tar" in caplog.text
    trainer.release_lock()  # built, not run: the folder's lock is freed for the next trainer
    with pytest.raises(ValueError, match="training checkpoint is damaged") as refused:
        Trainer(base.replace(resume_student="model_last.pth.tar"), CPU, progress=False)
    assert "downloaded" not in str(refused.value) and "--resume-student last skips" in str(refused.value)


def test_last_reads_a_checkpoint_in_torchs_legacy_format_instead_of_calling_it_damaged(tmp_path, caplog):
    """The memory-mapped epoch read needs torch's zip format: a legacy-format checkpoint (older torch, or
    ``_use_new_zipfile_serialization=False``) is read in full, not skipped as damaged."""
    from raml.engine.resume import last_checkpoint

    state = {"w": torch.zeros(3)}
    torch.save(
        {"epoch": 3, "state_dict": state}, tmp_path / "model_epoch3.pth.tar", _use_new_zipfile_serialization=False
    )
    torch.save({"epoch": 2, "state_dict": state}, tmp_path / "model_epoch2.pth.tar")
    with caplog.at_level("WARNING"):
        assert last_checkpoint(tmp_path) == tmp_path / "model_epoch3.pth.tar"
    assert "damaged" not in caplog.text


def test_overwrite_removes_the_previous_runs_checkpoints_so_last_resumes_the_new_run(
    machinery, machinery_teacher_path, tmp_path, caplog
):
    """--overwrite used to leave the old run's model_epoch<N> and model_best beside the new run's: a new run
    stopped after epoch 1 then resumed from the old run's epoch 2 with --resume-student last."""
    from raml.engine.trainer import TrainingInterrupted

    run = tmp_path / "run"
    old = machinery.distill_config(run, machinery_teacher_path, epochs=2, val=False, save_freq=1, lr=1e-3)
    Trainer(old, CPU, progress=False).run()
    assert (run / "model_epoch2.pth.tar").is_file() and (run / "model_best.pth.tar").is_file()
    (run / "notes.txt").write_text("mine")
    new = old.replace(lr=5e-4)
    with caplog.at_level("INFO"), pytest.raises(TrainingInterrupted):
        Trainer(new.replace(overwrite=True), CPU, progress=False, stop_after_epoch=1).run()
    assert "removed the previous run's checkpoints" in caplog.text
    assert sorted(p.name for p in run.glob("*.pth.tar")) == ["model_epoch1.pth.tar", "model_last.pth.tar"]
    assert (run / "notes.txt").read_text() == "mine"  # not a checkpoint of the run: untouched
    resumed = Trainer(new.replace(resume_student="last"), CPU, progress=False)
    assert resumed.resume_path("last") == run / "model_last.pth.tar" and resumed.start_epoch == 2
    resumed.release_lock()


def test_overwrite_refuses_an_input_that_is_a_checkpoint_of_the_folder_it_replaces(
    machinery, machinery_teacher_path, finished, tmp_path
):
    """Fine-tuning from <dir>/model_best.pth.tar into <dir> with --overwrite replaced the input with the new run's
    model_best (the log said it was kept): refused before anything is written."""
    run = _copy(finished, tmp_path)
    base = machinery.distill_config(run, machinery_teacher_path, epochs=1, val=False, overwrite=True)
    elsewhere = tmp_path / "elsewhere.pth"
    elsewhere.write_bytes((run / "model_last.pth.tar").read_bytes())
    link = run / "model_epoch7.pth.tar"  # a link named like a checkpoint of the folder: removed too
    link.symlink_to(elsewhere)
    inputs = (
        {"student_path": str(run / "model_best.pth.tar")},
        {"teacher_path": str(run / "model_last.pth.tar")},
        {"teacher_path": str(link)},
    )
    before = _folder_state(run)
    for changes in inputs:
        with pytest.raises(FileExistsError, match=r"is a checkpoint in --directory .*--overwrite removes"):
            Trainer(base.replace(**changes), CPU, progress=False)
        assert _folder_state(run) == before


def test_a_foreign_tmp_file_and_a_users_config_yaml_in_the_folder_are_left_alone(
    machinery, machinery_teacher_path, tmp_path
):
    """A run deleted every hidden ``.*.tmp`` of its folder and replaced a ``config.yaml`` it had not written (the
    user's, comments and all) without --overwrite. Now only its own outputs' temporaries go, and another
    config.yaml is refused, before anything is written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".notes.tmp").write_text("the user's")
    (run / "config.yaml").write_text("# my settings\nepochs: 3\n")
    leftover = run / ".model_last.pth.tar.0123abcd.tmp"  # what a kill -9 during a save leaves
    leftover.write_bytes(b"half")
    config = machinery.distill_config(run, machinery_teacher_path, epochs=1, val=False)
    before = _folder_state(run)
    with pytest.raises(FileExistsError, match=r"config\.yaml already exists and is not a record.*--overwrite"):
        Trainer(config, CPU, progress=False)
    assert _folder_state(run) == before

    (run / "config.yaml").unlink()
    Trainer(config, CPU, progress=False).release_lock()
    assert (run / ".notes.tmp").read_text() == "the user's" and not leftover.exists()
    # a record raml wrote, of these settings or of an earlier start's (stopped before a checkpoint), is replaced
    Trainer(config, CPU, progress=False).release_lock()
    Trainer(config.replace(epochs=2), CPU, progress=False).release_lock()
    assert "epochs: 2" in (run / "config.yaml").read_text()
