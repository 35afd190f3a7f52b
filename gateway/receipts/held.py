"""Receipts a client holds, checked against a log as reconciled (an audit bundle).

A client keeps the receipt of each answer it was given. An edge captured between two
reconciliations could rewrite what it logged since the last one the core cosigned; the
receipts its clients hold then disagree with the reconciled log, and this says so: each
held receipt must sit at its index in the bundle's inventory, as exactly the leaf its
envelope hashes to. Run after `verify_bundle` (which checks that the inventory reproduces
the signed, cosigned head): an inventory that did not verify proves nothing here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from gateway.receipts.bundle import BundleError, BundleReader
from gateway.receipts.canonical import canonical_json
from gateway.receipts.entry import LogEntry
from gateway.receipts.model import FormatError, SignedReceipt
from gateway.receipts.verify import Report, TrustPolicy

__all__ = ["check_held"]


def _envelope(path: Path) -> bytes:
    """The canonical envelope of a stored receipt or of a GET /v2/receipts/{id} body."""
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BundleError(f"{path} is not a receipt .json") from None
    if not isinstance(doc, dict) or not {"receipt", "sig"} <= set(doc):
        raise BundleError(f"{path} is JSON but not a receipt (no 'receipt' and 'sig')")
    return canonical_json({"receipt": doc["receipt"], "sig": doc["sig"]})


def check_held(
    bundle: BundleReader, held: Iterable[Path], trust: TrustPolicy, report: Report
) -> None:
    """One finding per held receipt: `held-in-log` (valid) or `absent-from-log`; a receipt
    whose signature the trust file's keys do not verify proves nothing about the log and
    is reported as such (its verdict's code), never as a rewrite."""
    logs = {str(e.get("log_id")): e for e in bundle.manifest["logs"] if isinstance(e, dict)}
    for path in held:
        envelope = _envelope(path)
        try:
            receipt = SignedReceipt.from_bytes(envelope).receipt
        except FormatError as exc:
            raise BundleError(f"{path}: {exc}") from None
        subject = f"held receipt {receipt.receipt_id}"
        verdict = trust.receipt_keys.verify(SignedReceipt.from_bytes(envelope))
        if not verdict.ok:
            report.add(subject, "invalid", verdict.code, verdict.reason)
            continue
        entry = logs.get(receipt.log_id)
        inv = entry.get("inventory") if entry else None
        if entry is None or not isinstance(inv, dict):
            report.add(subject, "invalid", "absent-from-log",
                       f"the bundle holds no inventory of log {receipt.log_id}")  # fmt: skip
            continue
        try:
            start, size = int(inv["start"]), int(inv["size"])
        except (KeyError, TypeError, ValueError):
            report.add(subject, "invalid", "malformed-inventory", "the inventory has no range")
            continue
        if not start <= receipt.index < size:
            report.add(subject, "invalid", "absent-from-log",
                       f"index {receipt.index} is outside the reconciled range "
                       f"{start}..{size}: never handed to the core")  # fmt: skip
            continue
        leaves = (bundle.read(f"logs/{receipt.log_id}/leaves") or b"").split(b"\n")
        leaf = leaves[receipt.index - start] if receipt.index - start < len(leaves) else b""
        mine = LogEntry("receipt", hashlib.sha256(envelope).digest()).leaf_data()
        if leaf != mine:
            report.add(subject, "invalid", "absent-from-log",
                       f"the reconciled log holds another leaf at index {receipt.index}: "
                       "the log was rewritten after this receipt was given")  # fmt: skip
        else:
            report.add(subject, "valid", "held-in-log")
