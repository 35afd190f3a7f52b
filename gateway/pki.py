"""The development PKI: one root, one issuing CA per role, and every key the product uses.

Why one CA per role: a certificate is only worth something in the role its issuer serves.
The gateway's client-auth trust store holds only the client CA, so a stolen node
certificate cannot call the gateway; a site's nodes trust only that site's gateway CA,
so neither a client certificate nor another site's gateway can call them directly and
skip policy and receipts.

Layout of a PKI directory (all keys 0600)::

    pki.json                      trust domain, sites, issued certificates
    root/ca.crt ca.key            offline root: signs the issuing CAs only
    ca/client/ca.crt ca.key       application, officer and auditor certificates
    ca/node/ca.crt ca.key         node server certs (+ client EKU for the MPC mesh)
    ca/gateway-<site>/ca.crt ...  the site's gateway server, gateway-to-node, dealer
    ca/forwarder/ca.crt ca.key    edge sites' forwarders: what a core's [forward] listener
                                  trusts, and nothing else trusts
    gateway/<site>/server.*       TLS server cert of the site's gateway (localhost SANs)
    gateway/<site>/node-client.*  what the gateway presents to that site's nodes
    gateway/<site>/dealer.*       spiffe://<td>/gateway/dealer, the MPC dealer (TTP)
    gateway/<site>/forwarder.*    spiffe://<td>/site/<site>/forwarder: the site calling its
                                  core for a client (gateway/forward/)
    nodes/<name>/node.*           a node's cert: serverAuth + clientAuth, DNS <name>.node.<td>
    clients/<name>/client.*       a caller's cert: spiffe://<td>/client/<name>
    keys/<purpose>.key .pub       Ed25519 signing keys (receipts, log checkpoints, officer
                                  policy bundles, edge gateways), each with its own key id

Nothing here is for production: `dev_` in the metadata marks it, and the gateway in
production mode refuses a PKI directory that carries the marker.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.files import atomic_write
from gateway.keyid import signing_key_id as signing_key_id  # re-exported for `ztgate pki`

Role = Literal["client", "node", "gateway-server", "gateway-node-client", "dealer", "forwarder"]
ROLES: tuple[Role, ...] = (
    "client",
    "node",
    "gateway-server",
    "gateway-node-client",
    "dealer",
    "forwarder",
)
SIGNING_KEYS: tuple[str, ...] = ("receipt-signing", "log-checkpoint", "officer-policy")
DEFAULT_TRUST_DOMAIN = "ztgate.local"
DEFAULT_SITE = "site-a"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TD_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_SECRET_MODE = 0o600


class PKIError(Exception):
    """A PKI operation that cannot be done as asked (bad name, missing CA, ...)."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files."""

    role: Role
    name: str
    spiffe_id: str
    cert: Path
    key: Path
    serial: int
    not_after: dt.datetime


@dataclass
class PKI:
    """A PKI directory opened for issuing."""

    root: Path
    trust_domain: str
    sites: list[str] = field(default_factory=list)

    # --- paths -------------------------------------------------------------------------
    @property
    def root_ca(self) -> Path:
        return self.root / "root" / "ca.crt"

    def ca_dir(self, role: Role, site: str = DEFAULT_SITE) -> Path:
        if role == "client":
            return self.root / "ca" / "client"
        if role == "node":
            return self.root / "ca" / "node"
        if role == "forwarder":
            # Its own CA, not a site's gateway CA: a site's nodes must not accept a
            # forwarder, and the core's forward listener must accept nothing else.
            return self.root / "ca" / "forwarder"
        return self.root / "ca" / f"gateway-{site}"

    def ca_cert(self, role: Role, site: str = DEFAULT_SITE) -> Path:
        return self.ca_dir(role, site) / "ca.crt"

    def client_ca_bundle(self) -> Path:
        """The gateway's client-auth trust store: the client CA and nothing else."""
        return self.ca_cert("client")

    def node_ca_bundle(self) -> Path:
        """What the gateway trusts for node server certificates."""
        return self.ca_cert("node")

    def gateway_ca_bundle(self, site: str = DEFAULT_SITE) -> Path:
        """What a site's nodes trust (`--grpc-root-cert`): that site's gateway CA only."""
        return self.ca_cert("gateway-node-client", site)

    def key_path(self, purpose: str) -> Path:
        return self.root / "keys" / f"{purpose}.key"

    def forwarder_ca_bundle(self) -> Path:
        """What a core's forward listener trusts (`forward.ca`): forwarder certificates only."""
        return self.ca_cert("forwarder")

    def spiffe_id(self, role: Role, name: str) -> str:
        if role == "forwarder":
            return f"spiffe://{self.trust_domain}/site/{name}/forwarder"
        kind = {"client": "client", "node": "node"}.get(role, "gateway")
        return f"spiffe://{self.trust_domain}/{kind}/{name}"

    def node_dns_name(self, name: str) -> str:
        return f"{name}.node.{self.trust_domain}"

    def leaf_paths(self, role: Role, name: str, site: str = DEFAULT_SITE) -> tuple[Path, Path]:
        if role == "client":
            d, stem = self.root / "clients" / name, "client"
        elif role == "node":
            d, stem = self.root / "nodes" / name, "node"
        else:
            stem = {
                "gateway-server": "server",
                "gateway-node-client": "node-client",
                "forwarder": "forwarder",
            }.get(role, "dealer")
            d = self.root / "gateway" / site
            if role == "gateway-server" and name != site:
                stem = f"server-{name}"
        return d / f"{stem}.crt", d / f"{stem}.key"

    # --- open / init -------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path) -> PKI:
        meta = root / "pki.json"
        if not meta.is_file():
            raise PKIError(f"{root} is not a PKI directory (no pki.json); run `ztgate pki init`")
        data = json.loads(meta.read_text())
        return cls(root=root, trust_domain=data["trust_domain"], sites=list(data["sites"]))

    @classmethod
    def init(
        cls,
        root: Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        sites: Iterable[str] = (DEFAULT_SITE,),
        ca_days: int = 3650,
        leaf_days: int = 365,
    ) -> PKI:
        """Create a PKI; an existing one is opened and only missing parts are added."""
        if not _TD_RE.fullmatch(trust_domain):
            raise PKIError(f"invalid trust domain {trust_domain!r}")
        site_list = list(dict.fromkeys(sites))
        for site in site_list:
            _check_name(site)
        if (root / "pki.json").is_file():
            pki = cls.open(root)
            if pki.trust_domain != trust_domain:
                raise PKIError(
                    f"{root} already holds trust domain {pki.trust_domain!r}, not {trust_domain!r}"
                )
            pki.sites = list(dict.fromkeys([*pki.sites, *site_list]))
        else:
            pki = cls(root=root, trust_domain=trust_domain, sites=site_list)
        root.mkdir(parents=True, exist_ok=True)
        if not pki.root_ca.is_file():
            _make_root(pki.root / "root", trust_domain, ca_days)
        pki._ensure_ca("client", DEFAULT_SITE, ca_days)
        pki._ensure_ca("node", DEFAULT_SITE, ca_days)
        pki._ensure_ca("forwarder", DEFAULT_SITE, ca_days)
        for site in pki.sites:
            pki._ensure_ca("gateway-server", site, ca_days)
            for role in ("gateway-server", "gateway-node-client", "dealer"):
                cert, _ = pki.leaf_paths(role, site if role != "dealer" else "dealer", site)
                if not cert.is_file():
                    pki.issue(
                        role, site if role != "dealer" else "dealer", site=site, days=leaf_days
                    )
            cert, _ = pki.leaf_paths("forwarder", site, site)
            if not cert.is_file():
                pki.issue("forwarder", site, site=site, days=leaf_days)
            pki._ensure_signing_key(f"edge-gateway-{site}")
        for purpose in SIGNING_KEYS:
            pki._ensure_signing_key(purpose)
        pki._save()
        return pki

    def _save(self) -> None:
        meta = {"dev_pki": True, "trust_domain": self.trust_domain, "sites": self.sites}
        atomic_write(self.root / "pki.json", json.dumps(meta, indent=2).encode(), 0o644)

    def _ensure_ca(self, role: Role, site: str, days: int) -> None:
        d = self.ca_dir(role, site)
        if (d / "ca.crt").is_file():
            return
        root_cert, root_key = _load_pair(self.root_ca, self.root / "root" / "ca.key")
        label = {"client": "client", "node": "node", "forwarder": "forwarder"}.get(
            role, f"gateway {site}"
        )
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"ztgate dev {label} CA", self.trust_domain)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(root_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
            )
            .sign(root_key, hashes.SHA256())
        )
        _write_pair(d / "ca.crt", d / "ca.key", cert, key)

    def _ensure_signing_key(self, purpose: str) -> None:
        path = self.key_path(purpose)
        if path.is_file():
            return
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(path, pem, _SECRET_MODE)
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        atomic_write(path.with_suffix(".pub"), pub, 0o644)

    # --- issuing -----------------------------------------------------------------------
    def issue(
        self,
        role: Role,
        name: str,
        *,
        site: str = DEFAULT_SITE,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        organization: str | None = None,
        unit: str | None = None,
        extra_dns: Iterable[str] = (),
        out: tuple[Path, Path] | None = None,
    ) -> Issued:
        """Issue one leaf certificate of `role`, signed by that role's CA."""
        if role not in ROLES:
            raise PKIError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        _check_name(name)
        if role == "forwarder" and name != site:
            raise PKIError("a forwarder certificate is named after its site")
        if (
            role in ("gateway-server", "gateway-node-client", "dealer", "forwarder")
            and site not in self.sites
        ):
            raise PKIError(f"unknown site {site!r}; known: {', '.join(self.sites)}")
        ca_dir = self.ca_dir(role, site)
        if not (ca_dir / "ca.crt").is_file():
            raise PKIError(f"no CA for role {role} at {ca_dir}; run `ztgate pki init`")
        ca_cert, ca_key = _load_pair(ca_dir / "ca.crt", ca_dir / "ca.key")
        start = not_before or _now() - dt.timedelta(minutes=5)
        end = not_after or start + dt.timedelta(days=days)
        if end <= start:
            raise PKIError("not_after must be later than not_before")
        spiffe = self.spiffe_id(role, name)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
        ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role == "node":
            sans.append(x509.DNSName(self.node_dns_name(name)))
            ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        elif role == "gateway-server":
            sans += [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
            ekus = [ExtendedKeyUsageOID.SERVER_AUTH]
        elif role == "dealer":
            ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        sans += [x509.DNSName(d) for d in extra_dns]
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if organization:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        if unit:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
            .add_extension(_leaf_usage(), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = out or self.leaf_paths(role, name, site)
        # The cert file is the chain (leaf, then issuing CA), so peers that trust only the
        # root, or only the issuing CA, can both verify it.
        _write_pair(cert_path, key_path, cert, key, chain=(ca_cert,))
        return Issued(role, name, spiffe, cert_path, key_path, serial, end)

    def ensure(self, role: Role, name: str, site: str = DEFAULT_SITE) -> Issued:
        """The existing leaf for (role, name) if still valid for a day, else a new one."""
        cert_path, key_path = self.leaf_paths(role, name, site)
        if cert_path.is_file() and key_path.is_file():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.not_valid_after_utc > _now() + dt.timedelta(days=1):
                return Issued(
                    role,
                    name,
                    self.spiffe_id(role, name),
                    cert_path,
                    key_path,
                    cert.serial_number,
                    cert.not_valid_after_utc,
                )
        return self.issue(role, name, site=site)


def client_crl(pki: PKI, serials: Iterable[int], out: Path, days: int = 7) -> Path:
    """A CRL from the client CA: loaded at start, the gateway refuses these at the handshake.

    The per-request revocation set is what takes effect at once; a CRL also stops a
    revoked client before its TLS session exists, and other TLS terminators can load it.
    """
    return _crl(pki, "client", serials, out, days)


def forwarder_crl(pki: PKI, serials: Iterable[int], out: Path, days: int = 7) -> Path:
    """A CRL from the forwarder CA (`forward.crl` at a core): a captured edge site's
    forwarder certificate is refused at the forward listener's next handshake."""
    return _crl(pki, "forwarder", serials, out, days)


def _crl(pki: PKI, role: Role, serials: Iterable[int], out: Path, days: int) -> Path:
    ca_cert, ca_key = _load_pair(pki.ca_cert(role), pki.ca_dir(role) / "ca.key")
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    atomic_write(out, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PKIError(f"{path} is not an Ed25519 private key")
    return key


# --- recognising it ---------------------------------------------------------------------
DEV_ORGANIZATION = "ztgate dev PKI"  # every certificate this module makes names it


def made_by_dev_pki(pem_file: Path) -> bool:
    """Whether a certificate file comes from a development PKI: a certificate in it names
    the dev PKI's organisation as subject or issuer, or it sits in a PKI directory whose
    pki.json carries the dev marker. Production mode asks this of every configured
    certificate instead of trusting a flag in the config."""
    try:
        certs = x509.load_pem_x509_certificates(pem_file.read_bytes())
    except (OSError, ValueError):
        return False  # unreadable files are reported by whatever loads them
    for cert in certs:
        for name in (cert.subject, cert.issuer):
            for attr in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME):
                if str(attr.value).startswith(DEV_ORGANIZATION):
                    return True
    for parent in pem_file.resolve().parents:
        meta = parent / "pki.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text()).get("dev_pki") is True
            except (OSError, ValueError, AttributeError):
                return False
    return False


# --- helpers -----------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise PKIError(f"invalid name {name!r}: lowercase letters, digits and '-', 1-63 chars")


def _name(cn: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{DEV_ORGANIZATION} ({trust_domain})"),
        ]
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _make_root(d: Path, trust_domain: str, days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("ztgate dev root CA", trust_domain)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write_pair(d / "ca.crt", d / "ca.key", cert, key)


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path} is not an EC private key")
    return cert, key


def _write_pair(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    chain: tuple[x509.Certificate, ...] = (),
) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(key_path, pem, _SECRET_MODE)
    pem_chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    atomic_write(cert_path, pem_chain, 0o644)
