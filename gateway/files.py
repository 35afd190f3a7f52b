"""Durable, atomic file writes with the final mode from the start (keys, evidence, markers),
and the SHA-256 of a file.

One place for the pattern: write a uniquely named temporary file in the target's directory,
created private and given its final mode before any byte is written, fsync it, rename it
over the target, fsync the directory. A reader sees the old file or the new one, never a
partial one; a private file is never readable by others, not even briefly; two writers of
one target (threads or processes) never share a temporary file; and a failed write leaves
the old file and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

__all__ = ["PRIVATE", "atomic_write", "fsync_dir", "sha256_file"]

PRIVATE = 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = PRIVATE) -> None:
    """Replace ``path`` with ``data``, durably and atomically, with permissions ``mode``.

    ``mode`` is exact (the umask does not apply); None gives what ``open(path, "w")`` would
    create: 0o666 less the process umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name, O_EXCL: never another writer's temporary file, nor one planted there.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666 if mode is None else PRIVATE)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # exact: a public file stays public
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's contents, read in blocks (model files, SRS, proving keys)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
