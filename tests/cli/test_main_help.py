"""``raml --help`` lists every training mode, from names that import no torch."""

from __future__ import annotations

import re

import pytest

from raml.cli import main as cli_main


def test_the_main_help_lists_every_registered_mode(capsys) -> None:
    from raml.engine.methods import METHODS

    with pytest.raises(SystemExit) as stop:
        cli_main.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    line = text[text.index("train train a teacher") : text.index(" test ")]
    listed = set(re.findall(r"[a-z][a-z0-9_]*", line))
    missing = [mode for mode in METHODS if mode not in listed]
    assert not missing, f"raml --help does not list --mode {missing}: {line}"
