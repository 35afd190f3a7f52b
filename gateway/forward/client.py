"""The edge's half: send a request to the core with a signed statement, and fail over to
the core when the edge's own nodes cannot serve.

`EdgeFailover` wraps the edge's API app. An inference runs here first, under the edge's
policy; only when it ends in `no-healthy-node` or `upstream-failed` after the edge's own
policy allowed it (the problem names the edge's decision: its forbids and @rate ran) is
the same body sent to the core's forward listener, and
the core's answer, or its refusal, is what the client gets, marked
`ztgate-site-why: forwarded-to-core`. A request that itself came through a forward
listener is never forwarded again.

The core is pinned: only `core_ca` is trusted, and the handshake fails unless the core's
certificate names, as its one URI SAN, the gateway SPIFFE ID the statement is addressed
to, before any byte of the request is sent.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.forward.listener import ASGIApp, Receive, Scope, Send
from gateway.forward.site import FORWARDED, FORWARDED_TO_CORE
from gateway.forward.statement import make, sign
from gateway.protocol.problems import PROBLEM_BASE

log = logging.getLogger(__name__)

_INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
# No local node could serve: none healthy, or every one tried failed.
_FAIL_OVER_ON = {PROBLEM_BASE + "no-healthy-node": 503, PROBLEM_BASE + "upstream-failed": 502}
_PASSED_HEADERS = ("inference-header-content-length",)
# The core's answer headers the client needs to read it: the binary extension's JSON
# length and the receipt summary. Nothing else of the core's reaches the client.
_RETURNED_HEADERS = ("inference-header-content-length", "ztgate-receipt")
SITE_WHY_HEADER = "ztgate-site-why"
SITE_HEADER = "ztgate-site"


class CoreForwarder:
    """One HTTP/2-less httpx client to the core's forward listener, with this site's
    forwarder certificate; every request bounded by `timeout_s`."""

    def __init__(
        self,
        *,
        site: str,
        trust_domain: str,
        core_url: str,
        core_site: str,
        cert: Path,
        key: Path,
        core_ca: Path,
        timeout_s: float,
    ) -> None:
        self.site = site
        self.core_site = core_site
        self.audience = f"spiffe://{trust_domain}/gateway/{core_site}"
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key} is not an EC private key")
        self._key = loaded
        ctx = ssl.create_default_context(cafile=str(core_ca))
        ctx.load_cert_chain(cert, key)
        ctx.sslobject_class = _pinned(self.audience)
        self._http = httpx.AsyncClient(
            base_url=core_url.rstrip("/"),
            verify=ctx,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self.forwarded = 0
        self.failed = 0

    async def forward(
        self,
        *,
        client_cert: str,
        path: str,
        model: str,
        version: str,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
    ) -> httpx.Response:
        st = make(
            site=self.site,
            aud=self.audience,
            client_cert=client_cert,
            body=body,
            model=model,
            version=version,
        )
        headers = {**(extra or {}), **sign(st, self._key), "content-type": content_type}
        return await self._http.post(path, content=body, headers=headers)

    async def aclose(self) -> None:
        await self._http.aclose()


class EdgeFailover:
    """The edge's API app, failing over to the core (module doc)."""

    def __init__(self, api: ASGIApp, forwarder: CoreForwarder, max_body_bytes: int) -> None:
        self.api = api
        self.forwarder = forwarder
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        m = _INFER_PATH.fullmatch(scope.get("path", "")) if scope["type"] == "http" else None
        if m is None or scope.get("method") != "POST" or FORWARDED.get() is not None:
            await self.api(scope, receive, send)
            return
        held: list[MutableMapping[str, Any]] = []
        size, whole = 0, True
        while True:
            msg = await receive()
            held.append(msg)
            size += len(msg.get("body", b""))
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break
            if size > self.max_body_bytes:
                whole = False  # too large to keep for the core: the edge answers alone
                break

        async def replay() -> MutableMapping[str, Any]:
            return held.pop(0) if held else await receive()

        body = b"".join(msg.get("body", b"") for msg in held)
        start: MutableMapping[str, Any] | None = None
        out: list[MutableMapping[str, Any]] = []

        async def capture(msg: MutableMapping[str, Any]) -> None:
            nonlocal start
            held_back = msg.get("status") in _FAIL_OVER_ON.values()
            if msg["type"] == "http.response.start" and held_back and whole:
                start = msg
            elif start is not None:
                out.append(msg)
            else:
                await send(msg)

        await self.api(scope, replay, capture)
        if start is None:
            return
        answer = b"".join(msg.get("body", b"") for msg in out)
        core = None
        if _may_fail_over(answer):
            core = await self._to_core(scope, m, body)
        if core is None:
            await send(start)
            for msg in out:
                await send(msg)
            return
        await send(
            {
                "type": "http.response.start",
                "status": core.status_code,
                "headers": [
                    (b"content-type", core.headers.get("content-type", "").encode("latin-1")),
                    *(
                        (k.encode(), core.headers[k].encode("latin-1"))
                        for k in _RETURNED_HEADERS
                        if k in core.headers
                    ),
                    (SITE_WHY_HEADER.encode(), FORWARDED_TO_CORE.encode()),
                    (SITE_HEADER.encode(), self.forwarder.core_site.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": core.content, "more_body": False})

    async def _to_core(self, scope: Scope, m: re.Match[str], body: bytes) -> httpx.Response | None:
        tls = scope.get("extensions", {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or []
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not chain:
            return None
        try:
            response = await self.forwarder.forward(
                client_cert=chain[0],
                path=scope["path"],
                model=m["model"],
                version=m["version"] or "",
                body=body,
                content_type=headers.get("content-type", "application/json"),
                # The binary tensor extension's JSON length; nothing else the client sent.
                extra={k: v for k, v in headers.items() if k in _PASSED_HEADERS},
            )
        except (httpx.HTTPError, OSError) as exc:
            self.forwarder.failed += 1
            log.warning("forwarding to the core failed: %s", type(exc).__name__)
            return None
        self.forwarder.forwarded += 1
        return response


def _may_fail_over(body: bytes) -> bool:
    """Whether the edge's own refusal leaves the request to the core: no local node could
    answer, and the edge's policy had allowed it. The pipeline names its decision on every
    problem raised after policy, mode and rate allowed the request; a "no node serves"
    raised before policy decided has none, and the edge's forbids and @rate must not be
    skipped by forwarding it."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if not isinstance(doc, dict):
        return False
    return doc.get("type") in _FAIL_OVER_ON and isinstance(doc.get("decision_id"), str)


def _pinned(audience: str) -> type[ssl.SSLObject]:
    """An SSLObject class whose handshake also requires the peer's certificate to name
    `audience` as its one URI SAN (the chain and hostname were checked by then)."""

    class Pinned(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            sans: Any = (self.getpeercert() or {}).get("subjectAltName", ())
            uris = [pair[1] for pair in sans if pair[0] == "URI"]
            if uris != [audience]:
                raise ssl.SSLCertVerificationError(
                    f"the core's certificate does not name {audience}"
                )

    return Pinned
