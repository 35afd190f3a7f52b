"""The receipt logs of the other workers of this replica, read-only (gateway/supervisor.py).

A receipt lookup may land on any worker: the log id in the receipt id names the log, and
this finds it among the other workers' directories. Each log is opened strictly read-only
(nothing written, WAL readers never block the writing worker) and reopened when its writer
has grown it, since a `ReceiptLog` reads its tree's size once, at open; at most every
`REOPEN_EVERY_S` per log, since one request may ask for the logs more than once and a
reopen costs about 0.7 ms with 100k leaves. A receipt committed since is found at most
that much later (its writer serves it at once).

`UnownedLogs`: the logs in the receipts dir that no process of the replica writes (a
replica's logs from before it ran workers, those of workers it no longer runs, or every
worker's after a move back to one process), which worker 0, or the one process, keeps
under retention as its own.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from gateway.receipts.log import LogError, ReceiptLog

log = logging.getLogger(__name__)

__all__ = ["SiblingLogs", "UnownedLogs", "unowned_dirs"]

REOPEN_EVERY_S = 0.25


class _HeldLogs:
    """The logs under `dirs`, each held open once opened, until `close`."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = list(dirs)
        self._open: dict[Path, ReceiptLog] = {}

    def _paths(self) -> Iterator[Path]:
        for d in self.dirs:
            if d.is_dir():
                yield from ReceiptLog.all_logs(d)

    def close(self) -> None:
        for rl in self._open.values():
            rl.close_sync()
        self._open.clear()


class SiblingLogs(_HeldLogs):
    """Callable: every log under `dirs`, each as of its latest committed leaf."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        super().__init__(dirs)
        self._checked: dict[Path, float] = {}  # time.monotonic() of the last look
        self.reopen_every_s = REOPEN_EVERY_S

    def _fresh(self, path: Path) -> ReceiptLog | None:
        held = self._open.get(path)
        now = time.monotonic()
        if held is not None and now - self._checked.get(path, now) < self.reopen_every_s:
            return held
        self._checked[path] = now
        try:
            if (
                held is not None
                and next(iter(held.entries(held.size, held.size + 1)), None) is None
            ):
                return held  # no leaf past what it read
            fresh = ReceiptLog.open_readonly(path, strict=True)
            if fresh.frozen and not (path / "FROZEN").is_file():
                # Read while its writer committed: the tree and the checkpoint come from
                # two reads, and a checkpoint past the tree read looks like a truncation.
                # The writer judges its own log; a reader reads it again.
                fresh.close_sync()
                fresh = ReceiptLog.open_readonly(path, strict=True)
        except (OSError, sqlite3.Error, LogError) as exc:
            # A worker creating its log right now: seen at the next lookup.
            log.debug("sibling receipt log %s not readable yet: %s", path, exc)
            return held
        if held is not None:
            held.close_sync()  # handlers use a log without awaiting: none is using it now
        self._open[path] = fresh
        return fresh

    def __call__(self) -> list[ReceiptLog]:
        return [got for got in map(self._fresh, self._paths()) if got is not None]


def unowned_dirs(base: Path, workers: int) -> list[Path]:
    """The directories under the receipts dir `base` whose logs no process of a replica of
    `workers` processes writes: with one, every worker's (`w<i>`); with several, `base`
    itself and those of workers past the count."""
    from gateway.receipts.export import replica_dirs

    subs = replica_dirs(base)[1:]
    if workers <= 1:
        return subs
    return [base, *(d for d in subs if int(d.name[1:]) >= workers)]


class UnownedLogs(_HeldLogs):
    """Callable: every log under `dirs`, opened for erasures (as `ztgate audit expire` opens
    one), once each; for the retention job of worker 0 or of the one process."""

    def __call__(self) -> list[ReceiptLog]:
        out = []
        for path in self._paths():
            if path not in self._open:
                try:
                    self._open[path] = ReceiptLog.open_readonly(path)
                except (OSError, sqlite3.Error, LogError) as exc:
                    log.error("receipt log %s: not under retention: %s", path, exc)
                    continue
            out.append(self._open[path])
        return out
