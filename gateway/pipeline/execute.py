"""Running the decided request and receipting what happened, answers and denials alike."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.identity import Identity
from gateway.job import Outcome
from gateway.jobs.scope import job_of
from gateway.pipeline.context import Caller, Decided
from gateway.protocol.problems import NoHealthyNode, Problem
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
from gateway.routing.router import Router
from gateway.verify import Verifier
from gateway.verify.spotcheck import SpotChecks

if TYPE_CHECKING:
    from zk.lazy import LazyProofs, Ticket

log = logging.getLogger(__name__)

RECEIPT_HEADER = "ztgate-receipt"

# Mode evidence that goes into the receipt: hashes and identities, never proofs or data.
RECEIPTED_EVIDENCE = frozenset(
    {
        "model_sha256",
        "vk_sha256",
        "settings_sha256",
        "srs_sha256",
        "dev_srs",
        "logrows",
        "postprocess",  # zk: a softmax the gateway applied to the proven logits
        "lazy_proof",  # pending | unscheduled: a @proof("lazy") answer (zk/lazy.py)
        "lazy_proof_deadline",
        "dealer",
        "session",
        "providers",
        "spot_check",
    }
)


def _material(value: object) -> Path | tuple[Path, str]:
    """A verification material file: a path, or (path, sha256) when hashed at load."""
    if isinstance(value, tuple | list):
        return Path(value[0]), str(value[1])
    return Path(str(value))


class RouteStage:
    """Fails fast with 503 when no node may serve the request at all."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, decided: Decided) -> None:
        name = decided.asked.entry.name
        if not self.router.candidates(name, decided.node_allowed):
            raise NoHealthyNode(
                f"no healthy node that policy allows can serve {name!r} in mode "
                f"{decided.mode!r} right now",
                retry_after=1,
            )


class VerifyStage:
    """The chosen mode runs the job: `Job -> Outcome`, node calls through the router."""

    def __init__(self, verifiers: Mapping[str, Verifier], router: Router) -> None:
        self.verifiers = verifiers
        self.router = router

    async def __call__(self, decided: Decided) -> Outcome:
        outcome = await self.verifiers[decided.mode].run(decided.job(), self.router)
        self.router.answered(outcome.nodes)  # the sites that answered, for the receipt
        return outcome


def client_ref(identity: Identity) -> ClientRef:
    return ClientRef(identity.spiffe_id, identity.serial, identity.issuer)


def model_ref(entry: ModelEntry) -> ModelRef:
    return ModelRef(entry.name, entry.version, entry.sha256)


