"""A party worker's settings and command line (light: no torch, so `ztgate` loads fast)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mpc.tls import Credentials, TrustStore, parse_address


@dataclass(frozen=True)
class PartyConfig:
    name: str
    trust_domain: str
    creds: Credentials
    gateway_ids: frozenset[str]
    host: str = "127.0.0.1"
    port: int = 0
    record_dir: Path | None = None


def build_parser(
    description: str | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="ztgate mpc party", description=description)
    p.add_argument("--name", required=True, help="this node's name (its node certificate)")
    p.add_argument("--pki", required=True, type=Path, help="PKI directory")
    p.add_argument("--site", default="site-a", help="the gateway site allowed to start sessions")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    p.add_argument("--cert", type=Path, help="node certificate (default: from --pki)")
    p.add_argument("--key", type=Path, help="node key (default: from --pki)")
    p.add_argument("--record", type=Path, help="audit/test aid: record every received frame")
    return p


def config_from_args(args: argparse.Namespace) -> PartyConfig:
    from gateway.pki import PKI

    pki = PKI.open(args.pki)
    cert, key = pki.leaf_paths("node", args.name)
    host, port = parse_address(args.listen)
    return PartyConfig(
        name=args.name,
        trust_domain=pki.trust_domain,
        creds=Credentials(
            args.cert or cert,
            args.key or key,
            TrustStore(pki.node_ca_bundle(), pki.gateway_ca_bundle(args.site)),
        ),
        gateway_ids=frozenset({f"spiffe://{pki.trust_domain}/gateway/{args.site}"}),
        host=host,
        port=port,
        record_dir=args.record,
    )
