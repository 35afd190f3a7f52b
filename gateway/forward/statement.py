"""The statement an edge signs for each request it forwards, and its checks.

Signed with the site's forwarder key, not its log-checkpoint key: the core already
verified that key's certificate in the TLS handshake (so the statement's signer is the
peer, and the site comes from the certificate's SPIFFE ID, not from a table the core must
keep), revoking the forwarder certificate stops forwarding without touching the edge's
log, and a key that signs checkpoints never signs anything a peer chose the bytes of.

The statement travels in two headers: its canonical JSON (base64url) and an ECDSA
P-256/SHA-256 signature over exactly those bytes (base64url of DER).

`job`, the edge's job id when the request is a run of one of its jobs, is optional and
left out of the JSON when absent, so a statement without it is byte for byte v1's: the
core runs such a request as a job of its own (listener.py), one receipt however often the
edge runs it. A core from before `job` refuses a statement naming one as malformed:
upgrade cores before their edges.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

STATEMENT_HEADER = "ztgate-forward-statement"
SIGNATURE_HEADER = "ztgate-forward-signature"
VERSION = 1
MAX_HOPS = 4
MAX_STATEMENT_BYTES = 8192  # a client certificate and a few short fields
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_JOB_RE = re.compile(r"^[0-9a-f]{32}$")  # a job id as gateway/jobs/routes.py draws it


class StatementError(ValueError):
    """A statement that is malformed or fails a check; `reason` is a stable slug."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Statement:
    site: str  # the forwarding site, as its forwarder certificate names it
    aud: str  # the core's gateway SPIFFE ID
    client_cert: str  # the client's leaf certificate, PEM, as the edge verified it
    body_sha256: str  # hex
    model: str
    version: str  # "" when the path names none
    nonce: str  # 128 random bits, hex
    iat: int  # unix seconds
    hops: tuple[str, ...]  # sites the request passed, this one last
    v: int = VERSION
    job: str | None = None  # the edge's job id, for a job's run

    def encode(self) -> bytes:
        d = asdict(self)
        d["hops"] = list(self.hops)
        if self.job is None:
            del d["job"]
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def make(
    *,
    site: str,
    aud: str,
    client_cert: str,
    body: bytes,
    model: str,
    version: str,
    hops: tuple[str, ...] = (),
    now: float | None = None,
    job: str | None = None,
) -> Statement:
    return Statement(
        site=site,
        aud=aud,
        client_cert=client_cert,
        body_sha256=hashlib.sha256(body).hexdigest(),
        model=model,
        version=version,
        nonce=secrets.token_hex(16),
        iat=int(time.time() if now is None else now),
        hops=(*hops, site),
        job=job,
    )


def sign(statement: Statement, key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """The two headers that carry `statement`, signed with the forwarder key."""
    raw = statement.encode()
    sig = key.sign(raw, ec.ECDSA(hashes.SHA256()))
    return {STATEMENT_HEADER: _b64(raw), SIGNATURE_HEADER: _b64(sig)}


def verified(headers: dict[str, str], signer: x509.Certificate) -> Statement:
    """The statement in `headers`, if `signer` (the peer's verified certificate) signed it."""
    text, sig_text = headers.get(STATEMENT_HEADER), headers.get(SIGNATURE_HEADER)
    if not text or not sig_text:
        raise StatementError("statement-missing", "a forwarded request carries a statement")
    if len(text) > MAX_STATEMENT_BYTES * 2:
        raise StatementError("statement-malformed", "the statement is too large")
    try:
        raw, sig = _unb64(text), _unb64(sig_text)
    except (binascii.Error, ValueError) as exc:
        raise StatementError("statement-malformed", "the statement is not base64url") from exc
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise StatementError("statement-signature", "the forwarder key is not an EC key")
    try:
        key.verify(sig, raw, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise StatementError(
            "statement-signature", "the statement is not signed by this forwarder"
        ) from exc
    return _parse(raw)


def _parse(raw: bytes) -> Statement:
    try:
        d: Any = json.loads(raw)
    except ValueError as exc:
        raise StatementError("statement-malformed", "the statement is not JSON") from exc
    fields = {
        "site": str,
        "aud": str,
        "client_cert": str,
        "body_sha256": str,
        "model": str,
        "version": str,
        "nonce": str,
        "iat": int,
        "hops": list,
        "v": int,
    }
    if not isinstance(d, dict) or set(d) - {"job"} != set(fields):
        raise StatementError("statement-malformed", "the statement's fields are not v1's")
    if "job" in d and not (isinstance(d["job"], str) and _JOB_RE.fullmatch(d["job"])):
        raise StatementError("statement-malformed", "the statement's job is not a job id")
    for name, kind in fields.items():
        if not isinstance(d[name], kind) or isinstance(d[name], bool):
            raise StatementError("statement-malformed", f"statement field {name} has a bad type")
    hops = d["hops"]
    if d["v"] != VERSION:
        raise StatementError("statement-malformed", "unknown statement version")
    if not _NONCE_RE.fullmatch(d["nonce"]) or not re.fullmatch(r"[0-9a-f]{64}", d["body_sha256"]):
        raise StatementError("statement-malformed", "bad nonce or body digest")
    if not 1 <= len(hops) <= MAX_HOPS or not all(
        isinstance(h, str) and _SITE_RE.fullmatch(h) for h in hops
    ):
        raise StatementError("statement-malformed", f"hops: 1 to {MAX_HOPS} site names")
    return Statement(**{**d, "hops": tuple(hops)})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
