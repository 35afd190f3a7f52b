"""The receipt log: one append-only, tamper-evident transparency log per gateway replica.

Storage: SQLite in WAL mode with ``synchronous=FULL`` (every commit fsyncs the WAL),
embedded, one file per log. A leaf holds only a typed hash (`LogEntry`); receipt bodies
live in a separate table of the same file and may be deleted (retention, erasure) while
every leaf, and so every proof and checkpoint, stays.

Group commit: `append` reserves the next index and queues the leaf without awaiting
anything in between (so indices follow queue order), then waits. One writer task takes
everything queued, writes it in ONE transaction (one fsync) on the log's own database
thread, and only then advances the tree and releases every waiting caller. No caller is
released before its batch is on disk, so a receipt handed to a client survives a SIGKILL
of the process right after. The queue is bounded (`max_queue`): past it, appenders wait.

Checkpoints: `checkpoint()` signs the durable head as a C2SP tlog-checkpoint (origin
``<origin>/<log id>``, key name = origin, Ed25519 signed-note signature with the log key,
separate from the receipt key) and stores it. Witnesses are above the log
(`gateway.receipts.checkpointer`): their cosignatures are stored per (size, witness)
and attached to a checkpoint when it is read, at most one per witness.
A receipt is final once a signed checkpoint includes it.

Chained logs. Leaf 0 of every log is a ``log_start`` entry (`gateway.receipts.entry`)
naming the log it succeeds in this directory (a frozen one's origin and last checkpoint)
or none, so an audit bundle that drops a log, or ships an older head of it, does not
verify. The record it hashes is kept in ``records`` and shipped in bundles.

Erasure is logged. Deleting bodies (`erase`, `expire`, also from another process: the
``ztgate audit erase`` CLI) queues an ``erasure`` record in the directory's active log
(``erasure_queue``, in the same transaction as the deletion when it is that log's own);
the active log appends it before signing its next checkpoint, in the same transaction
that writes the leaf. Only the writing process appends, so two processes never race for
an index, and a body missing without such a leaf is, to a verifier, a dropped receipt.

Frozen logs. A log restored from a backup must never append again: appending after a
rollback would give two different entries the same index, a fork. Two independent checks
at open, either of which freezes the log for good (``FROZEN`` file, read-only from then
on) and starts a fresh log with a new log id for this replica:

1. Birth inode: the database records the inode number its file had when created. A copy
   or restore (``cp``, ``tar x``, ``rsync``, a restore tool) makes a new file, hence a
   new inode. Cheap, no write per append, catches file-level restores at any moment.
2. Head marker (`gateway.receipts.marker`): after durable batches, at most every ~50 ms,
   the log records, off the append path, its log id, size and root in a marker file kept
   *outside* the log directory (default ``<dir>.head`` beside it; in production, other
   storage). At open, the log must be the one the marker names, hold at least that many
   leaves, and reproduce that root. Catches block-level restores (volume snapshots keep inode
   numbers) and file-level ones where the file system reused the old inode number.

What neither can catch, a restore of a state newer than the marker's last write (a
backup taken within the ~50 ms before the crash) or a marker restored together
with the log, the witnesses catch: a witness refuses any checkpoint that is not
consistent with the last one it cosigned (409/422), and the log reports it loudly.

The tree is on disk (`gateway.receipts.treestore`): memory holds the O(log n) frontier
and a bounded cache, whatever the log's size, and opening reads O(log n) rows, not every
leaf. At open the log proves, with a consistency proof read from its own stored hashes,
that the frontier it will append onto extends its latest signed checkpoint and the root
its head marker recorded, so a truncated database, or one edited on that path (frontier,
hashes, or the last leaves), is refused. Edits elsewhere cannot be seen in O(log n) work:
`ReceiptLog.verify_stored` (O(n), bounded memory) re-derives every stored hash from the
leaves, and a bundle's verifier re-derives the root from the leaves it ships.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.files import atomic_write, fsync_dir
from gateway.receipts.canonical import b64, unb64
from gateway.receipts.entry import (
    ENTRY_TYPES,
    TLOG_PROOF_HEADER,
    LogEntry,
    erasure_record,
    record_entry,
    start_record,
)
from gateway.receipts.marker import MIN_INTERVAL_S, HeadMarker
from gateway.receipts.merkle import (
    EMPTY_ROOT,
    Frontier,
    MerkleTree,
    TreeHashes,
    leaf_hash,
    verify_consistency,
)
from gateway.receipts.note import Checkpoint, NoteKey, SignedNote
from gateway.receipts.treestore import (
    NODES_SCHEMA,
    STORED_LEVEL,
    StoredTree,
    TreeCorrupt,
    catch_up,
    last_position,
    node_rows,
    stored_size,
)
from gateway.signer import Signer
from gateway.sqlitedb import open_durable, truncate_wal

__all__ = [
    "ENTRY_TYPES",
    "LogClosed",
    "LogEntry",
    "LogError",
    "LogFrozen",
    "ReceiptLog",
    "StoredBody",
    "tlog_proof",
]

if TYPE_CHECKING:
    from gateway.receipts.signing import KeySet

log = logging.getLogger(__name__)
T = TypeVar("T")


class LogError(Exception):
    """The log cannot do what was asked."""


class LogFrozen(LogError):
    """This log was restored from a backup (or failed a check) and never appends again."""


class LogClosed(LogError):
    pass


class JobReceipted(LogError):
    """The job already has an answer receipt here (and this one does not supersede it)."""


@dataclass(frozen=True, slots=True)
class StoredBody:
    index: int
    receipt_id: str
    body: bytes
    created: float


@dataclass(slots=True)
class _Pending:
    index: int
    data: bytes
    hash: bytes
    body: tuple[str, bytes] | None
    future: asyncio.Future[int] | None
    record: tuple[bytes, int | None] | None = None  # (record bytes, erasure_queue seq)
    job: str | None = None  # the job this answer receipt is for (job_receipts)


@dataclass
class _Stats:
    batches: int = 0
    entries: int = 0
    fsync_seconds: float = 0.0
    largest_batch: int = 0
    extra: dict[str, int] = field(default_factory=dict)


_TABLES = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leaves(idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bodies(
    idx INTEGER PRIMARY KEY, receipt_id TEXT NOT NULL UNIQUE, body BLOB NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS erasures(idx INTEGER PRIMARY KEY, reason TEXT NOT NULL,
    at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints(size INTEGER PRIMARY KEY, note TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS witnesses(name TEXT PRIMARY KEY, size INTEGER NOT NULL,
    vkey TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS cosignatures(size INTEGER NOT NULL, witness TEXT NOT NULL,
    sig BLOB NOT NULL, PRIMARY KEY(size, witness));
CREATE TABLE IF NOT EXISTS records(idx INTEGER PRIMARY KEY, record BLOB NOT NULL,
    at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS erasure_queue(seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS job_receipts(job_id TEXT PRIMARY KEY, idx INTEGER NOT NULL);
-- By leaf too: an erasure deletes the erased receipt's row (`_erase_rows`).
CREATE INDEX IF NOT EXISTS job_receipts_by_idx ON job_receipts(idx);
"""
_SCHEMA = _TABLES + NODES_SCHEMA  # the stored tree hashes: `gateway.receipts.treestore`


