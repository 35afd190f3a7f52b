"""The typed leaves of a receipt log and the tlog-proof header: what a log writer and an
offline verifier must agree on, byte for byte, and nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.receipts.canonical import canonical_json

__all__ = ["ENTRY_TYPES", "TLOG_PROOF_HEADER", "LogEntry"]

ENTRY_TYPES = (
    "receipt",
    "policy_load",
    "revocation",
    "node_quarantine",
    "node_release",
    "late_evidence",
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