class ReceiptStage:
    """Signs and durably logs what was asked and answered; only then may the answer leave.

    An answer its mode marked for a spot check is then offered to the check queue (O(1),
    off the request path), with the receipt id the late evidence will name."""

    def __init__(self, service: ReceiptService, spot: SpotChecks | None = None) -> None:
        self.service = service
        self.spot = spot
        self.lazy: LazyProofs | None = None  # set where zk is configured (runtime)

    async def _lazy(self, decided: Decided, outcome: Outcome) -> tuple[Outcome, Ticket | None]:
        """A permit's @proof("lazy") on a mode-`none` answer: reserve its proof, or let the
        obligation decide when it cannot be scheduled (refuse, prove it now as mode zk
        would, or record it unverified)."""
        obligation = decided.decision.proof
        if decided.mode != "none" or obligation is None:
            return outcome, None
        asked = decided.asked
        ticket = None
        if self.lazy is not None:
            ticket = self.lazy.reserve(
                decided.job(),
                outcome,
                asked.caller.identity.spiffe_id,
                lambda n: decided.decision.node_allowed("zk", n.name),
            )
        if ticket is not None:
            evidence = {
                **outcome.evidence,
                "lazy_proof": "pending",
                "lazy_proof_deadline": ticket.deadline_text,
            }
            return replace(outcome, status="unverified-pending", evidence=evidence), ticket
        if self.lazy is not None:
            self.lazy.counts["unscheduled"] += 1
            if obligation == "lazy-or-eager":
                # The answer given is the proven one: mode zk's outcome, on the nodes the
                # same decision allows in mode zk (its failure is mode zk's problem).
                proven = await self.lazy.prove_now(
                    decided.job(), lambda n: decided.decision.node_allowed("zk", n.name)
                )
                return proven, None
        if obligation in ("lazy", "lazy-or-eager"):
            raise NoHealthyNode(
                "the policy requires a lazy proof of this answer and none can be scheduled "
                "now (proof queue full, or no prover for the model)",
                retry_after=1,
            )
        return replace(outcome, evidence={**outcome.evidence, "lazy_proof": "unscheduled"}), None

    async def __call__(self, decided: Decided, outcome: Outcome) -> Issued:
        return (await self.answer(decided, outcome))[1]

    async def answer(self, decided: Decided, outcome: Outcome) -> tuple[Outcome, Issued]:
        """The outcome as receipted (a lazy proof's status, or an eager proof's answer,
        which is what the client must be shown) and its receipt."""
        asked = decided.asked
        outcome, ticket = await self._lazy(decided, outcome)
        evidence = outcome.evidence
        job = job_of(asked.incoming.scope)  # a job's run: its receipt names the job
        try:
            issued = await self.service.answer(
                client=client_ref(asked.caller.identity),
                model=model_ref(asked.entry),
                inputs=asked.request.inputs,
                outputs=outcome.outputs,
                policy=PolicyRef(decided.decision.policy_hash, decided.decision.id),
                verification=VerificationRef(
                    outcome.mode,
                    outcome.status,
                    public_instances_sha256=evidence.get("instances_sha256"),
                    proof_sha256=evidence.get("proof_sha256"),
                ),
                nodes=outcome.nodes,
                request_id=asked.incoming.request_id,
                seed=asked.incoming.receipt_seed,
                job_id=None if job is None else job.id,
                extensions={
                    **{
                        k: ext_value(v)
                        for k, v in sorted(evidence.items())
                        if k in RECEIPTED_EVIDENCE
                    },
                    # Answered on revocation data past its staleness budget (@stale): how old.
                    **(
                        {"revocation_stale_s": decided.decision.revocation_stale_s}
                        if decided.decision.revocation_stale_s is not None
                        else {}
                    ),
                },
            )
            proof = evidence.get("proof")
            material = evidence.get("verification_material")
            if isinstance(proof, str) and isinstance(material, dict) and not issued.reused:
                # Files and fsyncs: off the event loop, like the receipt's own batch.
                await asyncio.to_thread(
                    self.service.save_evidence,
                    issued.receipt.receipt_id,
                    {
                        "proof.json": proof.encode(),
                        **{k: _material(v) for k, v in material.items()},
                    },
                )
        except (LogError, LogFrozen, OSError) as exc:
            # Never an answer without a receipt.
            log.error("receipt log refused an answer's receipt: %s", exc)
            if ticket is not None and self.lazy is not None:
                self.lazy.release(ticket)
            raise NoHealthyNode("the receipt log is unavailable", retry_after=5) from exc
        if ticket is not None and self.lazy is not None:
            if issued.reused:  # the first run's receipt has its own lazy proof
                self.lazy.release(ticket)
            else:
                self.lazy.offer(ticket, issued.receipt.receipt_id)
        if issued.reused:
            return outcome, issued  # its evidence and spot check are the first run's
        if self.spot is not None and evidence.get("spot_check") == "scheduled":
            self.spot.offer(decided.job(), outcome, issued.receipt.receipt_id)
        return outcome, issued


class DenialStage:
    """A receipt for refusals docs/compliance.md says are receipted; identical ones within
    a window share one. Only fixed text goes in: the problem's type and title (details
    may quote client text), the gateway's request id, never the client's."""

    def __init__(self, service: ReceiptService) -> None:
        self.service = service

    async def __call__(
        self, caller: Caller, entry: ModelEntry | None, problem: Problem, request_id: str
    ) -> None:
        try:
            issued, coalesced = await self.service.deny(
                client=client_ref(caller.identity),
                model=model_ref(entry) if entry is not None else None,
                problem_type=problem.type,
                reason=problem.title,
                request_id=request_id,
            )
        except Exception:  # the denial stands either way; a missing denial receipt is logged
            log.exception("could not receipt a denial")
            return
        problem.headers[RECEIPT_HEADER] = issued.summary + ("; coalesced" if coalesced else "")
