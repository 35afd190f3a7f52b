"""The request pipeline: identity -> policy -> route -> verify, each stage a plain object.

A stage is `async def __call__(x: Exchange) -> None`: it reads what earlier stages put on
the exchange, adds its own part, or ends the request by raising a `Problem`. Each can be
built and tested alone with a hand-made Exchange.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import NodeConfig
from gateway.identity import Identity, IdentityResolver
from gateway.protocol.problems import Forbidden, NoHealthyNode
from gateway.protocol.tensors import InferRequest
from gateway.registry import ModelEntry
from gateway.routing.router import Router
from gateway.verify import MODES, Outcome, Verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What policy allows this request: which modes, which nodes, and why."""

    id: str
    allowed_modes: tuple[str, ...]
    node_allowed: Callable[[NodeConfig], bool]
    determining: tuple[str, ...] = ()


@dataclass
class Exchange:
    """One request as it moves through the stages."""

    scope: Mapping[str, Any]
    deadline: float  # time.monotonic()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    entry: ModelEntry | None = None
    request: InferRequest | None = None
    identity: Identity | None = None
    decision: Decision | None = None
    mode: str = "none"
    outcome: Outcome | None = None


class Stage(Protocol):
    async def __call__(self, x: Exchange) -> None: ...


class IdentityStage:
    def __init__(self, resolver: IdentityResolver) -> None:
        self.resolver = resolver

    async def __call__(self, x: Exchange) -> None:
        x.identity = self.resolver.resolve(dict(x.scope))


class AllowAuthenticated:
    """Placeholder policy until Cedar lands: any verified caller, the model's own modes.

    Deny-by-default still holds where it matters: no identity, no call.
    """

    async def __call__(self, x: Exchange) -> None:
        assert x.identity is not None and x.entry is not None
        x.decision = Decision(
            id=uuid.uuid4().hex,
            allowed_modes=tuple(m for m in MODES if m in x.entry.allowed_modes),
            node_allowed=lambda _node: True,
            determining=("config:allow-authenticated",),
        )


class ModeStage:
    """Chooses the verification mode: the client's ask if allowed, else the cheapest."""

    def __init__(self, verifiers: Mapping[str, Verifier]) -> None:
        self.verifiers = verifiers

    async def __call__(self, x: Exchange) -> None:
        assert x.decision is not None and x.request is not None
        allowed = [m for m in x.decision.allowed_modes if m in self.verifiers]
        asked = x.request.parameters.get("ztgate.verification")
        if asked is not None:
            if asked not in MODES:
                raise Forbidden(f"unknown verification mode {asked!r}; one of {', '.join(MODES)}")
            if asked not in allowed:
                raise Forbidden(f"verification mode {asked!r} is not allowed for this request")
            x.mode = str(asked)
        elif allowed:
            x.mode = allowed[0]
        else:
            raise Forbidden("no verification mode this gateway offers is allowed for this model")


class RouteStage:
    """Fails fast with 503 when no node may serve the request at all."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def __call__(self, x: Exchange) -> None:
        assert x.entry is not None and x.decision is not None
        if not self.router.candidates(x.entry.name, x.decision.node_allowed):
            raise NoHealthyNode(
                f"no healthy node allowed to serve {x.entry.name!r} right now", retry_after=1
            )


class VerifyStage:
    def __init__(self, verifiers: Mapping[str, Verifier], router: Router) -> None:
        self.verifiers = verifiers
        self.router = router

    async def __call__(self, x: Exchange) -> None:
        x.outcome = await self.verifiers[x.mode].run(x, self.router)


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    async def __call__(self, x: Exchange) -> None:
        for stage in self.stages:
            await stage(x)


def remaining(x: Exchange) -> float:
    return x.deadline - time.monotonic()
