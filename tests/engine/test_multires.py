"""One student for several query sizes: the size list, the per-batch draw, the views at a per-batch size, the
configuration, the training run (sizes drawn per batch, stored in the checkpoint, resumable) and the
benchmark's outputs. Mechanics only, not accuracy."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raml.cli.main import build_parser
from raml.cli.train import config_from_args
from raml.data.images import EvalTransform, load_image
from raml.data.sizes import SizedImages, draw_batch_sizes, parse_image_sizes
from raml.data.views import CoupledViewDataset
from raml.engine.config import TrainConfig, load_yaml_config
from raml.engine.trainer import Trainer, TrainingInterrupted

# ------------------------------------------------------------------------------------------- size lists


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parse_image_sizes_accepts_strings_ints_and_lists():
    assert parse_image_sizes("24,32,48") == [24, 32, 48]
    assert parse_image_sizes(" 48, 24 ") == [48, 24]  # the order is kept: the first is the default
    assert parse_image_sizes(32) == [32]
    assert parse_image_sizes([24, np.int64(32)]) == [24, 32]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "comma-separated"),
        ("24,,32", "comma-separated"),
        ("24,x", "comma-separated"),
        ("24,0", "positive"),
        ([], "empty"),
        ("24,32,24", "distinct"),
        ([24, 32.5], "integers"),
        ([True], "integers"),
    ],
)
def test_bad_size_lists_get_clear_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_image_sizes(value)


def test_a_single_size_draws_nothing_from_any_generator():
    state = torch.random.get_rng_state()
    assert draw_batch_sizes([32], 7, seed=1, epoch=1) == [32] * 7
    assert torch.equal(torch.random.get_rng_state(), state)


def test_size_draws_are_balanced_deterministic_and_leave_the_global_generator_alone():
    state = torch.random.get_rng_state()
    draws = draw_batch_sizes([24, 32, 48], 31, seed=5, epoch=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    counts = Counter(draws)
    assert set(counts) == {24, 32, 48} and max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == 31
    assert draws == draw_batch_sizes([24, 32, 48], 31, seed=5, epoch=2)  # a resumed run draws the same
    assert draws != draw_batch_sizes([24, 32, 48], 31, seed=5, epoch=3)
    assert draws != draw_batch_sizes([24, 32, 48], 31, seed=6, epoch=2)
    # balanced exactly when the batches divide evenly
    assert Counter(draw_batch_sizes([24, 32], 10, seed=0, epoch=1)) == {24: 5, 32: 5}


def test_which_sizes_get_the_extra_batches_is_drawn_per_epoch():
    """31 batches, 3 sizes: one size gets 11 batches, the others 10. Which one is drawn (no size favoured over
    epochs): over 30 epochs every size is the one with 11 at least once (a fixed choice would always pick 24)."""
    extra = set()
    for epoch in range(1, 31):
        counts = Counter(draw_batch_sizes([24, 32, 48], 31, seed=5, epoch=epoch))
        assert sorted(counts.values()) == [10, 10, 11]
        extra |= {s for s, n in counts.items() if n == 11}
    assert extra == {24, 32, 48}


# ------------------------------------------------------------------------------------------------ views
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("multires_images")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(4):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (50 + 3 * i, 60, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("partners", [False, True])
def test_views_at_a_per_item_size_share_the_draws_and_the_teacher_views(images, partners):
    dataset = CoupledViewDataset(images, 32, 64, pos_num=2, seed=3, partners=partners)
    dataset.set_epoch(1)
    plain = dataset[1]
    same = dataset[(1, 32)]
    small = dataset[(1, 24)]
    for a, b in zip(plain, same, strict=True):  # (i, default size) is item i, bit for bit
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert tuple(small[0].shape) == (2, 3, 24, 24)
    assert torch.equal(small[1], plain[1])  # the teacher's views (DR) do not depend on the student size
    # the student views are the teacher views resized, so their mean colour matches the default size's
    assert torch.allclose(small[0].float().mean(dim=(2, 3)), plain[0].float().mean(dim=(2, 3)), atol=3.0)
    with pytest.raises(ValueError, match="must not exceed"):
        dataset[(1, 80)]


def test_sized_images_render_each_item_at_its_size(images):
    dataset = SizedImages(images, [0.5] * 3, [0.25] * 3)
    image, index = dataset[(2, 24)]
    assert tuple(image.shape) == (3, 24, 24) and index == 2
    assert tuple(dataset[(2, 40)][0].shape) == (3, 40, 40)


@pytest.mark.parametrize("size", [24, 40])
def test_sized_images_item_is_the_eval_transform_of_its_own_image(images, size):
    """Item ``(i, S)`` is exactly ``EvalTransform(S, mean, std)(load_image(paths[i]))``: the pixels of image i,
    not another image's, not a blank, with this normalisation (a zeros-returning dataset failed here)."""
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]
    dataset = SizedImages(images, mean, std)
    expected = [EvalTransform(size, mean, std)(load_image(path)) for path in images]
    for index in (3, 0, 2, 1):  # out of order: the item follows its index, not the call order
        image, returned = dataset[(index, size)]
        assert returned == index and image.dtype == torch.float32
        assert torch.equal(image, expected[index])
    # the images are random noise, so each differs from the others and from a blank
    assert all(not torch.allclose(expected[i], expected[j]) for i in range(4) for j in range(i))
    assert all(float(e.abs().sum()) > 0 for e in expected)


