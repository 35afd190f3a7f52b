"""RFC 9457 problem details (``application/problem+json``).

Every error the gateway returns is a :class:`Problem`. Each subclass pins a
stable ``type`` URI, a ``title`` and an HTTP ``status``; the instance carries the
human-readable ``detail``. The body also repeats ``detail`` as ``error`` because
``tritonclient`` (and Triton itself) report ``body["error"]`` to the user.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from starlette.responses import Response

__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_MEDIA_TYPE",
    "PROBLEM_TYPES",
    "BadRequest",
    "DeadlineExceeded",
    "Forbidden",
    "Internal",
    "InvalidTensor",
    "MethodNotAllowed",
    "NoHealthyNode",
    "NotFound",
    "PayloadTooLarge",
    "PolicyRollback",
    "Problem",
    "ProblemInfo",
    "RateLimited",
    "StateUnavailable",
    "Unauthenticated",
    "UnknownModel",
    "UnknownVersion",
    "UnsupportedExtension",
    "UnsupportedMediaType",
    "UpstreamFailed",
    "problem_response",
]

PROBLEM_BASE = "https://ztgate.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """Base of every client-visible error. Subclasses only set class attributes."""

    type: ClassVar[str] = PROBLEM_BASE + "internal"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500
    # Whether the same request may succeed if retried later (unchanged).
    retryable: ClassVar[bool] = False
    # Whether refusing an identified caller this way gets a denial receipt (see the
    # "Denials" paragraph of docs/compliance.md, which lists these types).
    receipted: ClassVar[bool] = False

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.detail: str = detail if detail is not None else self.title
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})
        super().__init__(self.detail)

    def to_dict(self) -> dict[str, Any]:
        # Extension members first so they can never overwrite the standard ones.
        body: dict[str, Any] = dict(self.extra)
        body.update(
            type=self.type,
            title=self.title,
            status=self.status,
            detail=self.detail,
            error=self.detail,
        )
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class _RetryAfter(Problem):
    """A problem that tells the client when to come back (``Retry-After``)."""

    retryable = True

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: float = 1.0,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        # Retry-After is delta-seconds: a non-negative integer (RFC 9110 10.2.3).
        seconds = max(0, math.ceil(retry_after))
        merged = {"Retry-After": str(seconds), **(headers or {})}
        super().__init__(detail, headers=merged, extra=extra)
        self.retry_after = seconds


class BadRequest(Problem):
    type = PROBLEM_BASE + "bad-request"
    title = "Malformed request"
    status = 400


class InvalidTensor(BadRequest):
    type = PROBLEM_BASE + "invalid-tensor"
    title = "Invalid tensor"


class Unauthenticated(Problem):
    type = PROBLEM_BASE + "unauthenticated"
    title = "Client identity missing or invalid"
    status = 401


class Forbidden(Problem):
    type = PROBLEM_BASE + "forbidden"
    title = "Not allowed by policy"
    status = 403
    receipted = True


class NotFound(Problem):
    type = PROBLEM_BASE + "not-found"
    title = "No such route"
    status = 404


class UnknownModel(NotFound):
    type = PROBLEM_BASE + "unknown-model"
    title = "Unknown model"


class UnknownVersion(NotFound):
    type = PROBLEM_BASE + "unknown-version"
    title = "Unknown model version"


class MethodNotAllowed(Problem):
    type = PROBLEM_BASE + "method-not-allowed"
    title = "Method not allowed"
    status = 405


class Replayed(Problem):
    type = PROBLEM_BASE + "replayed-request"
    title = "Replayed request"
    status = 409


class IdempotencyConflict(Problem):
    """A job's Idempotency-Key already names another request of the same identity."""

    type = PROBLEM_BASE + "idempotency-conflict"
    title = "Idempotency key reused with another request"
    status = 409


class PolicyRollback(Problem):
    """/admin/reload of a signed policy bundle older than the one in force (or the same
    version with other content): the gateway keeps its policy. Not a malformed request."""

    type = PROBLEM_BASE + "policy-rollback"
    title = "Policy bundle older than the one in force"
    status = 409


