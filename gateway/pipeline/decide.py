"""Policy over the decoded request, the mode chosen under it, and the permit's rate."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Collection, Mapping

from gateway.jobs.scope import job_of
from gateway.pipeline.admission import take_token
from gateway.pipeline.context import Asked, Decided
from gateway.pipeline.decision_log import WRITER, decisions, flush_decisions
from gateway.policy.engine import InferDecision
from gateway.policy.facts import IdentityFacts, InferContext
from gateway.policy.live import LivePolicy
from gateway.protocol.problems import BadRequest, Forbidden, NoHealthyNode, StateUnavailable
from gateway.revocation import Revocations
from gateway.routing.router import Router
from gateway.state import StateStore
from gateway.telemetry import PROCESS_METRICS
from gateway.verify import MODES, Verifier

__all__ = [
    "ModeStage",
    "PolicyStage",
    "RateLimitStage",
    "decision_id_of",
    "flush_decisions",
    "log_decision",
]

# The decision id comes from the request's one random draw (`Incoming.seed`) by a
# domain-separated hash: public, like the request id, and neither gives away the seed or
# what else is derived from it (the receipt's salt and nonce). A job's run is the
# exception: its seed is the same on every run (gateway/jobs/scope.py), while each run is
# a new decision with an id of its own, so it draws one.
_DECISION_ID = b"ztgate/decision-id/v1\n"

# Client text that reaches Cedar (and the decision log) is bounded: a purpose is a short
# label that policies compare with literals, never free text.
MAX_PURPOSE = 64
BAD_PURPOSE = f"ztgate.purpose must be a string of at most {MAX_PURPOSE} printable ASCII characters"

# Fixed, so a refusal never echoes the value (which may be megabytes) back or into a log.
UNKNOWN_MODE = f"unknown verification mode; ztgate.verification must be one of {', '.join(MODES)}"


def decision_id_of(seed: bytes) -> str:
    return hashlib.sha256(_DECISION_ID + seed).digest()[:16].hex()


def valid_purpose(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) <= MAX_PURPOSE and all(" " <= c <= "~" for c in value)
    )


class PolicyStage:
    """Cedar decides which modes and nodes this request may use; no permit, no call.

    A client that names a mode this gateway offers (`offered`) gets that mode decided
    alone; only when it is not allowed are all modes decided, for the refusal's list of
    allowed modes. Without `offered` every request decides every mode."""

    def __init__(
        self,
        policy: LivePolicy,
        router: Router,
        revocations: Revocations,
        offered: Collection[str] | None = None,
    ) -> None:
        self.policy = policy
        self.router = router
        self.revocations = revocations
        self.offered = offered

    def __call__(self, asked: Asked) -> InferDecision:
        request, entry = asked.request, asked.entry
        batch = request.inputs[0].shape[0] if request.inputs[0].shape else 1
        purpose = request.parameters.get("ztgate.purpose", "")
        if not valid_purpose(purpose):
            raise BadRequest(BAD_PURPOSE)  # fixed text: the value is not echoed
        assert isinstance(purpose, str)  # valid_purpose said so; for the type checker
        ctx = InferContext(
            batch_size=batch,
            payload_bytes=asked.payload_bytes,
            purpose=purpose,
            now=dt.datetime.now(dt.UTC),
        )
        nodes = [s.config.name for s in self.router.nodes.values() if s.config.serves(entry.name)]
        if not nodes:
            raise NoHealthyNode(f"no node serves {entry.name!r}", retry_after=5)
        mode = request.parameters.get("ztgate.verification")
        one = None
        if isinstance(mode, str) and mode in MODES and mode in (self.offered or ()):
            one = (mode,)
        decision = self._decide(asked, ctx, nodes, one)
        if one is not None and mode not in decision.modes:
            decision = self._decide(asked, ctx, nodes, None)
        if not decision.allowed and decision.revocation_stale_s is not None:
            log_decision(decision, asked.caller.facts, entry.name, None)
            raise StateUnavailable(
                "the revocation list could not be refreshed within its staleness "
                "budget, and policy keeps serving nothing for this request then",
                retry_after=5,
            )
        if not decision.allowed:
            log_decision(decision, asked.caller.facts, entry.name, None)
            raise Forbidden(
                f"policy denies this request: {decision.reason}; no mode is allowed",
                extra={"allowed_modes": [], "decision_id": decision.id},
            )
        return decision

    @staticmethod
    def _decision_id(asked: Asked) -> str | None:
        if job_of(asked.incoming.scope) is not None:
            return None  # the engine draws
        return decision_id_of(asked.incoming.seed)

    def _decide(
        self, asked: Asked, ctx: InferContext, nodes: list[str], modes: tuple[str, ...] | None
    ) -> InferDecision:
        engine = self.policy.engine
        decision = engine.decide_infer(
            asked.caller.facts,
            asked.entry.name,
            ctx,
            nodes,
            revocation_version=self.revocations.version,
            modes=modes,
            decision_id=self._decision_id(asked),
        )
        if decision.allowed and self.revocations.stale():
            # A cut-off edge: the last-known revocations may be missing one by now. Only
            # what @stale permits keep is served, and the receipt says how stale it was.
            decision = engine.past_staleness(decision, self.revocations.stale_for())
        return decision


class ModeStage:
    """Chooses the verification mode: the client's ask if allowed, else the cheapest."""

    def __init__(
        self, verifiers: Mapping[str, Verifier], deadlines: Mapping[str, float] | None = None
    ) -> None:
        self.verifiers = verifiers
        # Slow modes (proving, MPC) get their own default deadline.
        self.deadlines = dict(deadlines or {})

    def _chose(self, asked: Asked, decision: InferDecision, mode: str) -> Decided:
        deadline = asked.deadline
        if not asked.client_deadline and mode in self.deadlines:
            deadline = max(deadline, asked.incoming.started + self.deadlines[mode])
        return Decided(asked, decision, mode, deadline)

    def __call__(self, asked: Asked, decision: InferDecision) -> Decided:
        allowed = [m for m in decision.modes if m in self.verifiers]
        asked_mode = asked.request.parameters.get("ztgate.verification")
        facts, model = asked.caller.facts, asked.entry.name
        if asked_mode is not None:
            if not isinstance(asked_mode, str) or asked_mode not in MODES:
                # A malformed request, not a policy refusal: 400, and no decision logged.
                raise BadRequest(UNKNOWN_MODE)
            log_decision(decision, facts, model, asked_mode)
            if asked_mode not in allowed:
                # Which rules decided the mode asked for, and what would be allowed: what
                # a client needs to ask again (gateway text only: policy ids and modes).
                if asked_mode in decision.modes:
                    why = f"{asked_mode} is not offered by this gateway"
                else:
                    why = decision.for_mode(asked_mode)[1]
                offer = ", ".join(allowed) if allowed else "none"
                raise Forbidden(
                    f"verification mode {asked_mode!r} is not allowed for this request: {why}; "
                    f"allowed modes: {offer}",
                    extra={"allowed_modes": allowed},
                )
            return self._chose(asked, decision, asked_mode)
        if not allowed:
            log_decision(decision, facts, model, None)
            raise Forbidden(
                "policy allows no verification mode this gateway offers",
                extra={"allowed_modes": []},
            )
        log_decision(decision, facts, model, allowed[0])
        return self._chose(asked, decision, allowed[0])


class RateLimitStage:
    """The bucket the determining permits set (`@rate`), per identity and model."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def __call__(self, decided: Decided) -> None:
        rate = decided.decision.rate
        if rate is None:
            return
        spiffe = decided.asked.caller.identity.spiffe_id
        key = f"rate:{spiffe}:{decided.asked.entry.name}:{rate.count}/{rate.per_seconds}"
        await take_token(self.store, key, rate)


def log_decision(
    decision: InferDecision, identity: IdentityFacts, model: str, mode: str | None
) -> None:
    """One JSON line per decision; never tensors or payloads. A denial is counted by the
    policies that determined it (ztgate_policy_denials_total). The line is written off
    the request path (gateway.pipeline.decision_log): `flush_decisions()` to read it."""
    if mode is None and not decision.allowed:
        PROCESS_METRICS.denied(decision.determining)
    elif mode is not None and mode not in decision.modes:
        PROCESS_METRICS.denied(decision.for_mode(mode)[0])
    if decisions.isEnabledFor(logging.INFO):
        WRITER.put(decision, identity, model, mode)
