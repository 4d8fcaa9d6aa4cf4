"""Mutation testing of the core modules, each against its own test files (mutmut; docs/benchmarks.md).

mutmut edits one thing at a time in a copy of the code (a ``+`` becomes ``-``, a ``<`` a ``<=``, a constant
changes...) and runs the tests that call the edited function; a mutant the tests do not notice "survives".
Each survivor is a test to write or dead code to remove.

Each target runs in its own work folder, ``mutants-work/<target>/`` (git-ignored), holding a copy of
``src/``, ``tests/`` and a ``pyproject.toml`` whose ``[tool.mutmut]`` names only that target's modules and
test files. mutmut keeps its results there, so a second run only re-tests what changed.

    python scripts/mutate.py                       # every target (long: tens of minutes on 2 cores)
    python scripts/mutate.py metrics losses        # some targets
    python scripts/mutate.py metrics --survivors   # also print each survivor's diff
    python scripts/mutate.py metrics --retest-survivors  # after writing tests: re-test the last survivors only
                                                   # (and the mutants no test reached)
    python scripts/mutate.py methods --retest NAME...  # re-test the named mutants only
    python scripts/mutate.py --list                # the targets, their modules and test files
    make mutate                                    # = python scripts/mutate.py

It prints one line per target (killed / total, the score, the survivors' names) and writes
``mutants-work/<target>/score.json``. Not part of ``make test``: run it before closing an issue that changes
these modules. Run it with the project's interpreter (``.venv/bin/python``); the ``PYTHONPATH`` of the
calling shell is dropped, so that the mutated copy, not the checkout, is what the tests import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants-work"
#: read by some of the targets' tests (test_methods.py checks README.md and docs/methods.md against the registry);
#: copied beside ``src/`` and ``tests/`` into the work folder and from there into mutmut's ``mutants/``
DOCUMENTS: tuple[str, ...] = ("README.md", "docs")


@dataclass(frozen=True)
class Target:
    """One group of modules to mutate and the test files that own them."""

    modules: tuple[str, ...]  # globs relative to the checkout, as mutmut's ``only_mutate`` reads them
    tests: tuple[str, ...]
    #: tests of those files left out of the mutation runs (``--deselect``): tests of another module that happen
    #: to live in the same file and call everything (each survivor would pay for them)
    deselect: tuple[str, ...] = ()


TARGETS: dict[str, Target] = {
    "losses": Target(("src/raml/losses/*",), ("tests/losses/",)),
    "metrics": Target(
        ("src/raml/retrieval/metrics.py",),
        ("tests/retrieval/test_metrics.py", "tests/retrieval/test_metrics_mutants.py"),
    ),
    "methods": Target(
        ("src/raml/engine/methods/*",),
        ("tests/engine/test_methods.py", "tests/engine/test_methods_mutants.py", "tests/engine/test_ugd_method.py"),
        # raml bench methods' own test: it trains a teacher and every row (24 s of an idle core, the slowest test
        # of the file by far) and so covers every method function; the methods are tested on their own beside it
        deselect=("tests/engine/test_methods.py::test_bench_methods_writes_every_row_and_reuses_its_teacher",),
    ),
    "views": Target(("src/raml/data/views.py",), ("tests/data/test_views.py", "tests/data/test_views_mutants.py")),
}

_MUTMUT_SECTION = re.compile(r"^\[tool\.mutmut\]\n(?:(?!^\[).*\n?)*", re.MULTILINE)


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def target_pyproject(
    pyproject: str, target: Target, timeout_constant: float = 10.0, timeout_multiplier: float = 15.0
) -> str:
    """``pyproject`` with its ``[tool.mutmut]`` section replaced by one for ``target`` alone.

    mutmut stops a mutant's test run after ``(t + timeout_constant) * timeout_multiplier`` seconds of wall
    time, ``t`` being the duration of the tests that cover it measured in the clean run; a mutant stopped
    there counts as a timeout. On a loaded machine a plain slow run would pass for one, so the constant is
    generous (mutmut's default is 1 s).

    Args:
        pyproject: the checkout's pyproject.toml text (must hold a ``[tool.mutmut]`` section).
        target: the modules to mutate and their test files.
        timeout_constant: seconds added to every mutant's measured test time before the multiplier.
        timeout_multiplier: factor over the measured test time.

    Returns:
        The text for the work folder's pyproject.toml.
    """
    if not _MUTMUT_SECTION.search(pyproject):
        raise ValueError("pyproject.toml has no [tool.mutmut] section; restore it from git before running this script")
    deselect = [arg for test in target.deselect for arg in ("--deselect", test)]
    section = (
        "[tool.mutmut]\n"
        'source_paths = ["src/"]\n'
        f"only_mutate = {_toml_list(target.modules)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(target.tests)}\n"
        f"pytest_add_cli_args = {_toml_list(['-p', 'no:cacheprovider', '-x', '-q', *deselect])}\n"
        f"also_copy = {_toml_list(DOCUMENTS)}\n"
        f"timeout_constant = {float(timeout_constant)}\n"
        f"timeout_multiplier = {float(timeout_multiplier)}\n\n"
    )
    return _MUTMUT_SECTION.sub(lambda _: section, pyproject, count=1)


def prepare(name: str, target: Target, timeout_constant: float = 10.0, timeout_multiplier: float = 15.0) -> Path:
    """Create or refresh ``mutants-work/<name>/`` from the checkout; returns the folder."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    for folder in ("src", "tests"):
        if (work / folder).exists():
            shutil.rmtree(work / folder)
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for document in DOCUMENTS:
        if (ROOT / document).is_dir():
            shutil.rmtree(work / document, ignore_errors=True)
            shutil.copytree(ROOT / document, work / document)
        else:
            shutil.copy2(ROOT / document, work / document)
    pyproject = target_pyproject((ROOT / "pyproject.toml").read_text(), target, timeout_constant, timeout_multiplier)
    (work / "pyproject.toml").write_text(pyproject)
    return work


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def mutmut(work: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m mutmut <args>`` in ``work`` with this interpreter."""
    cmd = [sys.executable, "-m", "mutmut", *args]
    return subprocess.run(cmd, cwd=work, env=_env(), text=True, capture_output=capture, check=False)


def survivors(work: Path, untested: bool = False) -> list[str]:
    """Names of the surviving mutants (and, with ``untested``, of those no test reached or a stopped run did not
    reach), from ``mutmut results``."""
    out = mutmut(work, "results", "--all", "true", capture=True).stdout
    verdicts = (": survived", ": no tests", ": not checked") if untested else (": survived",)
    return [line.split(":")[0].strip() for line in out.splitlines() if line.strip().endswith(verdicts)]


def score(work: Path) -> dict:
    """mutmut's counts for the work folder, plus ``score`` = killed / (total - skipped) in percent."""
    result = mutmut(work, "export-cicd-stats", capture=True)
    stats_path = work / "mutants" / "mutmut-cicd-stats.json"
    if result.returncode != 0 or not stats_path.exists():
        raise RuntimeError(f"mutmut export-cicd-stats failed in {work}:\n{result.stdout}\n{result.stderr}")
    stats = json.loads(stats_path.read_text())
    # a mutant that times out or crashes the test run is caught by the tests too
    caught = stats["killed"] + stats["timeout"] + stats["segfault"]
    judged = stats["total"] - stats["skipped"]
    stats["score"] = round(100.0 * caught / judged, 1) if judged else 0.0
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all of them)")
    parser.add_argument("--survivors", action="store_true", help="print each surviving mutant's diff")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument(
        "--timeout-constant",
        type=float,
        default=10.0,
        help="seconds added to a mutant's measured test time before --timeout-multiplier (default 10; mutmut's 1 "
        "turns slow runs on a loaded machine into timeouts)",
    )
    parser.add_argument("--timeout-multiplier", type=float, default=15.0, help="mutmut's timeout factor (default 15)")
    parser.add_argument(
        "--retest-survivors",
        action="store_true",
        help="re-test only the survivors and the untested mutants of the previous run in the work folder (after "
        "writing tests for them; also those a stopped run did not reach); the other verdicts are kept, so the "
        "score stays that of every mutant",
    )
    parser.add_argument(
        "--retest",
        nargs="+",
        metavar="MUTANT",
        help="re-test only these mutants (names as `mutmut results` prints them) of the one target given, e.g. the "
        "survivors a new test is written for; the other verdicts are kept",
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:8s} {' '.join(t.modules)}  <-  {' '.join(t.tests)}")
            for test in t.deselect:
                print(f"{'':8s} (without {test})")
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; expected some of {', '.join(TARGETS)}")
    if args.retest and len(args.targets) != 1:
        parser.error("--retest needs exactly one target (the one the mutants belong to)")
    failed = False
    for name in args.targets or list(TARGETS):
        previous = (
            survivors(WORK / name, untested=True)
            if args.retest_survivors and (WORK / name / "mutants").is_dir()
            else []
        )
        if args.retest:
            previous = list(args.retest)
        if args.retest_survivors and not previous:
            print(f"{name}: no survivors of a previous run in {WORK / name}; nothing to re-test")
            continue
        work = prepare(name, TARGETS[name], args.timeout_constant, args.timeout_multiplier)
        start = time.monotonic()
        run = mutmut(work, "run", "--max-children", str(args.max_children), *previous)
        minutes = (time.monotonic() - start) / 60
        if run.returncode != 0:
            print(f"{name}: mutmut run exited with {run.returncode}; see the output above", file=sys.stderr)
            failed = True
            continue
        stats = score(work)
        alive = survivors(work)
        stats.update(target=name, minutes=round(minutes, 1), survivors=alive, retested=len(previous))
        (work / "score.json").write_text(json.dumps(stats, indent=2) + "\n")
        caught = stats["killed"] + stats["timeout"] + stats["segfault"]
        print(
            f"{name}: {caught} of {stats['total'] - stats['skipped']} mutants killed ({stats['score']}%; "
            f"{stats['timeout']} of them by a timeout, {stats['segfault']} by a crash), {stats['survived']} survived, "
            f"{stats['no_tests']} untested, in {minutes:.1f} min"
            + (f" (re-tested the {len(previous)} previous survivors)" if previous else "")
        )
        for mutant in alive:
            print(f"  survived: {mutant}")
            if args.survivors:
                print(mutmut(work, "show", mutant, capture=True).stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
