"""The typed leaves of a receipt log and the tlog-proof header: what a log writer and an
offline verifier must agree on, byte for byte, and nothing else.

Two leaf types commit to a small JSON record (RFC 8785) shipped beside the leaf in
bundles, rather than to an opaque payload, because a verifier must read them:

- ``log_start`` (always leaf 0 of a log): `start_record`, naming the log this one
  succeeds on the same replica (its origin, and the size and root of its last checkpoint),
  or none (genesis). A bundle that leaves out a predecessor cannot hide it.
- ``erasure``: `erasure_record`, the log and indices whose bodies were deleted, and why.
  An index whose body is absent is erased only if such a leaf says so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.receipts.canonical import b64, canonical_json

__all__ = [
    "ENTRY_TYPES",
    "TLOG_PROOF_HEADER",
    "LogEntry",
    "erasure_record",
    "record_entry",
    "start_record",
]

ENTRY_TYPES = (
    "receipt",
    "policy_load",
    "revocation",
    "node_quarantine",
    "node_release",
    "late_evidence",
    "erasure",
    "log_start",
)
TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A typed leaf: only hashes (and, for late evidence, the receipt id it concerns)."""

    type: str
    sha256: bytes
    ref: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ENTRY_TYPES:
            raise ValueError(f"unknown entry type {self.type!r}")
        if len(self.sha256) != 32:
            raise ValueError("an entry holds a 32-byte SHA-256")
        if (self.type == "late_evidence") != (self.ref is not None):
            raise ValueError("late_evidence (and only it) names the receipt it concerns")

    def leaf_data(self) -> bytes:
        """RFC 8785 JSON of {"ref"?, "sha256", "type"}: the leaf's bytes."""
        if self.ref is None:  # the canonical form, written directly (hot path)
            return (
                b'{"sha256":"'
                + self.sha256.hex().encode()
                + b'","type":"'
                + self.type.encode()
                + b'"}'
            )
        d = {"type": self.type, "sha256": self.sha256.hex()}
        if self.ref is not None:
            d["ref"] = self.ref
        return canonical_json(d)

    @classmethod
    def parse(cls, data: bytes) -> LogEntry:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not {"type", "sha256"} <= set(doc) <= {
            "type",
            "sha256",
            "ref",
        }:
            raise ValueError("malformed log entry")
        entry = cls(str(doc["type"]), bytes.fromhex(str(doc["sha256"])), doc.get("ref"))
        if entry.leaf_data() != data:
            raise ValueError("log entry is not canonical")
        return entry


def start_record(predecessor: tuple[str, int, bytes] | None) -> bytes:
    """The bytes a ``log_start`` leaf hashes: RFC 8785 JSON of
    ``{"predecessor": null}`` or ``{"predecessor": {"origin", "root" (base64), "size"}}``."""
    pred: dict[str, Any] | None = None
    if predecessor is not None:
        origin, size, root = predecessor
        pred = {"origin": origin, "size": size, "root": b64(root)}
    return canonical_json({"predecessor": pred})


def erasure_record(origin: str, indices: Iterable[int], reason: str) -> bytes:
    """The bytes an ``erasure`` leaf hashes: RFC 8785 JSON of
    ``{"indices": [ascending], "origin", "reason"}``. No receipt content: the leaf outlives
    the body it accounts for."""
    return canonical_json({"origin": origin, "indices": sorted(set(indices)), "reason": reason})


def record_entry(kind: str, record: bytes) -> LogEntry:
    return LogEntry(kind, hashlib.sha256(record).digest())
