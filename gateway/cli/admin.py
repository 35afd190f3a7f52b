"""Calling a running gateway's admin routes with the operator's own certificate (mTLS)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from gateway.cli import UsageError

if TYPE_CHECKING:
    import httpx


def admin_request(
    args: argparse.Namespace, method: str, path: str, **kw: Any
) -> httpx.Response | None:
    """`method path` on `args.gateway` as `args.cert`/`args.key`, trusting `args.ca`; None,
    after one line on stderr, when the gateway cannot be reached. Authorisation is the
    gateway's: Cedar decides on the certificate, as for any caller."""
    import ssl

    import httpx

    if not (args.gateway and args.cert and args.key and args.ca):
        raise UsageError("needs --gateway, --cert, --key and --ca (your identity)")
    try:
        ctx = ssl.create_default_context(cafile=str(args.ca))
        ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load {args.cert} / {args.key} / {args.ca}: {exc}") from None
    try:
        with httpx.Client(verify=ctx, timeout=args.timeout) as client:
            return client.request(method, f"https://{args.gateway}{path}", **kw)
    except httpx.HTTPError as exc:
        print(
            f"ztgate: gateway {args.gateway} unreachable or refused the connection: {exc}",
            file=sys.stderr,
        )
        return None


def body_of(r: httpx.Response) -> dict[str, Any]:
    """The response's JSON object, or its text as `detail`."""
    try:
        doc = r.json()
    except ValueError:
        return {"detail": r.text}
    return doc if isinstance(doc, dict) else {"detail": doc}
