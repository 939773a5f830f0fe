"""The package layering, read from the source with ``ast``.

Every import statement counts: at module level, under ``TYPE_CHECKING`` and
inside functions alike, because a loop hidden in a function is still a
missing seam.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("choreo", "brokers")
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _imported_names(module: str, path: pathlib.Path) -> set[str]:
    """Every dotted name ``module`` imports, relative imports resolved."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _resolve(name: str, known: set[str]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {_resolve(name, known) for name in _imported_names(module, path)}
        edges = {t for t in targets if t is not None and t != module}
        if path.name == "__init__.py":
            # A package re-exporting its own submodules is not a loop.
            edges = {t for t in edges if not t.startswith(module + ".")}
        graph[module] = edges
    return graph


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_loop_among_choreo_and_brokers_modules() -> None:
    """No two modules reach each other through imports, counting every import statement."""
    assert _loops(_graph()) == []


def test_brokers_never_import_choreo() -> None:
    """The transport layer stands on its own: nothing under brokers/ imports choreo."""
    offenders = {
        (module, target)
        for module, targets in _graph().items()
        if module.startswith("brokers")
        for target in targets
        if target.startswith("choreo")
    }
    assert offenders == set()


def test_nothing_under_choreo_imports_redis() -> None:
    """The framework reaches Redis only through the broker protocols."""
    modules = _modules()
    offenders = sorted(
        module
        for module, path in modules.items()
        if module.startswith("choreo")
        and any(name == "redis" or name.startswith("redis.") for name in _imported_names(module, path))
    )
    assert offenders == []


def test_choreo_reads_no_private_attribute_of_a_broker() -> None:
    """No attribute starting with ``_`` is read from anything named like a broker:
    a command that needs one means the broker protocols lack a method."""
    found = []
    for module, path in _modules().items():
        if not module.startswith("choreo"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if "broker" in name or name == "instance":
                    found.append(f"{module}:{node.lineno}: {name}.{node.attr}")
    assert found == []


def test_no_module_is_over_the_size_budget() -> None:
    """A concept is split off before a module grows past about 400 lines."""
    sizes = {module: len(path.read_text().splitlines()) for module, path in _modules().items()}
    assert {module: n for module, n in sizes.items() if n > MAX_LINES} == {}


def test_imports_inside_functions_and_type_checking_blocks_count(tmp_path: pathlib.Path) -> None:
    """A negative control: imports hidden in a function or under TYPE_CHECKING are still read."""
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from choreo.worker import Runtime\n"
        "def f():\n"
        "    from .sibling import thing\n"
    )
    names = _imported_names("choreo.saga.module", source)
    assert {"choreo.worker", "choreo.saga.sibling"} <= names
    assert _loops({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
