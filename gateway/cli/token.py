"""`ztgate token ...`: Ed25519 signing keys in a PKCS#11 token (gateway/signer.py).

    ztgate token keygen receipt-signing --config /etc/ztgate/gateway.toml
    ztgate token import log-checkpoint.key log-checkpoint --module M --token T --pin-file F
    ztgate token list --config /etc/ztgate/gateway.toml --json

Keys made or imported here are non-extractable: the token signs with them and never
gives them out. The token is named by `--config` (its [pkcs11] section) or by
`--module` with `--token` or `--slot`, and the PIN is read from `--pin-file`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.cli import UsageError
from gateway.signer import Token


def add_token_args(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    """The options that name a token; `token_from_args` reads them."""
    g = p.add_argument_group("PKCS#11 token")
    if config:
        g.add_argument(
            "--config", type=Path, default=None, help="take the token from this gateway TOML"
        )
    g.add_argument(
        "--module",
        dest="module",
        type=Path,
        default=None,
        help="the token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so",
    )
    g.add_argument("--token", dest="token_label", default=None, help="the token's label")
    g.add_argument("--slot", type=int, default=None, help="or the slot id holding the token")
    g.add_argument(
        "--pin-file", type=Path, default=None, help="file holding the user PIN (one line)"
    )


def token_from_args(args: argparse.Namespace) -> Token | None:
    """The token the options name, or None if none of them is given."""
    if getattr(args, "config", None) is not None:
        from gateway.config import ConfigError, load_config
        from gateway.runtime import token

        try:
            return token(load_config(args.config))
        except ConfigError as exc:
            raise UsageError(f"{args.config}: {exc}") from exc
    if args.module is None and args.pin_file is None:
        return None
    if args.module is None or args.pin_file is None:
        raise UsageError("a PKCS#11 token needs --module and --pin-file")
    if (args.token_label is None) == (args.slot is None):
        raise UsageError("name the token with --token LABEL or --slot ID, one of them")
    return Token(args.module.resolve(), args.pin_file.resolve(), args.token_label, args.slot)


def register(sub: Any) -> None:
    p = sub.add_parser("token", help="signing keys in a PKCS#11 token (HSM, SoftHSM)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    keygen = verbs.add_parser("keygen", help="make a non-extractable Ed25519 key in the token")
    keygen.add_argument("label", help="the key's label, e.g. receipt-signing")
    keygen.add_argument(
        "--public-out", type=Path, default=None, help="also write the public key (PEM) here"
    )
    keygen.add_argument("--json", action="store_true", help="print JSON")
    add_token_args(keygen)
    keygen.set_defaults(func=_keygen)

    imp = verbs.add_parser("import", help="put an Ed25519 PEM key into the token, non-extractable")
    imp.add_argument("key_file", type=Path, help="the PEM private key (destroy it afterwards)")
    imp.add_argument("label", help="the key's label in the token")
    imp.add_argument("--json", action="store_true", help="print JSON")
    add_token_args(imp)
    imp.set_defaults(func=_import)

    ls = verbs.add_parser("list", help="the token's Ed25519 keys: label, key id, public key")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_token_args(ls)
    ls.set_defaults(func=_list)


def _need(args: argparse.Namespace) -> Token:
    found = token_from_args(args)
    if found is None:
        raise UsageError("name the token: --config FILE, or --module, --token/--slot, --pin-file")
    return found


def _describe(label: str, public: Any, extractable: bool = False) -> dict[str, Any]:
    from gateway.keyid import signing_key_id
    from gateway.receipts.canonical import b64
    from gateway.receipts.signing import raw_public

    return {
        "label": label,
        "key_id": signing_key_id(public),
        "public_key": b64(raw_public(public)),
        "extractable": extractable,
    }


def _print(rows: list[dict[str, Any]], as_json: bool, single: bool = False) -> None:
    if as_json:
        print(json.dumps(rows[0] if single else rows, indent=2))
        return
    for r in rows:
        flag = "  EXTRACTABLE" if r["extractable"] else ""
        print(f"{r['label']}\t{r['key_id']}\t{r['public_key']}{flag}")


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from gateway.signer import SignerError, generate

    try:
        public = generate(_need(args), args.label)
    except SignerError as exc:
        raise UsageError(str(exc)) from exc
    if args.public_out is not None:
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        args.public_out.write_bytes(pem)
    _print([_describe(args.label, public)], args.json, single=True)
    return 0


def _import(args: argparse.Namespace) -> int:
    from gateway.pki import PKIError, load_signing_key
    from gateway.signer import Pkcs11Signer, SignerError, import_key

    try:
        key = load_signing_key(args.key_file)
    except (OSError, ValueError, PKIError) as exc:
        raise UsageError(f"{args.key_file}: {exc}") from exc
    where = _need(args)
    try:
        import_key(where, args.label, key)
        signer = Pkcs11Signer(where, args.label)
    except SignerError as exc:
        raise UsageError(str(exc)) from exc
    _print([_describe(args.label, signer.public_key(), signer.extractable)], args.json, True)
    if not args.json:
        print(
            f"imported; the token will not give it out. Destroy {args.key_file} "
            f"(e.g. shred -u {args.key_file}) and its backups.",
            file=sys.stderr,
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    from gateway.signer import SignerError, list_keys

    try:
        keys = list_keys(_need(args))
    except SignerError as exc:
        raise UsageError(str(exc)) from exc
    _print([_describe(label, pub, ext) for label, pub, ext in keys], args.json)
    return 0
