"""``raml demo``: a reduced run writes every artefact and repeats itself exactly; the documents show its table.

The reduced demo (8 classes x 6 images, one epoch each, timm's ``test_resnet``) takes seconds; the full
default demo, whose numbers README.md and docs/demo.md show, runs only with ``-m slow``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from raml.cli.main import main
from raml.demo import (
    TIMING_KEYS,
    DemoSettings,
    comparable,
    parse_results_table,
    reproducible,
    results_markdown,
    results_table,
    summary,
)

ROOT = Path(__file__).resolve().parent.parent

KEYS = {
    "setting",
    "query_network",
    "query_size",
    "database_network",
    "database_size",
    "mAP",
    "R@1",
    "R@4",
    "query_gflops",
    "query_ms",
}
STACK_KEYS = {"torch", "torchvision", "timm", "numpy", "pillow", "torch_threads", "cpu", "device"}
REDUCED = [
    "--classes",
    "8",
    "--images-per-class",
    "6",
    "--teacher-epochs",
    "1",
    "--student-epochs",
    "1",
    "--architecture",
    "test_resnet",
    "--device",
    "cpu",
    "--no-progress",
]


def _load_refresh_script():
    path = ROOT / "scripts" / "refresh_demo_tables.py"
    spec = importlib.util.spec_from_file_location("refresh_demo_tables", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


refresh_script = _load_refresh_script()


def _run_reduced_demo(out: Path) -> str:
    """Run the reduced demo into ``out``; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), *REDUCED]) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "first"
    return out, _run_reduced_demo(out)


def test_reduced_demo_writes_every_artefact(reduced_demo):
    out, printed = reduced_demo
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 5
    for row in rows:
        assert set(row) == KEYS
        assert row["query_network"] in {"teacher", "student"} and row["database_network"] in {"teacher", "student"}
        assert 0 <= row["mAP"] <= 100 and row["query_gflops"] > 0 and row["query_ms"] > 0
    # queries at QR cost about (QR/DR)^2 of queries at DR for the same architecture
    ratio = rows[4]["query_gflops"] / rows[0]["query_gflops"]
    assert 0.15 < ratio < 0.4
    stack = results["stack"]
    assert set(stack) >= STACK_KEYS
    assert stack["torch_threads"] == DemoSettings().threads and stack["torch"] == torch.__version__.split("+")[0]
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "student QR / teacher DR" in markdown and "Distillation lifts" in printed
    assert f"torch {stack['torch']}" in markdown and f"{stack['torch_threads']} torch threads" in markdown
    # results.md shows results.json's rows (the milliseconds with fewer decimals)
    assert comparable({"rows": parse_results_table(markdown)}) == comparable(results)
    assert (out / "teacher" / "model_best.pth.tar").is_file() and (out / "student" / "model_best.pth.tar").is_file()


def test_every_file_the_demo_writes_is_checked_before_any_work(reduced_demo, tmp_path, capsys):
    """Derived from what a run wrote: each of its result files, blocked by a folder, stops the next run before
    the dataset is generated (settings.json was not checked: the run trained, then failed on it)."""
    written = sorted(p.name for p in reduced_demo[0].iterdir() if not p.is_dir())
    assert "settings.json" in written and "results.json" in written
    for name in written:
        out = tmp_path / name.replace(".", "_")
        (out / name).mkdir(parents=True)
        assert main(["demo", "--out", str(out), *REDUCED]) == 2, name
        assert f"--out's {name}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [name], f"{name}: the run started"


def test_a_demo_that_fails_while_writing_its_results_leaves_no_results(tmp_path):
    """The demo's result files go through write_result_files (raml.demo.run_demo's last step): the tradeoff plot
    fails to save (a full disk), and no result file is put in place, an earlier run's results.json kept as it was
    (before, results.json, results.md and settings.json were written first and looked complete). A unit test of
    the writer rather than a whole reduced demo (~3 CPU s) failing at its end."""
    from raml.demo import RESULT_FILES, write_result_files

    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text("an earlier run")

    def writer(name: str):  # noqa: ANN202
        def write(path: Path) -> None:
            if name == "tradeoff.png":
                raise OSError(28, "No space left on device")
            path.write_text(name)

        return write

    with pytest.raises(OSError, match="No space left on device"):
        write_result_files(out, {name: writer(name) for name in RESULT_FILES})
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "an earlier run"
    write_result_files(out, {name: (lambda path, name=name: path.write_text(name)) for name in RESULT_FILES})
    assert {p.name: p.read_text() for p in out.iterdir()} == {name: name for name in RESULT_FILES}


