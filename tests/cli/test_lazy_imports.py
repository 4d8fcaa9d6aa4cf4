"""What a process pays in imports before it works: ``raml``'s commands are built from their own module only when
parsed (``raml.cli.main.COMMANDS``), and the packages ``raml.data``, ``raml.models``, ``raml.deploy`` and
``raml.retrieval`` import a submodule when one of its names is first used (module ``__getattr__``). Every child
process a test or a benchmark starts (``raml serve``, ``raml index``, a torchrun rank) pays 3-7 CPU s of imports
otherwise; ``raml --help`` paid ~4 s for torch, torchvision, timm and numba before this."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import raml
from raml.cli import main as cli_main

SRC = Path(raml.__file__).resolve().parent.parent
LAZY_PACKAGES = ("raml.data", "raml.models", "raml.deploy", "raml.retrieval")
HEAVY = ("torch", "torchvision", "timm", "numba", "scipy")


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its ``sys.modules`` names (and stdout) after it ran."""
    script = (
        "import contextlib, io, json, sys\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    {code}\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'stdout': out.getvalue()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _help(argv: list[str]) -> str:
    return f"from raml.cli.main import main\n    try: main({argv!r})\n    except SystemExit: pass"


def test_raml_help_lists_every_command_without_importing_one():
    seen = _modules_after(_help(["--help"]))
    # raml.cli.choices: the registries' names (the --mode names of the train line), no command's module
    light = {"raml.cli.main", "raml.cli.choices"}
    assert not [name for name in seen["modules"] if name.startswith("raml.cli.") and name not in light]
    assert not [name for name in HEAVY if name in seen["modules"]]
    for name, (_, _, line) in cli_main.COMMANDS.items():
        assert name in seen["stdout"] and line.split()[0] in seen["stdout"]


def test_a_command_imports_its_own_module_only():
    seen = _modules_after(_help(["bench", "--help"]))
    assert "raml.cli.bench" in seen["modules"] and "usage: raml bench" in seen["stdout"]
    others = {f"raml.cli.{module}" for module, _, _ in cli_main.COMMANDS.values()} - {"raml.cli.bench"}
    assert not others & set(seen["modules"])
    assert not [name for name in HEAVY if name in seen["modules"]]


def test_every_listed_command_builds_its_parser():
    choices = cli_main.build_parser()._subparsers._group_actions[0].choices
    assert list(choices) == list(cli_main.COMMANDS)
    for name, parser in choices.items():
        assert parser.prog == f"raml {name}"
        assert callable(parser.get_default("func")) or parser._subparsers is not None, name  # data: synth, ...
    # the parse itself builds the command it needs (the lookup argparse makes), nothing else
    args = cli_main.build_parser().parse_args(["bench", "eval", "--quick"])
    assert args.command == "bench" and args.benchmark == "eval" and args.rest == ["--quick"]


def test_the_bench_line_names_every_benchmark():
    from raml.cli.bench import BENCHMARKS

    line = cli_main.COMMANDS["bench"][2]
    assert line == "benchmarks (" + ", ".join(BENCHMARKS) + ")"


def test_a_command_not_listed_in_commands_is_refused():
    parser = cli_main.build_parser()
    subparsers = parser._subparsers._group_actions[0]
    with pytest.raises(ValueError, match="not listed in raml.cli.main.COMMANDS"):
        subparsers.add_parser("unlisted")


def test_user_errors_are_those_of_the_loaded_modules(capsys, monkeypatch):
    from raml.data.images import ImageLoadError  # a RuntimeError: a user error only by being listed

    assert issubclass(ImageLoadError, cli_main._user_errors())

    def fail(args):
        raise ImageLoadError("bad image")

    parser = cli_main.build_parser()
    parser._subparsers._group_actions[0].choices["bench"].set_defaults(func=fail)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    assert cli_main.main(["bench", "eval"]) == 2
    assert "raml bench: error: bad image" in capsys.readouterr().err
    # anything else is a bug: its traceback
    parser._subparsers._group_actions[0].choices["bench"].set_defaults(func=lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli_main.main(["bench", "eval"])


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_package_names_are_those_of_its_modules(package):
    module = importlib.import_module(package)
    init = Path(module.__file__).read_text()
    declared = {}  # the TYPE_CHECKING imports: what type checkers and tests/test_layering.py read
    for node in ast.walk(ast.parse(init)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raml."):
            declared.update({alias.name: node.module for alias in node.names})
    assert declared == module._EXPORTS
    assert sorted(module.__all__) == sorted(module._EXPORTS)
    for name, home in module._EXPORTS.items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name)
        assert name in dir(module)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_a_light_submodule_does_not_import_its_siblings():
    # the index lock of a killed writer (tests/deploy/test_index_lock.py) and the dataset splits know no torch
    seen = _modules_after("import raml.deploy.lock, raml.data.splits")
    assert not [name for name in HEAVY if name in seen["modules"]]
    assert "raml.deploy.index" not in seen["modules"] and "raml.data.images" not in seen["modules"]


def test_no_module_imports_timm_at_import_time():
    """timm (~0.8 s to import here) is imported inside the functions that need it (raml.models.backbones), so a
    process that builds or loads a torchvision network (the paper's ResNets) never pays for it."""

    def run_at_import(node: ast.AST):  # every statement but those inside functions (class bodies run too)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield child
                yield from run_at_import(child)

    offenders = []
    for path in sorted((SRC / "raml").rglob("*.py")):
        for node in run_at_import(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "timm" or name.startswith("timm.") for name in names):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []
