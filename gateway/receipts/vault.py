"""The core's copy of each edge log: every leaf, receipt body and record an edge uploaded.

An edge gateway cut off from the core keeps its own log. When the link returns it
uploads what the core does not yet hold (resumably: the core says how much it has) and
then pushes its checkpoint to the core's witness, which cosigns only a checkpoint whose
leaves the vault holds and whose root they reproduce (`Witness.add_checkpoint`). So what
reached the core survives the edge's destruction, and an edge cannot have a checkpoint
cosigned for a history it did not hand over.

Leaves above the last cosigned size are pending: an upload may replace them (a retry
after a cut, or an edge that crashed and re-signed its head), but never what was
cosigned. A body must hash to its leaf (a receipt's body to its `receipt` leaf, a record
to its record leaf), so a body cannot be swapped for another under a leaf.

A zk receipt's evidence (its proof and the verification material, `zk/offline.py`) comes
in two steps: the leaf's upload names each file by SHA-256, and only a digest the signed
receipt commits to is taken (`evidence_commitments`); the file itself follows in its own
upload, taken only if some named reference wants it and it hashes to its name. So an edge
cannot swap a proof, and the vault stores nothing no receipt asked for.

Each file is charged to the trusted log key (its origin prefix) whose upload brought it,
against a quota per key (`Vault.quota`): one captured edge can fill its own share, not
every edge's. A file no reference names any more (its pending leaf replaced, its receipt
erased) is deleted at once, so abandoned files do not keep counting.

Evidence holds client data (a proof's public instances are the inputs and outputs), so it
can be erased (`Vault.erase`: `ztgate witness erase`, or an `erasure` leaf the edge
uploads) and leaves no copy in the vault's files (`secure_delete`, the WAL truncated).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.receipts.bundle import BUNDLE_FORMAT
from gateway.receipts.canonical import b64
from gateway.receipts.entry import LogEntry
from gateway.receipts.export import Writer, proof_text
from gateway.receipts.log import tlog_proof
from gateway.receipts.merkle import MerkleTree, leaf_hash
from gateway.sqlitedb import open_durable, truncate_wal

__all__ = [
    "EVIDENCE_NAMES",
    "MAX_MATERIAL_FILE",
    "MAX_UPLOAD_LEAVES",
    "Upload",
    "Vault",
    "VaultError",
    "evidence_commitments",
    "export_vault",
    "has_body",
]

log = logging.getLogger(__name__)
MAX_UPLOAD_LEAVES = 2048  # per request: bounds one request's memory and its retry cost
# Leaves whose entry commits to a body the auditor must be able to read.
_RECORD_TYPES = ("erasure", "log_start", "late_evidence", "node_quarantine", "node_release")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves(origin TEXT NOT NULL, idx INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY(origin, idx));
CREATE TABLE IF NOT EXISTS blobs(origin TEXT NOT NULL, idx INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY(origin, idx));
CREATE TABLE IF NOT EXISTS checkpoints(origin TEXT NOT NULL, size INTEGER NOT NULL,
    note TEXT NOT NULL, PRIMARY KEY(origin, size));
CREATE TABLE IF NOT EXISTS evidence(origin TEXT NOT NULL, idx INTEGER NOT NULL,
    name TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY(origin, idx, name));
CREATE INDEX IF NOT EXISTS evidence_digest ON evidence(digest);
CREATE TABLE IF NOT EXISTS material(digest TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS erased(origin TEXT NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY(origin, idx));
CREATE TABLE IF NOT EXISTS charges(owner TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
"""
# Who brought each file and its size; `charges` sums them per owner, so a quota check is
# one row, not a scan. Files from before quotas are charged to no key ('').
_MATERIAL_OWNER = """
ALTER TABLE material ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE material ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
UPDATE material SET size = LENGTH(data);
INSERT INTO charges(owner, bytes) SELECT owner, SUM(size) FROM material GROUP BY owner;
"""


class VaultError(Exception):
    """An upload the vault refuses (HTTP 400/409 at the witness)."""

    def __init__(self, message: str, stored: int | None = None) -> None:
        super().__init__(message)
        self.stored = stored


UPLOAD_NOTE = "ztgate vault upload v1"
MAX_ORIGIN_LEAVES = 50_000_000  # one edge log; past it the edge starts a new log id
MAX_ORIGINS = 10_000
_RECEIPT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,160}")
# A zk receipt's evidence files (zk/offline.py MATERIAL); nothing else is taken.
EVIDENCE_NAMES = ("proof.json", "zk.json", "vk", "settings.json", "srs")
# One file per upload, under the witness's 16 MiB request cap once base64-encoded; a
# larger SRS stays at the edge (its receipts then report zk-evidence-missing at the core).
MAX_MATERIAL_FILE = 11 << 20
MAX_VAULT_MATERIAL = 8 << 30  # every origin's evidence files together: the disk's bound
# Per trusted log key (an edge site; every log id under its prefix): one edge's share.
MAX_OWNER_MATERIAL = 1 << 30
MAX_MISSING_LISTED = 64  # leaves per `missing` answer (5 files each at most): the edge pages
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Upload:
    """One request's worth: leaves from `start`, and the bodies of those that have one,
    with `note`: the edge's log key's signature over what is uploaded (`note_text`), so
    only the holder of a trusted log key can put anything in the vault."""

    start: int
    leaves: tuple[bytes, ...]
    blobs: dict[int, bytes]
    note: str = ""
    # Leaf index -> {evidence file name: its SHA-256 hex}: what the edge holds for a receipt.
    evidence: dict[int, dict[str, str]] = field(default_factory=dict)
    # SHA-256 hex -> the file: evidence a reference named, sent after its leaf.
    material: dict[str, bytes] = field(default_factory=dict)

    def digest(self) -> str:
        h = hashlib.sha256()
        for x in self.leaves:
            h.update(len(x).to_bytes(4, "big") + x)
        for i, b in sorted(self.blobs.items()):
            h.update(i.to_bytes(8, "big") + len(b).to_bytes(8, "big") + b)
        # Only when present, so an upload without evidence signs as it always did.
        for i, refs in sorted(self.evidence.items()):
            for name, d in sorted(refs.items()):
                h.update(f"evidence {i} {name} {d}\n".encode())
        for d, data in sorted(self.material.items()):
            h.update(f"material {d} {len(data)}\n".encode() + data)
        return h.hexdigest()

    def note_text(self, origin: str) -> str:
        """What the log key signs: the origin, the range and a digest of every byte."""
        return f"{UPLOAD_NOTE}\n{origin}\n{self.start}\n{len(self.leaves)}\n{self.digest()}\n"

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "start": self.start,
            "leaves": [base64.b64encode(x).decode() for x in self.leaves],
            "blobs": {str(i): base64.b64encode(b).decode() for i, b in sorted(self.blobs.items())},
            "note": self.note,
        }
        if self.evidence:
            doc["evidence"] = {str(i): dict(r) for i, r in sorted(self.evidence.items())}
        if self.material:
            doc["material"] = {d: base64.b64encode(b).decode() for d, b in self.material.items()}
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Upload:
        if not isinstance(doc, dict):
            raise VaultError("malformed upload")
        start, leaves, blobs = doc.get("start"), doc.get("leaves"), doc.get("blobs")
        note = doc.get("note", "")
        if (
            not isinstance(note, str)
            or not isinstance(start, int)
            or isinstance(start, bool)
            or start < 0
            or not isinstance(leaves, list)
            or not isinstance(blobs, dict)
        ):
            raise VaultError("malformed upload")
        if len(leaves) > MAX_UPLOAD_LEAVES:
            raise VaultError(f"at most {MAX_UPLOAD_LEAVES} leaves per upload")
        evidence, material = doc.get("evidence", {}), doc.get("material", {})
        if not isinstance(evidence, dict) or not isinstance(material, dict):
            raise VaultError("malformed upload")
        if len(material) > 1:
            raise VaultError("at most one evidence file per upload")
        try:
            refs = {int(i): _refs(r) for i, r in evidence.items()}
            files = {str(d): base64.b64decode(b, validate=True) for d, b in material.items()}
            return cls(
                start,
                tuple(base64.b64decode(x, validate=True) for x in leaves),
                {int(i): base64.b64decode(b, validate=True) for i, b in blobs.items()},
                note,
                refs,
                files,
            )
        except (TypeError, ValueError, binascii.Error):
            raise VaultError("malformed upload") from None


def _refs(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        n in EVIDENCE_NAMES and isinstance(d, str) and _DIGEST_RE.fullmatch(d)
        for n, d in raw.items()
    ):
        raise ValueError("malformed evidence references")
    return dict(raw)


def evidence_commitments(body: bytes) -> dict[str, str | None]:
    """Evidence file name -> the SHA-256 a receipt body commits to (None: the receipt
    names no digest for it, and the file is checked against the receipt by its content).
    Empty for anything that is not a zk receipt with a proof."""
    from gateway.receipts.model import FormatError, SignedReceipt

    if b'"mode":"zk"' not in body:  # canonical JSON: skips parsing every other receipt
        return {}
    try:
        r = SignedReceipt.from_bytes(body).receipt
    except FormatError:
        return {}
    v = r.verification
    if v is None or v.mode != "zk" or not v.proof_sha256:
        return {}
    ext = r.extensions
    out: dict[str, str | None] = {"proof.json": v.proof_sha256, "zk.json": None}
    for name, key in (("vk", "vk_sha256"), ("settings.json", "settings_sha256"),
                      ("srs", "srs_sha256")):  # fmt: skip
        value = ext.get(key)
        if isinstance(value, str):
            out[name] = value
    return out


def _record_matches(data: bytes, body: bytes) -> bool:
    """A zk.json file is the record of the receipt's model and verification material (the
    receipt names no digest for the record itself)."""
    from gateway.receipts.model import FormatError, SignedReceipt

    try:
        doc = json.loads(data)
        r = SignedReceipt.from_bytes(body).receipt
    except (ValueError, UnicodeDecodeError, FormatError):
        return False
    if not isinstance(doc, dict) or r.model is None or doc.get("model_sha256") != r.model.sha256:
        return False
    ext = r.extensions
    return all(doc.get(k) == ext.get(k) for k in ("vk_sha256", "settings_sha256", "srs_sha256"))


