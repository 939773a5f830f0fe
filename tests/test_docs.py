"""Every Python block in README.md and docs/ runs, in order, one namespace per
page (top-level ``await`` allowed). A block right after ``<!-- not-run -->``
is shown only (it needs a running Redis or worker)."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"(<!-- not-run -->\s*)?```python\n(.*?)```", re.DOTALL)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(2))
        for match in BLOCK.finditer(text)
        if not match.group(1)
    ]


async def run_blocks(page: Path, blocks: list[tuple[int, str]]) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    for line, source in blocks:
        code = compile(
            ast.parse(source, filename=f"{page.name}:{line}"),
            f"{page.name}:{line}",
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        result = eval(code, namespace)  # our own documentation
        if asyncio.iscoroutine(result):
            await result


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
async def test_documentation_code_blocks_run(
    page: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's Python examples run as written and their asserts hold (a page
    naming CHOREO_DATABASE_URL gets a fresh database on the test PostgreSQL)."""
    if "CHOREO_DATABASE_URL" in page.read_text():
        monkeypatch.setenv("CHOREO_DATABASE_URL", request.getfixturevalue("database_url"))
    await run_blocks(page, python_blocks(page))


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files_that_exist(page: Path) -> None:
    """A reader following a link in the docs never lands on a missing page."""
    missing = [
        target
        for target in LINK.findall(page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert missing == []
