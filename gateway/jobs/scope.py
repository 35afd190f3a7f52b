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

__all__ = ["JOB_EXTENSION", "JobScope", "job_of", "job_seed"]

JOB_EXTENSION = "ztgate.job"
_SEED = b"ztgate/job-request-seed/v1\n"
SEED_SIZE = 16


@dataclass(frozen=True, slots=True)
class JobScope:
    id: str
    seed: bytes = field(repr=False)  # secret: the request's seed (pipeline.context)


def job_seed(key: bytes, job_id: str) -> bytes:
    return hmac.new(key, _SEED + job_id.encode(), hashlib.sha256).digest()[:SEED_SIZE]


def job_of(scope: Mapping[str, Any]) -> JobScope | None:
    """The job a request runs for, or None (every request a client sent)."""
    extensions = scope.get("extensions")
    job = extensions.get(JOB_EXTENSION) if isinstance(extensions, Mapping) else None
    return job if isinstance(job, JobScope) else None
