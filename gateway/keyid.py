"""Key ids for Ed25519 signing keys, shared by receipts, policy bundles and the PKI tools.

Apart from `gateway.pki` so that an offline verifier needs no PKI code to name a key."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = ["signing_key_id"]


def signing_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A key id: the first 16 hex digits of SHA-256 over the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
