"""`ztgate witness ...`: a C2SP tlog-witness with its own key, in its own process."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from gateway.cli import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("witness", help="run a transparency-log witness (C2SP tlog-witness)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser("init", help="create a witness directory with a fresh key")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--name", required=True, help="witness name, e.g. witness.example/w1")
    init.add_argument(
        "--trust-log",
        action="append",
        default=[],
        metavar="ORIGIN_PREFIX=PUBKEY",
        help="a log key to accept (PUBKEY: PEM file or base64 raw key); repeatable",
    )
    init.set_defaults(func=_init)

    vkey = verbs.add_parser("vkey", help="print the witness's verifier key (for trust files)")
    vkey.add_argument("--dir", type=Path, required=True)
    vkey.set_defaults(func=_vkey)

    serve = verbs.add_parser("serve", help="serve POST /add-checkpoint")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8090)
    serve.set_defaults(func=_serve)


def _read_pub(spec: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.receipts.canonical import b64, unb64
    from gateway.receipts.signing import raw_public

    path = Path(spec)
    if path.is_file():
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise UsageError(f"{spec} is not an Ed25519 public key")
        return b64(raw_public(key))
    try:
        unb64(spec, 32)
    except ValueError as exc:
        raise UsageError(f"log key {spec!r}: not a PEM file nor base64 raw key") from exc
    return spec


def _init(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.receipts.note import Cosigner, NoteError

    d: Path = args.dir
    key_path = d / "witness.key"
    if key_path.exists():
        raise UsageError(f"{key_path} exists; refusing to replace a witness key")
    trusted = []
    for spec in args.trust_log:
        prefix, sep, pub = spec.partition("=")
        if not sep or not prefix:
            raise UsageError(f"--trust-log {spec!r}: expected ORIGIN_PREFIX=PUBKEY")
        trusted.append({"origin_prefix": prefix, "public_key": _read_pub(pub)})
    key = ed25519.Ed25519PrivateKey.generate()
    try:
        cosigner = Cosigner(args.name, key)
    except NoteError as exc:
        raise UsageError(str(exc)) from exc
    d.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(pem)
    (d / "witness.json").write_text(
        json.dumps({"name": args.name, "trusted_logs": trusted}, indent=2) + "\n"
    )
    print(cosigner.key.vkey())
    return 0


def load_witness(d: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.pki import PKIError, load_signing_key
    from gateway.receipts.canonical import unb64
    from gateway.receipts.witness import TrustedLog, Witness

    try:
        cfg = json.loads((d / "witness.json").read_text())
        key = load_signing_key(d / "witness.key")
        trusted = [
            TrustedLog(
                str(t["origin_prefix"]),
                ed25519.Ed25519PublicKey.from_public_bytes(unb64(str(t["public_key"]), 32)),
            )
            for t in cfg.get("trusted_logs", [])
        ]
        return Witness(str(cfg["name"]), key, trusted, d / "state.json")
    except (OSError, ValueError, KeyError, PKIError) as exc:
        raise UsageError(f"{d}: not a usable witness directory: {exc}") from exc


def _vkey(args: argparse.Namespace) -> int:
    print(load_witness(args.dir).key.vkey())
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.receipts.witness import witness_app

    witness = load_witness(args.dir)
    if not witness.trusted:
        raise UsageError("the witness trusts no log key; add --trust-log at init")
    uvicorn.run(witness_app(witness), host=args.host, port=args.port, log_level="warning")
    return 0
