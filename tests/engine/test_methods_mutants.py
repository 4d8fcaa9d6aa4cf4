"""Tests written for the survivors of mutation testing of raml.engine.methods (scripts/mutate.py methods).

Each test asserts behaviour against a plain computation written here, so that a one-line change of a method
(a mutant) that keeps the shapes but changes a number fails it.
"""

from __future__ import annotations

import torch

from raml.engine.methods import METHODS, method_help
from raml.engine.methods.coupled import BatchRelationMethod


def test_candidates_is_the_rows_outside_the_largest_group_plus_one() -> None:
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    # 6 rows; the largest image (1) has 3 views: a row of it relates to the 3 others and itself
    assert BatchRelationMethod.candidates(groups) == 4
    assert BatchRelationMethod.candidates(torch.tensor([0, 1, 2])) == 3


def test_help_lists_every_mode_with_its_summary_wrapped_at_the_width() -> None:
    text = method_help(width=60)
    lines = text.splitlines()
    assert lines[0] == "training methods (--mode NAME):"
    assert all(len(line) <= 60 for line in lines)
    # every line after the first is an entry's first line ("  name    summary...") or its continuation,
    # indented by 10 columns; without the white space, the entries follow one another in registry order
    assert all(line.startswith("  ") and (line[2] != " " or line.startswith(" " * 10)) for line in lines[1:])
    firsts = [line for line in lines[1:] if line[2] != " "]
    assert [line.split()[0] for line in firsts] == list(METHODS)
    assert all(line[:10] == f"  {name:<8}" and line[10] != " " for line, name in zip(firsts, METHODS))  # column 10
    squeezed = "".join(text.split())
    assert squeezed == "trainingmethods(--modeNAME):" + "".join(
        name + "".join(entry.summary.split()) for name, entry in METHODS.items()
    )
