"""`StateStore` in one SQLite file on this host: what the worker processes of one replica
share when no Redis is configured (`listen.workers` > 1, gateway/supervisor.py).

One store all workers see, not N views: a rate limit, a nonce, an ejection or a revocation
taken in one worker holds in every other, because each call is one statement (a rate
limit's refill and take: `_TAKE`, an UPSERT ... RETURNING in autocommit) or one short
`BEGIN IMMEDIATE` transaction on the same file (SQLite serialises writers across
processes; WAL lets readers run beside them); each holds the write lock for some
microseconds.

Calls run on the store's own thread, except the per-request ones (a bucket, a nonce, a
token meter), which first try on the event loop itself, on a connection that never waits
for a lock: ~15 µs of CPU a call, where the hop to the store's thread costs ~85 µs. Most
of it is the write itself (three `fcntl` locks and one `pwrite` of the WAL, and the WAL's
size), not the statements: a bucket in one statement saved ~1 µs of four. When another
worker holds the lock, or a size check is due (it reads a whole table), the call goes to
the store's thread instead, which waits for the lock (up to the busy timeout) while the
loop serves other requests. At most `MAX_QUEUED` calls wait for that thread per process;
past it a call fails closed.

Durability follows the Redis store's split: soft state (buckets, nonces, health) commits
without an fsync (`synchronous=NORMAL`: it survives a worker's crash, not a power cut),
revocations, evidence and quarantine records commit with one (`synchronous=FULL`) before
the call returns. Time is the host's wall clock, which every worker shares.

Every table that client-derived keys can grow is bounded: past `max_keys` the least
recently used buckets are evicted (a bucket evicted comes back full, which only forgives),
and a full nonce or meter table refuses (`StoreUnavailable`: the caller fails closed) rather
than forget a live entry. The bound is checked every `SWEEP_EVERY` inserts per process, so
a table may pass it by that many times the number of workers before the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.state import (
    TOKEN_SLACK_S,
    Clock,
    StoreUnavailable,
    check_bucket_args,
    check_eject_args,
    check_spend_args,
    check_ttl,
)

__all__ = ["STATE_FILE", "SqliteStore"]

STATE_FILE = "state.db"
SWEEP_EVERY = 256  # inserts between two checks of a table's size
EXPIRED_PER_CALL = 64  # expired nonces/meters deleted by one insert: amortised O(1)

T = TypeVar("T")
CHECKPOINT_EVERY = 512  # per-request commits (either path) between two WAL checkpoints
# Under load a passive checkpoint rarely finds a moment with no writer, and the WAL grew
# (160 MB at 2 x 2,500 req/s): past WAL_TRUNCATE_BYTES a checkpoint waits for the writers
# (up to the busy timeout, on a thread of its own) and empties the file, and SQLite cuts a
# WAL it resets back to JOURNAL_SIZE_LIMIT (docs/sizing.md has the figures).
WAL_TRUNCATE_BYTES = 8 * 1024 * 1024
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024
# Calls waiting for the store's thread, per process: past it a call fails closed
# (`StoreUnavailable`) rather than queue without bound behind a locked file.
MAX_QUEUED = 1024


class _Slow(Exception):
    """This call must run on the store's thread (it reads a whole table)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, failures INTEGER NOT NULL, ejections INTEGER NOT NULL,
    until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL, ok INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS buckets_ts ON buckets(ts);
