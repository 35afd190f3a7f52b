"""The edge's half: send a request to the core with a signed statement, and fail over to
the core when the edge's own nodes cannot serve.

`EdgeFailover` wraps the edge's API app. An inference or a generation (Triton's
generate and generate_stream, OpenAI's chat and completions: `paths.py`) runs here
first, under the edge's policy; only when it ends in `no-healthy-node` or
`upstream-failed` after the edge's own policy allowed it (the problem names the edge's
decision: its forbids and @rate ran), before any byte of the answer was sent, is the
same body sent to the core's forward listener, and the core's answer, or its refusal, is
what the client gets, marked `ztgate-site-why: forwarded-to-core`. A request that itself
came through a forward listener is never forwarded again, nor is a compressed one (the
edge decided on its body decompressed; the statement would bind the bytes as sent).
Jobs run through this wrapper too (gateway/runtime.py), their statement naming the job
(the core then keeps one receipt per job: listener.py), and the gRPC front, under the
same rule, hands the core the HTTP body it made of its message through `ask_core`.

A stream of events is passed on as it arrives, one read at a time: each read within
`timeout_s` plus what the core may hold back for a stop sequence, the whole within what
a local stream of the edge's own caps could last, and each send to the client within
`generate.send_timeout_s`. A client that leaves (from the moment the request is sent,
before the core's answer starts too), or a core that stops, closes the other side (the
core then cancels a stream at its node and writes its closing receipt); a link broken
inside an event has that event ended before the error event. Any other answer is read
whole, within the same bounds and at most `MAX_ANSWER_BYTES`, before its first byte is
sent, so a core that fails on the way still leaves the client the edge's own answer.

The core is pinned: only `core_ca` is trusted, and the handshake fails unless the core's
certificate names, as its one URI SAN, the gateway SPIFFE ID the statement is addressed
to, before any byte of the request is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Coroutine, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import Generate
from gateway.forward.listener import ASGIApp, Receive, Scope, Send
from gateway.forward.paths import Target, body_doc, model_of, streams, target
from gateway.forward.site import FORWARDED, FORWARDED_TO_CORE
from gateway.forward.statement import make, sign
from gateway.generate.ask import MAX_STOP_BYTES
from gateway.generate.sse import client_gone
from gateway.generate.wire import openai_error, sse
from gateway.jobs.scope import job_of
from gateway.protocol.problems import PROBLEM_BASE, UpstreamFailed

log = logging.getLogger(__name__)

# No local node could serve: none healthy, or every one tried failed.
_FAIL_OVER_ON = {PROBLEM_BASE + "no-healthy-node": 503, PROBLEM_BASE + "upstream-failed": 502}
_PASSED_HEADERS = ("inference-header-content-length",)
# The core's answer headers the client needs to read it: the binary extension's JSON
# length and the receipt summary. Nothing else of the core's reaches the client.
_RETURNED_HEADERS = ("inference-header-content-length", "ztgate-receipt")
SITE_WHY_HEADER = "ztgate-site-why"
SITE_HEADER = "ztgate-site"
# A whole (not streamed) answer the edge holds before sending it on: tensors, or a
# whole generation with its two receipts.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_EVENT_STREAM = "text/event-stream"
_T = TypeVar("_T")


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
        self.timeout_s = timeout_s
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
        self.left = 0  # requests whose client left before the core's answer started

    async def open(
        self,
        *,
        client_cert: str,
        path: str,
        model: str,
        version: str,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None,
        head_s: float,
        job: str | None = None,
    ) -> httpx.Response:
        """The core's answer, its head read within `head_s` and its body not yet read:
        the caller reads it and closes it (closing it unread closes the connection).
        `job`: the edge's job id, when this is a run of one (the core keeps one receipt
        per job: statement.py)."""
        st = make(
            site=self.site,
            aud=self.audience,
            client_cert=client_cert,
            body=body,
            model=model,
            version=version,
            job=job,
        )
        headers = {
            **(extra or {}),
            **sign(st, self._key),
            "content-type": content_type,
            "accept-encoding": "identity",
        }
        timeout = httpx.Timeout(self.timeout_s, read=head_s)
        req = self._http.build_request("POST", path, content=body, headers=headers, timeout=timeout)
        return await self._http.send(req, stream=True)

    async def aclose(self) -> None:
        await self._http.aclose()


class EdgeFailover:
    """The edge's API app, failing over to the core (module doc)."""

    def __init__(
        self,
        api: ASGIApp,
        forwarder: CoreForwarder,
        max_body_bytes: int,
        generate: Generate | None = None,
    ) -> None:
        self.api = api
        self.forwarder = forwarder
        self.max_body_bytes = max_body_bytes
        self.generate = generate or Generate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t = target(scope.get("path", "")) if scope["type"] == "http" else None
        if t is None or scope.get("method") != "POST" or FORWARDED.get() is not None:
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
        answered = False
        if _may_fail_over(b"".join(msg.get("body", b"") for msg in out)):
            answered = await self._to_core(scope, receive, send, t, body)
        if not answered:  # the edge's own answer
            await send(start)
            for msg in out:
                await send(msg)

    def _bounds(self, t: Target, streamed: bool) -> tuple[float, float]:
        """(the wait for the answer's head, the whole answer's): an inference's are the
        forward timeout; a generation's whole is what a local one of the edge's own caps
        could last, and a stream's head comes after its first token."""
        base = self.forwarder.timeout_s
        if not t.generates:
            return base, base
        g = self.generate
        first = base + g.first_token_timeout_s
        whole = first + g.max_tokens * g.token_timeout_s
        return (first if streamed else whole), whole

    async def _to_core(
        self, scope: Scope, receive: Receive, send: Send, t: Target, body: bytes
    ) -> bool:
        """Whether the core's answer (or refusal) went to the client, or the client left
        while the core was asked; False: nothing was sent, and the client gets the edge's
        own answer."""
        tls = scope.get("extensions", {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or []
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            # The edge decided on the decompressed body, but the statement would bind, and
            # the core read, the bytes as sent: a compressed request is not forwarded.
            return False
        doc = await body_doc(t, body)
        model = model_of(t, doc)
        if not chain or model is None:
            return False
        head_s, whole_s = self._bounds(t, streams(t, doc))
        job = job_of(scope)  # a run of the edge's job: the core keeps one receipt for it
        deadline = asyncio.get_running_loop().time() + whole_s
        # One watcher for the client's leaving, from the request's sending to the answer's
        # end: a client gone before the core's answer starts closes the core's request.
        watch = asyncio.ensure_future(client_gone(receive))
        try:
            try:
                core = await _unless_gone(
                    watch,
                    asyncio.timeout_at(deadline),
                    self.forwarder.open(
                        client_cert=chain[0],
                        path=scope["path"],
                        model=model,
                        version=t.version,
                        body=body,
                        content_type=headers.get("content-type", "application/json"),
                        # The binary tensor extension's JSON length; nothing else the
                        # client sent.
                        extra={k: v for k, v in headers.items() if k in _PASSED_HEADERS},
                        head_s=head_s,
                        job=None if job is None else job.id,
                    ),
                )
            except (httpx.HTTPError, OSError, TimeoutError) as exc:
                return self._failed(exc)
            if core is None:
                return self._left()
            try:
                return await self._answer(core, deadline, t, watch, send)
            finally:
                await core.aclose()
        finally:
            watch.cancel()

    async def _answer(
        self,
        core: httpx.Response,
        deadline: float,
        t: Target,
        watch: asyncio.Future[None],
        send: Send,
    ) -> bool:
        start = _start(core, self.forwarder.core_site)
        if core.status_code == 200 and _is_stream(core):
            self.forwarder.forwarded += 1
            await _Relay(self, core, deadline, t).run(start, watch, send)
            return True
        try:
            answer = await _unless_gone(
                watch,
                contextlib.nullcontext(),
                _read_whole(core, self.forwarder.timeout_s, deadline),
            )
        except (httpx.HTTPError, OSError, TimeoutError, ValueError) as exc:
            return self._failed(exc)
        if answer is None:
            return self._left()
        self.forwarder.forwarded += 1
        await send(start)
        await send({"type": "http.response.body", "body": answer, "more_body": False})
        return True

    def _failed(self, exc: BaseException) -> bool:
        self.forwarder.failed += 1
        log.warning("forwarding to the core failed: %s", type(exc).__name__)
        return False

    def _left(self) -> bool:
        """The client left before the core's answer started: its request to the core was
        closed (the core then cancels a stream at its node), and nobody is answered."""
        self.forwarder.left += 1
        return True


@dataclass(frozen=True)
class CoreAnswer:
    """The core's whole answer to a request handed to it by a front other than HTTP's."""

    status: int
    headers: dict[str, str]  # content-type and `_RETURNED_HEADERS` only, lowercase
    body: bytes


def eligible(problem: Mapping[str, Any]) -> bool:
    """Whether a problem (as `Problem.to_dict` writes it) leaves the request to the core:
    no local node could answer, and the edge's policy had allowed it (`_may_fail_over`)."""
    return bool(
        problem.get("type") in _FAIL_OVER_ON and isinstance(problem.get("decision_id"), str)
    )


async def ask_core(
    forwarder: CoreForwarder,
    *,
    client_cert: str,
    path: str,
    model: str,
    version: str,
    body: bytes,
    content_type: str,
    extra: dict[str, str] | None,
    within_s: float | None,
) -> CoreAnswer | None:
    """An inference the edge's own nodes could not serve, asked of the core as
    `EdgeFailover` asks it (the statement binds `body`, exactly the bytes the edge decided
    on), read whole within `timeout_s` (and `within_s`, the caller's own deadline) and
    `MAX_ANSWER_BYTES`. None when the core could not be reached or its answer not read:
    the caller then answers with the edge's own problem. Counted as `EdgeFailover` counts;
    a caller that goes away cancels this, which closes the request to the core."""
    bound = forwarder.timeout_s if within_s is None else min(forwarder.timeout_s, within_s)
    deadline = asyncio.get_running_loop().time() + max(bound, 0.0)
    try:
        async with asyncio.timeout_at(deadline):
            core = await forwarder.open(
                client_cert=client_cert,
                path=path,
                model=model,
                version=version,
                body=body,
                content_type=content_type,
                extra=extra,
                head_s=forwarder.timeout_s,
            )
            try:
                answer = await _read_whole(core, forwarder.timeout_s, deadline)
            finally:
                await core.aclose()
    except (httpx.HTTPError, OSError, TimeoutError, ValueError) as exc:
        forwarder.failed += 1
        log.warning("forwarding to the core failed: %s", type(exc).__name__)
        return None
    forwarder.forwarded += 1
    kept = ("content-type", *_RETURNED_HEADERS)
    headers = {k: core.headers[k] for k in kept if k in core.headers}
    return CoreAnswer(core.status_code, headers, answer)


async def _read_whole(core: httpx.Response, read_s: float, deadline: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    chunks = core.aiter_bytes()
    while True:
        try:
            async with asyncio.timeout_at(_next_read(read_s, deadline)):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return b"".join(parts)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise ValueError(f"the core's answer is over {MAX_ANSWER_BYTES} bytes")
        parts.append(chunk)


async def _unless_gone(
    watch: asyncio.Future[None],
    bound: contextlib.AbstractAsyncContextManager[object],
    work: Coroutine[Any, Any, _T],
) -> _T | None:
    """`work`'s result, or None once the client left first (`work` is then cancelled,
    which closes what it had opened towards the core)."""

    async def bounded() -> _T:
        async with bound:
            return await work

    task = asyncio.ensure_future(bounded())
    either: set[asyncio.Future[Any]] = {task, watch}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class _Relay:
    """A stream of events from the core, passed on as it arrives (module doc)."""

    def __init__(
        self, failover: EdgeFailover, core: httpx.Response, deadline: float, t: Target
    ) -> None:
        self.core = core
        self.deadline = deadline
        # Between two events the core may hold back tokens that could begin a stop
        # sequence (gateway/generate/stop.py): up to the longest one's length, each within
        # the core's token timeout, so a healthy stream is not cut for it.
        g = failover.generate
        self.read_s = failover.forwarder.timeout_s + g.token_timeout_s * MAX_STOP_BYTES
        self.send_s = g.send_timeout_s
        self.openai = t.surface == "openai"
        self._tail = b""  # the last bytes relayed: whether they ended an event

    async def run(
        self, start: MutableMapping[str, Any], watch: asyncio.Future[None], send: Send
    ) -> None:
        """Relay until the core's stream ends or `watch` (the client's leaving) does."""
        pump = asyncio.ensure_future(self._pump(start, send))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # the client left: the core's stream is closed by the caller
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
                await pump
        finally:
            if not pump.done():
                pump.cancel()

    async def _pump(self, start: MutableMapping[str, Any], send: Send) -> None:
        await send(start)
        chunks = self.core.aiter_bytes()
        while True:
            try:
                async with asyncio.timeout_at(_next_read(self.read_s, self.deadline)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (httpx.HTTPError, OSError, TimeoutError) as exc:
                # The core stopped or went silent: the client is told, as when a local
                # node fails mid-stream; the core's closing receipt covers what it sent.
                log.warning("the core's stream broke off: %s", type(exc).__name__)
                p = UpstreamFailed(
                    "the core's stream broke off; its closing receipt covers the tokens sent"
                )
                chunk = sse(openai_error(p) if self.openai else p.to_dict())
                if self._tail and not self._tail.endswith(b"\n\n"):
                    # The link broke inside an event: end it, or a reader would read the
                    # error event as the rest of the half one.
                    chunk = b"\n\n" + chunk
                await self._send(send, chunk)
                break
            await self._send(send, chunk)
            self._tail = (self._tail + chunk)[-2:]
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, chunk: bytes) -> None:
        async with asyncio.timeout(self.send_s):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


def _next_read(read_s: float, deadline: float) -> float:
    return min(asyncio.get_running_loop().time() + read_s, deadline)


def _is_stream(core: httpx.Response) -> bool:
    kind: str = core.headers.get("content-type", "")
    return kind.split(";")[0].strip() == _EVENT_STREAM


def _start(core: httpx.Response, core_site: str) -> MutableMapping[str, Any]:
    headers = [
        (b"content-type", core.headers.get("content-type", "").encode("latin-1")),
        *(
            (k.encode(), core.headers[k].encode("latin-1"))
            for k in _RETURNED_HEADERS
            if k in core.headers
        ),
        (SITE_WHY_HEADER.encode(), FORWARDED_TO_CORE.encode()),
        (SITE_HEADER.encode(), core_site.encode()),
    ]
    if _is_stream(core):
        headers += [(b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
    return {"type": "http.response.start", "status": core.status_code, "headers": headers}


def _may_fail_over(body: bytes) -> bool:
    """Whether the edge's own refusal leaves the request to the core: no local node could
    answer, and the edge's policy had allowed it. The pipeline names its decision on every
    problem raised after policy, mode and rate allowed the request; a "no node serves"
    raised before policy decided has none, and the edge's forbids and @rate must not be
    skipped by forwarding it. OpenAI's routes carry the problem in `error`."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        doc = doc["error"]
    return isinstance(doc, dict) and eligible(doc)


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
