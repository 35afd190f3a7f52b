"""The request path, as one pipeline of typed stages:

    identity -> admission -> pre-policy -> decode -> nonce -> policy -> mode -> rate limit
             -> route -> verify -> receipt          (a denial receipt when a stage refuses)

Each stage is a plain object built from what it needs and called with the typed values
the earlier stages made (`gateway.pipeline.context`); a stage ends the request by raising
a `Problem`. `Pipeline` is the one place that runs them in order, for every front: the
HTTP app hands it an `Incoming` and turns the `Answer` into bytes. Each stage has a unit
test built without the app (tests/test_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.pipeline.admission import (
    STATE_RETRY_AFTER_S,
    AdmissionStage,
    Concurrency,
    IdentityStage,
    PrePolicyStage,
    state_unavailable,
)
from gateway.pipeline.catalog import Catalog
from gateway.pipeline.context import (
    Answer,
    Asked,
    Caller,
    Decided,
    Incoming,
    body_of,
    new_request_id,
)
from gateway.pipeline.decide import ModeStage, PolicyStage, RateLimitStage, log_decision
from gateway.pipeline.decode import DEADLINE_HEADER, NONCE_HEADER, DecodeStage, NonceStage
from gateway.pipeline.execute import (
    RECEIPT_HEADER,
    DenialStage,
    ReceiptStage,
    RouteStage,
    VerifyStage,
    client_ref,
)
from gateway.protocol.problems import Problem, StateUnavailable
from gateway.registry import ModelEntry
from gateway.state import StoreUnavailable
from gateway.stats import InferenceStats
from gateway.telemetry import Telemetry, note, problem_slug

__all__ = [
    "DEADLINE_HEADER",
    "NONCE_HEADER",
    "RECEIPT_HEADER",
    "STATE_RETRY_AFTER_S",
    "AdmissionStage",
    "Answer",
    "Asked",
    "Caller",
    "Catalog",
    "Concurrency",
    "Decided",
    "Decode",
    "DecodeStage",
    "DenialStage",
    "IdentityStage",
    "Incoming",
    "ModeStage",
    "NonceStage",
    "Pipeline",
    "PolicyStage",
    "PrePolicyStage",
    "RateLimitStage",
    "ReceiptStage",
    "RouteStage",
    "VerifyStage",
    "body_of",
    "client_ref",
    "log_decision",
    "new_request_id",
    "state_unavailable",
]

R = TypeVar("R")
# Incoming -> Asked: the decode stage, or a front's own decoding of an already-parsed request.
Decode = Callable[[Incoming, Caller, ModelEntry], Awaitable[Asked]]


def _no_op(_: BaseException) -> None:
    return None


class Pipeline:
    def __init__(
        self,
        *,
        catalog: Catalog,
        identity: IdentityStage,
        admission: AdmissionStage,
        pre_policy: PrePolicyStage,
        decode: DecodeStage,
        nonce: NonceStage,
        policy: PolicyStage,
        mode: ModeStage,
        rate: RateLimitStage,
        route: RouteStage,
        verify: VerifyStage,
        receipt: ReceiptStage | None,
        denial: DenialStage | None,
        on_state_lost: Callable[[BaseException], None] = _no_op,
        stats: InferenceStats | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.catalog = catalog
        self.identity = identity
        self.admission = admission
        self.pre_policy = pre_policy
        self.decode = decode
        self.nonce = nonce
        self.policy = policy
        self.mode = mode
        self.rate = rate
        self.route = route
        self.verify = verify
        self.receipt = receipt
        self.denial = denial
        self.on_state_lost = on_state_lost
        # Per-model statistics (Triton's extension), fed by `infer` and the stage marks.
        self.stats = stats if stats is not None else InferenceStats(catalog)
        # Each stage call below is timed (ztgate_stage_duration_seconds) and, with tracing
        # on, a span (gateway/telemetry.py says what a span may carry).
        self.telemetry = telemetry or Telemetry()

    async def authenticated(
        self,
        incoming: Incoming,
        handler: Callable[[Caller], Awaitable[R]],
        route: str = "call",
        named: Callable[[], str | None] | None = None,
    ) -> R:
        """Identity and admission, then `handler` inside the caller's concurrency slot, all
        under the request's root span (the client's `traceparent` its parent). `named`
        gives the model a body named (routes whose path names none, such as /v1/*), once
        the handler found it visible to the caller: a denial receipt then names it."""
        with self.telemetry.request(incoming.request_id, route, incoming.headers):
            return await self._authenticated(
                incoming, handler, stale_ok=route == "infer", named=named
            )

    async def _authenticated(
        self,
        incoming: Incoming,
        handler: Callable[[Caller], Awaitable[R]],
        stale_ok: bool = False,
        named: Callable[[], str | None] | None = None,
    ) -> R:
        """Identity and admission, then `handler` inside the caller's concurrency slot.

        Every route with a caller goes through here. A refusal leaves as the `Problem`,
        naming the request id, with a denial receipt where the type is receipted and the
        caller is known (identity failures have no caller to receipt)."""
        caller: Caller | None = None
        stage = self.telemetry.stage
        try:
            try:
                with stage("identity"):
                    caller = self.identity(incoming.scope, stale_ok=stale_ok)
                with stage("admission"):
                    slot = await self.admission.enter(caller)
                try:
                    return await handler(caller)
                finally:
                    self.admission.leave(slot)
            except StoreUnavailable as exc:
                raise state_unavailable(exc) from exc
        except Problem as p:
            p.extra.setdefault("request_id", incoming.request_id)
            if isinstance(p, StateUnavailable) and isinstance(p.__cause__, StoreUnavailable):
                self.on_state_lost(p.__cause__)
            if p.receipted and caller is not None and self.denial is not None:
                model = incoming.model or (named() if named is not None else None)
                entry = self.catalog.known(model)
                with stage("denial_receipt", problem_type=problem_slug(p)):
                    await self.denial(caller, entry, p, incoming.request_id)
            raise

    async def infer(
        self, incoming: Incoming, respond: Callable[[Answer], R], decode: Decode | None = None
    ) -> R:
        """One inference, end to end; `respond` builds the reply inside the caller's slot.
        `decode` stands in for the decode stage where a front has parsed the request
        itself (the gRPC front's protobuf): the same limits and signature checks."""

        async def run(caller: Caller) -> R:
            with self.stats.infer(incoming) as timing:
                timing.answer = await self.run_infer(incoming, caller, decode)
                return respond(timing.answer)

        return await self.authenticated(incoming, run, route="infer")

    async def run_infer(
        self, incoming: Incoming, caller: Caller, decode: Decode | None = None
    ) -> Answer:
        """The stages after admission, in order."""
        if incoming.model is None:
            raise ValueError("an inference names its model")
        stage = self.telemetry.stage
        entry = self.catalog.entry(incoming.model, incoming.version)
        note(model=entry.name)
        with stage("pre_policy", model=entry.name):
            self.pre_policy(caller, entry)
        with stage("decode", model=entry.name):
            asked = await (decode or self.decode)(incoming, caller, entry)
        with stage("nonce"):
            await self.nonce(asked)
        self.stats.mark("input")
        return await self.answer(asked)

    async def answer(self, asked: Asked) -> Answer:
        """From a decoded request on: policy, mode, rate, route, verify, receipt."""
        stage = self.telemetry.stage
        with stage("policy", model=asked.entry.name) as s:
            decision = self.policy(asked)
            s.set(decision_id=decision.id)
        try:
            with stage("mode", decision_id=decision.id) as s:
                decided = self.mode(asked, decision)
                s.set(mode=decided.mode)
            note(mode=decided.mode)
            with stage("rate_limit"):
                await self.rate(decided)
            with stage("route", mode=decided.mode):
                self.route(decided)
            self.stats.mark("infer")
            with stage("verify", model=asked.entry.name, mode=decided.mode) as s:
                outcome = await self.verify(decided)
                s.set(nodes=",".join(outcome.nodes), attempts=outcome.attempts)
            self.stats.mark("output")
            with stage("receipt"):
                receipt = None
                if self.receipt is not None:
                    # A @proof obligation may change what the client is shown (docs/zk.md).
                    outcome, receipt = await self.receipt.answer(decided, outcome)
        except Problem as p:
            p.extra.setdefault("decision_id", decision.id)
            raise
        return Answer(decided, outcome, receipt)
