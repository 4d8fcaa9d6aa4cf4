"""No output of a command is one of its own inputs: a report (``--json``, ``--gallery``) or a model never replaces
the checkpoint, a query image, a list file, an index folder's files or a dataset's files the command reads, even
with ``--overwrite`` (which replaces a previous output only). Refused before any work, one line, exit 2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from raml.cli.main import main


def _inputs(root: Path) -> None:
    """Stand-ins for what the commands read: each case is refused before any of them is opened."""
    (root / "data" / "synth").mkdir(parents=True)
    (root / "data" / "synth" / "images.txt").write_text("1 001.A/x.jpg\n2 002.B/y.jpg\n")
    (root / "data" / "own").mkdir()
    (root / "data" / "own" / "split.json").write_text('{"train": [], "test": []}\n')
    (root / "idx").mkdir()
    (root / "idx" / "index.json").write_text('{"index_type": "flat"}\n')
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
    "test json = the student": ([*TEST, "--json", "student.pth"], "student.pth", ("--json", "--student-path")),
    "train json = a dataset's list": (
        [*TRAIN, "--directory", "run", "--json", "data/synth/images.txt"],
        "data/synth/images.txt",
        ("--json", "--training-dataset"),
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


def test_inputs_of_the_helper(tmp_path: Path, monkeypatch):
    from raml.entry import check_output_files, dataset_inputs, network_inputs

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path)
    (tmp_path / "linked.pth").symlink_to(tmp_path / "teacher.pth")
    inputs = [*network_inputs("--network-path", "linked.pth", "data"), *dataset_inputs("--dataset", "own", "data")]
    with pytest.raises(ValueError, match="--json 'teacher.pth' is --network-path's 'linked.pth'"):
        check_output_files([("--json", "teacher.pth", None)], inputs)  # the same file under another name
    with pytest.raises(ValueError, match="lies inside 'data/own', the folder --dataset reads"):
        check_output_files([("--json", "data/own/new/report.json", None)], inputs)
    # a cached network name is its file under <data_root>/networks
    assert ("--teacher-path", Path("data/networks/best.pth")) in network_inputs("--teacher-path", "best", "data")
    # the data root, and a JSON split's folder that holds the working directory, are no dataset folders
    assert dataset_inputs("--datasets", "split.json:test", "data") == [
        ("--datasets", Path("split.json")),
        ("--datasets", Path("data/split.json")),
    ]
    check_output_files([("--json", "data/report.json", None), ("--gallery", "report.png", None)], inputs)
