"""The reference's ``python main.py`` command line: every flag and alias, its types and defaults, and the
protocol its default run follows (train on train + val, keep and test the last epoch, one max_lr)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raml.cli.main import build_parser, main
from raml.cli.train import config_from_args
from raml.engine.config import TrainConfig
from raml.models import build_network, load_checkpoint_file, save_checkpoint

REPO = Path(__file__).resolve().parents[2]

#: The reference's main.py flags (lib/cli.py): every option string of each, its type and its default.
#: A default of ``...`` is one we document as different (see docs/fidelity.md).
REFERENCE_MAIN = {
    "data_root": (["--data-root"], str, "data"),
    "directory": (["--directory"], str, ...),  # reference: none (required in practice); ours: exp
    "training_dataset": (["--training-dataset", "-d"], str, "cub"),
    "val": (["--no-val"], bool, True),
    "test_datasets": (["--test-datasets", "-td"], list, ...),  # cub-test in both (HEAD: a string; ours: a list)
    "val_freq": (["--val-freq"], int, 20),
    "save_freq": (["--save-freq"], int, 20),
    "student": (["--student", "-s"], str, ...),  # one of the pair is required, as in the reference
    "student_path": (["--student-path", "-spath"], str, ...),
    "teacher": (["--teacher", "-t"], str, ...),
    "teacher_path": (["--teacher-path", "-tpath"], str, ...),
    "pool": (["--pool", "-p"], str, "gem"),
    "whitening": (["--whitening", "-w"], int, 512),
    "pretrained": (["--not-pretrained"], bool, True),
    "mode": (["--mode", "-m"], str, "ts_aug"),
    "loss_margin": (["--loss-margin", "-lm"], float, 0.7),
    "lam_1": (["--lam-1"], float, 0.0),
    "lam_2": (["--lam-2"], float, 0.0),
    "image_size": (["--image-size"], int, 224),
    "teacher_image_size": (["--teacher-image-size"], int, 448),
    "neg_num": (["--neg-num", "-nn"], int, 4),
    "pos_num": (["--pos-num", "-pn"], int, 8),
    "query_size": (["--query-size", "-qs"], int, 8000),
    "pool_size": (["--pool-size", "-ps"], int, 20000),
    "gpu_id": (["--gpu-id", "-g"], str, "0"),
    "workers": (["--workers", "-j"], int, ...),  # 8, capped by the CPU count
    "epochs": (["--epochs"], int, 200),
    "batch_size": (["--batch-size", "-b"], int, 8),
    "update_every": (["--update-every", "-u"], int, 25),
    "optimizer": (["--optimizer", "-o"], str, "adamW"),
    "scheduler": (["--scheduler"], str, "onecycle"),
    "lr": (["--lr", "--learning-rate"], float, ...),  # reference: no default; ours 1e-4
    "momentum": (["--momentum"], float, 0.9),
    "weight_decay": (["--weight-decay", "--wd"], float, 1e-6),
    "print_freq": (["--print-freq"], int, 10),
    "resume_student": (["--resume-student"], str, None),
    "comment": (["--comment", "-c"], str, ""),
    "logger": (["--logger"], str, ...),  # reference: None; ours: none
    "seed": (["--seed"], int, 1234),
    "optimize": (["--optimize"], bool, False),
}


def _train_parser() -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices["train"]


def _parse(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_reference_option_string_belongs_to_its_flag():
    # the parser's own option strings, not substrings of the help text ("--student" is inside "--student-path")
    actions = _train_parser()._option_string_actions
    for dest, (strings, _, _) in REFERENCE_MAIN.items():
        for string in strings:
            assert string in actions, f"{string} is not an option of raml train"
        assert len({actions[s].dest for s in strings}) == 1, strings
        assert actions[strings[0]].dest == dest, (strings[0], actions[strings[0]].dest)
    # the seed README's list of flags (its "Additional run arguments" block) holds --loss as well
    assert "--loss" in actions


def test_reference_defaults_and_types():
    c = _parse(["--student", "resnet50", "--teacher-path", "t"])
    for dest, (_, kind, default) in REFERENCE_MAIN.items():
        value = getattr(c, dest)
        if default is not ...:
            assert value == default, (dest, value, default)
        if value is not None:
            assert isinstance(value, kind), (dest, type(value), kind)
    assert c.workers == min(8, __import__("os").cpu_count() or 1)
    assert c.test_datasets == ["cub-test"] and c.lr == 1e-4 and c.directory == "exp"
    # the protocol and the variants behind our flags default to the reference
    assert c.trainval is True
    assert (c.mixup_partner, c.group_lr_peaks, c.flush_accumulation, c.search_objective) == (
        "dataset",
        False,
        False,
        "last",
    )
    assert c.pretrained_weights == "v1"


SEED_EXAMPLE = (
    "--training-dataset 'cub' --test-datasets 'cub-test' --directory 'exp' --data-root 'data' "
    "--student 'resnet50' --teacher-path 'cub-448r-resnet50-512-gem-w' --teacher-image-size 448 "
    "--image-size 224 --lr 1.4025e-4 --lam-1 0.7718 --lam-2 0.6684"
)

EVERY_ALIAS = (
    "-d cars -td cars-test,cub-test -spath s.pth -tpath t.pth -p gemmp -w 256 -m ts_reg -lm 0.5 -nn 3 -pn 4 "
    "-qs 100 -ps 500 -g 0,1 -j 1 -b 6 -u 5 -o sgd -c hello --learning-rate 2e-4 --wd 1e-5 --no-val "
    "--val-freq 3 --save-freq 4 --not-pretrained --lam-1 0.1 --lam-2 0.2 --image-size 112 "
    "--teacher-image-size 336 --epochs 7 --scheduler cyclic --momentum 0.8 --print-freq 2 "
    "--resume-student model_best.pth.tar --logger tensorboard --seed 5 --directory out --data-root /d"
)


def test_the_seed_readme_example_resolves_to_the_reference_values():
    import shlex

    c = _parse(shlex.split(SEED_EXAMPLE))
    assert (c.training_dataset, c.test_datasets, c.directory, c.data_root) == ("cub", ["cub-test"], "exp", "data")
    assert (c.student, c.teacher_path, c.teacher_image_size, c.image_size) == (
        "resnet50",
        "cub-448r-resnet50-512-gem-w",
        448,
        224,
    )
    assert (c.lr, c.lam_1, c.lam_2) == (1.4025e-4, 0.7718, 0.6684)
    assert (c.mode, c.pool, c.whitening, c.epochs, c.batch_size, c.update_every) == ("ts_aug", "gem", 512, 200, 8, 25)


def test_every_alias_resolves_with_the_reference_types():
    import shlex

    c = _parse(shlex.split(EVERY_ALIAS))
    assert (c.training_dataset, c.test_datasets, c.student_path, c.teacher_path) == (
        "cars",
        ["cars-test", "cub-test"],
        "s.pth",
        "t.pth",
    )
    assert (c.pool, c.whitening, c.mode, c.loss_margin, c.neg_num, c.pos_num) == ("gemmp", 256, "ts_reg", 0.5, 3, 4)
    assert (c.query_size, c.pool_size, c.gpu_id, c.workers, c.batch_size, c.update_every) == (
        100,
        500,
        "0,1",
        1,
        6,
        5,
    )
    assert (c.optimizer, c.comment, c.lr, c.weight_decay, c.val, c.val_freq, c.save_freq) == (
        "sgd",
        "hello",
        2e-4,
        1e-5,
        False,
        3,
        4,
    )
    assert (c.pretrained, c.lam_1, c.lam_2, c.image_size, c.teacher_image_size, c.epochs) == (
        False,
        0.1,
        0.2,
        112,
        336,
        7,
    )
    assert (c.scheduler, c.momentum, c.print_freq, c.resume_student, c.logger, c.seed) == (
        "cyclic",
        0.8,
        2,
        "model_best.pth.tar",
        "tensorboard",
        5,
    )
    assert isinstance(c.gpu_id, str)


@pytest.mark.parametrize("value", ["a", "0,x", "-1", "0;1", ""])
def test_bad_gpu_id_is_a_clear_error(value, tmp_path):
    with pytest.raises(SystemExit, match="--gpu-id expects GPU indices"):
        main(["train", "--student", "resnet50", "--teacher-path", "t", "--gpu-id", value, "--directory", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_gpu_id_runs_on_a_machine_without_a_gpu(monkeypatch):
    from raml.cli.common import devices_from_gpu_id

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices_from_gpu_id("0,1") == (torch.device("cpu"), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices_from_gpu_id("0,1") == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert devices_from_gpu_id("1") == (torch.device("cuda", 1), torch.device("cuda", 1))
    assert devices_from_gpu_id("0,1", "cpu") == (torch.device("cpu"), torch.device("cpu"))  # --device wins
    with pytest.raises(ValueError, match="GPU 2 does not exist"):
        devices_from_gpu_id("2")


def test_workers_help_says_it_is_capped():
    assert "capped" in _train_parser()._option_string_actions["--workers"].help


# ------------------------------------------------------------------------------------- the protocol
@pytest.fixture
def tiny_teacher(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    save_checkpoint(path, build_network("test_resnet", whitening=16, pretrained=False))
    return path


def test_main_py_with_short_aliases_runs_the_reference_protocol(cub_root: Path, tiny_teacher: Path, tmp_path: Path):
    """python main.py, short aliases, two epochs: train + val classes, model_best = epoch 2, one max_lr."""
    run_dir = tmp_path / "exp"
    argv = [
        sys.executable, str(REPO / "main.py"),
        "-d", "cub", "-td", "cub-test", "-s", "test_resnet", "-tpath", str(tiny_teacher), "-p", "gem", "-w", "16",
        "-m", "ts_aug", "-lm", "0.7", "-nn", "4", "-pn", "2", "-qs", "40", "-ps", "100", "-g", "0", "-j", "0",
        "-b", "4", "-u", "2", "-o", "adamW", "-c", "aliases", "--lr", "1e-3", "--lam-1", "0.5", "--lam-2", "0.5",
        "--epochs", "2", "--val-freq", "1", "--image-size", "32", "--teacher-image-size", "48",
        "--not-pretrained", "--data-root", str(cub_root), "--directory", str(run_dir),
        "--device", "cpu", "--no-progress", "--json", str(tmp_path / "test.json"),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainval"] is True and config["comment"] == "aliases" and config["gpu_id"] == "0"
    best = load_checkpoint_file(run_dir / "model_best.pth.tar")
    assert best["epoch"] == 2  # the last epoch, not a selected one
    extra = best["raml"]
    # the cub fixture has 50 train + 50 val classes: the run trained on all 100
    assert extra["train_split"] == "cub-trainval" and extra["train_classes"] == 100
    # the test datasets were monitored every epoch (a printout, stored as the reference's max_map)
    history = extra["history"]
    assert all("monitor_cub-test_mAP" in h for h in history)
    assert best["max_map"] == pytest.approx(history[-1]["monitor_cub-test_mAP"] / 100)  # a fraction, as the reference
    # one max_lr for every parameter group (GeM p included), as the reference's OneCycleLR(max_lr=lr)
    peaks = {name[len("lr_max_") :]: max(h[name] for h in history) for name in history[0] if name.startswith("lr_max_")}
    assert set(peaks) == {"backbone", "pool", "whiten"}
    assert max(peaks.values()) - min(peaks.values()) < 1e-12
    assert 0.5e-3 < peaks["pool"] <= 1e-3 + 1e-12
    results = json.loads((tmp_path / "test.json").read_text())
    assert set(results["cub-test"]) == {"asym", "sym"}
    assert results["cub-test"]["asym"]["num_skipped_images"] == 0


def test_group_lr_peaks_keeps_each_groups_own_peak(cub_root: Path, tiny_teacher: Path, tmp_path: Path):
    run_dir = tmp_path / "ours"
    argv = [
        "train", "-d", "cub", "-td", "", "-spath", str(tiny_teacher), "-tpath", str(tiny_teacher), "-pn", "2",
        "-qs", "40", "-j", "0", "-b", "4", "-u", "2", "--lr", "1e-3", "--epochs", "2", "--image-size", "32",
        "--teacher-image-size", "48", "--data-root", str(cub_root), "--directory", str(run_dir), "--device", "cpu",
        "--no-progress", "--group-lr-peaks", "--flush-accumulation", "--mixup-partner", "batch",
    ]  # fmt: skip
    assert main(argv) == 0
    history = load_checkpoint_file(run_dir / "model_best.pth.tar")["raml"]["history"]
    backbone = max(h["lr_max_backbone"] for h in history)
    pool = max(h["lr_max_pool"] for h in history)
    assert pool == pytest.approx(10 * backbone)


def test_resume_student_is_looked_up_in_the_directory(cub_root: Path, tiny_teacher: Path, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    base = [
        "train", "-d", "cub", "-td", "", "-spath", str(tiny_teacher), "-tpath", str(tiny_teacher), "-pn", "2",
        "-qs", "16", "-j", "0", "-b", "4", "-u", "1", "--image-size", "32", "--teacher-image-size", "48",
        "--data-root", str(cub_root), "--directory", str(run_dir), "--device", "cpu", "--no-progress",
        "--save-freq", "1",
    ]  # fmt: skip
    assert main([*base, "--epochs", "2"]) == 0
    first = load_checkpoint_file(run_dir / "model_best.pth.tar")["state_dict"]
    # the reference joins --resume-student to --directory: a bare file name continues that run
    assert main([*base, "--epochs", "2", "--resume-student", "model_epoch1.pth.tar"]) == 0
    again = load_checkpoint_file(run_dir / "model_best.pth.tar")
    assert again["epoch"] == 2
    assert all(torch.equal(first[k], again["state_dict"][k]) for k in first)  # epoch 2 re-run exactly
    assert main([*base, "--epochs", "2", "--resume-student", "nope.pth.tar"]) == 2
    assert "looked for" in capsys.readouterr().err
    # a schedule of another length cannot continue: a clear error, not a scheduler traceback
    assert main([*base, "--epochs", "3", "--resume-student", "model_epoch1.pth.tar"]) == 2
    assert "-step learning-rate schedule" in capsys.readouterr().err


def test_an_epoch_without_a_single_optimizer_step_is_refused(cub_root: Path, tiny_teacher: Path, tmp_path, capsys):
    argv = [
        "train", "-d", "cub", "-td", "", "-spath", str(tiny_teacher), "-tpath", str(tiny_teacher), "-pn", "2",
        "-qs", "16", "-j", "0", "-b", "4", "--image-size", "32", "--teacher-image-size", "48",
        "--data-root", str(cub_root), "--directory", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 2  # 4 batches an epoch, --update-every 25: the reference would never step
    err = capsys.readouterr().err
    assert "--update-every" in err and "--flush-accumulation" in err
    assert not list((tmp_path / "run").glob("*.pth.tar"))


def test_optimize_refuses_a_directory_with_checkpoints_before_any_trial(cub_root, tiny_teacher, tmp_path, capsys):
    run_dir = tmp_path / "search"
    run_dir.mkdir()
    kept = run_dir / "model_best.pth.tar"
    kept.write_bytes(b"precious")
    argv = [
        "train", "--optimize", "--trials", "1", "-d", "cub", "-td", "", "-spath", str(tiny_teacher),
        "-tpath", str(tiny_teacher), "-pn", "2", "-qs", "16", "-j", "0", "-b", "4", "-u", "1", "--epochs", "1",
        "--image-size", "32", "--teacher-image-size", "48", "--data-root", str(cub_root),
        "--directory", str(run_dir), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert kept.read_bytes() == b"precious"
    assert not (run_dir / "optuna.db").exists() and not list(run_dir.glob("trial_*"))


def test_optimize_without_optuna_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    from raml.engine import search

    config = TrainConfig(student="resnet50", teacher_path="t", directory=str(tmp_path), optimize=True)
    with pytest.raises(ImportError, match="pip install optuna"):
        search.optimize_and_train(config, torch.device("cpu"))
    assert not list(tmp_path.iterdir())


def test_requirements_txt_installs_this_package():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert "-e ." in [line for line in lines if line]


def test_requirements_txt_resolves_in_this_environment(tmp_path: Path):
    # offline: everything it needs is installed here, so pip resolves it without an index
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "-r",
         str(REPO / "requirements.txt")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raml" in result.stdout
    # the scripts run here: in this process (a fresh interpreter per script cost ~6 CPU s of imports; both run
    # verbatim as commands in test_main_py_with_short_aliases_runs_the_reference_protocol and
    # tests/cli/test_test_extract.py::test_seed_test_py_command_runs_verbatim)
    for script in ("main.py", "test.py"):
        shown = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(shown):
            patch.setattr(sys, "argv", [str(REPO / script), "--help"])
            with pytest.raises(SystemExit) as stop:
                runpy.run_path(str(REPO / script), run_name="__main__")
        assert stop.value.code == 0 and "--student-path" in shown.getvalue(), script
