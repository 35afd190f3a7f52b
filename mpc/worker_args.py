"""A party worker's settings and command line (light: no torch, so `ztgate` loads fast).

Its identity and trust anchors come either from a development PKI directory (``--pki``)
or from the operator's own PKI, file by file (``--cert --key --node-ca --gateway-ca``),
as ``ztgate node serve`` takes them. The files are checked here, before anything
listens: a party that starts with a certificate its peers or the gateway will refuse
would fail every session at the first handshake, far from the cause.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mpc.tls import Credentials, TrustStore, parse_address

# Sessions one party runs at once (each is a compute thread, its links and a share of the
# weights). Every gateway replica holds one per (model, party set) while it is in use.
DEFAULT_MAX_SESSIONS = 4
# The longest a session may sit without a request before the party ends it: the backstop
# for a gateway that vanished without closing its connection (the gateway closes its idle
# sessions itself, much sooner: mpc.session.MpcSettings.idle_close_s).
DEFAULT_MAX_IDLE_S = 600.0


class PartyArgsError(ValueError):
    """Arguments or files a person can fix (the command line exits 2 with this)."""


@dataclass(frozen=True)
class PartyConfig:
    name: str
    trust_domain: str
    creds: Credentials
    gateway_ids: frozenset[str]
    host: str = "127.0.0.1"
    port: int = 0
    record_dir: Path | None = None
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_idle_s: float = DEFAULT_MAX_IDLE_S


def build_parser(
    description: str | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="ztgate mpc party", description=description)
    p.add_argument("--name", required=True, help="this node's name (its node certificate)")
    p.add_argument(
        "--pki", type=Path, help="a `ztgate pki` directory (development): the node's cert from it"
    )
    p.add_argument("--site", default="site-a", help="the gateway site allowed to start sessions")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    p.add_argument(
        "--cert",
        type=Path,
        help="node certificate chain (PEM) from your own node CA: URI SAN "
        "spiffe://<td>/node/<name>, serverAuth and clientAuth; not with --pki",
    )
    p.add_argument("--key", type=Path, help="its private key (PEM)")
    p.add_argument(
        "--node-ca",
        type=Path,
        metavar="PEM",
        help="the CA that issues node certificates (issuing CA first): peers are checked on it",
    )
    p.add_argument(
        "--gateway-ca",
        type=Path,
        metavar="PEM",
        help="the site's gateway CA: the only issuer of gateways and dealers this party admits",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help=f"sessions served at once, from all gateways together (default "
        f"{DEFAULT_MAX_SESSIONS}); one more is refused as busy",
    )
    p.add_argument(
        "--max-idle",
        type=float,
        default=DEFAULT_MAX_IDLE_S,
        metavar="SECONDS",
        help=f"end a session after this long without a request (default {DEFAULT_MAX_IDLE_S:g})",
    )
    p.add_argument("--record", type=Path, help="audit/test aid: record every received frame")
    return p


def config_from_args(args: argparse.Namespace) -> PartyConfig:
    """The worker's settings; `PartyArgsError` for anything a person must fix."""
    if args.max_sessions < 1:
        raise PartyArgsError("--max-sessions must be at least 1")
    if not args.max_idle > 0:
        raise PartyArgsError("--max-idle must be a positive number of seconds")
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        raise PartyArgsError(f"--listen: {exc}") from exc
    own = {
        "--cert": args.cert,
        "--key": args.key,
        "--node-ca": args.node_ca,
        "--gateway-ca": args.gateway_ca,
    }
    given = [flag for flag, value in own.items() if value is not None]
    if args.pki is not None:
        if given:
            raise PartyArgsError(f"--pki and {', '.join(given)} exclude each other")
        trust_domain, creds = _from_pki(args.pki, args.name, args.site)
    elif len(given) != len(own):
        missing = ", ".join(flag for flag, value in own.items() if value is None)
        raise PartyArgsError(
            f"give --pki, or --cert, --key, --node-ca and --gateway-ca (missing {missing})"
        )
    else:
        trust_domain = _check_own(args.name, args.cert, args.key, args.node_ca, args.gateway_ca)
        creds = Credentials(
            args.cert.absolute(),
            args.key.absolute(),
            TrustStore(args.node_ca.absolute(), args.gateway_ca.absolute()),
        )
    return PartyConfig(
        name=args.name,
        trust_domain=trust_domain,
        creds=creds,
        gateway_ids=frozenset({f"spiffe://{trust_domain}/gateway/{args.site}"}),
        host=host,
        port=port,
        record_dir=args.record,
        max_sessions=args.max_sessions,
        max_idle_s=args.max_idle,
    )


def _from_pki(root: Path, name: str, site: str) -> tuple[str, Credentials]:
    from gateway.pki import PKI, PKIError

    try:
        pki = PKI.open(root)
        if site not in pki.sites:
            raise PartyArgsError(f"--site {site!r} is not in {root} ({', '.join(pki.sites)})")
        cert, key = pki.leaf_paths("node", name)
        trust = TrustStore(pki.node_ca_bundle(), pki.gateway_ca_bundle(site))
    except PKIError as exc:
        raise PartyArgsError(str(exc)) from exc
    return pki.trust_domain, Credentials(cert, key, trust)


def _check_own(name: str, cert_path: Path, key_path: Path, node_ca: Path, gw_ca: Path) -> str:
    """Check the operator's files the way the party's peers and gateway will, and return
    the trust domain (from the certificate's SPIFFE ID)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from gateway.certfiles import CertFileError, is_ca, load_leaf

    try:
        own = load_leaf(cert_path, key_path)
        node_cas = x509.load_pem_x509_certificates(node_ca.read_bytes())
        gw_cas = x509.load_pem_x509_certificates(gw_ca.read_bytes())
    except CertFileError as exc:
        raise PartyArgsError(str(exc)) from exc
    except (OSError, ValueError, TypeError) as exc:
        raise PartyArgsError(
            f"node certificate, key, node CA or gateway CA unreadable: {exc}"
        ) from exc
    # A party is a TLS server (the gateway and lower ranks dial it) and a TLS client (it
    # dials higher ranks and the dealer): each side checks the EKU for its role.
    for need, role in (
        (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
        (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    ):
        if need not in own.eku:
            raise PartyArgsError(f"--cert {cert_path}: lacks the {role} extendedKeyUsage")
    uris = [
        u
        for u in own.san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    trust_domain, _, path = (
        uris[0].removeprefix("spiffe://").partition("/") if uris else ("", "", "")
    )
    if len(uris) != 1 or not trust_domain or path != f"node/{name}":
        raise PartyArgsError(
            f"--cert {cert_path}: its SPIFFE ID {uris or '(none)'} is not "
            f"spiffe://<trust domain>/node/{name} (--name {name})"
        )
    # Peers check this party's certificate against the first certificate of their own
    # node CA file (mpc.tls.peer_identity), so the same check here.
    if not is_ca(node_cas[0]):
        raise PartyArgsError(f"--node-ca {node_ca}: its first certificate is not a CA")
    try:
        own.cert.verify_directly_issued_by(node_cas[0])
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise PartyArgsError(
            f"--node-ca {node_ca} did not issue --cert {cert_path}: peers would refuse it"
        ) from exc
    if not is_ca(gw_cas[0]):
        raise PartyArgsError(f"--gateway-ca {gw_ca}: its first certificate is not a CA")
    return trust_domain
