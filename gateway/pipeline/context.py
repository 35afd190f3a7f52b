"""The typed values a request becomes, stage by stage.

Each stage takes what the previous ones made and returns a new frozen value; nothing is
optional, so no stage has to assert that an earlier one ran:

    Incoming -> Caller -> Asked -> (InferDecision) -> Decided -> (Job -> Outcome) -> Answer
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import NodeConfig
from gateway.identity import Identity
from gateway.job import Job, Outcome
from gateway.jobs.scope import job_of
from gateway.policy.engine import InferDecision
from gateway.policy.facts import IdentityFacts
from gateway.protocol.tensors import InferRequest, JsonScalar
from gateway.receipts.issue import Issued
from gateway.registry import ModelEntry

# One fresh random value per request (`Incoming.seed`, secret: never logged or sent) is
# all the kernel is asked for on the gateway's own behalf; the request id and the
# receipt's seed (salt and receipt-id nonce, gateway.receipts.issue.derive) come from it by
# domain-separated SHA-256, so the public request id says nothing about the salt. Ids that
# must stay independent are drawn apart: the per-attempt node ids (a node must not link
# attempts). The policy decision id is derived from the seed too
# (gateway/pipeline/decide.py `decision_id_of`), except on a job's run.
# A job's run (gateway/jobs/scope.py) takes the job's own secret seed instead, the same on
# every run, so a re-run after a crash commits under the salt the first run used.
SEED_SIZE = 16
_REQUEST_ID = b"ztgate/request-id/v1\n"
_RECEIPT_SEED = b"ztgate/receipt-seed/v1\n"


def new_seed() -> bytes:
    return os.urandom(SEED_SIZE)


def request_id_of(seed: bytes) -> str:
    return hashlib.sha256(_REQUEST_ID + seed).digest()[:16].hex()


def new_request_id() -> str:
    """The gateway's own id for a request: what receipts, problems and logs carry. Never the
    client's `ztgate-request-id` header, which is unbounded client text (a signed receipt
    must not grow with what a client sends)."""
    return request_id_of(new_seed())


def body_of(data: bytes, chunk: int = 65536) -> Callable[[], AsyncIterator[bytes]]:
    """A body already in memory, as a stream (a front that has it whole, and tests)."""

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]

    return stream


@dataclass(frozen=True)
class Incoming:
    """A request as a front (HTTP today) hands it over, nothing read or trusted yet."""

    scope: Mapping[str, Any]  # the ASGI scope: where the verified peer certificate is
    headers: Mapping[str, str]  # case-insensitive lookups (Starlette's Headers)
    body: Callable[[], AsyncIterator[bytes]]  # read only by the decode stage, bounded
    model: str | None = None  # from the path, for routes about a model
    version: str | None = None
    seed: bytes = field(default_factory=new_seed, repr=False, compare=False)  # secret
    request_id: str = ""  # derived from `seed` unless a front gives one
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        job = job_of(self.scope)
        if job is not None:
            object.__setattr__(self, "seed", job.seed)
        if not self.request_id:
            object.__setattr__(self, "request_id", request_id_of(self.seed))

    @property
    def receipt_seed(self) -> bytes:
        """The seed this request's receipt derives its salt and nonce from."""
        return hashlib.sha256(_RECEIPT_SEED + self.seed).digest()[:SEED_SIZE]


@dataclass(frozen=True)
class Caller:
    """The verified, unrevoked identity, and the same identity as policy sees it."""

    identity: Identity
    facts: IdentityFacts

    @classmethod
    def of(cls, identity: Identity) -> Caller:
        return cls(identity, IdentityFacts.from_identity(identity))


@dataclass(frozen=True)
class Asked:
    """A decoded request that fits the model's signature."""

    incoming: Incoming
    caller: Caller
    entry: ModelEntry
    request: InferRequest
    payload_bytes: int
    deadline: float  # time.monotonic()
    client_deadline: bool  # the client set its own deadline: modes keep it


@dataclass(frozen=True)
class Decided:
    """Policy's decision and the mode chosen under it."""

    asked: Asked
    decision: InferDecision
    mode: str
    deadline: float

    def node_allowed(self, node: NodeConfig) -> bool:
        return self.decision.node_allowed(self.mode, node.name)

    def job(self) -> Job:
        a = self.asked
        return Job(
            entry=a.entry,
            inputs=a.request.inputs,
            outputs=a.request.outputs,
            deadline=self.deadline,
            allowed=self.node_allowed,
            request_id=a.incoming.request_id,
            spot_check=self.decision.spot_check if self.mode == "none" else None,
        )


@dataclass(frozen=True)
class Answer:
    decided: Decided
    outcome: Outcome
    receipt: Issued | None  # None only on a gateway configured without receipts

    @property
    def request_id(self) -> str:
        return self.decided.asked.incoming.request_id

    def parameters(self) -> dict[str, JsonScalar]:
        """The `ztgate.*` response parameters, the same on every front (docs/clients.md)."""
        decided, outcome, receipt = self.decided, self.outcome, self.receipt
        params: dict[str, JsonScalar] = {
            "ztgate.request_id": self.request_id,
            "ztgate.decision_id": decided.decision.id,
            "ztgate.policy_hash": decided.decision.policy_hash,
            "ztgate.nodes": ",".join(outcome.nodes),
            "ztgate.verification": outcome.mode,
            "ztgate.verification_status": outcome.status,
            "ztgate.attempts": outcome.attempts,
        }
        if outcome.nonfinite:
            params["ztgate.nonfinite"] = True
        # A @proof("lazy...") answer: pending (status unverified-pending, proven by the
        # deadline) or unscheduled (unverified, recorded as such); docs/zk.md.
        for key in ("lazy_proof", "lazy_proof_deadline"):
            value = outcome.evidence.get(key)
            if isinstance(value, str):
                params[f"ztgate.{key}"] = value
        if receipt is not None:
            params["ztgate.receipt_id"] = receipt.receipt.receipt_id
            params["ztgate.receipt"] = receipt.summary
            if receipt.salt is not None:
                # Only the client gets the salt: with it, and only with it, it can later
                # prove what it sent and got against the receipt's commitments.
                params["ztgate.salt"] = base64.b64encode(receipt.salt).decode()
        return params
