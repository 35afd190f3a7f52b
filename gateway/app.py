"""The Starlette apps: the mTLS API (KServe v2, as Triton speaks it) and the admin listener.

Every route on the API app resolves the caller's identity first, from the verified peer
certificate only; a request without one never reaches a handler's logic. Errors of every
kind leave as RFC 9457 problem+json, mapped in one place (`_problem`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gateway import __version__
from gateway.background import Job, supervise
from gateway.config import Config
from gateway.generate.routes import generate_routes
from gateway.identity import Identity, IdentityResolver
from gateway.jobs import JobService
from gateway.jobs.routes import job_routes
from gateway.jsonstrict import StrictJSONError, loads
from gateway.pipeline import (
    AdmissionStage,
    Answer,
    Caller,
    Catalog,
    Concurrency,
    DecodeStage,
    DenialStage,
    IdentityStage,
    Incoming,
    ModeStage,
    NonceStage,
    Pipeline,
    PolicyStage,
    PrePolicyStage,
    RateLimitStage,
    ReceiptStage,
    RouteStage,
    VerifyStage,
    state_unavailable,
)
from gateway.pipeline.catalog import unknown_model
from gateway.pipeline.decision_log import EXIT_FLUSH_S, flush_decisions
from gateway.pipeline.decode import read_body
from gateway.pipeline.offload import DecodePool
from gateway.policy.facts import VIEW, IdentityFacts, Rate, ResourceFacts
from gateway.policy.live import LivePolicy
from gateway.protocol.codec import binary_outputs, encode_response
from gateway.protocol.problems import (
    BadRequest,
    Forbidden,
    Internal,
    LogUnavailable,
    MethodNotAllowed,
    NotFound,
    PolicyRollback,
    Problem,
    UnsupportedExtension,
    problem_response,
)
from gateway.protocol.tensors import InferResponse
from gateway.receipts.http import log_routes
from gateway.receipts.late import final_status
from gateway.receipts.model import FormatError, SignedReceipt, parse_receipt_id
from gateway.receipts.service import ReceiptService
from gateway.receipts.treestore import TreeCorrupt
from gateway.registry import ModelEntry
from gateway.revocation import Revocations
from gateway.routing.accounting import node_listing
from gateway.routing.router import DisagreementMetrics, NodeMetrics, Router
from gateway.state import StateStore, StoreUnavailable
from gateway.stats import InferenceStats
from gateway.telemetry import Children, CountOf, ReceiptMetrics, Telemetry
from gateway.verify import Verifier
from gateway.verify.none import NoVerification
from gateway.verify.redundant import RedundantVerification

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

# How often the shared store is probed for readiness. Requests notice an outage at once
# (their store calls fail); recovery is noticed by this probe, because a replica that is
# not ready gets no traffic to notice it with.
STATE_PROBE_INTERVAL_S = 1.0
# Replicas re-announce where their receipt logs live this often: a Redis that restarted
# without persistence between two probes forgot the directory without looking down.
ANNOUNCE_INTERVAL_S = 60.0


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "ztgate_requests",
            "API requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ztgate_infer_seconds",
            "Inference latency through the gateway",
            ["model", "mode"],
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # The children the HTTP request path counts into, looked up once each.
        self.request_count = Children(self.requests)
        self.infer_latency = Children(self.latency)
        self.background_failures = Counter(
            "ztgate_background_failures",
            "Background loops (checkpoints, health, policy watch) that died and were restarted",
            ["job"],
            registry=self.registry,
        )
        # The request path's own: per-stage latency, inferences by model/mode/outcome,
        # rate-limit refusals (and the process's proof, MPC and denial metrics).
        self.telemetry = Telemetry(self.registry)
        self.app_calls = 0  # requests that reached the app at all (tests assert on it)
        self.gauges = False


@dataclass
class Gateway:
    """Everything a request needs, built once at start."""

    cfg: Config
    models: dict[str, dict[str, ModelEntry]]
    router: Router
    resolver: IdentityResolver
    verifiers: dict[str, Verifier]
    policy: LivePolicy
    store: StateStore
    revocations: Revocations
    receipts: ReceiptService | None = None
    metrics: Metrics = field(default_factory=Metrics)
    background: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = field(
        default_factory=list
    )
    # Background jobs that died and wait to be restarted: the gateway is not ready.
    down: set[str] = field(default_factory=set)
    # Whether the shared store answered its last probe (and no request has found it
    # unreachable since). Rate limits and nonces fail closed without it, so readiness
    # follows it. True until the first probe, which the API's lifespan runs before serving.
    state_up: bool = True
    # time.monotonic() of the next receipt-log announcement
    _next_announce: float = field(default=0.0, init=False)
    # Whether the shared store holds this replica's announcement of its receipt logs (with
    # receipts.public_url set): until then another replica sends a reader of a receipt
    # signed here to nobody, so this replica is not ready (`ready`).
    logs_announced: bool = field(default=False, init=False)
    jobs: JobService | None = field(default=None, init=False)  # the jobs API (build_api)

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.models)
        self.decode_pool = DecodePool(self.cfg.limits.decode_workers)
        self.concurrency = Concurrency(
            self.cfg.limits.max_concurrent, self.cfg.limits.max_concurrent_per_identity
        )
        self.stats = InferenceStats(self.catalog)
        self.pipeline = Pipeline(
            catalog=self.catalog,
            identity=IdentityStage(self.resolver, self.revocations),
            admission=AdmissionStage(
                self.store, Rate.parse(self.cfg.policy.pre_policy_rate), self.concurrency
            ),
            pre_policy=PrePolicyStage(self.policy),
            decode=DecodeStage(self.cfg, self.decode_pool),
            nonce=NonceStage(self.store, self.cfg.policy.nonce_window_s),
            policy=PolicyStage(self.policy, self.router, self.revocations, offered=self.verifiers),
            mode=ModeStage(
                self.verifiers, {"zk": self.cfg.zk.deadline_s, "mpc": self.cfg.mpc.deadline_s}
            ),
            rate=RateLimitStage(self.store),
            route=RouteStage(self.router),
            verify=VerifyStage(self.verifiers, self.router),
            receipt=None if self.receipts is None else ReceiptStage(self.receipts),
            denial=None if self.receipts is None else DenialStage(self.receipts),
            on_state_lost=self.state_lost,
            stats=self.stats,
            telemetry=self.metrics.telemetry,
        )
        self.router.probe_models = {name: self.latest(name) for name in self.models}
        self._gauges()

    def _gauges(self) -> None:
        """State an operator alerts on, read when Prometheus scrapes."""
        if self.metrics.gauges:  # a copy of a Gateway (dataclasses.replace) shares them
            return
        self.metrics.gauges = True
        reg = self.metrics.registry
        for name, doc, fn in (
            (
                "ztgate_revocation_staleness_seconds",
                "Seconds since the revocation set last synced (fails closed past the budget)",
                self.revocations.stale_for,
            ),
            ("ztgate_revocations", "Revoked certificates known", lambda: self.revocations.version),
            (
                "ztgate_policy_cache_hit_ratio",
                "Hit rate of the policy decision cache",
                lambda: self.policy.engine.stats().hit_rate,
            ),
            ("ztgate_nodes_ejected", "Nodes ejected now", lambda: len(self.router.ejected)),
            (
                "ztgate_state_store_up",
                "1 if the shared state store (Redis) answers, else 0 (requests fail closed)",
                lambda: 1.0 if self.state_up else 0.0,
            ),
            (
                "ztgate_ready",
                "1 if this replica is ready (what /readyz and /v2/health/ready answer), else 0",
                lambda: 1.0 if self.ready() else 0.0,
            ),
        ):
            Gauge(name, doc, registry=reg).set_function(fn)
        reg.register(DisagreementMetrics(self.router))
        reg.register(NodeMetrics(self.router))
        reg.register(
            CountOf(
                "ztgate_policy_rejected_reloads",
                "Policy reloads rejected (the last good policy kept)",
                lambda: self.policy.rejected,
            )
        )
        if self.receipts is not None:
            reg.register(ReceiptMetrics(self.receipts))

    @classmethod
    def default_verifiers(cls, cfg: Config) -> dict[str, Verifier]:
        return {
            "none": NoVerification(cfg.limits.max_output_bytes),
            "redundant": RedundantVerification(cfg.limits.max_output_bytes),
        }

    async def record(self, kind: str, payload: bytes) -> None:
        """Events that bear on answers go into the transparency log (hashes only)."""
        if self.receipts is None:
            return
        try:
            await self.receipts.record(kind, payload)
        except Exception:  # the event happened either way; losing its leaf is logged
            log.exception("could not log a %s event", kind)

    async def where_is(self, log_id: str) -> str | None:
        """The base URL of the replica holding another log: the shared store names it, and
        only a replica from configuration (`receipts.replicas`) is believed.

        Raises `StoreUnavailable` when the store cannot say: the reader gets
        `state-unavailable` and retries, rather than a 404 for a receipt that exists."""
        url = await self.store.find_log(log_id)
        if url is None:
            return None
        if url.rstrip("/") not in self.cfg.receipts.replicas:
            log.warning("the shared store names an unconfigured replica for log %s", log_id)
            return None
        return url.rstrip("/")

    def ready(self) -> bool:
        """Ready: some model has a node to go to, no background loop is down, and the
        checks that fail closed can run (the shared store answers, the revocation list is
        within its staleness budget), and this replica's receipt logs are announced in
        the shared store before it signs a receipt (`announce_logs`). Both readiness
        endpoints answer exactly this."""
        return (
            not self.down
            and self.state_up
            and (self.logs_announced or not self.announces_logs)
            and not self.revocations.stale()
            and any(self.router.candidates(m) for m in self.models)
        )

    def state_lost(self, cause: BaseException | None) -> None:
        """A request found the shared store unreachable: not ready until a probe succeeds.

        Without this, readiness would lag the outage by up to a probe interval, during
        which the admin listener said ready while every API request was refused."""
        if self.state_up:
            self.state_up = False
            log.error("shared state store unreachable; failing closed: %s", cause)

    async def check_state(self) -> bool:
        """Probe the shared store once and set `state_up`; after an outage (and now and
        then), re-announce this replica's receipt logs, which a restarted Redis forgot."""
        # `ping` has its own deadline and never raises; this guards a store that has none.
        try:
            async with asyncio.timeout(2 * self.cfg.state.timeout_s + 1.0):
                ok = await self.store.ping()
        except TimeoutError:
            ok = False
        was = self.state_up
        self.state_up = ok
        if ok and not was:
            log.warning("shared state store reachable again; serving")
        elif was and not ok:
            log.error("shared state store unreachable; failing closed")
        if ok and (not was or time.monotonic() >= self._next_announce):
            self._next_announce = time.monotonic() + ANNOUNCE_INTERVAL_S
            await self.announce_logs()
        return ok

    async def watch_state(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=STATE_PROBE_INTERVAL_S)
            if not stop.is_set():
                await self.check_state()

    @property
    def announces_logs(self) -> bool:
        """Whether this replica publishes where its receipt logs are (receipts.public_url)."""
        return self.receipts is not None and self.cfg.receipts.public_url is not None

    async def announce_logs(self) -> None:
        url = self.cfg.receipts.public_url
        if self.receipts is None or url is None:
            return
        try:
            for rl in self.receipts.logs():
                await self.store.publish_log(rl.log_id, url.rstrip("/"))
        except StoreUnavailable as exc:
            self.logs_announced = False
            self._next_announce = 0.0  # not ready until the next probe's retry succeeds
            log.error("could not announce this replica's receipt logs: %s", exc)
            return
        self.logs_announced = True

    def policy_changed(self) -> None:
        """After any successful (re)load: the bundle's staleness budget applies."""
        budget = self.policy.current.staleness_budget_s
        if budget is not None:
            self.revocations.staleness_budget_s = budget

    def authorize(self, identity: Identity, action: str, resource: ResourceFacts) -> None:
        decision = self.policy.engine.authorize(
            IdentityFacts.from_identity(identity), action, resource
        )
        log.warning(
            "authorization %s: %s %s by %s (%s)",
            "granted" if decision.allowed else "DENIED",
            action,
            resource.id,
            identity.spiffe_id,
            ", ".join(decision.determining) or decision.reason,
        )
        if not decision.allowed:
            raise Forbidden(f"policy denies {action}: {decision.reason}")

    def latest(self, name: str) -> ModelEntry:
        return self.catalog.latest(name)

    def visible(self, caller: Caller, name: str) -> bool:
        """Whether policy lets `caller` see that model `name` exists (Cedar action `view`,
        deny by default): its metadata, readiness, statistics and repository index
        entry. Every front asks this before saying anything about a model."""
        decision = self.policy.engine.authorize(caller.facts, VIEW, ResourceFacts("Model", name))
        if not decision.allowed:
            log.info(
                "view of %s denied to %s: %s", name, caller.identity.spiffe_id, decision.reason
            )
        return decision.allowed

    def seen(self, caller: Caller, name: str, version: str | None = None) -> ModelEntry:
        """The entry `caller` asked about, or the very problem an unknown name gets when
        the name is unknown *or* the caller may not view it: a 404 that does not reveal
        whether the model exists. An unknown version only of a model the caller sees."""
        if name not in self.models or not self.visible(caller, name):
            raise unknown_model(name)
        return self.catalog.entry(name, version)

    def visible_entries(self, caller: Caller) -> list[ModelEntry]:
        """Every registered version of every model `caller` may view, by name and version."""
        out: list[ModelEntry] = []
        for name in sorted(self.models):
            if self.visible(caller, name):
                out.extend(self.models[name][v] for v in sorted(self.models[name], key=int))
        return out

    def entry(self, name: str, version: str | None) -> ModelEntry:
        return self.catalog.entry(name, version)


