"""Verified text on the generate routes (issue 23; docs/reputation.md, "Text").

* mode redundant: the call runs on `REDUNDANT_PROVIDERS` nodes of distinct signed
  providers that the decision allows in mode redundant
  (`gateway.routing.streaming.open_agreed_generation`); the client gets a token only once
  every node sent it. A divergence ends the stream with finish reason "diverged" (an
  error event follows on the wire) and, when a node of a third allowed provider exists,
  `settle_divergence` asks it which side lied, off the request path.
* spot checks of mode none: a closed stream sampled at the answering node's rate (never
  below the decision's `@spot_check`; `SpotChecks.sample`, the tensor path's sampler) is
  offered to `TextChecks` with its closing receipt id, which then says
  ``spot_check = "scheduled"``; the verdict becomes late evidence about that receipt.

Neither logs or records a token: receipts commit to tokens (salted), verdicts name
positions and counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config import Generate
from gateway.policy.engine import InferDecision
from gateway.protocol.problems import UpstreamFailed
from gateway.receipts.model import ExtValue, VerificationRef
from gateway.routing.router import Router
from gateway.routing.streaming import AgreedGeneration, GenerateCall, open_agreed_generation
from gateway.verify.spotcheck import SpotChecks
from gateway.verify.text_check import TextChecks, settle_divergence

if TYPE_CHECKING:
    from gateway.generate.session import Stream
    from gateway.job import NodeFilter
    from gateway.receipts.issue import Issued

log = logging.getLogger(__name__)

REDUNDANT_PROVIDERS = 2  # k: each token needs this many distinct providers to agree
SCHEDULED = "scheduled"  # the closing receipt's `spot_check`, as on tensor receipts
WHOLE = ("stop", "length")  # finish reasons of an answer the node completed
FAILED = ("node-error", "diverged")  # finish reasons followed by an error event

# Settlements running after their stream closed: referenced until done (at most one per
# diverged stream, each bounded by TextChecks' timeout per scoring pass).
_SETTLING: set[asyncio.Task[None]] = set()


class AgreedText:
    """An agreed generation shaped as `Stream` reads a `Generation`: `node` is the first
    node, `peers` the others; `tokens()` yields agreed tokens only."""

    def __init__(self, agreed: AgreedGeneration) -> None:
        self.agreed = agreed
        self.node: str = agreed.nodes[0]
        self.peers: tuple[str, ...] = agreed.nodes[1:]

    @property
    def finish_reason(self) -> str | None:
        return self.agreed.finish_reason

    def tokens(self) -> AsyncGenerator[int, None]:
        return self.agreed.tokens()

    async def aclose(self) -> None:
        await self.agreed.aclose()


async def open_redundant(
    router: Router, call: GenerateCall, decision: InferDecision, cfg: Generate
) -> AgreedText:
    """Open `call` on k allowed nodes of k distinct providers; raises NoHealthyNode when
    fewer providers may serve it, UpstreamFailed when one failed before its first token."""
    agreed = await open_agreed_generation(
        router,
        call,
        REDUNDANT_PROVIDERS,
        lambda n: decision.node_allowed("redundant", n.name),
        first_token_timeout_s=cfg.first_token_timeout_s,
        token_timeout_s=cfg.token_timeout_s,
    )
    return AgreedText(agreed)


def closing(stream: Stream, reason: str) -> tuple[VerificationRef | None, dict[str, ExtValue]]:
    """The closing receipt's verification (None: mode none's) and extra extensions: where
    a redundant stream diverged, or that a mode-none answer is to be spot-checked."""
    gen = stream.generation
    if isinstance(gen, AgreedText):
        if reason == "diverged":
            at = gen.agreed.divergence
            return VerificationRef("redundant", "diverged"), {
                "divergence": -1 if at is None else at
            }
        return VerificationRef("redundant", "agreed" if reason in WHOLE else "incomplete"), {}
    spot = stream.service.text_spot
    if spot is not None and stream.call is not None:
        if spot.wanted(gen.node, stream.decision, reason, len(stream.sent)):
            return None, {"spot_check": SCHEDULED}
    return None, {}


def after_close(stream: Stream, issued: Issued | None, ext: dict[str, ExtValue]) -> None:
    """Off the request path: a scheduled check offered with the closing receipt's id, or
    a divergence put to a third provider."""
    spot = stream.service.text_spot
    call = stream.call
    if spot is None or call is None:
        return
    rid = issued.receipt.receipt_id if issued is not None else None
    gen = stream.generation
    if ext.get("spot_check") == SCHEDULED and not isinstance(gen, AgreedText):
        spot.offer(call, stream.sent, gen.node, stream.decision, rid)
    elif isinstance(gen, AgreedText) and gen.finish_reason == "diverged":
        spot.settle(call, gen, stream.sent, stream.decision)


def diverged(stream: Stream) -> UpstreamFailed:
    """The error event after a redundant stream diverged: the client has the agreed
    prefix only; which node lied is not known here (nobody is charged on a divergence
    alone), so the nodes are not named."""
    gen = stream.generation
    at = gen.agreed.divergence if isinstance(gen, AgreedText) else None
    return UpstreamFailed(
        f"the nodes' token streams diverged at token {at}: the answer stops at the tokens "
        "they agreed on; the closing receipt records the divergence",
        extra={"request_id": stream.request_id, "finish_reason": "diverged", "divergence": at},
    )


def view(stream: Stream) -> dict[str, object]:
    """The `ztgate` fields of the wire's first event naming the mode and its nodes."""
    if isinstance(stream.generation, AgreedText):
        nodes = [stream.generation.node, *stream.generation.peers]
        return {"verification": "redundant", "verification_status": "open", "nodes": nodes}
    return {"verification": "none", "verification_status": "unverified"}


