"""Files that appear whole or not at all: written beside their final name, flushed to disk, then
renamed over it (a rename within a folder is atomic on POSIX file systems). A run killed at any
moment leaves each file as it was before or as it is after, never half-written."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` atomically."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    with open(staging, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Replace ``path`` by these lines (each ends with a newline), atomically."""
    write_text(path, "".join(f"{line}\n" for line in lines))


def append_line(path: Path, line: str) -> None:
    """Add one line at the end of ``path`` atomically: the line is complete or absent."""
    path = Path(path)
    before = path.read_text() if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    write_text(path, f"{before}{line}\n")
