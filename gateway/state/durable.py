"""An embedded, on-disk, grow-only revocation set.

Revocations must survive a restart even without Redis, so a lone gateway keeps them in an
append-only JSON-lines file: one `{"issuer": ..., "serial": ...}` object per line, each
append fsync'd before it is acknowledged. The version of the set is its number of entries,
so `since(v)` is simply "entries after the v-th".

Crash safety: an append is a single write of one full line, so a crash can only leave the
*last* line torn (partial, or zero-filled by the filesystem). On load a bad last line is
cut off; a bad line anywhere else is real corruption and refuses to load (failing closed:
silently dropping a revocation would re-admit a revoked certificate).

Only one process may own the file: an exclusive `flock` is taken on open, so two gateways
pointed at one data dir fail loudly instead of diverging.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from gateway.files import fsync_dir

__all__ = ["FileRevocations", "RevocationFileError"]


class RevocationFileError(Exception):
    """The revocation file is corrupt, or already owned by another process."""


def parse_entry(line: bytes) -> tuple[str, str] | None:
    """One line of a revocation file, or None where it is not one (torn, blank, other)."""
    try:
        obj = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
        return None
    if not isinstance(obj, dict):
        return None
    issuer, serial = obj.get("issuer"), obj.get("serial")
    if not isinstance(issuer, str) or not isinstance(serial, str):
        return None
    return issuer, serial


class FileRevocations:
    """Grow-only set of (issuer, serial) persisted to `path`. Blocking I/O: call `add` from
    a worker thread in async code (it is thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: list[tuple[str, str]] = []
        self._index: set[tuple[str, str]] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        # O_APPEND: every write lands at the end even if something else grew the file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RevocationFileError(f"{self.path} is in use by another process") from None
        self._fd: int | None = fd
        try:
            self._load()
            if created:
                # Make the new file's directory entry durable too, or a crash could lose
                # the whole file after we acknowledged appends to it.
                fsync_dir(self.path.parent)
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        assert self._fd is not None
        with open(self.path, "rb") as f:
            data = f.read()
        good_end = 0  # byte offset just past the last good line
        lines = data.split(b"\n")
        # After split, the final element is b"" when the file ends in a newline, else the
        # unterminated tail. Either way, only the last non-empty piece may be torn.
        last = len(lines) - 1 if lines[-1] else len(lines) - 2
        for i, raw in enumerate(lines):
            if i > last:
                break
            entry = parse_entry(raw)
            if entry is None:
                if i == last:
                    break  # torn final write: drop it
                raise RevocationFileError(f"{self.path}: corrupt entry on line {i + 1}")
            if entry not in self._index:
                self._index.add(entry)
                self._entries.append(entry)
            good_end += len(raw) + 1
        good_end = min(good_end, len(data))
        if good_end < len(data):
            # Cut the torn tail so the next append starts on a fresh line.
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
        elif data and not data.endswith(b"\n"):
            # A complete JSON object whose newline was lost: finish the line.
            os.write(self._fd, b"\n")
            os.fsync(self._fd)

    @property
    def version(self) -> int:
        return len(self._entries)

    def add(self, issuer: str, serial: str) -> int:
        """Append (issuer, serial) durably; returns the version after. Idempotent."""
        entry = (issuer, serial)
        line = json.dumps({"issuer": issuer, "serial": serial}, sort_keys=True) + "\n"
        with self._lock:
            if entry in self._index:
                return len(self._entries)
            if self._fd is None:
                raise RevocationFileError(f"{self.path} is closed")
            buf = line.encode()
            written = os.write(self._fd, buf)
            if written != len(buf):  # regular files write fully or raise; be sure
                raise OSError(f"short write to {self.path}")
            os.fsync(self._fd)
            # Only now is it durable, so only now is it visible.
            self._index.add(entry)
            self._entries.append(entry)
            return len(self._entries)

    def since(self, version: int) -> tuple[int, set[tuple[str, str]]]:
        with self._lock:
            n = len(self._entries)
            return n, set(self._entries[max(0, version) :])

    def __contains__(self, entry: object) -> bool:
        return entry in self._index

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # also releases the flock
                self._fd = None
