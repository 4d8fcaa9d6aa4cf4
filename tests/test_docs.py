"""The docs name only flags that exist, and the README links the fidelity table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raml.bench.parsers import PARSERS
from raml.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]


def _options() -> set[str]:
    parsers = list(build_parser()._subparsers._group_actions[0].choices.values())
    for parser in parsers:  # nested sub-commands too (`raml data download`)
        if parser._subparsers is not None:
            parsers += parser._subparsers._group_actions[0].choices.values()
    options = {option for parser in parsers for option in parser._option_string_actions}
    # `raml bench <name>` hands its arguments to the benchmark's own parser (raml.bench.parsers)
    for build in PARSERS.values():
        options |= set(build()._option_string_actions)
    return options


@pytest.mark.parametrize("doc", ["README.md", "docs/fidelity.md"])
def test_every_flag_the_docs_name_exists(doc):
    text = (REPO / doc).read_text()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", text))
    known = _options() | {"--nproc_per_node", "--nnodes", "--rdzv-endpoint", "--strip-components"}
    assert named, doc
    assert not named - known, f"{doc} names flags no command has: {sorted(named - known)}"


def test_fidelity_table_lists_every_reference_variant_flag():
    text = (REPO / "docs" / "fidelity.md").read_text()
    for flag in (
        "--select-on-val",
        "--pretrained-weights",
        "--group-lr-peaks",
        "--flush-accumulation",
        "--mixup-partner",
        "--search-objective",
    ):
        assert flag in text, flag
    assert "docs/fidelity.md" in (REPO / "README.md").read_text()


def test_the_readme_layout_names_existing_packages_and_every_benchmark():
    from raml.cli.bench import BENCHMARKS

    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout") :]
    block = block[block.index("```\nsrc/raml/") + 4 : block.index("```", block.index("```\nsrc/raml/") + 4)]
    entries = re.findall(r"^  ([a-z_]+(?:/|\.py))", block, flags=re.MULTILINE)
    assert len(entries) >= 9, entries
    missing = [entry for entry in entries if not (REPO / "src" / "raml" / entry).exists()]
    assert not missing, f"README's layout names {missing}, which src/raml does not have"
    packages = {p.name + "/" for p in (REPO / "src" / "raml").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(entries), f"packages missing from README's layout: {sorted(packages - set(entries))}"
    listed = re.search(r"raml bench ([a-z |\n]+)\)", block)
    assert listed is not None
    assert {name.strip() for name in listed.group(1).split("|")} == set(BENCHMARKS)
    for folder in ("methods/", "service/"):
        assert folder in block


def _load_mutate_script():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("mutate_script", REPO / "scripts" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_mutation_targets_cover_the_core_modules_and_the_docs_name_them():
    """scripts/mutate.py's targets are pyproject's [tool.mutmut] split by module; each target's work folder gets
    a pyproject naming only its own modules and tests; docs/benchmarks.md records a line for every target."""
    import tomllib

    script = _load_mutate_script()
    pyproject_text = (REPO / "pyproject.toml").read_text()
    config = tomllib.loads(pyproject_text)["tool"]["mutmut"]
    targets = script.TARGETS
    assert sorted(m for t in targets.values() for m in t.modules) == sorted(config["only_mutate"])
    assert sorted(f for t in targets.values() for f in t.tests) == sorted(config["pytest_add_cli_args_test_selection"])
    for target in targets.values():
        assert all(list(REPO.glob(module)) for module in target.modules)
        assert all((REPO / test).exists() for test in target.tests)
    rewritten = tomllib.loads(script.target_pyproject(pyproject_text, targets["metrics"]))
    assert rewritten["tool"]["mutmut"]["only_mutate"] == ["src/raml/retrieval/metrics.py"]
    assert rewritten["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == list(targets["metrics"].tests)
    assert rewritten["tool"]["mutmut"]["timeout_constant"] == 10.0  # generous: load must not pass for a timeout
    assert rewritten["tool"]["pytest"] == tomllib.loads(pyproject_text)["tool"]["pytest"]  # the rest is kept
    with pytest.raises(ValueError, match=r"no \[tool.mutmut\] section"):
        script.target_pyproject("[project]\nname = 'x'\n", targets["metrics"])
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text[text.index("## Mutation testing") :]
    for name in targets:
        assert f"| {name} |" in section, name


def test_the_readme_check_data_example_checks_the_split_raml_train_reads():
    """`raml train -d cub` trains on cub-trainval: a bare `cub` would leave its val classes unchecked."""
    text = (REPO / "README.md").read_text()
    examples = re.findall(r"raml check-data [^`]*--datasets (\S+)", text)
    assert examples, "README shows no raml check-data example"
    for datasets in examples:
        names = datasets.split(",")
        assert "cub-trainval" in names and "cub" not in names, datasets


def test_every_test_the_docs_name_exists():
    """A test cited in the docs (as the one that catches a mutant, or checks a claim) is a test function or file of
    tests/, or one of timm's ``test_*`` networks; a renamed test must not leave the docs pointing at nothing."""
    import timm

    defined: set[str] = set()
    for path in (REPO / "tests").rglob("*.py"):
        defined.add(path.stem)
        defined |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.MULTILINE))
    defined |= set(timm.list_models("test_*"))
    missing = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named = set(re.findall(r"(?<![\w.-])(test_\w+)", doc.read_text()))
        if named - defined:
            missing[doc.name] = sorted(named - defined)
    assert not missing, f"the docs name tests that do not exist: {missing}"
