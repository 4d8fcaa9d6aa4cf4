"""``raml train --config <directory>/config.yaml``: the run's own record as its --config file is rewritten only
when nothing of it would be lost (no torch import needed: the refusal comes before any training import)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raml.cli import main as cli_main


def test_a_commented_config_file_that_is_the_runs_record_is_refused_even_with_overwrite(tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    record = run / "config.yaml"
    text = "# my settings: keep these comments\nmode: sym\nstudent: test_resnet\nepochs: 3\n"
    record.write_text(text)
    for extra in ([], ["--overwrite"]):
        argv = ["train", "--config", str(record), "--directory", str(run), "--data-root", str(tmp_path), *extra]
        with pytest.raises(SystemExit) as stop:
            cli_main.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "is the run's own record" in err and "Copy it elsewhere" in err
    assert record.read_text() == text and sorted(p.name for p in run.iterdir()) == ["config.yaml"]
