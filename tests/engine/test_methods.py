"""Training methods as plug-ins: the registry, the other distillers, the ablation switches and ``raml bench methods``.

The existing modes' behaviour is pinned by the other engine tests (unchanged); here: every registered mode
resolves to a method, the new ones train, their batch loss is the :mod:`raml.losses` function on the views,
``--no-mixup`` and ``--uncoupled-views`` do what they say, and the benchmark writes its table for every row.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from raml.bench.methods import (
    BASELINE,
    ROWS,
    MethodsBenchSettings,
    _summarise,
    methods_table,
    run_directory,
    run_methods_benchmark,
)
from raml.bench.methods import main as bench_main
from raml.bench.parsers import methods_parser
from raml.cli.main import build_parser, main
from raml.cli.train import config_from_args
from raml.data.splits import get_split
from raml.data.synth import generate_synthetic_dataset
from raml.data.views import CoupledViewDataset
from raml.demo import DATASET, DemoSettings
from raml.engine.config import LOSSES, TrainConfig
from raml.engine.methods import METHODS, method_class, register_method
from raml.engine.methods.base import TEACHER_USES, BatchLoss, Method
from raml.engine.trainer import NonFiniteLossError, Trainer
from raml.losses import absolute_loss, aml_contrastive_loss, csd_loss, d3_loss, rkd_loss, rop_loss
from raml.models import build_network, load_checkpoint_file, load_network, save_checkpoint
from raml.retrieval.evaluate import evaluate_split

CPU = torch.device("cpu")
DR, QR = 32, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_dataset(root / "cub", num_classes=4, images_per_class=4, image_size=DR, seed=1)
    torch.manual_seed(0)
    teacher = root / "teacher.pth"
    save_checkpoint(teacher, build_network("test_resnet", whitening=16, pretrained=False))
    return root, teacher


def _config(setup: tuple[Path, Path], directory: Path, **changes) -> TrainConfig:
    data_root, teacher = setup
    values = dict(
        mode="ts_aug", student_path=str(teacher), teacher_path=str(teacher), training_dataset="cub",
        test_datasets=[], data_root=str(data_root), directory=str(directory), image_size=QR, teacher_image_size=DR,
        pos_num=2, batch_size=4, update_every=1, query_size=8, epochs=1, workers=0, val=False, seed=3,
        scheduler="none", lr=1e-3,
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def _first_batch(trainer: Trainer):
    generator = torch.Generator().manual_seed(0)
    return next(trainer._epoch_batches(1, generator)), generator


# ------------------------------------------------------------------------------------------- registry
def test_every_mode_resolves_to_a_method_that_says_what_it_needs():
    assert list(METHODS)[:3] == ["ts_aug", "ts_reg", "sym"]
    for name in METHODS:
        for loss in LOSSES:
            cls = method_class(name, loss)
            assert issubclass(cls, Method) and cls.teacher in TEACHER_USES
            assert (cls.teacher == "none") == (name == "sym")
            assert cls.labels == (name in ("sym", "ugd"))  # ugd: a distiller that reads the labels
    assert method_class("sym", "triplet") is not method_class("sym", "normsoftmax")
    assert method_class("ts_reg", "triplet").teacher == "cached"


def test_an_unknown_mode_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="valid: ts_aug, ts_reg, sym, aml, rkd, csd, d3, rop"):
        method_class("kd", "triplet")
    with pytest.raises(ValueError, match="Unknown --mode 'kd'"):
        _config((Path("data"), Path("t.pth")), Path("x"), mode="kd").validate()


def test_overwrite_removes_every_output_of_the_previous_run_and_nothing_else(setup, tmp_path):
    """--overwrite removed the previous run's checkpoints only: its skipped_images_<split>.txt and TensorBoard event
    files stayed beside the new run's outputs, read as the new run's (a split without bad images now)."""
    data = tmp_path / "data"
    generate_synthetic_dataset(data / "cub", num_classes=4, images_per_class=4, image_size=DR, seed=1)
    victim = sorted((data / "cub" / "images").rglob("*.jpg"))[0]
    intact = victim.read_bytes()
    victim.write_bytes(intact[:200])  # truncated: --bad-images skip leaves it out and reports it
    run = tmp_path / "run"
    first = _config((data, setup[1]), run, bad_images="skip", logger="tensorboard")
    Trainer(first, CPU, progress=False).run()
    assert victim.name in (run / "skipped_images_cub-trainval.txt").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    (run / "notes.txt").write_text("mine")
    (run / "tensorboard" / "notes.txt").write_text("mine too")
    (run / "skipped_images_cub-trainval.txt.orig").write_text("a name the run never writes")
    victim.write_bytes(intact)
    Trainer(first.replace(logger="none", overwrite=True), CPU, progress=False).run()
    assert sorted(p.name for p in run.iterdir()) == [
        "config.yaml", "model_best.pth.tar", "model_epoch1.pth.tar", "model_last.pth.tar", "notes.txt",
        "skipped_images_cub-trainval.txt.orig", "tensorboard",
    ]  # fmt: skip
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "mine"


def test_a_non_finite_loss_names_the_method_settings_given_away_from_their_defaults(setup, tmp_path):
    """--csd-temperature 1e-40 divides the similarities into infinities: the advice named --lr alone."""
    config = _config(setup, tmp_path / "csd", mode="csd", csd_temperature=1e-40)
    advice = (
        r"Lower --lr, or bring the --mode csd settings given away from their defaults \(--pos-num 2, "
        r"--csd-temperature 1e-40\) back towards them, or check the data\."
    )
    with pytest.raises(NonFiniteLossError, match=advice):
        Trainer(config, CPU, progress=False).run()
    assert _config(setup, tmp_path, mode="csd", pos_num=8).changed_method_settings() == []


def test_a_plug_in_without_reads_is_named_in_a_warning_and_its_reads_are_checked(monkeypatch, caplog):
    """A plug-in that declares no Method.reads was never checked for settings without effect, without a word;
    every method setting away from its default may be one it reads (the non-finite advice names them all)."""
    from raml.engine.methods.rkd import RelationalDistillation

    monkeypatch.setattr(RelationalDistillation, "reads", None)
    monkeypatch.setitem(METHODS, "undeclared_kd", METHODS["rkd"])
    config = _config((Path("data"), Path("t.pth")), Path("x"), mode="undeclared_kd", csd_temperature=0.5, pos_num=8)
    with caplog.at_level("WARNING", logger="raml"):
        config.validate()
        config.validate()  # once per mode and process
    warned = [r.getMessage() for r in caplog.records if "declares no Method.reads" in r.getMessage()]
    assert warned == [
        "--mode undeclared_kd: raml.engine.methods.rkd.RelationalDistillation declares no Method.reads, so a method "
        "setting it does not read cannot be reported as having no effect. Set reads on the class (a frozenset of "
        "raml.engine.config.METHOD_SETTINGS names; frozenset() for none)."
    ]
    assert config.ignored_settings() == [] and config.changed_method_settings() == ["--csd-temperature 0.5"]
    monkeypatch.setattr(RelationalDistillation, "reads", frozenset({"rkd_distance_weight", "rkd_angel_weight"}))
    with pytest.raises(ValueError, match=r"RelationalDistillation.reads names rkd_angel_weight, which is not a method"):
        config.validate()
    monkeypatch.setattr(RelationalDistillation, "reads", "rkd_angle_weight")
    with pytest.raises(ValueError, match=r"reads must be a frozenset of method setting names.*got 'rkd_angle_weight'"):
        config.validate()


def test_a_method_registered_after_import_is_a_valid_mode_and_a_taken_name_is_refused():
    """register_method adds a plug-in that the configuration and the CLI accept (they read the registry when
    used, not a copy made at import); a registered name, a built-in above all, is never replaced."""
    target = "raml.engine.methods.ts_aug:CoupledViewDistillation"
    before = dict(METHODS)
    try:
        register_method("my_kd", "my own distillation", target)
        _config((Path("data"), Path("t.pth")), Path("x"), mode="my_kd").validate()
        assert method_class("my_kd", "triplet").__name__ == "CoupledViewDistillation"
        args = build_parser().parse_args(["train", "--student", "resnet18", "--teacher", "resnet18", "-m", "my_kd"])
        assert config_from_args(args).mode == "my_kd"
        for name in ("ts_aug", "my_kd"):
            with pytest.raises(ValueError, match=f"--mode '{name}' is already registered"):
                register_method(name, "a replacement", "elsewhere:Other")
        with pytest.raises(ValueError, match="'module:Class'"):
            register_method("other", "no class", "raml.engine.methods.ts_aug")
        # entries that could never run, or would break raml train --help, are refused when registered
        for summary, bad_target, message in (
            ("x", {"arcface": target}, "--loss values triplet, normsoftmax as keys"),  # no such --loss
            ("x", {}, "as keys, got none"),
            (None, target, "non-empty string"),  # method_help() crashed on it
            ("x", "not a module:Not:AClass", "'module:Class'"),
            ("x", "my pkg:KD", "'module:Class'"),
        ):
            with pytest.raises(ValueError, match=message):
                register_method("other", summary, bad_target)
        mapping = {"triplet": target}
        register_method("my_mapped", "per loss", mapping)
        mapping["triplet"] = "elsewhere:Other"  # the caller's dict, changed after the check, is not the entry
        assert METHODS["my_mapped"].target == {"triplet": target}
        assert METHODS["ts_aug"] == before["ts_aug"] and "other" not in METHODS
    finally:
        METHODS.pop("my_kd", None)
        METHODS.pop("my_mapped", None)
    assert before == METHODS


def test_train_help_lists_every_method_with_one_entry():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        main(["train", "--help"])
    text = printed.getvalue()
    for name, entry in METHODS.items():
        assert f"\n  {name:<8}{entry.summary.split()[0]}" in text
    assert "--no-mixup" in text and "--uncoupled-views" in text


def test_flags_reach_the_config():
    args = build_parser().parse_args(
        ["train", "--student", "resnet18", "--teacher", "resnet18", "--mode", "d3", "--no-mixup",
         "--uncoupled-views", "--d3-k", "5", "--csd-temperature", "0.2", "--aml-variant", "regression",
         "--rop-k", "7", "--rop-temperature", "0.3", "--rop-rank-weight", "0.5"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.mode, config.mixup, config.uncoupled_views) == ("d3", False, True)
    assert (config.d3_k, config.csd_temperature, config.aml_variant) == (5, 0.2, "regression")
    assert (config.rop_k, config.rop_temperature, config.rop_rank_weight) == (7, 0.3, 0.5)
    default = config_from_args(build_parser().parse_args(["train", "--student", "resnet18", "--teacher", "resnet18"]))
    assert default.mixup is True and default.uncoupled_views is False


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("csd_k", 0, "--csd-k"),
        ("d3_k", 1, "--d3-k"),
        ("aml_variant", "hinge", "--aml-variant"),
        ("aml_margin", 0.0, "--aml-margin"),
        ("csd_temperature", -1.0, "--csd-temperature"),
        ("rkd_angle_weight", -1.0, "--rkd-angle-weight"),
        ("rop_k", 0, "--rop-k"),
        ("rop_temperature", 0.0, "--rop-temperature"),
        ("rop_rank_weight", -0.5, "--rop-rank-weight"),
    ],
)
def test_bad_method_settings_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        _config((Path("data"), Path("t.pth")), Path("x"), **{field: value}).validate()


# ----------------------------------------------------------------------------------- the new methods
@pytest.mark.parametrize("mode", ["aml", "rkd", "csd", "d3", "rop"])
def test_each_new_method_gives_a_finite_loss_whose_gradient_reaches_the_student(setup, tmp_path, mode):
    trainer = Trainer(_config(setup, tmp_path / mode, mode=mode), CPU, progress=False)
    batch, generator = _first_batch(trainer)
    result = trainer._batch_loss(batch, generator)
    assert torch.isfinite(result.loss) and result.loss.item() > 0 and result.images == 4
    result.loss.backward()
    grads = [p.grad for p in trainer.student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in trainer.teacher.parameters())


#: every relational mode with each of its parameters away from its default (the mutants of issue 24: a mode
#: computing another mode's loss, ignoring a parameter or the groups, or running with other values)
CONFIGURED: dict[str, dict[str, object]] = {
    "aml": {"aml_margin": 1.3},
    "rkd": {"rkd_distance_weight": 0.5, "rkd_angle_weight": 3.0},
    "csd": {"csd_k": 5, "csd_temperature": 0.3, "csd_first_order_weight": 2.0},
    "d3": {"d3_k": 5, "d3_alpha": 7.0, "d3_beta": 3.0, "d3_gamma": 0.5},
    "rop": {"rop_k": 5, "rop_temperature": 0.2, "rop_rank_weight": 0.7},
}


def _expected_loss(mode: str, values: dict, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The loss function of ``mode`` called by hand on the ``(B, P, D)`` views, flattened, times the B images; the
    groups are the images (each image's P views in a row)."""
    b, p = student.shape[:2]
    s, t = student.flatten(0, 1), teacher.flatten(0, 1)
    groups = torch.arange(b).repeat_interleave(p)
    v = values
    if mode == "aml":
        loss = aml_contrastive_loss(s, t, v["aml_margin"], groups)
    elif mode == "rkd":
        loss = rkd_loss(s, t, v["rkd_distance_weight"], v["rkd_angle_weight"], groups)["total"]
    elif mode == "csd":
        loss = csd_loss(s, t, v["csd_k"], v["csd_temperature"], v["csd_first_order_weight"], groups)["total"]
    elif mode == "d3":
        loss = d3_loss(s, t, v["d3_k"], v["d3_alpha"], v["d3_beta"], v["d3_gamma"], groups)["total"]
    else:
        loss = rop_loss(s, t, v["rop_k"], v["rop_temperature"], v["rop_rank_weight"], groups)
    return loss * b


