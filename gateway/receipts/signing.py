"""Receipt signatures (Ed25519) and the published key set with validity windows.

Signed message::

    b"ztgate-receipt/v1\\n" || receipt id || "\\n" || SHA-256(Receipt.to_canonical())

The prefix keeps a receipt signature from ever being valid for anything else the key
signs; signing the digest (with the id) lets the compact summary that rides on the
response (`gateway.receipts.issue.summary`) carry the very same signature, verifiable
without the full receipt.
A key id is `gateway.pki.signing_key_id` (16 hex digits of SHA-256 over the raw key).

Key rotation: the operator publishes a `KeySet`; each key has `valid_from` and, once
retired, `valid_until`. Whether a receipt's key was valid is judged by the time of the
signed checkpoint that includes it (see `gateway.receipts.verify`), never by the
receipt's own `time` field, which the signer controls.

Verification helpers return a `Verdict` (success, or failure with a reason), in the style
of sigstore-python's `VerificationResult`; they never raise on bad input.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.files import atomic_write
from gateway.keyid import signing_key_id
from gateway.receipts.canonical import b64, canonical_json, unb64
from gateway.receipts.model import Receipt, SignedReceipt
from gateway.signer import Signer as KeySigner
from gateway.signer import raw_public

__all__ = [
    "RECEIPT_DOMAIN",
    "KeySet",
    "PublishedKey",
    "Signer",
    "Verdict",
    "format_time",
    "parse_time",
    "raw_public",
    "receipt_digest",
    "signed_message",
]

RECEIPT_DOMAIN = b"ztgate-receipt/v1\n"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one check: `ok`, or not with a machine `code` and a human `reason`."""

    ok: bool
    code: str = "ok"
    reason: str = ""

    @classmethod
    def success(cls) -> Verdict:
        return cls(True)

    @classmethod
    def failure(cls, code: str, reason: str) -> Verdict:
        return cls(False, code, reason)

    def __bool__(self) -> bool:
        return self.ok


def format_time(t: dt.datetime) -> str:
    """RFC 3339, UTC, milliseconds, `Z`.

    Per receipt, so written for speed: `isoformat` (C, milliseconds truncated as below)
    gives ``YYYY-MM-DDTHH:MM:SS.mmm+00:00`` for a UTC time. `strftime` stays for years
    before 1000, which its ``%Y`` does not pad on every platform (the text is kept as it
    was). `tests/test_receipts_canonical.py` holds the two equal."""
    if t.tzinfo is not dt.UTC:
        t = t.astimezone(dt.UTC)
    if t.year >= 1000:
        return t.isoformat(timespec="milliseconds")[:23] + "Z"
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC)


class Signer:
    """Signs receipts with one Ed25519 key: a file's, or a token's (`gateway.signer`)."""

    def __init__(self, key: KeySigner, key_id: str | None = None) -> None:
        self.key = key
        self.public_key = key.public_key()
        self.key_id = key_id or signing_key_id(self.public_key)

    def sign_bytes(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def sign(self, receipt: Receipt) -> SignedReceipt:
        return self.sign_with_digest(receipt)[0]

    def sign_with_digest(self, receipt: Receipt) -> tuple[SignedReceipt, bytes]:
        """The signed receipt and the digest its signature covers: the one canonicalisation
        a receipt gets on the hot path, whose bytes the log stores (`to_bytes`) and whose
        digest the response's summary line carries (`gateway.receipts.issue.summary`)."""
        if receipt.key_id != self.key_id:
            receipt = replace(receipt, key_id=self.key_id)
        canonical = receipt.to_canonical()
        digest = hashlib.sha256(canonical).digest()
        sig = self.key.sign(signed_message(receipt, digest))
        return SignedReceipt(receipt, sig, canonical), digest


def receipt_digest(receipt: Receipt) -> bytes:
    return hashlib.sha256(receipt.to_canonical()).digest()


def signed_message(receipt: Receipt, digest: bytes | None = None) -> bytes:
    digest = receipt_digest(receipt) if digest is None else digest
    return RECEIPT_DOMAIN + receipt.receipt_id.encode() + b"\n" + digest


@dataclass(frozen=True, slots=True)
class PublishedKey:
    key_id: str
    public_key: ed25519.Ed25519PublicKey
    valid_from: dt.datetime
    valid_until: dt.datetime | None = None  # None: current key

    def covers(self, t: dt.datetime) -> bool:
        return self.valid_from <= t and (self.valid_until is None or t <= self.valid_until)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "alg": "Ed25519",
            "public_key": b64(raw_public(self.public_key)),
            "valid_from": format_time(self.valid_from),
            "valid_until": None if self.valid_until is None else format_time(self.valid_until),
        }

    @classmethod
    def from_dict(cls, d: Any) -> PublishedKey:
        if not isinstance(d, dict):
            raise ValueError("a key entry must be an object")
        if d.get("alg", "Ed25519") != "Ed25519":
            raise ValueError(f"unsupported algorithm {d.get('alg')!r}")
        pub = ed25519.Ed25519PublicKey.from_public_bytes(unb64(str(d["public_key"]), 32))
        key_id = str(d.get("key_id") or signing_key_id(pub))
        if key_id != signing_key_id(pub):
            raise ValueError(f"key id {key_id} does not match its public key")
        until = d.get("valid_until")
        return cls(
            key_id,
            pub,
            parse_time(str(d["valid_from"])),
            None if until is None else parse_time(str(until)),
        )


