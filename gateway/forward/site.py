"""Which site answered a request and why, for the receipt.

A context variable, because the facts are known at the edges of the request (the forward
listener, the edge's failover) and the receipt is signed deep inside the pipeline; set
per request task, so concurrent requests never see each other's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from gateway.receipts.model import ExtValue

# Why a site answered: its own nodes, another region policy allowed, or its core.
LOCAL = "local"
FALLBACK_REGION = "fallback-region"
FORWARDED_TO_CORE = "forwarded-to-core"


@dataclass(frozen=True)
class Forwarded:
    """A request the forward listener accepted: the site that sent it, its hops, and the
    site that answers it (the core's own)."""

    site: str
    hops: tuple[str, ...]
    answered_by: str


FORWARDED: ContextVar[Forwarded | None] = ContextVar("ztgate_forwarded", default=None)
# (site, why) of the nodes that answered, set for the request (`answered_by`).
ANSWERED: ContextVar[tuple[str, str] | None] = ContextVar("ztgate_answered", default=None)


def answered_by(node_sites: Sequence[str], own_site: str) -> None:
    """The note for the receipt: nodes of `node_sites` gave the answer (one in mode none,
    each party of the other modes) at a gateway of `own_site`. A node without a site is
    the gateway's own; where no node has one, receipts stay as they were. Several sites
    are named together, sorted, comma-separated, so `site` stays one string."""
    if not any(node_sites):
        ANSWERED.set(None)
        return
    sites = sorted({s or own_site for s in node_sites})
    ANSWERED.set((",".join(sites), LOCAL if sites == [own_site] else FALLBACK_REGION))


@contextmanager
def one_request() -> Iterator[None]:
    """Scope the note to one request. A front that runs several requests in one task (the
    gRPC stream's messages) wraps each: the site a message's nodes had must not reach a
    later message's receipt (a refusal, another mode, a node without a site)."""
    token = ANSWERED.set(None)
    try:
        yield
    finally:
        ANSWERED.reset(token)


def receipt_extensions() -> dict[str, ExtValue]:
    """What a receipt signed in this request's context records about forwarding."""
    fwd = FORWARDED.get()
    if fwd is None:
        answered = ANSWERED.get()
        return {} if answered is None else {"site": answered[0], "site_why": answered[1]}
    return {
        "site": fwd.answered_by,
        "site_why": FORWARDED_TO_CORE,
        "forwarded_by": fwd.site,
        "forward_hops": fwd.hops,
    }
