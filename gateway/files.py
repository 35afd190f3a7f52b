"""Durable, atomic file writes with the final mode from the start (keys, evidence, markers).

One place for the pattern: write a temporary file created with its final mode, fsync it,
rename it over the target, fsync the directory. A reader sees the old file or the new one,
never a partial one, and a private file is never readable by others, not even briefly.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PRIVATE", "atomic_write", "fsync_dir"]

PRIVATE = 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask; a public file stays public
    os.replace(tmp, path)
    fsync_dir(path.parent)
