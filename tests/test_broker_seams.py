"""``choreo`` reaches brokers only through the contract in ``brokers.base``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_nothing_in_choreo_imports_redis() -> None:
    """Every import statement under choreo/ (module level, TYPE_CHECKING, inside functions) avoids redis."""
    found = []
    for path in _modules("choreo"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "redis" or n.startswith("redis.")]
    assert found == []


def test_choreo_reads_no_private_attribute_of_a_broker() -> None:
    """No attribute starting with ``_`` is read from anything named like a broker."""
    found = []
    for path in _modules("choreo"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if "broker" in name or name == "instance":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}.{node.attr}")
    assert found == []


def test_brokers_never_imports_choreo() -> None:
    """The transport layer stands on its own."""
    for path in _modules("brokers"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("choreo"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("choreo") for a in node.names), path
