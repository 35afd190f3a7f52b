"""What a job is to every backend: the record a submit writes, the outcome a run records,
the row a poll reads, and the calls the API and the runner make (`JobBackend`). The two
backends (`store.JobStore` on disk, `redis.RedisJobStore` in the shared Redis) differ
only in where these go."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "OPEN",
    "PROBLEM_HEADERS",
    "Conflict",
    "Full",
    "JobBackend",
    "JobRow",
    "MacFor",
    "NewJob",
    "Outcome",
    "Submitted",
]

OPEN = ("queued", "running")
# What an expired job's stored answer is sent with (its body is a problem document).
PROBLEM_HEADERS = json.dumps({"content-type": "application/problem+json"})
# The seal of an expired job's answer, by job id (`seal.seal_result`).
MacFor = Callable[[str], str]


class Conflict(Exception):
    """The idempotency key names another request of this client's."""


class Full(Exception):
    """A bound on open jobs is reached (`scope`: "identity" or "replica")."""

    def __init__(self, scope: str) -> None:
        super().__init__(scope)
        self.scope = scope


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as submitted: what it runs as, and its seal over that (`seal.seal`)."""

    id: str
    owner: str  # the submitter's SPIFFE ID (from its certificate)
    key: str  # the Idempotency-Key
    digest: str  # SHA-256 of route, model, version, body: tells a retry from a new request
    route: str  # the sync path the job runs as
    model: str
    created: float  # the submit time (the gateway's clock), sealed: bounds replays
    cert: str  # the submitter's PEM leaf
    headers: dict[str, str]  # the few request headers the decode reads
    body: bytes
    mac: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A run's one answer, recorded once (`finish`)."""

    state: str  # "done" or "failed"
    status: int  # the sync response's HTTP status
    headers: dict[str, str]
    result: bytes
    receipt_id: str | None
    mac: str  # `seal.seal_result` over it: the store cannot swap answers


@dataclass(frozen=True, slots=True)
class Submitted:
    id: str
    created: bool  # False: the key named this job already


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    owner: str
    route: str
    model: str
    cert: str | None
    headers: dict[str, str]
    body: bytes | None
    state: str
    created: float
    updated: float
    attempts: int
    executions: int
    status: int | None
    result_headers: dict[str, str]
    result: bytes | None
    receipt_id: str | None
    mac: str | None  # open: the job's seal; finished: its answer's seal


class JobBackend(Protocol):
    """What the API and the runner need of a job store. A store shared by replicas gives
    each run a lease of `lease_s` (None: no lease) that the runner renews while the run
    lasts (`renew`)."""

    lease_s: float | None

    async def submit(self, job: NewJob, per_identity: int, total: int) -> Submitted:
        """The job, or the one its key already names (`Conflict` for another request);
        `Full` at `per_identity` open jobs of its owner or `total` in all."""

    async def get(self, job_id: str) -> JobRow | None: ...
    async def requeue_running(self) -> int: ...
    async def claim(
        self, limit: int, logs: Sequence[str] = (), adopt_after_s: float = 0.0
    ) -> list[JobRow]:
        """Up to `limit` due jobs, marked running. A job marked for a receipt log not in
        `logs` (another replica's) less than `adopt_after_s` ago is left to that replica."""

    async def mark(self, job_id: str, log_id: str, run: int) -> tuple[str, ...] | None:
        """Before a run's answer receipt is appended: the job names `log_id` as where its
        receipt goes (and when). Returns every log the job was ever marked for, this one
        included; None if the job is not running (finished, expired or erased) or not as
        run `run` (its `executions` when claimed: a later claim took it over)."""

    async def renew(self, job_id: str) -> None: ...
    async def retry(self, job_id: str, delay_s: float, run: int) -> None:
        """Queued again after `delay_s`, if still running as run `run` (as `mark`)."""

    async def finish(self, job_id: str, out: Outcome) -> bool:
        """Record `out` and drop the request; False if the job was not running (already
        finished, expired or erased): nothing changes."""

    async def expire(
        self, max_age_s: float, result_ttl_s: float, result: bytes, mac_for: MacFor
    ) -> tuple[int, int]:
        """Queued jobs older than `max_age_s` fail with `result` (a problem), sealed with
        `mac_for(id)`; finished ones older than `result_ttl_s` are deleted. Returns
        (expired, deleted)."""

    async def close(self) -> None: ...