# --- handlers ----------------------------------------------------------------------------
class _Body:
    """The request body as the pipeline reads it, remembering whether it was read to the end."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.finished = False

    def __call__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.request.stream():
            yield chunk
        self.finished = True

    def unread(self) -> bool:
        """Refused with body bytes still on the wire: keeping the connection would mean
        receiving (and decrypting) them, which is what a refusal before the body saves."""
        if self.finished:
            return False
        length = self.request.headers.get("content-length")
        return length != "0" and (length is not None or "transfer-encoding" in self.request.headers)


def incoming(request: Request) -> Incoming:
    """What the pipeline needs of an HTTP request; the body stays unread until decoded."""
    params = request.path_params
    name, version = params.get("name"), params.get("version")
    return Incoming(
        scope=request.scope,
        headers=request.headers,
        body=_Body(request),
        model=name if isinstance(name, str) else None,
        version=version if isinstance(version, str) else None,
    )


Run = Callable[[Request, Incoming], Awaitable[Response]]


def _endpoint(gw: Gateway, route: str, run: Run) -> Handler:
    """A route whose problems leave as problem+json, counted by route and status."""

    async def endpoint(request: Request) -> Response:
        gw.metrics.app_calls += 1
        came = incoming(request)
        request.state.request_id = came.request_id
        try:
            response = await run(request, came)
        except Problem as p:
            if isinstance(came.body, _Body) and came.body.unread():
                p.headers["connection"] = "close"
            response = problem_response(p)
        except Exception as exc:
            problem = as_problem(exc, f"{request.url.path} (request {came.request_id})")
            problem.extra.setdefault("request_id", came.request_id)
            response = problem_response(problem)
        gw.metrics.request_count(route, str(response.status_code)).inc()
        return response

    return endpoint


def _authenticated(gw: Gateway, route: str, handler: Handler) -> Handler:
    """The pipeline's identity and admission in front of a handler."""

    async def run(request: Request, came: Incoming) -> Response:
        async def handle(caller: Caller) -> Response:
            request.state.identity = caller.identity
            request.state.caller = caller
            return await handler(request)

        return await gw.pipeline.authenticated(came, handle)

    return _endpoint(gw, route, run)


