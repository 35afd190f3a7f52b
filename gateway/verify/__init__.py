"""Verification modes: interchangeable implementations of one small interface.

A mode takes a frozen `Job` (model entry, inputs, requested outputs, deadline, the nodes
policy allows, request id) and returns an `Outcome`. Node calls go through the router's
one attempt loop (`Router.infer`), which a mode narrows (which nodes, which model to call)
and extends with a per-reply check; a mode never touches router internals. A node that
fails or lies surfaces as a routing retry or a Problem, never as an exception escaping
the gateway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from gateway.job import Job, Outcome

if TYPE_CHECKING:
    from gateway.routing.router import Router

__all__ = ["MODES", "Job", "Outcome", "Verifier"]

# Cheapest first: the mode used when the client does not ask for a stronger one.
MODES: tuple[str, ...] = ("none", "redundant", "zk", "mpc")


class Verifier(Protocol):
    mode: str

    async def run(self, job: Job, router: Router) -> Outcome: ...
