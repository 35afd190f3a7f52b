"""A clock for staleness that a captured box cannot wind back, and the last revocation sync.

Staleness decides whether a cut-off gateway may still trust its revocation data. Measured
with the wall clock, setting the box's clock back makes old data look fresh; measured with
the process's monotonic clock, a restart does. So the gateway keeps a high-water mark of
the time it has seen, on disk, and never reports a time below it: after a restart or a
clock set back, time resumes from the mark and runs on with the monotonic clock. The last
successful revocation sync is kept in the same record, so a restart continues the
staleness it had instead of starting a fresh budget.

What this does not stop: someone who can write the data directory can edit the record
(SECURITY.md, "DDIL"), and time stands still while the gateway is not running (a box
switched off for a day and restarted with its clock set back resumes from the mark, not
a day later).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

from gateway.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["PersistedClock"]


class PersistedClock:
    def __init__(self, path: Path | None) -> None:
        """`path` None: nothing persisted (tests, `serve --check`); still never backwards
        within the process."""
        self._path = path
        self._lock = threading.Lock()
        # No record at all: a first start. A record that exists but cannot be read is not
        # one: staleness is then unknown, so the gateway fails closed until a sync succeeds.
        self.first_start = path is None or not path.exists()
        mark, last_sync = self._read()
        self._floor = max(mark, time.time())
        self._mono0 = time.monotonic()
        self.last_sync: float | None = last_sync
        self._written: tuple[float, float | None] = (math.nan, math.nan)

    def _read(self) -> tuple[float, float | None]:
        if self._path is None or not self._path.exists():
            return 0.0, None
        try:
            rec = json.loads(self._path.read_text())
            mark = float(rec["high_water"])
            sync = rec.get("last_sync")
            last = None if sync is None else float(sync)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("clock record %s unreadable (%s): stale until a sync", self._path, exc)
            return 0.0, None
        if not (math.isfinite(mark) and (last is None or math.isfinite(last))):
            log.error("clock record %s holds a non-finite time; ignored", self._path)
            return 0.0, None
        return mark, last

    def now(self) -> float:
        """Seconds since the epoch, never below any time this gateway reported before."""
        return max(time.time(), self._floor + (time.monotonic() - self._mono0))

    def synced(self) -> None:
        """A revocation sync succeeded now."""
        self.last_sync = self.now()

    def persist(self) -> None:
        """Write the mark (and the last sync) durably; called off the request path."""
        if self._path is None:
            return
        with self._lock:
            now = self.now()
            if (now, self.last_sync) == self._written:
                return
            record = {"high_water": now, "last_sync": self.last_sync}
            atomic_write(self._path, json.dumps(record).encode())
            self._written = (now, self.last_sync)