def _inference(gw: Gateway) -> Handler:
    """`/infer`: the whole pipeline, the answer rendered inside the caller's slot."""

    async def run(request: Request, came: Incoming) -> Response:
        response = await gw.pipeline.infer(came, lambda answer: respond(gw, answer))
        return await compressed(request.headers, response)

    return _endpoint(gw, "infer", run)


def _redirect_foreign_logs(gw: Gateway, endpoint: Any) -> Handler:
    """Another replica's log: send the reader there, so nobody mistakes two logs for a fork."""

    async def handler(request: Request) -> Response:
        log_id = request.path_params.get("log_id")
        assert gw.receipts is not None
        if isinstance(log_id, str) and log_id not in {rl.log_id for rl in gw.receipts.logs()}:
            elsewhere = await gw.where_is(log_id)
            if elsewhere is not None:
                target = f"{elsewhere}{request.url.path}"
                if request.url.query:
                    target += f"?{request.url.query}"
                return RedirectResponse(target, status_code=307)
        response: Response = await endpoint(request)
        return response

    return handler


def api_routes(gw: Gateway) -> list[Route]:
    async def live(_: Request) -> Response:
        return Response(status_code=200)

    async def ready(_: Request) -> Response:
        return Response(status_code=200 if gw.ready() else 503)

    async def server_metadata(_: Request) -> Response:
        # "ztgate", not "triton": docs/clients.md ("Which server answers") says why.
        return JSONResponse(
            {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
        )

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["name"]
        entry = gw.seen(request.state.caller, name, request.path_params.get("version"))
        return JSONResponse(
            {
                "name": entry.name,
                "versions": sorted(gw.models[name], key=int),
                "platform": "ztgate",
                "inputs": [s.to_json() for s in entry.inputs],
                "outputs": [s.to_json() for s in entry.outputs],
                "parameters": {
                    "sha256": entry.sha256,
                    "classification": entry.classification,
                    "allowed_modes": ",".join(entry.allowed_modes),
                },
            }
        )

    async def model_ready(request: Request) -> Response:
        params = request.path_params
        entry = gw.seen(request.state.caller, params["name"], params.get("version"))
        return Response(status_code=200 if gw.router.candidates(entry.name) else 400)

    async def model_stats(request: Request) -> Response:
        """Triton's statistics extension, from the gateway's own counters (gateway.stats)."""
        caller: Caller = request.state.caller
        name, version = request.path_params.get("name"), request.path_params.get("version")
        if name is None:
            entries = gw.visible_entries(caller)
        elif version is not None:
            entries = [gw.seen(caller, name, version)]
        else:
            gw.seen(caller, name)
            entries = [gw.models[name][v] for v in sorted(gw.models[name], key=int)]
        return JSONResponse(gw.stats.model_stats(entries))

    async def repository_index(request: Request) -> Response:
        """Triton's repository index: the model versions this caller may view, each READY
        when a healthy node serves it; `{"ready": true}` lists only those."""
        body = await read_body(request.headers, request.stream(), 4096)
        ready_only = False
        if body.strip():
            try:
                doc = loads(body, source="the request body")
            except StrictJSONError as exc:
                raise BadRequest('body must be a JSON object, e.g. {"ready": true}') from exc
            ready_only = doc.get("ready", False)
            if not isinstance(ready_only, bool):
                raise BadRequest('"ready" must be true or false')
        index: list[dict[str, str]] = []
        for entry in gw.visible_entries(request.state.caller):
            up = bool(gw.router.candidates(entry.name))
            if ready_only and not up:
                continue
            row = {"name": entry.name, "version": entry.version, "state": "READY"}
            if not up:
                row.update(state="UNAVAILABLE", reason="no healthy node serves this model")
            index.append(row)
        return JSONResponse(index)

    def unsupported(what: str) -> Handler:
        async def handler(_: Request) -> Response:
            raise UnsupportedExtension(f"this gateway does not offer {what}")

        return handler

    async def admin_revoke(request: Request) -> Response:
        gw.authorize(request.state.identity, "admin_revoke", ResourceFacts("Gateway"))
        body = await read_body(request.headers, request.stream(), 64 * 1024)
        issuer, serial = _revocation_target(body)
        new = await gw.revocations.revoke(issuer, serial)
        await gw.record("revocation", f"{issuer}\n{serial}".encode())
        log.warning(
            "AUDIT revoke serial=%s issuer=%s by %s (new=%s)",
            serial,
            issuer,
            request.state.identity.spiffe_id,
            new,
        )
        return JSONResponse({"revoked": True, "new": new, "issuer": issuer, "serial": serial})

    async def admin_reload(request: Request) -> Response:
        gw.authorize(request.state.identity, "admin_reload", ResourceFacts("Gateway"))
        body = await read_body(request.headers, request.stream(), 16 * 1024 * 1024)
        ok = gw.policy.reload(body or None)
        if ok:
            gw.policy_changed()
            await gw.record("policy_load", gw.policy.engine.source.hash.encode())
        log.warning(
            "AUDIT policy reload by %s: %s",
            request.state.identity.spiffe_id,
            "ok" if ok else f"rejected ({gw.policy.last_error})",
        )
        if not ok:
            why = f"policy rejected, previous policy kept: {gw.policy.last_error}"
            # A rollback is its own type: a pipeline pushing bundles must tell "older than
            # what runs" (fetch the current version, then push a newer one) from a bad one.
            if gw.policy.last_rejection == "rollback":
                raise PolicyRollback(why)
            raise BadRequest(why)
        return JSONResponse(_policy_status(gw))

    async def read_receipt(request: Request) -> Response:
        rid = request.path_params["receipt_id"]
        if gw.receipts is None:
            raise NotFound("this gateway keeps no receipts")
        try:
            log_id, _ = parse_receipt_id(rid)
        except FormatError as exc:
            raise BadRequest(str(exc)) from exc
        holder = next((rl for rl in gw.receipts.logs() if rl.log_id == log_id), None)
        if holder is None:
            elsewhere = await gw.where_is(log_id)
            if elsewhere is not None:
                return RedirectResponse(f"{elsewhere}/v2/receipts/{rid}", status_code=307)
        stored = holder.body(rid) if holder is not None else None
        if stored is None:
            # Unknown, erased, or held by another replica's log: the same answer for all,
            # so an id cannot be probed for existence.
            raise NotFound(f"no receipt {rid} here (log {log_id})")
        signed = SignedReceipt.from_bytes(stored.body)
        owner = signed.receipt.client.spiffe_id if signed.receipt.client else ""
        model = signed.receipt.model.name if signed.receipt.model else ""
        gw.authorize(
            request.state.identity, "read_receipt", ResourceFacts("Receipt", rid, owner, model)
        )
        body = signed.to_dict()
        assert holder is not None
        body["inclusion_proof"] = holder.proof(stored.index)  # None while pending
        # Late evidence never changes the receipt; its final status is derived from it.
        late = gw.receipts.late_evidence(rid)
        body["late_evidence"] = late
        body["final_status"] = final_status(signed.receipt.extensions, late)
        return JSONResponse(body)

    async def admin_nodes(request: Request) -> Response:
        gw.authorize(request.state.identity, "admin_nodes", ResourceFacts("Gateway"))
        return JSONResponse({"nodes": node_listing(gw.router)})

    async def admin_release_node(request: Request) -> Response:
        gw.authorize(request.state.identity, "admin_release_node", ResourceFacts("Gateway"))
        rep = gw.router.reputation
        name = request.path_params["name"]
        if rep is None:
            raise NotFound("this gateway keeps no reputation records")
        try:
            ev = await rep.release(name, request.state.identity.spiffe_id)
        except KeyError as exc:
            raise NotFound(f"no node {name!r}") from exc
        except LookupError as exc:
            raise BadRequest(str(exc)) from exc
        log.warning("AUDIT release %s by %s", name, request.state.identity.spiffe_id)
        node = gw.router.nodes.get(name)
        still = node is not None and rep.quarantined(node.config)
        return JSONResponse(
            {"released": ev.name, "at": ev.at, "still_quarantined_by_provider": still}
        )

    async def admin_policy(request: Request) -> Response:
        gw.authorize(request.state.identity, "admin_reload", ResourceFacts("Gateway"))
        return JSONResponse(_policy_status(gw))

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    routes: list[tuple[str, Handler, list[str], str]] = [
        ("/v2/health/live", live, ["GET"], "live"),
        ("/v2/health/ready", ready, ["GET"], "ready"),
        ("/v2", server_metadata, ["GET"], "server_metadata"),
        # Before `model`, which would otherwise take "stats" for a model name.
        ("/v2/models/stats", model_stats, ["GET"], "model_stats"),
        (model, model_metadata, ["GET"], "model_metadata"),
        (version, model_metadata, ["GET"], "model_metadata"),
        (model + "/ready", model_ready, ["GET"], "model_ready"),
        (version + "/ready", model_ready, ["GET"], "model_ready"),
        (model + "/stats", model_stats, ["GET"], "model_stats"),
        (version + "/stats", model_stats, ["GET"], "model_stats"),
        ("/v2/repository/index", repository_index, ["POST"], "repository_index"),
        ("/v2/receipts/{receipt_id}", read_receipt, ["GET"], "read_receipt"),
        ("/admin/revoke", admin_revoke, ["POST"], "admin_revoke"),
        ("/admin/reload", admin_reload, ["POST"], "admin_reload"),
        ("/admin/policy", admin_policy, ["GET"], "admin_policy"),
        ("/admin/nodes", admin_nodes, ["GET"], "admin_nodes"),
        ("/admin/nodes/{name}/release", admin_release_node, ["POST"], "admin_release_node"),
    ]
    # Triton extensions the gateway refuses by design, each with its own problem type
    # (unsupported-extension, 501) rather than a 404 that reads like a typo.
    routes += [
        (path, unsupported(what), list(methods), "unsupported_extension")
        for path, methods, what in UNSUPPORTED_EXTENSIONS
    ]
    # /infer first: Starlette tries routes in order, a regex each (~0.4 us), and no other
    # route matches a path ending in /infer (tests/test_app.py holds that), so the hot
    # path skips the 30-odd others.
    return [
        Route(path + "/infer", _inference(gw), methods=["POST"], name=f"infer:{path}/infer")
        for path in (model, version)
    ] + [
        Route(path, _authenticated(gw, name, handler), methods=methods, name=f"{name}:{path}")
        for path, handler, methods, name in routes
    ]


# What `GET /v2` answers. The gRPC front's ServerMetadata answers the same.
SERVER_NAME = "ztgate"
EXTENSIONS = ("binary_tensor_data", "statistics", "model_repository(index)")
_SHM = "{} shared memory: send tensors in the request body"
_CONTROL = "model control: the registry and the signed policy decide what is served"
# Triton's paths and methods for each, exactly (a typo under them is still a 404).
UNSUPPORTED_EXTENSIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    *(
        (f"/v2/{kind}sharedmemory{path}", (method,), _SHM.format(label))
        for kind, label in (("system", "system"), ("cuda", "CUDA"))
        for path, method in (
            ("/status", "GET"),
            ("/region/{region}/status", "GET"),
            ("/region/{region}/register", "POST"),
            ("/region/{region}/unregister", "POST"),
            ("/unregister", "POST"),
        )
    ),
    ("/v2/repository/models/{name}/load", ("POST",), _CONTROL),
    ("/v2/repository/models/{name}/unload", ("POST",), _CONTROL),
    ("/v2/trace/setting", ("GET", "POST"), "trace settings (the operator's)"),
    ("/v2/models/{name}/trace/setting", ("GET", "POST"), "trace settings (the operator's)"),
    ("/v2/logging", ("GET", "POST"), "logging settings (the operator's)"),
)


