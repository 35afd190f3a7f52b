"""Mutual TLS 1.3 for the MPC mesh, and who is on the other end of a connection.

Identity is the peer certificate's SPIFFE URI SAN, accepted only from the CA that issues
that kind of identity: ``spiffe://<td>/node/<name>`` from the node CA, and
``spiffe://<td>/gateway/<x>`` (the gateway's node client, the dealer) from the site's
gateway CA. A client certificate (client CA) fails the handshake: no listener trusts it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID


class IdentityError(Exception):
    """The peer authenticated, but is not who this session expects."""


@dataclass(frozen=True)
class TrustStore:
    """The CAs one process trusts, by the kind of identity each may issue."""

    node_ca: Path
    gateway_ca: Path | None = None

    def bundle(self) -> str:
        pems = [self.node_ca.read_text()]
        if self.gateway_ca is not None:
            pems.append(self.gateway_ca.read_text())
        return "\n".join(pems)

    def issuer_for(self, spiffe_id: str, trust_domain: str) -> Path:
        if spiffe_id.startswith(f"spiffe://{trust_domain}/node/"):
            return self.node_ca
        if spiffe_id.startswith(f"spiffe://{trust_domain}/gateway/") and self.gateway_ca:
            return self.gateway_ca
        raise IdentityError(f"{spiffe_id} is not an identity this process accepts")


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path
    trust: TrustStore


def _context(purpose: ssl.Purpose, creds: Credentials) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # The issuing CAs themselves are the trust anchors, not the shared root: trusting the
    # root would admit every role's certificates (clients included).
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # Names are checked below against the SPIFFE ID the session expects, not DNS.
    ctx.check_hostname = False
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    ctx.load_verify_locations(cadata=creds.trust.bundle())
    return ctx


def server_context(creds: Credentials) -> ssl.SSLContext:
    return _context(ssl.Purpose.CLIENT_AUTH, creds)


def client_context(creds: Credentials) -> ssl.SSLContext:
    return _context(ssl.Purpose.SERVER_AUTH, creds)


def spiffe_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("peer certificate has no subjectAltName") from exc
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    if len(uris) != 1:
        raise IdentityError(f"peer certificate must carry exactly one SPIFFE ID, has {uris}")
    return uris[0]


def cert_spiffe(path: Path) -> str:
    """The SPIFFE ID of the first certificate in a PEM file."""
    return spiffe_of(x509.load_pem_x509_certificate(path.read_bytes()))


def peer_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
    trust: TrustStore,
    trust_domain: str,
    *,
    as_server: bool,
) -> str:
    """The verified SPIFFE ID of the peer, checked against the CA for its kind and its EKU.

    ``as_server``: we are the TLS server, so the peer must be a TLS client (clientAuth).
    """
    if ssl_object is None:
        raise IdentityError("not a TLS connection")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    spiffe = spiffe_of(cert)
    ca = x509.load_pem_x509_certificate(trust.issuer_for(spiffe, trust_domain).read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise IdentityError(f"{spiffe} is not issued by the CA for its kind") from exc
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError(f"{spiffe} has no extendedKeyUsage") from exc
    need = ExtendedKeyUsageOID.CLIENT_AUTH if as_server else ExtendedKeyUsageOID.SERVER_AUTH
    if need not in eku:
        raise IdentityError(f"{spiffe} lacks the {need._name} extendedKeyUsage")
    return spiffe


def node_spiffe(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/node/{name}"


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)
