"""Asynchronous jobs beside the synchronous API (docs/jobs.md): durable, bounded per
identity and in age, run by a background worker through the sync route itself.

    store.py   the jobs database under the data dir (fsynced before a 202)
    runner.py  the worker: claim, run in process through the app, retry, record once
    scope.py   what a run carries into the pipeline: the job id and its receipt seed
    routes.py  submit, poll, result
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gateway.jobs.model import JobBackend
from gateway.jobs.runner import ASGIApp, JobMetrics, Runner
from gateway.jobs.seal import KeyFileError, load_key
from gateway.jobs.store import JOBS_FILE, JobStore

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["JobService"]

log = logging.getLogger(__name__)


class JobService:
    """Built with the app (no I/O); `start` opens the store (Redis where the gateway's
    state is, else a file under the data dir), `close` closes it."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.cfg.jobs
        self.metrics = JobMetrics(gw.metrics.registry)
        self.store: JobBackend | None = None
        self.runner: Runner | None = None
        self.app: ASGIApp | None = None
        self.key = b""  # seals jobs (gateway/jobs/seal.py); read at start
        # False in a replica's worker process other than the one that runs the shared
        # jobs file's jobs (gateway/supervisor.py): it takes and answers jobs, never runs
        # them, so no restart of it requeues a run another worker has under way.
        self.runs_jobs = True

    def start(self) -> None:
        url = self.gw.cfg.state.redis_url
        store: JobBackend
        if url:  # replicas share their jobs where they share their state
            from gateway.jobs.redis import RedisJobStore

            store = RedisJobStore(
                url, timeout_s=self.gw.cfg.state.timeout_s, lease_s=self.cfg.lease_s
            )
        else:
            store = JobStore(self.gw.cfg.data_dir / JOBS_FILE, lock=self.runs_jobs)
        self.store = store
        try:
            self.key = load_key(self.cfg.key_file or self.gw.cfg.data_dir / "jobs.key")
        except KeyFileError as exc:  # whoever could swap the key could forge jobs
            log.critical("jobs: refusing to start: %s", exc)
            raise
        days = self.gw.cfg.receipts.retention.body_days
        self.runner = Runner(
            store, self.cfg, self.key, self.metrics, None if days is None else days * 86400.0
        )
        self.runner.app = self.app
        receipts = self.gw.receipts
        if receipts is not None:  # a job's second run, counted (docs/jobs.md)
            receipts.on_job_rerun = lambda what: self.metrics.reruns.labels(what).inc()
            # Where each job's receipt goes, in the job store: replicas keep a log each.
            receipts.on_job_receipt = self.runner.mark
            self.runner.logs = receipts.job_logs
            self.runner.log_failing = lambda: receipts.append_failed

    async def run(self, stop: Any) -> None:
        assert self.runner is not None
        if not self.runs_jobs:
            await stop.wait()
            return
        await self.runner.run(stop)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None
