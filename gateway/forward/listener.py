"""The core's forward listener: a request an edge sends for a client, checked, then served
by the ordinary pipeline as that client.

Nothing the edge says is taken on trust: the site is the forwarder certificate's (verified
by TLS against the forwarder CA, which is all this listener trusts, and not revoked in
`forward.crl` as it was at most a second ago: checked per request too, since a kept-alive
connection outlives its handshake: `crl.py`); the statement must be signed by that same
certificate, name this core as audience, be fresh, name no hop but the sender; the client's
certificate must be issued by this core's client CA; policy must decide `forward_for` (this
site may act for this client on this model). All of that reads headers only (the model: the
path's, or on OpenAI's routes the statement's, which the body must then name: `paths.py`).
Only then does the site take one of its tokens and concurrency slots (`SiteLimits`; a
generation, one of at most half of them), and only inside that slot is the body read,
hashed against the statement and the nonce spent. Then the request (an inference or a
generation) enters the API app exactly as if the client had called, so the core's own
revocations, `infer` policy, limits and receipts apply. Every refusal is a problem+json
whose `reason` is a stable slug, counted in `refusals`.

A statement naming the edge's job (`job`) is run as a job of this core's: under the id
`fwd/<site>/<client digest>/<job id>` (the site the certificate's, the client the verified
one: no site names another's jobs, nor a client's job for another client) and the seed
HMAC(this core's jobs key, that id), as the jobs runner's own runs are (gateway/jobs/
scope.py). So every run of one job commits to the same outputs under the same salt, and
the receipt log answers a rerun with the same result under the receipt it already logged,
a different one with a receipt that supersedes it (gateway/receipts/service.py): a link
that broke after the core answered, or an edge that crashed before recording it, costs a
second computation, not a second receipt. The nonce stays the statement's own, random:
each run is a new request, and its replay is still refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.forward.crl import ForwarderCRL
from gateway.forward.limits import SiteLimits
from gateway.forward.paths import Target, body_doc, model_of, target
from gateway.forward.site import FORWARDED, Forwarded
from gateway.forward.statement import Statement, StatementError, verified
from gateway.jobs.scope import JOB_EXTENSION, JobScope, forwarded_job, job_seed
from gateway.pipeline import state_unavailable
from gateway.policy.facts import IdentityFacts
from gateway.protocol.problems import (
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Problem,
    Replayed,
    Unauthenticated,
    problem_response,
)
from gateway.state import StoreUnavailable

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY_HEADERS = frozenset(
    (b"host", b"content-type", b"content-length", b"inference-header-content-length")
)


def _refused(reason: str, detail: str) -> Problem:
    """403 forbidden; `reason` (in the problem's body) says which check failed."""
    return Forbidden(detail, extra={"reason": reason})


class ForwardListener:
    """The ASGI app of `[forward] port`. `api` is the gateway's API app (its lifespan is
    run by the API listener), attached once built."""

    def __init__(
        self,
        api: ASGIApp | None,
        *,
        trust_domain: str,
        site: str,
        client_ca: Path,
        max_skew_s: float,
        nonce_ttl_s: float,
        max_body_bytes: int,
        check_nonce: Callable[[str, float], Awaitable[bool]],
        may_forward: Callable[[IdentityFacts, str, str], bool],
        resolve: Callable[[dict[str, Any]], Any],
        limits: SiteLimits,
        clock: Callable[[], float] = time.time,
        crl: Path | None = None,
        forwarder_ca: Path | None = None,
        jobs_key: Callable[[], bytes] = lambda: b"",
    ) -> None:
        self.api = api
        self.site = site
        self.audience = f"spiffe://{trust_domain}/gateway/{site}"
        self._forwarder = re.compile(
            rf"^spiffe://{re.escape(trust_domain)}/site/([a-z0-9-]+)/forwarder$"
        )
        self._client_cas = x509.load_pem_x509_certificates(client_ca.read_bytes())
        self.max_skew_s = max_skew_s
        self.nonce_ttl_s = nonce_ttl_s
        self.max_body_bytes = max_body_bytes
        self._check_nonce = check_nonce
        self._may_forward = may_forward
        self._resolve = resolve
        self._clock = clock
        self.limits = limits
        # `forward.crl` at the handshake is the TLS context's; this is the same file for
        # the requests of a connection opened before a revocation.
        self._crl = ForwarderCRL(crl, forwarder_ca) if crl and forwarder_ca else None
        # This core's jobs key (read when its jobs service starts); empty: none, and an
        # edge's job runs here as any forwarded request, one receipt per run.
        self._jobs_key = jobs_key
        self.refusals: Counter[str] = Counter()
        self.accepted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan here: the API listener owns the gateway's
        if self.api is None:
            raise RuntimeError("the forward listener serves only once the API app is attached")
        with contextlib.ExitStack() as held:  # the site's slot, until the answer is sent
            try:
                try:
                    forwarded, body, client_pem, job = await self._check(scope, receive, held)
                except StoreUnavailable as exc:  # the nonce store: refuse, never a 500
                    raise state_unavailable(exc) from exc
            except Problem as p:
                reason = str(p.extra.get("reason", p.type.rsplit("/", 1)[-1]))
                self.refusals[reason] += 1
                log.warning("forward listener refused a request: %s", reason)
                await problem_response(p)(scope, receive, send)
                return
            await self._serve(scope, receive, send, forwarded, body, client_pem, job)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        forwarded: Forwarded,
        body: bytes,
        client_pem: str,
        job: JobScope | None,
    ) -> None:
        assert self.api is not None  # checked by __call__
        self.accepted += 1
        inner = dict(scope)
        tls = dict(scope.get("extensions", {}).get("tls") or {})
        # From here the request is the client's: the identity stage reads this certificate
        # (checked above against the client CA) and the core's own revocations.
        tls["client_cert_chain"] = [client_pem]
        inner["extensions"] = {**scope.get("extensions", {}), "tls": tls}
        if job is not None:  # put there only here, never from the network (jobs/scope.py)
            inner["extensions"][JOB_EXTENSION] = job
        # Only the headers that say how to read the body: the statement binds nothing
        # else, so nothing else a forwarder adds (a purpose, a deadline) may speak for the
        # client.
        inner["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() in _BODY_HEADERS]
        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if sent:
                # The edge's connection, its body read: what comes now is its leaving,
                # which ends a stream (cancelled at the node, closing receipt written).
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        token = FORWARDED.set(forwarded)
        try:
            await self.api(inner, replay, send)
        finally:
            FORWARDED.reset(token)

    async def _check(
        self, scope: Scope, receive: Receive, held: contextlib.ExitStack
    ) -> tuple[Forwarded, bytes, str, JobScope | None]:
        if self._crl is not None:
            await self._crl.refresh()
        site, signer = self._forwarder_of(scope)
        t = target(scope.get("path", ""))
        if scope.get("method") != "POST" or t is None:
            raise NotFound("the forward listener serves inference and generation only")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            st = verified(headers, signer)
        except StatementError as exc:
            raise _refused(exc.reason, str(exc)) from exc
        self._check_statement(st, site, t)
        client_pem = self._client_certificate(st)
        identity = self._resolve({"extensions": {"tls": {"client_cert_chain": [client_pem]}}})
        if not self._may_forward(IdentityFacts.from_identity(identity), site, st.model):
            raise _refused(
                "forward-for-denied", f"site {site} may not act for this client on this model"
            )
        # From here the request costs the core memory and a nonce: within the site's bounds.
        held.enter_context(self.limits.slot(site, generates=t.generates))
        body = await self._body(receive)
        if hashlib.sha256(body).hexdigest() != st.body_sha256:
            raise _refused("body-digest", "the body is not the one the statement names")
        if t.model is None and model_of(t, await body_doc(t, body)) != st.model:
            # OpenAI's routes read the model from the body: forward_for above decided on
            # the statement's, so the body must name that one, as its route will read it.
            raise _refused("statement-model", "the body names another model")
        # Fails closed: a store that cannot answer raises, and the request is refused.
        if not await self._check_nonce(f"forward:{site}:{st.nonce}", self.nonce_ttl_s):
            raise Replayed("this statement was already used", extra={"reason": "replayed"})
        return Forwarded(site, st.hops, self.site), body, client_pem, self._job(site, st, identity)

    def _job(self, site: str, st: Statement, identity: Any) -> JobScope | None:
        """The job scope of a statement naming the edge's job: its id namespaced by the
        certificate's site and the verified client, not by the statement's word."""
        key = self._jobs_key()
        if st.job is None or not key:
            return None
        job_id = forwarded_job(site, identity.spiffe_id, st.job)
        return JobScope(job_id, job_seed(key, job_id))

    def _forwarder_of(self, scope: Scope) -> tuple[str, x509.Certificate]:
        tls = scope.get("extensions", {}).get("tls")
        chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
        if not chain:
            raise Unauthenticated("no verified forwarder certificate on this connection")
        cert = x509.load_pem_x509_certificate(chain[0].encode())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound as exc:
            raise _refused("not-a-forwarder", "not a forwarder certificate") from exc
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        found = [self._forwarder.fullmatch(u) for u in uris]
        if len(uris) != 1 or found[0] is None or ExtendedKeyUsageOID.CLIENT_AUTH not in ekus:
            raise _refused("not-a-forwarder", "not a forwarder certificate")
        if self._crl is not None and self._crl.revoked(cert):
            # A kept-alive connection opened before the revocation: refused from its next
            # request, as a new connection is at its handshake.
            raise _refused("forwarder-revoked", "this forwarder certificate is revoked")
        return found[0][1], cert

    def _check_statement(self, st: Statement, site: str, t: Target) -> None:
        if st.site != site:
            raise _refused("statement-site", "the statement names another site")
        if st.aud != self.audience:
            raise _refused("statement-audience", "the statement is for another gateway")
        if abs(self._clock() - st.iat) > self.max_skew_s:
            raise _refused("statement-time", "the statement's time is outside the window")
        if self.site in st.hops:  # edge -> core -> edge -> core
            raise _refused("forward-loop", "the request already passed this gateway")
        if st.hops != (site,):
            # No gateway forwards a forwarded request, so the sender is the only hop; a
            # longer list would be the edge's word alone in the core's receipt.
            raise _refused("forward-hops", "the hops name another site than the sender")
        # OpenAI's routes name no version, and their model is the body's (checked once
        # the body is read, against this statement's).
        if (st.version != t.version) or (t.model is not None and st.model != t.model):
            raise _refused("statement-model", "the statement names another model")

    def _client_certificate(self, st: Statement) -> str:
        try:
            cert = x509.load_pem_x509_certificate(st.client_cert.encode())
        except ValueError as exc:
            raise _refused("client-certificate", "unparseable client certificate") from exc
        for ca in self._client_cas:
            try:
                cert.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return st.client_cert
        raise _refused("client-certificate", "the client certificate is not from the client CA")

    async def _body(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _refused("body-digest", "the body ended early")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"a forwarded body is at most {self.max_body_bytes} bytes")
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)
