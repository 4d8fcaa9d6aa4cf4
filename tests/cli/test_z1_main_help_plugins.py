"""``raml --help`` lists a method registered at run time (``register_method``) beside the built-in ones, as
``raml train --help`` does; without the registry imported it lists the built-in names (no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raml.cli import main as cli_main


def _train_line(capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli_main.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    return text[text.index("train train a teacher") : text.index(" test ")]


def test_a_registered_plug_in_is_listed_by_the_main_help(monkeypatch, capsys) -> None:
    from raml.engine.methods import METHODS

    monkeypatch.setitem(METHODS, "my_plugin_kd", METHODS["rkd"])  # removed again after the test
    assert "my_plugin_kd" in _train_line(capsys)


def test_without_the_registry_the_built_in_names_are_listed_and_nothing_is_imported() -> None:
    code = (
        "import sys; from raml.cli.main import build_parser; text = build_parser().format_help(); "
        "assert 'ts_aug' in text and 'ugd' in text, text; "
        "assert 'raml.engine.methods' not in sys.modules and 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
