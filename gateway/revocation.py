"""Revoked client certificates: checked on every request, grow-only, shared by replicas.

TLS alone does not do this: a kept-alive connection keeps its handshake, so the set is
consulted per request, keyed by (issuer, serial). Each replica keeps its own grow-only
copy on disk and pulls new entries from the shared store, so a wiped or compromised Redis
cannot un-revoke anyone. If the store cannot be reached the last-known set keeps serving
for the staleness budget; past it the gateway fails closed. Staleness is measured on a
clock that neither a restart nor a clock set back resets (gateway.clock).
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

from gateway.clock import PersistedClock
from gateway.state import StateStore, StoreUnavailable
from gateway.state.durable import FileRevocations

log = logging.getLogger(__name__)


class Revocations:
    def __init__(
        self,
        store: StateStore,
        local: Path | None,
        staleness_budget_s: float = 300.0,
        clock: PersistedClock | None = None,
    ) -> None:
        self.store = store
        self.clock = clock or PersistedClock(None)
        if self.clock.first_start:  # the budget runs from now
            self.clock.synced()
        self._local = FileRevocations(local) if local is not None else None
        self._entries: set[tuple[str, str]] = (
            set(self._local.since(0)[1]) if self._local is not None else set()
        )
        self._store_version = 0
        self.staleness_budget_s = staleness_budget_s
        self.sync_failures = 0

    @property
    def version(self) -> int:
        """Grows with every entry this replica learns: it keys the policy decision cache."""
        return len(self._entries)

    def revoked(self, issuer: str, serial: str) -> bool:
        return (issuer, serial.lower()) in self._entries

    def stale_for(self) -> float:
        last = self.clock.last_sync
        return math.inf if last is None else max(0.0, self.clock.now() - last)

    def stale(self) -> bool:
        return self.stale_for() > self.staleness_budget_s

    def _learn(self, issuer: str, serial: str) -> bool:
        entry = (issuer, serial.lower())
        if entry in self._entries:
            return False
        if self._local is not None:
            self._local.add(*entry)  # fsynced before it counts
        self._entries.add(entry)
        return True

    async def revoke(self, issuer: str, serial: str) -> bool:
        """Revoke locally (durably) and publish to the other replicas; True if new."""
        new = self._learn(issuer, serial)
        await self.store.add_revocation(issuer, serial.lower())
        log.warning("revoked certificate serial %s of %s", serial, issuer)
        return new

    async def sync(self) -> int:
        """Pull entries other replicas published; the number learnt, or -1 if unreachable."""
        try:
            return await asyncio.wait_for(self._sync(), timeout=5.0)
        except (StoreUnavailable, TimeoutError) as exc:
            self.sync_failures += 1
            log.error("revocation source unreachable (stale %.0fs): %s", self.stale_for(), exc)
            return -1

    async def _sync(self) -> int:
        version, entries = await self.store.revocations_since(self._store_version)
        reset = version < self._store_version
        if reset:
            # The store was reset (or replaced): pull everything again; nothing is forgotten
            # here, since the local copy only grows.
            log.error("revocation store went backwards (%d < %d)", version, self._store_version)
            version, entries = await self.store.revocations_since(0)
        if reset or self._store_version == 0:
            # ... and give it back what it lost, so a replica that never saw an entry (or
            # starts after the reset) still learns it from the store.
            for issuer, serial in sorted(self._entries - set(entries)):
                version = await self.store.add_revocation(issuer, serial)
        learnt = sum(self._learn(i, s) for i, s in entries)
        self._store_version = version
        self.clock.synced()
        return learnt

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sync()
            try:
                await asyncio.to_thread(self.clock.persist)
            except OSError as exc:  # a full disk must not stop revocation syncs
                log.error("clock record not written: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
