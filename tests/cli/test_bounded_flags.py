"""Counts and seeds with an upper bound, refused when parsed (exit 2, one line naming the flag): a huge value
otherwise started that many processes or threads, or overflowed deep inside torch without naming its flag."""

from __future__ import annotations

import pytest

from raml.cli.main import main

INDEX = ["index", "--network-path", "n.pth", "--output", "idx"]
SEARCH = ["search", "--network-path", "n.pth", "--index", "idx", "q.jpg"]
# (an unknown architecture: a value let through stops at the settings' check, before any work)
DEMO = ["demo", "--architecture", "resnet19"]


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", [INDEX, SEARCH, DEMO], ids=["index", "search", "demo"])
@pytest.mark.parametrize("value", ["100000", "257", "99999999999", "-1"])
def test_workers_past_the_bound_are_refused_naming_the_flag(command, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _refusal([*command, "--workers", value], capsys)
    assert f"argument --workers: expected an integer from 0 to 256, got {value}" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [INDEX, SEARCH, DEMO], ids=["index", "search", "demo"])
def test_workers_within_the_bound_are_taken(command):
    from raml.cli.main import build_parser

    parser = build_parser()
    for value in ("0", "256"):
        assert parser.parse_args([*command, "--workers", value]).workers == int(value)


def test_the_demo_settings_refuse_workers_past_the_bound():
    from raml.cli.common import MAX_WORKERS
    from raml.demo import MAX_WORKERS as DEMO_MAX_WORKERS
    from raml.demo import DemoSettings

    assert DEMO_MAX_WORKERS == MAX_WORKERS
    with pytest.raises(ValueError, match="--workers must be from 0 to 256, got 257"):
        DemoSettings(workers=257).validate()
