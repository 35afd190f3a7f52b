"""The HTTP routes of generative models: Triton's generate extension and the OpenAI-
compatible surface. Identity and admission are the pipeline's (`Pipeline.authenticated`,
with denial receipts); the rest is `GenerateService`. Refusals on the OpenAI routes take
OpenAI's error shape ({"error": {"message", "type", "code", "param"}}, `type` the stable
problem type URI); on Triton's, problem+json, whose `error` member is Triton's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from gateway.generate import verified
from gateway.generate.ask import Ask, Surface, parse
from gateway.generate.session import Closed, GenerateService, Opened, Piece, Stream, is_generative
from gateway.generate.sse import EventStream, client_gone
from gateway.generate.wire import DONE, OpenAIWire, TritonWire, openai_error, sse
from gateway.jobs.scope import job_of
from gateway.pipeline.context import Caller, Incoming
from gateway.pipeline.decode import read_body
from gateway.protocol.problems import Problem, UpstreamFailed, problem_response
from gateway.stats import StreamTiming

if TYPE_CHECKING:
    from gateway.app import Gateway

Wire = OpenAIWire | TritonWire

# nginx's "client closed request": the answer to a whole generation whose client left.
# Nobody reads it; the request metric counts it.
CLIENT_GONE = 499


def service_for(gw: Gateway) -> GenerateService:
    return GenerateService(
        cfg=gw.cfg.generate,
        pre_policy=gw.pipeline.pre_policy,
        nonce=gw.pipeline.nonce,
        policy=gw.policy,
        router=gw.router,
        revocations=gw.revocations,
        store=gw.store,
        receipts=gw.receipts,
        stats=gw.pipeline.stats,
        telemetry=gw.pipeline.telemetry,
    )


def _wire(stream: Stream) -> Wire:
    return TritonWire(stream) if stream.ask.surface == "triton" else OpenAIWire(stream)


async def _collect(stream: Stream, receive: Receive) -> tuple[str, Opened, Closed] | None:
    """The whole generation, or None once its client left first. Its leaving cancels the
    generation at the node as a stream's does (`Stream.events`' cleanup: the closing
    receipt says `cancelled` and commits what was produced; the stream slot and the token
    reservation are settled), instead of running to max_tokens for nobody."""
    read = asyncio.ensure_future(_read(stream))
    watch = asyncio.ensure_future(client_gone(receive))
    try:
        await asyncio.wait({read, watch}, return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            return read.result()
        return None
    finally:
        watch.cancel()
        if not read.done():
            read.cancel()
            # Its cleanup writes the closing receipt (shielded): waited for, so the slot
            # is free by the time the answer is sent.
            await asyncio.wait({read})
        for task in (read, watch):  # retrieved: nobody is left to tell
            if task.done() and not task.cancelled():
                task.exception()


async def _read(stream: Stream) -> tuple[str, Opened, Closed]:
    text: list[str] = []
    opened: Opened | None = None
    closed: Closed | None = None
    events = stream.events()
    try:
        async for ev in events:
            if isinstance(ev, Opened):
                opened = ev
            elif isinstance(ev, Piece):
                text.append(ev.text)
            else:
                closed = ev
    finally:
        await events.aclose()
    assert opened is not None and closed is not None
    return "".join(text), opened, closed


def _broken(stream: Stream) -> UpstreamFailed:
    if stream.generation.finish_reason == "diverged":
        return verified.diverged(stream)
    return UpstreamFailed(
        f"node {stream.opened.node} failed during the stream; the closing receipt covers "
        "the tokens sent",
        extra={"request_id": stream.request_id},
    )


async def _sse(stream: Stream) -> AsyncGenerator[bytes, None]:
    wire = _wire(stream)
    openai = isinstance(wire, OpenAIWire)
    events = stream.events()
    try:
        async for ev in events:
            yield wire.event(ev)
            if isinstance(ev, Closed) and ev.finish_reason in verified.FAILED:
                p = _broken(stream)
                yield sse(openai_error(p) if openai else p.to_dict())
                return
        if openai:
            yield DONE
    finally:
        await events.aclose()


def generate_routes(gw: Gateway) -> list[Route]:
    service = service_for(gw)
    gw.generate = service  # type: ignore[attr-defined]  # for tests and `ztgate demo`
    service.text_spot = getattr(gw, "text_spot", None)  # gateway/routing/accounting.py

    def endpoint(route: str, surface: Surface | None) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            gw.metrics.app_calls += 1
            params = request.path_params
            came = Incoming(
                scope=request.scope,
                headers=request.headers,
                body=request.stream,
                model=params.get("name"),
                version=params.get("version"),
            )
            request.state.request_id = came.request_id
            try:
                response = await _run(gw, service, request, came, surface)
            except Problem as p:
                p.extra.setdefault("request_id", came.request_id)
                if surface == "triton":
                    response = problem_response(p)
                else:
                    response = JSONResponse(openai_error(p), p.status, headers=p.headers)
            gw.metrics.requests.labels(route, str(response.status_code)).inc()
            return response

        return handler

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v1/chat/completions", endpoint("chat_completions", "chat"), methods=["POST"]),
        Route("/v1/completions", endpoint("completions", "completion"), methods=["POST"]),
        Route("/v1/models", endpoint("models", None), methods=["GET"]),
    ]
    for base in (model, version):
        for suffix in ("/generate", "/generate_stream"):
            routes.append(
                Route(
                    base + suffix,
                    endpoint("generate", "triton"),
                    methods=["POST"],
                    name=f"generate:{base}{suffix}",
                )
            )
    return routes


async def _run(
    gw: Gateway,
    service: GenerateService,
    request: Request,
    came: Incoming,
    surface: Surface | None,
) -> Response:
    if surface is None:

        async def listing(caller: Caller) -> Response:
            return JSONResponse(_models(gw, caller))

        return await gw.pipeline.authenticated(came, listing, route="models")
    streaming = request.url.path.endswith("/generate_stream")
    named: list[str] = []  # the body's model, once the caller may see it: denials name it

    async def handle(caller: Caller) -> Stream | Response:
        admitted = time.monotonic_ns()
        timing = StreamTiming(arrived=int(came.started * 1e9), admitted=admitted)
        with gw.pipeline.telemetry.stage("decode"):
            body = await read_body(request.headers, request.stream(), gw.cfg.limits.max_json_bytes)
            ask: Ask = parse(
                surface,
                body,
                model=came.model,
                default_max_tokens=gw.cfg.generate.default_max_tokens,
            )
        timing.decoded = time.monotonic_ns()
        entry = gw.seen(caller, ask.model, came.version)
        named.append(entry.name)
        job = job_of(request.scope)  # a job's run: its stream receipts name the job
        stream = await service.start(
            caller, entry, ask, came.request_id, request.headers, timing, job.id if job else None
        )
        if ask.stream or streaming:
            return stream  # sent outside the admission slot, holding a stream slot
        whole = await _collect(stream, request.receive)
        if whole is None:
            return Response(status_code=CLIENT_GONE)
        text, opened, closed = whole
        wire = _wire(stream)
        headers = {}
        if closed.issued is not None:
            headers["ztgate-receipt"] = closed.issued.summary
        if closed.finish_reason in verified.FAILED:
            p = _broken(stream)
            if closed.issued is not None:
                p.extra["receipt_id"] = closed.issued.receipt.receipt_id
                p.headers["ztgate-receipt"] = closed.issued.summary
            raise p
        return JSONResponse(wire.whole(text, opened, closed), headers=headers)

    got = await gw.pipeline.authenticated(
        came, handle, route="generate", named=lambda: named[0] if named else None
    )
    if isinstance(got, Response):
        return got
    return EventStream(_sse(got), gw.cfg.generate.send_timeout_s, got.finish)


def _models(gw: Gateway, caller: Caller) -> dict[str, Any]:
    data = [
        {"id": e.name, "object": "model", "created": 0, "owned_by": "ztgate"}
        for e in gw.visible_entries(caller)
        if is_generative(e) and e.version == gw.latest(e.name).version
    ]
    return {"object": "list", "data": data}
