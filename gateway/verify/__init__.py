"""Verification modes: interchangeable implementations of one small interface.

`none` trusts the node; `redundant`, `zk` and `mpc` plug in here as they land. A mode
returns an `Outcome` value; a node that fails or lies surfaces as a routing retry or a
Problem, never as an exception escaping the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.protocol.tensors import Tensor

if TYPE_CHECKING:
    from gateway.pipeline import Exchange
    from gateway.routing.router import Router

# Cheapest first: the mode used when the client does not ask for a stronger one.
MODES: tuple[str, ...] = ("none", "redundant", "zk", "mpc")


@dataclass(frozen=True)
class Outcome:
    outputs: tuple[Tensor, ...]
    nodes: tuple[str, ...]
    mode: str
    status: str  # "unverified" for none, "verified" / "agreed" for the others
    attempts: int = 1
    nonfinite: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)


class Verifier(Protocol):
    mode: str

    async def run(self, x: Exchange, router: Router) -> Outcome: ...
