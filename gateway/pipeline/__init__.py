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
from gateway.state import StoreUnavailable

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
]

R = TypeVar("R")


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

    async def authenticated(
        self, incoming: Incoming, handler: Callable[[Caller], Awaitable[R]]
    ) -> R:
        """Identity and admission, then `handler` inside the caller's concurrency slot.

        Every route with a caller goes through here. A refusal leaves as the `Problem`,
        naming the request id, with a denial receipt where the type is receipted and the
        caller is known (identity failures have no caller to receipt)."""
        caller: Caller | None = None
        try:
            try:
                caller = self.identity(incoming.scope)
                async with self.admission(caller):
                    return await handler(caller)
            except StoreUnavailable as exc:
                # A store call no stage mapped (an admin action publishing to the store):
                # the store's problem type all the same, never its address.
                raise StateUnavailable(
                    "this action needs shared state, which is unreachable",
                    retry_after=STATE_RETRY_AFTER_S,
                ) from exc
        except Problem as p:
            p.extra.setdefault("request_id", incoming.request_id)
            if isinstance(p, StateUnavailable) and isinstance(p.__cause__, StoreUnavailable):
                self.on_state_lost(p.__cause__)
            if p.receipted and caller is not None and self.denial is not None:
                entry = self.catalog.known(incoming.model)
                await self.denial(caller, entry, p, incoming.request_id)
            raise

    async def infer(self, incoming: Incoming, respond: Callable[[Answer], R]) -> R:
        """One inference, end to end; `respond` builds the reply inside the caller's slot."""

        async def run(caller: Caller) -> R:
            return respond(await self.run_infer(incoming, caller))

        return await self.authenticated(incoming, run)

    async def run_infer(self, incoming: Incoming, caller: Caller) -> Answer:
        """The stages after admission, in order."""
        if incoming.model is None:
            raise ValueError("an inference names its model")
        entry = self.catalog.entry(incoming.model, incoming.version)
        self.pre_policy(caller, entry)
        asked = await self.decode(incoming, caller, entry)
        await self.nonce(asked)
        return await self.answer(asked)

    async def answer(self, asked: Asked) -> Answer:
        """From a decoded request on: policy, mode, rate, route, verify, receipt."""
        decision = self.policy(asked)
        try:
            decided = self.mode(asked, decision)
            await self.rate(decided)
            self.route(decided)
            outcome = await self.verify(decided)
            receipt = None if self.receipt is None else await self.receipt(decided, outcome)
        except Problem as p:
            p.extra.setdefault("decision_id", decision.id)
            raise
        return Answer(decided, outcome, receipt)
