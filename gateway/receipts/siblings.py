"""The receipt logs of the other workers of this replica, read-only (gateway/supervisor.py).

A receipt lookup may land on any worker: the log id in the receipt id names the log, and
this finds it among the other workers' directories. Each log is opened read-only (WAL
readers never block the writing worker) and reopened when its writer has grown it, since
a `ReceiptLog` reads its tree's size once, at open. Lookups are rare next to answers, so
the reopen (milliseconds) is paid on the read path, never on an answer's.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from gateway.receipts.log import LogError, ReceiptLog

log = logging.getLogger(__name__)

__all__ = ["SiblingLogs"]


class SiblingLogs:
    """Callable: every log under `dirs`, each as of its latest committed leaf."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = list(dirs)
        self._open: dict[Path, ReceiptLog] = {}

    def _fresh(self, path: Path) -> ReceiptLog | None:
        held = self._open.get(path)
        try:
            if (
                held is not None
                and next(iter(held.entries(held.size, held.size + 1)), None) is None
            ):
                return held  # no leaf past what it read
            fresh = ReceiptLog.open_readonly(path)
            if fresh.frozen and not (path / "FROZEN").is_file():
                # Read while its writer committed: the tree and the checkpoint come from
                # two reads, and a checkpoint past the tree read looks like a truncation.
                # The writer judges its own log; a reader reads it again.
                fresh.close_sync()
                fresh = ReceiptLog.open_readonly(path)
        except (OSError, sqlite3.Error, LogError) as exc:
            # A worker creating its log right now: seen at the next lookup.
            log.debug("sibling receipt log %s not readable yet: %s", path, exc)
            return held
        if held is not None:
            held.close_sync()  # handlers use a log without awaiting: none is using it now
        self._open[path] = fresh
        return fresh

    def __call__(self) -> list[ReceiptLog]:
        out = []
        for d in self.dirs:
            for path in ReceiptLog.all_logs(d) if d.is_dir() else []:
                got = self._fresh(path)
                if got is not None:
                    out.append(got)
        return out

    def close(self) -> None:
        for rl in self._open.values():
            rl.close_sync()
        self._open.clear()