class Vault:
    """One SQLite file for every edge origin this core witnesses."""

    def __init__(self, path: Path, quota: int = MAX_OWNER_MATERIAL) -> None:
        """`quota`: bytes of evidence files each trusted log key may have here."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.quota = quota
        self._db = open_durable(path)
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(material)")}
        if "owner" not in columns:  # a vault from before quotas: its files count globally
            self._db.executescript(f"BEGIN;{_MATERIAL_OWNER}COMMIT;")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reading

    def origins(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT origin FROM leaves")]

    def stored(self, origin: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM leaves WHERE origin = ?", (origin,)
            ).fetchone()
        return int(row[0])

    def cosigned(self, origin: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(MAX(size), 0) FROM checkpoints WHERE origin = ?", (origin,)
            ).fetchone()
        return int(row[0])

    def leaves(self, origin: str, end: int | None = None) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM leaves WHERE origin = ? AND idx < ? ORDER BY idx",
                (origin, 2**62 if end is None else end),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def blob(self, origin: str, index: int) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM blobs WHERE origin = ? AND idx = ?", (origin, index)
            ).fetchone()
        return bytes(row[0]) if row else None

    def checkpoints(self, origin: str) -> list[tuple[int, str]]:
        """(size, the cosigned checkpoint note as the core issued it), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT size, note FROM checkpoints WHERE origin = ? ORDER BY size", (origin,)
            ).fetchall()
        return [(int(s), str(n)) for s, n in rows]

    def evidence(self, origin: str, index: int) -> dict[str, bytes]:
        """The evidence files the vault holds for the receipt at `index`, by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.name, m.data FROM evidence e JOIN material m ON m.digest = e.digest"
                " WHERE e.origin = ? AND e.idx = ?",
                (origin, index),
            ).fetchall()
        return {str(n): bytes(d) for n, d in rows}

    def missing(self, origin: str, after: int = -1) -> list[tuple[int, str, str]]:
        """(leaf index, name, digest) of evidence files named but not yet held: every one
        of the first MAX_MISSING_LISTED leaves past `after` that lack any, in leaf order.
        Whole leaves, so the edge pages on from the last index it was given."""
        lacking = (
            "FROM evidence e WHERE e.origin = ? AND e.idx > ? AND NOT EXISTS"
            " (SELECT 1 FROM material m WHERE m.digest = e.digest)"
        )
        with self._lock:
            rows = self._db.execute(
                f"SELECT e.idx, e.name, e.digest {lacking} AND e.idx IN"
                f" (SELECT DISTINCT e.idx {lacking} ORDER BY e.idx LIMIT ?)"
                " ORDER BY e.idx, e.name",
                (origin, after, origin, after, MAX_MISSING_LISTED),
            ).fetchall()
        return [(int(i), str(n), str(d)) for i, n, d in rows]

    def tree(self, origin: str, size: int) -> MerkleTree:
        """The Merkle tree of the first `size` stored leaves (O(size) hashing, done once
        per checkpoint)."""
        leaves = self.leaves(origin, size)
        if len(leaves) != size:
            raise VaultError(f"the vault holds {len(leaves)} leaves, not {size}", len(leaves))
        return MerkleTree(leaf_hash(x) for x in leaves)

    # ------------------------------------------------------------------ writing

    def append(self, origin: str, upload: Upload, owner: str | None = None) -> int:
        """Store an upload; the stored size after it. Idempotent for what is stored.
        `owner`: the trusted log key's origin prefix that signed it (default: the origin),
        charged for the evidence files it brings and allowed to erase evidence of the
        origins under it."""
        owner = origin if owner is None else owner
        cosigned = self.cosigned(origin)
        stored = self.stored(origin)
        if upload.start + len(upload.leaves) > MAX_ORIGIN_LEAVES:
            raise VaultError(f"an edge log may hold at most {MAX_ORIGIN_LEAVES} leaves here")
        if stored == 0 and len(self.origins()) >= MAX_ORIGINS:
            raise VaultError(f"the vault holds {MAX_ORIGINS} edge logs already")
        if upload.start > stored:
            raise VaultError(f"upload starts at {upload.start}; the vault holds {stored}", stored)
        end = upload.start + len(upload.leaves)
        if set(upload.blobs) - set(range(upload.start, end)):
            raise VaultError("a body for a leaf outside this upload")
        checked = [_check_leaf(i, data, upload.blobs.get(i)) for i, data in _indexed(upload)]
        _check_evidence(upload)
        erasures: dict[str, set[int]] = {}
        with self._tx() as db:
            dropped: set[str] = set()  # digests a replaced leaf named
            for i, data in checked:
                if i < cosigned:
                    row = db.execute(
                        "SELECT data FROM leaves WHERE origin = ? AND idx = ?", (origin, i)
                    ).fetchone()
                    if row is None or bytes(row[0]) != data:
                        raise VaultError(
                            f"leaf {i} differs from the one the core cosigned: history "
                            "the core witnessed was rewritten",
                            stored,
                        )
                    continue
                old = db.execute(
                    "SELECT data FROM leaves WHERE origin = ? AND idx = ?", (origin, i)
                ).fetchone()
                if old is not None and bytes(old[0]) != data:  # another receipt: not erased
                    db.execute("DELETE FROM erased WHERE origin = ? AND idx = ?", (origin, i))
                db.execute(
                    "INSERT OR REPLACE INTO leaves(origin, idx, data) VALUES (?, ?, ?)",
                    (origin, i, data),
                )
                # A replaced pending leaf takes its old body and evidence with it.
                db.execute("DELETE FROM blobs WHERE origin = ? AND idx = ?", (origin, i))
                dropped.update(_drop_refs(db, origin, [i]))
                body = upload.blobs.get(i)
                if body is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO blobs(origin, idx, data) VALUES (?, ?, ?)",
                        (origin, i, body),
                    )
                    if LogEntry.parse(data).type == "erasure":
                        _erasure_of(body, owner, erasures)
                self._add_refs(db, origin, i, upload)
            _drop_orphans(db, dropped)
            for digest, data in upload.material.items():
                self._store_material(db, origin, owner, digest, data)
            for erased_origin, indexes in erasures.items():
                _erase_rows(db, erased_origin, indexes)
        if erasures:
            self._truncate_wal()
        return self.stored(origin)

    def _add_refs(self, db: sqlite3.Connection, origin: str, i: int, upload: Upload) -> None:
        refs = upload.evidence.get(i, {})
        if not refs or _is_erased(db, origin, i):
            return  # an erased receipt's evidence does not come back with a resend
        body = upload.blobs[i]  # _check_evidence: every reference comes with its receipt
        for name, digest in refs.items():
            if name == "zk.json":
                # Named by content, not digest: a record already held was checked against
                # another receipt, so it is checked against this one too.
                held = db.execute(
                    "SELECT data FROM material WHERE digest = ?", (digest,)
                ).fetchone()
                if held is not None and not _record_matches(bytes(held[0]), body):
                    raise VaultError("the zk record is not the one its receipt names")
            db.execute(
                "INSERT INTO evidence(origin, idx, name, digest) VALUES (?, ?, ?, ?)",
                (origin, i, name, digest),
            )

    def _store_material(
        self, db: sqlite3.Connection, origin: str, owner: str, digest: str, data: bytes
    ) -> None:
        """One evidence file: only one a reference of this origin names, and that hashes
        to its name; held once for every receipt and origin that names it, charged to the
        owner whose upload brought it."""
        if len(data) > MAX_MATERIAL_FILE:
            raise VaultError(f"an evidence file may hold at most {MAX_MATERIAL_FILE} bytes")
        if hashlib.sha256(data).hexdigest() != digest:
            raise VaultError("an evidence file does not hash to its name")
        if db.execute("SELECT 1 FROM material WHERE digest = ?", (digest,)).fetchone():
            return  # already held: a resend after a cut
        wanted = db.execute(
            "SELECT e.name, b.data FROM evidence e LEFT JOIN blobs b"
            " ON b.origin = e.origin AND b.idx = e.idx"
            " WHERE e.origin = ? AND e.digest = ? LIMIT 1",
            (origin, digest),
        ).fetchone()
        if wanted is None:
            raise VaultError("no receipt of this log names that evidence file")
        name, body = str(wanted[0]), wanted[1]
        if name == "zk.json":
            if body is None or not _record_matches(data, bytes(body)):
                raise VaultError("the zk record is not the one its receipt names")
            _drop_unmatched_records(db, digest, data)
        (mine,) = db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM charges WHERE owner = ?", (owner,)
        ).fetchone()
        if int(mine) + len(data) > self.quota:
            raise VaultError(f"this edge holds its quota of evidence here ({self.quota} bytes)")
        (everyone,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM charges").fetchone()
        if int(everyone) + len(data) > MAX_VAULT_MATERIAL:
            raise VaultError(f"the vault holds {MAX_VAULT_MATERIAL} bytes of evidence already")
        db.execute(
            "INSERT INTO material(digest, data, owner, size) VALUES (?, ?, ?, ?)",
            (digest, data, owner, len(data)),
        )
        db.execute(
            "INSERT INTO charges(owner, bytes) VALUES (?, ?)"
            " ON CONFLICT(owner) DO UPDATE SET bytes = bytes + excluded.bytes",
            (owner, len(data)),
        )

    def erase(self, origin: str, indexes: list[int]) -> int:
        """Delete the evidence of the receipts at `indexes` (an erasure request): their
        references, and every file no other receipt names, leaving no copy in the vault's
        files. Leaves and receipt bodies stay (they hold commitments, not inputs); a resend
        does not bring the evidence back. Returns the references deleted."""
        with self._tx() as db:
            n = _erase_rows(db, origin, set(indexes))
        self._truncate_wal()
        return n

    def _truncate_wal(self) -> None:
        """The WAL still holds the deleted pages: copy it into the database and empty it."""
        with self._lock:
            truncated = truncate_wal(self._db)
        if not truncated:
            log.warning("vault: WAL still in use after an erasure; truncated at the next one")

    def commit(self, origin: str, size: int, note: str) -> None:
        """The core cosigned `note` (of tree size `size`): leaves below it are final."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints(origin, size, note) VALUES (?, ?, ?)",
                (origin, size, note),
            )


