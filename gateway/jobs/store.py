"""Jobs on disk: one SQLite database under the data dir, every change fsynced before it
is acknowledged (`synchronous=FULL`), so a 202 names a job that survives a crash.

One process owns the file (an exclusive `flock` beside it, as for revocations): two
gateways on one data dir would run each job twice. Blocking calls; `JobStore` runs them
on its own single thread, so the event loop never waits on the disk.

What a row keeps of the client's request (its body, its certificate) is kept only while
the job may still run: `finish` and `expire` drop both, and an erasure drops the row. No
copy stays in the files either: `secure_delete` zeroes freed cells, and the WAL, which
still holds the old pages, is checkpointed into the database and truncated after each
such change (as the receipt log does for its erasures).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.files import fsync_dir
from gateway.jobs.model import (
    OPEN,
    PROBLEM_HEADERS,
    Conflict,
    Full,
    JobRow,
    MacFor,
    NewJob,
    Outcome,
    Submitted,
)
from gateway.sqlitedb import open_durable, truncate_wal

__all__ = ["JOBS_FILE", "JobStore", "SyncJobStore"]

log = logging.getLogger(__name__)

JOBS_FILE = "jobs.db"
CLAIM_SCAN = 64  # jobs a claim may pass over beyond those it takes (gateway/jobs/redis.py)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,            -- the submitter's SPIFFE ID (from its certificate)
    idem_key TEXT NOT NULL,
    digest TEXT NOT NULL,           -- SHA-256 of route, model, version, body
    route TEXT NOT NULL,            -- the sync path the job runs as
    model TEXT NOT NULL,
    cert TEXT,                      -- the submitter's PEM leaf; dropped once finished
    headers TEXT,                   -- JSON, the few request headers the decode reads
    body BLOB,                      -- dropped once finished
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    not_before REAL NOT NULL,       -- next run no earlier than this (backoff)
    attempts INTEGER NOT NULL DEFAULT 0,
    executions INTEGER NOT NULL DEFAULT 0,  -- runs dispatched: may reach a node
    status INTEGER,                 -- the sync response's HTTP status
    result_headers TEXT,
    result BLOB,
    receipt_id TEXT,
    mac TEXT,                       -- the gateway's seal over what the job runs as
    mark_log TEXT,                  -- the receipt log a run's answer receipt goes to
    mark_at REAL,
    marks TEXT,                     -- every log it was marked for, space-separated
    UNIQUE (owner, idem_key)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, not_before);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, state);
CREATE INDEX IF NOT EXISTS jobs_receipt ON jobs (receipt_id);
"""


_SELECT = (
    "SELECT id, owner, route, model, cert, headers, body, state, created, updated, attempts,"
    " executions, status, result_headers, result, receipt_id, mac FROM jobs WHERE id = ?"
)


def _row(r: Sequence[Any]) -> JobRow:
    return JobRow(
        id=r[0],
        owner=r[1],
        route=r[2],
        model=r[3],
        cert=r[4],
        headers=json.loads(r[5]) if r[5] else {},
        body=r[6],
        state=r[7],
        created=r[8],
        updated=r[9],
        attempts=r[10],
        executions=r[11],
        status=r[12],
        result_headers=json.loads(r[13]) if r[13] else {},
        result=r[14],
        receipt_id=r[15],
        mac=r[16],
    )


