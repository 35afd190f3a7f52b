"""Canonical JSON for everything that is hashed or signed: RFC 8785 (JCS) via `rfc8785`.

JCS writes numbers as IEEE-754 doubles, so an integer beyond 2^53 would silently lose
precision in another verifier's JSON parser. We never let one through as a number: every
integer outside ±(2^53 - 1) is written as its decimal string (a certificate serial, a
huge tensor dimension). `tests/test_receipts.py::test_jcs_vectors` pins the output bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

import rfc8785

__all__ = ["MAX_SAFE_INTEGER", "b64", "canonical_json", "json_safe", "unb64"]

MAX_SAFE_INTEGER = 2**53 - 1


def json_safe(value: Any) -> Any:
    """`value` with every integer beyond the safe range as a string (bools untouched)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [json_safe(v) for v in value]
    raise TypeError(f"not JSON-encodable: {type(value).__name__}")


class _NotSimple(Exception):
    pass


def _simple(value: Any) -> Any:
    """`json_safe`, raising `_NotSimple` where `json.dumps` and RFC 8785 could differ."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k.isascii():
                raise _NotSimple
            out[k] = _simple(v)
        return out
    if isinstance(value, list | tuple):
        return [_simple(v) for v in value]
    raise _NotSimple


def canonical_json(value: Any) -> bytes:
    """RFC 8785 bytes of `value` (after `json_safe`).

    Fast path: for values made only of ASCII-keyed objects, arrays, strings, safe integers,
    booleans and null, RFC 8785 output is exactly ``json.dumps(sort_keys=True,
    ensure_ascii=False, separators=(",", ":"))`` (same key order for ASCII keys, same
    string escapes, integers in decimal); it is ~5x faster than the pure-Python `rfc8785`,
    which handles everything else (floats, non-ASCII keys). A property test holds the two
    equal on arbitrary values.
    """
    try:
        simple = _simple(value)
    except _NotSimple:
        return rfc8785.dumps(json_safe(value))
    return json.dumps(simple, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, size: int | None = None) -> bytes:
    """Strict standard base64: one encoding per value (no stray bits, no whitespace).

    Lenient decoders accept several strings for one byte string (unused trailing bits);
    a verifier that did so would let a flipped character go unnoticed.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("non-canonical base64")
    if size is not None and len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw
