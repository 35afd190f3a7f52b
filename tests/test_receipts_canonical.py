"""The receipt's hand-written encoders against the generic ones they replace on the hot path:
`Receipt.to_canonical` (written field by field) must give exactly the RFC 8785 bytes the
`rfc8785` package gives for `to_dict()`, and `format_time` (via `isoformat`) exactly the
text the `strftime` version gave, for every input."""

from __future__ import annotations

import datetime as dt
from typing import Any

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.receipts.canonical import MAX_SAFE_INTEGER, canonical_json, json_safe
from gateway.receipts.model import (
    KINDS,
    ClientRef,
    Denial,
    ModelRef,
    PolicyRef,
    Receipt,
    SignedReceipt,
    TensorRef,
    VerificationRef,
    _canonical,
    _Generic,
)
from gateway.receipts.signing import format_time

# Any text (controls, quotes, backslashes, non-ASCII, astral), never a lone surrogate: a
# receipt is UTF-8, which cannot hold one.
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_ascii_key = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
_big = st.integers(min_value=-(2**70), max_value=2**70)
# Integers near and beyond ±(2^53-1), where RFC 8785 and the safe-integer rule bite.
_int = st.one_of(
    st.integers(min_value=-1000, max_value=1000),
    st.integers(min_value=MAX_SAFE_INTEGER - 2, max_value=MAX_SAFE_INTEGER + 2),
    st.integers(min_value=-MAX_SAFE_INTEGER - 2, max_value=-MAX_SAFE_INTEGER + 2),
    _big,
)
_opt = st.none() | _text
_tensor = st.builds(TensorRef, _text, _text, st.lists(_int, max_size=4).map(tuple), _text)
_ext_value = st.one_of(
    _text, _int, st.booleans(), st.lists(_text, max_size=3).map(tuple), st.lists(_text, max_size=3)
)
_ext = st.dictionaries(st.one_of(_ascii_key, _text), _ext_value, max_size=5) | st.dictionaries(
    _ascii_key, _ext_value, max_size=5
)
_receipt = st.builds(
    Receipt,
    receipt_id=_text,
    log_id=_text,
    index=st.one_of(st.integers(min_value=0, max_value=2**40), _big),
    time=_text,
    kind=st.sampled_from(KINDS),
    key_id=_text,
    client=st.none() | st.builds(ClientRef, _text, _text, _text),
    model=st.none() | st.builds(ModelRef, _text, _text, _text),
    inputs=st.lists(_tensor, max_size=3).map(tuple),
    outputs=st.lists(_tensor, max_size=3).map(tuple),
    policy=st.none() | st.builds(PolicyRef, _text, _text),
    verification=st.none() | st.builds(VerificationRef, _text, _text, _opt, _opt),
    nodes=st.lists(_text, max_size=3).map(tuple),
    denial=st.none() | st.builds(Denial, _text, _text, _int, _opt, _opt, _opt),
    request_id=_opt,
    version=_int,
    extensions=_ext,
)


def _generic(r: Receipt) -> bytes:
    return rfc8785.dumps(json_safe(r.to_dict()))


@settings(max_examples=1500, deadline=None)
@given(_receipt)
def test_direct_canonical_bytes_equal_rfc8785(r: Receipt) -> None:
    assert r.to_canonical() == _generic(r) == canonical_json(r.to_dict())
    try:  # the direct writer itself, where it takes the receipt
        direct = _canonical(r).encode()
    except (_Generic, TypeError):
        return
    assert direct == _generic(r)


def test_direct_canonical_bytes_on_a_typical_receipt() -> None:
    # Positive control for the property above, with the shapes the gateway writes: an
    # answer with tensors and site extensions, and a coalesced denial.
    tensor = TensorRef("input", "FP32", (1, 4), "ab" * 32)
    answer = Receipt(
        "abcdefghijklmnop.12.0123456789abcdef", "abcdefghijklmnop", 12,
        "2026-12-02T10:00:00.123Z", "answer", "0123456789abcdef",
        ClientRef("spiffe://ztgate.local/client/é", "5f1e", "CN=ca"),
        ModelRef("iris", "1", "9f" * 32), (tensor,), (tensor,),
        PolicyRef("sha256:" + "00" * 32, "0123"), VerificationRef("zk", "proof-valid", "aa", "bb"),
        ("node-a",), None, "req\n\"1\"\\", extensions={"site": "a", "hops": ("x", "y"), "n": 3},
    )  # fmt: skip
    denial = Receipt(
        "abcdefghijklmnop.13.0123456789abcdef", "abcdefghijklmnop", 13,
        "2026-12-02T10:00:00.123Z", "denial", "0123456789abcdef",
        denial=Denial("urn:x", "forbidden", 7, "t0", "t1", "abcdefghijklmnop.12.0123456789abcdef"),
    )  # fmt: skip
    for r in (answer, denial):
        raw = r.to_canonical()
        assert raw == _generic(r) == _canonical(r).encode()  # the direct writer took it
        # and the envelope of those bytes parses back only as the same receipt
        signed = SignedReceipt(r, bytes(64), raw)
        assert SignedReceipt.from_bytes(signed.to_bytes()) == signed


def test_values_outside_the_receipt_format_still_encode_generically() -> None:
    # A field holding something other than its declared type (the dataclasses do not check)
    # is not the direct writer's business: the generic encoder decides, as before.
    odd: dict[str, Any] = {"request_id": 7, "nodes": (True,), "extensions": {"k": None}}
    for field, value in odd.items():
        r = Receipt("id", "log", 1, "t", "answer", "key", **{field: value})
        assert r.to_canonical() == _generic(r)
    # non-ASCII extension keys sort by UTF-16 code units: generic path, same bytes
    r = Receipt("id", "log", 1, "t", "answer", "key", extensions={"\U0001f600": 1, "\uff61": 2})
    assert r.to_canonical() == _generic(r)


# ------------------------------------------------------------------------------ format_time
def _strftime_format_time(t: dt.datetime) -> str:
    """`format_time` as it was written before (the reference)."""
    t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _outcome(fn: Any, t: dt.datetime) -> Any:
    try:
        return fn(t)
    except (OverflowError, ValueError) as exc:  # out of range after conversion: both raise
        return type(exc)


_zones = st.one_of(
    st.none(),
    st.just(dt.UTC),
    st.builds(
        dt.timezone,
        st.timedeltas(
            min_value=dt.timedelta(hours=-23, minutes=-59),
            max_value=dt.timedelta(hours=23, minutes=59),
        ),
    ),
)


@settings(max_examples=3000, deadline=None)
@given(st.datetimes(timezones=_zones))
def test_format_time_equals_the_strftime_version(t: dt.datetime) -> None:
    assert _outcome(format_time, t) == _outcome(_strftime_format_time, t)


def test_format_time_examples() -> None:
    u = dt.UTC
    cases = {
        dt.datetime(2026, 12, 2, 10, 0, 0, 123999, u): "2026-12-02T10:00:00.123Z",
        dt.datetime(2026, 12, 31, 23, 59, 59, 999999, u): "2026-12-31T23:59:59.999Z",
        dt.datetime(2026, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))): (
            "2025-12-31T23:30:00.000Z"
        ),
    }
    for t, text in cases.items():
        assert format_time(t) == text == _strftime_format_time(t)
    # early years: the strftime branch, unchanged
    early = dt.datetime(999, 5, 6, 7, 8, 9, 1000, u)
    assert format_time(early) == _strftime_format_time(early)
