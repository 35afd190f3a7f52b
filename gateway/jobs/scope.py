"""What a job's run carries into the pipeline: its id and its receipt seed.

Only the runner builds these requests (in process, `runner.call_app`), and it puts a
`JobScope` into the ASGI scope's extensions. An ASGI server never puts a Python object
there from the network, so no client can claim to be a job, let alone name one.

The seed is HMAC(jobs key, job id): secret (the key never leaves the gateway), and the
same on every run of the job, so a deterministic model's second run commits to the same
outputs under the same salt as the first, and the receipt log can tell "the same answer
again" from "a different one" (gateway/receipts/service.py).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JOB_EXTENSION", "JobScope", "forwarded_job", "is_forwarded", "job_of", "job_seed"]

JOB_EXTENSION = "ztgate.job"
_SEED = b"ztgate/job-request-seed/v1\n"
SEED_SIZE = 16
_FORWARDED = "fwd/"  # no job id this gateway draws has a slash (routes.py)


@dataclass(frozen=True, slots=True)
class JobScope:
    id: str
    seed: bytes = field(repr=False)  # secret: the request's seed (pipeline.context)


def job_seed(key: bytes, job_id: str) -> bytes:
    return hmac.new(key, _SEED + job_id.encode(), hashlib.sha256).digest()[:SEED_SIZE]


def forwarded_job(site: str, client: str, job_id: str) -> str:
    """The id a core runs an edge's job under (gateway/forward/listener.py): namespaced by
    the forwarding site (its certificate's) and the client (a digest of its SPIFFE ID), so
    no site can name another's jobs, nor one client's job for another client."""
    return f"{_FORWARDED}{site}/{hashlib.sha256(client.encode()).hexdigest()[:32]}/{job_id}"


def is_forwarded(job_id: str) -> bool:
    """An edge's job, run here by the forward listener: no row in this gateway's store."""
    return job_id.startswith(_FORWARDED)


def job_of(scope: Mapping[str, Any]) -> JobScope | None:
    """The job a request runs for, or None (every request a client sent)."""
    extensions = scope.get("extensions")
    job = extensions.get(JOB_EXTENSION) if isinstance(extensions, Mapping) else None
    return job if isinstance(job, JobScope) else None