class SyncJobStore:
    """The database itself, blocking; `JobStore` is its async face. The CLI (`ztgate audit
    erase`) opens it with `lock=False`: SQLite serialises its writes with the gateway's."""

    def __init__(self, path: Path, *, lock: bool = True, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        if lock:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(f"{self.path} is in use by another gateway") from None
            self._lock_fd = fd
        created = not self.path.exists()
        self.db = open_durable(self.path, timeout=10)
        self.db.executescript(_SCHEMA)
        self._tx(self._add_mark_columns)  # under the write lock: workers open it at once
        os.chmod(self.path, 0o600)
        if created:
            fsync_dir(self.path.parent)  # or a crash could lose the file with its jobs

    @staticmethod
    def _add_mark_columns(db: sqlite3.Connection) -> None:
        """A file from before the marks gains their columns (checked and added in one
        transaction: a replica's worker processes open the file at the same time)."""
        have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
        for column in ("mark_log TEXT", "mark_at REAL", "marks TEXT"):
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _scrub(self) -> None:
        """Move the WAL's pages into the database and truncate it: until then the WAL
        holds the client's bytes a `finish` or an erasure just dropped."""
        if not truncate_wal(self.db):  # a reader holds an old snapshot: the next change retries
            log.warning(
                "jobs: %s-wal still in use; dropped data stays in it until the next checkpoint",
                self.path,
            )

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(self.db)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return out

    def submit(self, job: NewJob, per_identity: int, total: int) -> Submitted:
        def tx(db: sqlite3.Connection) -> Submitted:
            found = db.execute(
                "SELECT id, digest FROM jobs WHERE owner = ? AND idem_key = ?",
                (job.owner, job.key),
            ).fetchone()
            if found is not None:
                if found[1] != job.digest:
                    raise Conflict(found[0])
                return Submitted(found[0], False)
            mine = db.execute(
                "SELECT count(*) FROM jobs WHERE owner = ? AND state IN (?, ?)",
                (job.owner, *OPEN),
            ).fetchone()[0]
            if mine >= per_identity:
                raise Full("identity")
            if (
                db.execute("SELECT count(*) FROM jobs WHERE state IN (?, ?)", OPEN).fetchone()[0]
                >= total
            ):
                raise Full("replica")
            now = self.clock()
            row = (job.id, job.owner, job.key, job.digest, job.route, job.model, job.cert)
            # `created` is the sealed submit time: the runner's bound on a job's age.
            db.execute(
                "INSERT INTO jobs (id, owner, idem_key, digest, route, model, cert, headers,"
                " body, state, created, updated, not_before, mac) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (*row, json.dumps(job.headers), job.body, job.created, now, now, job.mac),
            )
            return Submitted(job.id, True)

        return self._tx(tx)

    def get(self, job_id: str) -> JobRow | None:
        r = self.db.execute(_SELECT, (job_id,)).fetchone()
        return None if r is None else _row(r)

    def requeue_running(self) -> int:
        """At start: jobs a crash interrupted run again (their dispatches stay counted)."""
        return self._tx(
            lambda db: (
                db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount
            )
        )

    def claim(
        self, limit: int, logs: Sequence[str] = (), adopt_after_s: float = 0.0
    ) -> list[JobRow]:
        """Up to `limit` due jobs, marked running with one more dispatch counted, durably,
        before any of them reaches a node. Passed over: jobs marked for a receipt log not
        in `logs` less than `adopt_after_s` ago (gateway/jobs/redis.py, as there)."""

        def tx(db: sqlite3.Connection) -> list[JobRow]:
            now = self.clock()
            due = db.execute(
                "SELECT id, mark_log, mark_at FROM jobs WHERE state = 'queued'"
                " AND not_before <= ? ORDER BY not_before LIMIT ?",
                (now, limit + CLAIM_SCAN),
            ).fetchall()
            ours = [
                i
                for i, m, at in due
                if m is None or m in logs or at is None or now - at >= adopt_after_s
            ]
            ids = ours[:limit]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = 'running', executions = executions + 1,"
                    " attempts = attempts + 1, updated = ? WHERE id = ?",
                    (now, job_id),
                )
            return [_row(db.execute(_SELECT, (i,)).fetchone()) for i in ids]

        return self._tx(tx)

    def mark(self, job_id: str, log_id: str, run: int) -> tuple[str, ...] | None:
        """`JobBackend.mark`: over a running job only, as that run."""

        def tx(db: sqlite3.Connection) -> tuple[str, ...] | None:
            r = db.execute(
                "SELECT marks FROM jobs WHERE id = ? AND state = 'running' AND executions = ?",
                (job_id, run),
            ).fetchone()
            if r is None:
                return None
            marks = tuple((r[0] or "").split())
            marks += () if log_id in marks else (log_id,)
            db.execute(
                "UPDATE jobs SET mark_log = ?, mark_at = ?, marks = ? WHERE id = ?",
                (log_id, self.clock(), " ".join(marks), job_id),
            )
            return marks

        return self._tx(tx)

    def retry(self, job_id: str, delay_s: float, run: int) -> None:
        now = self.clock()
        self._tx(
            lambda db: db.execute(
                "UPDATE jobs SET state = 'queued', not_before = ?, updated = ?"
                " WHERE id = ? AND state = 'running' AND executions = ?",
                (now + delay_s, now, job_id, run),
            )
        )

    def finish(self, job_id: str, out: Outcome) -> bool:
        now = self.clock()
        done = self._tx(
            lambda db: (
                db.execute(
                    "UPDATE jobs SET state = ?, status = ?, result_headers = ?, result = ?,"
                    " receipt_id = ?, cert = NULL, headers = NULL, body = NULL, mac = ?,"
                    " updated = ?"
                    " WHERE id = ? AND state = 'running'",
                    (
                        out.state,
                        out.status,
                        json.dumps(out.headers),
                        out.result,
                        out.receipt_id,
                        out.mac,
                        now,
                        job_id,
                    ),
                ).rowcount
                == 1
            )
        )
        if done:
            self._scrub()
        return done

    def expire(
        self, max_age_s: float, result_ttl_s: float, result: bytes, mac_for: MacFor
    ) -> tuple[int, int]:
        """Queued jobs older than `max_age_s` fail (with `result`, a problem, sealed by
        `mac_for(id)`); finished ones older than `result_ttl_s` are deleted. Returns
        (expired, deleted)."""
        now = self.clock()

        def tx(db: sqlite3.Connection) -> tuple[int, int]:
            old = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' AND created < ?",
                    (now - max_age_s,),
                )
            ]
            for job_id in old:
                db.execute(
                    "UPDATE jobs SET state = 'failed', status = 504, result_headers = ?,"
                    " result = ?, cert = NULL, headers = NULL, body = NULL, mac = ?,"
                    " updated = ? WHERE id = ?",
                    (PROBLEM_HEADERS, result, mac_for(job_id), now, job_id),
                )
            deleted = db.execute(
                "DELETE FROM jobs WHERE state IN ('done', 'failed') AND updated < ?",
                (now - result_ttl_s,),
            ).rowcount
            return len(old), deleted

        expired, deleted = self._tx(tx)
        if expired or deleted:
            self._scrub()
        return expired, deleted

    def erase_receipts(self, receipt_ids: Sequence[str]) -> int:
        """Delete the jobs whose result carries one of these receipts (an erasure)."""

        def tx(db: sqlite3.Connection) -> int:
            return sum(
                db.execute("DELETE FROM jobs WHERE receipt_id = ?", (rid,)).rowcount
                for rid in receipt_ids
            )

        n = self._tx(tx)
        self._scrub()
        return n

    def erase_jobs(self, job_ids: Sequence[str]) -> int:
        """Delete these jobs, whatever their state (the jobs an erased receipt named)."""

        def tx(db: sqlite3.Connection) -> int:
            return sum(db.execute("DELETE FROM jobs WHERE id = ?", (i,)).rowcount for i in job_ids)

        n = self._tx(tx)
        self._scrub()
        return n

    def erase_owner(self, owner: str) -> int:
        """Delete every job of one client, queued ones too (an erasure request for that
        subject: `ztgate audit erase --subject`)."""
        n = self._tx(lambda db: db.execute("DELETE FROM jobs WHERE owner = ?", (owner,)).rowcount)
        self._scrub()
        return n


