"""Lazy proofs: answer at once in mode `none`, prove the same input in the background.

A permit annotated ``@proof("lazy")`` (or ``"lazy-or-eager"``, ``"lazy-or-unverified"``)
obliges it: the
answer leaves with status ``unverified-pending`` and a deadline in its receipt
(``lazy_proof = "pending"``, ``lazy_proof_deadline``), and a zk-capable node of **another
provider**, among those the same policy decision allows in mode zk, proves the request's
input.
The proof is checked exactly as in mode zk (`ZkVerification.run`: the input instances are
the gateway's own quantisation of the request, ezkl verifies under the registered vk),
then its outputs are compared with the answer given, within the model's onboarding
tolerance (its quantisation error bound). The result is late evidence about the receipt
(gateway/receipts/late.py):

    verified       the proof states the answer given: the answering node is confirmed;
    contradicted   the proof states another answer: the answering node is charged;
    check-missing  no valid proof by the deadline: the prover is charged (its attempt
                   fails at the deadline, in the router's accounting, and its reputation
                   record counts a `missed` proof), never the answering node; or no prover
                   was allowed (nobody is charged).

A prover that delivers (verified or contradicted) counts `delivered`, which offsets its
misses (docs/reputation.md, "A prover's missed proofs").

Bounded: at most ``max_queue`` proofs waiting or running, at most ``per_identity`` of them
for one client identity ([zk] lazy_queue, lazy_per_identity, lazy_workers, lazy_deadline_s).
When a proof cannot be scheduled the obligation decides: ``lazy`` refuses the answer
(503), ``lazy-or-eager`` proves it before answering exactly as mode zk (the answer is the
zk node's, status proof-valid), ``lazy-or-unverified`` answers and records
``lazy_proof = "unscheduled"`` (final status none: unverified, as recorded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.job import Job, NodeFilter, Outcome
from gateway.protocol.problems import Problem

if TYPE_CHECKING:
    from gateway.config import NodeConfig
    from gateway.routing.router import Router
    from gateway.verify.zk import ZkVerification

log = logging.getLogger(__name__)

PENDING = "pending"
UNSCHEDULED = "unscheduled"

# (receipt id, verdict, nodes, reason, details) -> logged as late evidence; and the proof
# file saved beside the log (receipt id, canonical proof bytes, verification material).
RecordFn = Callable[[str, str, tuple[str, ...], str, dict[str, str]], Awaitable[None]]
SaveFn = Callable[[str, bytes, dict[str, Any]], None]


@dataclass(frozen=True)
class Ticket:
    """A reserved place in the queue, made before the receipt is signed."""

    job: Job
    outcome: Outcome
    identity: str
    prover_allowed: NodeFilter  # the same decision's verdict per node, for mode zk
    deadline: float  # time.monotonic()
    deadline_wall: dt.datetime

    @property
    def deadline_text(self) -> str:
        return self.deadline_wall.strftime("%Y-%m-%dT%H:%M:%SZ")


class LazyProofs:
    def __init__(
        self,
        router: Router,
        zk: ZkVerification,
        *,
        max_queue: int = 64,
        per_identity: int = 8,
        workers: int = 1,
        deadline_s: float = 300.0,
        record: RecordFn | None = None,
        save: SaveFn | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.router = router
        self.zk = zk
        self.max_queue = max_queue
        self.per_identity = per_identity
        self.workers = workers
        self.deadline_s = deadline_s
        self.record = record
        self.save = save
        self.rng = rng or random.SystemRandom()
        self.queue: asyncio.Queue[tuple[Ticket, str]] = asyncio.Queue()
        self.reserved = 0  # waiting or running
        self.by_identity: Counter[str] = Counter()
        # scheduled, unscheduled, eager, verified, contradicted, check-missing
        self.counts: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- on the request path: O(1), never awaits a node ----------------------------------
    def provable(self, job: Job) -> bool:
        """Onboarded for zk, and a request the circuit takes (one finite row)."""
        artefacts = self.zk.artefacts.get(job.entry.sha256)
        if artefacts is None:
            return False
        try:
            self.zk._request_row(job.inputs, artefacts)
        except Problem:
            return False
        return True

    def reserve(
        self, job: Job, outcome: Outcome, identity: str, prover_allowed: NodeFilter
    ) -> Ticket | None:
        """A place for this answer's proof, or None when the bound (or the model) says no."""
        if (
            not self.provable(job)
            or self.reserved >= self.max_queue
            or self.by_identity[identity] >= self.per_identity
        ):
            return None
        self.reserved += 1
        self.by_identity[identity] += 1
        self._idle.clear()
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        return Ticket(
            job,
            outcome,
            identity,
            prover_allowed,
            time.monotonic() + self.deadline_s,
            now + dt.timedelta(seconds=self.deadline_s),
        )

    def offer(self, ticket: Ticket, receipt_id: str) -> None:
        self.counts["scheduled"] += 1
        self.queue.put_nowait((ticket, receipt_id))  # bounded by reserve()

    async def prove_now(self, job: Job, allowed: NodeFilter) -> Outcome:
        """An eager proof instead of a lazy one (``lazy-or-eager`` with the queue full): mode
        zk's own run, on the nodes the decision allows in mode zk."""
        self.counts["eager"] += 1
        return await self.zk.run(dataclasses.replace(job, allowed=allowed), self.router)

    def release(self, ticket: Ticket) -> None:
        """Give a reservation back (the receipt could not be logged, or the proof is done)."""
        self.reserved -= 1
        self.by_identity[ticket.identity] -= 1
        if self.by_identity[ticket.identity] <= 0:
            del self.by_identity[ticket.identity]
        if self.reserved == 0:
            self._idle.set()

    # --- off the request path -------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Background job: `workers` tasks prove what was offered until `stop`."""

        async def worker() -> None:
            while True:
                ticket, rid = await self.queue.get()
                try:
                    verdict, nodes, why, details = await self.prove(ticket, rid)
                    self.counts[verdict] += 1
                    if self.record is not None:
                        await self.record(rid, verdict, nodes, why, details)
                except Exception:
                    log.exception("lazy proof failed")
                finally:
                    self.release(ticket)
                    self.queue.task_done()

        tasks = [asyncio.create_task(worker()) for _ in range(self.workers)]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every proof reserved so far has its verdict (tests, benchmarks)."""
        await self._idle.wait()

    async def prove(
        self, ticket: Ticket, receipt_id: str
    ) -> tuple[str, tuple[str, ...], str, dict[str, str]]:
        job, outcome = ticket.job, ticket.outcome
        details = {"deadline": ticket.deadline_text}
        answered = outcome.nodes[0]
        state = self.router.nodes.get(answered)
        if state is None:
            return "check-missing", (answered,), "the answering node is gone", details
        provider = state.config.provider
        artefacts = self.zk.artefacts[job.entry.sha256]
        record = artefacts.record

        def admitted(node: NodeConfig) -> bool:
            # What the same decision allows in mode zk, of another provider than the answer's.
            return ticket.prover_allowed(node) and node.provider != provider

        capable = await self.zk.capability.ready(
            self.router.nodes.values(), record.zk_model_name, record.version, admitted
        )
        if not capable:
            why = "no zk-capable node of another provider is allowed"
            return "check-missing", (answered,), why, details
        prover = self.rng.choice(sorted(capable))
        proving = dataclasses.replace(
            job,
            deadline=ticket.deadline,
            allowed=lambda n: n.name == prover and admitted(n),
        )
        try:
            remaining = max(0.0, ticket.deadline - time.monotonic())
            proven = await asyncio.wait_for(self.zk.run(proving, self.router), remaining + 1.0)
        except (Problem, TimeoutError):
            # The router failed (and counted) the prover's attempt; its record counts the
            # miss (weighed as docs/reputation.md says: one miss never quarantines). The
            # answer stands unproven, and the honest answering node is not charged.
            await self.router.judge(prover, "missed")
            self.zk.capability.forget(prover)
            why = "the prover delivered no valid proof by the deadline"
            return "check-missing", (prover,), why, details
        await self.router.judge(prover, "delivered")
        details.update(
            proof_sha256=str(proven.evidence["proof_sha256"]),
            instances_sha256=str(proven.evidence["instances_sha256"]),
        )
        if self.save is not None:
            material = dict(proven.evidence.get("verification_material", {}))
            proof = str(proven.evidence["proof"]).encode()
            await asyncio.to_thread(self.save, receipt_id, proof, material)  # files, fsyncs
        tolerance = float(record.quantisation.get("tolerance", 1e-2))
        if _same_answer(outcome, proven, tolerance):
            await self.router.confirm(answered)
            why = "a zk proof by another provider states the answer given"
            return "verified", (answered, prover), why, details
        await self.router.charge(answered, "contradicted")
        why = "a zk proof by another provider states another answer"
        return "contradicted", (answered, prover), why, details


def _same_answer(given: Outcome, proven: Outcome, tolerance: float) -> bool:
    want = {t.name: np.asarray(t.data, np.float64) for t in proven.outputs}
    for t in given.outputs:
        other = want.get(t.name)
        if other is None or other.shape != np.asarray(t.data).shape:
            return False
        if not np.allclose(np.asarray(t.data, np.float64), other, rtol=0.0, atol=tolerance):
            return False
    return bool(given.outputs)


def install(gw: Any, zk: ZkVerification) -> LazyProofs | None:
    """Wire lazy proofs into a gateway with receipts (runtime.add_proof_modes): late
    evidence signed by the receipt key, the proof kept beside the log as eager zk's is."""
    from gateway.receipts.late import record_late_evidence

    # Without receipts there is nothing to attach late evidence to: no lazy proofs.
    receipts = getattr(gw, "receipts", None)
    stage = getattr(getattr(gw, "pipeline", None), "receipt", None)
    if receipts is None or stage is None:
        return None

    async def record(
        receipt_id: str, verdict: str, nodes: tuple[str, ...], why: str, details: dict[str, str]
    ) -> None:
        await record_late_evidence(
            receipts,
            receipt_id=receipt_id,
            verdict=verdict,
            kind="lazy_proof",
            nodes=nodes,
            reason=why,
            details=details,
        )
        log.info("lazy proof of %s: %s (%s)", receipt_id, verdict, why)

    def save(receipt_id: str, proof: bytes, material: dict[str, Any]) -> None:
        from pathlib import Path

        files: dict[str, Any] = {"lazy-proof.json": proof}
        for name, value in material.items():
            files[name] = (Path(value[0]), str(value[1]))
        receipts.save_evidence(receipt_id, files)

    zc = gw.cfg.zk
    lazy = LazyProofs(
        gw.router,
        zk,
        max_queue=zc.lazy_queue,
        per_identity=zc.lazy_per_identity,
        workers=zc.lazy_workers,
        deadline_s=zc.lazy_deadline_s,
        record=record,
        save=save,
    )
    stage.lazy = lazy
    gw.background.append(lazy.run)
    return lazy
