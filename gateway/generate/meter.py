"""Token limits per client identity: tokens per minute and budgets over longer windows.

A generation reserves prompt + max_tokens in every window its permits set
(`InferDecision.token_budgets`) before a node is asked, and settles to the tokens actually
used when it ends, whatever ended it: a limit holds even while streams are in flight, and
a short answer costs only what it used. Counters live in the shared store (one per
identity, window length and window), so replicas on one Redis share them. Windows are
fixed (a minute, an hour, a day, a week from the epoch): a client may spend a window's
tokens at its end and the next window's at its start. Fails closed: with the store
unreachable, nothing is generated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.pipeline.admission import STATE_RETRY_AFTER_S
from gateway.policy.facts import TokenBudget
from gateway.protocol.problems import Forbidden, RateLimited, StateUnavailable
from gateway.state import StateStore, StoreUnavailable

log = logging.getLogger(__name__)

# Counters outlive their window a little, so a settle at the window's edge finds its own.
_TTL_SLACK_S = 60.0


@dataclass(frozen=True)
class Reservation:
    keys: tuple[tuple[str, TokenBudget], ...]
    amount: int
    ttl: float


class TokenMeter:
    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def _key(self, identity: str, budget: TokenBudget, now: float) -> str:
        window = int(now // budget.per_seconds)
        return f"tokens:{identity}:{budget.per_seconds}:{window}"

    async def reserve(
        self, identity: str, budgets: Sequence[TokenBudget], amount: int
    ) -> Reservation:
        """Reserve `amount` tokens in every window, or none: RateLimited (Retry-After: the
        window's end) when one is spent, Forbidden when `amount` could never fit."""
        now = self.clock()
        for b in budgets:
            if amount > b.count:
                raise Forbidden(
                    f"prompt and max_tokens ({amount} tokens) exceed the token limit of {b} "
                    "for this client; ask for fewer max_tokens",
                    extra={"token_limit": str(b)},
                )
        taken: list[tuple[str, TokenBudget]] = []
        try:
            for b in budgets:
                key = self._key(identity, b, now)
                ok, used = await self.store.spend(
                    key, amount, b.count, b.per_seconds + _TTL_SLACK_S
                )
                if not ok:
                    end = (int(now // b.per_seconds) + 1) * b.per_seconds
                    raise RateLimited(
                        f"over the token limit of {b}: {used} of {b.count} used in this window",
                        retry_after=max(end - now, 0.001),
                        extra={"token_limit": str(b)},
                    )
                taken.append((key, b))
        except BaseException as exc:
            await self._refund(taken, amount)
            if isinstance(exc, StoreUnavailable):
                raise StateUnavailable(
                    "the token limit cannot be checked: shared state is unreachable",
                    retry_after=STATE_RETRY_AFTER_S,
                ) from exc
            raise
        return Reservation(tuple(taken), amount, now)

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Give back what was reserved and not used (never raises: a lost refund only
        over-charges the client, and is logged)."""
        await self._refund(reservation.keys, reservation.amount - max(0, used))

    async def _refund(self, keys: Sequence[tuple[str, TokenBudget]], amount: int) -> None:
        if amount <= 0:
            return
        for key, b in keys:
            try:
                await self.store.spend(key, -amount, b.count, b.per_seconds + _TTL_SLACK_S)
            except StoreUnavailable as exc:
                log.warning("token refund of %d lost (store unreachable): %s", amount, exc)