def _drop_refs(db: sqlite3.Connection, origin: str, indexes: list[int]) -> list[str]:
    """Delete the evidence references of these leaves; the digest each named."""
    digests: list[str] = []
    for i in indexes:
        rows = db.execute(
            "DELETE FROM evidence WHERE origin = ? AND idx = ? RETURNING digest", (origin, i)
        ).fetchall()
        digests += (str(r[0]) for r in rows)
    return digests


def _drop_orphans(db: sqlite3.Connection, digests: set[str]) -> int:
    """Delete the files among `digests` that no reference names any more; how many."""
    gone = 0
    for d in sorted(digests):
        for owner, size in db.execute(
            "DELETE FROM material WHERE digest = ? AND NOT EXISTS"
            " (SELECT 1 FROM evidence WHERE digest = ?) RETURNING owner, size",
            (d, d),
        ).fetchall():
            db.execute("UPDATE charges SET bytes = bytes - ? WHERE owner = ?", (size, owner))
            gone += 1
    return gone


def _drop_unmatched_records(db: sqlite3.Connection, digest: str, data: bytes) -> None:
    """References to this zk record from receipts it is not the record of: they can never
    be satisfied by it (the digest is fixed), so they go rather than borrow it."""
    rows = db.execute(
        "SELECT e.origin, e.idx, b.data FROM evidence e LEFT JOIN blobs b"
        " ON b.origin = e.origin AND b.idx = e.idx WHERE e.digest = ? AND e.name = 'zk.json'",
        (digest,),
    ).fetchall()
    for origin, idx, body in rows:
        if body is None or not _record_matches(data, bytes(body)):
            db.execute(
                "DELETE FROM evidence WHERE origin = ? AND idx = ? AND name = 'zk.json'",
                (origin, idx),
            )


