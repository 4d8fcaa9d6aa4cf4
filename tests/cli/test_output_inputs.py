"""No output of a command is one of its own inputs: a report (``--json``, ``--gallery``) or a model never replaces
the checkpoint, a query image, a list file, an index folder's files or a dataset's files the command reads, even
with ``--overwrite`` (which replaces a previous output only). Refused before any work, one line, exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from raml.cli.main import main


def _inputs(root: Path) -> None:
    """Stand-ins for what the commands read: each case is refused before any of them is opened."""
    (root / "data" / "synth").mkdir(parents=True)
    (root / "data" / "synth" / "images.txt").write_text("1 001.A/x.jpg\n2 002.B/y.jpg\n")
    (root / "data" / "own").mkdir()
    (root / "data" / "own" / "split.json").write_text('{"train": [["tr/1.jpg"]], "test": [["te/1.jpg"]]}\n')
    (root / "data" / "own" / "te").mkdir()
    (root / "data" / "own" / "te" / "1.jpg").write_bytes(b"a test image")
    (root / "listdir").mkdir()
    (root / "listdir" / "list.txt").write_text("a.jpg\n")
    (root / "listdir" / "a.jpg").write_bytes(b"a listed image")
    (root / "run1").mkdir()
    for name in ("model_best.pth.tar", "config.yaml"):
        (root / "run1" / name).write_bytes(b"a run's file")
    (root / "run1" / "optuna.db").write_bytes(b"a study")
    (root / "run1" / "trial_0").mkdir()
    (root / "run1" / "trial_0" / "model_best.pth.tar").write_bytes(b"a trial's checkpoint")
    (root / "SHA256SUMS").write_text("0" * 64 + "  student.pth\n")
    (root / "idx").mkdir()
    (root / "idx" / "index.json").write_text('{"index_type": "flat"}\n')
    (root / "idx" / "skipped_images_index.txt").write_text("an image skipped\n")
    for name in ("teacher.pth", "student.pth", "q.jpg", "q.png"):
        (root / name).write_bytes(name.encode() * 4)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


NET = ["--network-path", "teacher.pth", "--image-size", "32", "--data-root", "data"]
SEARCH = ["search", "--network-path", "student.pth", "--index", "idx", "--device", "cpu"]
EXPORT = ["export", "--network-path", "student.pth", "--image-size", "16"]
TEST = ["test", "--datasets", "synth-test", "--data-root", "data", "--sym", "--student-path", "student.pth"]
TRAIN = ["train", "-d", "synth", "-spath", "student.pth", "-tpath", "teacher.pth", "--data-root", "data"]
EXTRACT = ["extract", "--network-path", "student.pth", "--dataset", "own-test", "--data-root", "data"]

CASES = {
    "check-data json = a dataset's list": (
        ["check-data", "--data-root", "data", "--datasets", "synth-test", "--json", "data/synth/images.txt"],
        "data/synth/images.txt",
        ("--json", "--datasets"),
    ),
    "index json in the index folder": (
        ["index", *NET, "--dataset", "synth-test", "--output", "idx", "--json", "idx/index.json"],
        "idx/index.json",
        ("--json", "--output"),
    ),
    "index json = the checkpoint": (
        ["index", *NET, "--dataset", "synth-test", "--output", "new-idx", "--json", "teacher.pth"],
        "teacher.pth",
        ("--json", "--network-path"),
    ),
    "search json = the query": ([*SEARCH, "--json", "q.jpg", "q.jpg"], "q.jpg", ("--json", "QUERY_IMAGE")),
    "search gallery = the query": ([*SEARCH, "--gallery", "q.png", "q.png"], "q.png", ("--gallery", "QUERY_IMAGE")),
    "export json = the checkpoint": (
        ["export", *NET[:4], "--output", "t.onnx", "--json", "teacher.pth"],
        "teacher.pth",
        ("--json", "--network-path"),
    ),
    "export torchscript = the checkpoint, --overwrite": (
        [*EXPORT, "--torchscript", "student.pth", "--overwrite"],
        "student.pth",
        ("--torchscript", "--network-path", "never an input"),
    ),
    "test json = the --index's index.json": (
        [*TEST, "--index", "idx", "--json", "idx/index.json"],
        "idx/index.json",
        ("--json", "--index"),
    ),
    "test json = the student": ([*TEST, "--json", "student.pth"], "student.pth", ("--json", "--student-path")),
    "train json = a dataset's list": (
        [*TRAIN, "--directory", "run", "--json", "data/synth/images.txt"],
        "data/synth/images.txt",
        ("--json", "--training-dataset"),
    ),
    "train json = the run's best checkpoint": (
        [*TRAIN, "--directory", "run1", "--json", "run1/model_best.pth.tar"],
        "run1/model_best.pth.tar",
        ("--json", "--directory"),
    ),
    "test json = the record beside the student": (
        [*TEST, "--student-path", "run1/model_best.pth.tar", "--json", "run1/config.yaml"],
        "run1/config.yaml",
        ("--json", "--student-path"),
    ),
    "test json = the digests beside the student": (
        [*TEST, "--json", "SHA256SUMS"],
        "SHA256SUMS",
        ("--json", "--student-path"),
    ),
    "index json = the index's skip report": (
        ["index", *NET, "--dataset", "synth-test", "--output", "idx", "--json", "idx/skipped_images_index.txt"],
        "idx/skipped_images_index.txt",
        ("--json", "--output"),
    ),
    "train --optimize json = the study": (
        [*TRAIN, "--optimize", "--directory", "run1", "--json", "run1/optuna.db"],
        "run1/optuna.db",
        ("--json", "--directory"),
    ),
    "train --optimize json = a trial's checkpoint": (
        [*TRAIN, "--optimize", "--directory", "run1", "--json", "run1/trial_0/model_best.pth.tar"],
        "run1/trial_0/model_best.pth.tar",
        ("--json", "--directory"),
    ),
    "train json = the run's config.yaml": (
        [*TRAIN, "--directory", "run1", "--json", "run1/config.yaml"],
        "run1/config.yaml",
        ("--json", "--directory"),
    ),
    "train json = a --test-datasets split file": (
        [*TRAIN, "-td", "data/own/split.json:test", "--directory", "run", "--json", "data/own/split.json"],
        "data/own/split.json",
        ("--json", "--test-datasets"),
    ),
    "index json = an image the --list names": (
        ["index", *NET, "--list", "listdir/list.txt", "--output", "new-idx", "--json", "listdir/a.jpg"],
        "listdir/a.jpg",
        ("--json", "--list"),
    ),
    "export json = an image the --list names": (
        ["export", *NET[:4], "--list", "listdir/list.txt", "--output", "t.onnx", "--json", "listdir/a.jpg"],
        "listdir/a.jpg",
        ("--json", "--list"),
    ),
    "extract sidecar = the split file, --overwrite": (
        [*EXTRACT, "--output", "data/own/split.npy", "--overwrite"],
        "data/own/split.json",
        ("--output", "--dataset"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_output_that_is_an_input_is_refused_first(case: str, tmp_path: Path, monkeypatch, capsys):
    argv, victim, words = CASES[case]
    if argv[0] in ("index", "search"):
        pytest.importorskip("faiss")
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    before = _digest(tmp_path / victim)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"raml {argv[0]}: error: "), err
    assert all(word in err for word in words), err
    assert "pass --overwrite" not in err
    assert _digest(tmp_path / victim) == before
    assert not (tmp_path / "run").exists() and not (tmp_path / "new-idx").exists()


def test_export_refuses_the_checkpoint_without_suggesting_overwrite(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    before = _digest(tmp_path / "student.pth")
    assert main([*EXPORT, "--torchscript", "student.pth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--torchscript 'student.pth' is --network-path's 'student.pth'" in err, err
    assert "--overwrite" not in err and _digest(tmp_path / "student.pth") == before


def test_check_data_report_replaces_an_earlier_report_next_to_the_datasets(cub_root: Path, tmp_path, capsys):
    """Reports may still replace a previous report, also one in the data root (not a dataset's folder)."""
    for report in (tmp_path / "bad.json", cub_root / "bad.json"):
        report.write_text("an earlier report\n")
        argv = ["check-data", "--data-root", str(cub_root), "--datasets", "cub-test", "--workers", "1"]
        assert main([*argv, "--no-progress", "--json", str(report)]) == 0, capsys.readouterr().err
        assert report.read_text().startswith("{")


@pytest.mark.parametrize(
    ("folder", "argv", "victim", "words"),
    [
        (
            "data/synth",
            ["check-data", "--data-root", "..", "--datasets", "synth-test", "--json", "images.txt"],
            "data/synth/images.txt",
            ("--json", "--datasets"),
        ),
        (
            "data/own",
            ["check-data", "--datasets", "split.json:test", "--json", "te/1.jpg"],
            "data/own/te/1.jpg",
            ("--json", "--datasets", "an image of"),
        ),
    ],
)
def test_an_input_in_the_working_directory_is_refused(folder, argv, victim, words, tmp_path, monkeypatch, capsys):
    """Run from inside the dataset folder: its list and its images are inputs as anywhere else (a folder holding
    the working directory was left out of the inputs, and the list or an image was replaced)."""
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path / folder)
    before = _digest(tmp_path / victim)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("raml check-data: error: ") and all(word in err for word in words), err
    assert _digest(tmp_path / victim) == before


