"""How ``raml`` reports bad input (``raml.cli.main``): one line ``raml <command>: error: ...`` and exit status 2,
never a traceback, for the library's own errors and for every ``OSError`` (a folder where a file is expected, a
permission, a full disk); a DataLoader worker's error shows its own message, not the worker's traceback. And
``raml data synth``'s refusals, with nothing already in the folder touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch._utils import ExceptionWrapper

from raml.cli import main as cli_main
from raml.data.images import ImageLoadError


def _raised_in_a_worker(error: Exception) -> Exception:
    """``error`` as the main process sees it after a DataLoader worker raised it (torch's own wrapper)."""
    try:
        raise error
    except Exception:  # noqa: BLE001 - wrapped as a DataLoader worker does
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(type(error)) as raised:
        wrapper.reraise()
    return raised.value


def test_an_error_from_a_data_loading_worker_shows_its_message_without_the_workers_traceback():
    message = "Cannot load image a.jpg: OSError: image file is truncated\n(re-download or remove it)"
    shown = cli_main._message(_raised_in_a_worker(ImageLoadError(message)))
    assert shown == message + " (in a data loading worker)"
    assert cli_main._message(_raised_in_a_worker(ValueError("bad: value"))) == "bad: value (in a data loading worker)"
    assert cli_main._message(ValueError("plain\ntwo lines")) == "plain\ntwo lines"


def _synth(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "synth", "--out", str(out), "--classes", "2", "--images-per-class", "1", "--size", "16", *extra]


def test_an_os_error_is_one_line_and_exit_status_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("precious")
    assert cli_main.main(_synth(tmp_path, afile / "sub")) == 2  # mkdir under a file: NotADirectoryError
    err = capsys.readouterr().err
    assert err.startswith("raml data: error: ") and "Traceback" not in err and str(afile) in err
    assert afile.read_text() == "precious"


def test_data_synth_refuses_a_file_and_a_folder_that_holds_files_and_writes_nothing(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("precious")
    assert cli_main.main(_synth(tmp_path, afile)) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "precious"

    dataset = tmp_path / "cub"
    dataset.mkdir()
    (dataset / "images.txt").write_text("1 001.Bird/a.jpg\n")
    (dataset / "classes.txt").write_text("1 001.Bird\n")
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    assert cli_main.main(_synth(tmp_path, dataset)) == 2
    err = capsys.readouterr().err
    assert "already holds 2 entries (classes.txt, images.txt)" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before  # nothing written, nothing added

    assert cli_main.main(_synth(tmp_path, dataset, "--force")) == 0
    assert (dataset / "images.txt").read_bytes() != before["images.txt"]
    assert cli_main.main(_synth(tmp_path, tmp_path / "empty")) == 0  # a new folder needs no --force


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--classes", "100000000000000000000", "argument --classes: expected an integer from 1 to 100000"),
        ("--size", "100000", "argument --size: expected an integer from 1 to 4096"),
        ("--images-per-class", "0", "argument --images-per-class"),
        ("--seed", "-1", "argument --seed: expected an integer >= 0, got -1"),
    ],
)
def test_data_synth_sizes_and_seed_are_bounded_naming_the_flag(tmp_path, capsys, flag, value, expected):
    argv = ["data", "synth", "--out", str(tmp_path / "new"), flag, value]
    with pytest.raises(SystemExit) as exited:
        cli_main.main(argv)
    assert exited.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["test", "extract", "index", "search"])
def test_a_batch_size_below_one_is_refused_by_the_parser_naming_the_flag(capsys, command):
    with pytest.raises(SystemExit) as exited:
        cli_main.main([command, "--batch-size", "0"])
    assert (
        exited.value.code == 2
        and "argument --batch-size: expected a positive integer, got 0" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [("export", "give --output FILE.onnx"), ("index", "give the images to index")],
)
def test_a_commands_own_refusal_exits_with_2_and_its_message_like_any_bad_input(tmp_path, capsys, command, expected):
    """A command's ``SystemExit("message")`` gave exit status 1 (Python's for a message); bad input is 2."""
    argv = [command, "--network-path", str(tmp_path / "none.pth")]
    argv += ["--image-size", "32"] if command == "export" else ["--output", str(tmp_path / "index")]
    with pytest.raises(SystemExit, match=expected) as exited:
        cli_main.main(argv)
    assert exited.value.code == 2 and expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