def new_log_id() -> str:
    """16 lowercase base32 characters (80 random bits)."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def _root_or_empty(text: str) -> bytes:
    """A marker's root, or b"" (matches no tree) if it is not canonical base64 of 32 bytes."""
    try:
        return unb64(text, 32)
    except ValueError:
        return b""


def tlog_proof(index: int, path: Sequence[bytes], checkpoint_note: str) -> str:
    """A C2SP tlog-proof: index, inclusion path, then the (cosigned) checkpoint verbatim."""
    lines = [TLOG_PROOF_HEADER, f"index {index}", *(b64(h) for h in path)]
    return "\n".join(lines) + "\n\n" + checkpoint_note


class ReceiptLog:
    """One log (one log id). `ReceiptLog.open` picks, or starts, this replica's active log."""

    def __init__(
        self,
        path: Path,
        log_key: Signer | None,
        *,
        marker: Path | None = None,
        max_batch: int = 4096,
        max_queue: int = 16384,
        read_only: bool = False,
        strict: bool = False,
    ) -> None:
        self.path = path
        self._strict = strict  # writes nothing at all (`open_readonly`)
        self._key = log_key
        self.marker = HeadMarker(marker) if marker is not None and not read_only else None
        self._marker_path = marker
        self._marker_thread = ThreadPoolExecutor(1, thread_name_prefix="receipt-log-marker")
        self._marker_task: asyncio.Task[None] | None = None
        self._marker_at = -MIN_INTERVAL_S  # time.monotonic() of the last marker write
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix=f"receipt-log-{path.name}")
        if strict:
            self._db = sqlite3.connect(
                f"file:{path / 'log.db'}?mode=ro", uri=True, check_same_thread=False, timeout=30
            )
        else:
            self._db = open_durable(path / "log.db", timeout=30)
            self._db.executescript(_SCHEMA)
        # Reads go through their own connection: in WAL mode it sees committed data only,
        # never a batch the writer thread has not yet committed.
        self._rdb = sqlite3.connect(
            f"file:{path / 'log.db'}?mode=ro", uri=True, check_same_thread=False, timeout=30
        )
        meta = dict(self._rdb.execute("SELECT k, v FROM meta").fetchall())
        if "log_id" not in meta:
            raise LogError(f"{path} is not a receipt log (no log id)")
        self.log_id: str = meta["log_id"]
        self.origin: str = meta["origin"]
        self.created: str = meta.get("created", "")
        self.frozen_reason: str | None = None
        self.tree: TreeHashes = self._load_tree()
        self.public_key: ed25519.Ed25519PublicKey | None = None
        if "public_key" in meta:
            self.public_key = ed25519.Ed25519PublicKey.from_public_bytes(
                base64.b64decode(meta["public_key"])
            )
        self._next = self.tree.size
        self._pending: list[_Pending] = []
        self._jobs: dict[str, int] = {}  # job id -> index, queued and not yet committed
        self._inflight: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._compact_cursor = -1  # where a bounded compact_checkpoints call resumes
        self._keyset: tuple[int, KeySet] | None = None  # keys.json by mtime (_key_retired_at)
        self._write_lock: asyncio.Lock | None = None
        self.stats = _Stats()
        self.clock: Callable[[], float] = time.time  # checkpoint times (tests move it)
        self._check_integrity(meta, read_only)

    # --- opening -----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: Path,
        log_key: Signer,
        origin: str,
        predecessor: tuple[str, int, bytes] | None = None,
    ) -> Path:
        """A new log whose leaf 0 is its ``log_start`` entry; `predecessor` is the
        (origin, size, root) of the last checkpoint of the log it succeeds, if any."""
        log_id = new_log_id()
        path = directory / log_id
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
        # The database is private (SQLite gives its WAL and shm files the same mode).
        os.close(os.open(path / "log.db", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(path / "log.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            ino = os.stat(path / "log.db").st_ino
            pub = log_key.public_key().public_bytes_raw()
            rows = {
                "log_id": log_id,
                "origin": f"{origin}/{log_id}",
                "created": dt.datetime.now(dt.UTC).isoformat(),
                "birth_inode": str(ino),
                "public_key": b64(pub),
            }
            record = start_record(predecessor)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
            db.execute(
                "INSERT INTO leaves VALUES (0, ?)", (record_entry("log_start", record).leaf_data(),)
            )
            db.execute("INSERT INTO records VALUES (0, ?, ?)", (record, time.time()))
            db.execute("COMMIT")
        finally:
            db.close()
        fsync_dir(path)
        fsync_dir(directory)
        return path

    @classmethod
    def open(
        cls,
        directory: Path,
        log_key: Signer,
        origin: str,
        *,
        marker: Path | None = None,
        max_batch: int = 4096,
        max_queue: int = 16384,
    ) -> ReceiptLog:
        """This replica's active log in `directory`; a new one if none, or if it is frozen.

        `origin` is a prefix, e.g. ``ztgate.local/site-a/receipts``; the log's C2SP origin
        is ``<origin>/<log id>``. Earlier (frozen) logs in the directory stay readable
        through `ReceiptLog.all_logs`.
        """
        directory.mkdir(parents=True, exist_ok=True)
        marker = marker or directory.parent / f"{directory.name}.head"
        current = directory / "CURRENT"
        if current.is_file():
            path = directory / current.read_text().strip()
            receipt_log = cls(
                path, log_key, marker=marker, max_batch=max_batch, max_queue=max_queue
            )
            if receipt_log.frozen_reason is None:
                if (
                    receipt_log.public_key is not None
                    and receipt_log.public_key.public_bytes_raw()
                    != log_key.public_key().public_bytes_raw()
                ):
                    log.warning(
                        "receipt log %s: log key changed; new checkpoints use the new key",
                        receipt_log.log_id,
                    )
                return receipt_log
            log.error(
                "receipt log %s is frozen (%s); starting a new log",
                receipt_log.log_id,
                receipt_log.frozen_reason,
            )
            predecessor = receipt_log.head()
            queued = receipt_log.queued_erasures()
            receipt_log.close_sync()
        else:
            predecessor, queued = None, []
        path = cls.create(directory, log_key, origin, predecessor)
        if queued:  # erasures the frozen log can no longer append: its successor does
            db = sqlite3.connect(path / "log.db", isolation_level=None)
            try:
                db.executemany(
                    "INSERT INTO erasure_queue(record) VALUES (?)", [(r,) for _, r in queued]
                )
            finally:
                db.close()
        marker_file = HeadMarker(marker)
        try:
            marker_file.write(path.name, 0, b64(EMPTY_ROOT))
        finally:
            marker_file.close()
        atomic_write(current, path.name.encode())
        return cls(path, log_key, marker=marker, max_batch=max_batch, max_queue=max_queue)

    @classmethod
    def open_readonly(cls, path: Path, *, strict: bool = False) -> ReceiptLog:
        """A log this process does not append to. `strict`: another process's log, which
        this one only reads: both connections read-only, no schema script, no stored
        hashes caught up (its writer does that); erasures need the default."""
        return cls(path, None, read_only=True, strict=strict)

    @staticmethod
    def all_logs(directory: Path) -> list[Path]:
        """Every log directory under `directory` (active and frozen), oldest first."""
        found = [p.parent for p in directory.glob("*/log.db")]
        return sorted(found, key=lambda p: (p / "log.db").stat().st_mtime)

    def _load_tree(self) -> TreeHashes:
        """The stored tree, in O(log n) reads (after storing any hashes missing: a log
        from before they were stored, once). A log whose tree cannot be read (leaves or
        hashes missing) is frozen and read the old way, all leaves into memory, so it
        stays exportable."""
        size = stored_size(self._rdb)
        try:
            hashed = 0 if self._strict else catch_up(self._rdb, self._db, size)
            if hashed:
                log.warning(
                    "receipt log %s: stored the tree hashes of %d leaves", self.log_id, hashed
                )
            return StoredTree.load(self._rdb, size)
        except TreeCorrupt as exc:
            self._freeze_reason(str(exc))
        tree = MerkleTree()
        for (data,) in self._rdb.execute("SELECT data FROM leaves ORDER BY idx"):
            tree.append(leaf_hash(bytes(data)))
        return tree

    def _extends(self, size: int, root: bytes) -> bool:
        """Whether the tree, as it will be appended onto (its frontier), extends the tree
        of `size` leaves with `root`: a consistency proof read from the stored hashes,
        checked like a witness would. O(log n) reads."""
        n = self.tree.size
        if size > n:
            return False
        try:
            proof = self.tree.consistency_proof(size, n)
            return verify_consistency(size, n, root, self.tree.root(), proof)
        except TreeCorrupt:
            return False

    def _freeze_reason(self, reason: str) -> None:
        if self.frozen_reason is None:
            self.frozen_reason = reason

    def _check_integrity(self, meta: dict[str, str], read_only: bool) -> None:
        frozen_file = self.path / "FROZEN"
        if frozen_file.is_file():
            self._freeze_reason(frozen_file.read_text().strip() or "frozen")
        ino = os.stat(self.path / "log.db").st_ino
        if meta.get("birth_inode") != str(ino):
            self._freeze_reason(
                "the database file is not the one this log was created in (restored or "
                "copied from a backup)"
            )
        last = self.latest_checkpoint()
        if last is not None:
            cp = Checkpoint.parse_text(last.text)
            if not self._extends(cp.size, cp.root):
                self._freeze_reason(
                    f"leaves do not reproduce the last checkpoint (size {cp.size}): "
                    "truncated or edited"
                )
        head = HeadMarker(self._marker_path).read() if self._marker_path is not None else None
        if head is not None and not read_only:
            if head.log_id != self.log_id:
                self._freeze_reason(
                    f"the head marker names log {head.log_id} as this replica's current log: "
                    "this one was restored from a backup"
                )
            elif not self._extends(head.size, _root_or_empty(head.root)):
                self._freeze_reason(
                    f"behind its head marker (marker says size {head.size}, log has "
                    f"{self.tree.size}): restored from a backup"
                )
        if isinstance(self.tree, StoredTree) and not read_only:
            # Stored hashes past the leaves: leaves were deleted from the end (a later
            # append would also collide with them). Not for a reader: the writing process
            # may have committed leaves and hashes since this one read the size.
            n = self.tree.size
            row = self._rdb.execute("SELECT max(pos) FROM nodes").fetchone()
            if row[0] is not None and int(row[0]) > last_position(n):
                self._freeze_reason(
                    f"stored tree hashes run past the last leaf (size {n}): truncated"
                )
        if self.frozen_reason is not None and not read_only and not frozen_file.is_file():
            atomic_write(frozen_file, (self.frozen_reason + "\n").encode())

    @property
    def frozen(self) -> bool:
        return self.frozen_reason is not None

    @property
    def size(self) -> int:
        """Durable size: leaves that are on disk (fsynced)."""
        return self.tree.size

    def head(self) -> tuple[str, int, bytes]:
        """(origin, size, root) of the latest checkpoint (size 0 and the empty root if
        none): what a successor's ``log_start`` commits to, and what a bundle ships."""
        last = self.latest_checkpoint()
        if last is None:
            return self.origin, 0, EMPTY_ROOT
        cp = Checkpoint.parse_text(last.text)
        return self.origin, cp.size, cp.root

    def note_key(self) -> NoteKey:
        pub = self._key.public_key() if self._key is not None else self.public_key
        if pub is None:
            raise LogError("log has no key")
        return NoteKey(self.origin, pub)

    # --- appending (group commit) --------------------------------------------------------
    async def append(self, entry: LogEntry, body: tuple[str, bytes] | None = None) -> int:
        """Append one entry (and an optional (receipt id, body)); returns its index once
        the batch holding it is fsynced."""
        return await self.append_built(lambda _index: (entry, body))

    async def append_record(self, entry: LogEntry, record: bytes) -> int:
        """Append a typed leaf whose `record` (the JSON it hashes) is kept beside it in
        ``records`` and shipped in bundles: late evidence, quarantine and release events.
        The record commits with its leaf, or neither does."""
        return await self.append_built(lambda _index: (entry, None), record=record)

    def late_evidence(self, receipt_id: str) -> list[tuple[int, bytes]]:
        """(index, record) of the late_evidence leaves about `receipt_id`, in log order."""
        # Scans the records table (events only, never receipts); exact match below.
        rows = self._rdb.execute(
            "SELECT l.idx, l.data, r.record FROM records r JOIN leaves l ON l.idx = r.idx "
            "WHERE instr(l.data, ?) > 0 ORDER BY l.idx",
            (receipt_id.encode(),),
        ).fetchall()
        out = []
        for i, data, record in rows:
            entry = LogEntry.parse(bytes(data))
            if entry.type == "late_evidence" and entry.ref == receipt_id:
                out.append((int(i), bytes(record)))
        return out

    async def append_built(
        self,
        build: Callable[[int], tuple[LogEntry, tuple[str, bytes] | None]],
        *,
        record: bytes | None = None,
        job: tuple[str, int | None] | None = None,
    ) -> int:
        """Like `append`, for entries that embed their own index (receipts).

        `build(index)` runs synchronously right after the index is reserved, so it must
        not fail for reasons other than bugs; its entry takes exactly that index.

        `job` = (job id, the index of the receipt this one supersedes, or None): the
        receipt is indexed under the job id in the same transaction as its leaf, and
        refused (`JobReceipted`) unless it supersedes exactly the job's current receipt.
        """
        if self.frozen_reason is not None:
            raise LogFrozen(f"log {self.log_id} is frozen: {self.frozen_reason}")
        if self._closed:
            raise LogClosed(f"log {self.log_id} is closed")
        self._start()
        assert self._slots is not None and self._wake is not None
        await self._slots.acquire()
        try:
            if job is not None:  # checked after the wait: nothing can slip in between
                current = self.job_receipt(job[0])
                if current != job[1]:
                    raise JobReceipted(f"job already has receipt {current} in {self.log_id}")
            index = self._next
            entry, body = build(index)
            data = entry.leaf_data()
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            rec = None if record is None else (record, None)
            job_id = None if job is None else job[0]
            self._pending.append(_Pending(index, data, leaf_hash(data), body, fut, rec, job_id))
            if job_id is not None:
                self._jobs[job_id] = index
            self._next += 1
        except BaseException:
            self._slots.release()
            raise
        self._wake.set()
        return await fut

    def _start(self) -> None:
        if self._writer is None:
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.max_queue)
            self._write_lock = asyncio.Lock()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _in_db(self, fn: Callable[[], T]) -> T:
        return await _in_thread(self._db_thread, fn)

    async def _write_loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: len(batch)]
                self._inflight = batch
                tree = self.tree
                assert isinstance(tree, StoredTree)  # a frozen log (the fallback) never appends
                try:
                    seconds, frontier = await self._in_db(
                        partial(self._write_batch, batch, tree.frontier)
                    )
                except BaseException as exc:
                    # Nothing of this batch is durable: fail it and everything queued
                    # behind it (their indices follow the failed ones), then reuse them.
                    failed = batch + self._pending
                    self._pending = []
                    self._inflight = []
                    self._next = self.tree.size
                    for p in failed:
                        self._unqueue_job(p)
                        if p.future is not None and not p.future.done():
                            p.future.set_exception(LogError(f"receipt log write failed: {exc}"))
                        self._slots.release()
                    log.error("receipt log %s: batch write failed: %s", self.log_id, exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                # The batch's hashes were computed and stored with it: only the O(log n)
                # frontier changes hands here, on the event loop.
                tree.advance(frontier)
                for p in batch:
                    self._unqueue_job(p)  # committed: job_receipts has it now
                    if p.future is not None and not p.future.done():
                        p.future.set_result(p.index)
                    self._slots.release()
                self._inflight = []
                self._schedule_marker()
                self.stats.batches += 1
                self.stats.entries += len(batch)
                self.stats.fsync_seconds += seconds
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            if self._closed and not self._pending:
                return

    def _unqueue_job(self, p: _Pending) -> None:
        if p.job is not None and self._jobs.get(p.job) == p.index:
            del self._jobs[p.job]

    async def committed_job_receipt(self, job_id: str) -> int | None:
        """`job_receipt` once no receipt of the job is queued: a queued one has no body to
        compare yet. Bounded: another run of the same job queueing again and again (never
        in one gateway's runner) is refused as retryable (`JobReceipted`, a `LogError`)."""
        for _ in range(3):
            if job_id not in self._jobs:
                return self.job_receipt(job_id)
            await self.flush()  # the queued receipt commits or fails; either ends its queueing
        raise JobReceipted(f"job receipt still queued in {self.log_id}")

    def job_receipt(self, job_id: str) -> int | None:
        """The index of the job's latest answer receipt in this log (queued ones too), or
        None: a dict look-up, then one primary-key read."""
        queued = self._jobs.get(job_id)
        if queued is not None:
            return queued
        try:
            row = self._rdb.execute(
                "SELECT idx FROM job_receipts WHERE job_id = ?", (job_id,)
            ).fetchone()
        except sqlite3.OperationalError:  # a log from before the index, opened read-only
            return None
        return int(row[0]) if row else None

    def _write_batch(self, batch: list[_Pending], frontier: Frontier) -> tuple[float, Frontier]:
        """One transaction, one WAL fsync (synchronous=FULL) for the whole batch, with the
        hashes of the subtrees it completes; returns (seconds, the frontier after it).
        Runs on the database thread: the batch's hashing is off the event loop."""
        t0 = time.perf_counter()
        now = time.time()
        after, nodes = frontier.extend((p.hash for p in batch), STORED_LEVEL)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO leaves VALUES (?, ?)", [(p.index, p.data) for p in batch])
            if nodes:
                db.executemany("INSERT INTO nodes VALUES (?, ?)", node_rows(nodes))
            bodies = [(p.index, p.body[0], p.body[1], now) for p in batch if p.body is not None]
            if bodies:
                db.executemany("INSERT INTO bodies VALUES (?, ?, ?, ?)", bodies)
            records = [(p.index, p.record) for p in batch if p.record is not None]
            if records:  # a record and its leaf commit together, or neither does
                db.executemany(
                    "INSERT INTO records VALUES (?, ?, ?)", [(i, r[0], now) for i, r in records]
                )
                db.executemany(
                    "DELETE FROM erasure_queue WHERE seq = ?",
                    [(r[1],) for _, r in records if r[1] is not None],
                )
            jobs = [(p.job, p.index) for p in batch if p.job is not None]
            if jobs:  # the job's receipt and its index commit together, or neither does
                db.executemany("INSERT OR REPLACE INTO job_receipts VALUES (?, ?)", jobs)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return time.perf_counter() - t0, after

    async def append_many(self, items: Sequence[tuple[LogEntry, tuple[str, bytes] | None]]) -> int:
        """Append entries in one transaction, bypassing the queue: for tools that load a
        log (`gateway.receipts.fill`), not the serving path. Nothing else may be appending
        at the same time. Returns the index of the first."""
        if self.frozen_reason is not None:
            raise LogFrozen(f"log {self.log_id} is frozen: {self.frozen_reason}")
        if self._pending or self._inflight:
            raise LogError("append_many while appends are queued")
        tree = self.tree
        assert isinstance(tree, StoredTree)
        first = self._next
        batch = []
        for i, (entry, body) in enumerate(items):
            data = entry.leaf_data()
            batch.append(_Pending(first + i, data, leaf_hash(data), body, None))
        self._next += len(batch)
        try:
            _, frontier = await self._in_db(partial(self._write_batch, batch, tree.frontier))
        except BaseException:
            self._next = first
            raise
        tree.advance(frontier)
        self._schedule_marker()
        return first

    async def flush(self) -> None:
        """Wait until everything queued so far is durable (or has failed)."""
        futures = [p.future for p in (*self._inflight, *self._pending) if p.future is not None]
        if futures:
            await asyncio.gather(*futures, return_exceptions=True)

    # --- checkpoints -------------------------------------------------------------------
    async def checkpoint(self) -> SignedNote:
        """Sign the durable head (unless the latest checkpoint already covers it) and
        store it. Witnessing is the checkpointer's job, above the log."""
        if self.frozen_reason is not None:
            raise LogFrozen(f"log {self.log_id} is frozen: {self.frozen_reason}")
        if self._key is None:
            raise LogError("a read-only log signs nothing")
        self._start()
        assert self._write_lock is not None
        async with self._write_lock:
            await self._log_queued_erasures()
            last = self.latest_checkpoint()
            size = self.tree.size
            if last is not None and Checkpoint.parse_text(last.text).size == size:
                return last
            cp = Checkpoint(self.origin, size, self.tree.root(size), int(self.clock()))
            text = cp.text()
            note = SignedNote(text, (self.note_key().sign(self._key, text),))
            await self._in_db(lambda: self._store_checkpoint(size, note))
            return note

    async def _log_queued_erasures(self) -> None:
        """Append the queued erasure records (see the module docstring), in queue order."""
        for seq, record in self.queued_erasures():
            entry = record_entry("erasure", record)
            data = entry.leaf_data()
            self._start()
            assert self._slots is not None and self._wake is not None
            await self._slots.acquire()
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._pending.append(
                _Pending(self._next, data, leaf_hash(data), None, fut, (record, seq))
            )
            self._next += 1
            self._wake.set()
            await fut

    def queued_erasures(self) -> list[tuple[int, bytes]]:
        return [
            (int(q), bytes(r))
            for q, r in self._rdb.execute("SELECT seq, record FROM erasure_queue ORDER BY seq")
        ]

    def record(self, index: int) -> bytes | None:
        """The record a ``log_start`` or ``erasure`` leaf at `index` hashes."""
        row = self._rdb.execute("SELECT record FROM records WHERE idx = ?", (index,)).fetchone()
        return bytes(row[0]) if row else None

    def records_since(self, at: float) -> list[int]:
        """Indices of records logged at or after `at` (POSIX seconds)."""
        return [
            int(r[0]) for r in self._rdb.execute("SELECT idx FROM records WHERE at >= ?", (at,))
        ]

    def cosigners(self) -> dict[int, set[str]]:
        """Checkpoint size -> the witnesses whose cosignature of it is kept."""
        out: dict[int, set[str]] = {}
        for size, witness in self._rdb.execute("SELECT size, witness FROM cosignatures"):
            out.setdefault(int(size), set()).add(str(witness))
        return out

    def _tx(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Run statements in one transaction on the writer connection (database thread)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                db.execute(sql, args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _store_checkpoint(self, size: int, note: SignedNote) -> None:
        self._tx(
            [
                (
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                    (size, note.render(), time.time()),
                )
            ]
        )

    def _schedule_marker(self) -> None:
        if self.marker is not None and (self._marker_task is None or self._marker_task.done()):
            self._marker_task = asyncio.get_running_loop().create_task(self._marker_loop())

    async def _marker_loop(self) -> None:
        """Record the newest durable head; one write in flight, repeated while it grows."""
        assert self.marker is not None
        written = -1
        while written != self.tree.size:
            # At most one fdatasync per MIN_INTERVAL_S: the marker is a lower bound that may
            # lag (gateway.receipts.marker), and a write per batch cost a sync per batch.
            wait = self._marker_at + MIN_INTERVAL_S - time.monotonic()
            if wait > 0 and not self._closed:
                await asyncio.sleep(wait)
            self._marker_at = time.monotonic()
            size = self.tree.size
            root = b64(self.tree.root(size))
            try:
                await _in_thread(
                    self._marker_thread, partial(self.marker.write, self.log_id, size, root)
                )
            except OSError as exc:
                log.error("receipt log %s: head marker write failed: %s", self.log_id, exc)
                return
            written = size

    def log_signed(self, note: SignedNote) -> SignedNote:
        """`note` with only this log's own signature (what a witness is asked to cosign)."""
        return SignedNote(note.text, tuple(s for s in note.signatures if s[0] == self.origin))

    def witness_size(self, name: str) -> int:
        """The size witness `name` last cosigned for this log (0: never)."""
        row = self._rdb.execute("SELECT size FROM witnesses WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def has_cosignature(self, size: int, witness: str) -> bool:
        row = self._rdb.execute(
            "SELECT 1 FROM cosignatures WHERE size = ? AND witness = ?", (size, witness)
        ).fetchone()
        return row is not None

    async def add_cosignature(self, size: int, witness: str, sig: bytes, vkey: str) -> None:
        """Keep witness `witness`'s cosignature of the checkpoint of `size` (one per pair)."""
        await self._in_db(
            partial(
                self._tx,
                [
                    ("INSERT OR REPLACE INTO cosignatures VALUES (?, ?, ?)", (size, witness, sig)),
                    ("INSERT OR REPLACE INTO witnesses VALUES (?, ?, ?)", (witness, size, vkey)),
                ],
            )
        )

    def _with_cosignatures(self, size: int, note: SignedNote) -> SignedNote:
        rows = self._rdb.execute(
            "SELECT witness, sig FROM cosignatures WHERE size = ? ORDER BY witness", (size,)
        ).fetchall()
        return note.with_signatures([(str(w), bytes(sig)) for w, sig in rows])

    def witness_vkeys(self) -> dict[str, str]:
        """Witnesses that cosigned this log: name -> vkey (published in bundles)."""
        return {n: k for n, k in self._rdb.execute("SELECT name, vkey FROM witnesses") if k}

    def latest_checkpoint(self) -> SignedNote | None:
        row = self._rdb.execute(
            "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return self._with_cosignatures(row[0], SignedNote.parse(row[1])) if row else None

    def checkpoint_at(self, size: int) -> SignedNote | None:
        row = self._rdb.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        return self._with_cosignatures(size, SignedNote.parse(row[0])) if row else None

    def checkpoints(self, since_size: int = 0) -> list[SignedNote]:
        rows = self._rdb.execute(
            "SELECT size, note FROM checkpoints WHERE size >= ? ORDER BY size", (since_size,)
        ).fetchall()
        return [self._with_cosignatures(r[0], SignedNote.parse(r[1])) for r in rows]

    def checkpoint_including(self, index: int) -> SignedNote | None:
        """The earliest checkpoint whose tree includes leaf `index` (None: pending)."""
        row = self._rdb.execute(
            "SELECT size, note FROM checkpoints WHERE size > ? ORDER BY size LIMIT 1", (index,)
        ).fetchone()
        return self._with_cosignatures(row[0], SignedNote.parse(row[1])) if row else None

    def _proof_checkpoint(self, index: int) -> SignedNote | None:
        """The checkpoint a lone receipt's proof is served against: of those including leaf
        `index`, the one with the most witness cosignatures, the latest among equals (so
        the latest covering one while none is cosigned).

        Not the earliest: a replica killed after signing a checkpoint and before the witness
        cosigned it never gets that cosignature, and a proof against it could never satisfy
        a witness policy; a later checkpoint includes the leaf too. A lone receipt's key
        window is judged by its proof's checkpoint time (`gateway.receipts.verify`), so if
        the receipt's key has been retired (`keys.json` beside the log), only checkpoints
        signed within its window are candidates, unless there are none."""
        ranked = self._rdb.execute(
            "SELECT c.size FROM checkpoints c LEFT JOIN cosignatures w ON w.size = c.size "
            "WHERE c.size > ? GROUP BY c.size ORDER BY COUNT(w.witness) DESC, c.size DESC",
            (index,),
        ).fetchall()
        if not ranked:
            return None
        until = self._key_retired_at(index)
        for (size,) in ranked:
            note = self.checkpoint_at(int(size))
            assert note is not None
            if until is None or (Checkpoint.parse_text(note.text).time or 0) <= until:
                return note
        return self.checkpoint_at(int(ranked[0][0]))

    def _key_retired_at(self, index: int) -> float | None:
        """When the key that signed the receipt at `index` was retired (POSIX seconds), per
        the published key set beside the log; None: current, unknown, or no body kept."""
        from gateway.receipts.model import FormatError, SignedReceipt
        from gateway.receipts.signing import KeySet

        row = self._rdb.execute("SELECT body FROM bodies WHERE idx = ?", (index,)).fetchone()
        if row is None:
            return None
        keys = self.path.parent / "keys.json"
        try:
            stamp = keys.stat().st_mtime_ns
        except OSError:
            return None
        try:
            # Parsed once per version of the file, not once per proof served.
            if self._keyset is None or self._keyset[0] != stamp:
                self._keyset = (stamp, KeySet.load(keys))
            key = self._keyset[1].get(SignedReceipt.from_bytes(bytes(row[0])).receipt.key_id)
        except (FormatError, ValueError, KeyError, OSError):
            return None
        return None if key is None or key.valid_until is None else key.valid_until.timestamp()

    # --- checkpoint retention ---------------------------------------------------------
    async def compact_checkpoints(
        self, keep_every_s: float, keep_latest: int = 64, limit: int | None = None
    ) -> int:
        """Delete stored checkpoints (and their cosignatures) that no verification needs;
        returns how many checkpoints were deleted. See `compact_checkpoints_sync`."""
        return await self._in_db(
            partial(self.compact_checkpoints_sync, keep_every_s, keep_latest, limit)
        )

    def compact_checkpoints_sync(
        self, keep_every_s: float, keep_latest: int = 64, limit: int | None = None
    ) -> int:
        """`compact_checkpoints` for a process that does not append. Kept:

        - the latest `keep_latest` (at least 1: the head, which a successor log and every
          export commit to, and the one a witness is cosigning now);
        - the latest of each `keep_every_s` window of checkpoint time: a sparse history
          an auditor can bisect with consistency proofs;
        - for every receipt body still stored, the earliest checkpoint including it: a
          receipt's key window is judged by that checkpoint's time (export adds it; if it
          went, the next one might fall after the key's retirement);
        - the latest checkpoint cosigned by each witness, and by at least k witnesses for
          each k: export ships these to satisfy any witness policy, and a receipt's proof
          (`proof`, export) uses the most cosigned checkpoint covering it, which is always
          among them (the latest with >= k cosignatures covers whatever an earlier one
          with k covered).

        So an export of the stored bodies is the same before and after compaction. Any two
        kept sizes are still linked by consistency proofs: those come from the tree.

        `limit` bounds the work of one call (it holds the writer): it looks at the next
        `limit` checkpoints after where the previous call stopped, wrapping round at the
        head. A window cut by a chunk's edge keeps one extra checkpoint, never one fewer."""
        if not keep_every_s > 0:
            raise ValueError("keep_every_s must be positive")
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # read and delete against one state of the tables
        try:
            latest = {
                int(r[0])
                for r in db.execute(
                    "SELECT size FROM checkpoints ORDER BY size DESC LIMIT ?",
                    (max(1, keep_latest),),
                )
            }
            cursor = self._compact_cursor if limit is not None else -1
            rows = db.execute(  # LIMIT -1: no limit, in SQLite
                "SELECT size, note, created FROM checkpoints WHERE size > ? ORDER BY size LIMIT ?",
                (cursor, -1 if limit is None else limit),
            ).fetchall()
            if limit is not None:
                done = len(rows) < limit or int(rows[-1][0]) >= max(latest, default=0)
                self._compact_cursor = -1 if done else int(rows[-1][0])
            sizes = [int(r[0]) for r in rows]
            keep = {s for s in sizes if s in latest}
            # The body check below needs the size before the chunk's first one.
            before = db.execute(
                "SELECT MAX(size) FROM checkpoints WHERE size <= ?", (max(cursor, 0),)
            ).fetchone()[0]
            windows: dict[int, int] = {}
            for size, note, created in rows:
                try:
                    t = Checkpoint.parse_text(SignedNote.parse(note).text).time
                except ValueError:
                    t = None
                window = int((t if t is not None else float(created)) // keep_every_s)
                windows[window] = max(windows.get(window, -1), int(size))
            keep.update(windows.values())
            prev = int(before) if before is not None and cursor >= 0 else 0
            for size in sizes:
                # the earliest checkpoint including a body in prev..size-1 is this one
                if db.execute(
                    "SELECT 1 FROM bodies WHERE idx >= ? AND idx < ? LIMIT 1", (prev, size)
                ).fetchone():
                    keep.add(size)
                prev = size
            # Latest cosigned by each witness, and by at least k witnesses for each k: over
            # the whole table, in SQL (it only keeps what compaction left, so stays small).
            keep.update(
                int(r[0]) for r in db.execute("SELECT MAX(size) FROM cosignatures GROUP BY witness")
            )
            counts = db.execute(
                "SELECT size, COUNT(*) FROM cosignatures GROUP BY size ORDER BY size DESC"
            ).fetchall()
            best = 0
            for size, n in counts:  # newest first: the first size reaching each new k
                if int(n) > best:
                    keep.add(int(size))
                    best = int(n)
            gone = [(s,) for s in sizes if s not in keep]
            db.executemany("DELETE FROM checkpoints WHERE size = ?", gone)
            db.executemany("DELETE FROM cosignatures WHERE size = ?", gone)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(gone)

    def verify_stored(self, start: int = 0, end: int | None = None) -> int | None:
        """Re-derive the stored tree hashes of leaves start..end from the leaves (O(n),
        bounded memory: a scrub, not an open-time check); the first index of a group that
        does not match (edited or missing leaf or hash), or None."""
        if not isinstance(self.tree, StoredTree):
            return 0  # frozen because its tree could not be read at all
        return self.tree.verify(start, end)

    # --- proofs ------------------------------------------------------------------------
    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        return self.tree.inclusion_proof(index, size)

    def consistency(self, first: int, second: int | None = None) -> list[bytes]:
        return self.tree.consistency_proof(first, second)

    def proof(self, index: int, *, latest: bool = False) -> str | None:
        """A self-contained C2SP tlog-proof for leaf `index`, cosignatures included, against
        the latest checkpoint including it (`latest`), or else the one `ztgate verify
        --require-witness` can accept alone (`_proof_checkpoint`); None: pending."""
        note = self.latest_checkpoint() if latest else self._proof_checkpoint(index)
        if note is None:
            return None
        cp = Checkpoint.parse_text(note.text)
        if cp.size <= index:
            return None
        return tlog_proof(index, self.inclusion(index, cp.size), note.render())

    def entry(self, index: int) -> LogEntry:
        row = self._rdb.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
        if row is None:
            raise IndexError(index)
        return LogEntry.parse(bytes(row[0]))

    def entries(self, start: int = 0, end: int | None = None) -> Iterable[tuple[int, LogEntry]]:
        end = self.tree.size if end is None else end
        for idx, data in self._rdb.execute(
            "SELECT idx, data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
        ):
            yield int(idx), LogEntry.parse(bytes(data))

    # --- bodies: retention and erasure ----------------------------------------------------
    def body(self, receipt_id: str) -> StoredBody | None:
        row = self._rdb.execute(
            "SELECT idx, receipt_id, body, created FROM bodies WHERE receipt_id = ?",
            (receipt_id,),
        ).fetchone()
        return StoredBody(int(row[0]), row[1], bytes(row[2]), float(row[3])) if row else None

    def sign_note(self, text: str) -> SignedNote:
        """`text` signed with this log's checkpoint key (an upload to the core's vault)."""
        if self._key is None:
            raise LogError("a read-only log signs nothing")
        return SignedNote(text, (self.note_key().sign(self._key, text),))

    def body_at(self, index: int) -> bytes | None:
        """The receipt body of leaf `index`, if stored (not erased, not another type)."""
        row = self._rdb.execute("SELECT body FROM bodies WHERE idx = ?", (index,)).fetchone()
        return bytes(row[0]) if row else None

    def bodies(self, since: float = 0.0) -> Iterable[StoredBody]:
        for row in self._rdb.execute(
            "SELECT idx, receipt_id, body, created FROM bodies WHERE created >= ? ORDER BY idx",
            (since,),
        ):
            yield StoredBody(int(row[0]), row[1], bytes(row[2]), float(row[3]))

    def erased(self, start: int = 0, end: int | None = None) -> dict[int, str]:
        """Index -> erasure reason, for indices start..end-1 (default: all)."""
        rows = self._rdb.execute(
            "SELECT idx, reason FROM erasures WHERE idx >= ? AND idx < ?",
            (start, 2**63 - 1 if end is None else end),
        )
        return {int(i): r for i, r in rows}

    def erased_at(self, index: int) -> str | None:
        """Why the body at `index` was erased, or None: one primary-key look-up (O(log n)),
        for per-request reads that must not load the whole table."""
        row = self._rdb.execute("SELECT reason FROM erasures WHERE idx = ?", (index,)).fetchone()
        return str(row[0]) if row else None

    async def erase(self, receipt_ids: Iterable[str], reason: str) -> int:
        """Delete receipt bodies (an erasure request); leaves and proofs stay. Returns count."""
        wanted = list(receipt_ids)
        return await self._in_db(lambda: self.erase_sync(wanted, reason))

    def erase_sync(self, receipt_ids: list[str], reason: str) -> int:
        """`erase` for a process that does not append (the `ztgate audit erase` CLI)."""
        rows = []
        for rid in receipt_ids:
            row = self._db.execute(
                "SELECT idx, receipt_id FROM bodies WHERE receipt_id = ?", (rid,)
            ).fetchone()
            if row is not None:
                rows.append((int(row[0]), str(row[1])))
        return self._erase_rows(rows, reason)

    async def expire(self, older_than_s: float, reason: str = "retention") -> int:
        """Delete receipt bodies older than the retention period; returns how many."""
        return await self._in_db(lambda: self.expire_sync(older_than_s, reason))

    def expire_sync(self, older_than_s: float, reason: str = "retention") -> int:
        """`expire` for a process that does not append (the `ztgate audit expire` CLI)."""
        cutoff = time.time() - older_than_s
        rows = [
            (int(r[0]), str(r[1]))
            for r in self._db.execute(
                "SELECT idx, receipt_id FROM bodies WHERE created < ?", (cutoff,)
            )
        ]
        return self._erase_rows(rows, reason)

    def _erase_rows(self, rows: list[tuple[int, str]], reason: str) -> int:
        """Delete bodies and their evidence so that no copy is left in this log's files:
        `secure_delete` zeroes the freed cells, and the WAL, which still holds the old
        pages, is checkpointed into the database and truncated."""
        if not rows:
            return 0
        now = time.time()
        record = erasure_record(self.origin, (i for i, _ in rows), reason)
        queue = ("INSERT INTO erasure_queue(record) VALUES (?)", (record,))
        active = self._active_path()
        if active is not None and active != self.path:
            # Queued before the deletion: a crash in between leaves a logged erasure of a
            # body still present (harmless), never a body gone without one.
            other = sqlite3.connect(active / "log.db", isolation_level=None, timeout=30)
            try:
                other.execute(*queue)
            finally:
                other.close()
        self._tx(
            [
                *(
                    s
                    for i, _ in rows
                    for s in (
                        ("DELETE FROM bodies WHERE idx = ?", (i,)),
                        ("INSERT OR REPLACE INTO erasures VALUES (?, ?, ?)", (i, reason, now)),
                        # No row naming a job outlives its receipt's body: a run after
                        # this is the job's first receipt here, not a reuse of a gone one.
                        ("DELETE FROM job_receipts WHERE idx = ?", (i,)),
                    )
                ),
                *([queue] if active is None or active == self.path else []),
            ]
        )
        # One listing per call, not a glob per receipt: a pass of N erasures in a directory
        # of M evidence files is O(N + M), not O(N * M), on the writer thread.
        gone = {rid for _, rid in rows}
        evidence = self.path / "evidence"
        with os.scandir(evidence) if evidence.is_dir() else contextlib.nullcontext(()) as it:
            for entry in it:
                if entry.is_file() and _evidence_owner(entry.name) in gone:
                    Path(entry.path).unlink(missing_ok=True)
        if not truncate_wal(self._db):
            log.warning(
                "receipt log %s: WAL still in use after erasure; retried next time", self.log_id
            )
        return len(rows)

    def _active_path(self) -> Path | None:
        """The directory's active log (the one that appends), per its ``CURRENT`` file."""
        current = self.path.parent / "CURRENT"
        if not current.is_file():
            return None
        path = self.path.parent / current.read_text().strip()
        return path if (path / "log.db").is_file() else None

    # --- closing -----------------------------------------------------------------------
    async def close(self) -> None:
        self._closed = True
        if self._writer is not None and self._wake is not None:
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._marker_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._marker_task
        self.close_sync()

    def close_sync(self) -> None:
        self._closed = True
        self._marker_thread.shutdown(wait=True)
        if self.marker is not None:
            self.marker.close()
        self._db_thread.shutdown(wait=True)
        self._db.close()
        self._rdb.close()

    def describe(self) -> dict[str, Any]:
        """What `GET /log` shows for this log."""
        last = self.latest_checkpoint()
        return {
            "log_id": self.log_id,
            "origin": self.origin,
            "size": self.size,
            "frozen": self.frozen_reason,
            "checkpoint_vkey": self.note_key().vkey(),
            "checkpoint": last.render() if last else None,
        }


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    """`fn()` on `executor`'s thread: one hop there and one back per call (a batch),
    without `run_in_executor`'s extra layers (a second future chained to the executor's
    and, under uvloop, an inspection of `fn`'s signature on every call), which cost the
    event loop more per batch than signing a receipt (profiled). Cancelling the wait
    cancels `fn` only if it has not started, as with `run_in_executor`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the waiter, as run_in_executor does
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    started = executor.submit(work)
    try:
        return await done
    except asyncio.CancelledError:
        started.cancel()
        raise


def _settle(fut: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    """Resolve `fut` on its loop with what the database thread returned or raised."""
    if fut.done():  # its waiter was cancelled meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)  # type: ignore[arg-type]  # None only beside an exception


def _evidence_owner(name: str) -> str:
    """The receipt id an evidence file belongs to: ``<log id>.<index>.<nonce>.<what>...``."""
    return ".".join(name.split(".", 3)[:3])
