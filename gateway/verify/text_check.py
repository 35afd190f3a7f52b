"""Spot checks for generated text: one teacher-forced pass checks every token of an answer.

After a node has streamed an answer, a node of another signed provider, among those the
same policy decision allowed, scores prompt + answer in one forward pass on its scoring
model (`gateway.routing.streaming.score_answer`) and judges each generated token
(`first_rejected`, under the model's `TextRule`):

* greedy (temperature 0): the token must be the checker's argmax, or within `tie_margin`
  logits of it. The margin absorbs honest float differences (thread counts, hardware);
  measured in docs/reputation.md, "Text".
* sampled: the token's log-probability under the checker, at the generation's
  temperature, must be at least `min_logprob` (alone this catches only tokens the model
  would almost never emit), and the gateway's seed is replayed: the seed's uniform draw
  for that token (`seed_draws`) must fall in the token's interval of the checker's
  distribution (`Scores.cdf_low`/`cdf_high`), which also catches a node that sampled with
  its own seed. The replay holds for nodes running gateway/node/generate_model.py.tmpl's
  sampler (numpy's Generator.choice); others get the floor only.

The two-party rule as for tensors (gateway/verify/spotcheck.py): a checker that rejects
the answer is evidence only once a third provider's pass rejects it too; a third that
accepts it convicts the checker instead; no third, or no verdict, charges nobody. The
verdict is logged as late evidence about the answer's (closing) receipt through the same
`RecordFn` as tensor spot checks. Off the request path: `offer` only enqueues into a
bounded queue (full: dropped, counted, logged as ``check-missing``).

Nothing here logs or records token values: reasons name positions and counts only.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.job import NodeFilter
from gateway.protocol.problems import Problem
from gateway.receipts.late import EvidenceLog, record_late_evidence
from gateway.routing.node_client import Scores
from gateway.routing.router import Router
from gateway.routing.streaming import GenerateCall, score_answer
from gateway.verify.spotcheck import RecordFn

log = logging.getLogger(__name__)

KIND = "text_spot_check"  # late evidence `kind` (tensor spot checks use "spot_check")


def recorder(receipts: EvidenceLog | None) -> RecordFn:
    """The `record` for `TextChecks`: each verdict becomes a signed late-evidence document
    (gateway/receipts/late.py, the same as tensor spot checks', kind `KIND`) logged as a
    ``late_evidence`` leaf about the receipt."""

    async def record(receipt_id: str, verdict: str, nodes: tuple[str, ...], why: str) -> None:
        if receipts is not None:
            await record_late_evidence(
                receipts, receipt_id=receipt_id, verdict=verdict, kind=KIND, nodes=nodes, reason=why
            )

    return record


@dataclass(frozen=True)
class TextRule:
    """What a checker accepts for one model (docs/reputation.md, "Text")."""

    tie_margin: float  # logits: a greedy token this close to the checker's argmax passes
    min_logprob: float  # a sampled token needs at least this log-probability
    # A sampled token's seeded draw may fall this far outside its interval (float noise).
    draw_tolerance: float = 1e-5


# The shipped tiny GPT's rule (docs/reputation.md, "Text"). Tie margin: honest nodes with 1
# and 2 onnxruntime threads never needed it in 500 answers (largest gap 0.0); 0.05 logits
# leaves room for other hardware (a GPU's reordered sums and TF32 matmuls move logits by
# ~1e-3..1e-2 on a model this size), while a lying token is typically logits off. Floor:
# this model is flat at temperature 1 (its least likely byte has ~3e-6), so the floor is
# set by the false rejections it may cause: at 1e-6 the probability mass below it is
# 1.5e-5 per sampled token on average (at most 7e-5) at temperature 1, less when cooler.
DEFAULT_RULE = TextRule(tie_margin=0.05, min_logprob=math.log(1e-6))


def seed_draws(seed: int, count: int) -> list[float]:
    """The uniform draws a node sampling with `seed` makes for `count` tokens: one per
    token, as numpy's Generator.choice draws them (gateway/node/generate_model.py.tmpl)."""
    rng = np.random.default_rng(seed)
    return [float(rng.random()) for _ in range(count)]


def first_rejected(
    answer: Sequence[int],
    scores: Scores,
    temperature: float,
    rule: TextRule,
    draws: Sequence[float] | None = None,
) -> int | None:
    """The position of the first answer token the checker rejects, or None. Sampled
    tokens: under the floor, or (with the gateway seed's `draws`) a draw outside the
    token's interval of the checker's distribution."""
    if len(scores.argmax) != len(answer):
        raise ValueError("scores and answer differ in length")
    replay = draws is not None and len(scores.cdf_low) == len(answer) == len(draws)
    for i, token in enumerate(answer):
        if temperature == 0.0:
            if token != scores.argmax[i] and scores.gap[i] > rule.tie_margin:
                return i
            continue
        if scores.logprob[i] < rule.min_logprob:
            return i
        if replay:
            assert draws is not None
            tol = rule.draw_tolerance
            if not scores.cdf_low[i] - tol <= draws[i] < scores.cdf_high[i] + tol:
                return i
    return None


@dataclass(frozen=True)
class _Item:
    call: GenerateCall
    answer: tuple[int, ...]
    node: str
    only: NodeFilter | None
    receipt_id: str | None


class TextChecks:
    """The bounded queue of text spot checks and the workers that run them."""

    def __init__(
        self,
        router: Router,
        *,
        rules: dict[str, TextRule] | None = None,
        max_queue: int = 256,
        workers: int = 2,
        timeout_s: float = 10.0,
        record: RecordFn | None = None,
    ) -> None:
        self.router = router
        self.rules = dict(rules or {})
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self.workers = workers
        self.timeout_s = timeout_s
        self.record = record
        # scheduled, dropped, skipped, confirmed, contradicted, disputed, failed;
        # tie-accepted (tokens, not checks)
        self.counts: Counter[str] = Counter()
        self.max_tie_gap = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def rule(self, model: str) -> TextRule:
        return self.rules.get(model, DEFAULT_RULE)

    # --- on the request path: O(1), never awaits a node ---------------------------------
    def offer(
        self,
        call: GenerateCall,
        answer: Sequence[int],
        node: str,
        only: NodeFilter | None,
        receipt_id: str | None,
    ) -> bool:
        """Queue a check of `answer` (the token ids `node` sent for `call`, the end token
        excluded); False if the queue was full (the check is then logged as missing)."""
        self.counts["scheduled"] += 1
        try:
            self.queue.put_nowait(_Item(call, tuple(answer), node, only, receipt_id))
        except asyncio.QueueFull:
            self.counts["dropped"] += 1
            log.warning("text-check queue full: a check was dropped")
            if self.record is not None and receipt_id is not None:
                task = asyncio.get_running_loop().create_task(
                    self._log(receipt_id, "check-missing", (), "dropped: the queue was full")
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return False
        return True

    async def _log(self, receipt_id: str, verdict: str, nodes: tuple[str, ...], why: str) -> None:
        if self.record is None:
            return
        try:
            await self.record(receipt_id, verdict, nodes, why)
        except Exception:  # the verdict stands in the reputation record either way
            log.exception("could not log late evidence about %s", receipt_id)

    # --- off the request path -----------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Background job: `workers` tasks drain the queue until `stop`."""

        async def worker() -> None:
            while True:
                item = await self.queue.get()
                try:
                    verdict, nodes, why = await self.check(
                        item.call, item.answer, item.node, item.only
                    )
                    if item.receipt_id is not None:
                        await self._log(item.receipt_id, verdict, nodes, why)
                except Exception:
                    log.exception("text check failed")
                finally:
                    self.queue.task_done()

        tasks = [asyncio.create_task(worker()) for _ in range(self.workers)]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every check offered so far has run (tests, benchmarks)."""
        await self.queue.join()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _judge(
        self,
        call: GenerateCall,
        answer: tuple[int, ...],
        not_providers: set[str],
        only: NodeFilter | None,
    ) -> tuple[str, int | None] | None:
        """(checker, first rejected position or None) from a node of none of
        `not_providers`, or None if no such node could score it."""
        try:
            name, scores = await score_answer(
                self.router,
                call.model,
                call.prompt_ids + answer,
                len(answer),
                call.temperature,
                only=lambda n: n.provider not in not_providers and (only is None or only(n)),
                timeout_s=self.timeout_s,
                top_p=call.top_p,
                version=call.version,
            )
        except Problem:
            return None
        draws = seed_draws(call.seed, len(answer)) if call.temperature > 0 else None
        try:
            rule = self.rule(call.model)
            rejected = first_rejected(answer, scores, call.temperature, rule, draws)
        except ValueError:
            return None
        if call.temperature == 0.0:
            self._watch_ties(answer, scores, len(answer) if rejected is None else rejected)
        return name, rejected

    def _watch_ties(self, answer: tuple[int, ...], scores: Scores, upto: int) -> None:
        """Tokens accepted only by the tie margin, and the largest such gap: how close honest
        nodes come to it (docs/reputation.md, "Text")."""
        for i in range(upto):
            if answer[i] != scores.argmax[i]:
                self.counts["tie-accepted"] += 1
                self.max_tie_gap = max(self.max_tie_gap, scores.gap[i])

    def _provider(self, node: str) -> str | None:
        state = self.router.nodes.get(node)
        return None if state is None else state.config.provider

    async def check(
        self,
        call: GenerateCall,
        answer: tuple[int, ...],
        node: str,
        only: NodeFilter | None,
    ) -> tuple[str, tuple[str, ...], str]:
        """Run one check now; returns (verdict, nodes involved, reason) and charges or
        confirms nodes by the two-party rule."""
        router = self.router
        provider = self._provider(node)
        if provider is None:
            return "check-missing", (node,), "the answering node is gone"
        if not answer:
            self.counts["skipped"] += 1
            return "check-missing", (node,), "an empty answer has no token to check"
        first = await self._judge(call, answer, {provider}, only)
        if first is None:
            self.counts["failed"] += 1
            return "check-missing", (node,), "no node of another provider could score it"
        checker, rejected = first
        if rejected is None:
            await router.confirm(node)
            await router.confirm(checker)
            self.counts["confirmed"] += 1
            return "confirmed", (node, checker), "a node of another provider accepts every token"
        checker_provider = self._provider(checker) or ""
        third = await self._judge(call, answer, {provider, checker_provider}, only)
        if third is not None and third[1] is not None:
            await router.charge(node, "contradicted")
            await router.confirm(checker)
            await router.confirm(third[0])
            self.counts["contradicted"] += 1
            return (
                "contradicted",
                (node, checker, third[0]),
                f"two other providers reject token {rejected} of {len(answer)}",
            )
        if third is not None:
            await router.charge(checker, "contradicted")  # the checker lied
            await router.confirm(node)
            await router.confirm(third[0])
            self.counts["confirmed"] += 1
            return "confirmed", (node, third[0]), "a tiebreak accepts every token"
        router.unresolved("spot-check-text", [node, checker], f"text check of {call.model}")
        for name in (node, checker):
            await router.judge(name, "disputed")
        self.counts["disputed"] += 1
        return "check-missing", (node, checker), "an unresolved disagreement (nobody charged)"


async def settle_divergence(
    router: Router,
    call: GenerateCall,
    agreed: Sequence[int],
    proposals: dict[str, int | None],
    only: NodeFilter | None,
    *,
    rule: TextRule = DEFAULT_RULE,
    timeout_s: float = 10.0,
) -> tuple[str, ...]:
    """After a redundant stream diverged: a node of a third provider scores each node's
    token at the divergence (`proposals`: node -> token, None for an early end; greedy
    calls only) after the `agreed` tokens; a node whose token it rejects while it accepts
    another node's is charged. Returns the nodes charged (none when it cannot tell)."""
    if call.temperature != 0.0:
        return ()
    providers = {router.nodes[n].config.provider for n in proposals if n in router.nodes}
    verdicts: dict[str, bool] = {}
    for name, token in proposals.items():
        if token is None:
            continue
        try:
            _, scores = await score_answer(
                router,
                call.model,
                call.prompt_ids + tuple(agreed) + (token,),
                1,
                0.0,
                only=lambda n: n.provider not in providers and (only is None or only(n)),
                timeout_s=timeout_s,
                version=call.version,
            )
        except Problem:
            return ()
        verdicts[name] = first_rejected((token,), scores, 0.0, rule) is None
    if not any(verdicts.values()):
        return ()
    guilty = tuple(n for n, ok in verdicts.items() if not ok)
    for name in guilty:
        await router.charge(name, "outvoted")
    return guilty
