"""The receipt: what the gateway signs for every answer and every denial.

A receipt is a JSON object, canonicalised with RFC 8785 (`to_canonical`), signed with
Ed25519 (`gateway.receipts.signing`), and stored as a `SignedReceipt` envelope::

    {"receipt": {...fields below...}, "sig": "<base64 Ed25519 signature>"}

The log holds only SHA-256 of the envelope's canonical bytes (`SignedReceipt.digest`);
the envelope itself lives in the body store beside the log and may be erased.

Field names are part of the format (version `v` = 1); `docs/compliance.md` describes each.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _q
from typing import Any, Literal

from gateway.receipts.canonical import MAX_SAFE_INTEGER, b64, canonical_json, unb64

__all__ = [
    "FORMAT_VERSION",
    "ClientRef",
    "Denial",
    "ExtValue",
    "FormatError",
    "ModelRef",
    "PolicyRef",
    "Receipt",
    "SignedReceipt",
    "TensorRef",
    "VerificationRef",
    "ext_value",
    "make_receipt_id",
    "parse_receipt_id",
]

FORMAT_VERSION = 1
# "open" and "close" bracket a stream from a generative model: the opening receipt is
# logged before the first token leaves, the closing one (ext "opening": the opening's id)
# commits to every token sent (gateway.generate.receipts).
Kind = Literal["answer", "denial", "open", "close"]
KINDS: tuple[Kind, ...] = ("answer", "denial", "open", "close")
_RID = re.compile(r"^([a-z2-7]{16})\.([0-9]{1,19})\.([0-9a-f]{16})$")
_LOG_ID = re.compile(r"^[a-z2-7]{16}$")


class FormatError(ValueError):
    """A receipt or envelope that does not parse as format version 1."""


ExtValue = str | int | bool | tuple[str, ...]


def ext_value(v: Any) -> ExtValue:
    """A receipt extension value, checked: a JSON string, safe integer, boolean or list of
    strings (lists are kept as tuples so a receipt stays immutable)."""
    if isinstance(v, str | bool):
        return v
    if isinstance(v, int) and -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
        return v
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise TypeError(
        f"ext values are strings, safe integers, booleans or lists of strings, "
        f"not {type(v).__name__}"
    )


def make_receipt_id(log_id: str, index: int, nonce: str) -> str:
    """`<log id>.<index>.<16 hex nonce>`: routable (log id), locatable, not guessable."""
    return f"{log_id}.{index}.{nonce}"


def parse_receipt_id(rid: str) -> tuple[str, int]:
    m = _RID.fullmatch(rid)
    if not m:
        raise FormatError(f"malformed receipt id {rid!r}")
    return m.group(1), int(m.group(2))


@dataclass(frozen=True, slots=True)
class ClientRef:
    spiffe_id: str
    serial: str  # lowercase hex, as `Identity.serial`
    issuer: str


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True, slots=True)
class TensorRef:
    name: str
    datatype: str
    shape: tuple[int, ...]
    commitment: str  # gateway.receipts.commit.commit_tensor


@dataclass(frozen=True, slots=True)
class PolicyRef:
    set_hash: str
    decision_id: str


@dataclass(frozen=True, slots=True)
class VerificationRef:
    mode: str  # none | redundant | zk | mpc
    result: str  # e.g. "unverified" (mode none), "agreed", "proof-valid", ...
    public_instances_sha256: str | None = None  # zk: hash of the proof's public instances
    proof_sha256: str | None = None  # zk: hash of the proof itself


@dataclass(frozen=True, slots=True)
class Denial:
    problem_type: str  # the problem+json `type`
    reason: str
    count: int = 1  # > 1: identical denials coalesced into this receipt
    first_time: str | None = None
    last_time: str | None = None
    follows: str | None = None  # the receipt id of the first denial of a coalesced run


@dataclass(frozen=True, slots=True)
class Receipt:
    receipt_id: str
    log_id: str
    index: int
    time: str  # RFC 3339 UTC, milliseconds; informational: key validity is judged by checkpoints
    kind: Kind
    key_id: str
    client: ClientRef | None = None
    model: ModelRef | None = None
    inputs: tuple[TensorRef, ...] = ()
    outputs: tuple[TensorRef, ...] = ()
    policy: PolicyRef | None = None
    verification: VerificationRef | None = None
    nodes: tuple[str, ...] = ()
    denial: Denial | None = None
    request_id: str | None = None
    version: int = FORMAT_VERSION
    # Mode evidence as JSON values: strings, safe integers, booleans, lists of strings.
    extensions: Mapping[str, ExtValue] = field(default_factory=dict)

    # --- encoding ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": self.version,
            "id": self.receipt_id,
            "log": {"id": self.log_id, "index": self.index},
            "time": self.time,
            "kind": self.kind,
            "key_id": self.key_id,
            "client": _obj(self.client),
            "model": _obj(self.model),
            "inputs": [_tensor(t) for t in self.inputs],
            "outputs": [_tensor(t) for t in self.outputs],
            "policy": _obj(self.policy),
            "verification": _obj(self.verification),
            "nodes": list(self.nodes),
            "denial": _obj(self.denial),
            "request_id": self.request_id,
        }
        if self.extensions:
            d["ext"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.extensions.items()
            }
        return d

    def to_canonical(self) -> bytes:
        """RFC 8785 bytes: what is hashed and signed (`gateway.receipts.signing`).

        The fields are fixed, so the bytes are written directly, keys in their sorted
        order (`_canonical`), rather than through a dict and a generic encoder: receipts
        are on the hot path of every request. Anything the direct writer does not cover
        (a non-ASCII or non-string extension key, a value of an unexpected type) goes the
        generic way (`canonical_json`). `tests/test_receipts_canonical.py` holds the two
        equal, and equal to the `rfc8785` package, on many receipts.
        """
        try:
            return _canonical(self).encode()
        except (_Generic, TypeError):  # TypeError: `_q` given something not a str
            return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Receipt:
        try:
            return _parse_receipt(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"malformed receipt: {exc}") from None


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    receipt: Receipt
    signature: bytes
    # Receipt.to_canonical(), when the signer already computed it (not part of equality).
    canonical: bytes | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"receipt": self.receipt.to_dict(), "sig": b64(self.signature)}

    def to_bytes(self) -> bytes:
        """The envelope's canonical bytes: what is stored and what the log leaf hashes.

        RFC 8785 of {"receipt": ..., "sig": ...}: the keys sort as written, the receipt
        is its own canonical form and base64 needs no escaping, so the envelope is a
        plain concatenation."""
        c = self.canonical if self.canonical is not None else self.receipt.to_canonical()
        return b'{"receipt":' + c + b',"sig":"' + b64(self.signature).encode() + b'"}'

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedReceipt:
        """Parse an envelope; the bytes must be exactly canonical (one encoding per receipt)."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"receipt is not JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"receipt", "sig"}:
            raise FormatError("receipt envelope must hold exactly 'receipt' and 'sig'")
        try:
            sig = unb64(_s(doc["sig"]), 64)
        except ValueError as exc:
            raise FormatError(f"malformed signature: {exc}") from None
        signed = cls(Receipt.from_dict(doc["receipt"]), sig)
        if signed.to_bytes() != raw:
            raise FormatError("receipt is not in canonical (RFC 8785) form")
        return signed


