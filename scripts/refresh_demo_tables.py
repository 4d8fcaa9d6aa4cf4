"""Copy a ``raml demo`` run's results into README.md and docs/demo.md.

Each file holds one block between ``<!-- demo:start -->`` and ``<!-- demo:end -->``; this script rewrites
what is between the markers from the run's ``results.md`` and leaves every other byte alone:

- README.md: the table and the summary sentence under it;
- docs/demo.md: the same, then the run's dataset and software-stack paragraphs.

    python scripts/refresh_demo_tables.py                  # from demo/results.md (what `make demo` wrote)
    python scripts/refresh_demo_tables.py --check          # exit 1 if a block differs from the results
    python scripts/refresh_demo_tables.py --results other/results.md --root path/to/checkout
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from raml.demo import parse_results_table

START = "<!-- demo:start -->"
END = "<!-- demo:end -->"
WIDTH = 110  # the documents' line width; the table's lines stay whole
ROOT = Path(__file__).resolve().parent.parent
#: file (relative to the checkout) -> whether its block also shows the run's dataset and stack paragraphs
TARGETS = {"README.md": False, "docs/demo.md": True}


@dataclass(frozen=True)
class DemoResults:
    """The parts of a ``results.md``: the table, the summary sentence, the paragraphs about the run."""

    table: str
    summary: str
    details: tuple[str, ...]


def read_results(text: str) -> DemoResults:
    """Split a ``results.md`` (title, table, summary, details...) into its parts.

    Raises:
        ValueError: the text is not laid out as ``raml demo`` writes it.
    """
    paragraphs = [p.strip() for p in text.strip().split("\n\n")]
    if len(paragraphs) < 3 or not paragraphs[0].startswith("# "):
        raise ValueError("Expected a title, a table and a summary sentence separated by blank lines.")
    table = paragraphs[1]
    rows = parse_results_table(table)  # raises if the table is not the demo's
    if len(rows) != len(table.splitlines()) - 2:
        raise ValueError("The demo table has lines that are not rows.")
    return DemoResults(table, paragraphs[2], tuple(paragraphs[3:]))


def render_block(results: DemoResults, details: bool) -> str:
    """What goes between the markers (without them), wrapped at ``WIDTH`` except the table."""
    parts = [results.table, results.summary, *(results.details if details else ())]
    return "\n\n".join([parts[0], *(_wrap(p) for p in parts[1:])])


def _wrap(paragraph: str) -> str:
    return textwrap.fill(" ".join(paragraph.split()), WIDTH, break_long_words=False, break_on_hyphens=False)


def split_block(text: str) -> tuple[str, str, str]:
    """``text`` -> (up to and including the start marker's line, the block, from the end marker's line on).

    Markers count only on lines of their own, so a document may mention them in its prose.

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"Expected exactly one line {START} followed by exactly one line {END}.")
    start, end = starts[0], ends[0]
    return "".join(lines[: start + 1]), "".join(lines[start + 1 : end]).removesuffix("\n"), "".join(lines[end:])


def replace_block(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    head, _, tail = split_block(text)
    return f"{head}{block}\n{tail}"


def refresh(root: Path, results: DemoResults, check: bool = False) -> list[Path]:
    """Rewrite the blocks of ``TARGETS`` under ``root`` (only ``check`` them if asked); returns the changed files."""
    changed = []
    for name, details in TARGETS.items():
        path = root / name
        text = path.read_text(encoding="utf-8")
        new = replace_block(text, render_block(results, details))
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "demo" / "results.md", help="a run's results.md")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout holding README.md and docs/")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = parser.parse_args(argv)
    try:
        results = read_results(args.results.read_text(encoding="utf-8"))
        changed = refresh(args.root, results, check=args.check)
    except (OSError, ValueError) as error:
        print(f"refresh_demo_tables: error: {error}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"{'out of date' if args.check else 'rewrote'}: {path}")
    if not changed:
        print(f"up to date with {args.results}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
