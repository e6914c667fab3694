"""The layout is the architecture (docs/architecture.md): parts in subpackages, imports pointing one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "labelkit"

# Lower layers first; a part may import its own modules and parts of a lower layer, never a sibling or above.
LAYERS = [{"errors"}, {"_util"}, {"artefact", "solver"}, {"data"}, {"quality"}, {"training", "report"}, {"review"}]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 10


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def _exports(init: Path) -> dict[str, str]:
    """The lazily re-exported names of a package ``__init__`` and the module that defines each."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_EXPORTS":
            return ast.literal_eval(node.value)
    return {}


def _imports(name: str, path: Path, modules: dict[str, Path], written: bool = False) -> list[tuple[str, int]]:
    """Every labelkit module ``name`` imports, at module level or inside a function, with the line: the module
    that defines each imported name, or with ``written`` the module the import statement names."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("labelkit")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("labelkit"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # ``from . import remote``: the module itself
                    found.append((sub, node.lineno))
                elif written:
                    found.append((target, node.lineno))
                elif target in modules and modules[target].name == "__init__.py":
                    defined = _exports(modules[target]).get(alias.name)  # a re-exported name: where it lives
                    found.append((f"{target}{defined}" if defined else target, node.lineno))
                else:
                    found.append((target, node.lineno))
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _ in _imports(name, path, modules) if target in modules and target != name}
            for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
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
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_imports_point_down_the_layers():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        part = _part(name)
        if part not in RANK:
            continue  # labelkit/__init__.py and __main__.py sit above every part
        for target, line in _imports(name, path, modules):
            other = _part(target)
            if other is None or other == part:
                continue
            if other not in RANK or RANK[other] >= RANK[part]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({part}) imports {target} ({other})")
    assert wrong == []


def test_other_parts_are_used_through_their_public_names():
    modules = _modules()
    wrong = []
    files = [(name, path) for name, path in modules.items()] + [(f"labelkit.cli.{p.stem}", p)
                                                                 for p in sorted((ROOT / "cli").glob("*.py"))]
    for name, path in files:
        for target, line in _imports(name, path, modules, written=True):
            parts = target.split(".")
            private = [p for p in parts[2:] if p.startswith("_")]
            if private and _part(target) not in (_part(name), "_util"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert wrong == []


def test_every_part_is_a_package_with_its_layer():
    parts = {p.name for p in LIBRARY.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts == set(RANK) - {"errors"}
    flat = sorted(p.name for p in LIBRARY.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "errors.py"]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_modules_and_functions_stay_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it by what its parts own"
    big = []
    for fn in _functions(ast.parse(path.read_text())):
        length = fn.end_lineno - fn.lineno + 1
        args = fn.args
        count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
        if length > MAX_FUNCTION_LINES or count > MAX_PARAMETERS:
            big.append(f"{fn.name}: {length} lines, {count} parameters")
    assert big == []
