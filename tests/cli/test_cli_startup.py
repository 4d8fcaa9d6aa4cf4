"""``raml --help``, ``raml <command> --help`` and argparse's usage errors import only what argparse needs: no torch,
torchvision, timm, numpy, scipy, faiss, onnx, onnxruntime, ray or uvicorn (each command imports them in its run
function). That took 2-4 s a help before; the names the parsers offer from those modules' registries are spelled
in :mod:`raml.cli.choices`, checked here against the registries. The same for ``raml bench NAME -h`` and a
benchmark's usage errors: its parser is :mod:`raml.bench.parsers`' (defaults spelled there, checked here too)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import raml
from raml.bench import parsers
from raml.cli import choices

SRC = Path(raml.__file__).resolve().parent.parent
HEAVY = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scipy",
    "numba",
    "PIL",
    "faiss",
    "onnx",
    "onnxruntime",
    "ray",
    "uvicorn",
    "fastapi",
    "starlette",
)

# Run in a fresh interpreter: records, for each heavy package, the raml frames of the stack that first imported it;
# then prints every help (the top-level parser, each command, each sub-command such as `data synth`) and makes
# usage errors, each ending in SystemExit; then `raml bench NAME -h` and a bad flag of each benchmark (its own parser,
# raml.bench.parsers), recording whether the benchmark's module was imported.
_SCRIPT = """
import contextlib, io, json, sys, traceback

HEAVY = set(sys.argv[1].split(","))
leaks = {}


class Recorder:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in leaks:
            leaks[top] = [
                f"{frame.filename}:{frame.lineno} {frame.line}"
                for frame in traceback.extract_stack()
                if "/raml/" in frame.filename
            ]
        return None


sys.meta_path.insert(0, Recorder())

from raml.__main__ import run  # noqa: E402,F401  the console script's module
from raml.cli.main import build_parser, main  # noqa: E402

runs = []


def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = "returned"
        except SystemExit as exit:
            code = exit.code
    runs.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})


def commands(parser, prefix):
    for action in parser._actions:
        if isinstance(action, __import__("argparse")._SubParsersAction):
            for name in list(action.choices):
                yield [*prefix, name]
                yield from commands(action.choices[name], [*prefix, name])


call(["--help"])
for argv in list(commands(build_parser(), [])):
    call([*argv, "--help"])
call(["train", "--epochs", "abc"])
call(["test", "--no-such-flag"])
call(["extract", "--cpu-runtime", "nope", "--multiscale", "[1, 1/2]"])
from raml.cli.bench import BENCHMARKS  # noqa: E402

for benchmark in BENCHMARKS:
    call(["bench", benchmark, "-h"])
    call(["bench", benchmark, "--no-such-flag"])
modules = sorted(module for module, _ in BENCHMARKS.values() if module in sys.modules)
print(json.dumps({"leaks": leaks, "runs": runs, "bench_modules": modules}))
"""


def test_help_and_usage_errors_import_no_heavy_package():
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, ",".join(HEAVY)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    leaked = "\n".join(f"{name} imported through:\n  " + "\n  ".join(stack) for name, stack in seen["leaks"].items())
    assert not seen["leaks"], f"building the parsers or printing help imported heavy packages:\n{leaked}"

    by_argv = {" ".join(run["argv"]): run for run in seen["runs"]}
    from raml.cli.main import COMMANDS

    assert "usage: raml [-h]" in by_argv["--help"]["stdout"] and by_argv["--help"]["code"] == 0
    for name in [*COMMANDS, "data synth", "data download"]:
        run = by_argv[f"{name} --help"]
        assert run["code"] == 0 and run["stdout"].startswith(f"usage: raml {name} "), name
    for argv, message in (
        ("train --epochs abc", "argument --epochs: invalid int value: 'abc'"),
        ("test --no-such-flag", "one of the arguments -spath/--student-path -s/--student --student-onnx is required"),
        ("extract --cpu-runtime nope --multiscale [1, 1/2]", "argument --cpu-runtime: invalid choice: 'nope'"),
    ):
        assert by_argv[argv]["code"] == 2 and message in by_argv[argv]["stderr"], by_argv[argv]
    assert not seen["bench_modules"], "raml bench NAME -h or a usage error imported the benchmark's module"
    from raml.cli.bench import BENCHMARKS

    for name in BENCHMARKS:
        run = by_argv[f"bench {name} -h"]
        assert run["code"] == 0 and run["stdout"].startswith(f"usage: raml bench {name} "), run
        run = by_argv[f"bench {name} --no-such-flag"]
        assert run["code"] == 2 and run["stderr"].startswith(f"usage: raml bench {name} "), run
        assert "unrecognized arguments: --no-such-flag" in run["stderr"] or "required" in run["stderr"], run


@pytest.mark.parametrize("name", sorted(choices.SOURCES))
def test_each_name_offered_by_a_parser_is_its_registrys(name):
    module, attribute = choices.SOURCES[name]
    ours = getattr(choices, name)
    if attribute.endswith("()"):  # a settings class: its default instance, field by field
        instance = getattr(importlib.import_module(module), attribute[:-2])()
        assert ours == {field.name: getattr(instance, field.name) for field in dataclasses.fields(instance)}
        return
    theirs = getattr(importlib.import_module(module), attribute)
    if isinstance(theirs, dict):  # a registry: its names, in its order (POOLINGS: sorted, as the parser offers them)
        expected = tuple(sorted(theirs)) if name == "POOLING_NAMES" else tuple(theirs)
        assert ours == expected
    else:
        assert ours == theirs and type(ours) is type(theirs)


@pytest.mark.parametrize("name", sorted(parsers.SOURCES))
def test_each_default_a_bench_parser_spells_is_its_modules(name):
    module, attribute = parsers.SOURCES[name]
    ours = getattr(parsers, name)
    if attribute.endswith("()"):  # a settings class: its default instance, field by field (but the demo's)
        instance = getattr(importlib.import_module(module), attribute[:-2])()
        fields = [field.name for field in dataclasses.fields(instance) if field.name != "demo"]
        assert ours == {field: getattr(instance, field) for field in fields}
        return
    if attribute.endswith("().threads"):
        assert ours == getattr(importlib.import_module(module), attribute.split("(")[0])().threads
        return
    theirs = getattr(importlib.import_module(module), attribute)
    assert ours == tuple(theirs)


def test_each_benchmark_has_a_light_parser_that_its_main_uses(monkeypatch):
    from raml.cli.bench import BENCHMARKS

    assert list(parsers.PARSERS) == list(BENCHMARKS)

    class Used(Exception):
        pass

    def used() -> None:
        raise Used

    for name, build in parsers.PARSERS.items():
        assert build().prog == f"raml bench {name}"
        monkeypatch.setattr(parsers, build.__name__, used)
        with pytest.raises(Used):
            importlib.import_module(BENCHMARKS[name][0]).main(["-h"])


def test_the_scales_and_runtimes_of_the_extractor_are_the_light_modules():
    from raml.retrieval import extract, scales

    assert extract.parse_scales is scales.parse_scales and extract.CPU_RUNTIMES is scales.CPU_RUNTIMES
    assert extract.SINGLE_SCALE is scales.SINGLE_SCALE