# ------------------------------------------------------------------------------------------------ config
def _train_args(*argv: str):
    return build_parser().parse_args(["train", "--student", "resnet18", "--teacher-path", "t.pth", *argv])


def test_cli_image_size_list_sets_the_default_and_the_list():
    config = config_from_args(_train_args("--image-size", "24,32,48", "--teacher-image-size", "64"))
    assert config.image_size == 24 and config.image_sizes == [24, 32, 48]
    assert config.student_sizes() == [24, 32, 48]
    single = config_from_args(_train_args("--image-size", "32", "--teacher-image-size", "64"))
    assert single.image_size == 32 and single.image_sizes is None and single.student_sizes() == [32]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "sym", "--image-size", "24,32"], "distillation mode"),
        (["--image-size", "24,96", "--teacher-image-size", "64"], "exceed --teacher-image-size"),
    ],
)
def test_bad_size_configurations_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(_train_args(*argv))


def test_the_cli_reports_a_bad_list_and_refuses_sym(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--image-size", "24,x"])
    assert "comma-separated integers" in capsys.readouterr().err
    args = build_parser().parse_args(["train", "--student", "resnet18", "--mode", "sym", "--image-size", "24,32"])
    with pytest.raises(SystemExit, match="--mode sym trains at one size"):
        args.func(args)


def test_mismatched_default_size_is_refused():
    config = TrainConfig(
        student="resnet18", teacher_path="t", image_size=32, image_sizes=[24, 32], teacher_image_size=64
    )
    with pytest.raises(ValueError, match="must be the first of image_sizes"):
        config.validate()


def test_sizes_round_trip_through_yaml(tmp_path):
    config = TrainConfig(
        student="resnet18", teacher_path="t", image_size=24, image_sizes=[24, 32, 48], teacher_image_size=64
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    loaded = load_yaml_config(path)
    assert loaded["image_sizes"] == [24, 32, 48] and loaded["image_size"] == 24
    assert TrainConfig(**loaded) == config
    # a hand-written file may give only the list, even as a string
    path.write_text("image_sizes: '24,32'\nteacher_image_size: 64\nteacher_path: t\nstudent: resnet18\n")
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert config_from_args(args).image_size == 24 and config_from_args(args).image_sizes == [24, 32]
    path.write_text("image_sizes: [24, 0]\n")
    with pytest.raises(ValueError, match="image_sizes"):
        load_yaml_config(path)


def test_bench_resolutions_is_registered():
    from raml.cli.bench import BENCHMARKS

    assert BENCHMARKS["resolutions"][0] == "raml.bench.resolutions"


# --------------------------------------------------------------------------------------------- training
CPU = torch.device("cpu")
DR = 32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """Synthetic data (3 training classes x 3 images) and a random tiny 'teacher' checkpoint."""
    from raml.data.synth import generate_synthetic_dataset
    from raml.models import build_network, save_checkpoint

    root = tmp_path_factory.mktemp("multires_data")
    generate_synthetic_dataset(root / "cub", num_classes=6, images_per_class=3, image_size=DR, seed=0)
    torch.manual_seed(0)
    teacher = root / "teacher.pth"
    save_checkpoint(teacher, build_network("timm/test_resnet", whitening=8, pretrained=False))
    return {"root": root, "teacher": teacher}


def _distill(tiny_run, directory: Path, **changes) -> TrainConfig:
    values = dict(
        training_dataset="cub",
        test_datasets=[],
        val=False,
        data_root=str(tiny_run["root"]),
        directory=str(directory),
        student_path=str(tiny_run["teacher"]),
        teacher_path=str(tiny_run["teacher"]),
        teacher_image_size=DR,
        image_size=16,
        image_sizes=[16, 24],
        pos_num=2,
        batch_size=3,
        update_every=1,
        epochs=2,
        workers=0,
        seed=3,
        query_size=10**6,
        save_freq=10,
    )
    values.update(changes)
    return TrainConfig(**values)


def _train_recording_sizes(config: TrainConfig, **kwargs) -> tuple[Trainer, list[int]]:
    trainer = Trainer(config, CPU, progress=False, **kwargs)
    seen: list[int] = []
    trainer.student.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    with contextlib.suppress(TrainingInterrupted):
        trainer.run()
    return trainer, seen


@pytest.mark.parametrize("mode", ["ts_aug", "ts_reg"])
def test_training_draws_one_size_per_batch_and_stores_the_sizes(tiny_run, tmp_path, mode):
    from raml.models import load_network

    trainer, seen = _train_recording_sizes(_distill(tiny_run, tmp_path / mode, mode=mode))
    batches = trainer.batches_per_epoch
    expected = [s for epoch in (1, 2) for s in draw_batch_sizes([16, 24], batches, seed=3, epoch=epoch)]
    # every forward pass of the student is one (rectangular) batch at the drawn size
    assert seen == expected and set(seen) == {16, 24}
    assert load_network(tmp_path / mode / "model_best.pth.tar").meta["image_sizes"] == [16, 24]
    written = yaml.safe_load((tmp_path / mode / "config.yaml").read_text())
    assert written["image_sizes"] == [16, 24] and written["image_size"] == 16


def test_a_resumed_multi_size_run_equals_an_uninterrupted_one(tiny_run, tmp_path):
    _, full_sizes = _train_recording_sizes(_distill(tiny_run, tmp_path / "full"))
    part = _distill(tiny_run, tmp_path / "part")
    _, first = _train_recording_sizes(part, stop_after_epoch=1)
    resumed = part.replace(resume_student=str(tmp_path / "part" / "model_last.pth.tar"))
    _, second = _train_recording_sizes(resumed)
    assert first + second == full_sizes
    a = torch.load(tmp_path / "full" / "model_last.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "model_last.pth.tar", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_single_size_run_never_touches_the_size_stream(tiny_run, tmp_path, monkeypatch):
    import raml.engine.methods.coupled as coupled

    def refuse(*args, **kwargs):
        raise AssertionError("a single-size run must not draw sizes")

    monkeypatch.setattr(coupled, "draw_batch_sizes", refuse)
    trainer, seen = _train_recording_sizes(_distill(tiny_run, tmp_path / "one", image_sizes=None, epochs=1))
    assert set(seen) == {16}
    assert "image_sizes" not in torch.load(tmp_path / "one" / "model_best.pth.tar", weights_only=True)["meta"]


def test_per_size_bn_flag_writes_per_size_statistics(tiny_run, tmp_path, capsys):
    from raml.cli.main import main

    directory = tmp_path / "bn"
    argv = ["train", "--mode", "ts_aug", "--student-path", str(tiny_run["teacher"]), "--teacher-path"]
    argv += [str(tiny_run["teacher"]), "--data-root", str(tiny_run["root"]), "--training-dataset", "cub"]
    argv += ["--test-datasets", "", "--directory", str(directory), "--image-size", "16,24", "--per-size-bn"]
    argv += ["--teacher-image-size", str(DR), "--epochs", "1", "--pos-num", "2", "--batch-size", "4", "-j", "0"]
    argv += ["--update-every", "1", "--no-val", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    checkpoint = torch.load(directory / "model_best.pth.tar", weights_only=True)
    assert checkpoint["meta"]["bn_sizes"] == [16, 24] and checkpoint["meta"]["image_sizes"] == [16, 24]
    assert any(key.endswith("running_var_s24") for key in checkpoint["state_dict"])
    assert "raml" in checkpoint and checkpoint["epoch"] == 1  # the training record is kept
    # training cannot continue from the re-estimated statistics: said so, not as "another network"
    assert main([*argv, "--epochs", "2", "--resume-student", str(directory / "model_best.pth.tar")]) == 2
    said = capsys.readouterr().err
    assert "re-estimated per query size ([16, 24])" in said and "--resume-student last" in said, said
    with pytest.raises(ValueError, match="--per-size-bn"):
        _distill(tiny_run, tmp_path / "x", image_sizes=None, per_size_bn=True).validate()


# -------------------------------------------------------------------------------------------- benchmark
def test_bench_resolutions_quick_writes_rows_table_and_plot(tmp_path, capsys, monkeypatch):
    from raml.cli.main import main

    out = tmp_path / "bench"
    assert main(["bench", "resolutions", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    result = json.loads((out / "resolutions.json").read_text())
    rows = result["rows"]
    assert {r["student"] for r in rows} == {"multi", "dedicated", "dedicated-same-steps"}
    for row in rows:
        assert {"student", "query_size", "asym_mAP", "asym_R@1", "query_gflops"} <= set(row)
        assert 0 <= row["asym_mAP"] <= 100 and row["query_gflops"] > 0
    for student in ("multi", "dedicated", "dedicated-same-steps"):
        assert sorted(r["query_size"] for r in rows if r["student"] == student) == [16, 24]
    assert [r["query_size"] for r in result["per_size_bn"]] == [16, 24]
    assert {(g["student"], g["control"]) for g in result["gaps"]} == {
        (student, control)
        for student in ("multi", "multi+per-size-bn")
        for control in ("dedicated", "dedicated-same-steps")
    }
    assert (out / "resolutions.png").stat().st_size > 0
    assert "| multi | 24 px |" in (out / "resolutions.md").read_text()
    assert "Paired difference to each control" in capsys.readouterr().out

    # what each student was trained on: the multi-size student on both sizes for 2 x 1 epochs, each
    # dedicated student on its size alone, for 1 epoch or (same steps) for 2
    def trained(path: Path) -> tuple[list[int] | None, int]:
        checkpoint = torch.load(path / "model_best.pth.tar", weights_only=True)
        return checkpoint["meta"].get("image_sizes"), checkpoint["epoch"]

    students = out / "students" / "seed0"
    assert trained(students / "multi") == ([16, 24], 2)
    assert trained(students / "dedicated16") == (None, 1) and trained(students / "dedicated24-same-steps") == (None, 2)
    assert yaml.safe_load((students / "dedicated24-same-steps" / "config.yaml").read_text())["image_size"] == 24
    # the per-size statistics change what the multi-size student retrieves: its rows are not the plain ones
    plain = {r["query_size"]: r for r in rows if r["student"] == "multi"}
    for row in result["per_size_bn"]:
        metrics = ("asym_mAP", "asym_R@1", "sym_mAP")
        assert [row[k] for k in metrics] != [plain[row["query_size"]][k] for k in metrics], row
    # a finished student of the same settings is reused (an interrupted benchmark resumes), never retrained
    from raml.bench import resolutions

    monkeypatch.setattr(resolutions, "Trainer", None)
    settings = resolutions.quick_settings(out)
    directory = out / "students" / "seed0" / "dedicated16"
    teacher = out / "teacher" / "model_best.pth.tar"
    assert resolutions.train_student(settings, out / "data", teacher, [16], 1, 0, directory, CPU, False) == (
        directory / "model_best.pth.tar"
    )


def test_an_interrupted_run_s_outputs_say_how_many_of_the_requested_seeds_are_in(tmp_path, monkeypatch):
    """After each seed the outputs are written; before, the settings' seed count was overwritten with the number
    done, so the outputs of a run stopped after seed 0 of 2 looked like a complete 1-seed run."""
    import time

    from raml.bench import resolutions

    monkeypatch.setattr(resolutions, "plot_resolutions", lambda summary, path: None)
    settings = resolutions.quick_settings(tmp_path)
    settings.seeds = 2
    stack = {"torch_threads": 1, "cpu": "test"}
    partial = resolutions._write_results(tmp_path, settings, [0], [], [], stack, time.perf_counter())
    written = json.loads((tmp_path / "resolutions.json").read_text())["settings"]
    assert partial["settings"] == written
    assert (written["seeds"], written["seeds_done"], written["seed_values"], written["complete"]) == (2, 1, [0], False)
    assert "over 1 of 2 seeds: INCOMPLETE" in (tmp_path / "resolutions.md").read_text()
    resolutions._write_results(tmp_path, settings, [0, 1], [], [], stack, time.perf_counter())
    written = json.loads((tmp_path / "resolutions.json").read_text())["settings"]
    assert (written["seeds"], written["seeds_done"], written["complete"]) == (2, 2, True)
    assert "over 2 seed(s)." in (tmp_path / "resolutions.md").read_text()


def test_docs_name_existing_flags_and_show_the_recorded_run():
    import re

    from raml.bench.parsers import resolutions_parser
    from raml.bench.resolutions import resolutions_tables

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "docs" / "resolutions.md").read_text()
    parsers = build_parser()._subparsers._group_actions[0].choices.values()
    known = {option for parser in parsers for option in parser._option_string_actions}
    known |= set(resolutions_parser()._option_string_actions)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", text))
    assert named and not named - known, sorted(named - known)
    # the tables are those of the recorded run's resolutions.json, kept next to the page
    recorded = json.loads((repo / "docs" / "resolutions.json").read_text())
    assert resolutions_tables(recorded) in text
    students = {r["student"] for r in recorded["rows"]}
    assert {"multi", "dedicated"} <= students <= {"multi", "dedicated", "dedicated-same-steps"}
    if "dedicated-same-steps" not in students:  # a run without the second control must say so
        assert "predates the second control" in text and "not yet measured" in text
    assert recorded["settings"]["seeds"] >= 3
