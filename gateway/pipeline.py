"""The request pipeline, each stage a plain object:

    identity -> admission limit -> policy -> mode -> rate limit -> route -> verify

A stage is `async def __call__(x: Exchange) -> None`: it reads what earlier stages put on
the exchange, adds its own part, or ends the request by raising a `Problem`. Each can be
built and tested alone with a hand-made Exchange.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.config import NodeConfig
from gateway.identity import Identity, IdentityResolver
from gateway.policy.engine import InferDecision, decision_record
from gateway.policy.facts import IdentityFacts, InferContext, Rate
from gateway.policy.live import LivePolicy
from gateway.protocol.problems import (
    BadRequest,
    Forbidden,
    NoHealthyNode,
    Problem,
    RateLimited,
    StateUnavailable,
    Unauthenticated,
)
from gateway.protocol.tensors import InferRequest
from gateway.receipts.issue import Issued
from gateway.receipts.log import LogError, LogFrozen
from gateway.receipts.model import (
    ClientRef,
    ModelRef,
    PolicyRef,
    VerificationRef,
    ext_value,
)
from gateway.receipts.service import ReceiptService
from gateway.registry import ModelEntry
from gateway.revocation import Revocations
from gateway.routing.router import Router
from gateway.state import StateStore, StoreUnavailable
from gateway.verify import MODES, Outcome, Verifier

log = logging.getLogger(__name__)
decisions = logging.getLogger("ztgate.decisions")

# Retry-After for refusals while the shared store is unreachable: about one readiness
# probe (the gateway re-checks the store every second), so a client that honours it comes
# back once the store may be answering again.
STATE_RETRY_AFTER_S = 2


def new_request_id() -> str:
    """The gateway's own id for a request: what receipts, problems and logs carry. Never the
    client's `ztgate-request-id` header, which is unbounded client text (a signed receipt
    must not grow with what a client sends)."""
    return uuid.uuid4().hex


# Client text that reaches Cedar (and the decision log) is bounded: a purpose is a short
# label that policies compare with literals, never free text.
MAX_PURPOSE = 64
BAD_PURPOSE = f"ztgate.purpose must be a string of at most {MAX_PURPOSE} printable ASCII characters"

# Fixed, so a refusal never echoes the value (which may be megabytes) back or into a log.
UNKNOWN_MODE = f"unknown verification mode; ztgate.verification must be one of {', '.join(MODES)}"


@dataclass
class Exchange:
    """One request as it moves through the stages."""

    scope: Mapping[str, Any]
    deadline: float  # time.monotonic()
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    client_deadline: bool = False  # the client set its own deadline: modes keep it
    entry: ModelEntry | None = None
    request: InferRequest | None = None
    payload_bytes: int = 0
    identity: Identity | None = None
    facts: IdentityFacts | None = None  # the identity as policy sees it, made once
    decision: InferDecision | None = None
    mode: str = "none"
    outcome: Outcome | None = None
    receipt: Issued | None = None

    def node_allowed(self, node: NodeConfig) -> bool:
        """Policy's verdict for this node in the chosen mode (deny until policy has run)."""
        return self.decision is not None and self.decision.node_allowed(self.mode, node.name)


class Stage(Protocol):
    async def __call__(self, x: Exchange) -> None: ...


class IdentityStage:
    """The verified certificate, not expired, not revoked: checked on every request."""

    def __init__(self, resolver: IdentityResolver, revocations: Revocations) -> None:
        self.resolver = resolver
        self.revocations = revocations

    async def __call__(self, x: Exchange) -> None:
        identity = self.resolver.resolve(dict(x.scope))
        if self.revocations.revoked(identity.issuer, identity.serial):
            raise Unauthenticated("client certificate has been revoked")
        if self.revocations.stale():
            # Fail closed: the last-known set may be missing a revocation by now. The
            # nodes are fine, so this is the shared store's problem type.
            raise StateUnavailable(
                "the revocation list could not be refreshed within its staleness budget",
                retry_after=5,
            )
        x.identity = identity


