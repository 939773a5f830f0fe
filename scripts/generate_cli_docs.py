"""Write docs/cli.md from the typer app, so the reference cannot drift.

    python scripts/generate_cli_docs.py          # rewrite docs/cli.md
    python scripts/generate_cli_docs.py --check  # exit 1 if it is stale

tests/test_cli_docs.py runs the check.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Any

import typer.main
from typer._click import Context

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "cli.md"

HEADER = """# CLI reference

Generated from the `choreo` typer app by `scripts/generate_cli_docs.py`; do
not edit by hand (a test fails if this page is stale).

Every command that talks to a broker takes `--broker URL` or reads
`CHOREO_BROKER_URL` (default `memory://`, which only lives inside one
process). Errors are one line on stderr: exit 2 for bad arguments or
configuration (an unknown `module:app`, malformed JSON), 1 for the rest (an
unreachable broker, findings of `choreo check`, an unknown id).
"""


def _param_line(param: Any) -> str:
    if not getattr(param, "opts", None) or type(param).__name__.endswith("Argument"):
        name = (param.metavar or param.name or "").upper()
        suffix = "..." if param.nargs == -1 else ""
        need = "required" if param.required else "optional"
        name = name.strip("[]")
        return f"| `{name}{suffix}` | argument, {need} | {getattr(param, 'help', '') or ''} |"
    names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    details = []
    annotation = param.type_descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        details.append("one of " + ", ".join(f"`{c.value}`" for c in annotation))
    if param.default not in (None, False, (), []) and not param.is_flag:
        default = param.default.value if hasattr(param.default, "value") else param.default
        details.append(f"default `{default}`")
    if param.envvar:
        details.append(f"env `{param.envvar}`")
    if param.multiple:
        details.append("repeatable")
    help_text = (param.help or "").replace("|", "\\|")
    extra = f" ({'; '.join(details)})" if details else ""
    return f"| {names} | option | {help_text}{extra} |"


def _command(lines: list[str], path: list[str], command: Any) -> None:
    if hasattr(command, "list_commands"):
        for name in command.list_commands(Context(command)):
            sub = command.get_command(Context(command), name)
            assert sub is not None
            _command(lines, [*path, name], sub)
        return
    lines.append(f"## `{' '.join(path)}`\n")
    lines.append((command.help or "").strip().replace("\b\n", "") + "\n")
    ctx = Context(command, info_name=" ".join(path))
    lines.append("```\n" + command.get_usage(ctx).replace("Usage: ", "") + "\n```\n")
    params = [p for p in command.params if p.name != "help"]
    if params:
        lines.append("| name | kind | description |")
        lines.append("|---|---|---|")
        lines += [_param_line(p) for p in params]
        lines.append("")


def render() -> str:
    from choreo.cli import app

    root = typer.main.get_command(app)
    lines = [HEADER]
    _command(lines, ["choreo"], root)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/generate_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
