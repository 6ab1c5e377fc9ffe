"""The package's layers: every module imports, no module imports from a layer above its own, and
no modules import each other in a circle.

Imports are read from the source (the AST, function-local imports included), so an upward import
or a circle cannot hide inside a function. The layers follow the picture in ARCHITECTURE.md: parts (backbones,
losses, data, heads, ...) below methods, below the workflows (train, eval, viz), below the front
doors (cli, estimator, demo, export, embed).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import dinokit

SRC = Path(dinokit.__file__).parent
PARTS = ("backbones", "losses", "data", "heads", "masking", "ema", "distributed", "seeding", "weights")
FRONT_DOORS = ("cli", "estimator", "demo", "export", "embed")
#: top-level package or module of dinokit -> the ones it must not import from
FORBIDDEN = {
    **{part: ("train", "methods", "eval", "viz", *FRONT_DOORS) for part in PARTS},
    "eval": ("train", "methods", *FRONT_DOORS),
    "viz": ("train", "methods", *FRONT_DOORS),
    "methods": ("train", "eval", "viz", *FRONT_DOORS),
}


def _modules() -> list[str]:
    return ["dinokit", *sorted(m.name for m in pkgutil.walk_packages([str(SRC)], prefix="dinokit."))]


def _layer(module: str) -> str:
    """``dinokit.data.multicrop`` -> ``data``; ``dinokit`` -> ``dinokit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _source(module: str) -> Path:
    path = SRC.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def dinokit_imports(source: str, modules: frozenset[str] | set[str] = frozenset()) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``dinokit`` import in ``source``, wherever it stands (``from a
    import b`` gives ``a.b`` when that is one of ``modules``, else ``a``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [node.module] + [m for m in subs if m in modules]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "dinokit" or n.startswith("dinokit.")]
    return found


def upward_imports(module: str, source: str) -> list[str]:
    """The imports of ``source`` (the text of ``module``) that reach a layer :data:`FORBIDDEN` to it."""
    banned = FORBIDDEN.get(_layer(module), ())
    return [f"{module}:{line} imports {target}" for line, target in dinokit_imports(source)
            if _layer(target) in banned]


def import_graph(modules: list[str]) -> dict[str, set[str]]:
    """``module -> the modules importing it runs`` (a module's own packages aside: importing
    ``a.b.c`` runs ``a`` and ``a.b`` first, which is no circle)."""
    known, graph = set(modules), {}
    for m in modules:
        targets = set()
        for _, t in dinokit_imports(_source(m).read_text(), known):
            parts = t.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[m] = {t for t in targets & known if t != m and not m.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w):], w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_every_module_imports():
    modules = _modules()
    assert {"dinokit.data.multicrop", "dinokit.train.loader", "dinokit.seeding"} <= set(modules)
    for name in modules:
        importlib.import_module(name)


def test_no_module_imports_from_a_layer_above_its_own():
    problems = [p for m in _modules() for p in upward_imports(m, _source(m).read_text())]
    assert not problems, "\n".join(problems)


def test_data_does_not_import_train():
    data = [m for m in _modules() if _layer(m) == "data"]
    assert "dinokit.data.streaming" in data
    for m in data:
        assert not [t for _, t in dinokit_imports(_source(m).read_text()) if _layer(t) == "train"], m


def test_no_modules_import_each_other_in_a_circle():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, " -> ".join(cycle)


def test_the_circle_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": set()}
    assert find_cycle(graph) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("source", [
    "from dinokit.train.loader import sample_seed\n",
    "def f():\n    from dinokit.train.loader import sample_seed\n",
    "import dinokit.train.loader\n",
])
def test_the_scan_sees_an_upward_import_wherever_it_stands(source):
    assert upward_imports("dinokit.data.streaming", source) == [
        f"dinokit.data.streaming:{source.count(chr(10))} imports dinokit.train.loader"]
