"""Late evidence, defined once: a signed document about a receipt, logged after it.

Evidence that arrives after an answer (a spot check, a tiebreak, later a proof) is one
document, RFC 8785 JSON, signed by the receipt key, and logged as a ``late_evidence`` leaf
whose ``ref`` is the receipt id and whose record (shipped in bundles beside the leaf) is
the document itself. The receipt never changes; its *final status* is derived from the
receipt and the evidence about it (docs/reputation.md, "Late evidence"):

    pending        a check was scheduled (extensions.spot_check == "scheduled") or a lazy
                   proof (extensions.lazy_proof == "pending"), no evidence yet
    verified       a lazy proof verified and states the answer given
    confirmed      the latest evidence says so
    contradicted   the latest evidence says the answer was wrong
    check-missing  a scheduled check could not run (dropped, no node allowed, checker failed)

`final_status` returns None for a receipt that expects no evidence and has none.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature

from gateway.receipts.canonical import b64, canonical_json, unb64
from gateway.receipts.entry import LogEntry
from gateway.receipts.signing import KeySet, Signer, format_time

__all__ = [
    "DOC_TYPE",
    "FINAL_STATUSES",
    "VERDICTS",
    "EvidenceLog",
    "final_status",
    "late_evidence",
    "record_late_evidence",
    "verify_late_evidence",
]

DOC_TYPE = "ztgate-late-evidence/v1"
DOMAIN = b"ztgate-late-evidence/v1\n"
# "verified": a lazy proof arrived, verified, and states the answer given (docs/zk.md).
VERDICTS = ("confirmed", "contradicted", "check-missing", "verified")
FINAL_STATUSES = ("pending", *VERDICTS)
SCHEDULED = "scheduled"  # receipt extension `spot_check` when a check was sampled
LAZY_PENDING = "pending"  # receipt extension `lazy_proof` when a proof was scheduled
DETAIL_KEYS = frozenset({"proof_sha256", "instances_sha256", "deadline"})


def late_evidence(
    signer: Signer,
    *,
    receipt_id: str,
    verdict: str,
    kind: str,
    nodes: Sequence[str] = (),
    reason: str = "",
    now: dt.datetime | None = None,
    details: Mapping[str, str] | None = None,
) -> bytes:
    """The signed document's bytes (what the leaf hashes and bundles ship). ``details``:
    hashes only (`DETAIL_KEYS`: a lazy proof's), never tensor values."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}")
    extra = dict(details or {})
    if set(extra) - DETAIL_KEYS:
        raise ValueError(f"unknown late-evidence details {sorted(set(extra) - DETAIL_KEYS)}")
    body: dict[str, Any] = {
        **extra,
        "type": DOC_TYPE,
        "receipt_id": receipt_id,
        "verdict": verdict,
        "kind": kind,
        "nodes": list(nodes),
        "reason": reason,
        "time": format_time(now or dt.datetime.now(dt.UTC)),
        "key_id": signer.key_id,
    }
    sig = signer.sign_bytes(DOMAIN + canonical_json(body))
    return canonical_json({**body, "signature": b64(sig)})


class EvidenceLog(Protocol):
    """What `record_late_evidence` needs of the receipt service (gateway/receipts/service.py)."""

    signer: Signer

    async def record_document(self, entry: LogEntry, record: bytes) -> int: ...


async def record_late_evidence(
    receipts: EvidenceLog,
    *,
    receipt_id: str,
    verdict: str,
    kind: str,
    nodes: Sequence[str] = (),
    reason: str = "",
    details: Mapping[str, str] | None = None,
) -> None:
    """`late_evidence` signed by the receipt key and logged as a ``late_evidence`` leaf
    about the receipt, the document kept as the leaf's record (spot checks, text checks
    and lazy proofs all record theirs this way)."""
    doc = late_evidence(
        receipts.signer,
        receipt_id=receipt_id,
        verdict=verdict,
        kind=kind,
        nodes=nodes,
        reason=reason,
        details=details,
    )
    entry = LogEntry("late_evidence", hashlib.sha256(doc).digest(), receipt_id)
    await receipts.record_document(entry, doc)


def verify_late_evidence(raw: bytes, keys: KeySet, receipt_id: str | None = None) -> dict[str, Any]:
    """The document, if its signature verifies under a key of `keys`; else ValueError."""
    import json

    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("type") != DOC_TYPE:
        raise ValueError("not a late-evidence document")
    if canonical_json(doc) != raw:
        raise ValueError("late evidence is not canonical JSON")
    if receipt_id is not None and doc.get("receipt_id") != receipt_id:
        raise ValueError("late evidence about another receipt")
    if doc.get("verdict") not in VERDICTS:
        raise ValueError("unknown verdict")
    key = keys.get(str(doc.get("key_id")))
    if key is None:
        raise ValueError("late evidence signed by an unknown key")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        key.public_key.verify(unb64(str(doc["signature"]), 64), DOMAIN + canonical_json(body))
    except (InvalidSignature, KeyError) as exc:
        raise ValueError("late evidence signature does not verify") from exc
    return doc


def final_status(
    extensions: Mapping[str, Any], evidence: Iterable[Mapping[str, Any]]
) -> str | None:
    """The receipt's derived status: the latest evidence's verdict (in log order), else
    pending when a check was scheduled, else None."""
    verdict = None
    for doc in evidence:
        verdict = str(doc["verdict"])
    if verdict is not None:
        return verdict
    if extensions.get("lazy_proof") == LAZY_PENDING:
        return "pending"
    return "pending" if extensions.get("spot_check") == SCHEDULED else None
