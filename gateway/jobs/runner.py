"""The jobs runner: a bounded background worker that runs queued jobs through the very
route the synchronous call takes, in process.

A job runs as an ASGI request to the API app itself (`/v2/models/{name}/infer` or
`/generate`), whose TLS extension carries the certificate the submitter presented at
submit. So every stage runs again at run time: expiry and revocation of that certificate,
admission, policy, the mode, the node call, the receipt. The certificate is the one the
TLS layer verified when the job was submitted; only this module puts one into a scope
without a handshake, and only from the job store.

Exactly once, as far as the store can make it: a run is marked (and a dispatch counted)
durably before it starts, and its one result is recorded only over a running job. A
crash between the node's answer and that record runs the job again: the node may compute
it twice (both dispatches counted in the job and in `ztgate_job_dispatches_total`), and
the client is given only the result recorded. Its receipt is logged once too: every run
of a job carries the job (`gateway/jobs/scope.py`: its id and a seed derived from it with
the job key), the receipt log indexes answer receipts by job id, and a second run that
answers the same gives the first run's receipt (gateway/receipts/service.py).

That index is per receipt log, and replicas sharing Redis keep a log each: so before a
run's answer receipt is appended, the run marks the job with its log (`mark`, one store
round trip), and a claim leaves a job marked for another replica's log to that replica
(it comes back with its data dir, finds the receipt in its own index) until the mark is
`jobs.adopt_after_s` old. A replica that adopts it then logs a receipt naming the logs
it was marked for (`ext.supersedes_in`): a second receipt, never a silent one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.config import Jobs
from gateway.jobs.model import PROBLEM_HEADERS, JobBackend, JobRow, Outcome
from gateway.jobs.scope import JOB_EXTENSION, JobScope, is_forwarded, job_seed
from gateway.jobs.seal import seal, seal_result
from gateway.protocol.problems import DeadlineExceeded, Internal
from gateway.state import StoreUnavailable

__all__ = ["RETRY_STATUSES", "Runner", "call_app", "receipt_of"]

log = logging.getLogger(__name__)

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

# What a node outage, an overloaded gateway or an unreachable store answer: retried with
# backoff. Anything else (a refusal, a bad input, a lie nobody could settle) is final.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
POLL_S = 0.25  # how often the runner looks for due jobs when nothing woke it
EXPIRE_INTERVAL_S = 5.0
# A run that outlives every deadline the pipeline sets has hung: give it up, retry later.
RUN_TIMEOUT_S = 900.0
# Tests only: set in a gateway's environment, the process dies (as a SIGKILL would leave
# it) after a job's run answered 200, its receipt durable, before the result is recorded:
# the one crash the exactly-once receipt must survive, placed where a test can find it.
CRASH_ENV = "ZTGATE_TEST_CRASH_BEFORE_JOB_RECORD"


class NotRunning(Exception):
    """A run reached its receipt after its job stopped running (see `Runner.mark`)."""


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.submitted = Counter("ztgate_jobs_submitted", "Jobs accepted", registry=registry)
        self.finished = Counter(
            "ztgate_jobs_finished", "Jobs finished, by state", ["state"], registry=registry
        )
        self.dispatches = Counter(
            "ztgate_job_dispatches",
            "Job runs started (each may reach a node; a crash mid-run makes two)",
            registry=registry,
        )
        self.retries = Counter(
            "ztgate_job_retries", "Job runs that will be retried", registry=registry
        )
        self.expired = Counter(
            "ztgate_jobs_expired", "Jobs failed for being older than max_age_s", registry=registry
        )
        self.reruns = Counter(
            "ztgate_job_reruns",
            "Job runs that answered after an earlier run's receipt was logged: its receipt "
            "reused (the same answer) or superseded (a different one)",
            ["receipt"],
            registry=registry,
        )


async def call_app(
    app: ASGIApp,
    path: str,
    cert: str,
    headers: dict[str, str],
    body: bytes,
    job: JobScope | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST `body` to `path` on `app` as the holder of `cert`; the whole response.
    `job`: the job this request runs for (its receipt names it)."""
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw_headers.append((b"content-length", str(len(body)).encode()))
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw_headers,
        "client": ("127.0.0.1", 0),
        "server": None,
        "state": {},
        "extensions": {"tls": {"client_cert_chain": [cert], "client_cert_error": None}},
    }
    if job is not None:
        scope["extensions"][JOB_EXTENSION] = job
    sent = False
    done = asyncio.Event()

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # no disconnect until the response is out
        return {"type": "http.disconnect"}

    status = 500
    out_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            for k, v in message.get("headers", []):
                out_headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    out_headers.pop("content-length", None)
    return status, out_headers, b"".join(chunks)


