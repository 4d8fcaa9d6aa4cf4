"""The training configuration: YAML files, precedence, validation, and the seed's flags."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from raml.cli.main import build_parser
from raml.cli.train import config_from_args
from raml.engine.config import PER_INVOCATION, TrainConfig, _given_flag, load_yaml_config

REPO = Path(__file__).resolve().parents[2]

SEED_FLAGS = [
    "--student-path",
    "--student",
    "--teacher-path",
    "--teacher",
    "--pool",
    "--whitening",
    "--training-dataset",
    "--directory",
    "--test-datasets",
    "--data-root",
    "--no-val",
    "--val-freq",
    "--save-freq",
    "--not-pretrained",
    "--loss",
    "--loss-margin",
    "--mode",
    "--image-size",
    "--teacher-image-size",
    "--neg-num",
    "--query-size",
    "--pool-size",
    "--pos-num",
    "--lam-1",
    "--lam-2",
    "--batch-size",
    "--update-every",
    "--epochs",
    "--lr",
    "--optimizer",
    "--scheduler",
    "--gpu-id",
    "--workers",
    "--momentum",
    "--weight-decay",
    "--print-freq",
    "--comment",
    "--optimize",
    "--seed",
    "--resume-student",
]


def _parse(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_seed_flag_is_accepted():
    # the parser's own option strings: a substring test of the help would let "--student" match "--student-path"
    options = build_parser()._subparsers._group_actions[0].choices["train"]._option_string_actions
    for flag in SEED_FLAGS:
        assert flag in options, flag


def test_reference_defaults():
    c = _parse(["--student", "resnet50", "--teacher-path", "t"])
    assert (c.data_root, c.training_dataset, c.test_datasets, c.val, c.val_freq, c.save_freq) == (
        "data",
        "cub",
        ["cub-test"],
        True,
        20,
        20,
    )
    assert (c.pool, c.whitening, c.pretrained, c.mode, c.loss_margin, c.lam_1, c.lam_2) == (
        "gem",
        512,
        True,
        "ts_aug",
        0.7,
        0.0,
        0.0,
    )
    assert (c.image_size, c.teacher_image_size, c.neg_num, c.pos_num, c.query_size, c.pool_size) == (
        224,
        448,
        4,
        8,
        8000,
        20000,
    )
    assert (c.epochs, c.batch_size, c.update_every, c.optimizer, c.scheduler) == (200, 8, 25, "adamW", "onecycle")
    assert (c.momentum, c.weight_decay, c.print_freq, c.seed) == (0.9, 1e-6, 10, 1234)


def test_seed_example_command_parses():
    c = _parse(
        [
            "--training-dataset",
            "cub",
            "--test-datasets",
            "cub-test",
            "--directory",
            "exp",
            "--data-root",
            "data",
            "--student",
            "resnet50",
            "--teacher-path",
            "cub-448r-resnet50-512-gem-w",
            "--teacher-image-size",
            "448",
            "--image-size",
            "224",
            "--lr",
            "1.4025e-4",
            "--lam-1",
            "0.7718",
            "--lam-2",
            "0.6684",
        ]
    )
    assert c.lr == 1.4025e-4 and c.lam_1 == 0.7718 and c.teacher_path == "cub-448r-resnet50-512-gem-w"


@pytest.mark.parametrize("name", ["cub", "cars", "sop"])
def test_shipped_configs_hold_the_seed_values(name):
    c = _parse(["--config", str(REPO / "configs" / f"{name}.yaml")])
    expected = {
        "cub": (1.4025e-4, 0.7718, 0.6684),
        "cars": (1.1692e-4, 0.6371, 0.7731),
        "sop": (1.7579e-4, 0.7482, 0.6778),
    }[name]
    assert (c.lr, c.lam_1, c.lam_2) == expected
    assert (c.teacher_image_size, c.image_size, c.training_dataset) == (448, 224, name)
    # the paper's protocol: train + val, the last epoch kept, the reference's schedule and mixup
    assert (c.trainval, c.val, c.mixup_partner, c.group_lr_peaks, c.flush_accumulation) == (
        True,
        True,
        "dataset",
        False,
        False,
    )
    assert (c.pretrained, c.pretrained_weights, c.freeze_bn, c.epochs, c.seed) == (True, "v1", True, 200, 1234)


def test_command_line_overrides_yaml_and_exclusive_twins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student: resnet50\nteacher-path: t\nlr: 1e-4\nepochs: 3\n")
    c = _parse(["--config", str(cfg), "--epochs", "5", "--student-path", "s.pth"])
    assert c.epochs == 5 and c.lr == 1e-4 and c.student_path == "s.pth" and c.student is None
    # both twins in the file itself: refused (the run silently took student_path before), unless one is given
    cfg.write_text("student: resnet50\nstudent-path: s.pth\nteacher-path: t\n")
    with pytest.raises(ValueError, match=r"c.yaml sets both student and student_path, which exclude each other"):
        _parse(["--config", str(cfg)])
    assert _parse(["--config", str(cfg), "--student", "resnet18"]).student == "resnet18"


def test_every_on_off_flag_has_an_opposite_that_sets_back_what_the_yaml_sets(tmp_path, monkeypatch):
    import argparse

    from raml.cli.train import opposite_flag

    monkeypatch.setattr(TrainConfig, "validate", lambda self: None)  # each setting alone, whatever it needs besides
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    one_way = [
        action
        for action in train._actions
        if isinstance(action, argparse._StoreConstAction)
        and isinstance(action.const, bool)
        and action.dest in TrainConfig.__dataclass_fields__
        and action.dest not in PER_INVOCATION  # never in a --config file
        and action.help != argparse.SUPPRESS
    ]
    assert {"--amp", "--no-val", "--not-pretrained", "--optimize", "--per-size-bn", "--train-bn"} <= {
        flag for action in one_way for flag in action.option_strings
    }
    cfg = tmp_path / "c.yaml"
    for action in one_way:
        flag = next(f for f in action.option_strings if f.startswith("--"))
        cfg.write_text(f"{action.dest}: {str(action.const).lower()}\n")
        assert getattr(_parse(["--config", str(cfg)]), action.dest) is action.const, flag
        assert getattr(_parse(["--config", str(cfg), opposite_flag(flag)]), action.dest) is (not action.const), flag
    assert (opposite_flag("--no-val"), opposite_flag("--not-pretrained"), opposite_flag("--amp")) == (
        "--val",
        "--pretrained",
        "--no-amp",
    )


@pytest.mark.parametrize(
    ("argv", "longer"),
    [(["--pretrained", "IMAGENET1K_V1"], "--pretrained-weights"), (["--mixup", "batch"], "--mixup-partner")],
)
def test_an_opposite_flag_given_a_value_names_the_longer_flag_it_once_abbreviated(argv, longer, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["train", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{argv[0]} takes no value" in err and f"spell it out: {longer} {argv[1]}" in err, err


def test_an_opposite_flag_that_abbreviated_nothing_alone_names_no_flag(capsys):
    with pytest.raises(SystemExit):  # --val was ambiguous (--val-freq, --val-ratio): no guess
        build_parser().parse_args(["train", "--val", "0.2"])
    err = capsys.readouterr().err
    assert "--val takes no value" in err and "spell it out" not in err, err


def test_bad_yaml_values_are_clear(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: many\n")
    with pytest.raises(ValueError, match="epochs expects"):
        load_yaml_config(cfg)
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_yaml_config(cfg)
    with pytest.raises(FileNotFoundError):
        load_yaml_config(tmp_path / "missing.yaml")


def test_inconsistent_settings_are_refused():
    with pytest.raises(ValueError, match="--teacher-path"):
        TrainConfig(student="resnet50").validate()
    with pytest.raises(ValueError, match="--student"):
        TrainConfig(teacher_path="t").validate()
    with pytest.raises(ValueError, match="--epochs"):
        TrainConfig(student="r", teacher_path="t", epochs=0).validate()
    with pytest.raises(ValueError, match="--lr"):
        TrainConfig(student="r", teacher_path="t", lr=-1).validate()
    with pytest.raises(ValueError, match="--mixup-partner 'pairs'; valid: dataset, batch"):
        TrainConfig(student="r", teacher_path="t", mixup_partner="pairs").validate()
    with pytest.raises(ValueError, match="--search-objective"):
        TrainConfig(student="r", teacher_path="t", search_objective="mean").validate()
    for name, base in (("synth-val", "synth"), ("cub-trainval", "cub"), ("cars-test", "cars")):
        with pytest.raises(
            ValueError, match=rf"--training-dataset '{name}' names a part .* give the dataset, '{base}'"
        ):
            TrainConfig(student="r", mode="sym", training_dataset=name).validate()
    TrainConfig(student="r", mode="sym", training_dataset="own/splits-test.json").validate()  # a file, not a part


@pytest.mark.parametrize(("batch_size", "low"), [(2, 4), (6, 4), (13, 12)])
def test_a_sym_batch_size_that_is_not_whole_groups_of_four_is_named_in_a_warning(batch_size, low, caplog):
    """sym batches are groups of 4 images of one class: --batch-size 2 or 6 trained silently with batches of 4
    (as the reference's do, whose commands must keep running): the run now says so."""
    with caplog.at_level(logging.WARNING, logger="raml.engine.config"):
        TrainConfig(student="r", mode="sym", batch_size=batch_size).warn_about_rounding()
    assert f"--batch-size {batch_size} trains with batches of {low}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raml.engine.config"):
        TrainConfig(student="r", mode="sym", batch_size=12).warn_about_rounding()
        TrainConfig(student="r", teacher_path="t", batch_size=6).warn_about_rounding()  # distillers: any size
    assert not caplog.text


