"""Per-site bounds at the core's forward listener: a token bucket and a concurrency cap
for each forwarding site, taken before the body is read or a nonce is spent, so one edge
(captured or only busy) can neither hold the core's memory nor fill the shared nonce
cache that clients' `ztgate-nonce` checks use. Sites come from verified forwarder
certificates only, so the table grows with the sites the forwarder CA issued, no more.

A generation can hold its slot for as long as its stream lasts: generations together
take at most half of a site's slots (at least one), so a site's long streams leave the
rest to its inferences."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gateway.protocol.problems import Overloaded, RateLimited


@dataclass
class _Site:
    tokens: float
    stamp: float
    busy: int = 0
    generating: int = 0


@dataclass
class SiteLimits:
    rate_per_s: float  # statements a site may send per second, on average
    burst: int  # and at once
    concurrency: int  # requests of one site in the core at a time
    clock: Callable[[], float] = time.monotonic
    _sites: dict[str, _Site] = field(default_factory=dict)

    @contextmanager
    def slot(self, site: str, *, generates: bool = False) -> Iterator[None]:
        """One of `site`'s concurrent slots and one of its tokens, or the refusal."""
        now = self.clock()
        s = self._sites.setdefault(site, _Site(float(self.burst), now))
        if s.busy >= self.concurrency:
            raise Overloaded(
                f"this site has {self.concurrency} forwarded requests in the core already",
                extra={"reason": "site-concurrency"},
            )
        if generates and s.generating >= self.generation_slots:
            raise Overloaded(
                f"this site has {self.generation_slots} forwarded generations in the core already",
                extra={"reason": "site-generations"},
            )
        s.tokens = min(float(self.burst), s.tokens + (now - s.stamp) * self.rate_per_s)
        s.stamp = now
        if s.tokens < 1.0:
            raise RateLimited(
                "this site forwards faster than the core accepts",
                retry_after=(1.0 - s.tokens) / self.rate_per_s,
                extra={"reason": "site-rate"},
            )
        s.tokens -= 1.0
        s.busy += 1
        s.generating += generates
        try:
            yield
        finally:
            s.busy -= 1
            s.generating -= generates

    @property
    def generation_slots(self) -> int:
        return max(1, self.concurrency // 2)

    def busy(self, site: str) -> int:
        s = self._sites.get(site)
        return 0 if s is None else s.busy