def accepted_coding(headers: Mapping[str, str]) -> str | None:
    """gzip or deflate, whichever the client's Accept-Encoding accepts first (q > 0)."""
    raw = headers.get("accept-encoding")
    if not raw:
        return None
    accepted: dict[str, float] = {}
    for part in raw.split(",")[:16]:
        token, _, param = part.partition(";")
        q = 1.0
        param = param.strip().lower()
        if param.startswith("q="):
            try:
                q = float(param[2:])
            except ValueError:
                q = 0.0
        accepted[token.strip().lower()] = q
    for coding in ("gzip", "deflate"):
        if accepted.get(coding, accepted.get("*", 0.0)) > 0:
            return coding
    return None


# Compress larger answers in a thread: zlib releases the GIL, and the event loop keeps
# serving other requests meanwhile.
_COMPRESS_INLINE_MAX = 256 * 1024


async def compressed(headers: Mapping[str, str], response: Response) -> Response:
    """A successful inference answer compressed as the client asked (Accept-Encoding:
    gzip or deflate, what tritonclient's `response_compression_algorithm` sends), as
    Triton does; `Inference-Header-Content-Length` still counts the uncompressed JSON.
    Problems stay uncompressed: tritonclient reads an error body without decompressing."""
    coding = accepted_coding(headers)
    if coding is None or response.status_code != 200 or "content-encoding" in response.headers:
        return response
    body = bytes(response.body)

    def pack() -> bytes:
        if coding == "gzip":
            return gzip.compress(body, compresslevel=6, mtime=0)
        return zlib.compress(body, 6)  # HTTP's "deflate" is the zlib format

    data = pack() if len(body) <= _COMPRESS_INLINE_MAX else await asyncio.to_thread(pack)
    out = {k: v for k, v in response.headers.items() if k != "content-length"}
    out.update({"content-encoding": coding, "vary": "accept-encoding"})
    return Response(data, status_code=response.status_code, headers=out)