# --- the canonical writer -----------------------------------------------------------------
# RFC 8785 for the receipt's fixed shape. Keys sort by UTF-16 code units; every key here is
# ASCII, so that is byte order, written out below. Strings: `encode_basestring` is what
# `json.dumps(ensure_ascii=False)` uses, the escapes RFC 8785 prescribes (", \\, the short
# forms \b \t \n \f \r, other controls as lowercase \u00XX, the rest as is). Integers:
# decimal within ±(2^53-1), beyond it a decimal string (`canonical.json_safe`). Anything
# else (`_q` raises TypeError on a non-string) is left to the generic encoder.
class _Generic(Exception):
    """A value the direct writer leaves to the generic encoder."""


def _int(v: object) -> str:
    if type(v) is not int:  # a bool or an int subclass: the generic encoder decides
        raise _Generic
    return str(v) if -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER else '"' + str(v) + '"'


def _ostr(v: str | None) -> str:
    return "null" if v is None else _q(v)


def _tensors_json(ts: tuple[TensorRef, ...]) -> str:
    return ",".join(
        f'{{"commitment":{_q(t.commitment)},"datatype":{_q(t.datatype)},'
        f'"name":{_q(t.name)},"shape":[{",".join(map(_int, t.shape))}]}}'
        for t in ts
    )


