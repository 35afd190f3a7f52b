"""The receipt log's Merkle tree, kept in its SQLite database rather than in memory.

What is stored, and why. A table ``nodes(pos, hash)`` holds the hash of every complete,
aligned subtree of ``2^level`` leaves (``level`` >= `STORED_LEVEL` = 4, i.e. 16 leaves and
up), written in the same transaction as the leaves that complete it. Smaller subtrees are
recomputed from the leaves table when needed (at most 8 leaf rows and 15 hashes for a
3-level subtree). The key is the subtree's post-order position (`position`: the order in
which an append-only tree completes its subtrees, as in a Merkle mountain range), not
(level, index): positions only grow, so a batch's hashes land on the last page of the
table's b-tree, as its leaves do (keyed by (level, index), a batch dirtied a page per
level: +2 us per append on the database thread, measured in `bench/log_scale.py`). So:

- one extra row per 8 leaves on the append path (1/16 + 1/32 + ...), about 5 bytes per
  leaf on disk (5 MB at 1M entries, beside 105 MB of leaves), instead of 2 rows per leaf
  for every level, or none (the old design kept every level in memory, 64 bytes per
  leaf, and re-hashed every leaf at open);
- any node of the tree is one indexed read (level >= 4) or one range read of <= 8 leaves,
  so a proof or a past root reads O(log n) rows (O(log^2 n) at worst for a root of a past
  size, whose right edge is not stored as such), never the whole log.

The shape is that of C2SP tlog-tiles with one-level tiles above height 4: we never serve
tiles, so one row per hash keeps reads to exactly what a proof needs and writes to the
rows a batch completes (a tile row would be rewritten as it fills, or need a partial-tile
side table).

In memory: the `Frontier` (the O(log n) right edge: one hash per set bit of the size,
all an append and the current root need) and a bounded LRU cache of nodes read from disk
(`cache_size` entries, ~200 bytes each: 1024 by default, ~0.2 MiB), which keeps the top of
the tree (shared by every proof) and the neighbourhood of the last proofs (an export's
proofs are of consecutive receipts) hot. Nothing in memory grows with the log.

Trust. Stored hashes are derived data: the leaves are the log. At open the log checks
the frontier (and through a consistency proof, every hash it reads on the way) against
its latest signed checkpoint and its head marker (`gateway.receipts.log`). That is
O(log n) and binds what the log will append onto to what it has signed, which is what
stops a fork. It cannot see an edit to a leaf or stored hash off that path (no O(log n)
check can); `StoredTree.verify` re-derives every stored hash from the leaves (O(n),
bounded memory) for a scrub, and a verifier of an exported bundle re-derives the
checkpoint root from the exported leaves anyway.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable

from gateway.receipts.merkle import HASH_SIZE, Frontier, TreeHashes, leaf_hash, node_hash

__all__ = [
    "NODES_SCHEMA",
    "STORED_LEVEL",
    "StoredTree",
    "TreeCorrupt",
    "catch_up",
    "last_position",
    "node_rows",
    "position",
    "stored_size",
]

STORED_LEVEL = 4
NODES_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes(pos INTEGER PRIMARY KEY, hash BLOB NOT NULL);
"""
# Leaves hashed per transaction when stored hashes are (re)built: bounds memory and the
# WAL, and a crash part-way loses at most one chunk of work (`catch_up` resumes).
_CHUNK = 1 << 16


def position(level: int, index: int) -> int:
    """The post-order position of subtree (level, index): nodes (leaves included) a tree
    completes before it. It completes with leaf number L = (index+1) * 2^level, after the
    2(L-1) - popcount(L-1) nodes of the first L-1 leaves and the `level` nodes below it."""
    m = ((index + 1) << level) - 1
    return 2 * m - m.bit_count() + level


def last_position(size: int) -> int:
    """The position of the last stored subtree of a tree of `size` leaves (-1: none)."""
    whole = size - size % (1 << STORED_LEVEL)  # the last leaf that completed a stored one
    if whole == 0:
        return -1
    top = (whole & -whole).bit_length() - 1  # it completed levels up to its trailing zeros
    return position(top, (whole >> top) - 1)


