"""Mode `redundant`: the same request on nodes of independent providers; answer only if they agree.

Two nodes from different providers run the request at once. If their outputs agree (floats
within a tolerance, everything else exactly), that is the answer, and each vouches for the
other. If they disagree, a node from a third provider (one the policy allows) breaks the
tie: the majority answer stands and the outvoted node is charged (so it is ejected if it
keeps lying). With no majority the request fails (502): the gateway never picks one of two
conflicting answers, and it charges nobody, since either side may be the liar; charging
both would let one liar get honest nodes ejected. That is an unresolved disagreement: an
alert (`Router.unresolved`: a metric and a log line, no request data).

This catches a lying node unless nodes of different providers collude; it does not prove
anything about the model, as `zk` does. A node's provider is the one the officer signed
(the router's NodeConfig is made by gateway.policy.live.signed_nodes, and its channel is
pinned to the signed certificate): gateway.toml cannot make two nodes of one provider
look independent.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from gateway.job import Job, Outcome
from gateway.protocol.problems import NoHealthyNode, UpstreamFailed
from gateway.protocol.tensors import Tensor

if TYPE_CHECKING:
    from gateway.config import NodeConfig
    from gateway.routing.router import Routed, Router


def agree(
    a: list[Tensor] | tuple[Tensor, ...],
    b: list[Tensor] | tuple[Tensor, ...],
    rtol: float,
    atol: float,
) -> bool:
    by_name = {t.name: t for t in b}
    if len(a) != len(b) or set(by_name) != {t.name for t in a}:
        return False
    for t in a:
        u = by_name[t.name]
        if t.datatype != u.datatype or t.shape != u.shape:
            return False
        if t.data.dtype.kind == "f":
            if not np.allclose(t.data, u.data, rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif not np.array_equal(t.data, u.data):
            return False
    return True


class RedundantVerification:
    mode = "redundant"

    def __init__(self, max_output_bytes: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        self.max_output_bytes = max_output_bytes
        self.rtol = rtol
        self.atol = atol

    async def _on(self, job: Job, router: Router, node: NodeConfig) -> Routed | None:
        try:
            return await router.infer(
                job,
                only=lambda n: n.name == node.name,
                max_output_bytes=self.max_output_bytes,
            )
        except (UpstreamFailed, NoHealthyNode):
            return None

    async def run(self, job: Job, router: Router) -> Outcome:
        candidates = sorted(
            (s for s in router.candidates(job.entry.name, job.allowed)),
            key=lambda s: s.score(),
        )
        # One node per signed provider, best-scoring first: independence is the point.
        by_provider: dict[str, NodeConfig] = {}
        for s in candidates:
            by_provider.setdefault(s.config.provider, s.config)
        pool = list(by_provider.values())
        if len(pool) < 2:
            raise NoHealthyNode(
                "redundant mode needs healthy nodes of two independent providers", retry_after=1
            )
        first = await asyncio.gather(*(self._on(job, router, n) for n in pool[:2]))
        answers = [r for r in first if r is not None]
        spare = pool[2:]
        # Replace a failed node by one of another provider, while any are left.
        while len(answers) < 2 and spare:
            got = await self._on(job, router, spare.pop(0))
            if got is not None:
                answers.append(got)
        if len(answers) < 2:
            raise UpstreamFailed("fewer than two independent nodes answered")
        a, b = answers[0], answers[1]
        if agree(a.outputs, b.outputs, self.rtol, self.atol):
            return await self._outcome(router, [a, b], "agreed")
        # Disagreement: a third provider breaks the tie, or nobody gets an answer.
        disputed = [a.node.name, b.node.name]
        while spare:
            c = await self._on(job, router, spare.pop(0))
            if c is None:
                continue
            for winner, loser in ((a, b), (b, a)):
                if agree(winner.outputs, c.outputs, self.rtol, self.atol):
                    await router.charge(loser.node.name, "outvoted")
                    return await self._outcome(router, [winner, c], "agreed-by-majority")
            disputed.append(c.node.name)  # three answers, no two alike: no majority either
            break
        why = "no third provider answered" if len(disputed) == 2 else "no two answers agree"
        router.unresolved(self.mode, disputed, f"{why} (model {job.entry.name})")
        for name in disputed:  # counted, and by the two-party rule it charges nobody
            await router.judge(name, "disputed")
        raise UpstreamFailed(
            f"nodes {', '.join(disputed)} disagree and no majority could be formed"
        )

    async def _outcome(self, router: Router, routed: list[Routed], status: str) -> Outcome:
        # Each answer was confirmed by another provider's; the records are independent, so
        # their store updates run at once rather than one round trip after another.
        await asyncio.gather(*(router.confirm(r.node.name) for r in routed))
        return Outcome(
            outputs=tuple(routed[0].outputs),
            nodes=tuple(r.node.name for r in routed),
            mode=self.mode,
            status=status,
            attempts=sum(r.attempts for r in routed),
            nonfinite=any(r.nonfinite for r in routed),
            evidence={"providers": [r.node.provider for r in routed]},
        )