class PayloadTooLarge(Problem):
    type = PROBLEM_BASE + "payload-too-large"
    title = "Payload too large"
    status = 413


class UnsupportedMediaType(Problem):
    type = PROBLEM_BASE + "unsupported-media-type"
    title = "Unsupported media type"
    status = 415


class RateLimited(_RetryAfter):
    type = PROBLEM_BASE + "rate-limited"
    title = "Rate limit exceeded"
    status = 429
    receipted = True


class Internal(Problem):
    """A bug in the gateway. The detail is generic so no internals leak."""

    type = PROBLEM_BASE + "internal"
    title = "Internal error"
    status = 500

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        super().__init__("internal error; see gateway logs", **kwargs)
        # Kept for logs only; never serialised.
        self.log_detail = detail


class UnsupportedExtension(Problem):
    """A Triton extension the gateway deliberately does not offer: shared memory (the
    client's memory is on another machine than the node that would read it), model
    control (the registry and the signed policy decide what is served), trace and
    logging settings (the operator's). 501, not 404: the route is known and the refusal
    is by design; not 400: nothing is wrong with the request. Not worth retrying."""

    type = PROBLEM_BASE + "unsupported-extension"
    title = "Extension not offered by this gateway"
    status = 501


class UpstreamFailed(Problem):
    type = PROBLEM_BASE + "upstream-failed"
    title = "Every inference node failed or returned an unverifiable answer"
    status = 502
    retryable = True


class NoHealthyNode(_RetryAfter):
    type = PROBLEM_BASE + "no-healthy-node"
    title = "No healthy inference node"
    status = 503


class StateUnavailable(_RetryAfter):
    """The shared state store (Redis) did not answer, and the check that needed it fails
    closed (rate limits, replay protection, a revocation list past its staleness budget).

    Its own type, not `no-healthy-node`: the nodes are fine, and a client or an operator
    must be able to tell the two apart. The detail names the check that could not run and
    never the store's address or error (those go to the gateway's log only); it is also
    stable, so identical refusals coalesce into one denial receipt.
    """

    type = PROBLEM_BASE + "state-unavailable"
    title = "Shared state unavailable"
    status = 503
    receipted = True


class Overloaded(_RetryAfter):
    """This replica works on `limits.max_concurrent` requests already: another replica
    (or this one, shortly) can serve the request. Not receipted: it says nothing about
    the caller, and receipting it would add work exactly when there is too much."""

    type = PROBLEM_BASE + "overloaded"
    title = "Gateway overloaded"
    status = 503


class LogUnavailable(_RetryAfter):
    """This replica's receipt log cannot serve what was asked (a damaged stored tree): its
    own type, since the request was fine and the nodes are too. The operator is alerted by
    the gateway's log; the detail says nothing of the files."""

    type = PROBLEM_BASE + "log-unavailable"
    title = "Receipt log unavailable"
    status = 503


class DeadlineExceeded(Problem):
    type = PROBLEM_BASE + "deadline-exceeded"
    title = "Deadline exceeded"
    status = 504
    retryable = True


class ProblemInfo(NamedTuple):
    """One row of :data:`PROBLEM_TYPES`, for generated docs."""

    status: int
    title: str
    retryable: bool


def _all_subclasses(cls: type[Problem]) -> list[type[Problem]]:
    out: list[type[Problem]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


# type URI -> (status, title, retryable). Built from the classes so the docs
# can never disagree with what the gateway actually sends.
PROBLEM_TYPES: dict[str, ProblemInfo] = {
    c.type: ProblemInfo(c.status, c.title, c.retryable)
    for c in _all_subclasses(Problem)
    if not c.__name__.startswith("_")
}


def problem_response(p: Problem) -> Response:
    """Render ``p`` as an ``application/problem+json`` response."""
    # Imported here: the offline verifier uses the problem types without a web framework.
    from starlette.responses import Response

    body = json.dumps(p.to_dict(), ensure_ascii=False, allow_nan=False, default=str)
    return Response(
        content=body.encode("utf-8"),
        status_code=p.status,
        headers=p.headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )
