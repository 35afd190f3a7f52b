"""The decision log's writer: records leave the request path through a bounded queue.

A request only appends what the record is made of (the decision, who, what, when, and
its context for the log envelope's request and trace ids) to a deque; a writer thread
wakes every `INTERVAL_S`, builds the queued JSON lines and hands them to logging (the
stderr handler, or `[logging]`'s rotating file). It is not woken per record: a wake-up
per request (a futex call and a GIL hand-over each) costs about what moving the line
saves (bench/README.md, "Lean per request").
A full queue drops the record and counts it (`ztgate_decision_log_dropped_total`): the
request is never slowed or failed by its log line. `flush()` drains on the caller's
thread; the process drains at exit.
"""

from __future__ import annotations

import atexit
import contextvars
import datetime as dt
import json
import logging
import os
import threading
import time
from collections import deque
from typing import NamedTuple

from gateway.policy.engine import InferDecision, decision_record
from gateway.policy.facts import IdentityFacts
from gateway.telemetry import DECISIONS_LOGGER, PROCESS_METRICS

log = logging.getLogger(__name__)
decisions = logging.getLogger(DECISIONS_LOGGER)

# About 10-20 s of records at the gateway's rate on one core: a writer stalled that long
# (a full disk, a blocked stderr pipe) costs records, never memory or latency.
CAPACITY = 10_000
INTERVAL_S = 0.05  # how late a line may reach the log; at most 20 wake-ups a second


class Pending(NamedTuple):
    decision: InferDecision
    identity: IdentityFacts
    model: str
    mode: str | None
    created: float  # time.time() at the decision: the record's own time
    context: contextvars.Context  # for the envelope's request_id and trace_id


class DecisionLog:
    def __init__(self, capacity: int = CAPACITY, interval_s: float = INTERVAL_S) -> None:
        self.capacity = capacity
        self.interval_s = interval_s
        self._pending: deque[Pending] = deque()
        self._writing = threading.Lock()  # one drainer at a time keeps records in order
        self._thread: threading.Thread | None = None
        self._started = threading.Lock()

    def put(
        self, decision: InferDecision, identity: IdentityFacts, model: str, mode: str | None
    ) -> bool:
        """Queue one record; False (and counted) when the queue is full."""
        if len(self._pending) >= self.capacity:
            PROCESS_METRICS.decision_log_dropped.inc()
            return False
        # copy_context is O(1): the record is formatted later under the request's ids.
        self._pending.append(
            Pending(decision, identity, model, mode, time.time(), contextvars.copy_context())
        )
        if self._thread is None:
            self._start()
        return True

    def flush(self, timeout_s: float = -1) -> bool:
        """Write every queued record now, on this thread, and return when they are; with
        `timeout_s`, give up (False) when the writer holds the queue that long (a sink
        blocked on a full disk or pipe must not hang the process's exit)."""
        if not self._writing.acquire(timeout=timeout_s):
            return False
        try:
            self._drain()
        finally:
            self._writing.release()
        return True

    def __len__(self) -> int:
        return len(self._pending)

    def _start(self) -> None:
        with self._started:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ztgate-decision-log", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            if self._pending:
                with self._writing:
                    self._drain()

    def _drain(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            try:
                item.context.run(_write, item)
            except Exception:  # one bad record must not stop the writer
                log.exception("a decision record could not be written")

    def _after_fork(self) -> None:
        # The parent writes what it queued; the child starts empty, with its own thread.
        self._pending.clear()
        self._writing = threading.Lock()
        self._started = threading.Lock()
        self._thread = None


def _write(item: Pending) -> None:
    now = dt.datetime.fromtimestamp(item.created, dt.UTC)
    line = json.dumps(decision_record(item.decision, item.identity, item.model, item.mode, now=now))
    record = decisions.makeRecord(decisions.name, logging.INFO, __file__, 0, line, (), None)
    record.created, record.msecs = item.created, (item.created % 1) * 1000
    # handle(), not info(): the level was checked when the decision was queued.
    decisions.handle(record)


WRITER = DecisionLog()
EXIT_FLUSH_S = 2.0
atexit.register(WRITER.flush, EXIT_FLUSH_S)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WRITER._after_fork)


def flush_decisions(timeout_s: float = -1) -> bool:
    """Every decision logged so far is written when this returns (tests, shutdown); False
    when `timeout_s` passed with the writer still busy."""
    return WRITER.flush(timeout_s)
