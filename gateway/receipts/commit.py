"""Salted commitments to tensors: what a receipt says about inputs and outputs.

    commitment = SHA-256( "ztgate/tensor-commitment/v1\\n" || salt (32 bytes)
                          || u8 len(datatype) || datatype (ASCII)
                          || u8 rank || rank x u64 big-endian dimension
                          || canonical_bytes(tensor) )

`canonical_bytes` is the little-endian, C-order data independent of how the tensor
travelled, so the same tensor sent as JSON or as binary commits to the same value. The
salt is 32 fresh random bytes per request, returned to the client only: without it a
commitment cannot be tested against a guessed input (a low-entropy input, a yes/no, a
small image, cannot be brute-forced from the receipt), and with it the client alone can
later show what it sent and got. Every field is length-framed, so no two (datatype,
shape, data) triples share an encoding.
"""

from __future__ import annotations

import hashlib
import secrets

from gateway.protocol.tensors import Tensor, canonical_bytes

__all__ = ["COMMITMENT_PREFIX", "SALT_SIZE", "commit_tensor", "new_salt"]

SALT_SIZE = 32
COMMITMENT_PREFIX = "sha256:"
_DOMAIN = b"ztgate/tensor-commitment/v1\n"


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_SIZE)


def commit_tensor(t: Tensor, salt: bytes) -> str:
    """`sha256:<hex>` over the salt, datatype, shape and canonical bytes of `t`."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"salt must be {SALT_SIZE} bytes")
    dtype = t.datatype.encode("ascii")
    h = hashlib.sha256(_DOMAIN)
    h.update(salt)
    h.update(bytes([len(dtype)]))
    h.update(dtype)
    h.update(bytes([len(t.shape)]))
    for dim in t.shape:
        h.update(dim.to_bytes(8, "big"))
    h.update(canonical_bytes(t))
    return COMMITMENT_PREFIX + h.hexdigest()
