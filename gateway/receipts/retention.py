"""Retention as configured policy: a background job that erases receipt bodies past their
age and compacts the checkpoint history, by itself, a bounded amount at a time.

What goes and what stays:

* A receipt body, and its evidence files (``evidence/<receipt id>.*``), older than
  ``receipts.retention.body_days`` go: through `ReceiptLog.erase` with reason
  ``retention``, the same path as `ReceiptLog.expire` and ``ztgate audit expire``. The
  log records each index as erased and logs the erasure itself as an ``erasure`` leaf at
  its next checkpoint, so an audit bundle reports those receipts as ``erased``, never as
  missing.
* Leaves, erasure events, and the checkpoints verification needs stay. The checkpoint
  history beyond that (one a second while traffic flows) is thinned to one per
  ``checkpoint_history_keep_every_s`` by `ReceiptLog.compact_checkpoints`, which knows
  what verification needs.

Age is the body's ``created`` time in the log (when it became durable), as for
``ztgate audit expire``. Every log in the receipts directory is covered: the active one and
the frozen ones (whose erasures the active log appends).

Bounded twice. One pass erases at most ``max_per_pass`` bodies in one transaction on the
log's writer thread (the thread every answer's receipt is committed on), so an append
waits at most one pass, never a whole backlog: about 0.1 ms per body (bench/retention.py),
so ~25 ms at the default 250. And while a backlog is being worked off, the pause after a
full pass is `BACKLOG_IDLE_FACTOR` times the pass's own duration, so retention takes at
most `1 / (1 + BACKLOG_IDLE_FACTOR)` (10%) of the writer's time, however large the
backlog, and still erases about a thousand bodies a second. Once no pass is full the job
sleeps ``check_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.config import Retention
from gateway.receipts.log import LogError, ReceiptLog, StoredBody

__all__ = ["PassResult", "RetentionJob", "backlog_pause", "due_receipts"]

log = logging.getLogger(__name__)

# Checkpoints one pass looks at for compaction (about 20 µs each here, on the writer
# thread): about 0.1 s, then it resumes there at the next pass.
COMPACT_CHUNK = 5000

# While behind, the pause after a pass is this many times the pass's duration: the
# writer spends at most 1/(1 + 9) of its time on retention, the rest on appends.
BACKLOG_IDLE_FACTOR = 9.0
# ... but never less than this, so the answers that queued behind the pass go first.
BACKLOG_MIN_PAUSE_S = 0.05
REASON = "retention"


@dataclass(frozen=True, slots=True)
class PassResult:
    expired: int  # bodies erased
    compacted: int  # stored checkpoints deleted
    behind: bool  # the pass used its whole budget: more may be due
    seconds: float


def backlog_pause(pass_seconds: float) -> float:
    """The pause after a full pass (see the module docstring)."""
    return max(BACKLOG_MIN_PAUSE_S, pass_seconds * BACKLOG_IDLE_FACTOR)


def due_receipts(rl: ReceiptLog, cutoff: float, limit: int) -> list[str]:
    """Ids of at most `limit` bodies created before `cutoff` (POSIX seconds), oldest first.

    Bodies come in index order, which is creation order (a batch's bodies share one time,
    and batches are written in order), so the due ones are a prefix: reading stops at the
    first body that is not due. Reads at most `limit` + 1 rows. Should the wall clock have
    stepped back, a body behind a newer-looking one waits a pass or two; it is never
    erased early."""
    out: list[str] = []
    rows: Iterator[StoredBody] = iter(rl.bodies())
    try:
        for body in rows:
            if len(out) >= limit or body.created >= cutoff:
                break
            out.append(body.receipt_id)
    finally:
        close = getattr(rows, "close", None)  # release the read cursor now, not at GC
        if close is not None:
            close()
    return out


class RetentionMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.expired = Counter(
            "ztgate_receipts_expired",
            "Receipt bodies (and their evidence) erased by the retention job",
            registry=registry,
        )
        self.compacted = Counter(
            "ztgate_receipt_checkpoints_compacted",
            "Stored checkpoints deleted by the retention job (not needed for verification)",
            registry=registry,
        )
        self.failures = Counter(
            "ztgate_receipt_retention_failures",
            "Retention passes that failed (retried at the next interval)",
            registry=registry,
        )
        self.last_run = Gauge(
            "ztgate_receipt_retention_last_run_timestamp_seconds",
            "When the last retention pass finished successfully (alert if it falls behind)",
            registry=registry,
        )
        self.last_duration = Gauge(
            "ztgate_receipt_retention_last_run_duration_seconds",
            "How long the last successful retention pass took",
            registry=registry,
        )
        self.behind = Gauge(
            "ztgate_receipt_retention_behind",
            "1 if the last pass erased its max_per_pass and more bodies may be due, else 0",
            registry=registry,
        )


class RetentionJob:
    """The `Gateway.background` job: `run(stop)`, a pass now and then (`run_pass`).

    `logs` returns the logs to cover, the active one first (`ReceiptService.logs`); read at
    every pass, since the service reopens its log after a restart."""

    def __init__(
        self,
        logs: Callable[[], Sequence[ReceiptLog]],
        policy: Retention,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logs = logs
        self.policy = policy
        self.metrics = RetentionMetrics(registry)
        self.clock = clock  # judges bodies' ages (tests move it)

    async def run_pass(self) -> PassResult:
        t0 = time.perf_counter()
        expired, budget = 0, self.policy.max_per_pass
        logs = list(self.logs())
        if self.policy.body_days is not None:
            cutoff = self.clock() - self.policy.body_days * 86400.0
            for rl in logs:  # bounded: the logs in one receipts directory
                if budget <= 0:
                    break
                ids = due_receipts(rl, cutoff, budget)
                if not ids:
                    continue
                # The budget counts what was asked, not what was found: a body erased in
                # between (an erasure request) must not let a pass grow beyond its bound.
                budget -= len(ids)
                n = await rl.erase(ids, REASON)
                expired += n
                self.metrics.expired.inc(n)
        compacted = 0
        if self.policy.checkpoint_history_keep_every_s > 0 and logs:
            # The active log only: a frozen log's history no longer grows.
            compacted = await logs[0].compact_checkpoints(
                self.policy.checkpoint_history_keep_every_s,
                self.policy.checkpoint_history_keep_latest,
                limit=COMPACT_CHUNK,
            )
            self.metrics.compacted.inc(compacted)
        seconds = time.perf_counter() - t0
        behind = budget <= 0
        self.metrics.last_run.set(time.time())
        self.metrics.last_duration.set(seconds)
        self.metrics.behind.set(1 if behind else 0)
        if expired or compacted:
            log.info(
                "retention: erased %d receipt bodies, compacted %d checkpoints in %.3f s%s",
                expired,
                compacted,
                seconds,
                " (more due)" if behind else "",
            )
        return PassResult(expired, compacted, behind, seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: a pass, then a pause (`backlog_pause` while behind, else
        ``check_interval_s``). A pass that fails on the log or the disk is logged and
        counted and retried at the next interval: bodies kept a little longer do not make
        the replica unready. Anything else is a bug and goes to the supervisor."""
        while not stop.is_set():
            pause = self.policy.check_interval_s
            try:
                result = await self.run_pass()
                if result.behind:
                    pause = backlog_pause(result.seconds)
            except (LogError, OSError, sqlite3.Error) as exc:
                self.metrics.failures.inc()
                log.error("retention pass failed (retried in %.0f s): %s", pause, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
