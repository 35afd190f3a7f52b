"""Who is calling, and may they take a slot now: the stages before any body is read."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from gateway.identity import IdentityResolver
from gateway.pipeline.context import Caller
from gateway.policy.facts import Rate
from gateway.policy.live import LivePolicy
from gateway.protocol.problems import (
    Forbidden,
    Overloaded,
    RateLimited,
    StateUnavailable,
    Unauthenticated,
)
from gateway.registry import ModelEntry
from gateway.revocation import Revocations
from gateway.state import StateStore, StoreUnavailable
from gateway.telemetry import PROCESS_METRICS

# Retry-After for refusals while the shared store is unreachable: about one readiness
# probe (the gateway re-checks the store every second), so a client that honours it comes
# back once the store may be answering again.
STATE_RETRY_AFTER_S = 2


def state_unavailable(exc: StoreUnavailable) -> StateUnavailable:
    """A store call no stage mapped (an admin action publishing to the store): the store's
    problem type all the same, never its address; the cause is kept for readiness."""
    p = StateUnavailable(
        "this action needs shared state, which is unreachable", retry_after=STATE_RETRY_AFTER_S
    )
    p.__cause__ = exc
    return p


class IdentityStage:
    """The verified certificate, not expired, not revoked: checked on every request."""

    def __init__(self, resolver: IdentityResolver, revocations: Revocations) -> None:
        self.resolver = resolver
        self.revocations = revocations

    def __call__(self, scope: Mapping[str, Any], *, stale_ok: bool = False) -> Caller:
        """`stale_ok`: an inference, where policy decides what stale revocation data still
        allows (@stale, PolicyStage); everything else fails closed here."""
        identity = self.resolver.resolve(dict(scope))
        if self.revocations.revoked(identity.issuer, identity.serial):
            raise Unauthenticated("client certificate has been revoked")
        if not stale_ok and self.revocations.stale():
            # Fail closed: the last-known set may be missing a revocation by now. The
            # nodes are fine, so this is the shared store's problem type.
            raise StateUnavailable(
                "the revocation list could not be refreshed within its staleness budget",
                retry_after=5,
            )
        return Caller.of(identity)


async def take_token(store: StateStore, key: str, rate: Rate) -> None:
    """One token from a bucket in the shared store, or RateLimited; fails closed."""
    try:
        allowed, retry_after = await store.take_token(
            key, rate.count / rate.per_seconds, rate.count
        )
    except StoreUnavailable as exc:
        # Fail closed: an unlimited gateway is what the limit exists to prevent. The
        # detail is fixed text: `exc` names the store's address (logged, never sent),
        # and a stable detail lets identical refusals share one denial receipt.
        raise StateUnavailable(
            "the rate limit cannot be checked: shared state is unreachable",
            retry_after=STATE_RETRY_AFTER_S,
        ) from exc
    if not allowed:
        raise RateLimited(
            f"over the limit of {rate.count} requests per {rate.per_seconds}s",
            retry_after=max(retry_after, 0.001),
        )


class Concurrency:
    """Requests in progress on this replica, in all and per client identity.

    The rate limit bounds how often a client asks, not how much it holds at once: without
    these caps, one client's slow or large requests fill the event loop and the others
    wait. Per replica, not shared: what is bounded is this process's work.
    """

    RETRY_AFTER_S = 1.0

    def __init__(self, total: int, per_identity: int) -> None:
        self.total = total
        self.per_identity = per_identity
        self.in_flight = 0
        self.by_identity: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        self.take(key)
        try:
            yield
        finally:
            self.give_back(key)

    def take(self, key: str) -> None:
        """A slot for `key`, or the refusal; every taken slot is given back once."""
        held = self.by_identity.get(key, 0)
        if held >= self.per_identity:
            # Same type as the rate limit: to the client both mean "you, slow down".
            raise RateLimited(
                f"at most {self.per_identity} concurrent requests per client",
                retry_after=self.RETRY_AFTER_S,
            )
        if self.in_flight >= self.total:
            raise Overloaded(
                "the gateway is at its concurrency limit", retry_after=self.RETRY_AFTER_S
            )
        self.in_flight += 1
        self.by_identity[key] = held + 1

    def give_back(self, key: str) -> None:
        self.in_flight -= 1
        left = self.by_identity[key] - 1
        if left:
            self.by_identity[key] = left
        else:
            del self.by_identity[key]  # bounded by clients in flight, not clients seen


class AdmissionStage:
    """The per-identity admission rate, then a concurrency slot held until the answer is
    built. Before policy and before the body: a client cannot flood the gateway (or the
    log, with denials), and a refused request costs no body bytes and no loop time."""

    def __init__(self, store: StateStore, rate: Rate, concurrency: Concurrency) -> None:
        self.store = store
        self.rate = rate
        self.concurrency = concurrency

    @contextlib.asynccontextmanager
    async def __call__(self, caller: Caller) -> AsyncIterator[None]:
        key = await self.enter(caller)
        try:
            yield
        finally:
            self.leave(key)

    # The pipeline calls these two directly: the context manager's generator frames and
    # an AsyncExitStack cost ~10 us a request, for one try/finally.
    async def enter(self, caller: Caller) -> str:
        """Admitted, holding a slot (give it back with `leave`), or the refusal."""
        key = caller.identity.spiffe_id
        await take_token(self.store, f"admit:{key}", self.rate)
        self.concurrency.take(key)
        return key

    def leave(self, key: str) -> None:
        self.concurrency.give_back(key)


class PrePolicyStage:
    """Denies, before the body is read, a caller that no permit's scope can match for the
    model. It only ever denies, and never evaluates conditions (they may read the body):
    a request it lets through still gets the full decision later."""

    def __init__(self, policy: LivePolicy) -> None:
        self.policy = policy

    def __call__(self, caller: Caller, entry: ModelEntry) -> None:
        if not self.policy.engine.may_infer(caller.facts, entry.name):
            PROCESS_METRICS.denied(())  # no permit's scope matched: Cedar's default deny
            raise Forbidden(
                "policy denies this request: no permit matches this caller and model",
                extra={"allowed_modes": []},
            )
