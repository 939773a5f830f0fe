"""Tiny apps that the CLI tests run as real worker subprocesses."""

from __future__ import annotations

import os


def append_line(path: str, line: str) -> None:
    """Append ``line`` to the file at ``path`` in one write on an ``O_APPEND``
    descriptor, so lines from several worker processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