class RateLimitStage:
    """A token bucket in the shared store; `rate_of` says which bucket and how fast."""

    def __init__(self, store: StateStore, name: str, fixed: Rate | None = None) -> None:
        self.store = store
        self.name = name
        self.fixed = fixed

    def bucket(self, x: Exchange) -> tuple[str, Rate] | None:
        assert x.identity is not None
        if self.fixed is not None:  # the admission limit: per identity, before policy
            return f"{self.name}:{x.identity.spiffe_id}", self.fixed
        assert x.decision is not None and x.entry is not None
        rate = x.decision.rate
        if rate is None:
            return None
        return (
            f"{self.name}:{x.identity.spiffe_id}:{x.entry.name}:{rate.count}/{rate.per_seconds}",
            rate,
        )

    async def __call__(self, x: Exchange) -> None:
        got = self.bucket(x)
        if got is None:
            return
        key, rate = got
        try:
            allowed, retry_after = await self.store.take_token(
                key, rate.count / rate.per_seconds, rate.count
            )
        except StoreUnavailable as exc:
            # Fail closed: an unlimited gateway is what the limit exists to prevent. The
            # detail is fixed text: `exc` names the store's address (logged, never sent),
            # and a stable detail lets identical refusals share one denial receipt.
            raise StateUnavailable(
                "the rate limit cannot be checked: shared state is unreachable",
                retry_after=STATE_RETRY_AFTER_S,
            ) from exc
        if not allowed:
            raise RateLimited(
                f"over the limit of {rate.count} requests per {rate.per_seconds}s",
                retry_after=max(retry_after, 0.001),
            )


class PolicyStage:
    """Cedar decides which modes and nodes this request may use; no permit, no call."""

    def __init__(self, policy: LivePolicy, router: Router, revocations: Revocations) -> None:
        self.policy = policy
        self.router = router
        self.revocations = revocations

    async def __call__(self, x: Exchange) -> None:
        assert x.identity is not None and x.entry is not None and x.request is not None
        batch = x.request.inputs[0].shape[0] if x.request.inputs[0].shape else 1
        purpose = x.request.parameters.get("ztgate.purpose", "")
        if not valid_purpose(purpose):
            raise BadRequest(BAD_PURPOSE)  # fixed text: the value is not echoed
        assert isinstance(purpose, str)
        ctx = InferContext(
            batch_size=batch,
            payload_bytes=x.payload_bytes,
            purpose=purpose,
            now=dt.datetime.now(dt.UTC),
        )
        nodes = [s.config.name for s in self.router.nodes.values() if s.config.serves(x.entry.name)]
        if not nodes:
            raise NoHealthyNode(f"no node serves {x.entry.name!r}", retry_after=5)
        x.facts = facts = IdentityFacts.from_identity(x.identity)
        decision = self.policy.engine.decide_infer(
            facts, x.entry.name, ctx, nodes, revocation_version=self.revocations.version
        )
        x.decision = decision
        if not decision.allowed:
            log_decision(decision, facts, x.entry.name, None)
            raise Forbidden(
                f"policy denies this request: {decision.reason}; no mode is allowed",
                extra={"allowed_modes": []},
            )


def valid_purpose(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) <= MAX_PURPOSE and all(" " <= c <= "~" for c in value)
    )


class ModeStage:
    """Chooses the verification mode: the client's ask if allowed, else the cheapest."""

    def __init__(
        self, verifiers: Mapping[str, Verifier], deadlines: Mapping[str, float] | None = None
    ) -> None:
        self.verifiers = verifiers
        # Slow modes (proving, MPC) get their own default deadline.
        self.deadlines = dict(deadlines or {})

    def _chose(self, x: Exchange, mode: str) -> None:
        x.mode = mode
        if not x.client_deadline and mode in self.deadlines:
            x.deadline = max(x.deadline, x.started + self.deadlines[mode])

    async def __call__(self, x: Exchange) -> None:
        assert x.decision is not None and x.request is not None and x.identity is not None
        allowed = [m for m in x.decision.modes if m in self.verifiers]
        asked = x.request.parameters.get("ztgate.verification")
        assert x.entry is not None and x.facts is not None
        facts = x.facts
        if asked is not None:
            if not isinstance(asked, str) or asked not in MODES:
                # A malformed request, not a policy refusal: 400, and no decision logged.
                raise BadRequest(UNKNOWN_MODE)
            self._chose(x, str(asked))
            log_decision(x.decision, facts, x.entry.name, x.mode)
            if asked not in allowed:
                # Which rules decided the mode asked for, and what would be allowed: what
                # a client needs to ask again (gateway text only: policy ids and modes).
                if asked in x.decision.modes:
                    why = f"{asked} is not offered by this gateway"
                else:
                    why = x.decision.for_mode(asked)[1]
                offer = ", ".join(allowed) if allowed else "none"
                raise Forbidden(
                    f"verification mode {asked!r} is not allowed for this request: {why}; "
                    f"allowed modes: {offer}",
                    extra={"allowed_modes": allowed},
                )
            return
        if not allowed:
            log_decision(x.decision, facts, x.entry.name, None)
            raise Forbidden("policy allows no verification mode this gateway offers")
        self._chose(x, allowed[0])
        log_decision(x.decision, facts, x.entry.name, x.mode)