@pytest.mark.parametrize("mode", list(CONFIGURED))
def test_each_mode_s_batch_loss_is_its_loss_function_with_the_configured_parameters(setup, tmp_path, mode):
    trainer = Trainer(_config(setup, tmp_path / mode, mode=mode, pos_num=3, **CONFIGURED[mode]), CPU, progress=False)
    batch, generator = _first_batch(trainer)
    with torch.no_grad():
        student, teacher = trainer.method.view_embeddings(batch, generator)
        got = trainer._batch_loss(batch, generator)
    expected = _expected_loss(mode, CONFIGURED[mode], student, teacher)
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5) and got.images == 4


@pytest.mark.parametrize(
    ("mode", "field", "value"),
    [(mode, field, value) for mode, values in CONFIGURED.items() for field, value in values.items()]
    + [("aml", "aml_variant", "regression")],
)
def test_changing_each_parameter_changes_the_loss(setup, tmp_path, mode, field, value):
    trainer = Trainer(_config(setup, tmp_path / mode, mode=mode, pos_num=3), CPU, progress=False)
    batch, generator = _first_batch(trainer)
    with torch.no_grad():
        default = trainer._batch_loss(batch, generator).loss.item()
        trainer.config = trainer.config.replace(**{field: value})
        changed = trainer._batch_loss(batch, generator).loss.item()
    assert changed != pytest.approx(default, rel=1e-4), (field, value)
    if field == "aml_variant":
        student, teacher = trainer.method.view_embeddings(batch, generator)
        regression = absolute_loss(student.flatten(0, 1), teacher.flatten(0, 1)) / student.shape[1]
        assert changed == pytest.approx(regression.item(), rel=1e-5)


@pytest.mark.parametrize("mode", list(CONFIGURED))
def test_a_trained_mode_changes_the_student_s_weights(setup, tmp_path, mode):
    trainer = Trainer(_config(setup, tmp_path / mode, mode=mode), CPU, progress=False)
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    trainer.run()
    moved = [name for name, p in trainer.student.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(moved) > len(before) // 2, moved


def test_with_mixup_the_method_sees_the_mixed_views_not_the_raw_ones(setup, tmp_path):
    """The default mixup (dataset partner): the student's and the teacher's inputs are lam * view + (1 - lam) *
    partner, written here by hand from the batch's items, normalised by each network's mean and std."""
    trainer = Trainer(_config(setup, tmp_path / "mix", mode="csd"), CPU, progress=False)
    assert trainer.config.mixup and trainer.config.mixup_partner == "dataset"
    batch, generator = _first_batch(trainer)
    student_views, teacher_views, partner_student, partner_teacher, lam, _ = batch
    w = lam.double()[:, :, None, None, None]
    mixed_student = (w * student_views.double() + (1 - w) * partner_student.double()) / 255
    mixed_teacher = (w * teacher_views.double() + (1 - w) * partner_teacher.double()) / 255
    assert (lam < 1).any()
    seen = {}

    def keep(name):
        def hook(module, inputs):
            seen[name] = inputs[0].detach().clone()

        return hook

    handles = [trainer.model.register_forward_pre_hook(keep("student")),
               trainer.teacher.register_forward_pre_hook(keep("teacher"))]  # fmt: skip
    try:
        with torch.no_grad():
            trainer._batch_loss(batch, generator)
    finally:
        for handle in handles:
            handle.remove()

    def normalised(views, network):
        mean = torch.tensor(network.meta["mean"], dtype=torch.float64)[:, None, None]
        std = torch.tensor(network.meta["std"], dtype=torch.float64)[:, None, None]
        return (views.flatten(0, 1) - mean) / std

    for name, mixed, raw, network in (
        ("student", mixed_student, student_views, trainer.student),
        ("teacher", mixed_teacher, teacher_views, trainer.teacher),
    ):
        got = seen[name].double()
        assert torch.allclose(got, normalised(mixed, network), atol=1e-4), name
        assert (got - normalised(raw.double() / 255, network)).abs().max() > 0.1, name


def test_a_new_method_trains_and_saves_its_mode(setup, tmp_path):
    result = Trainer(_config(setup, tmp_path / "d3", mode="d3", d3_k=3), CPU, progress=False).run()
    assert set(result.history[-1]) >= {"loss", "first_order", "hard", "easy"}
    assert load_checkpoint_file(result.best_checkpoint)["raml"]["mode"] == "d3"


@pytest.mark.parametrize(("mode", "pos_num"), [("d3", 2), ("rkd", 2), ("rkd", 1), ("ugd", 1), ("csd", 1)])
def test_an_epoch_ending_in_a_one_image_batch_trains_to_a_checkpoint(setup, tmp_path, caplog, mode, pos_num):
    """5 images, batches of 4: the last batch holds one image, too few for the relations (or, for ugd at one view,
    the projectors' BatchNorm1d). It contributes a zero loss with a warning instead of stopping the run."""
    config = _config(setup, tmp_path / mode, mode=mode, pos_num=pos_num, query_size=5)
    trainer = Trainer(config, CPU, progress=False)
    assert trainer.batches_per_epoch == 2
    with caplog.at_level("WARNING"):
        result = trainer.run()
    assert load_checkpoint_file(result.best_checkpoint)["raml"]["mode"] == mode
    assert all(torch.isfinite(torch.tensor(value)) for value in result.history[-1].values() if isinstance(value, float))
    assert sum("A batch of 1 image(s)" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize(
    ("variant", "match"),
    [
        ("vector", r"a loss of shape \(4,\) .*\.sum\(\)"),
        ("float", "a loss of type float"),
        ("detached", "does not require grad"),
        ("integer", "dtype torch.int64"),
        ("not a BatchLoss", "returned a tuple"),
    ],
)
def test_a_loss_outside_the_batch_loss_contract_is_a_type_error_naming_the_method(setup, tmp_path, variant, match):
    """A plug-in's batch_loss that breaks the BatchLoss contract fails at once with a TypeError naming its class
    and the contract, not deep in torch ('expand', 'float' has no attribute 'detach', 'does not require grad')."""
    trainer = Trainer(_config(setup, tmp_path / "run"), CPU, progress=False)
    batch, generator = _first_batch(trainer)
    real = trainer.method.batch_loss

    def broken(batch, generator):
        result = real(batch, generator)
        loss = {
            "vector": result.loss * torch.ones(4),
            "float": float(result.loss.detach()),
            "detached": result.loss.detach(),
            "integer": torch.tensor(1),
        }.get(variant)
        return (result.loss, 4) if variant == "not a BatchLoss" else BatchLoss(loss, {}, 4)

    trainer.method.batch_loss = broken
    with pytest.raises(TypeError, match=match) as refused:
        trainer._batch_loss(batch, generator)
    assert "CoupledViewDistillation.batch_loss" in str(refused.value) and "0-d floating-point" in str(refused.value)
    trainer.method.batch_loss = real
    assert trainer._batch_loss(batch, generator).loss.requires_grad  # the built-in one keeps the contract


# -------------------------------------------------------------------------------------------- ablations
@pytest.mark.parametrize("partner", ["dataset", "batch"])
def test_no_mixup_feeds_the_views_as_rendered(setup, tmp_path, partner):
    config = _config(setup, tmp_path / "plain", mixup=False, mixup_partner=partner)
    trainer = Trainer(config, CPU, progress=False)
    batch, generator = _first_batch(trainer)
    assert len(batch) == 3  # no partner views loaded
    student_views, teacher_views = trainer.method._views(batch, generator)
    assert torch.equal(student_views, batch[0].float() / 255) and torch.equal(teacher_views, batch[1].float() / 255)


@pytest.mark.parametrize("partners", [False, True])
def test_uncoupled_views_keep_the_student_views_and_redraw_the_teacher_views(setup, partners):
    data_root, _ = setup
    paths = sorted((data_root / "cub" / "images").rglob("*.jpg"))[:6]
    coupled = CoupledViewDataset(paths, QR, DR, 3, seed=5, partners=partners)
    uncoupled = CoupledViewDataset(paths, QR, DR, 3, seed=5, partners=partners, coupled=False)
    for index in range(len(paths)):
        a, b = coupled[index], uncoupled[index]
        assert torch.equal(a[0], b[0])  # the student's views and every other draw are unchanged
        assert not torch.equal(a[1], b[1])  # the teacher's views are drawn anew
        if partners:
            assert torch.equal(a[2], b[2]) and torch.equal(a[4], b[4])
        # the teacher view is no longer the student view at DR: downsized, it differs from the student view
        small = torch.nn.functional.interpolate(b[1].float(), size=QR, mode="bilinear", antialias=True)
        assert (small - b[0].float()).abs().mean() > 5
    with pytest.raises(TypeError, match="coupled"):
        CoupledViewDataset(paths, QR, DR, 3, seed=5, coupled="no")


# ----------------------------------------------------------------------------------------- the benchmark
def test_bench_methods_writes_every_row_and_reuses_its_teacher(tmp_path):
    out = tmp_path / "bench"
    demo = DemoSettings(num_classes=4, images_per_class=4, image_size=DR, teacher_size=DR, student_size=QR,
                        architecture="test_resnet", whitening=16, teacher_epochs=1, pos_num=2, threads=1)  # fmt: skip
    rows = run_methods_benchmark(MethodsBenchSettings(out=out, seeds=1, epochs=1, demo=demo), CPU, progress=False)
    assert [row["method"] for row in rows] == [BASELINE, *ROWS]
    for row in rows:
        for key in ("method", "asym_mAP", "asym_R@1", "sym_mAP", "train_seconds"):
            assert key in row
        assert 0 <= row["asym_mAP"] <= 100 and row["seeds"] == 1 and row["asym_mAP_std"] == 0.0
    assert rows[0]["train_seconds"] == 0.0 and all(row["train_seconds"] > 0 for row in rows[1:])
    table = (out / "methods.md").read_text()
    assert all(f"| {name} |" in table for name in [BASELINE, *ROWS])
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each row trained what it says: its saved config holds the row's settings and the shared budget
    shared = None
    for name in ROWS:
        saved = yaml.safe_load((run_directory(out, name, demo.seed) / "config.yaml").read_text())
        assert {key: saved[key] for key in ROWS[name]} == ROWS[name], name
        assert saved["mixup"] == ROWS[name].get("mixup", True) and saved["uncoupled_views"] == ROWS[name].get(
            "uncoupled_views", False
        )
        budget = {key: saved[key] for key in ("epochs", "lr", "batch_size", "image_size", "seed")}
        assert shared is None or budget == shared, name
        shared = budget
        # --pos-num too, where the row's method reads it (ts_reg embeds one view of each image)
        assert saved["pos_num"] == (2 if "pos_num" in method_class(saved["mode"], saved["loss"]).reads else 8), name
    assert shared == {"epochs": 1, "lr": demo.student_lr, "batch_size": 8, "image_size": QR, "seed": 0}

    # each row's numbers are those of its saved student, tested again here (the baseline: the teacher's)
    teacher = load_network(out / "teacher" / "model_best.pth.tar", device=CPU)
    split = get_split(f"{DATASET}-test", out / "data")
    for row in rows:
        if row["method"] == BASELINE:
            network = teacher
        else:
            network = load_network(run_directory(out, row["method"], demo.seed) / "model_best.pth.tar", device=CPU)
        again = evaluate_split(network, split, QR, CPU, teacher=teacher, teacher_image_size=DR, sym=True, ks=(1,),
                               progress=False)  # fmt: skip
        assert row["asym_mAP"] == round(again["asym"]["mAP"], 2), row["method"]
        assert row["asym_R@1"] == round(again["asym"]["R@1"], 2), row["method"]
        assert row["sym_mAP"] == round(again["sym"]["mAP"], 2), row["method"]

    teacher_path = out / "teacher" / "model_best.pth.tar"
    stamp = teacher_path.stat().st_mtime_ns
    again = run_methods_benchmark(
        MethodsBenchSettings(out=out, seeds=1, epochs=1, demo=demo, rows=("ts_reg",)), CPU, progress=False
    )
    assert teacher_path.stat().st_mtime_ns == stamp  # the cached teacher, not a new one
    assert again[0] == rows[0]  # the baseline: the same teacher, the same numbers
    assert [row["method"] for row in again] == [BASELINE, "ts_reg"]


def test_several_seeds_give_mean_and_sample_std():
    runs = [
        {"asym_mAP": a, "asym_R@1": 10.0, "sym_mAP": 5.0, "train_seconds": 2.0, "seed": s}
        for s, a in enumerate([1, 2, 6])
    ]
    row = _summarise("ts_aug", runs)
    assert row["asym_mAP"] == 3.0 and row["asym_mAP_std"] == pytest.approx(2.65, abs=0.005)  # sqrt(7)
    assert row["asym_R@1_std"] == 0.0 and row["seeds"] == 3 and row["runs"] == runs
    assert "| ts_aug | 3.00 ± 2.65 | 10.00 ± 0.00 | 5.00 ± 0.00 | 2.00 ± 0.00 |" in methods_table([row])


def test_bench_methods_refuses_bad_arguments_before_writing(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("keep")
    with pytest.raises(SystemExit, match="is a file"):
        bench_main(["--out", str(a_file), "--quick"])
    with pytest.raises(SystemExit, match="Unknown method rows"):
        bench_main(["--out", str(tmp_path / "new"), "--methods", "ts_aug,kd"])
    assert a_file.read_text() == "keep" and not (tmp_path / "new").exists()


def test_bench_methods_gives_the_demos_lambdas_only_to_rows_that_read_them(tmp_path):
    """Every row shares the demo's budget; the lambdas and --pos-num only where the row's method reads them, so no row
    warns about a --lam-1 it never asked for (and its config.yaml does not record one)."""
    from raml.bench.methods import ROWS, MethodsBenchSettings, _student_config

    settings = MethodsBenchSettings(out=tmp_path)
    for name, values in ROWS.items():
        config = _student_config(settings, tmp_path, tmp_path / "t.pth", tmp_path / "run", 0, **values)
        assert config.ignored_settings() == [], name
        reads_lambdas = name.startswith("ts_aug")
        assert (config.lam_1, config.lam_2) == (
            (settings.demo.lam_1, settings.demo.lam_2) if reads_lambdas else (TrainConfig.lam_1, TrainConfig.lam_2)
        ), name


# ------------------------------------------------------------------------------------------- the documents
REPO = Path(__file__).resolve().parents[2]


def test_the_readme_lists_every_method_and_links_the_comparison():
    readme = (REPO / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in METHODS) and "docs/methods.md" in readme


def test_docs_methods_shows_the_recorded_run_of_every_row_and_names_only_existing_flags():
    text = (REPO / "docs" / "methods.md").read_text()
    # the table is the recorded run's, kept beside the page as methods.json (the benchmark's own output)
    recorded = json.loads((REPO / "docs" / "methods.json").read_text())
    assert [row["method"] for row in recorded] == [BASELINE, *ROWS]
    assert methods_table(recorded) in text
    for row in recorded[1:]:
        assert len(row["runs"]) == row["seeds"] >= 3
        assert row["asym_mAP"] == round(sum(run["asym_mAP"] for run in row["runs"]) / row["seeds"], 2)
    parsers = build_parser()._subparsers._group_actions[0].choices
    known = set(parsers["train"]._option_string_actions)
    known |= set(methods_parser()._option_string_actions)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", text))
    assert named and not named - known, sorted(named - known)


#: every registered mode (sym with each of its losses) and what its run needs besides _config's settings
EVERY_METHOD = [
    pytest.param(mode, loss, id=f"{mode}-{loss}" if isinstance(METHODS[mode].target, dict) else mode)
    for mode in METHODS
    for loss in (METHODS[mode].target if isinstance(METHODS[mode].target, dict) else ["triplet"])
]


@pytest.mark.parametrize(("mode", "loss"), EVERY_METHOD)
def test_every_method_logs_its_terms_as_detached_tensors(setup, tmp_path, mode, loss):
    """BatchLoss's contract: the logged terms stay 0-d tensors on the device (a float, ``loss.item()``, would make
    the host wait for the device between every batch's forward and backward passes)."""
    changes: dict[str, object] = {"mode": mode, "loss": loss}
    if method_class(mode, loss).teacher == "none":
        changes["teacher_path"] = None
    trainer = Trainer(_config(setup, tmp_path / "run", **changes), CPU, progress=False)
    batch, generator = _first_batch(trainer)
    result = trainer._batch_loss(batch, generator)
    assert result.terms, mode
    for name, value in result.terms.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, (mode, name, value)