class KeySet:
    """Published receipt keys with validity windows (`keys.json` beside the log)."""

    def __init__(self, keys: Iterable[PublishedKey] = ()) -> None:
        self._keys: dict[str, PublishedKey] = {}
        for k in keys:
            self._keys[k.key_id] = k

    def __iter__(self) -> Iterator[PublishedKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> PublishedKey | None:
        return self._keys.get(key_id)

    def add(self, key: ed25519.Ed25519PublicKey, valid_from: dt.datetime) -> PublishedKey:
        k = PublishedKey(signing_key_id(key), key, valid_from)
        self._keys.setdefault(k.key_id, k)
        return self._keys[k.key_id]

    def retire(self, key_id: str, at: dt.datetime) -> None:
        self._keys[key_id] = replace(self._keys[key_id], valid_until=at)

    def rotate(self, new: ed25519.Ed25519PublicKey, at: dt.datetime) -> PublishedKey:
        """Retire every current key at `at`; `new` is valid from `at`."""
        for k in list(self._keys.values()):
            if k.valid_until is None and k.key_id != signing_key_id(new):
                self.retire(k.key_id, at)
        return self.add(new, at)

    def to_json(self) -> bytes:
        return canonical_json({"keys": [k.to_dict() for k in self._keys.values()]})

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeySet:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("a key set is an object with a 'keys' list")
        return cls(PublishedKey.from_dict(k) for k in doc["keys"])

    @classmethod
    def load(cls, path: Path) -> KeySet:
        return cls.from_json(path.read_bytes()) if path.is_file() else cls()

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_json(), mode=None)  # public keys: the umask's default mode

    # --- verification ------------------------------------------------------------------
    def verify(self, signed: SignedReceipt) -> Verdict:
        """The signature only; the key's window is checked against a checkpoint's time."""
        return self.verify_digest(
            signed.receipt.key_id,
            signed.receipt.receipt_id,
            receipt_digest(signed.receipt),
            signed.signature,
        )

    def verify_digest(self, key_id: str, receipt_id: str, digest: bytes, sig: bytes) -> Verdict:
        key = self._keys.get(key_id)
        if key is None:
            return Verdict.failure(
                "unknown-key", f"receipt key {key_id} is not in the trusted key set"
            )
        try:
            key.public_key.verify(sig, RECEIPT_DOMAIN + receipt_id.encode() + b"\n" + digest)
        except InvalidSignature:
            return Verdict.failure("bad-signature", "receipt signature does not verify")
        return Verdict.success()

    def window(self, key_id: str, t: dt.datetime) -> Verdict:
        key = self._keys.get(key_id)
        if key is None:
            return Verdict.failure("unknown-key", f"receipt key {key_id} is not trusted")
        if not key.covers(t):
            until = "now" if key.valid_until is None else format_time(key.valid_until)
            return Verdict.failure(
                "key-outside-window",
                f"key {key_id} is valid {format_time(key.valid_from)} .. {until}; "
                f"the including checkpoint is from {format_time(t)}",
            )
        return Verdict.success()


# --- the compact line a response carries (`gateway.receipts.issue.summary`) -------------
SUMMARY_PREFIX = "ztgate-receipt/v1"


def verify_summary(line: str, keys: KeySet, receipt: Receipt | None = None) -> Verdict:
    """Check a response's summary line against trusted keys (and, if given, the receipt)."""
    parts = line.strip().split(" ")
    if len(parts) != 5 or parts[0] != SUMMARY_PREFIX:
        return Verdict.failure("malformed", "not a ztgate-receipt/v1 summary line")
    _, rid, digest64, key_id, sig64 = parts
    try:
        digest, sig = unb64(digest64, 32), unb64(sig64, 64)
    except ValueError as exc:
        return Verdict.failure("malformed", str(exc))
    v = keys.verify_digest(key_id, rid, digest, sig)
    if (
        v
        and receipt is not None
        and (receipt.receipt_id != rid or receipt_digest(receipt) != digest)
    ):
        return Verdict.failure("mismatch", "the summary is for another receipt")
    return v
