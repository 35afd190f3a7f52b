"""Soft state shared by gateway replicas: node health, rate limits, revocations, nonces.

One async interface, two implementations:

* `gateway.state.memory.MemoryStore` - one process, in memory (revocations optionally on
  disk through `gateway.state.durable.FileRevocations`), used when no Redis URL is set;
* `gateway.state.redis.RedisStore` - many replicas sharing one Redis.

Pick one with `gateway.state.factory.open_store`. Implementations are imported lazily so
that a gateway without Redis never imports redis-py.

Every time-based decision is taken against one clock: an injectable `Clock` in memory, and
the Redis server's `TIME` inside Lua scripts (so replicas with skewed clocks agree). Both
stores accept `clock=` so tests can drive time by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

__all__ = [
    "TOKEN_SLACK_S",
    "Clock",
    "StateStore",
    "StoreUnavailable",
    "check_bucket_args",
    "check_eject_args",
    "check_ttl",
]

# Wall-clock epoch seconds. Epoch rather than monotonic because values such as
# `ejected_until` are shared between processes and hosts.
Clock = Callable[[], float]

# A token bucket admits a request that is short by at most this many seconds of refill.
# Epoch-second floats are only precise to ~0.2 us, so without it a caller that waited
# exactly `retry_after` could be refused by rounding; the cost is a negligible over-admit.
TOKEN_SLACK_S = 1e-6


class StoreUnavailable(Exception):
    """The store cannot answer now (unreachable, timed out, full, read-only).

    Callers decide whether to fail open or closed; this type is what lets them tell
    "the store said no" apart from "there was no answer".
    """


@runtime_checkable
class StateStore(Protocol):
    """What the gateway needs from shared state. All methods may raise `StoreUnavailable`
    (except `ping`, which answers False, and `close`)."""

    # -- node health ----------------------------------------------------------------
    async def record_failure(self, node_id: str) -> int:
        """Count one more consecutive failure of `node_id`; returns the new count."""
        ...

    async def record_success(self, node_id: str) -> None:
        """Reset the consecutive-failure count of `node_id`."""
        ...

    async def eject(self, node_id: str, base_s: float, max_s: float) -> float:
        """Eject `node_id` for min(base_s * 2**times_ejected, max_s) seconds; returns it.

        Idempotent while ejected: replicas that see the same failures may all call it, so a
        node already ejected keeps its deadline and the remaining seconds are returned.
        Ejecting resets the failure count. The ejection count is forgotten once the node
        has stayed admitted for `max_s` after its last ejection ended.
        """
        ...

    async def ejected_until(self, node_ids: Iterable[str]) -> dict[str, float]:
        """Epoch seconds until which each still-ejected node is out; others are absent."""
        ...

    async def readmit(self, node_id: str) -> None:
        """End an ejection now (keeps the ejection count, so flapping keeps backing off)."""
        ...

    # -- rate limiting --------------------------------------------------------------
    async def take_token(
        self, key: str, rate_per_s: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        """Atomically take `cost` tokens from bucket `key` (starts full at `burst`, refills
        at `rate_per_s`). Returns (allowed, retry_after_s); retry_after is 0 if allowed."""
        ...

    # -- token meters (generative models) ------------------------------------------
    async def spend(self, key: str, amount: int, limit: int, ttl_s: float) -> tuple[bool, int]:
        """Atomically add `amount` to counter `key` unless that would pass `limit`; a
        negative `amount` (a refund) always applies, never below 0. The counter expires
        `ttl_s` after its first write (the caller names the window in `key`). Returns
        (applied, the count after the call)."""
        ...

    # -- revocations ----------------------------------------------------------------
    async def add_revocation(self, issuer: str, serial: str) -> int:
        """Add to the grow-only revocation set; returns the set's version after the call
        (re-adding is a no-op returning the current version)."""
        ...

    async def revocations_since(self, version: int) -> tuple[int, set[tuple[str, str]]]:
        """(current version, entries added after `version`). If the returned version is
        lower than the one passed, the store was reset: resync from 0."""
        ...

    # -- replay protection ----------------------------------------------------------
    async def check_nonce(self, key: str, ttl_s: float) -> bool:
        """True the first time `key` is seen within `ttl_s`, False on replay."""
        ...

    # -- where each replica's receipt log lives -------------------------------------
    async def publish_log(self, log_id: str, url: str) -> None:
        """Announce that `log_id` is served at `url` (this replica's API base URL)."""
        ...

    async def find_log(self, log_id: str) -> str | None:
        """The base URL of the replica holding `log_id`, if any replica announced it."""
        ...

    # -- lie accounting (gateway.routing.reputation, docs/reputation.md) ---------------
    async def add_evidence(
        self, subject: str, counts: Mapping[str, int], step: float
    ) -> tuple[dict[str, int], float]:
        """Add `counts` to the evidence record of `subject` (a node's signed identity or a
        provider) and move its test statistic by `step`, floored at 0, atomically; returns
        the record's counts and statistic after the call. Records never expire."""
        ...

    async def evidence(self, subjects: Iterable[str]) -> dict[str, tuple[dict[str, int], float]]:
        """The records of `subjects` that exist: counts and statistic."""
        ...

    async def reset_statistic(self, subject: str) -> None:
        """Set the test statistic of `subject` to 0, keeping its counts (a release)."""
        ...

    async def put_quarantine(self, node_id: str, record: str) -> None:
        """Store the latest quarantine event (JSON) of `node_id`, replacing the previous."""
        ...

    async def quarantine_records(self) -> dict[str, str]:
        """Every node's latest quarantine event as stored."""
        ...

    # -- lifecycle ------------------------------------------------------------------
    async def ping(self) -> bool:
        """True if the store answers now; never raises."""
        ...

    async def close(self) -> None: ...


def check_bucket_args(rate_per_s: float, burst: int, cost: int) -> None:
    """Shared argument checks, so both stores reject the same nonsense the same way."""
    if not rate_per_s > 0:  # `not >` also rejects NaN
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst}")
    if not 1 <= cost <= burst:
        # A cost above burst could never be admitted; better a loud error than a
        # request that waits forever.
        raise ValueError(f"cost must be in [1, burst={burst}], got {cost}")


def check_spend_args(amount: int, limit: int, ttl_s: float) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if amount > limit:
        # Could never be admitted: a loud error rather than a refusal forever.
        raise ValueError(f"amount {amount} exceeds limit {limit}")
    check_ttl(ttl_s)


def check_eject_args(base_s: float, max_s: float) -> None:
    if not 0 < base_s <= max_s:
        raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s} max_s={max_s}")


def check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