def _stored_leaves(pos: int, size: int) -> int:
    """The largest multiple of 16 leaves (<= size) all of whose stored subtrees are at
    positions <= pos: where to resume storing after the last stored position `pos`."""
    lo, hi = 0, size >> STORED_LEVEL
    while lo < hi:  # the number of 16-leaf groups whose last subtree is stored
        mid = (lo + hi + 1) // 2
        if last_position(mid << STORED_LEVEL) <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo << STORED_LEVEL


class TreeCorrupt(Exception):
    """A hash or leaf the tree needs is missing or malformed in the database."""


def node_rows(done: list[tuple[int, int, bytes]]) -> list[tuple[int, bytes]]:
    """(pos, hash) rows for the (level, index, hash) of subtrees `Frontier.extend` made."""
    return [(position(level, index), h) for level, index, h in done]


def stored_size(db: sqlite3.Connection) -> int:
    """The number of leaves, from the last index (O(log n): the primary key's last row)."""
    row = db.execute("SELECT max(idx) FROM leaves").fetchone()
    return 0 if row is None or row[0] is None else int(row[0]) + 1


class _Reader:
    """Reads complete subtree hashes from the database; counts rows read (tests assert
    that opening a log reads O(log n) of them)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.rows = 0

    def __call__(self, level: int, index: int) -> bytes:
        if level >= STORED_LEVEL:
            row = self.db.execute(
                # CAST: a value edited into another type reads as wrong bytes, not an error
                "SELECT CAST(hash AS BLOB) FROM nodes WHERE pos = ?",
                (position(level, index),),
            ).fetchone()
            self.rows += 1
            if row is None or len(row[0]) != HASH_SIZE:
                raise TreeCorrupt(f"stored tree hash ({level}, {index}) is missing")
            return bytes(row[0])
        lo = index << level
        hi = lo + (1 << level)
        rows = self.db.execute(
            "SELECT idx, data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, hi)
        ).fetchall()
        self.rows += len(rows)
        if [int(r[0]) for r in rows] != list(range(lo, hi)):
            raise TreeCorrupt("leaf indices are not contiguous")
        hashes = [leaf_hash(bytes(r[1])) for r in rows]
        while len(hashes) > 1:
            hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
        return hashes[0]


class StoredTree(TreeHashes):
    """The log's tree: a `Frontier` in memory, everything else read from the database
    (through `db`, a connection that sees committed data only) behind a bounded cache."""

    def __init__(self, db: sqlite3.Connection, frontier: Frontier, cache_size: int = 1024) -> None:
        self._read = _Reader(db)
        # keyed by level << 58 | index: an int, not a tuple, halves an entry's overhead
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = cache_size
        # Proofs run on the event loop, the head marker's root too; a lock keeps the LRU
        # consistent should another thread ask (a CLI, a test).
        self._lock = threading.Lock()
        self._frontier = frontier
        self._edge: dict[tuple[int, int], bytes] = {}
        self.advance(frontier)

    @classmethod
    def load(cls, db: sqlite3.Connection, size: int, cache_size: int = 1024) -> StoredTree:
        """The tree of `size` leaves: O(log n) reads (raises `TreeCorrupt`)."""
        reader = _Reader(db)
        tree = cls(db, Frontier.load(size, reader), cache_size)
        tree._read.rows = reader.rows
        return tree

    @property
    def size(self) -> int:
        return self._frontier.size

    @property
    def frontier(self) -> Frontier:
        return self._frontier

    @property
    def rows_read(self) -> int:
        """Rows (leaves and stored hashes) read from the database so far."""
        return self._read.rows

    def advance(self, frontier: Frontier) -> None:
        """Adopt the frontier of a larger tree whose new leaves and hashes are committed."""
        if frontier.size < self._frontier.size:
            raise ValueError("a tree never shrinks")
        self._edge = {(level, i): h for level, i, h in frontier.subtrees()}
        self._frontier = frontier

    def memory(self) -> tuple[int, int]:
        """(hashes in the frontier, nodes in the cache): what this tree holds in memory."""
        return len(self._frontier.hashes), len(self._cache)

    def _node(self, level: int, index: int) -> bytes:
        h = self._edge.get((level, index))
        if h is not None:
            return h
        key = level << 58 | index
        with self._lock:
            h = self._cache.get(key)
            if h is not None:
                self._cache.move_to_end(key)
                return h
        h = self._read(level, index)
        with self._lock:
            self._cache[key] = h
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return h

    def verify(self, start: int = 0, end: int | None = None, *, chunk: int = _CHUNK) -> int | None:
        """Re-derive every stored hash of leaves start..end (multiples of 16 but the end)
        from the leaves, in bounded memory; the first leaf index whose group does not
        match (edited leaf or stored hash, missing leaf), or None. O(n): for a scrub."""
        end = self.size if end is None else end
        group = 1 << STORED_LEVEL
        lo = start - start % group
        db = self._read.db
        while lo + group <= end:
            hi = min(end - end % group, lo + chunk)
            rows = db.execute(
                "SELECT idx, data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, hi)
            ).fetchall()
            stored = {
                int(i): bytes(h)
                for i, h in db.execute(
                    "SELECT pos, CAST(hash AS BLOB) FROM nodes WHERE pos >= ? AND pos <= ?",
                    (position(STORED_LEVEL, lo // group), position(STORED_LEVEL, hi // group - 1)),
                )
            }
            for g in range(lo, hi, group):
                part = rows[g - lo : g - lo + group]
                if [int(r[0]) for r in part] != list(range(g, g + group)):
                    return g
                hashes = [leaf_hash(bytes(r[1])) for r in part]
                while len(hashes) > 1:
                    hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
                if stored.get(position(STORED_LEVEL, g // group)) != hashes[0]:
                    return g
            lo = hi
        # Levels above: each stored hash from its two stored children.
        level = STORED_LEVEL + 1
        while (end >> level) > 0:
            first, last = (start >> level), (end >> level)
            for i in range(first, last):
                try:
                    parent = self._read(level, i)
                    left, right = self._read(level - 1, 2 * i), self._read(level - 1, 2 * i + 1)
                except TreeCorrupt:
                    return i << level
                if node_hash(left, right) != parent:
                    return i << level
            level += 1
        return None


def catch_up(
    reader: sqlite3.Connection,
    writer: sqlite3.Connection,
    size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Store the hashes of every complete subtree of the first `size` leaves not stored
    yet: all of them for a log written before hashes were stored (a one-off O(n)
    migration), the rest for one another program appended to. O(log n) when up to date.
    Returns the number of leaves hashed."""
    want = last_position(size)
    row = reader.execute("SELECT max(pos) FROM nodes").fetchone()
    have = -1 if row[0] is None else int(row[0])
    if have >= want:
        return 0
    # Resume after the last stored hash: hashes are stored in position order, each batch
    # with its leaves, so every one before it is there, and the frontier at a multiple of
    # 16 leaves loads from the table (its subtrees are all >= 16 leaves).
    pos = _stored_leaves(have, size)
    frontier = Frontier.load(pos, _Reader(reader))
    hashed = 0
    while pos < size:
        hi = min(size, pos + _CHUNK)
        rows = reader.execute(
            "SELECT idx, data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (pos, hi)
        ).fetchall()
        if [int(r[0]) for r in rows] != list(range(pos, hi)):
            raise TreeCorrupt("leaf indices are not contiguous")
        frontier, done = frontier.extend((leaf_hash(bytes(r[1])) for r in rows), STORED_LEVEL)
        writer.execute("BEGIN IMMEDIATE")
        try:
            writer.executemany("INSERT OR IGNORE INTO nodes VALUES (?, ?)", node_rows(done))
            writer.execute("COMMIT")
        except BaseException:
            writer.execute("ROLLBACK")
            raise
        hashed += hi - pos
        pos = hi
        if progress is not None:
            progress(pos)
    return hashed