def _policy_status(gw: Gateway) -> dict[str, Any]:
    stats = gw.policy.engine.stats()
    return {
        "origin": gw.policy.current.origin,
        "version": gw.policy.current.version,
        "hash": gw.policy.engine.source.hash,
        "rejected_reloads": gw.policy.rejected,
        "last_error": gw.policy.last_error,
        "cache_hit_rate": stats.hit_rate,
        "revocations": gw.revocations.version,
    }


def _revocation_target(body: bytes) -> tuple[str, str]:
    """(issuer, serial) from {"certificate": PEM} or {"issuer": ..., "serial": hex}."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise BadRequest("body must be JSON: {certificate} or {issuer, serial}") from exc
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    pem = doc.get("certificate")
    if isinstance(pem, str):
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise BadRequest("certificate is not a PEM X.509 certificate") from exc
        return cert.issuer.rfc4514_string(), format(cert.serial_number, "x")
    issuer, serial = doc.get("issuer"), doc.get("serial")
    if not isinstance(issuer, str) or not isinstance(serial, str) or not issuer:
        raise BadRequest("give certificate, or issuer (RFC 4514) and serial (hex)")
    try:
        value = int(serial, 16)
    except ValueError as exc:
        raise BadRequest("serial must be hexadecimal") from exc
    return issuer, format(value, "x")


def respond(gw: Gateway, answer: Answer) -> Response:
    """An answer as a KServe v2 response, with the verification and receipt facts."""
    outcome, receipt = answer.outcome, answer.receipt
    asked = answer.decided.asked
    params = answer.parameters()  # the same on the gRPC front
    resp = InferResponse(
        model_name=asked.entry.name,
        model_version=asked.entry.version,
        id=asked.request.id,
        outputs=outcome.outputs,
        parameters=params,
    )
    body, headers = encode_response(resp, binary_outputs(asked.request))
    headers["ztgate-request-id"] = answer.request_id
    if receipt is not None:
        headers["ztgate-receipt"] = receipt.summary
    gw.metrics.infer_latency(asked.entry.name, outcome.mode).observe(
        time.monotonic() - asked.incoming.started
    )
    return Response(body, headers=headers)


# --- errors, in one place ----------------------------------------------------------------
def as_problem(exc: Exception, where: str = "") -> Problem:
    """Any exception as the problem a client gets; one mapping for every route."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, StoreUnavailable):
        return state_unavailable(exc)
    if isinstance(exc, TreeCorrupt):
        log.error("receipt log damaged: %s (ReceiptLog.verify_stored finds every bad hash)", exc)
        return LogUnavailable("the receipt log cannot serve this", retry_after=5)
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFound("no such route")
        if exc.status_code == 405:
            # Starlette's exception carries `Allow`, which a 405 must send (RFC 9110 15.5.6).
            return MethodNotAllowed("method not allowed on this route", headers=exc.headers)
        return BadRequest(str(exc.detail))
    log.exception("bug on %s", where or "a request", exc_info=exc)
    return Internal()


