"""`ztgate witness ...`: a C2SP tlog-witness with its own key, in its own process."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from gateway.cli import UsageError, emit, json_option, path_option
from gateway.cli.token import add_token_args, token_from_args


def register(sub: Any) -> None:
    p = sub.add_parser("witness", help="run a transparency-log witness (C2SP tlog-witness)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser("init", help="create a witness directory with a fresh key")
    _dir(init)
    init.add_argument("--name", required=True, help="witness name, e.g. witness.example/w1")
    init.add_argument(
        "--trust-log",
        action="append",
        default=[],
        metavar="ORIGIN_PREFIX=PUBKEY",
        help="a log key to accept (PUBKEY: PEM file or base64 raw key); repeatable",
    )
    init.add_argument(
        "--key-label",
        default=None,
        help="keep the witness key in the PKCS#11 token under this label (made there, "
        "non-extractable, unless it exists) instead of witness.key",
    )
    add_token_args(init, config=False)
    json_option(init)
    init.set_defaults(func=_init)

    vkey = verbs.add_parser("vkey", help="print the witness's verifier key (for trust files)")
    _dir(vkey)
    json_option(vkey)
    vkey.set_defaults(func=_vkey)

    serve = verbs.add_parser("serve", help="serve POST /add-checkpoint")
    _dir(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8090)
    serve.add_argument(
        "--vault",
        action="store_true",
        help="the core's witness for edge sites: keep every leaf and body they upload "
        "(DIR/vault.db) and cosign only checkpoints whose leaves it holds",
    )
    path_option(
        serve,
        "--publish",
        type=Path,
        default=None,
        metavar="PUBLISH_DIR",
        help="serve this directory to edge sites under /publish: *.crl (the client CA's "
        "CRL), *bundle.json (the signed policy bundle), models/* (docs/ddil.md)",
    )
    serve.set_defaults(func=_serve)

    export = verbs.add_parser(
        "export",
        help="an audit bundle of the edge logs this core's vault holds (what an auditor "
        "verifies when an edge is gone)",
    )
    _dir(export)
    export.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="one edge log (repeatable; default: every log in the vault)",
    )
    path_option(export, "--out", type=Path, required=True, metavar="OUT",
                help="bundle directory, or a .tar file")  # fmt: skip
    json_option(export)
    export.set_defaults(func=_export)

    erase = verbs.add_parser(
        "erase",
        help="delete the zk evidence the vault holds for an edge's receipts (an erasure "
        "request: their proofs carry the client's inputs and outputs)",
    )
    _dir(erase)
    erase.add_argument("--origin", required=True, metavar="ORIGIN", help="the edge log")
    erase.add_argument(
        "--index",
        type=int,
        nargs="+",
        required=True,
        metavar="N",
        help="the receipts' leaf indexes in that log (a receipt's `index`)",
    )
    json_option(erase)
    erase.set_defaults(func=_erase)

    revoke = verbs.add_parser(
        "revoke-log",
        help="refuse every checkpoint a log key signs from now on (a captured edge site)",
    )
    _dir(revoke)
    revoke.add_argument("origin_prefix", metavar="ORIGIN_PREFIX", help="as given to --trust-log")
    json_option(revoke)
    revoke.set_defaults(func=_revoke)


def _dir(p: Any) -> None:
    path_option(
        p,
        "--witness-dir",
        "--dir",
        dest="dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the witness's directory (witness.json, its key or token, state)",
    )


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

    d: Path = args.dir
    key_path = d / "witness.key"
    if key_path.exists() or (d / "witness.json").exists():
        raise UsageError(f"{d} holds a witness already; refusing to replace a witness key")
    trusted = []
    for spec in args.trust_log:
        prefix, sep, pub = spec.partition("=")
        if not sep or not prefix:
            raise UsageError(f"--trust-log {spec!r}: expected ORIGIN_PREFIX=PUBKEY")
        trusted.append({"origin_prefix": prefix, "public_key": _read_pub(pub)})
    doc: dict[str, Any] = {"name": args.name, "trusted_logs": trusted}
    token = token_from_args(args)
    if (token is None) != (args.key_label is None):
        raise UsageError("a witness key in a token needs --key-label and the token options")
    if token is not None:
        doc["pkcs11"] = _token_signer(token, args.key_label)
        cosigner = _cosigner(args.name, _token_key(doc["pkcs11"], create=True))
        d.mkdir(parents=True, exist_ok=True)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        cosigner = _cosigner(args.name, key)
        d.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(pem)
    (d / "witness.json").write_text(json.dumps(doc, indent=2) + "\n")
    emit(args, {"vkey": cosigner.key.vkey(), "witness_dir": str(d)}, cosigner.key.vkey())
    return 0


def _cosigner(name: str, key: Any) -> Any:
    from gateway.receipts.note import Cosigner, NoteError

    try:
        return Cosigner(name, key)
    except NoteError as exc:
        raise UsageError(str(exc)) from exc


def _token_signer(token: Any, label: str) -> dict[str, Any]:
    """witness.json's record of where its key is (the PIN stays in its file)."""
    return {
        "module": str(token.module),
        "token": token.label,
        "slot": token.slot,
        "pin_file": str(token.pin_file),
        "label": label,
    }


