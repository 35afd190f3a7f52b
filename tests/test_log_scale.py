"""The receipt log at scale (issue 15): the tree on disk, not in memory.

No timings here (the machine is shared): each test asserts the mechanism instead.
Opening reads O(log n) rows and runs a size-independent number of SQLite VM steps; what
the log holds in memory is the O(log n) frontier plus a bounded cache; a stored state
edited on the path the open check walks is refused (frozen), with the untouched log as
the positive control; proofs read from disk equal the in-memory reference tree's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.receipts.export import export_bundle
from gateway.receipts.fill import ORIGIN, fill, fill_log
from gateway.receipts.log import LogEntry, ReceiptLog
from gateway.receipts.merkle import Frontier, MerkleTree, leaf_hash
from gateway.receipts.note import Checkpoint
from gateway.receipts.treestore import (
    NODES_SCHEMA,
    STORED_LEVEL,
    StoredTree,
    catch_up,
    last_position,
    position,
)
from tests.test_receipts import World, make_world

CHECKPOINT_REASON = "leaves do not reproduce the last checkpoint (size {}): truncated or edited"


@contextmanager
def vm_steps() -> Iterator[list[int]]:
    """Count SQLite VM instructions (in tens: the progress handler runs every 10 within a
    statement) on every connection opened inside."""
    counter = [0]
    real = sqlite3.connect

    def connect(*args: Any, **kw: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = real(*args, **kw)

        def tick() -> int:
            counter[0] += 1
            return 0

        db.set_progress_handler(tick, 10)
        return db

    sqlite3.connect = connect  # type: ignore[assignment]
    try:
        yield counter
    finally:
        sqlite3.connect = real


def reference(path: Path) -> MerkleTree:
    """The old way: every leaf into an in-memory tree."""
    db = sqlite3.connect(path / "log.db")
    try:
        return MerkleTree(
            leaf_hash(bytes(d)) for (d,) in db.execute("SELECT data FROM leaves ORDER BY idx")
        )
    finally:
        db.close()


def open_log(logs: Path, key: ed25519.Ed25519PrivateKey) -> ReceiptLog:
    return ReceiptLog.open(logs, key, ORIGIN)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ed25519.Ed25519PrivateKey]:
    """100k entries (and a small one beside it, for comparisons). Never edited."""
    root = tmp_path_factory.mktemp("scale")
    key = ed25519.Ed25519PrivateKey.generate()
    fill(root / "big", 100_000, key=key, bodies=100)
    fill(root / "small", 1_000, key=key, bodies=100)
    return root, key


def test_opening_a_100k_log_reads_olog_n_rows_not_the_leaves(
    big: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    root, key = big
    opened = {}
    steps = {}
    for name in ("small", "big"):
        with vm_steps() as counter:
            rl = open_log(root / name, key)
        steps[name] = counter[0]
        opened[name] = rl
    try:
        small, large = opened["small"], opened["big"]
        assert (small.size, large.size) == (1_001, 100_001)
        assert not small.frozen and not large.frozen
        # the open check (frontier, consistency proof to the checkpoint and the marker)
        # reads a few rows per tree level
        assert isinstance(large.tree, StoredTree)
        assert large.tree.rows_read <= 16 * large.size.bit_length()
        # SQLite's own count: a 100x larger log costs about the same to open (here ~35
        # each; the old open read every leaf: ~400 and ~40,000)
        assert steps["big"] <= 2 * steps["small"] + 20, steps
        # and it is the same tree the old open built
        ref = reference(large.path)
        assert large.tree.root() == ref.root()
        assert large.tree.frontier.root() == ref.root()
    finally:
        for rl in opened.values():
            rl.close_sync()


def test_memory_is_the_frontier_and_a_bounded_cache(
    big: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    root, key = big
    held = {}
    for name in ("small", "big"):
        tracemalloc.start()
        rl = open_log(root / name, key)
        held[name] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        try:
            assert isinstance(rl.tree, StoredTree)
            frontier, cached = rl.tree.memory()
            assert frontier == rl.size.bit_count() and cached <= 64
            if name == "big":
                # many proofs later, the cache is still bounded
                rng = random.Random(7)
                for _ in range(3000):
                    i = rng.randrange(rl.size)
                    rl.inclusion(i, rng.randrange(i + 1, rl.size + 1))
                assert rl.tree.memory()[1] <= 1024
        finally:
            rl.close_sync()
    # what an open log keeps (Python objects) does not grow with its size
    assert held["big"] < held["small"] + 64 * 1024, held


async def test_appends_store_the_hashes_of_completed_subtrees(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    rl = open_log(tmp_path / "logs", key)
    try:
        for _ in range(37):  # through the serving path (group commit), several batches
            await asyncio.gather(
                *(
                    rl.append(LogEntry("revocation", hashlib.sha256(bytes([i])).digest()))
                    for i in range(13)
                )
            )
        n = rl.size
        assert n == 1 + 37 * 13
        rows = dict(rl._rdb.execute("SELECT pos, hash FROM nodes").fetchall())
        ref = reference(rl.path)
        # every complete subtree of >= 16 leaves, at its post-order position, and no other
        expected = {
            position(lv, i): ref._range(i << lv, (i + 1) << lv)
            for lv in range(STORED_LEVEL, n.bit_length())
            for i in range(n >> lv)
        }
        assert rows == expected
        # positions follow completion order: every insert goes to the end of the table
        _, done = Frontier().extend((ref.leaf(i) for i in range(n)), STORED_LEVEL)
        made = [position(lv, i) for lv, i, _ in done]
        assert made == sorted(made) == sorted(rows)
        assert max(rows) == last_position(n)
        assert rl.tree.root() == ref.root()
    finally:
        await rl.close()


# ----------------------------------------------------------------- proofs from disk


@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.integers(1, 200), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
def test_proofs_from_disk_equal_the_reference(batches: list[int], seed: int) -> None:
    rng = random.Random(seed)
    key = ed25519.Ed25519PrivateKey.generate()

    def check(rl: ReceiptLog, ref: MerkleTree) -> None:
        n = rl.size
        assert rl.tree.root() == ref.root()
        for _ in range(20):
            size = rng.randint(1, n)
            index = rng.randrange(size)
            first = rng.randint(0, size)
            assert rl.tree.root(size) == ref.root(size)
            assert rl.inclusion(index, size) == ref.inclusion_proof(index, size)
            assert rl.consistency(first, size) == ref.consistency_proof(first, size)
            assert rl.tree.left_hashes(first, size) == ref.left_hashes(first, size)
            assert rl.tree.leaf(index) == ref.leaf(index)
        # a tiny cache (evicting all the time) changes nothing
        assert isinstance(rl.tree, StoredTree)
        tiny = StoredTree(rl._rdb, rl.tree.frontier, cache_size=2)
        size = rng.randint(1, n)
        index = rng.randrange(size)
        assert tiny.inclusion_proof(index, size) == ref.inclusion_proof(index, size)

    async def run(logs: Path) -> None:
        rl = open_log(logs, key)
        try:
            for b in batches:
                await fill_log(rl, b, checkpoint_every=rng.randint(20, 300))
                check(rl, reference(rl.path))
        finally:
            await rl.close()
        rl = open_log(logs, key)  # a fresh open: nothing cached, all read from disk
        try:
            assert not rl.frozen
            check(rl, reference(rl.path))
        finally:
            await rl.close()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(Path(d) / "logs"))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 700), st.data())
def test_storing_hashes_resumes_after_any_cut(n: int, data: st.DataObject) -> None:
    """`catch_up` (a log from before hashes were stored, or one a crash or an older
    ztgate left short) stores exactly the missing hashes, wherever the stored ones end."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript("CREATE TABLE leaves(idx INTEGER PRIMARY KEY, data BLOB NOT NULL);")
    db.executescript(NODES_SCHEMA)
    db.executemany("INSERT INTO leaves VALUES (?, ?)", [(i, b"%d" % i) for i in range(n)])
    catch_up(db, db, n)
    full = dict(db.execute("SELECT pos, hash FROM nodes").fetchall())
    ref = MerkleTree(leaf_hash(b"%d" % i) for i in range(n))
    assert full == {
        position(lv, i): ref._range(i << lv, (i + 1) << lv)
        for lv in range(STORED_LEVEL, n.bit_length())
        for i in range(n >> lv)
    }
    cut = data.draw(st.integers(-1, last_position(n)))
    db.execute("DELETE FROM nodes WHERE pos > ?", (cut,))
    catch_up(db, db, n)
    assert dict(db.execute("SELECT pos, hash FROM nodes").fetchall()) == full
    assert catch_up(db, db, n) == 0  # up to date: nothing to do


# ------------------------------------------------------------------ edited state


def small_log(tmp: Path, entries: int = 1000) -> tuple[Path, ed25519.Ed25519PrivateKey, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    path = fill(tmp / "logs", entries, key=key, checkpoint_every=300)
    return tmp / "logs", key, path.name


def edit(logs: Path, log_id: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    db = sqlite3.connect(logs / log_id / "log.db")
    for sql, args in statements:
        db.execute(sql, args)
    db.commit()
    db.close()


def reopen(logs: Path, key: ed25519.Ed25519PrivateKey, log_id: str) -> str | None:
    """Open the directory's log; the old log's frozen reason (None: it continues)."""
    rl = open_log(logs, key)
    try:
        if rl.log_id == log_id:
            assert not (logs / log_id / "FROZEN").exists()
            return None
        assert rl.size == 1  # a fresh successor
        return (logs / log_id / "FROZEN").read_text().strip()
    finally:
        rl.close_sync()


def frontier_node(logs: Path, log_id: str) -> tuple[int, int]:
    """(level, idx) of the largest stored subtree on the right edge."""
    db = sqlite3.connect(logs / log_id / "log.db")
    size = int(db.execute("SELECT max(idx) FROM leaves").fetchone()[0]) + 1
    db.close()
    level = size.bit_length() - 1
    return level, 0


def test_the_untouched_log_continues_and_scrubs_clean(tmp_path: Path) -> None:
    logs, key, log_id = small_log(tmp_path)
    assert reopen(logs, key, log_id) is None
    assert reopen(logs, key, log_id) is None
    rl = ReceiptLog.open_readonly(logs / log_id)
    try:
        assert rl.verify_stored() is None
    finally:
        rl.close_sync()


def test_an_edited_frontier_hash_is_refused_at_open(tmp_path: Path) -> None:
    logs, key, log_id = small_log(tmp_path)
    assert reopen(logs, key, log_id) is None  # control
    level, idx = frontier_node(logs, log_id)
    edit(
        logs,
        log_id,
        ("UPDATE nodes SET hash = ? WHERE pos = ?", (b"\0" * 32, position(level, idx))),
    )
    assert reopen(logs, key, log_id) == CHECKPOINT_REASON.format(1001)


def test_a_deleted_frontier_hash_is_refused_at_open(tmp_path: Path) -> None:
    logs, key, log_id = small_log(tmp_path)
    edit(logs, log_id, ("DELETE FROM nodes WHERE pos = ?", (position(9, 0),)))
    assert reopen(logs, key, log_id) == "stored tree hash (9, 0) is missing"


def test_hashes_missing_at_the_end_are_rederived_from_the_leaves_and_checked(
    tmp_path: Path,
) -> None:
    """Stored hashes are derived data: the last ones missing (a crash while they were
    first stored, or an older ztgate appended) are stored again from the leaves, then
    checked against the checkpoint like the rest. With a leaf under them edited, refused."""
    logs, key, log_id = small_log(tmp_path)
    root = reference(logs / log_id).root()
    cut = ("DELETE FROM nodes WHERE pos > ?", (position(6, 5),))
    edit(logs, log_id, cut)
    assert reopen(logs, key, log_id) is None
    rl = ReceiptLog.open_readonly(logs / log_id)
    try:
        assert rl.tree.root() == root and rl.verify_stored() is None
    finally:
        rl.close_sync()
    forged = LogEntry("revocation", hashlib.sha256(b"forged").digest()).leaf_data()
    edit(logs, log_id, cut, ("UPDATE leaves SET data = ? WHERE idx = 500", (forged,)))
    assert reopen(logs, key, log_id) == CHECKPOINT_REASON.format(1001)


def test_an_edited_leaf_on_the_right_edge_is_refused_at_open(tmp_path: Path) -> None:
    logs, key, log_id = small_log(tmp_path)
    forged = LogEntry("revocation", hashlib.sha256(b"forged").digest()).leaf_data()
    edit(logs, log_id, ("UPDATE leaves SET data = ? WHERE idx = 998", (forged,)))
    assert reopen(logs, key, log_id) == CHECKPOINT_REASON.format(1001)


def test_a_truncated_log_is_refused_at_open(tmp_path: Path) -> None:
    logs, key, log_id = small_log(tmp_path)
    edit(logs, log_id, ("DELETE FROM leaves WHERE idx >= 900", ()))
    assert reopen(logs, key, log_id) == CHECKPOINT_REASON.format(1001)


def test_hashes_past_the_leaves_are_refused_without_a_checkpoint(tmp_path: Path) -> None:
    """No checkpoint, no marker to compare with: the stored hashes still tell."""
    key = ed25519.Ed25519PrivateKey.generate()
    logs = tmp_path / "logs"
    rl = open_log(logs, key)
    asyncio.run(_append_raw(rl, 200))
    log_id = rl.log_id
    (tmp_path / "logs.head").unlink()
    edit(logs, log_id, ("DELETE FROM leaves WHERE idx >= 100", ()))
    assert (
        reopen(logs, key, log_id)
        == "stored tree hashes run past the last leaf (size 100): truncated"
    )


async def _append_raw(rl: ReceiptLog, n: int) -> None:
    try:
        await rl.append_many(
            [
                (LogEntry("revocation", hashlib.sha256(bytes([i % 256])).digest()), None)
                for i in range(n)
            ]
        )
    finally:
        await rl.close()


def test_an_edit_off_the_open_path_is_found_by_the_scrub(tmp_path: Path) -> None:
    """A leaf or hash deep in the tree is not on the O(log n) path the open check reads;
    `verify_stored` re-derives every stored hash from the leaves and names the group."""
    logs, _, log_id = small_log(tmp_path)
    forged = LogEntry("revocation", hashlib.sha256(b"forged").digest()).leaf_data()
    edit(logs, log_id, ("UPDATE leaves SET data = ? WHERE idx = 37", (forged,)))
    rl = ReceiptLog.open_readonly(logs / log_id)
    try:
        assert rl.verify_stored() == 32
    finally:
        rl.close_sync()
    for i, sql in enumerate(
        ("UPDATE nodes SET hash = x'01' || substr(hash, 2) WHERE pos = ?",
         "DELETE FROM nodes WHERE pos = ?")  # a hole in the middle: not re-derived
    ):  # fmt: skip
        logs2, _, log_id2 = small_log(tmp_path / str(i))
        edit(logs2, log_id2, (sql, (position(6, 3),)))
        rl = ReceiptLog.open_readonly(logs2 / log_id2)
        try:
            assert not rl.frozen and rl.verify_stored() == 3 << 6
        finally:
            rl.close_sync()


def test_a_log_without_stored_hashes_gets_them_once_and_continues(tmp_path: Path) -> None:
    """A log written before the hashes were stored (no nodes table): the first open stores
    them from the leaves, checked against the signed checkpoint like any other."""
    logs, key, log_id = small_log(tmp_path)
    root_before = reference(logs / log_id).root()
    edit(logs, log_id, ("DROP TABLE nodes", ()))
    assert reopen(logs, key, log_id) is None
    rl = ReceiptLog.open_readonly(logs / log_id)
    try:
        assert rl.tree.root() == root_before and rl.verify_stored() is None
    finally:
        rl.close_sync()
    # ... but stored hashes re-derived from edited leaves do not match the checkpoint
    forged = LogEntry("revocation", hashlib.sha256(b"forged").digest()).leaf_data()
    edit(
        logs,
        log_id,
        ("DROP TABLE nodes", ()),
        ("UPDATE leaves SET data = ? WHERE idx = 5", (forged,)),
    )
    assert reopen(logs, key, log_id) == CHECKPOINT_REASON.format(1001)


# ------------------------------------------------------------------ erasures by index


async def test_erased_at_reads_one_index(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    rl = open_log(tmp_path / "logs", key)
    try:
        await fill_log(rl, 20, bodies=20)
        gone = [b for b in rl.bodies() if b.index in (5, 9)]
        assert await rl.erase([b.receipt_id for b in gone], "gdpr-art-17") == 2
        assert rl.erased_at(5) == rl.erased_at(9) == "gdpr-art-17"
        assert rl.erased_at(6) is None and rl.erased_at(10**9) is None
        assert rl.erased() == {5: "gdpr-art-17", 9: "gdpr-art-17"}
        assert rl.erased(6, 20) == {9: "gdpr-art-17"}
    finally:
        await rl.close()


# ------------------------------------------------------------- checkpoint compaction


def _bundle_files(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest_asyncio.fixture(loop_scope="function")
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    if not w.log._closed:
        await w.log.close()


async def test_compaction_keeps_what_verification_needs(world: World, tmp_path: Path) -> None:
    t = [1_000_000.0]
    world.log.clock = lambda: t[0]
    for round_ in range(24):
        for _ in range(3):
            await world.receipt()
        t[0] += 10
        # every third checkpoint is witnessed, the others only signed
        await (world.checkpoint() if round_ % 3 == 0 else world.log.checkpoint())
    # retention dropped the oldest bodies; their earliest checkpoints are no longer needed
    old = [b.receipt_id for b in world.log.bodies() if b.index < 30]
    await world.log.erase(old, "retention")
    await world.checkpoint()
    notes = [Checkpoint.parse_text(n.text) for n in world.log.checkpoints()]
    before = {cp.size for cp in notes}
    export_bundle(world.log_dir, tmp_path / "before")

    deleted = await world.log.compact_checkpoints(keep_every_s=60, keep_latest=3)

    after = {Checkpoint.parse_text(n.text).size for n in world.log.checkpoints()}
    assert deleted == len(before - after) > 0 and after < before
    sizes = sorted(before)
    assert set(sizes[-3:]) <= after  # the latest
    cosigned = world.log.cosigners()
    assert set(cosigned) <= after  # no cosignature left without its checkpoint
    assert max(s for s in sizes if s in cosigned) in after  # the latest witnessed
    for b in world.log.bodies():  # each stored body's earliest checkpoint
        assert min(s for s in sizes if s > b.index) in after
    window = {cp.size: int((cp.time or 0) // 60) for cp in notes}
    assert {window[s] for s in after} == set(window.values())  # one per minute at least
    # an export of what is stored is the same, byte for byte
    export_bundle(world.log_dir, tmp_path / "after")
    assert _bundle_files(tmp_path / "after") == _bundle_files(tmp_path / "before")
    # and compaction is idempotent
    assert await world.log.compact_checkpoints(keep_every_s=60, keep_latest=3) == 0
    with pytest.raises(ValueError):
        await world.log.compact_checkpoints(keep_every_s=0)


async def test_compaction_keeps_one_checkpoint_per_window(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    rl = open_log(tmp_path / "logs", key)
    try:
        t = [0.0]
        rl.clock = lambda: t[0]
        for i in range(40):
            await rl.append(LogEntry("revocation", hashlib.sha256(bytes([i])).digest()))
            t[0] += 7  # 40 checkpoints, 7 s apart, no bodies
            await rl.checkpoint()
        notes = rl.checkpoints()
        windows = {int((Checkpoint.parse_text(n.text).time or 0) // 60) for n in notes}
        assert await rl.compact_checkpoints(60, keep_latest=1) == 40 - len(windows)
        kept = rl.checkpoints()
        assert len(kept) == len(windows)
        assert {int((Checkpoint.parse_text(n.text).time or 0) // 60) for n in kept} == windows
        assert kept[-1].text == notes[-1].text  # the head stays
    finally:
        await rl.close()


async def test_compaction_in_bounded_chunks_reaches_the_same_history(tmp_path: Path) -> None:
    """`limit` bounds one call's rows (it holds the writer); calls resume where the last
    stopped and wrap at the head. A window cut by a chunk's edge may keep one extra, never
    one fewer, and a second round leaves the same set the unbounded call would."""
    key = ed25519.Ed25519PrivateKey.generate()
    logs = []
    for name in ("chunked", "whole"):
        rl = open_log(tmp_path / name, key)
        t = [0.0]
        rl.clock = lambda t=t: t[0]  # type: ignore[misc]
        for i in range(40):
            await rl.append(LogEntry("revocation", hashlib.sha256(bytes([i])).digest()))
            t[0] += 7
            await rl.checkpoint()
        logs.append(rl)
    chunked, whole = logs
    try:
        await whole.compact_checkpoints(60, keep_latest=1)
        expected = [n.text.split("\n")[1] for n in whole.checkpoints()]
        first = await chunked.compact_checkpoints(60, keep_latest=1, limit=10)
        assert 0 < first < 10  # only the first ten were looked at
        for _ in range(8):  # two rounds of four chunks
            await chunked.compact_checkpoints(60, keep_latest=1, limit=10)
        assert [n.text.split("\n")[1] for n in chunked.checkpoints()] == expected
        with pytest.raises(ValueError):
            await chunked.compact_checkpoints(60, limit=0)
    finally:
        for rl in logs:
            await rl.close()


def test_a_hole_in_the_stored_tree_is_a_503_problem_never_a_500(tmp_path: Path) -> None:
    """A proof that needs a missing hash cannot be served: the reader gets the log's own
    problem type (503 `log-unavailable`), not a 500. Control: the intact log serves every
    one of the same requests."""
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from gateway.app import _problem
    from gateway.receipts.http import log_routes

    async def statuses(logs: Path, log_id: str) -> dict[int, tuple[int, str]]:
        rl = ReceiptLog.open_readonly(logs / log_id)
        app = Starlette(
            routes=[Mount("/", app=log_routes(rl))], exception_handlers={Exception: _problem}
        )
        out = {}
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                top = int((await c.get(f"/log/{log_id}/checkpoint")).text.split("\n")[1])
                for first in range(1, top, 7):
                    r = await c.get(f"/log/{log_id}/consistency?first={first}&second={top}")
                    kind = r.json()["type"] if r.status_code != 200 else ""
                    out[first] = (r.status_code, kind)
        finally:
            rl.close_sync()
        return out

    intact = asyncio.run(statuses(*_small(tmp_path / "intact")))
    assert {s for s, _ in intact.values()} == {200}
    logs, log_id = _small(tmp_path / "holed")
    edit(logs, log_id, ("DELETE FROM nodes WHERE pos = ?", (position(6, 3),)))
    holed = asyncio.run(statuses(logs, log_id))
    refused = {k for s, k in holed.values() if s != 200}
    assert refused and {s for s, _ in holed.values()} <= {200, 503}
    assert refused == {"https://ztgate.dev/problems/log-unavailable"}, refused


def _small(tmp: Path) -> tuple[Path, str]:
    logs, _, log_id = small_log(tmp)
    return logs, log_id
