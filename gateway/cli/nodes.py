"""`ztgate nodes`: the nodes a gateway routes to, with health, reputation, evidence and
quarantine state; `ztgate nodes release NAME` ends a quarantine (docs/reputation.md).

Both are operator actions under policy, through a running gateway's mTLS API with your
own client certificate: `GET /admin/nodes` (Cedar action `admin_nodes`) and
`POST /admin/nodes/NAME/release` (`admin_release_node`); the release is logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.cli.admin import admin_request, body_of


def _identity(p: argparse.ArgumentParser, sub: bool = False) -> None:
    # Accepted before or after the verb; a verb's parser must not reset what was given.
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument("--gateway", help="HOST:PORT of the gateway's mTLS API", **d)
    p.add_argument("--cert", type=Path, help="your client certificate", **d)
    p.add_argument("--key", type=Path, help="its key", **d)
    p.add_argument("--ca", type=Path, help="CA that signed the gateway's certificate", **d)
    p.add_argument("--timeout", type=float, **({"default": 10.0} if not sub else d))


def register(sub: Any) -> None:
    nodes = sub.add_parser("nodes", help="nodes: health, reputation, evidence, quarantine")
    _identity(nodes)
    nodes.add_argument("--json", action="store_true", help="the listing as JSON")
    nodes.set_defaults(func=_list)
    verbs = nodes.add_subparsers(dest="verb")
    release = verbs.add_parser(
        "release", help="release a quarantined node (NAME) or provider (provider:NAME)"
    )
    release.add_argument("name")
    _identity(release, sub=True)
    release.set_defaults(func=_release)


def _call(args: argparse.Namespace, method: str, path: str) -> tuple[int, Any]:
    r = admin_request(args, method, path)
    if r is None:
        return 1, None
    doc = body_of(r)
    if r.status_code != 200:
        print(f"ztgate: refused ({r.status_code}): {doc.get('detail', doc)}", file=sys.stderr)
        return 1, None
    return 0, doc


def render(rows: list[dict[str, Any]]) -> str:
    head = ("node", "provider", "health", "reputation", "checked", "confirmed", "contra", "cusum")
    lines = [head]
    for n in rows:
        ev = n.get("evidence") or {}
        health = "ejected" if n["health"]["ejected"] else "ok"
        lines.append(
            (
                n["name"],
                n["provider"],
                health,
                str(n.get("reputation", "-")),
                str(ev.get("checked", "-")),
                str(ev.get("confirmed", "-")),
                str(ev.get("contradicted", "-")),
                str(ev.get("statistic", "-")),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    ]
    for n in rows:
        q = n.get("quarantine")
        if q and q.get("state") == "quarantined":
            out.append(f"{n['name']}: quarantined {q['reason']}")
    return "\n".join(out)


def _list(args: argparse.Namespace) -> int:
    rc, doc = _call(args, "GET", "/admin/nodes")
    if rc:
        return rc
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc["nodes"]))
    return 0


def _release(args: argparse.Namespace) -> int:
    rc, doc = _call(args, "POST", f"/admin/nodes/{args.name}/release")
    if rc:
        return rc
    print(f"released {doc['released']}")
    if doc.get("still_quarantined_by_provider"):
        print("its provider is still quarantined: release provider:NAME too", file=sys.stderr)
    return 0