def close_view(stream: Stream, reason: str) -> dict[str, object]:
    """The `ztgate` fields of the closing event a redundant stream adds: its result."""
    ref, ext = closing(stream, reason) if isinstance(stream.generation, AgreedText) else (None, {})
    if ref is None:
        return {}
    return {"verification": ref.mode, "verification_status": ref.result, **ext}


def sees(decision: InferDecision) -> NodeFilter:
    """Nodes the decision lets see this request, in any of its modes: a checker or a
    tiebreaker sees prompt and answer, nothing more than the decision already allowed
    (a forbid on a node, residency for one, holds in every mode)."""
    return lambda n: any(decision.node_allowed(m, n.name) for m in decision.modes)


@dataclass
class TextSpot:
    """What the generate routes need for verified text: the tensor path's sampler (rates,
    reputation, `@spot_check` floor) and the text check queue."""

    router: Router
    sampler: SpotChecks
    checks: TextChecks

    def wanted(self, node: str, decision: InferDecision, reason: str, sent: int) -> bool:
        """Whether this mode-none stream's answer is checked (a whole answer only)."""
        state = self.router.nodes.get(node)
        if state is None or sent == 0 or reason not in WHOLE:
            return False
        return self.sampler.sample(state.config, decision.spot_check)

    def offer(
        self,
        call: GenerateCall,
        answer: Sequence[int],
        node: str,
        decision: InferDecision,
        receipt_id: str | None,
    ) -> bool:
        return self.checks.offer(
            call,
            answer,
            node,
            sees(decision),
            receipt_id,
        )

    def settle(
        self,
        call: GenerateCall,
        generation: AgreedText,
        agreed: Sequence[int],
        decision: InferDecision,
    ) -> bool:
        """After a divergence: ask a node of a third provider the decision lets see this
        request which side lied, off the request path; False when no such node may serve
        the model now, or too many settlements are running already."""
        gen = generation.agreed
        providers = {
            self.router.nodes[n].config.provider for n in gen.nodes if n in self.router.nodes
        }
        only = sees(decision)
        third = self.router.candidates(call.model, only)
        if not any(s.config.provider not in providers for s in third):
            self.checks.counts["settle-no-third"] += 1
            return False
        if len(_SETTLING) >= self.checks.queue.maxsize:  # the text checks' own bound
            self.checks.counts["settle-dropped"] += 1
            return False
        proposals = dict(zip(gen.nodes, gen.proposals, strict=True))

        async def run() -> None:
            try:
                guilty = await settle_divergence(
                    self.router,
                    call,
                    tuple(agreed),
                    proposals,
                    only,
                    rule=self.checks.rule(call.model),
                    timeout_s=self.checks.timeout_s,
                )
                self.checks.counts["settled" if guilty else "unsettled"] += 1
            except Exception:
                log.exception("settling a divergence failed")

        task = asyncio.get_running_loop().create_task(run())
        _SETTLING.add(task)
        task.add_done_callback(_SETTLING.discard)
        return True


async def settled() -> None:
    """Wait for the settlements started so far (tests)."""
    if _SETTLING:
        await asyncio.gather(*_SETTLING, return_exceptions=True)
