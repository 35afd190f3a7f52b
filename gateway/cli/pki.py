"""`ztgate pki`: the development PKI (init, issue)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization

from gateway.cli import UsageError, emit, json_option, path_option
from gateway.pki import DEFAULT_SITE, DEFAULT_TRUST_DOMAIN, PKI, ROLES, PKIError, Role

DEFAULT_DIR = Path(".ztgate/pki")


def register(sub: Any) -> None:
    p = sub.add_parser("pki", help="development PKI: CAs, certificates, signing keys")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser("init", help="create the root, the per-role CAs and all keys")
    path_option(
        init,
        "--pki",
        dest="dir",
        type=Path,
        default=DEFAULT_DIR,
        metavar="DIR",
        help="the PKI directory to create",
    )
    # The old positional DIR, still accepted.
    init.add_argument("old_dir", nargs="?", default=None, help=argparse.SUPPRESS)
    json_option(init)
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    init.add_argument("--site", action="append", dest="sites", help="gateway site (repeat)")
    init.set_defaults(func=_init)

    issue = verbs.add_parser("issue", help="issue one more certificate")
    issue.add_argument("role", choices=ROLES)
    issue.add_argument("name")
    _pki_dir(issue)
    issue.add_argument("--site", default=DEFAULT_SITE)
    issue.add_argument("--days", type=float, default=365.0, help="lifetime in days")
    issue.add_argument("--not-before", help="ISO 8601 start (default: now - 5 min)")
    issue.add_argument("--org", help="subject O (organisation)")
    issue.add_argument("--unit", help="subject OU (unit)")
    issue.add_argument("--out", type=Path, help="write CERT and KEY as OUT.crt / OUT.key")
    issue.set_defaults(func=_issue)

    revoke = verbs.add_parser(
        "revoke",
        help="revoke a client certificate: through a running gateway (audited, reaches "
        "every replica) or, with --data-dir, offline in a stopped replica's store",
    )
    revoke.add_argument("certificate", type=Path, help="PEM certificate to revoke")
    where = revoke.add_mutually_exclusive_group(required=True)
    where.add_argument("--gateway", help="HOST:PORT of the gateway's mTLS API")
    where.add_argument("--data-dir", type=Path, help="a stopped replica's data_dir")
    revoke.add_argument("--cert", type=Path, help="your (officer's) client certificate")
    revoke.add_argument("--key", type=Path, help="its key")
    revoke.add_argument("--ca", type=Path, help="CA that signed the gateway's certificate")
    revoke.add_argument("--timeout", type=float, default=10.0)
    json_option(revoke)
    revoke.set_defaults(func=_revoke)

    crl = verbs.add_parser(
        "crl", help="write a client-CA CRL (for tls.crl) from certificates and/or a data_dir"
    )
    crl.add_argument("certificates", type=Path, nargs="*", help="PEM certificates to list")
    _pki_dir(crl)
    crl.add_argument("--data-dir", type=Path, help="also list what this replica has revoked")
    crl.add_argument("--days", type=int, default=7, help="next update in days")
    crl.add_argument("--out", type=Path, required=True)
    json_option(crl)
    crl.set_defaults(func=_crl)


def _pki_dir(p: Any) -> None:
    path_option(
        p, "--pki", "--dir", dest="dir", type=Path, default=DEFAULT_DIR, metavar="DIR",
        help="the dev PKI directory",
    )  # fmt: skip


def _init(args: argparse.Namespace) -> int:
    try:
        where = Path(args.old_dir) if args.old_dir else args.dir
        pki = PKI.init(where, args.trust_domain, args.sites or [DEFAULT_SITE])
    except PKIError as exc:
        raise UsageError(str(exc)) from exc
    data = {"pki": str(pki.root), "trust_domain": pki.trust_domain, "sites": list(pki.sites)}
    emit(
        args, data, f"dev PKI for {pki.trust_domain} in {pki.root} (sites: {', '.join(pki.sites)})"
    )
    print("WARNING: development only; production mode refuses this PKI.", file=sys.stderr)
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        start = dt.datetime.fromisoformat(args.not_before) if args.not_before else None
    except ValueError as exc:
        raise UsageError(f"--not-before: {exc}") from exc
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    if not 0 < args.days <= 3650:
        raise UsageError("--days must be in (0, 3650]")
    out = (args.out.with_suffix(".crt"), args.out.with_suffix(".key")) if args.out else None
    try:
        pki = PKI.open(args.dir)
        begin = start or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        issued = pki.issue(
            cast(Role, args.role),
            args.name,
            site=args.site,
            not_before=begin,
            not_after=begin + dt.timedelta(days=args.days),
            organization=args.org,
            unit=args.unit,
            out=out,
        )
    except PKIError as exc:
        raise UsageError(str(exc)) from exc
    print(
        json.dumps(
            {
                "role": issued.role,
                "spiffe_id": issued.spiffe_id,
                "cert": str(issued.cert),
                "key": str(issued.key),
                "serial": format(issued.serial, "x"),
                "not_after": issued.not_after.isoformat(),
            },
            indent=2,
        )
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(args.certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.certificate}: not a PEM certificate ({exc})") from exc
    issuer, serial = cert.issuer.rfc4514_string(), format(cert.serial_number, "x")
    if args.data_dir is not None:
        from gateway.state.durable import FileRevocations, RevocationFileError

        try:
            revocations = FileRevocations(args.data_dir / "revoked.jsonl")
        except (OSError, RevocationFileError) as exc:
            msg = f"cannot open {args.data_dir} (is the gateway running?): {exc}"
            raise UsageError(msg) from exc
        try:
            revocations.add(issuer, serial)
        finally:
            revocations.close()
        done = {"serial": serial, "issuer": issuer, "data_dir": str(args.data_dir)}
        emit(args, done, f"revoked serial {serial} of {issuer} in {args.data_dir} (offline)")
        return 0
    if not (args.cert and args.key and args.ca):
        raise UsageError("--gateway needs --cert, --key and --ca (an officer's identity)")
    from gateway.cli.admin import admin_request, body_of

    body = {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode()}
    r = admin_request(args, "POST", "/admin/revoke", json=body)
    if r is None:
        return 1
    if r.status_code != 200:
        detail = body_of(r).get("detail", r.text)
        print(f"ztgate: revocation refused ({r.status_code}): {detail}", file=sys.stderr)
        return 1
    done = {"serial": serial, "issuer": issuer, "gateway": args.gateway}
    emit(args, done, f"revoked serial {serial} of {issuer} via {args.gateway}")
    return 0


def _crl(args: argparse.Namespace) -> int:
    from cryptography import x509

    from gateway.pki import client_crl

    try:
        pki = PKI.open(args.dir)
        issuer = x509.load_pem_x509_certificate(pki.ca_cert("client").read_bytes()).subject
    except (PKIError, OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    serials: list[int] = []
    for path in args.certificates:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a PEM certificate ({exc})") from exc
        if cert.issuer != issuer:
            raise UsageError(f"{path} was not issued by the client CA")
        serials.append(cert.serial_number)
    if args.data_dir is not None:
        path = args.data_dir / "revoked.jsonl"
        try:
            lines = path.read_text().splitlines() if path.exists() else []
        except OSError as exc:
            raise UsageError(f"{path}: {exc}") from exc
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line: the revocation file's own loader drops it too
            if isinstance(entry, dict) and entry.get("issuer") == issuer.rfc4514_string():
                try:
                    serials.append(int(str(entry.get("serial")), 16))
                except ValueError:
                    continue
    if not 1 <= args.days <= 366:
        raise UsageError("--days must be between 1 and 366")
    out = client_crl(pki, serials, args.out, args.days)
    text = f"CRL with {len(set(serials))} revoked certificate(s) written to {out}"
    emit(args, {"crl": str(out), "revoked": len(set(serials))}, text)
    return 0
