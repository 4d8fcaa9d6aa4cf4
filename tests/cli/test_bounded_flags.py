"""Counts and seeds with an upper bound, refused when parsed (exit 2, one line naming the flag): a huge value
otherwise started that many processes or threads, or overflowed deep inside torch without naming its flag."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize(
    "command",
    [INDEX, SEARCH, DEMO, ["train"], ["test"], ["extract"], ["reproduce"]],
    ids=["index", "search", "demo", "train", "test", "extract", "reproduce"],
)
@pytest.mark.parametrize("value", ["100000", "257", "99999999999", "-1"])
def test_workers_past_the_bound_are_refused_naming_the_flag(command, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _refusal([*command, "--workers", value], capsys)
    assert re.search(rf"argument (-j/)?--workers(/-j)?: expected an integer from 0 to 256, got {value}$", line), line
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


SERVE = ["serve", "--index", "idx", "--network-path", "n.pth"]


@pytest.mark.parametrize("command", [SERVE, DEMO], ids=["serve", "demo"])
@pytest.mark.parametrize("value", ["99999999999", "4097", "0"])
def test_threads_past_the_bound_are_refused_naming_the_flag(command, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _refusal([*command, "--threads", value], capsys)
    assert f"argument --threads: expected an integer from 1 to 4096, got {value}" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["99999999999999999999999", str(2**63), "-1"])
def test_a_seed_past_the_bound_is_refused_naming_the_flag(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _refusal([*DEMO, "--seed", value], capsys)
    assert f"argument --seed: expected an integer from 0 to 2**63 - 1, got {value}" in line
    assert list(tmp_path.iterdir()) == []


def test_threads_and_seeds_within_the_bounds_are_taken():
    from raml.cli.main import build_parser

    parser = build_parser()
    for value in ("1", "4096"):
        assert parser.parse_args([*SERVE, "--threads", value]).threads == int(value)
        assert parser.parse_args([*DEMO, "--threads", value]).threads == int(value)
    for value in ("0", str(2**63 - 1)):
        assert parser.parse_args([*DEMO, "--seed", value]).seed == int(value)


def test_the_library_refuses_threads_and_seeds_past_the_bounds():
    from raml.cli.common import MAX_SEED, MAX_THREADS
    from raml.demo import MAX_THREADS as DEMO_MAX_THREADS
    from raml.demo import DemoSettings, reproducible
    from raml.deploy.service.embedders import MAX_SERVING_THREADS, use_serving_threads
    from raml.engine.config import MAX_SEED as ENGINE_MAX_SEED

    assert MAX_THREADS == DEMO_MAX_THREADS == MAX_SERVING_THREADS and MAX_SEED == ENGINE_MAX_SEED
    DemoSettings(seed=MAX_SEED, threads=MAX_THREADS).validate()
    with pytest.raises(ValueError, match=r"--seed must be from 0 to 2\*\*63 - 1, got 9223372036854775808"):
        DemoSettings(seed=MAX_SEED + 1).validate()
    with pytest.raises(ValueError, match="--threads must be from 1 to 4096, got 99999999999"):
        DemoSettings(threads=99999999999).validate()
    with pytest.raises(ValueError, match="threads must be from 1 to 4096"), reproducible(99999999999):
        pass
    with pytest.raises(ValueError, match="--threads.* up to 4096, got 99999999999"):
        use_serving_threads(99999999999)


def test_train_refuses_a_seed_past_the_bound_when_parsed_and_workers_past_it_from_a_config_file(capsys):
    from raml.cli.common import MAX_WORKERS
    from raml.engine.config import MAX_WORKERS as ENGINE_MAX_WORKERS
    from raml.engine.config import TrainConfig

    line = _refusal(["train", "--seed", str(2**63)], capsys)
    assert f"argument --seed: expected an integer from 0 to 2**63 - 1, got {2**63}" in line
    assert ENGINE_MAX_WORKERS == MAX_WORKERS
    with pytest.raises(ValueError, match="--workers must be at most 256 data loader processes, got 257"):
        TrainConfig(student="resnet18", mode="sym", workers=257).validate()


def test_every_benchmarks_threads_workers_and_seed_are_bounded_when_parsed(capsys):
    """The benchmarks' --threads overflowed inside torch ('Overflow when unpacking long', no flag named) and
    their --workers started as many processes as asked: each is refused when parsed, naming the flag."""
    from raml.bench.parsers import PARSERS

    huge = {"threads": "99999999999", "workers": "99999999999", "seed": str(2**63)}
    checked = set()
    for name, build in PARSERS.items():
        parser = build()
        for action in parser._actions:
            if action.dest in huge and action.option_strings:
                with pytest.raises(SystemExit) as stop:
                    parser.parse_known_args([action.option_strings[-1], huge[action.dest]])
                assert stop.value.code == 2
                assert "expected an integer from" in capsys.readouterr().err, (name, action.dest)
                checked.add((name, action.dest))
    assert {("extract", "threads"), ("extract", "workers"), ("pipeline", "workers"), ("eval", "seed")} <= checked