def _is_erased(db: sqlite3.Connection, origin: str, index: int) -> bool:
    row = db.execute("SELECT 1 FROM erased WHERE origin = ? AND idx = ?", (origin, index))
    return row.fetchone() is not None


def _erase_rows(db: sqlite3.Connection, origin: str, indexes: set[int]) -> int:
    """Within a transaction: drop these receipts' evidence, and files left unnamed."""
    ordered = sorted(indexes)
    db.executemany(
        "INSERT OR IGNORE INTO erased(origin, idx) VALUES (?, ?)", ((origin, i) for i in ordered)
    )
    digests = _drop_refs(db, origin, ordered)
    _drop_orphans(db, set(digests))
    return len(digests)


def _erasure_of(record: bytes, owner: str, into: dict[str, set[int]]) -> None:
    """The receipts an edge's `erasure` leaf erased (`entry.erasure_record`), if they are
    of a log its key covers (an erasure in a frozen log is logged by its successor)."""
    try:
        doc = json.loads(record)
        origin, indexes = doc["origin"], doc["indices"]
    except (ValueError, KeyError, TypeError):
        return  # the leaf is the edge's word; an unreadable one erases nothing here
    covers = owner if owner.endswith("/") else owner + "/"
    if not isinstance(origin, str) or not (origin == owner or origin.startswith(covers)):
        return
    if isinstance(indexes, list) and all(type(i) is int and i >= 0 for i in indexes):
        into.setdefault(origin, set()).update(indexes)


def _indexed(upload: Upload) -> Iterator[tuple[int, bytes]]:
    return ((upload.start + k, data) for k, data in enumerate(upload.leaves))


def _check_leaf(index: int, data: bytes, body: bytes | None) -> tuple[int, bytes]:
    try:
        entry = LogEntry.parse(data)
    except (ValueError, UnicodeDecodeError):
        raise VaultError(f"leaf {index} is not a log entry") from None
    if body is not None and hashlib.sha256(body).digest() != entry.sha256:
        raise VaultError(f"the body of leaf {index} does not hash to it")
    return index, data


def _check_evidence(upload: Upload) -> None:
    """Each reference names a digest its receipt (in this upload) commits to."""
    for i, refs in upload.evidence.items():
        body = upload.blobs.get(i)
        if body is None:
            raise VaultError(f"evidence for leaf {i} without its receipt in this upload")
        committed = evidence_commitments(body)
        for name, digest in refs.items():
            if name not in committed or committed[name] not in (None, digest):
                raise VaultError(
                    f"the {name} named for leaf {i} is not the one its receipt commits to"
                )


def has_body(entry: LogEntry) -> bool:
    """Whether the edge sends a body with this leaf (a receipt, or a record)."""
    return entry.type == "receipt" or entry.type in _RECORD_TYPES