def _ext_json(ext: Mapping[str, ExtValue]) -> str:
    parts = []
    for k in sorted(ext):
        if type(k) is not str or not k.isascii():  # sorted by UTF-16 units: generic
            raise _Generic
        v = ext[k]
        if v is True or v is False:
            text = "true" if v else "false"
        elif type(v) is str:
            text = _q(v)
        elif isinstance(v, tuple | list):
            text = "[" + ",".join(map(_q, v)) + "]"
        else:
            text = _int(v)
        parts.append(_q(k) + ":" + text)
    return ',"ext":{' + ",".join(parts) + "}"


def _canonical(r: Receipt) -> str:
    c, d, m, p, v = r.client, r.denial, r.model, r.policy, r.verification
    client = (
        "null"
        if c is None
        else f'{{"issuer":{_q(c.issuer)},"serial":{_q(c.serial)},"spiffe_id":{_q(c.spiffe_id)}}}'
    )
    if d is None:
        denial = "null"
    else:
        denial = (
            f'{{"count":{_int(d.count)}'
            + ("" if d.first_time is None else f',"first_time":{_q(d.first_time)}')
            + ("" if d.follows is None else f',"follows":{_q(d.follows)}')
            + ("" if d.last_time is None else f',"last_time":{_q(d.last_time)}')
            + f',"problem_type":{_q(d.problem_type)},"reason":{_q(d.reason)}}}'
        )
    model = (
        "null"
        if m is None
        else f'{{"name":{_q(m.name)},"sha256":{_q(m.sha256)},"version":{_q(m.version)}}}'
    )
    policy = (
        "null"
        if p is None
        else f'{{"decision_id":{_q(p.decision_id)},"set_hash":{_q(p.set_hash)}}}'
    )
    if v is None:
        verification = "null"
    else:
        verification = (
            f'{{"mode":{_q(v.mode)}'
            + ("" if v.proof_sha256 is None else f',"proof_sha256":{_q(v.proof_sha256)}')
            + (
                ""
                if v.public_instances_sha256 is None
                else f',"public_instances_sha256":{_q(v.public_instances_sha256)}'
            )
            + f',"result":{_q(v.result)}}}'
        )
    ext = _ext_json(r.extensions) if r.extensions else ""
    return (
        f'{{"client":{client},"denial":{denial}{ext},"id":{_q(r.receipt_id)},'
        f'"inputs":[{_tensors_json(r.inputs)}],"key_id":{_q(r.key_id)},'
        f'"kind":{_q(r.kind)},"log":{{"id":{_q(r.log_id)},"index":{_int(r.index)}}},'
        f'"model":{model},"nodes":[{",".join(map(_q, r.nodes))}],'
        f'"outputs":[{_tensors_json(r.outputs)}],"policy":{policy},'
        f'"request_id":{_ostr(r.request_id)},"time":{_q(r.time)},"v":{_int(r.version)},'
        f'"verification":{verification}}}'
    )


