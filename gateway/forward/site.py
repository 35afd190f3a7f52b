"""Which site answered a request and why, for the receipt.

A context variable, because the facts are known at the edges of the request (the forward
listener, the edge's failover) and the receipt is signed deep inside the pipeline; set
per request task, so concurrent requests never see each other's."""

from __future__ import annotations

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
# (site, why) of the node that answered, set by the router for nodes with a signed site.
ANSWERED: ContextVar[tuple[str, str] | None] = ContextVar("ztgate_answered", default=None)


def answered_by(node_site: str, own_site: str) -> None:
    """The router's note: a node of `node_site` answered at a gateway of `own_site`. Nodes
    without a site are the gateway's own, and their receipts stay as they were."""
    if node_site:
        ANSWERED.set((node_site, LOCAL if node_site == own_site else FALLBACK_REGION))


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
