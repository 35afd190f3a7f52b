"""In-process `StateStore` for a single gateway (no Redis configured).

No locks: every method runs to completion without awaiting (except the revocation file's
fsync, which is serialised by `FileRevocations` itself), so the event loop makes each one
atomic. Every table is bounded, because keys (bucket names, nonces) can come from clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.state import (
    TOKEN_SLACK_S,
    Clock,
    StoreUnavailable,
    check_bucket_args,
    check_eject_args,
    check_spend_args,
    check_ttl,
)
from gateway.state.durable import FileRevocations

__all__ = ["MemoryStore"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Node:
    failures: int = 0
    ejections: int = 0
    until: float = 0.0  # end of the current/last ejection; 0 = never ejected


@dataclass(slots=True)
class _Bucket:
    tokens: float
    ts: float


class MemoryStore:
    """`StateStore` in this process's memory; revocations optionally durable on disk."""

    def __init__(
        self,
        *,
        revocations_path: Path | None = None,
        clock: Clock = time.time,
        max_keys: int = 100_000,
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # OrderedDicts used as LRUs: move_to_end on touch, popitem(last=False) to evict.
        self._nodes: OrderedDict[str, _Node] = OrderedDict()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._nonces: OrderedDict[str, float] = OrderedDict()  # key -> expiry
        self._meters: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (n, expiry)
        self._logs: dict[str, str] = {}  # receipt log id -> replica URL (this replica only)
        self._next_full_sweep = 0.0
        self._file = FileRevocations(revocations_path) if revocations_path else None
        self._revoked: list[tuple[str, str]] = []  # used when there is no file
        self._revoked_set: set[tuple[str, str]] = set()
        self._evidence: dict[str, tuple[dict[str, int], float]] = {}
        self._quarantine: dict[str, str] = {}

    # -- node health ----------------------------------------------------------------
    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
            if len(self._nodes) > self._max_keys:
                self._nodes.popitem(last=False)
        else:
            self._nodes.move_to_end(node_id)
        return node

    async def record_failure(self, node_id: str) -> int:
        node = self._node(node_id)
        node.failures += 1
        return node.failures

    async def record_success(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None:
            node.failures = 0

    async def eject(self, node_id: str, base_s: float, max_s: float) -> float:
        check_eject_args(base_s, max_s)
        now = self._clock()
        node = self._node(node_id)
        node.failures = 0
        if node.until > now:
            return node.until - now  # already out: idempotent across replicas
        if node.ejections and now - node.until >= max_s:
            node.ejections = 0  # healthy long enough: forget the history
        duration = min(base_s * 2.0**node.ejections, max_s)
        node.ejections += 1
        node.until = now + duration
        return duration

    async def ejected_until(self, node_ids: Iterable[str]) -> dict[str, float]:
        now = self._clock()
        out: dict[str, float] = {}
        for node_id in node_ids:
            node = self._nodes.get(node_id)
            if node is not None and node.until > now:
                out[node_id] = node.until
        return out

    async def readmit(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None:
            node.until = min(node.until, self._clock())
            node.failures = 0

    # -- rate limiting --------------------------------------------------------------
    async def take_token(
        self, key: str, rate_per_s: float, burst: int, cost: int = 1
    ) -> tuple[bool, float]:
        check_bucket_args(rate_per_s, burst, cost)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            # Evicting the least recently used bucket only ever forgives a client (it
            # comes back full), and an idle bucket is the one most likely to be full.
            bucket = self._buckets[key] = _Bucket(float(burst), now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            if now > bucket.ts:  # a clock stepping back refills nothing
                bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.ts) * rate_per_s)
                bucket.ts = now
        # Slack of one microsecond of refill: epoch floats carry ~0.2 us of rounding, and
        # a caller who waits exactly retry_after must be admitted.
        if bucket.tokens + rate_per_s * TOKEN_SLACK_S >= cost:
            bucket.tokens -= cost
            return True, 0.0
        return False, (cost - bucket.tokens) / rate_per_s

    # -- token meters ---------------------------------------------------------------
    async def spend(self, key: str, amount: int, limit: int, ttl_s: float) -> tuple[bool, int]:
        check_spend_args(amount, limit, ttl_s)
        now = self._clock()
        got = self._meters.get(key)
        if got is not None and got[1] <= now:
            del self._meters[key]
            got = None
        if got is None:
            while self._meters:  # expired windows from the old end, amortised O(1)
                oldest, (_, exp) = next(iter(self._meters.items()))
                if exp > now:
                    break
                del self._meters[oldest]
            if amount <= 0:
                return True, 0
            if len(self._meters) >= self._max_keys:
                # Evicting a live meter would forgive a spent budget; refuse instead.
                raise StoreUnavailable("token meter table full")
            count, expiry = 0, now + ttl_s
        else:
            count, expiry = got
        if amount > 0 and count + amount > limit:
            return False, count
        count = max(0, count + amount)
        self._meters[key] = (count, expiry)
        return True, count

    # -- revocations ----------------------------------------------------------------
    async def add_revocation(self, issuer: str, serial: str) -> int:
        if self._file is not None:
            if (issuer, serial) in self._file:
                return self._file.version  # skip the thread hop for a no-op
            # fsync blocks for milliseconds: keep it off the event loop.
            return await asyncio.to_thread(self._file.add, issuer, serial)
        entry = (issuer, serial)
        if entry not in self._revoked_set:
            self._revoked_set.add(entry)
            self._revoked.append(entry)
        return len(self._revoked)

    async def revocations_since(self, version: int) -> tuple[int, set[tuple[str, str]]]:
        if self._file is not None:
            return self._file.since(version)
        return len(self._revoked), set(self._revoked[max(0, version) :])

    # -- replay protection ----------------------------------------------------------
    async def publish_log(self, log_id: str, url: str) -> None:
        self._logs[log_id] = url

    async def find_log(self, log_id: str) -> str | None:
        return self._logs.get(log_id)

    async def check_nonce(self, key: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        now = self._clock()
        expiry = self._nonces.get(key)
        if expiry is not None:
            if expiry > now:
                return False
            del self._nonces[key]  # re-inserted below, at the young end
        # Insertion order ~ expiry order when TTLs are alike: drop expired ones from the
        # old end, amortised O(1) per call.
        while self._nonces:
            oldest_key, oldest_exp = next(iter(self._nonces.items()))
            if oldest_exp > now:
                break
            del self._nonces[oldest_key]
        if len(self._nonces) >= self._max_keys and now >= self._next_full_sweep:
            # Mixed TTLs can hide expired entries behind a live one; a full O(n) sweep,
            # at most once a second so a flood cannot make every call O(n).
            self._next_full_sweep = now + 1.0
            live = {k: e for k, e in self._nonces.items() if e > now}
            self._nonces = OrderedDict(live)
        if len(self._nonces) >= self._max_keys:
            # Evicting a live nonce would re-open it to replay; refuse instead.
            log.warning("nonce cache full (%d live entries)", len(self._nonces))
            raise StoreUnavailable("nonce cache full")
        self._nonces[key] = now + ttl_s
        return True

    # -- lie accounting -------------------------------------------------------------
    async def add_evidence(
        self, subject: str, counts: Mapping[str, int], step: float
    ) -> tuple[dict[str, int], float]:
        # Not an LRU: evidence must not be evicted by churn (keys are signed names).
        have, stat = self._evidence.setdefault(subject, ({}, 0.0))
        for k, n in counts.items():
            have[k] = have.get(k, 0) + int(n)
        stat = max(0.0, stat + step)
        self._evidence[subject] = (have, stat)
        return dict(have), stat

    async def evidence(self, subjects: Iterable[str]) -> dict[str, tuple[dict[str, int], float]]:
        return {
            s: (dict(self._evidence[s][0]), self._evidence[s][1])
            for s in subjects
            if s in self._evidence
        }

    async def reset_statistic(self, subject: str) -> None:
        if subject in self._evidence:
            self._evidence[subject] = (self._evidence[subject][0], 0.0)

    async def put_quarantine(self, node_id: str, record: str) -> None:
        self._quarantine[node_id] = record

    async def quarantine_records(self) -> dict[str, str]:
        return dict(self._quarantine)

    # -- lifecycle ------------------------------------------------------------------
    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
