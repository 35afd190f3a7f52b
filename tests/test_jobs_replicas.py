"""One receipt per job across replicas sharing Redis (docs/jobs.md, "Replicas sharing
Redis"): replica A is a real `ztgate serve` process killed (by the runner's crash hook,
`os._exit` where a SIGKILL would leave it) after its job's receipt is logged and before
its result is recorded; replica B is a real gateway on the same Redis, with its own data
dir and receipt log. Real tritonservers, real certificates, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.config import ConfigError, Jobs
from gateway.jobs.model import NewJob
from gateway.jobs.redis import PREFIX
from gateway.jobs.runner import CRASH_ENV
from gateway.jobs.scope import job_seed
from gateway.jobs.store import SyncJobStore
from gateway.pki import PKI
from gateway.ports import wait_ready
from gateway.receipts.log import LogError, ReceiptLog
from gateway.receipts.service import ReceiptService
from gateway.receipts.signing import KeySet
from gateway.receipts.verify import Report, TrustedLogKey, TrustPolicy, _check_job_links
from gateway.state import StoreUnavailable
from tests import test_gateway
from tests.conftest import TritonCluster
from tests.gateway_harness import dev_toml, gateway_config, policy_dir, running_gateway
from tests.test_gateway import node_table
from tests.test_jobs import (
    JOB_KEY,
    JOBS,
    PATIENCE_S,
    RECEIPT_ORIGIN,
    answer_fields,
    client,
    hold,
    receipts_in,
    submit,
    wait_finished,
)

registry_dir = test_gateway.registry_dir  # the fixture: the session's model registry
# Short leases: a dead replica's run is up for claiming within seconds. A lease must
# outlast 3 Redis deadlines (gateway/config.py): 3 x (2 x 1.0 + 0.25) = 6.75 s.
REDIS_TIMEOUT_S = 1.0
LEASE_S = 7.0


def redis_call(url: str, fn: str, *args: Any) -> Any:
    async def go() -> Any:
        r = Redis.from_url(url, socket_timeout=5)
        try:
            return await getattr(r, fn)(*args)
        finally:
            await r.aclose()

    return asyncio.run(go())


def job_hash(url: str, job_id: str) -> dict[str, str]:
    raw = redis_call(url, "hgetall", f"{PREFIX}j:{job_id}")
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


def wait_lease_ended(url: str, job_id: str) -> None:
    """Until the job's run lease is over by Redis's own clock (what claims go by)."""
    end = time.monotonic() + PATIENCE_S
    while True:
        lease = redis_call(url, "zscore", f"{PREFIX}running", job_id)
        secs, micros = redis_call(url, "time")
        if lease is not None and float(lease) < secs + micros / 1e6:
            return
        assert time.monotonic() < end, "the dead replica's lease never ended"
        time.sleep(0.1)


@contextlib.contextmanager
def replica_a(
    pki: PKI,
    registry: Path,
    nodes: list[dict[str, str]],
    tmp_path: Path,
    redis_url: str,
    jobs: dict[str, Any],
) -> Iterator[tuple[Any, str]]:
    """(serve(crash) -> the running process, its base URL): replica A as its own process
    on one data dir, so it can die and come back with the same receipt log."""
    data = tmp_path / "a"
    toml = dev_toml(pki, registry, data, policy_dir(tmp_path / "a-policies"))
    toml += f"""