@pytest.mark.parametrize("moment", ["during", "after"])
def test_an_interrupted_demo_says_how_to_continue_it(moment, tmp_path, monkeypatch, capsys):
    """A SIGTERM during the teacher's first epoch (in a batch, or once its checkpoint is saved): the message says
    to run raml demo again, not the --resume-student of raml train, which raml demo does not take."""
    from raml.engine.trainer import Trainer

    method = "_batch_loss" if moment == "during" else "train_epoch"
    original = getattr(Trainer, method)

    def signalled(self, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        self._stop_signal = signal.SIGTERM  # as the trainer's handler records it
        return result

    monkeypatch.setattr(Trainer, method, signalled)
    assert main(["demo", "--out", str(tmp_path / "demo"), *REDUCED]) == 2
    error = capsys.readouterr().err
    assert f"Stopped by signal {int(signal.SIGTERM)} {moment} epoch 1" in error
    assert "Run raml demo again to start over" in error and "--resume-student" not in error


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_reduced_demo_repeats_itself_exactly(reduced_demo, tmp_path):
    """A second seeded run in the same process (after other tests moved torch's RNG) gives the same numbers."""
    first, _ = reduced_demo
    torch.manual_seed(12345)  # a global RNG state the first run did not see
    second = tmp_path / "second"
    _run_reduced_demo(second)
    a, b = (json.loads((out / "results.json").read_text()) for out in (first, second))
    assert comparable(a) == comparable(b)
    assert all(TIMING_KEYS.isdisjoint(row) for row in comparable(a)) and {"query_ms"} <= TIMING_KEYS
    images = [
        {p.relative_to(out): p.read_bytes() for p in (out / "data" / "synth").rglob("*.jpg")} for out in (first, second)
    ]
    assert images[0] and images[0] == images[1]  # the synthetic dataset too
    # the rounded metrics could hide small differences: the trained weights must be equal bit for bit
    for network in ("teacher", "student"):
        wa, wb = (_weights(out / network / "model_best.pth.tar") for out in (first, second))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), network


def _asym_alignment(out: Path, network: str) -> float:
    """Mean cosine of ``network``'s 32 px embedding of each held-out image to the teacher's 64 px embedding of it."""
    from raml.data.splits import get_split
    from raml.models import load_network
    from raml.retrieval.extract import extract_embeddings

    cpu = torch.device("cpu")
    paths = [str(p) for p in get_split("synth-test", out / "data").abspaths()]
    teacher = load_network(out / "teacher" / "model_best.pth.tar", device=cpu)
    query_net = load_network(out / network / "model_best.pth.tar", device=cpu)
    database = extract_embeddings(teacher, paths, 64, cpu, progress=False)
    queries = extract_embeddings(query_net, paths, 32, cpu, progress=False)
    return float((queries * database).sum(1).mean())


