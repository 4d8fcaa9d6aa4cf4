"""Refusals of ``raml train`` before any work: one line, exit 2, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from raml.cli import main as cli_main


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    run = tmp_path / "run"
    return [
        "train",
        "--mode",
        "sym",
        "--student",
        "test_resnet",
        "--directory",
        str(run),
        "--data-root",
        str(tmp_path),
        *extra,
    ]


def test_optimize_with_resume_student_is_refused_before_the_search(tmp_path: Path, capsys):
    """It used to run the whole search (trial folders and all) before the final run failed to resume."""
    with pytest.raises(SystemExit) as stop:
        cli_main.main(_argv(tmp_path, "--optimize", "--resume-student", "last"))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--optimize cannot --resume-student" in err
    assert not (tmp_path / "run").exists()


def test_world_size_without_rank_is_one_line_naming_torchrun(tmp_path: Path, capsys, monkeypatch):
    """``WORLD_SIZE=2 raml train`` without torchrun's RANK was a KeyError traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli_main.main(_argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "WORLD_SIZE=2 is set without RANK (and LOCAL_RANK)" in err and "torchrun" in err
    assert not (tmp_path / "run").exists()