[state]
redis_url = "{redis_url}"
timeout_s = {REDIS_TIMEOUT_S}
[receipts]
signing_key = "{pki.key_path("receipt-signing")}"
log_key = "{pki.key_path("log-checkpoint")}"
checkpoint_interval_s = 0.2
[jobs]
{"".join(f"{k} = {json.dumps(v)}{chr(10)}" for k, v in jobs.items())}
"""
    for row in nodes:
        toml += "[[nodes]]\n" + "".join(f'{k} = "{v}"\n' for k, v in row.items())
    config = tmp_path / "a.toml"
    config.write_text(toml)
    port = int(toml.split("[listen]\nport = ")[1].split("\n")[0])
    admin = int(toml.split("admin_port = ")[1].split("\n")[0])
    plain = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    procs: list[subprocess.Popen[bytes]] = []

    def serve(crash: bool) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**plain, CRASH_ENV: "1"} if crash else plain,
        )
        procs.append(proc)
        assert wait_ready(f"http://127.0.0.1:{admin}/v2/health/live", 60, proc)
        return proc

    try:
        yield serve, f"https://127.0.0.1:{port}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def job_receipts(log_dir: Path, job_id: str) -> list[Any]:
    return [
        s for s in receipts_in(log_dir, "answer") if s.receipt.extensions.get("job_id") == job_id
    ]


def killed_after_its_receipt(
    serve: Any, base: str, c: httpx.Client, key: str, log_dir: Path
) -> tuple[str, Any]:
    """Replica A takes a job, logs its receipt and dies before recording the result."""
    a = serve(True)
    r = submit(c, base, key)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert a.wait(timeout=PATIENCE_S) == 137  # it died where the crash hook is
    (logged,) = job_receipts(log_dir, job_id)
    return job_id, logged


def test_a_job_whose_replica_died_after_its_receipt_waits_for_that_replica(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    redis_server: str,
    tmp_path: Path,
) -> None:
    """B leaves the dead replica's job alone (its receipt is in A's log, which B cannot
    read) while it runs others; A comes back with its data dir and answers it under the
    receipt it logged: one result, one receipt, B's log holding none for the job."""
    nodes = node_table(triton_cluster)
    jobs = {**JOBS, "key_file": str(tmp_path / "jobs.key"), "lease_s": LEASE_S}
    jobs["adopt_after_s"] = 3000.0  # never within this test
    shared = {"redis_url": redis_server, "timeout_s": REDIS_TIMEOUT_S}
    b_cfg = gateway_config(pki, registry_dir, tmp_path / "b", nodes, jobs=jobs, state=shared)
    who = pki.issue("client", "jobxwait", organization="Acme")
    a_logs, b_logs = tmp_path / "a" / "receipts", tmp_path / "b" / "receipts"
    with (
        running_gateway(b_cfg) as b,
        replica_a(pki, registry_dir, nodes, tmp_path, redis_server, jobs) as (serve, a_base),
        client(pki, who) as c,
    ):
        hold(b, True)  # A takes the job
        job_id, logged = killed_after_its_receipt(serve, a_base, c, "wait-1", a_logs)
        held = job_hash(redis_server, job_id)
        # Marked for A's log before the receipt went in: what tells B to leave it.
        assert held["state"] == "running" and held["executions"] == "1"
        assert held["mark_log"] == logged.receipt.log_id
        hold(b, False)
        wait_lease_ended(redis_server, job_id)
        # Control: B runs a job of its own; the claim that took it passed over A's job,
        # due by its lease, because of the mark.
        other = submit(c, b.base, "wait-other")
        assert other.status_code == 202, other.text
        assert wait_finished(c, b.base, other.json()["id"])["status"] == "done"
        left = job_hash(redis_server, job_id)
        assert left["state"] == "running" and left["executions"] == "1", left
        assert job_receipts(b_logs, job_id) == []

        serve(False)  # A is back, with the same data dir and log
        view = wait_finished(c, a_base, job_id)
    assert view["status"] == "done", view
    assert view["node_executions"] == 2  # the node computed it twice: counted
    assert view["receipt_id"] == logged.receipt.receipt_id  # the one receipt A logged
    assert [s.receipt.receipt_id for s in job_receipts(a_logs, job_id)] == [view["receipt_id"]]
    assert job_receipts(b_logs, job_id) == []


def verify_export(log_dir: Path, pki: PKI, work: Path) -> dict[str, Any]:
    """`ztgate audit export` of one replica's logs, then `ztgate verify --json` on it."""
    rl = ReceiptLog.open_readonly(ReceiptLog.all_logs(log_dir)[0])
    try:
        origin = rl.origin
    finally:
        rl.close_sync()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    log_key = load_pem_private_key(pki.key_path("log-checkpoint").read_bytes(), None)
    trust = TrustPolicy(
        KeySet.load(log_dir / "keys.json"),
        [TrustedLogKey(origin, log_key.public_key())],  # type: ignore[arg-type]
        {},
    )
    (work / "trust.json").write_text(json.dumps(trust.to_dict()))
    cli = [sys.executable, "-m", "gateway"]
    bundle = work / "bundle"
    subprocess.run(
        [*cli, "audit", "export", "--log-dir", str(log_dir), str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    done = subprocess.run(
        [*cli, "verify", str(bundle), "--trust", str(work / "trust.json"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == 0 and report["status"] == "valid", report
    return report


def test_a_job_whose_replica_never_returns_is_adopted_under_a_receipt_naming_its_log(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    redis_server: str,
    tmp_path: Path,
) -> None:
    """A dies after logging the job's receipt and stays down: once the mark is
    `adopt_after_s` old, B runs the job and logs a receipt that says it supersedes
    whatever A's log holds for the job (`ext.supersedes_in`), and `ztgate verify` on B's
    export reports it. Two receipts for the job, the second naming where the first is."""
    nodes = node_table(triton_cluster)
    jobs = {**JOBS, "key_file": str(tmp_path / "jobs.key"), "lease_s": LEASE_S}
    jobs["adopt_after_s"] = 2.0
    shared = {"redis_url": redis_server, "timeout_s": REDIS_TIMEOUT_S}
    b_cfg = gateway_config(pki, registry_dir, tmp_path / "b", nodes, jobs=jobs, state=shared)
    who = pki.issue("client", "jobxadopt", organization="Acme")
    a_logs, b_logs = tmp_path / "a" / "receipts", tmp_path / "b" / "receipts"
    with (
        running_gateway(b_cfg) as b,
        replica_a(pki, registry_dir, nodes, tmp_path, redis_server, jobs) as (serve, _),
        client(pki, who) as c,
    ):
        hold(b, True)
        job_id, logged = killed_after_its_receipt(serve, b.base, c, "adopt-1", a_logs)
        hold(b, False)  # A never comes back
        view = wait_finished(c, b.base, job_id)
    assert view["status"] == "done", view
    assert view["node_executions"] == 2
    (adopted,) = job_receipts(b_logs, job_id)
    assert view["receipt_id"] == adopted.receipt.receipt_id != logged.receipt.receipt_id
    ext = adopted.receipt.extensions
    assert ext["supersedes_in"] == (logged.receipt.log_id,) and "supersedes" not in ext
    assert [s.receipt.receipt_id for s in job_receipts(a_logs, job_id)] == [
        logged.receipt.receipt_id
    ]

    report = verify_export(b_logs, pki, tmp_path)
    (finding,) = [f for f in report["findings"] if f["code"] == "supersedes-adopted"]
    assert finding["subject"] == f"receipt {adopted.receipt.receipt_id}"
    assert finding["status"] == "valid"
    assert finding["details"]["log_id"] == logged.receipt.log_id
    assert finding["details"]["job_id"] == job_id
    assert "not in this bundle" in finding["reason"]


def test_the_disk_store_passes_over_a_job_marked_for_another_log_until_it_may_be_adopted(
    tmp_path: Path,
) -> None:
    """The same rule in `jobs.db` (a file from before the mark columns gains them): a job
    marked for a log this process does not hold is passed over until the mark is
    `adopt_after_s` old; the log's own process takes it at once; marks accumulate."""
    path = tmp_path / "jobs.db"
    old = SyncJobStore(path, lock=False)
    for column in ("mark_log", "mark_at", "marks"):  # as a jobs.db of the last release
        old.db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    old.close()
    now = [1000.0]
    store = SyncJobStore(path, lock=False, clock=lambda: now[0])
    try:
        job = NewJob(
            "j1",
            "spiffe://o",
            "k",
            "d",
            "/v2/models/iris/infer",
            "iris",
            now[0],
            "c",
            {},
            b"x",
            "m",
        )
        store.submit(job, 10, 10)
        assert len(store.claim(1, ("loga",), 600.0)) == 1
        assert store.mark("j1", "loga", 1) == ("loga",)
        store.retry("j1", 0.0, 1)  # its receipt did not go in: queued again, still marked
        assert store.claim(1, ("logb",), 600.0) == []  # another log's job: left alone
        now[0] += 599.0
        assert store.claim(1, ("logb",), 600.0) == []
        now[0] += 1.0
        (adopted,) = store.claim(1, ("logb",), 600.0)  # the mark is old enough
        assert adopted.executions == 2
        assert store.mark("j1", "loga", 1) is None  # the first run's fence: taken over
        assert store.mark("j1", "logb", 2) == ("loga", "logb")
        store.retry("j1", 0.0, 1)  # nor does the first run requeue the second
        assert store.claim(1, ("logb", "loga"), 600.0) == []
        store.retry("j1", 0.0, 2)
        (back,) = store.claim(1, ("logb", "loga"), 600.0)  # its own log's: at once
        assert back.executions == 3
        assert store.mark("nope", "loga", 1) is None  # no running job: no mark
    finally:
        store.close()


def test_verify_resolves_what_a_jobs_receipt_supersedes() -> None:
    """`ztgate verify`'s job links, each kind: a receipt of the same job superseded in
    the bundle; one naming another job's receipt (invalid); an adopted job whose earlier
    log is in the bundle with its receipt, in the bundle without one, or not there."""
    report = Report()
    fact = {"kind": "answer"}
    report.receipts = {
        "a1": {**fact, "log_id": "loga", "job_id": "j1"},
        "b1": {**fact, "log_id": "logb", "job_id": "j1", "supersedes_in": ["loga", "logc"]},
        "b2": {**fact, "log_id": "logb", "job_id": "j2", "supersedes_in": ["logd"]},
        "b3": {**fact, "log_id": "logb", "job_id": "j1", "supersedes": "b1"},
        "b4": {**fact, "log_id": "logb", "job_id": "j3", "supersedes": "b1"},
    }
    _check_job_links(report, {"loga", "logb", "logd"})
    got = sorted((f.subject, f.status, f.code, f.details.get("log_id")) for f in report.findings)
    assert got == [
        ("receipt b1", "valid", "supersedes-adopted", "loga"),
        ("receipt b1", "valid", "supersedes-adopted", "logc"),
        ("receipt b2", "valid", "supersedes-adopted", "logd"),
        ("receipt b3", "valid", "supersedes", None),
        ("receipt b4", "invalid", "supersedes-mismatch", None),
    ]
    reasons = {(f.subject, f.details.get("log_id")): f.reason for f in report.findings}
    assert reasons[("receipt b1", "loga")].endswith("supersedes a1")
    assert reasons[("receipt b1", "logc")].endswith("that log is not in this bundle")
    assert "no receipt body of the job" in reasons[("receipt b2", "logd")]


async def test_a_jobs_receipt_is_marked_first_and_names_only_other_logs_the_store_gave(
    pki: PKI, tmp_path: Path
) -> None:
    """The receipt service's hook, in process on a real log: the mark is made before the
    receipt is appended (no mark, no receipt: a retryable log error); the adopted run's
    receipt names the other logs the store gave, never this replica's own or anything
    that is not a log id (the store is not trusted with what a signed receipt says);
    a rerun marks too, and gives the logged receipt only if that names every other log
    marked (here it does)."""
    service = ReceiptService.open(
        tmp_path / "receipts",
        pki.key_path("receipt-signing"),
        pki.key_path("log-checkpoint"),
        RECEIPT_ORIGIN,
    )
    calls: list[tuple[str, str, int]] = []
    given: list[str] = []

    async def mark(job_id: str, log_id: str) -> list[str]:
        calls.append((job_id, log_id, service.log.size))
        if job_id == "unmarked":
            raise StoreUnavailable("the job store (Redis) did not answer")
        return given

    service.on_job_receipt = mark
    own, other = service.log.log_id, "a" * 16
    fields = answer_fields(0)
    try:
        size = service.log.size
        with pytest.raises(LogError):
            await service.answer(**fields, seed=job_seed(JOB_KEY, "unmarked"), job_id="unmarked")
        assert service.log.size == size and service.log.job_receipt("unmarked") is None

        given[:] = [own, other, "not a log id\n", "b" * 15]
        adopted = await service.answer(**fields, seed=job_seed(JOB_KEY, "j1"), job_id="j1")
        assert calls[-1] == ("j1", own, size)  # marked while the log had no receipt of it
        assert adopted.receipt.extensions["supersedes_in"] == (other,)
        again = await service.answer(**fields, seed=job_seed(JOB_KEY, "j1"), job_id="j1")
        assert again.reused and len(calls) == 3  # it names every other log already

        given[:] = [own]  # control: marked only for this log, as a first run is
        first = await service.answer(**fields, seed=job_seed(JOB_KEY, "j2"), job_id="j2")
        assert "supersedes_in" not in first.receipt.extensions
        sync = await service.answer(**fields)  # no job: no mark
        assert "job_id" not in sync.receipt.extensions and len(calls) == 4
    finally:
        await service.close()


def test_adopt_after_s_must_leave_a_job_time_to_run() -> None:
    """A job adopted no earlier than it expires would never run: refused at load."""
    assert Jobs(adopt_after_s=3599.0, max_age_s=3600.0).adopt_after_s == 3599.0  # control
    for bad in ({"adopt_after_s": 3600.0}, {"adopt_after_s": 0.0}, {"lease_s": 0.0}):
        with pytest.raises(ConfigError):
            Jobs(**{"max_age_s": 3600.0, **bad})  # type: ignore[arg-type]


def _open_jobs_db(path: str, lock: bool, barrier: Any, out: Any) -> None:
    barrier.wait()  # both processes open the file at once, as `serve --workers 2` does
    try:
        SyncJobStore(Path(path), lock=lock).close()
        out.put("ok")
    except Exception as exc:  # reported to the test, which names it
        out.put(f"{type(exc).__name__}: {exc}")


def test_worker_processes_opening_a_jobs_db_from_before_the_marks_at_once_all_start(
    tmp_path: Path,
) -> None:
    """Two real processes (a replica's workers without Redis: one owns the file's lock,
    one opens it without) open an old `jobs.db` together: the mark columns are checked and
    added in one write transaction, so neither fails on the other's `ALTER TABLE`."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        path = tmp_path / f"jobs{trial}.db"
        old = SyncJobStore(path, lock=False)
        for column in ("mark_log", "mark_at", "marks"):  # as a jobs.db of the last release
            old.db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        old.close()
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_open_jobs_db, args=(str(path), lock, barrier, out))
            for lock in (True, False)
        ]
        for proc in procs:
            proc.start()
        got = sorted(out.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join(timeout=60)
        assert got == ["ok", "ok"], got
        store = SyncJobStore(path, lock=False)
        try:
            have = {r[1] for r in store.db.execute("PRAGMA table_info(jobs)")}
        finally:
            store.close()
        assert {"mark_log", "mark_at", "marks"} <= have


async def test_a_run_whose_lease_lapsed_neither_marks_nor_requeues_the_run_that_took_over(
    redis_server: str,
) -> None:
    """Real Redis. Run 1 (replica A) stops renewing its lease (a slow or cut-off link), B
    claims the job as run 2 and marks it. Run 1, still alive, cannot mark the job (so it
    logs no receipt) nor move B's run back to the queue; B's own run can (control)."""
    from gateway.jobs.redis import RedisJobStore

    prefix = f"ztgate:jobs-fence:{os.getpid()}:"
    a = RedisJobStore(redis_server, timeout_s=5.0, prefix=prefix, lease_s=0.2)
    b = RedisJobStore(redis_server, timeout_s=5.0, prefix=prefix, lease_s=600.0)
    log_a, log_b = "a" * 16, "b" * 16
    job = NewJob(
        "j1", "spiffe://o", "k", "d", "/v2/models/iris/infer", "iris", 1.0, "c", {}, b"x", "m"
    )
    try:
        assert (await a.submit(job, 10, 10)).created
        (run1,) = await a.claim(1, (log_a,), 600.0)
        assert run1.executions == 1
        end = time.monotonic() + PATIENCE_S
        while not (taken := await b.claim(1, (log_b,), 600.0)):  # once A's lease is over
            assert time.monotonic() < end, "run 1's lease never ended"
            await asyncio.sleep(0.05)
        (run2,) = taken
        assert run2.executions == 2
        assert await a.mark("j1", log_a, run1.executions) is None  # fenced: no receipt
        assert await b.mark("j1", log_b, run2.executions) == (log_b,)
        await a.retry("j1", 0.0, run1.executions)  # fenced: B's run stays running
        assert await b._client.zscore(prefix + "running", "j1") is not None
        assert await b._client.zscore(prefix + "queued", "j1") is None
        await b.retry("j1", 0.0, run2.executions)  # control: the run that holds it
        assert await b._client.zscore(prefix + "queued", "j1") is not None
        assert await b._client.zscore(prefix + "running", "j1") is None
        assert await b.erase_jobs(["j1", "nope"]) == 1  # by job id (an erased receipt's)
        assert await b.get("j1") is None
    finally:
        await a.erase_owner("spiffe://o")
        await a.close()
        await b.close()


def _services(pki: PKI, tmp_path: Path, *names: str) -> list[ReceiptService]:
    return [
        ReceiptService.open(
            tmp_path / name,
            pki.key_path("receipt-signing"),
            pki.key_path("log-checkpoint"),
            RECEIPT_ORIGIN,
        )
        for name in names
    ]


def _facts(*issued: Any) -> Report:
    from gateway.receipts.verify import _receipt_facts

    report = Report()
    for i in issued:
        report.receipts[i.receipt.receipt_id] = _receipt_facts(i.receipt)
    return report


async def test_a_rerun_after_another_replica_adopted_the_job_supersedes_its_own_receipt(
    pki: PKI, tmp_path: Path
) -> None:
    """Two real logs, one shared mark record (as Redis keeps it). A logs RA and dies; B
    adopts, its RB naming A's log; B dies too; A comes back and runs the job again with
    the same answer: not RA again (RB says it replaces RA) but a receipt superseding RA
    and naming B's log. All three tied together, as verify finds; a further rerun on A,
    with no other log marked since, gives that receipt (control)."""
    a, b = _services(pki, tmp_path, "a", "b")
    marks: list[str] = []
    reruns: list[str] = []

    async def mark(job_id: str, log_id: str) -> list[str]:
        marks.extend([] if log_id in marks else [log_id])
        return list(marks)

    a.on_job_receipt = b.on_job_receipt = mark
    a.on_job_rerun = reruns.append
    fields, seed = answer_fields(0), job_seed(JOB_KEY, "j1")
    try:
        ra = await a.answer(**fields, seed=seed, job_id="j1")
        rb = await b.answer(**fields, seed=seed, job_id="j1")
        assert rb.receipt.extensions["supersedes_in"] == (a.log.log_id,)
        ra2 = await a.answer(**fields, seed=seed, job_id="j1")
        assert not ra2.reused and reruns == ["superseded"]
        assert ra2.receipt.extensions["supersedes"] == ra.receipt.receipt_id
        assert ra2.receipt.extensions["supersedes_in"] == (b.log.log_id,)
        again = await a.answer(**fields, seed=seed, job_id="j1")  # control
        assert again.reused and again.receipt.receipt_id == ra2.receipt.receipt_id
        assert reruns == ["superseded", "reused"]
        report = _facts(ra, rb, ra2)
        _check_job_links(report, {a.log.log_id, b.log.log_id})
        assert not [f for f in report.findings if f.code == "job-receipts-unlinked"]
    finally:
        await a.close()
        await b.close()


def test_verify_reports_answer_receipts_of_one_job_that_nothing_links() -> None:
    """Two answer receipts of a job that neither `supersedes` nor `supersedes_in` ties
    (a lost or deleted mark, a replica from before marks): `job-receipts-unlinked`. The
    control, the same two linked by `supersedes_in`, and a generation job's stream
    receipts (never indexed by job), are not reported."""
    report = Report()
    answer = {"kind": "answer"}
    report.receipts = {
        "a1": {**answer, "log_id": "loga", "job_id": "j1"},
        "b1": {**answer, "log_id": "logb", "job_id": "j1"},  # nothing ties it to a1
        "a2": {**answer, "log_id": "loga", "job_id": "j2"},
        "b2": {**answer, "log_id": "logb", "job_id": "j2", "supersedes_in": ["loga"]},
        "a3": {"kind": "open", "log_id": "loga", "job_id": "j3"},
        "a4": {"kind": "close", "log_id": "loga", "job_id": "j3"},
    }
    _check_job_links(report, {"loga", "logb"})
    (unlinked,) = [f for f in report.findings if f.code == "job-receipts-unlinked"]
    assert unlinked.subject == "job j1" and unlinked.details["receipts"] == ["a1", "b1"]


async def test_a_job_marked_for_more_other_logs_than_a_receipt_names_gets_no_receipt(
    pki: PKI, tmp_path: Path
) -> None:
    """A receipt names at most 16 other logs the job was marked for; a store that gives
    more (a writer padding the marks) gets no receipt at all, rather than one that leaves
    some out (a retryable log error). 16 is named in full (control)."""
    (service,) = _services(pki, tmp_path, "r")
    given: list[str] = []

    async def mark(job_id: str, log_id: str) -> list[str]:
        return [log_id, *given]

    service.on_job_receipt = mark
    fields = answer_fields(0)
    try:
        given[:] = [f"{chr(ord('a') + i)}" * 16 for i in range(16)]
        full = await service.answer(**fields, seed=job_seed(JOB_KEY, "j1"), job_id="j1")
        assert full.receipt.extensions["supersedes_in"] == tuple(sorted(given))
        given.append("q" * 16)
        size = service.log.size
        with pytest.raises(LogError):
            await service.answer(**fields, seed=job_seed(JOB_KEY, "j2"), job_id="j2")
        assert service.log.size == size and service.log.job_receipt("j2") is None
    finally:
        await service.close()


def test_a_jobs_lease_must_outlast_its_renewals() -> None:
    """`jobs.lease_s`: finite, and with Redis above 3 x the store's deadline
    (2 x state.timeout_s + 0.25), or a live run's job is claimed again while it runs."""
    from gateway.config import parse_config
    from tests.test_config import raw

    with pytest.raises(ConfigError):
        Jobs(lease_s=float("inf"))
    ok = parse_config(raw(state={"timeout_s": 1.0}, jobs={"lease_s": 7.0}), Path("/"))
    assert ok.jobs.lease_s == 7.0  # control: 7 > 3 x 2.25
    with pytest.raises(ConfigError, match="lease_s"):
        parse_config(raw(state={"timeout_s": 1.0}, jobs={"lease_s": 6.5}), Path("/"))
    alone = raw(state={"timeout_s": 1.0, "redis_url": None}, jobs={"lease_s": 6.5})
    assert parse_config(alone, Path("/")).jobs.lease_s == 6.5  # no Redis: no lease kept


def test_erasing_a_receipt_a_job_was_logged_under_erases_that_job(pki: PKI, tmp_path: Path) -> None:
    """`ztgate audit erase` of a receipt the job's record does not name (one a later run
    superseded, or an adopted job's first): the job it was logged for (`ext.job_id`)
    goes too, so its input does not run again after the erasure. Another job stays
    (control)."""

    async def log_one() -> Any:
        (service,) = _services(pki, tmp_path, "receipts")
        try:
            return await service.answer(
                **answer_fields(0), seed=job_seed(JOB_KEY, "j1"), job_id="j1"
            )
        finally:
            await service.close()

    first = asyncio.run(log_one())
    data = tmp_path / "data"
    store = SyncJobStore(data / "jobs.db", lock=False)
    try:
        for job_id in ("j1", "j2"):  # j1 queued again, as after its run's crash
            route = "/v2/models/iris/infer"
            args = (job_id, "spiffe://o", job_id, "d", route, "iris", 1.0, "c", {}, b"x", "m")
            store.submit(NewJob(*args), 10, 10)
    finally:
        store.close()
    where = ["--log-dir", str(tmp_path / "receipts"), "--data-dir", str(data)]
    erased = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "audit",
            "erase",
            "--json",
            *where,
            first.receipt.receipt_id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout) == {"erased": 1, "jobs": 1}
    store = SyncJobStore(data / "jobs.db", lock=False)
    try:
        assert store.get("j1") is None and store.get("j2") is not None
    finally:
        store.close()


async def test_a_replica_whose_receipt_log_fails_claims_one_job_at_a_time(
    pki: PKI, tmp_path: Path
) -> None:
    """A log that cannot append (frozen, as a log found cut short at open is: set here,
    since a full disk cannot be made on demand) fails the answer and flags the service;
    the runner then claims one job at a time, at most every `backoff_max_s` (each run
    would mark a job for this log and hold it here). The next append that succeeds
    clears the flag and the runner claims its `workers` again (control)."""
    from gateway.jobs.runner import JobMetrics, Runner
    from gateway.jobs.store import JobStore

    (service,) = _services(pki, tmp_path, "receipts")
    store = JobStore(tmp_path / "jobs.db")
    runner = Runner(store, Jobs(workers=4, backoff_max_s=30.0), JOB_KEY, JobMetrics(None))
    runner.log_failing = lambda: service.append_failed
    fields = answer_fields(0)
    try:
        assert runner._free(0.0) == 4
        service.log.frozen_reason = "test: as a log found cut short at open"
        with pytest.raises(LogError):
            await service.answer(**fields, seed=job_seed(JOB_KEY, "j1"), job_id="j1")
        assert service.append_failed
        assert runner._free(0.0) == 1  # one run, to find out whether the log is back
        runner._probe_at = 30.0  # as after that run's claim
        assert runner._free(29.0) == 0 and runner._free(30.0) == 1
        service.log.frozen_reason = None
        await service.answer(**fields)  # any answer that goes in
        assert not service.append_failed and runner._free(0.0) == 4
    finally:
        await service.close()
        await store.close()
