"""Spot checks for mode `none`: re-run a sample of answered requests on another provider.

Off the request path and bounded: `NoVerification` decides, per answer, whether to check
it (at the rate the answering node's reputation sets, never zero; the receipt then says
``spot_check = "scheduled"``). The rate is the higher of the configured one (only with
``[reputation] spot_checks = true``) and the floor the permits behind the decision set
with ``@spot_check``: an operator's config can raise what a signed policy demands, never
lower or switch it off. Then the receipt stage offers the job to a queue of
`max_queue` items that `workers` tasks drain; a full queue drops the check, counts it,
and logs it as ``check-missing`` late evidence.

A check is the same job through the router's one attempt loop (`Router.infer` with
`only=`: a node of another signed provider, among those the original policy decision
allowed; quarantined nodes never), so it reaches the node as any attempt does, with a
fresh random request id. When the checker disagrees, a node of a third provider breaks
the tie; only a 2-against-1 verdict is evidence (docs/reputation.md), anything else is an
unresolved disagreement that charges nobody.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gateway.job import Job, Outcome
from gateway.protocol.problems import Problem
from gateway.verify.redundant import agree

if TYPE_CHECKING:
    from gateway.config import NodeConfig
    from gateway.policy.facts import SpotCheckRate
    from gateway.routing.router import Routed, Router

log = logging.getLogger(__name__)

# (receipt id, verdict, nodes, reason) -> logged as late evidence
RecordFn = Callable[[str, str, tuple[str, ...], str], Awaitable[None]]


@dataclass(frozen=True)
class _Item:
    job: Job
    outcome: Outcome
    receipt_id: str | None


class SpotChecks:
    def __init__(
        self,
        router: Router,
        *,
        max_queue: int = 256,
        workers: int = 2,
        timeout_s: float = 10.0,
        max_output_bytes: int = 64 * 1024 * 1024,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        record: RecordFn | None = None,
        rng: random.Random | None = None,
        configured: bool = True,
    ) -> None:
        self.router = router
        # Whether the configured rates apply; a policy's @spot_check applies either way.
        self.configured = configured
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self.workers = workers
        self.timeout_s = timeout_s
        self.max_output_bytes = max_output_bytes
        self.rtol, self.atol = rtol, atol
        self.record = record
        self.rng = rng or random.SystemRandom()
        # scheduled, dropped, skipped (no node allowed), confirmed, contradicted,
        # disputed, failed (the checker could not answer)
        self.counts: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- on the request path: O(1), never awaits a node ---------------------------------
    def rate(self, node: NodeConfig, floor: SpotCheckRate | None = None) -> float:
        """The chance an answer of `node` is checked: policy's floor, raised by config."""
        rep = self.router.reputation
        rate = 0.0
        if self.configured:
            rate = 1.0 if rep is None else rep.rate(node)
        if floor is not None:
            rate = max(rate, floor.at("suspect" if rep is None else rep.sampled_as(node)))
        return rate

    def sample(self, node: NodeConfig, floor: SpotCheckRate | None = None) -> bool:
        rate = self.rate(node, floor)
        return rate > 0 and self.rng.random() < rate

    def offer(self, job: Job, outcome: Outcome, receipt_id: str | None) -> bool:
        self.counts["scheduled"] += 1
        try:
            self.queue.put_nowait(_Item(job, outcome, receipt_id))
        except asyncio.QueueFull:
            self.counts["dropped"] += 1
            log.warning("spot-check queue full: a check was dropped")
            self._later(receipt_id, "check-missing", (), "dropped: the check queue was full")
            return False
        return True

    def _later(
        self, receipt_id: str | None, verdict: str, nodes: tuple[str, ...], why: str
    ) -> None:
        if self.record is None or receipt_id is None:
            return
        task = asyncio.get_running_loop().create_task(self._log(receipt_id, verdict, nodes, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                    verdict, nodes, why = await self.check(item.job, item.outcome)
                    await self._log_item(item, verdict, nodes, why)
                except Exception:
                    log.exception("spot check failed")
                finally:
                    self.queue.task_done()

        tasks = [asyncio.create_task(worker()) for _ in range(self.workers)]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _log_item(self, item: _Item, verdict: str, nodes: tuple[str, ...], why: str) -> None:
        if item.receipt_id is not None:
            await self._log(item.receipt_id, verdict, nodes, why)

    async def drain(self) -> None:
        """Wait until every check offered so far has run (tests, benchmarks)."""
        await self.queue.join()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def check(self, job: Job, outcome: Outcome) -> tuple[str, tuple[str, ...], str]:
        """Run one check; returns (verdict, nodes involved, reason) and records evidence."""
        router = self.router
        answered = outcome.nodes[0]
        state = router.nodes.get(answered)
        if state is None:
            return "check-missing", (answered,), "the answering node is gone"
        provider = state.config.provider
        # A fresh deadline: the check runs after the answer, not within its budget.
        job = dataclasses.replace(job, deadline=time.monotonic() + self.timeout_s)
        if not router.candidates(
            job.entry.name, lambda n: job.allowed(n) and n.provider != provider
        ):
            self.counts["skipped"] += 1
            return "check-missing", (answered,), "no node of another provider is allowed"
        checker = await self._run(job, {provider})
        if checker is None:
            self.counts["failed"] += 1
            return "check-missing", (answered,), "no checker answered"
        c = checker.node.name
        if agree(outcome.outputs, checker.outputs, self.rtol, self.atol):
            await router.confirm(answered)
            await router.confirm(c)
            self.counts["confirmed"] += 1
            return "confirmed", (answered, c), "a node of another provider agrees"
        # Two parties disagree: either may lie. A third provider breaks the tie, or nobody
        # is charged (the two-party rule).
        third = await self._run(job, {provider, checker.node.provider})
        if third is not None and agree(third.outputs, checker.outputs, self.rtol, self.atol):
            await router.charge(answered, "contradicted")
            await router.confirm(c)
            await router.confirm(third.node.name)
            self.counts["contradicted"] += 1
            return "contradicted", (answered, c, third.node.name), "two other providers agree"
        if third is not None and agree(third.outputs, outcome.outputs, self.rtol, self.atol):
            await router.charge(c, "contradicted")  # the checker lied
            await router.confirm(answered)
            await router.confirm(third.node.name)
            self.counts["confirmed"] += 1
            return "confirmed", (answered, third.node.name), "a tiebreak sides with the answer"
        disputed = [answered, c] + ([] if third is None else [third.node.name])
        router.unresolved("none", disputed, f"spot check of model {job.entry.name}")
        for name in disputed:
            await router.judge(name, "disputed")
        self.counts["disputed"] += 1
        return "check-missing", tuple(disputed), "an unresolved disagreement (nobody charged)"

    async def _run(self, job: Job, not_providers: set[str]) -> Routed | None:
        try:
            return await self.router.infer(
                job,
                only=lambda n: n.provider not in not_providers,
                max_output_bytes=self.max_output_bytes,
                learn_latency=False,
            )
        except Problem:
            return None


class SpotCheckMetrics(Collector):
    """``ztgate_spot_checks_total{result}``: scheduled, dropped, skipped, confirmed, ..."""

    def __init__(self, spot: SpotChecks) -> None:
        self.spot = spot

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "ztgate_spot_checks",
            "Spot checks of mode none, by what became of them",
            labels=["result"],
        )
        for result, n in sorted(self.spot.counts.items()):
            family.add_metric([result], n)
        yield family
