"""The import graph of `core/`, read with `ast` (no import is executed): no circle among its
modules (imports under TYPE_CHECKING count: a circle of names is a circle of design), and `core/`
never imports `api/` or `workers/`. Imports inside a function are left out: they are how a module
reaches an optional dependency (peft, sklearn) when asked, not part of its layering."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Modules imported at module level (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If | ast.Try):
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            nodes.extend(h for handler in getattr(node, "handlers", []) for h in handler.body)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def core_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = _top_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how a package exports them
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_core_has_no_import_circle():
    cycle = find_cycle(core_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_check_finds_a_circle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_never_imports_the_api_or_the_workers():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("api", "workers")]
    assert not offenders, offenders


def test_the_engine_imports_nothing_above_it():
    """core/engine/ is the bottom: it may import itself and core.errors, nothing else of Steer's."""
    graph = core_graph()
    offenders = [
        f"{module} imports {imported}"
        for module, imports in graph.items()
        if module.startswith("core.engine")
        for imported in imports
        if not imported.startswith("core.engine") and imported not in ("core", "core.errors")
    ]
    assert not offenders, offenders


def test_the_engine_check_finds_an_import_from_above():
    graph = {"core.engine.model": {"core.tuners.loop"}, "core.tuners.loop": {"core.engine.model"}}
    assert [m for m, imports in graph.items() if m.startswith("core.engine") and imports - {"core.errors"}]


def _method_names() -> set[str]:
    from core.tuners.registry import METHODS

    return set(METHODS)


def method_name_literals(tree: ast.Module, names: set[str]) -> list[int]:
    """Lines where a method's name is written as a string of its own, outside docstrings and
    f-strings' text (a name in prose is not a second list of methods)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
    ]


# Words that are also method names but mean something else where they are written: "auto" as a
# setting's value (device, dtype, blob store), "prompt" as a request's field and a state key, "population" as the
# shared control's name, "dpo" as an objective and as OpenAI's method type, "prefix" and "lora" as
# a training config's sub-config keys.
OTHER_MEANINGS = {
    "auto": {"core/config.py", "core/engine/model.py", "core/engine/precision.py", "core/service/hyperparameters.py"},
    "prompt": {"core/inference/requests.py", "core/tuners/prompt_tuning.py", "core/evaluation/controls.py"},
    "population": {"core/service/model_ids.py"},
    "dpo": {"core/tuners/preference.py", "core/service/hyperparameters.py"},
    "prefix": {"core/tuners/base.py"},
    "lora": {"core/tuners/base.py"},
}


def test_method_names_are_written_only_in_the_registry():
    names = _method_names()
    offenders = []
    for path in CORE.rglob("*.py"):
        relative = str(path.relative_to(ROOT))
        if relative == "core/tuners/registry.py":
            continue
        tree = ast.parse(path.read_text())
        for line in method_name_literals(tree, names):
            word = path.read_text().splitlines()[line - 1]
            if any(f'"{w}"' in word and relative in OTHER_MEANINGS.get(w, ()) for w in names):
                continue
            offenders.append(f"{relative}:{line}: {word.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_name_check_sees_a_literal():
    tree = ast.parse('"""A docstring naming lora."""\nMETHODS = ("prefix", "lora")\n')
    assert method_name_literals(tree, {"prefix", "lora"}) == [2, 2]