class RouteStage:
    """Fails fast with 503 when no node may serve the request at all."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def __call__(self, x: Exchange) -> None:
        assert x.entry is not None
        if not self.router.candidates(x.entry.name, x.node_allowed):
            raise NoHealthyNode(
                f"no healthy node that policy allows can serve {x.entry.name!r} in mode "
                f"{x.mode!r} right now",
                retry_after=1,
            )


class VerifyStage:
    def __init__(self, verifiers: Mapping[str, Verifier], router: Router) -> None:
        self.verifiers = verifiers
        self.router = router

    async def __call__(self, x: Exchange) -> None:
        x.outcome = await self.verifiers[x.mode].run(x, self.router)


# Mode evidence that goes into the receipt: hashes and identities, never proofs or data.
RECEIPTED_EVIDENCE = frozenset(
    {
        "model_sha256",
        "vk_sha256",
        "settings_sha256",
        "srs_sha256",
        "dev_srs",
        "logrows",
        "dealer",
        "session",
        "providers",
    }
)


class ReceiptStage:
    """Signs and durably logs what was asked and answered; only then may the answer leave."""

    def __init__(self, service: ReceiptService) -> None:
        self.service = service

    async def __call__(self, x: Exchange) -> None:
        assert x.identity is not None and x.entry is not None and x.request is not None
        assert x.outcome is not None and x.decision is not None
        evidence = x.outcome.evidence
        try:
            x.receipt = await self.service.answer(
                client=client_ref(x.identity),
                model=ModelRef(x.entry.name, x.entry.version, x.entry.sha256),
                inputs=x.request.inputs,
                outputs=x.outcome.outputs,
                policy=PolicyRef(x.decision.policy_hash, x.decision.id),
                verification=VerificationRef(
                    x.outcome.mode,
                    x.outcome.status,
                    public_instances_sha256=evidence.get("instances_sha256"),
                    proof_sha256=evidence.get("proof_sha256"),
                ),
                nodes=x.outcome.nodes,
                request_id=x.request_id,
                extensions={
                    k: ext_value(v) for k, v in sorted(evidence.items()) if k in RECEIPTED_EVIDENCE
                },
            )
            proof = evidence.get("proof")
            material = evidence.get("verification_material")
            if isinstance(proof, str) and isinstance(material, dict):
                self.service.save_evidence(
                    x.receipt.receipt.receipt_id,
                    {"proof.json": proof.encode(), **{k: Path(v) for k, v in material.items()}},
                )
        except (LogError, LogFrozen, OSError) as exc:
            # Never an answer without a receipt.
            log.error("receipt log refused an answer's receipt: %s", exc)
            raise NoHealthyNode("the receipt log is unavailable", retry_after=5) from exc


def client_ref(identity: Identity) -> ClientRef:
    return ClientRef(identity.spiffe_id, identity.serial, identity.issuer)


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    async def __call__(self, x: Exchange) -> None:
        try:
            for stage in self.stages:
                await stage(x)
        except Problem as p:
            # Every problem names the request, and the policy decision once there is one,
            # so a client's report can be matched with the receipt and the decision log.
            p.extra.setdefault("request_id", x.request_id)
            if x.decision is not None:
                p.extra.setdefault("decision_id", x.decision.id)
            raise


def log_decision(
    decision: InferDecision, identity: IdentityFacts, model: str, mode: str | None
) -> None:
    """One JSON line per decision; never tensors or payloads."""
    if decisions.isEnabledFor(logging.INFO):
        decisions.info(json.dumps(decision_record(decision, identity, model, mode)))