def test_unreadable_yaml_files_are_named_with_the_place_and_what_is_expected(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 1e-4\nepochs: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML at line 3, column 1: .*TrainConfig keys"):
        load_yaml_config(cfg)
    cfg.write_text("epochs: 1\n  lr: 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML at line 2, column 5"):
        load_yaml_config(cfg)
    binary = tmp_path / "weights.pth"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00\x81binary")
    with pytest.raises(ValueError, match=r"weights\.pth is not UTF-8 text .*expected a YAML file"):
        load_yaml_config(binary)
    with pytest.raises(ValueError, match=r"is a folder, expected a YAML file"):
        load_yaml_config(tmp_path)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"lr": float("nan")}, "--lr"),
        ({"lr": float("inf")}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"weight_decay": float("nan")}, "--weight-decay"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"momentum": -1.0}, "--momentum"),
        ({"momentum": float("nan")}, "--momentum"),
        ({"momentum": 1.5}, "--momentum"),
        ({"loss_margin": float("nan")}, "--loss-margin"),
        ({"loss_margin": -0.1}, "--loss-margin"),
        ({"lam_1": float("nan")}, "--lam-1"),
        ({"lam_2": float("-inf")}, "--lam-2"),
        ({"val_ratio": float("nan")}, "--val-ratio"),
        ({"aml_margin": float("inf")}, "--aml-margin"),
        ({"csd_temperature": float("nan")}, "--csd-temperature"),
        ({"rop_temperature": 0.0}, "--rop-temperature"),
        ({"rkd_angle_weight": float("inf")}, "--rkd-angle-weight"),
        ({"d3_alpha": float("nan")}, "--d3-alpha"),
        ({"rop_rank_weight": -1.0}, "--rop-rank-weight"),
        ({"workers": -1}, "--workers"),
        ({"pool_size": 0}, "--pool-size"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
        ({"whitening": -1}, "--whitening"),
        ({"whitening": 100_000_000_000}, "--whitening"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused_by_flag(changes, flag):
    with pytest.raises(ValueError, match=f"^{flag} must "):
        TrainConfig(student="r", teacher_path="t", **changes).validate()


def test_the_limits_accept_their_edges():
    TrainConfig(student="r", teacher_path="t", whitening=65536, workers=0, momentum=0.0, weight_decay=0.0).validate()
    TrainConfig(student="r", teacher_path="t", lam_1=0.0, lam_2=0.0, loss_margin=0.0, seed=0).validate()


def test_nan_from_the_command_line_and_yaml_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        _parse(["--student", "r", "--teacher-path", "t", "--lr", "nan"]).validate()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student: r\nteacher-path: t\nloss-margin: .nan\n")
    with pytest.raises(ValueError, match="--loss-margin must be a finite number"):
        _parse(["--config", str(cfg)]).validate()


def test_method_flags_the_mode_does_not_read_are_reported_once(caplog):
    """--mode ts_reg ignores --lam-1, --csd-k and --no-mixup: validate() warns naming each (once, though a run
    validates more than once); flags the mode reads, and defaults, give no warning."""
    base = {"student": "resnet18", "teacher": "resnet18"}
    ignored = TrainConfig(**base, mode="ts_reg", lam_1=0.71, csd_k=3, mixup=False, image_size=96)
    assert ignored.ignored_settings() == ["lam_1", "mixup", "csd_k"]
    with caplog.at_level(logging.WARNING, logger="raml.engine.config"):
        ignored.validate()
        ignored.validate()
        TrainConfig(**base, mode="ts_aug", lam_1=0.71, pos_num=3, mixup=False).validate()
        TrainConfig(**base, mode="csd", csd_k=3).validate()
        TrainConfig(**base).validate()
    warnings = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert warnings == [
        "--mode ts_reg does not use --lam-1 0.71, --no-mixup, --csd-k 3: they have no effect on this run "
        "(config.yaml records the value as given). Drop what is listed, or choose the mode it belongs to "
        "(docs/methods.md)."
    ]
    assert TrainConfig(student="resnet18", mode="sym", loss="normsoftmax", neg_num=2).ignored_settings() == ["neg_num"]


@pytest.mark.parametrize(
    ("line", "flag"),
    [("overwrite: true", "--overwrite"), ("json: run1.json", "--json"), ("resume-student: last", "--resume-student")],
)
def test_a_config_file_does_not_give_the_settings_of_one_invocation(tmp_path, line, flag):
    """Replaying a run's config.yaml into another --directory carried its --overwrite (replacing that folder's
    checkpoints), its --json (overwriting the first run's results) and its --resume-student: refused."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"student: r\nteacher-path: t\n{line}\n")
    with pytest.raises(ValueError, match=f"is a setting of one invocation.*give {flag} on the command line"):
        _parse(["--config", str(cfg)])
    cfg.write_text("student: r\nteacher-path: t\noverwrite: false\njson: null\nresume_student: null\n")
    assert _parse(["--config", str(cfg), "--overwrite", "--json", "x.json"]).overwrite is True  # the command line


def test_a_runs_config_yaml_replays_to_the_same_record(tmp_path):
    import yaml

    run = TrainConfig(student="r", teacher_path="t", lr=2e-3, overwrite=True, json="r.json", resume_student="last")
    record = run.record()
    assert (record["overwrite"], record["json"], record["resume_student"]) == (False, None, None)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(record, sort_keys=False))
    replay = _parse(["--config", str(cfg), "--directory", str(tmp_path / "run2")])
    assert (replay.overwrite, replay.json, replay.resume_student) == (False, None, None)
    assert replay.record() == {**record, "directory": str(tmp_path / "run2")}


def _laughs(levels: int) -> str:
    """A 'billion laughs' YAML value: each level an alias list of nine of the level below."""
    lists = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lists += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(lists)}, *a{levels - 1}]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"comment: {_laughs(5)}\n", "comment expects a value of type str, got a list of 6 items"),
        (f"test_datasets: {_laughs(5)}\n", "test_datasets expects a value of type list.*got a list of 6 items"),
        (f"image_sizes: {_laughs(5)}\n", "image_sizes expects a value of type list.*got a list of 6 items"),
        ("directory: {a: 1}\n", r"directory expects a value of type str, got a mapping of 1 key"),
        ("student: [resnet18, resnet50]\n", r"student expects a value of type str\|None, got a list of 2 items"),
        ("test_datasets: [[a, b]]\n", "test_datasets expects a value of type list"),
        ("image_sizes: [[24, 32]]\n", "image_sizes expects a value of type list"),
        ("image_sizes: {24: 32}\n", "image_sizes expects a value of type list"),
    ],
)
def test_text_settings_take_scalars_only(tmp_path, text, message):
    """A nested alias ('billion laughs', 438 bytes) turned into text exhausted the memory; a mapping or a list
    given for a text setting became a folder named "{'a': 1}"."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_yaml_config(cfg)


def test_oversized_and_deeply_nested_config_files_are_refused_as_such(tmp_path):
    from raml.engine.config import MAX_CONFIG_BYTES

    cfg = tmp_path / "c.yaml"
    cfg.write_text("comment: " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ValueError, match=rf"c\.yaml is {MAX_CONFIG_BYTES + 10} bytes, more than a configuration"):
        load_yaml_config(cfg)
    cfg.write_text("comment: " + "[" * 5000 + "]" * 5000 + "\n")  # a RecursionError traceback before
    with pytest.raises(ValueError, match=r"c\.yaml is not valid YAML for a configuration: it nests too deeply"):
        load_yaml_config(cfg)


@pytest.mark.parametrize(
    ("line", "name", "expected"),
    [
        ("seed: 1234567890123456789", "seed", 1234567890123456789),  # was ...768 (rounded through a float)
        ("seed: 9223372036854775807", "seed", 2**63 - 1),  # the largest --seed, refused from YAML before
        ("seed: '42'", "seed", 42),
        ("epochs: 1e3", "epochs", 1000),  # YAML 1.1 reads 1e3 as text
        ("epochs: 1.0e+2", "epochs", 100),
        ("lr: 1e-4", "lr", 1e-4),
        ("lr: 2", "lr", 2.0),
    ],
)
def test_yaml_numbers_are_read_exactly(tmp_path, line, name, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{line}\n")
    value = load_yaml_config(cfg)[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr: yes", "lr expects a value of type float, got True .YAML reads yes/no"),  # became 1.0
        ("lam-1: on", "lam_1 expects a value of type float, got True"),
        ("epochs: true", "epochs expects a value of type int, got True"),
        ("epochs: .inf", "epochs expects a value of type int, got inf .a whole number"),  # OverflowError before
        ("epochs: 1e400", "epochs expects a value of type int, got '1e400'"),  # OverflowError before
        ("epochs: .nan", "epochs expects a value of type int, got nan"),
        ("epochs: 2.5", "epochs expects a value of type int, got 2.5"),
        ("seed: 1e19", r"seed expects a value of type int, got '1e19' .* up to 2\*\*53"),  # not exact as a float
    ],
)
def test_yaml_values_that_are_not_the_settings_number_are_refused(tmp_path, line, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{line}\n")
    with pytest.raises(ValueError, match=message):
        load_yaml_config(cfg)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("optimizer: bogus", r"Unknown --optimizer 'bogus'; valid: sgd, adam, adamW\."),
        ("scheduler: bogus", r"Unknown --scheduler 'bogus'; valid: onecycle"),
        ("pool: bogus", r"Unknown --pool 'bogus'; valid: gem, gemmp, mac, spoc\."),
    ],
)
def test_choices_from_a_config_file_are_checked_up_front(tmp_path, line, message):
    """The parser checks these flags; from YAML they were refused only once the networks were built."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"student: r\nteacher-path: t\n{line}\n")
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(cfg)])
    key = line.split(":")[0]
    assert _parse(["--config", str(cfg), f"--{key}", {"optimizer": "sgd", "scheduler": "none", "pool": "GeM"}[key]])


def test_a_mining_pool_smaller_than_neg_num_is_refused_before_any_network_is_built(monkeypatch, tmp_path, cub_root):
    """--mode sym (triplet) with --pool-size < --neg-num was refused only after the mining pass had embedded the
    pool; now by the configuration, before the trainer builds or loads a network."""
    import raml.engine.trainer as trainer_module

    def no_network(*args, **kwargs):
        raise AssertionError("a network was built before the refusal")

    monkeypatch.setattr(trainer_module, "build_network", no_network)
    monkeypatch.setattr(trainer_module, "load_network", no_network)
    config = TrainConfig(
        student="test_resnet", mode="sym", pool_size=2, neg_num=4, directory=str(tmp_path / "run"),
        data_root=str(cub_root), training_dataset="cub", test_datasets=["cub-test"],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--pool-size 2 is smaller than --neg-num 4: --mode sym \(--loss triplet\)"):
        trainer_module.Trainer(config, torch.device("cpu"))
    assert not (tmp_path / "run").exists()
    TrainConfig(student="r", mode="sym", pool_size=4, neg_num=4).validate()  # the edge
    TrainConfig(student="r", mode="sym", loss="normsoftmax", pool_size=2, neg_num=4).validate()  # no mining


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: 3\nlr: 1e-4\nepochs: 5\n", r"line 3, column 1: duplicate key 'epochs' \(first at line 1\)"),  # 5 won
        ("epochs: 010\n", r"line 1, column 9: '010' is octal in YAML 1.1 \(read as 8, not as written\)"),  # 8 before
        ("seed: -007\n", r"line 1, column 7: '-007' is octal"),
        ("lr: 1:30\n", r"line 1, column 5: '1:30' is a base-60 number in YAML 1.1 \(read as 90, not as"),  # 90.0 before
        ("lr: 1:30.5\n", r"line 1, column 5: '1:30.5' is a base-60 number in YAML 1.1 \(read as 90.5, not"),
    ],
)
def test_yaml_keys_given_twice_and_numbers_read_otherwise_than_written_are_refused(tmp_path, text, message):
    """YAML 1.1 kept the last of two keys without a word, read a leading zero as octal and colons as base 60."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=rf"Config file {re.escape(str(cfg))} is not valid YAML at {message}"):
        load_yaml_config(cfg)


@pytest.mark.parametrize(
    ("line", "name", "expected"),
    [("epochs: 0", "epochs", 0), ("epochs: '010'", "epochs", 10), ("lr: 0.5", "lr", 0.5), ("lr: 010.5", "lr", 10.5)],
)
def test_zeros_and_quoted_numbers_are_read_as_written(tmp_path, line, name, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{line}\n")
    assert load_yaml_config(cfg)[name] == expected


def test_a_setting_is_named_as_the_command_line_gives_it():
    assert _given_flag("lam_1", 0.7) == "--lam-1 0.7"
    assert [_given_flag("mixup", v) for v in (True, False)] == ["--mixup", "--no-mixup"]
    assert [_given_flag("fused_views", v) for v in (True, False)] == ["--fused-views", "--no-fused-views"]