def test_a_new_report_beside_a_split_or_inside_a_dataset_is_fine(own_root: Path, tmp_path, monkeypatch, capsys):
    """Only the files a command reads are guarded, never a folder: a report in a run folder beside a JSON split,
    or inside a dataset's folder, is written, whatever the working directory (both were refused)."""
    split = own_root / "mine" / "split.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for report in (own_root / "mine" / "runs" / "a" / "check.json", own_root / "mine" / "check.json"):
        argv = ["check-data", "--datasets", f"{split}:test", "--workers", "1", "--no-progress", "--json", str(report)]
        assert main(argv) == 0, capsys.readouterr().err
        assert json.loads(report.read_text())
    argv = ["check-data", "--data-root", str(own_root), "--datasets", "mine-test", "--workers", "1", "--no-progress"]
    assert main([*argv, "--json", str(own_root / "mine" / "new.json")]) == 0, capsys.readouterr().err


def test_index_report_in_the_index_folder_on_every_run(random_network, image_factory, tmp_path: Path, capsys):
    """A report in the --output folder is no file of the index: written on the first run and on the next one,
    which appends (that one was refused, the index folder being an input)."""
    pytest.importorskip("faiss")
    network = random_network("resnet18", 16, 0)
    (tmp_path / "imgs").mkdir()
    for k in range(2):
        image_factory(tmp_path / "imgs" / f"{k}.jpg", color=(40 * k, 90, 200))
    index = tmp_path / "idx"
    report = index / "report.json"
    argv = ["index", "--network-path", str(network), "--image-size", "32", "--images", str(tmp_path / "imgs")]
    argv += ["--output", str(index), "--device", "cpu", "--workers", "1", "--no-progress", "--json", str(report)]
    for _ in range(2):
        assert main(argv) == 0, capsys.readouterr().err
        assert json.loads(report.read_text())
        report.unlink()
    refused = [*argv[:-1], str(index / "index.json")]  # the index's own files stay guarded
    assert main(refused) == 2
    assert "is a file of the index --output" in capsys.readouterr().err


def test_search_gallery_never_replaces_an_image_of_the_index(random_network, image_factory, tmp_path, capsys):
    """The gallery reads the database images it shows: one of them as --gallery is refused once the index is
    loaded, before anything is embedded or written."""
    pytest.importorskip("faiss")
    network = random_network("resnet18", 16, 0)
    (tmp_path / "imgs").mkdir()
    for k in range(2):
        image_factory(tmp_path / "imgs" / f"{k}.jpg", color=(40 * k, 90, 200))
    query = image_factory(tmp_path / "q.jpg", color=(10, 20, 30))
    argv = ["index", "--network-path", str(network), "--image-size", "32", "--images", str(tmp_path / "imgs")]
    assert main([*argv, "--output", str(tmp_path / "idx"), "--device", "cpu", "--workers", "1", "--no-progress"]) == 0
    victim = tmp_path / "imgs" / "0.jpg"
    before = _digest(victim)
    argv = ["search", "--network-path", str(network), "--index", str(tmp_path / "idx"), "--image-size", "32"]
    assert main([*argv, "--device", "cpu", "--gallery", str(victim), str(query)]) == 2
    assert "is an image of the index --index" in capsys.readouterr().err
    assert _digest(victim) == before


def test_inputs_of_the_helper(tmp_path: Path, monkeypatch):
    from raml.entry import check_output_files, dataset_inputs, network_inputs

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    (tmp_path / "linked.pth").symlink_to(tmp_path / "teacher.pth")
    inputs = [*network_inputs("--network-path", "linked.pth", "data"), *dataset_inputs("--dataset", "own", "data")]
    with pytest.raises(ValueError, match="--json 'teacher.pth' is --network-path's 'linked.pth'"):
        check_output_files([("--json", "teacher.pth", None)], inputs)  # the same file under another name
    # a cached network name is its file under <data_root>/networks
    assert ("--teacher-path", Path("data/networks/best.pth")) in network_inputs("--teacher-path", "best", "data")
    # a JSON split: the file (as given and under the data root) and its images, train and val together
    test_inputs = dataset_inputs("--datasets", "data/own/split.json:test", "data")
    assert test_inputs[:2] == [
        ("--datasets", Path("data/own/split.json")),
        ("--datasets", Path("data/data/own/split.json")),
    ]
    with pytest.raises(ValueError, match="--json 'data/own/te/1.jpg' is an image of --datasets"):
        check_output_files([("--json", "data/own/te/1.jpg", None)], test_inputs)
    with pytest.raises(ValueError, match="--json 'data/own/tr/1.jpg' is an image of --dataset 'own'"):
        check_output_files([("--json", "data/own/tr/1.jpg", None)], inputs)  # not there yet: still the image
    # new files in a dataset folder, beside a split file, in the data root, elsewhere: fine
    outputs = ["data/own/new/report.json", "data/own/report.json", "data/report.json", "report.png"]
    check_output_files([(f"--out{k}", path, None) for k, path in enumerate(outputs)], [*inputs, *test_inputs])


def test_images_folder_guards_its_images_only(tmp_path: Path, monkeypatch):
    """--images DIR: the images it takes (by collect_images' rule, without listing the folder), not the folder."""
    from raml.cli.deploy import _folder_images
    from raml.entry import check_output_files

    monkeypatch.chdir(tmp_path)
    for path in ("imgs/a.JPG", "imgs/sub/b.png", "imgs/.hidden/c.jpg", "imgs/notes.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    inputs = [_folder_images(Path("imgs"))]
    for image in ("imgs/a.JPG", "imgs/sub/b.png"):
        with pytest.raises(ValueError, match=f"--gallery '{image}' is an image of --images 'imgs'"):
            check_output_files([("--gallery", image, None)], inputs)
    outputs = ["imgs/.hidden/c.jpg", "imgs/notes.txt", "imgs/new.png", "imgs/report.json"]
    check_output_files([(f"--out{k}", path, None) for k, path in enumerate(outputs)], inputs)