CREATE TABLE IF NOT EXISTS meters (key TEXT PRIMARY KEY, n INTEGER NOT NULL, expiry REAL NOT NULL);
CREATE INDEX IF NOT EXISTS meters_expiry ON meters(expiry);
CREATE TABLE IF NOT EXISTS nonces (key TEXT PRIMARY KEY, expiry REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces(expiry);
CREATE TABLE IF NOT EXISTS revocations (
    version INTEGER PRIMARY KEY, issuer TEXT NOT NULL, serial TEXT NOT NULL,
    UNIQUE (issuer, serial));
CREATE TABLE IF NOT EXISTS logs (log_id TEXT PRIMARY KEY, url TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
    subject TEXT PRIMARY KEY, counts TEXT NOT NULL, stat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (node TEXT PRIMARY KEY, record TEXT NOT NULL);
"""


# A bucket's refill and take in ONE statement: autocommit makes it atomic across processes
# (SQLite takes the write lock for the statement) at one round through the library, where
# BEGIN IMMEDIATE / SELECT / UPSERT / COMMIT took four. ?1 key, ?2 burst, ?3 cost, ?4 now,
# ?5 rate, ?6 slack (tokens). In an UPSERT's SET every column names the row as it was, so
# `_REFILLED` is the bucket before the take; the same arithmetic as MemoryStore's: a clock
# stepping back refills nothing. `ok` says what happened (the statement returns it): 1 took,
# 0 refused, 3 a new bucket (full, so it took: cost <= burst); 3 because it is odd (`ok % 2`:
# taken) and at least `_INSERTED` (new: counts toward the size check).
_REFILLED = "iif(?4 > ts, min(?2, tokens + (?4 - ts) * ?5), tokens)"
# `_REFILLED` is this constant, never input.
_TAKE = (
    "INSERT INTO buckets (key, tokens, ts, ok) VALUES (?1, ?2 - ?3, ?4, 3) "  # noqa: S608
    "ON CONFLICT(key) DO UPDATE SET "
    f"tokens = iif({_REFILLED} + ?6 >= ?3, {_REFILLED} - ?3, {_REFILLED}), "
    f"ts = max(ts, ?4), ok = ({_REFILLED} + ?6 >= ?3) "
    "RETURNING tokens, ok"
)
_INSERTED = 2  # `ok` at or above it: the statement inserted the row


def prepare(path: Path) -> None:
    """Create the file (0600: SQLite gives its WAL and shm files the database's mode), in
    WAL mode, with its tables. The supervisor calls it before it starts the workers:
    switching a new file to WAL takes a lock SQLite does not wait for, so workers opening
    a new file at once could fail their start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    db = _connect(path, "FULL", 5.0)
    try:
        # One transaction: workers that open the file together must not both add a column.
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(buckets)")}
            if "ok" not in columns:  # a file from before the one-statement bucket
                db.execute("ALTER TABLE buckets ADD COLUMN ok INTEGER NOT NULL DEFAULT 1")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()


_WAL_SWITCH_S = 10.0


def _connect(path: Path, synchronous: str, timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    # Switching a new file to WAL takes a lock SQLite's busy handler does not wait for: two
    # processes opening one new file together (workers, `ztgate` commands) would fail at
    # once. Retried for a bounded while, at start only (never on the request path).
    deadline = time.monotonic() + _WAL_SWITCH_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.01)
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    return db


class SqliteStore:
    """`StateStore` in `path`, shared by every process that opens the same file."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = time.time,
        max_keys: int = 100_000,
        timeout_s: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._max_keys = max_keys
        prepare(self.path)
        # The busy timeout is how long a call waits for another worker's transaction: at
        # least a second, since a worker may be descheduled while it holds the lock.
        wait = max(1.0, timeout_s)
        self._soft = _connect(self.path, "NORMAL", wait)
        self._hard = _connect(self.path, "FULL", wait)
        # The loop's connection: never waits for a lock (busy timeout 0) and never
        # checkpoints the WAL itself (that writes and syncs the database file).
        self._fast = _connect(self.path, "NORMAL", 0.0)
        self._fast.execute("PRAGMA wal_autocheckpoint=0")
        self._fast_commits = 0  # per-request commits, both paths (`_committed`)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="state-sqlite")
        # Checkpoints on a thread and connection of their own: behind the store's queue
        # under saturation they came too late to keep the WAL small (it grows ~80 MB/s).
        self._ckpt_db = _connect(self.path, "NORMAL", wait)
        self._ckpt_pool = ThreadPoolExecutor(1, thread_name_prefix="state-sqlite-ckpt")
        self._ckpt: Future[None] | None = None
        self._queued = 0  # calls submitted to the store's thread and not yet done
        self.max_queued = MAX_QUEUED
        self.wal_truncate_bytes = WAL_TRUNCATE_BYTES
        self._inserts = 0
        self._closed = False

    # -- plumbing -------------------------------------------------------------------
    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreUnavailable("state store closed")
        if self._queued >= self.max_queued:
            raise StoreUnavailable(f"local state store: {self._queued} calls queued already")
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self._pool, fn)
        except sqlite3.Error as exc:  # locked past the timeout, disk full, read-only
            raise StoreUnavailable(f"local state store: {exc}") from exc
        finally:
            self._queued -= 1

    async def _request_tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` in one transaction: on the loop if the lock is free now, else on the
        store's thread (module docstring)."""
        if self._closed:
            raise StoreUnavailable("state store closed")
        try:
            out = self._tx(self._fast, fn)
        except _Slow:
            pass
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StoreUnavailable(f"local state store: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"local state store: {exc}") from exc
        else:
            self._committed()
            return out
        out = await self._call(lambda: self._tx(self._soft, fn))
        self._committed()
        return out

    async def _request_stmt(self, sql: str, args: tuple[object, ...]) -> list[Any]:
        """One statement in autocommit (atomic on its own): on the loop if the lock is
        free now, else on the store's thread (module docstring). Its rows are all read, so
        the statement is done and its lock released before this returns."""
        if self._closed:
            raise StoreUnavailable("state store closed")
        try:
            rows = self._fast.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StoreUnavailable(f"local state store: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"local state store: {exc}") from exc
        else:
            self._committed()
            return rows
        rows = await self._call(lambda: self._soft.execute(sql, args).fetchall())
        self._committed()
        return rows

    def _count_insert(self) -> bool:
        """Count an insert made outside `_inserted`; True when a size check is due."""
        self._inserts += 1
        return self._inserts % SWEEP_EVERY == 0

    def _committed(self) -> None:
        # Counted on both paths: under contention most commits take the store's thread.
        self._fast_commits += 1
        due = self._fast_commits % CHECKPOINT_EVERY == 0
        if due and (self._ckpt is None or self._ckpt.done()):  # one at a time
            self._ckpt = self._ckpt_pool.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        # PASSIVE: copies what no reader needs, never waits; failures retry next time.
        # TRUNCATE only once the WAL has grown past its bound (WAL_TRUNCATE_BYTES).
        try:
            big = os.path.getsize(f"{self.path}-wal") > self.wal_truncate_bytes
        except OSError:
            big = False
        with contextlib.suppress(sqlite3.Error):
            self._ckpt_db.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if big else 'PASSIVE'})")

    @staticmethod
    def _tx(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    def _inserted(self, db: sqlite3.Connection) -> bool:
        """Count an insert; True when the table's size is due for a check, which reads
        the whole table: never on the loop's connection."""
        if db is self._fast and (self._inserts + 1) % SWEEP_EVERY == 0:
            raise _Slow
        self._inserts += 1
        return self._inserts % SWEEP_EVERY == 0

    def _count(self, db: sqlite3.Connection, table: str) -> int:
        # `table` is one of this module's constants, never input.
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608

    # -- node health ----------------------------------------------------------------
    async def record_failure(self, node_id: str) -> int:
        def tx(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT INTO nodes VALUES (?, 1, 0, 0) "
                "ON CONFLICT(id) DO UPDATE SET failures = failures + 1",
                (node_id,),
            )
            return int(
                db.execute("SELECT failures FROM nodes WHERE id = ?", (node_id,)).fetchone()[0]
            )

        return await self._call(lambda: self._tx(self._soft, tx))

    async def record_success(self, node_id: str) -> None:
        def run() -> None:
            self._soft.execute("UPDATE nodes SET failures = 0 WHERE id = ?", (node_id,))

        await self._call(run)

    async def eject(self, node_id: str, base_s: float, max_s: float) -> float:
        check_eject_args(base_s, max_s)

        def tx(db: sqlite3.Connection) -> float:
            now = self._clock()
            row = db.execute(
                "SELECT ejections, until FROM nodes WHERE id = ?", (node_id,)
            ).fetchone()
            ejections, until = (int(row[0]), float(row[1])) if row else (0, 0.0)
            if until > now:  # already out: idempotent across workers and replicas
                db.execute("UPDATE nodes SET failures = 0 WHERE id = ?", (node_id,))
                return until - now
            if ejections and now - until >= max_s:
                ejections = 0  # healthy long enough: forget the history
            duration = min(base_s * 2.0**ejections, max_s)
            db.execute(
                "INSERT INTO nodes VALUES (?, 0, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "failures = 0, ejections = excluded.ejections, until = excluded.until",
                (node_id, ejections + 1, now + duration),
            )
            return duration

        return await self._call(lambda: self._tx(self._soft, tx))

    async def ejected_until(self, node_ids: Iterable[str]) -> dict[str, float]:
        ids = list(node_ids)

        def run() -> dict[str, float]:
            now = self._clock()
            marks = ",".join("?" * len(ids))
            rows = self._soft.execute(
                f"SELECT id, until FROM nodes WHERE until > ? AND id IN ({marks})",  # noqa: S608
                (now, *ids),
            ).fetchall()
            return {str(i): float(u) for i, u in rows}

        if not ids:
            return {}
        return await self._call(run)

    async def readmit(self, node_id: str) -> None:
        def run() -> None:
            self._soft.execute(
                "UPDATE nodes SET until = min(until, ?), failures = 0 WHERE id = ?",
                (self._clock(), node_id),
            )

        await self._call(run)

    # -- rate limiting --------------------------------------------------------------
    async def take_token(
        self, key: str, rate_per_s: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        check_bucket_args(rate_per_s, burst, cost)
        args = (key, float(burst), cost, self._clock(), rate_per_s, rate_per_s * TOKEN_SLACK_S)
        [(tokens, ok)] = await self._request_stmt(_TAKE, args)
        if ok >= _INSERTED and self._count_insert():
            await self._call(lambda: self._tx(self._soft, self._evict_buckets))
        return (True, 0.0) if ok % 2 else (False, (cost - float(tokens)) / rate_per_s)

    def _evict_buckets(self, db: sqlite3.Connection) -> None:
        # The least recently touched first: an idle bucket is the one most likely full.
        excess = self._count(db, "buckets") - self._max_keys
        if excess > 0:
            db.execute(
                "DELETE FROM buckets WHERE key IN (SELECT key FROM buckets ORDER BY ts LIMIT ?)",
                (excess + SWEEP_EVERY,),
            )

    # -- token meters ---------------------------------------------------------------
    async def spend(self, key: str, amount: int, limit: int, ttl_s: float) -> tuple[bool, int]:
        check_spend_args(amount, limit, ttl_s)

        def tx(db: sqlite3.Connection) -> tuple[bool, int]:
            now = self._clock()
            row = db.execute("SELECT n, expiry FROM meters WHERE key = ?", (key,)).fetchone()
            if row is not None and float(row[1]) <= now:
                db.execute("DELETE FROM meters WHERE key = ?", (key,))
                row = None
            if row is None:
                self._drop_expired(db, "meters", now)
                if amount <= 0:
                    return True, 0
                if self._inserted(db) and self._count(db, "meters") >= self._max_keys:
                    # Evicting a live meter would forgive a spent budget; refuse instead.
                    raise StoreUnavailable("token meter table full")
                count, expiry = 0, now + ttl_s
            else:
                count, expiry = int(row[0]), float(row[1])
            if amount > 0 and count + amount > limit:
                return False, count
            count = max(0, count + amount)
            db.execute(
                "INSERT INTO meters VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET n = excluded.n",
                (key, count, expiry),
            )
            return True, count

        return await self._request_tx(tx)

    @staticmethod
    def _drop_expired(db: sqlite3.Connection, table: str, now: float) -> None:
        db.execute(  # `table` is one of this module's constants, never input
            f"DELETE FROM {table} WHERE key IN "  # noqa: S608
            f"(SELECT key FROM {table} WHERE expiry <= ? ORDER BY expiry LIMIT ?)",
            (now, EXPIRED_PER_CALL),
        )

    # -- revocations ----------------------------------------------------------------
    async def add_revocation(self, issuer: str, serial: str) -> int:
        def tx(db: sqlite3.Connection) -> int:
            # The version is the number of entries (as the other stores count it): the
            # table only grows, and a re-add writes nothing, so max + 1 never repeats.
            known = db.execute(
                "SELECT 1 FROM revocations WHERE issuer = ? AND serial = ?", (issuer, serial)
            ).fetchone()
            if known is None:
                db.execute(
                    "INSERT INTO revocations VALUES (?, ?, ?)",
                    (self._version(db) + 1, issuer, serial),
                )
            return self._version(db)

        # On the FULL connection: the commit is fsynced before the call returns.
        return await self._call(lambda: self._tx(self._hard, tx))

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT coalesce(max(version), 0) FROM revocations").fetchone()[0])

    async def revocations_since(self, version: int) -> tuple[int, set[tuple[str, str]]]:
        def run() -> tuple[int, set[tuple[str, str]]]:
            db = self._hard
            db.execute("BEGIN")  # one snapshot for the version and the rows
            try:
                current = self._version(db)
                rows = db.execute(
                    "SELECT issuer, serial FROM revocations WHERE version > ?", (max(0, version),)
                ).fetchall()
            finally:
                db.execute("COMMIT")
            return current, {(str(i), str(s)) for i, s in rows}

        return await self._call(run)

    # -- replay protection ----------------------------------------------------------
    async def check_nonce(self, key: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)

        def tx(db: sqlite3.Connection) -> bool:
            now = self._clock()
            row = db.execute("SELECT expiry FROM nonces WHERE key = ?", (key,)).fetchone()
            if row is not None and float(row[0]) > now:
                return False
            self._drop_expired(db, "nonces", now)
            if row is None and self._inserted(db) and self._count(db, "nonces") >= self._max_keys:
                # Evicting a live nonce would re-open it to replay; refuse instead.
                db.execute("DELETE FROM nonces WHERE expiry <= ?", (now,))
                if self._count(db, "nonces") >= self._max_keys:
                    raise StoreUnavailable("nonce table full")
            db.execute(
                "INSERT INTO nonces VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                "expiry = excluded.expiry",
                (key, now + ttl_s),
            )
            return True

        return await self._request_tx(tx)

    # -- where each replica's receipt log lives -------------------------------------
    async def publish_log(self, log_id: str, url: str) -> None:
        def run() -> None:
            self._soft.execute(
                "INSERT INTO logs VALUES (?, ?) "
                "ON CONFLICT(log_id) DO UPDATE SET url = excluded.url",
                (log_id, url),
            )

        await self._call(run)

    async def find_log(self, log_id: str) -> str | None:
        def run() -> str | None:
            row = self._soft.execute("SELECT url FROM logs WHERE log_id = ?", (log_id,)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(run)

    # -- lie accounting -------------------------------------------------------------
    async def add_evidence(
        self, subject: str, counts: Mapping[str, int], step: float
    ) -> tuple[dict[str, int], float]:
        add = {k: int(n) for k, n in counts.items()}

        def tx(db: sqlite3.Connection) -> tuple[dict[str, int], float]:
            row = db.execute(
                "SELECT counts, stat FROM evidence WHERE subject = ?", (subject,)
            ).fetchone()
            have: dict[str, int] = json.loads(row[0]) if row else {}
            stat = float(row[1]) if row else 0.0
            for k, n in add.items():
                have[k] = have.get(k, 0) + n
            stat = max(0.0, stat + step)
            db.execute(
                "INSERT INTO evidence VALUES (?, ?, ?) ON CONFLICT(subject) DO UPDATE SET "
                "counts = excluded.counts, stat = excluded.stat",
                (subject, json.dumps(have, sort_keys=True), stat),
            )
            return have, stat

        return await self._call(lambda: self._tx(self._hard, tx))

    async def evidence(self, subjects: Iterable[str]) -> dict[str, tuple[dict[str, int], float]]:
        wanted = list(subjects)

        def run() -> dict[str, tuple[dict[str, int], float]]:
            out: dict[str, tuple[dict[str, int], float]] = {}
            for s in wanted:
                row = self._hard.execute(
                    "SELECT counts, stat FROM evidence WHERE subject = ?", (s,)
                ).fetchone()
                if row is not None:
                    out[s] = (json.loads(row[0]), float(row[1]))
            return out

        return await self._call(run)

    async def reset_statistic(self, subject: str) -> None:
        def run() -> None:
            self._hard.execute("UPDATE evidence SET stat = 0 WHERE subject = ?", (subject,))

        await self._call(run)

    async def put_quarantine(self, node_id: str, record: str) -> None:
        def run() -> None:
            self._hard.execute(
                "INSERT INTO quarantine VALUES (?, ?) ON CONFLICT(node) DO UPDATE SET "
                "record = excluded.record",
                (node_id, record),
            )

        await self._call(run)

    async def quarantine_records(self) -> dict[str, str]:
        def run() -> dict[str, str]:
            rows = self._hard.execute("SELECT node, record FROM quarantine").fetchall()
            return {str(n): str(r) for n, r in rows}

        return await self._call(run)

    # -- lifecycle ------------------------------------------------------------------
    async def ping(self) -> bool:
        try:
            await self._call(lambda: self._soft.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._ckpt_pool.shutdown(wait=True)
        self._ckpt_db.close()
        self._soft.close()
        self._hard.close()
        self._fast.close()
