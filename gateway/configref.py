"""The configuration reference in docs/config.md, generated from the config's dataclasses.

    python -m gateway.configref            # print the table
    python -m gateway.configref --write    # replace it in docs/config.md

Each row is a key as written in gateway.toml, its type, its default (or "required") and
what production mode demands of it. tests/test_deploy.py fails when the doc and the code
disagree.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from gateway import config as c

BEGIN = "<!-- BEGIN GENERATED: python -m gateway.configref --write -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"

# What `Config.dev_only_items` and the zk check refuse in production, per key.
PRODUCTION: dict[str, str] = {
    "mode": '"production" refuses every item in this column',
    "tls.dev_pki": "must be false; no certificate may come from the development PKI",
    "tls.cert": "not issued by the development PKI",
    "tls.client_ca": "not the development PKI's",
    "tls.node_ca": "not the development PKI's",
    "tls.node_client_cert": "not issued by the development PKI",
    "state.redis_url": "required: rediss:// with an ACL user, TLS checks not turned off",
    "policy.dir": "refused: use a signed policy.bundle",
    "forward.crl": "required with forward.port (a forwarder must be revocable)",
    "policy.bundle": "required (an officer-signed bundle)",
    "policy.officer_keys": "at least one with policy.bundle",
    "receipts.signing_key": "required",
    "receipts.log_key": "required (a different key)",
    "receipts.signer": '"pkcs11" when pkcs11.required',
    "pkcs11.required": 'true: file keys are refused (receipts.signer = "pkcs11")',
    "zk.srs_sha256": "every zk model's SRS must be pinned here; a dev SRS is refused",
}

SECTIONS: list[tuple[str, type[Any]]] = [
    ("", c.Config),
    ("listen", c.Listen),
    ("tls", c.TLS),
    ("limits", c.Limits),
    ("routing", c.Routing),
    ("generate", c.Generate),
    ("reputation", c.ReputationConfig),
    ("state", c.State),
    ("uplink", c.Uplink),
    ("forward", c.Forward),
    ("jobs", c.Jobs),
    ("policy", c.PolicyConfig),
    ("policy.models.<name>", c.ModelPolicy),
    ("receipts", c.Receipts),
    ("receipts.retention", c.Retention),
    ("logging", c.Logging),
    ("zk", c.Zk),
    ("mpc", c.Mpc),
    ("pkcs11", c.Pkcs11),
    ("nodes[]", c.NodeConfig),
]
# Fields that are tables of their own (listed as sections) or filled by the loader.
NESTED = {
    "listen",
    "tls",
    "limits",
    "routing",
    "generate",
    "reputation",
    "state",
    "uplink",
    "forward",
    "jobs",
    "policy",
    "receipts",
    "zk",
    "mpc",
    "logging",
    "pkcs11",
    "nodes",
    "retention",
    "models",
}


def _type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + (
            " (optional)" if len(inner) < len(args) else ""
        )
    if origin is typing.Literal:
        return " or ".join(repr(a).replace("'", '"') for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type(args[0])}"
        return "[" + ", ".join(_type(a) for a in args) + "]"
    if hint is Path:
        return "path"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    return f"`{value!r}`"


def rows() -> list[tuple[str, str, str, str]]:
    out = []
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls, vars(c))
        for f in dataclasses.fields(cls):
            if f.name in NESTED and section in ("", "receipts", "policy"):
                continue
            key = f"{section}.{f.name}" if section else f.name
            out.append((key, _type(hints[f.name]), _default(f), PRODUCTION.get(key, "")))
    return out


def table() -> str:
    lines = [
        BEGIN,
        "",
        "| key | type | default | production |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{k}` | {t} | {d} | {p} |" for k, t, d, p in rows()]
    return "\n".join([*lines, "", END])


def replace_in(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + table() + text[end:]


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        DOC.write_text(replace_in(DOC.read_text()))
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
