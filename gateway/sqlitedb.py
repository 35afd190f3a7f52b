"""SQLite files that hold client-derived bytes (the receipt log, the jobs store, the core's
vault): one place for how they are opened and how an erasure leaves no copy behind.

A commit is on disk when it returns (WAL with ``synchronous=FULL``: what a client or an
edge was told is stored, is), and a deleted row's cells are overwritten, not just unlinked
(``secure_delete``). The WAL still holds the deleted pages until it is checkpointed and
truncated: `truncate_wal` after every erasure.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["open_durable", "truncate_wal"]


def open_durable(path: Path, *, timeout: float = 5.0) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit), usable from any one thread at
    a time, to the database at `path`, made if absent."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA secure_delete=ON")
    return db


def truncate_wal(db: sqlite3.Connection) -> bool:
    """Copy the WAL into the database and empty it; False when a reader's snapshot kept
    it in use (the dropped pages stay in it until the next call)."""
    busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy
