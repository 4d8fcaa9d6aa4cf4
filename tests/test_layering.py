"""The layering of README's Layout, written down in code: a package imports only from its own layer or
lower ones, and no two modules import each other (directly or through others).

Layers, lowest first (README, "Layout"): the shared foundation (``raml/__init__``, ``utils``, ``errors``, ``locking``,
``distributed``); ``data`` (splits, images; no network) beside ``models`` (the network; no data); ``losses``;
``retrieval`` (extraction, metrics, evaluation, per-size BatchNorm re-estimation); ``engine`` (training,
which evaluates); ``deploy``; ``entry`` (helpers of every entry point); the applications ``demo``,
``reproduce`` and ``bench``; and ``cli`` (argument parsing only) with ``__main__`` on top.
Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[set[str]] = [
    {"raml", "utils", "errors", "distributed", "locking"},
    {"data", "models"},
    {"losses"},
    {"retrieval"},
    {"engine"},
    {"deploy"},
    {"entry"},
    {"demo", "reproduce", "bench"},
    {"cli", "__main__"},
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
#: Packages of one layer that must not know each other: the data knows no network, the network no data (a
#: procedure over data, such as BatchNorm re-estimation, belongs with extraction in retrieval/).
INDEPENDENT: set[frozenset[str]] = {frozenset({"data", "models"})}

#: Known exceptions, each with its reason. Keep this short.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layering unit of a module: ``raml.models.network`` -> ``models``, ``raml.utils`` -> ``utils``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def raml_imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """The ``raml`` modules that ``source`` (the text of ``module``) imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "raml")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "raml":
                found.add(target)
    return found


def layering_violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import from a lower layer to a higher one, as readable lines.

    Args:
        sources: ``module name -> (source text, is a package __init__)``.
    """
    problems = []
    for module, (source, is_package) in sorted(sources.items()):
        unit = _unit(module)
        if unit not in LAYER_OF:
            problems.append(f"{module}: package {unit!r} has no layer; add it to LAYERS (and README's Layout)")
            continue
        for target in sorted(raml_imports(source, module, is_package)):
            target_unit = _unit(target)
            if target_unit not in LAYER_OF:
                problems.append(f"{module} imports {target}, whose package {target_unit!r} has no layer")
            elif LAYER_OF[target_unit] > LAYER_OF[unit] and (module, target) not in ALLOWED_UPWARD:
                problems.append(
                    f"{module} (layer {LAYER_OF[unit]}, {unit}) imports {target} (layer {LAYER_OF[target_unit]}, "
                    f"{target_unit}): a lower layer must not depend on a higher one"
                )
            elif frozenset({unit, target_unit}) in INDEPENDENT:
                problems.append(f"{module} imports {target}: {unit} and {target_unit} must not know each other")
    return problems


def import_cycles(sources: dict[str, tuple[str, bool]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of more than one module).

    An import of ``a.b.c`` counts as an import of the module ``a.b.c`` when it exists, else of ``a.b``
    (``from raml.models.network import X``); a package's ``__init__`` importing its own submodules is the
    usual re-export and is left out.
    """
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, (source, is_package) in sources.items():
        for target in raml_imports(source, module, is_package):
            while target and target not in sources:
                target = target.rpartition(".")[0]
            if not target or target == module:
                continue
            if is_package and target.startswith(module + "."):
                continue
            if sources[target][1] and module.startswith(target + "."):
                continue  # a submodule importing its own package's re-exports
            graph[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _sources() -> dict[str, tuple[str, bool]]:
    return {
        _module_name(path, SRC): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted((SRC / "raml").rglob("*.py"))
    }


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    problems = layering_violations(_sources())
    assert not problems, "\n".join(problems)


def test_every_allowed_exception_is_still_needed() -> None:
    sources = _sources()
    for module, target in ALLOWED_UPWARD:
        source, is_package = sources[module]
        assert target in raml_imports(source, module, is_package), (module, target)


def test_models_do_not_import_each_other_in_a_cycle() -> None:
    cycles = [c for c in import_cycles(_sources()) if any(m.startswith("raml.models.") for m in c)]
    assert not cycles, f"modules importing each other: {cycles}"


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("raml.data.download", "from raml.models.backbones import DownloadError", "must not know each other"),
        ("raml.models.switchable_bn", "def f():\n    from raml.data.images import EvalTransform\n", "must not know"),
        ("raml.models.x", "def f():\n    from raml.retrieval.extract import embed_batch\n", "imports raml.retrieval"),
        ("raml.bench.eval", "from raml.cli.common import positive_int", "(layer 7, bench) imports raml.cli.common"),
        ("raml.bench.eval", "from raml.entry import positive_int", ""),
        ("raml.data.sizes", "from ..models import network", "imports raml.models"),
        ("raml.newpkg.x", "import raml.utils", "has no layer"),
    ],
)
def test_the_checker_finds_upward_imports(module: str, source: str, expected: str) -> None:
    problems = layering_violations({module: (source, False)})
    if expected:
        assert len(problems) == 1 and expected in problems[0], problems
    else:
        assert problems == []


def test_the_checker_finds_cycles_through_function_local_imports() -> None:
    sources = {
        "raml.models": ("from raml.models.a import f\n", True),
        "raml.models.a": ("def f():\n    from raml.models.b import g\n", False),
        "raml.models.b": ("from raml.models.a import f\n", False),
        "raml.models.c": ("from raml.models import f\n", False),
    }
    assert import_cycles(sources) == [["raml.models.a", "raml.models.b"]]