class JobStore:
    """`JobBackend` on disk: `SyncJobStore` on one worker thread, calls in order, off the
    event loop."""

    lease_s: float | None = None  # one process owns the file: a crash requeues at start

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.time, *, lock: bool = True
    ) -> None:
        self.sync = SyncJobStore(path, lock=lock, clock=clock)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jobs-db")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def submit(self, job: NewJob, per_identity: int, total: int) -> Submitted:
        return await self._call(self.sync.submit, job, per_identity, total)

    async def get(self, job_id: str) -> JobRow | None:
        return await self._call(self.sync.get, job_id)

    async def requeue_running(self) -> int:
        return await self._call(self.sync.requeue_running)

    async def claim(
        self, limit: int, logs: Sequence[str] = (), adopt_after_s: float = 0.0
    ) -> list[JobRow]:
        return await self._call(self.sync.claim, limit, logs, adopt_after_s)

    async def mark(self, job_id: str, log_id: str, run: int) -> tuple[str, ...] | None:
        return await self._call(self.sync.mark, job_id, log_id, run)

    async def renew(self, job_id: str) -> None:
        return None

    async def retry(self, job_id: str, delay_s: float, run: int) -> None:
        await self._call(self.sync.retry, job_id, delay_s, run)

    async def finish(self, job_id: str, out: Outcome) -> bool:
        return await self._call(self.sync.finish, job_id, out)

    async def expire(
        self, max_age_s: float, result_ttl_s: float, result: bytes, mac_for: MacFor
    ) -> tuple[int, int]:
        return await self._call(self.sync.expire, max_age_s, result_ttl_s, result, mac_for)

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self.sync.close()