# --- helpers -----------------------------------------------------------------------------
def _obj(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return {k: getattr(value, k) for k in value.__slots__ if getattr(value, k) is not None}


def _tensor(t: TensorRef) -> dict[str, Any]:
    return {
        "name": t.name,
        "datatype": t.datatype,
        "shape": list(t.shape),
        "commitment": t.commitment,
    }


def _s(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _os(v: Any) -> str | None:
    return None if v is None else _s(v)


def _i(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    if isinstance(v, str):
        if not v.isdigit():
            raise ValueError(f"expected an integer, got {v!r}")
        return int(v)
    return v


def _keys(d: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise TypeError("expected an object")
    extra = set(d) - allowed
    if extra:
        raise ValueError(f"unknown fields {sorted(extra)}")
    missing = required - set(d)
    if missing:
        raise ValueError(f"missing fields {sorted(missing)}")
    return d


def _sub(cls: Any, d: Any, optional: frozenset[str] = frozenset()) -> Any:
    if d is None:
        return None
    names = set(cls.__slots__)
    d = _keys(d, names, names - optional)
    kwargs = {
        k: (_i(v) if k == "count" else _os(v) if k in optional else _s(v)) for k, v in d.items()
    }
    return cls(**kwargs)


def _tensors(items: Any) -> tuple[TensorRef, ...]:
    if not isinstance(items, list):
        raise TypeError("tensors must be a list")
    out = []
    for t in items:
        t = _keys(
            t,
            {"name", "datatype", "shape", "commitment"},
            {"name", "datatype", "shape", "commitment"},
        )
        if not isinstance(t["shape"], list):
            raise TypeError("shape must be a list")
        out.append(
            TensorRef(
                _s(t["name"]),
                _s(t["datatype"]),
                tuple(_i(x) for x in t["shape"]),
                _s(t["commitment"]),
            )
        )
    return tuple(out)


_RECEIPT_KEYS = {
    "v", "id", "log", "time", "kind", "key_id", "client", "model", "inputs", "outputs",
    "policy", "verification", "nodes", "denial", "request_id", "ext",
}  # fmt: skip


def _parse_receipt(d: Any) -> Receipt:
    d = _keys(d, _RECEIPT_KEYS, _RECEIPT_KEYS - {"ext"})
    if d["v"] != FORMAT_VERSION or isinstance(d["v"], bool):
        raise ValueError(f"unsupported receipt format version {d['v']!r}")
    log = _keys(d["log"], {"id", "index"}, {"id", "index"})
    kind = _s(d["kind"])
    known = next((k for k in KINDS if k == kind), None)
    if known is None:
        raise ValueError(f"unknown receipt kind {kind!r}")
    log_id, index = _s(log["id"]), _i(log["index"])
    if not _LOG_ID.fullmatch(log_id):
        raise ValueError(f"malformed log id {log_id!r}")
    rid = _s(d["id"])
    if parse_receipt_id(rid) != (log_id, index):
        raise ValueError("receipt id does not match its log id and index")
    if not isinstance(d["nodes"], list):
        raise TypeError("nodes must be a list")
    ext = d.get("ext", {})
    if not isinstance(ext, dict):
        raise TypeError("ext must be an object")
    ext = {_s(k): ext_value(v) for k, v in ext.items()}
    return Receipt(
        receipt_id=rid,
        log_id=log_id,
        index=index,
        time=_s(d["time"]),
        kind=known,
        key_id=_s(d["key_id"]),
        client=_sub(ClientRef, d["client"]),
        model=_sub(ModelRef, d["model"]),
        inputs=_tensors(d["inputs"]),
        outputs=_tensors(d["outputs"]),
        policy=_sub(PolicyRef, d["policy"]),
        verification=_sub(
            VerificationRef,
            d["verification"],
            frozenset({"public_instances_sha256", "proof_sha256"}),
        ),
        nodes=tuple(_s(n) for n in d["nodes"]),
        denial=_sub(
            Denial, d["denial"], frozenset({"first_time", "last_time", "follows", "count"})
        ),
        request_id=_os(d["request_id"]),
        extensions=dict(ext),
    )


def tensors_from(items: Sequence[TensorRef]) -> list[dict[str, Any]]:
    return [_tensor(t) for t in items]