async def _problem(request: Request, exc: Exception) -> Response:
    p = as_problem(exc, request.url.path)
    # Where the request got an id (an authenticated route), the problem names it.
    request_id = getattr(request.state, "request_id", None)
    if isinstance(request_id, str):
        p.extra.setdefault("request_id", request_id)
    return problem_response(p)


def _job_name(job: Job) -> str:
    return str(getattr(job, "__qualname__", None) or getattr(job, "__name__", None) or job)


def build_api(gw: Gateway) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        jobs: list[tuple[str, Job]] = [(_job_name(j), j) for j in gw.background]
        if gw.receipts is not None:
            gw.receipts.start()
            jobs.append(("receipts", gw.receipts.run))
        queue.start()
        jobs.append(("jobs", queue.run))
        jobs.append(("health", gw.router.run_health))
        jobs.append(("state", gw.watch_state))
        gw.policy_changed()
        await gw.record("policy_load", gw.policy.engine.source.hash.encode())
        # Before serving, so readiness is true from the first probe on; it also announces
        # this replica's receipt logs (again whenever the store comes back).
        await gw.check_state()
        failures = gw.metrics.background_failures
        tasks: list[asyncio.Task[None]] = [
            asyncio.create_task(supervise(name, j, stop, gw.down, failures)) for name, j in jobs
        ]
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=5)
            await queue.close()
            await gw.router.close()
            await gw.store.close()
            gw.revocations.close()
            gw.decode_pool.close()
            if gw.receipts is not None:
                await gw.receipts.close()
            # The decision lines of this gateway's last requests, off the loop and bounded.
            await asyncio.to_thread(flush_decisions, EXIT_FLUSH_S)

    queue = gw.jobs = JobService(gw)  # the jobs API (gateway/jobs/): submit, then poll
    routes: list[BaseRoute] = list(api_routes(gw))
    routes += [
        Route(path, _authenticated(gw, name, handler), methods=methods, name=f"{name}:{path}")
        for path, handler, methods, name in job_routes(queue)
    ]
    routes += generate_routes(gw)  # generative models: generate, OpenAI (gateway/generate/)
    if gw.receipts is not None:
        receipts = gw.receipts
        # Any verified caller may read the logs (hashes only); nobody without an identity.
        for r in log_routes(receipts.logs).routes:
            assert isinstance(r, Route)
            handler = _redirect_foreign_logs(gw, r.endpoint)
            routes.append(
                Route(r.path, _authenticated(gw, "log", handler), methods=r.methods, name=r.name)
            )
    app = Starlette(
        routes=routes,
        exception_handlers={Exception: _problem, HTTPException: _problem},
        lifespan=lifespan,
    )
    queue.app = app  # jobs run through this very app (gateway/jobs/runner.py)
    return app


def build_admin(gw: Gateway) -> Starlette:
    """Probes and metrics for the orchestrator: no client certificate (kubelets send none)."""

    async def live(_: Request) -> Response:
        return Response(status_code=200)

    async def ready(_: Request) -> Response:
        return Response(status_code=200 if gw.ready() else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/v2/health/live", live),
            Route("/v2/health/ready", ready),
            Route("/healthz", live),
            Route("/readyz", ready),
            Route("/metrics", metrics),
        ],
        exception_handlers={Exception: _problem, HTTPException: _problem},
    )
