"""The docs name only flags that exist, and the README links the fidelity table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raml.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]


def _options() -> set[str]:
    parsers = list(build_parser()._subparsers._group_actions[0].choices.values())
    for parser in parsers:  # nested sub-commands too (`raml data download`)
        if parser._subparsers is not None:
            parsers += parser._subparsers._group_actions[0].choices.values()
    options = {option for parser in parsers for option in parser._option_string_actions}
    # `raml bench <name>` hands its arguments to the benchmark's own parser, built in its main()
    for source in (REPO / "src" / "raml" / "bench").glob("*.py"):
        options |= set(re.findall(r'add_argument\(\s*"(--[^"]+)"', source.read_text()))
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
    listed = re.search(r"raml bench ([a-z |]+)\)", block)
    assert listed is not None
    assert {name.strip() for name in listed.group(1).split("|")} == set(BENCHMARKS)
    for folder in ("methods/", "service/"):
        assert folder in block