def _token_key(spec: Any, create: bool = False) -> Any:
    from gateway.signer import Pkcs11Signer, SignerError, Token, generate

    try:
        token = Token(
            Path(spec["module"]), Path(spec["pin_file"]), spec.get("token"), spec.get("slot")
        )
        label = str(spec["label"])
        try:
            return Pkcs11Signer(token, label)
        except SignerError:
            if not create:
                raise
        generate(token, label)
        return Pkcs11Signer(token, label)
    except (SignerError, KeyError, TypeError) as exc:
        raise UsageError(f"witness key in the token: {exc}") from exc


def load_witness(d: Path, with_vault: bool = False) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.pki import PKIError, load_signing_key
    from gateway.receipts.canonical import unb64
    from gateway.receipts.vault import MAX_OWNER_MATERIAL, Vault
    from gateway.receipts.witness import TrustedLog, Witness

    try:
        cfg = json.loads((d / "witness.json").read_text())
        spec = cfg.get("pkcs11")
        key = _token_key(spec) if spec is not None else load_signing_key(d / "witness.key")
        trusted = [
            TrustedLog(
                str(t["origin_prefix"]),
                ed25519.Ed25519PublicKey.from_public_bytes(unb64(str(t["public_key"]), 32)),
                revoked=bool(t.get("revoked_at")),
            )
            for t in cfg.get("trusted_logs", [])
        ]
        # Bytes of evidence files each trusted log key may keep in the vault.
        quota = int(cfg.get("vault_quota_bytes", MAX_OWNER_MATERIAL))
        vault = Vault(d / "vault.db", quota) if with_vault else None
        return Witness(str(cfg["name"]), key, trusted, d / "state.json", vault=vault)
    except (OSError, ValueError, KeyError, PKIError) as exc:
        raise UsageError(f"{d}: not a usable witness directory: {exc}") from exc


def _vkey(args: argparse.Namespace) -> int:
    vkey = load_witness(args.dir).key.vkey()
    emit(args, {"vkey": vkey}, vkey)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.receipts.witness import witness_app

    witness = load_witness(args.dir, with_vault=args.vault)
    if not witness.trusted:
        raise UsageError("the witness trusts no log key; add --trust-log at init")
    app = witness_app(witness, publish=args.publish)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    """Marks the key revoked in witness.json, with the sizes this witness had cosigned for
    each of its logs: receipts at or above those indices were never cosigned here, and
    `ztgate verify` with the trust file's revocation flags them."""
    import time

    from gateway.files import atomic_write

    path = args.dir / "witness.json"
    cfg = json.loads(path.read_text())
    state_file = args.dir / "state.json"
    logs = json.loads(state_file.read_text()).get("logs", {}) if state_file.is_file() else {}
    hits = [t for t in cfg.get("trusted_logs", []) if t["origin_prefix"] == args.origin_prefix]
    if not hits:
        raise UsageError(f"the witness trusts no log key for {args.origin_prefix!r}")
    sizes = {o: int(s["size"]) for o, s in logs.items() if o.startswith(args.origin_prefix)}
    for t in hits:
        t.setdefault("revoked_at", int(time.time()))
        t["cosigned_at_revocation"] = {**sizes, **t.get("cosigned_at_revocation", {})}
    atomic_write(path, (json.dumps(cfg, indent=2) + "\n").encode(), mode=None)
    out = {"origin_prefix": args.origin_prefix, "cosigned_at_revocation": sizes}
    emit(
        args,
        out,
        f"revoked {args.origin_prefix}; cosigned sizes: {sizes or 'none'}; restart the "
        "witness (ztgate witness serve) for it to take effect",
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from gateway.receipts.note import NoteKey
    from gateway.receipts.vault import Vault, VaultError, export_vault

    witness = load_witness(args.dir)
    path = args.dir / "vault.db"
    if not path.is_file():
        raise UsageError(f"{args.dir} keeps no vault (serve it with --vault)")
    vault = Vault(path)
    try:
        origins = args.origin or vault.origins()
        vkeys = {}
        for origin in origins:
            keys = [k for t in witness.trusted if (k := t.key_for(origin)) is not None]
            if not keys:
                raise UsageError(f"the witness trusts no log key for {origin}")
            vkeys[origin] = NoteKey(origin, keys[0].public_key).vkey()
        try:
            n = export_vault(vault, vkeys, {witness.key.name: witness.key.vkey()}, args.out)
        except VaultError as exc:
            raise UsageError(str(exc)) from exc
    finally:
        vault.close()
    out = {"out": str(args.out), "logs": len(vkeys), "receipts": n}
    emit(args, out, f"{n} receipts of {len(vkeys)} edge log(s) in {args.out}")
    return 0


def _erase(args: argparse.Namespace) -> int:
    """Works beside a running `serve`: SQLite orders this write with the server's."""
    from gateway.receipts.vault import Vault

    if any(i < 0 for i in args.index):
        raise UsageError("--index: leaf indexes are 0 or more")
    path = args.dir / "vault.db"
    if not path.is_file():
        raise UsageError(f"{args.dir} keeps no vault (serve it with --vault)")
    vault = Vault(path)
    try:
        n = vault.erase(args.origin, args.index)
    finally:
        vault.close()
    out = {"origin": args.origin, "indexes": sorted(set(args.index)), "references": n}
    emit(args, out, f"erased the evidence of {len(out['indexes'])} receipt(s) of {args.origin}")
    return 0