def export_vault(
    vault: Vault, log_vkeys: dict[str, str], witnesses: dict[str, str], out: Path
) -> int:
    """An audit bundle (`gateway.receipts.bundle` layout) of edge logs as the core holds
    them, each up to its latest cosigned checkpoint: what an auditor verifies when an edge
    is gone. `log_vkeys` (origin -> the log's note vkey) chooses the logs; the keys are
    written for reading only (the verifier takes keys from the auditor's trust file).
    Returns the receipts written."""
    w = Writer(out)
    logs, total = [], 0
    try:
        for origin in sorted(log_vkeys):
            if not vault.checkpoints(origin):
                continue  # uploaded, never cosigned: nothing the core vouches for
            entry = _export_origin(vault, origin, w)
            total += len(entry["receipts"])
            logs.append(entry)
        keys = [{"origin": o, "vkey": k} for o, k in sorted(log_vkeys.items())]
        w.put("keys/log-keys.json", json.dumps(keys).encode())
        w.put(
            "keys/witness-keys.json",
            json.dumps([{"name": n, "vkey": k} for n, k in witnesses.items()]).encode(),
        )
        manifest = {
            "format": BUNDLE_FORMAT,
            "created": dt.datetime.now(dt.UTC).isoformat(),
            "since": None,
            "exported_by": "core vault",
            "logs": logs,
        }
        w.put("manifest.json", json.dumps(manifest, indent=1).encode())
    finally:
        w.close()
    return total


def _export_evidence(files: dict[str, bytes], w: Writer, base: str, receipt_id: str) -> None:
    """As an edge's own export lays evidence out (`export._export_evidence`): each file
    once per bundle by its SHA-256, named from the receipt's `.shared.json`."""
    if not files:
        return
    refs = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    w.put(f"{base}/evidence/{receipt_id}.shared.json", json.dumps(refs, sort_keys=True).encode())
    for name, digest in refs.items():
        if f"{base}/evidence/shared/{digest}" not in w.written:
            w.put(f"{base}/evidence/shared/{digest}", files[name])


def _export_origin(vault: Vault, origin: str, w: Writer) -> dict[str, Any]:
    notes = dict(vault.checkpoints(origin))
    if not notes:
        raise VaultError(f"the core has cosigned nothing of {origin}")
    head = max(notes)
    tree = vault.tree(origin, head)
    leaves = vault.leaves(origin, head)
    log_id = origin.rsplit("/", 1)[-1]
    base = f"logs/{log_id}"
    receipts = []
    for size, note in sorted(notes.items()):
        w.put(f"{base}/checkpoints/{size}.checkpoint", note.encode())
    for a, b in itertools.pairwise(sorted(notes)):
        w.put(f"{base}/consistency/{a}-{b}.proof", proof_text(tree.consistency_proof(a, b)))
    for i, data in enumerate(leaves):
        entry = LogEntry.parse(data)
        blob = vault.blob(origin, i)
        if blob is None:
            continue
        if entry.type != "receipt":
            w.put(f"{base}/records/{i}.json", blob)
            continue
        try:
            receipt_id = str(json.loads(blob)["receipt"]["id"])
        except (ValueError, KeyError, TypeError):
            raise VaultError(f"the body of leaf {i} of {origin} is not a receipt") from None
        if not _RECEIPT_ID_RE.fullmatch(receipt_id) or ".." in receipt_id:
            raise VaultError(f"leaf {i} of {origin}: an unusable receipt id")  # a file name
        w.put(f"{base}/receipts/{receipt_id}.json", blob)
        covering = min(s for s in notes if s > i)
        w.put(
            f"{base}/receipts/{receipt_id}.tlog-proof",
            tlog_proof(i, tree.inclusion_proof(i, covering), notes[covering]).encode(),
        )
        receipts.append({"id": receipt_id, "index": i, "proof": True})
        _export_evidence(vault.evidence(origin, i), w, base, receipt_id)
    w.put(f"{base}/leaves", b"".join(x + b"\n" for x in leaves))
    w.put(f"{base}/leaves.left", b"")
    return {
        "log_id": log_id,
        "origin": origin,
        "size": head,
        "frozen": None,
        "checkpoints": sorted(notes),
        "consistency": [list(p) for p in itertools.pairwise(sorted(notes))],
        "receipts": receipts,
        "erased": [],
        "inventory": {
            "start": 0,
            "size": head,
            "first_leaf": leaves[0].decode() if head else None,
            "start_proof": [b64(h) for h in tree.inclusion_proof(0, head)],
        },
    }
