"""Who is calling: an `Identity` made only from the verified peer certificate.

The TLS layer has already verified the chain against the client CA (and nothing else).
This stage turns the certificate uvicorn's shim put into `scope["extensions"]["tls"]`
into a frozen `Identity`, and re-checks on every request what a handshake checks only
once: expiry, so a kept-alive connection cannot outlive its certificate.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.protocol.problems import Unauthenticated

_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller, as its certificate says; never from a header."""

    spiffe_id: str
    name: str
    subject: str
    organization: str | None
    unit: str | None
    issuer: str
    serial: str  # lowercase hex, no leading zeros: the revocation key with `issuer`
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str  # SHA-256 of the DER certificate


class IdentityResolver:
    """Parses and checks client certificates, caching the parse (not the checks)."""

    def __init__(
        self,
        trust_domain: str,
        client_ca_subjects: Iterable[x509.Name],
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._prefix = f"spiffe://{trust_domain}/client/"
        self._issuers = {n.rfc4514_string() for n in client_ca_subjects}
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._cache: OrderedDict[str, Identity | str] = OrderedDict()

    def resolve(self, scope: dict[str, Any]) -> Identity:
        """The caller's identity, or `Unauthenticated` with the reason."""
        tls = scope.get("extensions", {}).get("tls")
        chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
        if not chain:
            raise Unauthenticated("no verified client certificate on this connection")
        leaf = chain[0]
        parsed = self._cache.get(leaf)
        if parsed is None:
            parsed = self._parse(leaf)
            self._cache[leaf] = parsed
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(parsed, str):
            raise Unauthenticated(parsed)
        now = self._clock()
        if now >= parsed.not_after:
            raise Unauthenticated(f"client certificate expired at {parsed.not_after.isoformat()}")
        if now < parsed.not_before:
            raise Unauthenticated("client certificate is not yet valid")
        return parsed

    def _parse(self, pem: str) -> Identity | str:
        """An Identity, or the reason (a str) this certificate can never be a caller."""
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            return "unparseable client certificate"
        issuer = cert.issuer.rfc4514_string()
        if issuer not in self._issuers:
            return f"certificate issuer {issuer!r} is not the client CA"
        try:
            ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            return f"client certificate lacks {exc.oid._name}"
        if ExtendedKeyUsageOID.CLIENT_AUTH not in ekus:
            return "certificate is not for client authentication"
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        callers = [u for u in uris if u.startswith(self._prefix)]
        if len(callers) != 1 or len(uris) != 1:
            return f"certificate must carry exactly one {self._prefix}<name> URI SAN"
        name = callers[0][len(self._prefix) :]
        if not name or "/" in name:
            return f"malformed caller SPIFFE ID {callers[0]!r}"
        return Identity(
            spiffe_id=callers[0],
            name=name,
            subject=cert.subject.rfc4514_string(),
            organization=_attr(cert.subject, NameOID.ORGANIZATION_NAME),
            unit=_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
            issuer=issuer,
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        )


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None