def receipt_of(headers: dict[str, str], body: bytes) -> str | None:
    """The receipt id a successful sync answer names (KServe v2 parameters, or the
    generate extension's `ztgate` object)."""
    head = body
    length = headers.get("inference-header-content-length")
    if length is not None and length.isdigit():
        head = body[: int(length)]
    try:
        doc = json.loads(head)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    params = doc.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("ztgate.receipt_id"), str):
        return str(params["ztgate.receipt_id"])
    z = doc.get("ztgate")
    if isinstance(z, dict) and isinstance(z.get("receipt_id"), str):
        return str(z["receipt_id"])
    return None


def expired_problem() -> bytes:
    p = DeadlineExceeded("the job was not done within jobs.max_age_s")
    return json.dumps(p.to_dict()).encode()


EXPIRED_HEADERS = json.loads(PROBLEM_HEADERS)


class Runner:
    """`run(stop)` is the gateway's background job; `app` is set once the API app exists.

    `hold` keeps due jobs queued (nothing new starts; what runs finishes): tests set it
    to make a job wait for a revocation or a burst; no route sets it."""

    def __init__(
        self,
        store: JobBackend,
        cfg: Jobs,
        key: bytes,
        metrics: JobMetrics,
        retention_s: float | None = None,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.key = key
        self.metrics = metrics
        # Results go with their receipts: never kept longer than receipt bodies are.
        self.result_ttl_s = min(cfg.result_ttl_s, retention_s or cfg.result_ttl_s)
        self.app: ASGIApp | None = None
        self.wake = asyncio.Event()
        self.hold = False
        # This replica's receipt logs, current and frozen (set by the jobs service).
        self.logs: Callable[[], Sequence[str]] = tuple
        self._tasks: set[asyncio.Task[None]] = set()
        # Job id -> the running run's `executions` when claimed: its fence in the store.
        self._runs: dict[str, int] = {}
        # Whether this replica's receipt log failed its last answer (set by the jobs
        # service): each run marks its job for that log, which holds the job here until
        # `adopt_after_s`, so only one run at a time is tried, at most every
        # `backoff_max_s`, until an append succeeds.
        self.log_failing: Callable[[], bool] = lambda: False
        self._probe_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        requeued = await self.store.requeue_running()
        if requeued:
            log.warning("jobs: %d interrupted job(s) will run again", requeued)
        next_expiry = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                try:
                    if loop.time() >= next_expiry:
                        await self._expire()
                        next_expiry = loop.time() + EXPIRE_INTERVAL_S
                    free = self._free(loop.time())
                    if free > 0 and not self.hold and self.app is not None:
                        claimed = await self.store.claim(free, self.logs(), self.cfg.adopt_after_s)
                        if claimed and self.log_failing():
                            self._probe_at = loop.time() + self.cfg.backoff_max_s
                        for row in claimed:
                            task = asyncio.create_task(self._run_one(row))
                            self._tasks.add(task)
                            task.add_done_callback(self._done)
                except StoreUnavailable as exc:  # jobs wait; the state probe reports it
                    log.warning("jobs: the job store did not answer: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL_S)
                self.wake.clear()
        finally:
            # Jobs cut off here stay `running` in the store and run again at the next start.
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)

    def _free(self, now: float) -> int:
        """How many jobs to claim now (`log_failing`: one, when none runs and none was
        tried in the last `backoff_max_s`)."""
        if not self.log_failing():
            return self.cfg.workers - len(self._tasks)
        return 0 if self._tasks or now < self._probe_at else 1

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake.set()

    async def _expire(self) -> None:
        problem = expired_problem()

        def mac_for(job_id: str) -> str:
            return seal_result(
                self.key,
                job_id=job_id,
                state="failed",
                status=504,
                headers=EXPIRED_HEADERS,
                result=problem,
                receipt_id=None,
            )

        expired, deleted = await self.store.expire(
            self.cfg.max_age_s, self.result_ttl_s, problem, mac_for
        )
        if expired:
            self.metrics.expired.inc(expired)
            self.metrics.finished.labels("failed").inc(expired)
            log.info("jobs: %d expired before they could run", expired)
        if deleted:
            log.info("jobs: %d finished job(s) past jobs.result_ttl_s deleted", deleted)

    async def _run_one(self, row: JobRow) -> None:
        assert self.app is not None
        self.metrics.dispatches.inc()
        self._runs[row.id] = row.executions
        lease = None
        if self.store.lease_s is not None:
            lease = asyncio.create_task(self._renew(row.id, self.store.lease_s / 3))
        try:
            await self._run(row)
        except StoreUnavailable as exc:
            # Not recorded: the job runs again (on disk at the next start, in Redis once
            # its lease ends), a second dispatch counted.
            log.error("job %s: its outcome could not be stored: %s", row.id, exc)
        finally:
            if self._runs.get(row.id) == row.executions:
                del self._runs[row.id]
            if lease is not None:
                lease.cancel()

    async def mark(self, job_id: str, log_id: str) -> tuple[str, ...]:
        """The receipt service's hook, before a job's answer receipt goes into `log_id`:
        every log the job was marked for. A job no longer running as this run (another run
        finished it or took it over when this one's lease lapsed, or it expired) gets no
        receipt from this run: refused."""
        if is_forwarded(job_id):  # an edge's job: the edge's store has it, this one none
            return ()
        marks = await self.store.mark(job_id, log_id, self._runs.get(job_id, -1))
        if marks is None:
            raise NotRunning(f"job {job_id} is no longer running")
        return marks

    async def _renew(self, job_id: str, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(StoreUnavailable):
                await self.store.renew(job_id)

    def _sealed(self, row: JobRow) -> bool:
        if row.cert is None or row.body is None or row.mac is None:
            return False
        expected = seal(
            self.key,
            job_id=row.id,
            owner=row.owner,
            route=row.route,
            model=row.model,
            created=row.created,
            cert=row.cert,
            headers=row.headers,
            body=row.body,
        )
        return hmac.compare_digest(expected, row.mac)

    async def _finish(
        self, row: JobRow, state: str, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        """Record the one answer, sealed (a poll checks the seal: gateway/jobs/seal.py)."""
        receipt = receipt_of(headers, body) if status == 200 else None
        mac = seal_result(
            self.key,
            job_id=row.id,
            state=state,
            status=status,
            headers=headers,
            result=body,
            receipt_id=receipt,
        )
        if await self.store.finish(row.id, Outcome(state, status, headers, body, receipt, mac)):
            self.metrics.finished.labels(state).inc()

    async def _refuse(self, row: JobRow, problem: Internal | DeadlineExceeded) -> None:
        body = json.dumps(problem.to_dict()).encode()
        await self._finish(row, "failed", problem.status, dict(EXPIRED_HEADERS), body)

    async def _run(self, row: JobRow) -> None:
        assert self.app is not None
        if not self._sealed(row):
            # Written by someone other than a gateway holding the key, or damaged: it
            # runs as nobody. An operator should look at who can write the job store.
            log.error("job %s: its record does not verify against the job key; not run", row.id)
            await self._refuse(row, Internal())
            return
        if time.time() - row.created > self.cfg.max_age_s:
            # Sealed, but older than any job may run: a stale copy written back into the
            # store would otherwise run again as its client. (Expiry normally fails it
            # first; this holds even when the store's own age index was rewritten.)
            log.warning("job %s: submitted more than jobs.max_age_s ago; not run", row.id)
            self.metrics.expired.inc()
            await self._refuse(row, DeadlineExceeded("the job was not done within jobs.max_age_s"))
            return
        try:
            if row.cert is None or row.body is None:
                raise RuntimeError("a running job without its request")
            async with asyncio.timeout(RUN_TIMEOUT_S):
                status, headers, body = await call_app(
                    self.app,
                    row.route,
                    row.cert,
                    row.headers,
                    row.body,
                    JobScope(row.id, job_seed(self.key, row.id)),
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: run failed; retried", row.id)
            status, headers, body = 503, {}, b""
        if status == 200 and os.environ.get(CRASH_ENV):
            log.critical(
                "job %s: %s is set: exiting before the result is recorded", row.id, CRASH_ENV
            )
            os._exit(137)
        if status in RETRY_STATUSES and row.attempts < self.cfg.max_attempts:
            delay = min(self.cfg.backoff_s * 2 ** (row.attempts - 1), self.cfg.backoff_max_s)
            self.metrics.retries.inc()
            log.info("job %s: answer %d, retry %d in %.1f s", row.id, status, row.attempts, delay)
            await self.store.retry(row.id, delay, row.executions)
            return
        await self._finish(row, "done" if status == 200 else "failed", status, headers, body)