def test_reduced_demo_distils_the_student_towards_the_teacher_database(reduced_demo):
    """The student is distilled, not a copy of the teacher: its weights moved, its QR/DR row is not the
    undistilled one, and its 32 px embeddings lie closer to the teacher's 64 px ones than the teacher's own 32 px
    embeddings do (what the distillation optimises). A student copied from the teacher failed here.

    The reduced run cannot pin the paper's ordering (method row >> undistilled row): its teacher takes one
    optimiser step, so its 32 px and 64 px embeddings already agree (cosine ~0.99), and on a few dozen held-out
    images the difference of the two rows depends on the seed, also for reduced runs with a resnet18 teacher
    that learns (every configuration measured on seeds 0-2 had a seed at or below +1 mAP: docs/demo.md, "What
    holds on every machine"); the ordering with a margin is checked on the full demo, with ``-m slow``.
    """
    out, _ = reduced_demo
    rows = {row["setting"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    undistilled = rows["teacher QR / teacher DR (asymmetric, no distillation)"]
    method = rows["student QR / teacher DR (asymmetric, the method)"]
    assert (method["mAP"], method["R@1"], method["R@4"]) != (undistilled["mAP"], undistilled["R@1"], undistilled["R@4"])
    teacher, student = (_weights(out / name / "model_best.pth.tar") for name in ("teacher", "student"))
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert _asym_alignment(out, "student") > _asym_alignment(out, "teacher")


def test_reproducible_restores_the_thread_count_and_the_deterministic_flag():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with reproducible(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == deterministic
    with pytest.raises(ValueError, match="threads"), reproducible(0):
        pass


# ------------------------------------------------------------------------- the documents' demo table


def _rows(offset: float = 0.0) -> list[dict[str, Any]]:
    settings = [
        ("teacher DR / DR (symmetric)", "teacher", 64, "teacher", 64),
        ("teacher QR / QR (symmetric)", "teacher", 32, "teacher", 32),
        ("teacher QR / teacher DR (asymmetric, no distillation)", "teacher", 32, "teacher", 64),
        ("student QR / QR (symmetric)", "student", 32, "student", 32),
        ("student QR / teacher DR (asymmetric, the method)", "student", 32, "teacher", 64),
    ]
    return [
        {
            "setting": s,
            "query_network": qn,
            "query_size": qs,
            "database_network": dn,
            "database_size": ds,
            "mAP": round(20.0 + 3 * i + offset, 2),
            "R@1": round(30.0 + 2 * i + offset, 2),
            "R@4": round(60.0 + i + offset, 2),
            "query_gflops": 0.2962 if qs == 64 else 0.0742,
            "query_ms": 3.07 if qs == 64 else 1.28,
        }
        for i, (s, qn, qs, dn, ds) in enumerate(settings)
    ]


STACK = {
    "python": "3.11.7",
    "torch": "2.14.1",
    "torchvision": "0.29.1",
    "timm": "1.0.31",
    "numpy": "2.4.6",
    "pillow": "13.0.0",
    "torch_threads": 2,
    "cpu": "Some CPU",
    "device": "cpu",
}


def _results_md(rows: list[dict[str, Any]]) -> str:
    return results_markdown(rows, DemoSettings(), seconds=312.0, stack=STACK)


def _documents(root: Path) -> dict[str, str]:
    return {name: (root / name).read_text() for name in refresh_script.TARGETS}


def test_parse_results_table_inverts_results_table():
    rows = _rows(offset=0.123)
    assert parse_results_table("text before\n\n" + results_table(rows) + "\n\ntext after") == rows
    with pytest.raises(ValueError, match="No demo results table"):
        parse_results_table("| a | b |\n|---|---|\n")


def test_refresh_rewrites_the_marked_blocks_and_nothing_else(tmp_path):
    for name in refresh_script.TARGETS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    before = _documents(tmp_path)
    rows = _rows(offset=0.5)
    results = tmp_path / "results.md"
    results.write_text(_results_md(rows))
    argv = ["--results", str(results), "--root", str(tmp_path)]

    assert refresh_script.main([*argv, "--check"]) == 1  # the fake numbers are not the documents' numbers
    assert _documents(tmp_path) == before  # --check writes nothing
    assert refresh_script.main(argv) == 0
    after = _documents(tmp_path)
    for name, details in refresh_script.TARGETS.items():
        old_head, old_block, old_tail = refresh_script.split_block(before[name])
        head, block, tail = refresh_script.split_block(after[name])
        assert (head, tail) == (old_head, old_tail), f"{name}: text outside the markers changed"
        assert block != old_block
        assert parse_results_table(block) == rows
        assert " ".join(summary(rows).split()) in " ".join(block.split())
        assert ("Stack: torch 2.14.1" in block) == details  # docs/demo.md also shows the run's stack
    assert refresh_script.main([*argv, "--check"]) == 0  # idempotent
    assert refresh_script.main(argv) == 0 and _documents(tmp_path) == after


def test_refresh_refuses_documents_without_exactly_one_block():
    with pytest.raises(ValueError, match="Expected exactly one"):
        refresh_script.split_block("no markers here\n")
    twice = f"{refresh_script.START}\nx\n{refresh_script.END}\n" * 2
    with pytest.raises(ValueError, match="Expected exactly one"):
        refresh_script.split_block(twice)


def _marked_rows_and_summary(name: str) -> tuple[list[dict[str, Any]], str]:
    _, block, _ = refresh_script.split_block((ROOT / name).read_text())
    paragraphs = block.split("\n\n")
    return parse_results_table(paragraphs[0]), " ".join(paragraphs[1].split())


def test_readme_block_is_what_the_script_writes_for_its_numbers():
    """README.md's block is the script's output for a results.md with the same numbers; docs/demo.md agrees."""
    rows, sentence = _marked_rows_and_summary("README.md")
    assert len(rows) == 5
    assert sentence == summary(rows)  # the sentence was computed from this table, not edited by hand
    results = refresh_script.read_results(_results_md(rows))
    _, block, _ = refresh_script.split_block((ROOT / "README.md").read_text())
    assert block == refresh_script.render_block(results, details=False)
    assert _marked_rows_and_summary("docs/demo.md") == (rows, sentence)


#: what the full demo must show on every machine: distillation lifts QR/DR asymmetric mAP by at least this much
#: (README's machine: 9.63 -> 34.85, +25.2; docs/demo.md lists the spread measured across machines)
FULL_DEMO_MIN_LIFT = 15.0


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory) -> dict[str, Any]:
    """The default ``raml demo`` on a CPU (minutes), run once for the slow tests."""
    out = tmp_path_factory.mktemp("full_demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_full_demo_shows_the_papers_ordering(full_demo):
    """What holds on every machine (the digits do not: docs/demo.md): the distilled student's QR/DR mAP beats
    the undistilled teacher's QR/DR mAP by ``FULL_DEMO_MIN_LIFT`` and stays below the teacher's DR/DR."""
    mAP = {row["setting"]: row["mAP"] for row in full_demo["rows"]}
    undistilled = mAP["teacher QR / teacher DR (asymmetric, no distillation)"]
    method = mAP["student QR / teacher DR (asymmetric, the method)"]
    assert method - undistilled >= FULL_DEMO_MIN_LIFT, f"stack of this run: {full_demo['stack']}"
    assert mAP["teacher DR / DR (symmetric)"] > method


@pytest.mark.slow
def test_full_demo_gives_the_documents_numbers(full_demo):
    """The default ``raml demo`` on a CPU reproduces README.md's table (timings aside).

    It holds only on the machine that produced the table: the same versions and thread count on another
    processor, even one of the same model name, give other digits (docs/demo.md). After a change that moves
    the numbers, run ``make demo`` and ``python scripts/refresh_demo_tables.py``.
    """
    rows, sentence = _marked_rows_and_summary("README.md")
    assert comparable(full_demo) == comparable({"rows": rows}), f"stack of this run: {full_demo['stack']}"
    assert summary(full_demo["rows"]) == sentence


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--images-per-class", "1"], "--images-per-class must be from 2 to 10,000"),
        (["--classes", "3"], "--classes must be even and from 4 to 100,000"),
        (["--classes", "2"], "--classes must be even and from 4 to 100,000"),  # one training class: nothing to learn
        (["--classes", "99999"], "--classes must be even"),
        (["--architecture", "resnet19"], "--architecture: Unknown architecture 'resnet19'"),
    ],
)
def test_bad_demo_settings_are_refused_before_any_data_is_generated(tmp_path, capsys, flags, message):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # 99999999999 images per class grew the memory by gigabytes before the first image was written
        (["--images-per-class", "10001"], "argument --images-per-class: expected an integer from 1 to 10000"),
        (["--classes", "100002"], "argument --classes: expected an integer from 1 to 100000"),
    ],
)
def test_demo_sizes_past_raml_data_synth_bounds_are_refused_when_parsed(tmp_path, capsys, flags, message):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as stop:  # (an unknown architecture: a size let through stops before any work)
        main(["demo", "--out", str(out), *flags, "--architecture", "resnet19"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_demo_settings_refuse_sizes_past_raml_data_synth_bounds():
    from raml.cli.data import MAX_SYNTH_CLASSES, MAX_SYNTH_IMAGES_PER_CLASS
    from raml.demo import MAX_CLASSES, MAX_IMAGES_PER_CLASS

    assert (MAX_CLASSES, MAX_IMAGES_PER_CLASS) == (MAX_SYNTH_CLASSES, MAX_SYNTH_IMAGES_PER_CLASS)
    DemoSettings(num_classes=MAX_CLASSES, images_per_class=MAX_IMAGES_PER_CLASS).validate()
    with pytest.raises(ValueError, match="--images-per-class must be from 2 to 10,000"):
        DemoSettings(images_per_class=MAX_IMAGES_PER_CLASS + 1).validate()
    with pytest.raises(ValueError, match="--classes must be even and from 4 to 100,000"):
        DemoSettings(num_classes=MAX_CLASSES + 2).validate()


def test_a_dataset_build_stopped_part_way_is_never_reused(tmp_path, monkeypatch):
    """A rebuild with other settings overwrites the images of the same names; stopped part-way, it must not leave
    the first settings' stamp, or the next run with those settings reuses a mix of both builds."""
    import hashlib

    import raml.demo as demo

    def digests(folder: Path) -> dict[str, str]:
        return {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")
        }

    first = DemoSettings(out=tmp_path, num_classes=4, images_per_class=2, image_size=16, seed=0)
    demo.generate_dataset(first, tmp_path / "data", progress=False)
    folder = tmp_path / "data" / demo.DATASET
    built = digests(folder)
    real = demo.generate_synthetic_dataset

    def stopped(out_dir: Path, **values: Any) -> Path:
        # the other settings' build writes its first image, then stops
        image = sorted(Path(out_dir).rglob("*.jpg"))[0]
        image.write_bytes(b"not the first settings' image")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "generate_synthetic_dataset", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.generate_dataset(
            DemoSettings(out=tmp_path, num_classes=4, images_per_class=2, image_size=16, seed=1),
            tmp_path / "data",
            progress=False,
        )
    assert not (folder / "raml_synth.json").exists()
    monkeypatch.setattr(demo, "generate_synthetic_dataset", real)
    demo.generate_dataset(first, tmp_path / "data", progress=False)
    assert digests(folder) == built
    assert json.loads((folder / "raml_synth.json").read_text())["seed"] == 0
