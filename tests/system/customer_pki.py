"""A customer's own PKI, made with `cryptography` from its own root: not `ztgate pki`.

What an operator brings to production (deploy/README.md, "Certificates"): one issuing CA
per role under their root, SPIFFE URI SANs, node certificates with a unique DNS SAN the
gateway pins. Nothing here names the development PKI's organisation or sits under a
`pki.json` with the dev marker, so production mode's dev-PKI check has nothing to find.

Layout under `root`::

    root.crt                       the customer's root (trust anchor for TLS clients)
    client-ca.crt  node-ca.crt  gateway-ca.crt   issuing CAs (keys beside them, 0600)
    gateway/server.{crt,key}       the gateways' API certificate (localhost, 127.0.0.1)
    gateway/node-client.{crt,key}  spiffe://<td>/gateway/<site>: what the gateway shows nodes
    gateway/dealer.{crt,key}       spiffe://<td>/gateway/dealer: the MPC dealer
    nodes/<name>.{crt,key}         spiffe://<td>/node/<name>, DNS <name>.node.<td>
    clients/<name>.{crt,key}       spiffe://<td>/client/<name>
    redis/server.{crt,key}         the Redis server (127.0.0.1)
    forwarder-ca.crt               edge sites' forwarders only: what a core's [forward] trusts
    forwarders/<name>.{crt,key}    spiffe://<td>/site/<site>/forwarder (one site, many renewals)
    sites/<site>/gateway-ca.crt    another site's gateway CA, with that site's gateway leaves
    keys/<purpose>.key .pub        Ed25519: receipt signing, log checkpoints, the officer
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORG = "Acme Corp"


@dataclass(frozen=True)
class Leaf:
    cert: Path  # leaf, then its issuing CA
    key: Path
    spiffe_id: str


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class CustomerPKI:
    def __init__(self, root: Path, trust_domain: str, site: str) -> None:
        self.root = root
        self.trust_domain = trust_domain
        self.site = site
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
        root.mkdir(parents=True, exist_ok=True)
        self._root_key = ec.generate_private_key(ec.SECP256R1())
        self._root = self._ca_cert(f"{ORG} Root CA", self._root_key, None, None, path_length=1)
        (root / "root.crt").write_bytes(self._root.public_bytes(serialization.Encoding.PEM))
        self._cas: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
        for role, label in (
            ("client", "Client"),
            ("node", "Node"),
            ("gateway", f"Gateway {site}"),
            ("forwarder", "Forwarder"),
        ):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._ca_cert(
                f"{ORG} {label} Issuing CA", key, self._root, self._root_key, path_length=0
            )
            self._cas[role] = (cert, key)
            (root / f"{role}-ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_secret(root / f"{role}-ca.key", _pem_key(key))

    # --- CAs -----------------------------------------------------------------------------
    def _ca_cert(
        self,
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        issuer_key: ec.EllipticCurvePrivateKey | None,
        path_length: int,
    ) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            ]
        )
        signer = issuer_key or key
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer is not None else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now)
            .not_valid_after(self.now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
            .sign(signer, hashes.SHA256())
        )

    @property
    def root_ca(self) -> Path:
        return self.root / "root.crt"

    def ca(self, role: str) -> Path:
        return self.root / f"{role}-ca.crt"

    # --- leaves --------------------------------------------------------------------------
    def _leaf(
        self,
        role: str,
        cn: str,
        out: Path,
        sans: list[x509.GeneralName],
        ekus: list[x509.ObjectIdentifier],
        unit: str | None = None,
    ) -> Path:
        ca_cert, ca_key = self._cas[role]
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        ]
        if unit:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now)
            .not_valid_after(self.now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        out.with_suffix(".crt").write_bytes(pem + ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_secret(out.with_suffix(".key"), _pem_key(key))
        return out

    def _spiffe(self, kind: str, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{kind}/{name}"

    @staticmethod
    def _pair(stem: Path, spiffe_id: str) -> Leaf:
        return Leaf(stem.with_suffix(".crt"), stem.with_suffix(".key"), spiffe_id)

    def client(self, name: str) -> Leaf:
        spiffe = self._spiffe("client", name)
        stem = self.root / "clients" / name
        if not stem.with_suffix(".crt").is_file():
            sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
            self._leaf("client", name, stem, sans, [ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._pair(stem, spiffe)

    def spare_client(self, name: str, tag: str) -> Leaf:
        """One more certificate of client `name` (its SPIFFE ID: the officer's mapping
        applies), of its own serial: revoking it leaves `name`'s own certificate alone."""
        spiffe = self._spiffe("client", name)
        stem = self.root / "clients" / f"{name}-{tag}"
        if not stem.with_suffix(".crt").is_file():
            sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
            self._leaf("client", name, stem, sans, [ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._pair(stem, spiffe)

    def node_dns_name(self, name: str) -> str:
        return f"{name}.node.{self.trust_domain}"

    def node(self, name: str) -> Leaf:
        spiffe = self._spiffe("node", name)
        stem = self.root / "nodes" / name
        if not stem.with_suffix(".crt").is_file():
            sans = [
                x509.UniformResourceIdentifier(spiffe),
                x509.DNSName(self.node_dns_name(name)),
            ]
            ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            self._leaf("node", name, stem, sans, ekus)
        return self._pair(stem, spiffe)

    def site_ca(self, site: str) -> Path:
        """Another site's own gateway issuing CA (an edge's: its nodes trust it alone)."""
        role = f"gateway-{site}"
        path = self.root / "sites" / site / "gateway-ca.crt"
        if role not in self._cas:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._ca_cert(
                f"{ORG} Gateway {site} Issuing CA", key, self._root, self._root_key, path_length=0
            )
            self._cas[role] = (cert, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def _gateway_role(self, site: str | None) -> tuple[str, str, Path]:
        if site is None or site == self.site:
            return "gateway", self.site, self.root / "gateway"
        self.site_ca(site)
        return f"gateway-{site}", site, self.root / "sites" / site

    def gateway_server(self, site: str | None = None) -> Leaf:
        """The API certificate. Its one URI SAN is the site's gateway SPIFFE ID: an edge
        forwarding to this gateway pins exactly that (docs/ddil.md, "The edge pins the
        core"), and the forward listener presents this same certificate."""
        role, site, where = self._gateway_role(site)
        stem = where / "server"
        spiffe = self._spiffe("gateway", site)
        if not stem.with_suffix(".crt").is_file():
            sans = [
                x509.UniformResourceIdentifier(spiffe),
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            self._leaf(role, "gateway", stem, sans, [ExtendedKeyUsageOID.SERVER_AUTH])
        return self._pair(stem, spiffe)

    def gateway_node_client(self, site: str | None = None) -> Leaf:
        role, site, where = self._gateway_role(site)
        stem = where / "node-client"
        spiffe = self._spiffe("gateway", site)
        if not stem.with_suffix(".crt").is_file():
            sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
            self._leaf(role, site, stem, sans, [ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._pair(stem, spiffe)

    def forwarder(self, site: str, name: str | None = None) -> Leaf:
        """A site's forwarder certificate, from the forwarder CA (`name`: one of several
        the site was issued, as when one is renewed or a spare is kept)."""
        spiffe = f"spiffe://{self.trust_domain}/site/{site}/forwarder"
        stem = self.root / "forwarders" / (name or site)
        if not stem.with_suffix(".crt").is_file():
            sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
            self._leaf("forwarder", site, stem, sans, [ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._pair(stem, spiffe)

    def forwarder_crl(self, revoked: list[Leaf], out: Path) -> Path:
        """The forwarder CA's CRL (`forward.crl` at a core), listing `revoked`; replaced
        whole (write, then rename), as an operator publishes a new CRL."""
        ca_cert, ca_key = self._cas["forwarder"]
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=7))
        )
        for leaf in revoked:
            serial = x509.load_pem_x509_certificate(leaf.cert.read_bytes()).serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        tmp = out.with_name(out.name + ".new")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(out)
        return out

    def dealer(self) -> Leaf:
        stem = self.root / "gateway" / "dealer"
        spiffe = self._spiffe("gateway", "dealer")
        if not stem.with_suffix(".crt").is_file():
            sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
            ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            self._leaf("gateway", "dealer", stem, sans, ekus)
        return self._pair(stem, spiffe)

    def redis_server(self) -> Leaf:
        stem = self.root / "redis" / "server"
        if not stem.with_suffix(".crt").is_file():
            sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            self._leaf("gateway", "redis", stem, sans, [ExtendedKeyUsageOID.SERVER_AUTH])
        return self._pair(stem, "-")

    def signing_key(self, purpose: str) -> Path:
        """An Ed25519 key (PKCS#8 PEM, 0600) with its public key beside it (.pub)."""
        path = self.root / "keys" / f"{purpose}.key"
        if not path.is_file():
            key = ed25519.Ed25519PrivateKey.generate()
            _write_secret(path, _pem_key(key))
            pub = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            path.with_suffix(".pub").write_bytes(pub)
        return path
