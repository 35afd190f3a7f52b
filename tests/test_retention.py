"""Retention as policy (the background job that erases bodies past their age and compacts
the checkpoint history), the indexed denial coalescer, and the rotated decision log."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from gateway.config import Logging, Retention
from gateway.pki import PKI
from gateway.receipts.bundle import BundleReader
from gateway.receipts.export import export_bundle
from gateway.receipts.issue import DenialCoalescer, Issued, issue
from gateway.receipts.log import LogEntry, ReceiptLog
from gateway.receipts.model import ClientRef, Denial, ModelRef, SignedReceipt
from gateway.receipts.note import Checkpoint
from gateway.receipts.retention import (
    BACKLOG_MIN_PAUSE_S,
    RetentionJob,
    backlog_pause,
    due_receipts,
)
from gateway.receipts.service import ReceiptService
from gateway.receipts.verify import Report, verify_bundle
from gateway.runtime import DECISIONS_LOGGER, build_gateway, configure_decision_log
from tests.gateway_harness import gateway_config, running_gateway
from tests.test_receipts import ORIGIN, WITNESS, World, make_world

DAY = 86400.0
PAST = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


# ============================================================================ a filled log


@pytest_asyncio.fixture(loop_scope="function")
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    if not w.log._closed:
        await w.log.close()


def service_of(world: World) -> ReceiptService:
    """The receipt service around the world's log (for its evidence layout)."""
    deny = functools.partial(issue, world.log, world.signer, kind="denial")
    return ReceiptService(world.log, world.signer, world.keyset, DenialCoalescer(deny))


async def fill(world: World, service: ReceiptService, n: int, when: dt.datetime) -> list[str]:
    """`n` receipts stamped `when`, each with an evidence file (and one shared file)."""
    ids = []
    for i in range(n):
        issued = await world.receipt(now=when, request_id=f"{when:%Y}-{i}")
        rid = issued.receipt.receipt_id
        shared = world.dir / "srs.bin"
        shared.write_bytes(b"shared material, stored once by hash")
        service.save_evidence(rid, {"proof": f"proof of {rid}".encode(), "srs": shared})
        ids.append(rid)
    return ids


def created(rl: ReceiptLog, ids: list[str]) -> list[float]:
    out = []
    for rid in ids:
        body = rl.body(rid)
        assert body is not None
        out.append(body.created)
    return out


def job_between(
    world: World, old: list[str], new: list[str], max_per_pass: int = 1000
) -> tuple[RetentionJob, CollectorRegistry]:
    """A 30-day job whose clock puts the cutoff between the old and the new bodies."""
    last_old, first_new = max(created(world.log, old)), min(created(world.log, new))
    assert last_old < first_new  # the two fills are apart (sequential fsynced batches)
    cut = (last_old + first_new) / 2
    registry = CollectorRegistry()
    settings = Retention(body_days=30.0, max_per_pass=max_per_pass)
    job = RetentionJob(lambda: [world.log], settings, registry, clock=lambda: cut + 30 * DAY)
    return job, registry


def evidence(world: World, rid: str) -> list[str]:
    return sorted(p.name for p in (world.log.path / "evidence").glob(f"{rid}.*"))


def bundle_report(world: World, out: Path) -> Report:
    export_bundle(world.log_dir, out)
    return verify_bundle(BundleReader(out), world.trust(), [WITNESS])


# ============================================================================ retention


async def test_retention_erases_exactly_the_old_bodies_and_the_log_still_verifies(
    world: World, tmp_path: Path
) -> None:
    service = service_of(world)
    old = await fill(world, service, 5, PAST)
    await world.checkpoint()
    new = await fill(world, service, 3, dt.datetime.now(dt.UTC))
    await world.checkpoint()
    size = world.log.size
    assert all(evidence(world, rid) for rid in old + new)  # control: evidence is there
    job, registry = job_between(world, old, new)

    result = await job.run_pass()

    assert (result.expired, result.behind) == (5, False)
    assert all(world.log.body(rid) is None and evidence(world, rid) == [] for rid in old)
    assert all(world.log.body(rid) is not None for rid in new)
    assert all(evidence(world, rid) == [f"{rid}.proof", f"{rid}.shared.json"] for rid in new)
    assert any((world.log.path / "evidence" / "shared").iterdir())  # shared material stays
    old_index = {i.receipt.index for i in world.issued if i.receipt.receipt_id in old}
    assert world.log.erased() == {i: "retention" for i in old_index}
    assert all(world.log.erased_at(i) == "retention" for i in old_index)
    assert world.log.size == size  # every leaf stays; the erasure leaf comes at the checkpoint
    assert registry.get_sample_value("ztgate_receipts_expired_total") == 5
    assert registry.get_sample_value("ztgate_receipt_retention_behind") == 0
    assert (
        registry.get_sample_value("ztgate_receipt_retention_last_run_timestamp_seconds") or 0
    ) > 0

    cp = Checkpoint.parse_text((await world.checkpoint()).text)
    assert cp.size == size + 1
    erasure = world.log.entry(size)
    record = world.log.record(size)
    assert erasure.type == "erasure" and record is not None
    assert json.loads(record)["indices"] == sorted(old_index)
    assert json.loads(record)["reason"] == "retention"

    report = bundle_report(world, tmp_path / "bundle")
    assert report.status == "valid", report.render()
    erased = {f.subject for f in report.findings if f.status == "erased"}
    assert erased == {f"log {world.log.log_id} index {i}" for i in old_index}
    receipts = [f for f in report.findings if f.subject.startswith("receipt ")]
    assert sorted(f.subject.split()[1] for f in receipts) == sorted(new)
    assert all(f.status == "valid" for f in receipts)


async def test_nothing_due_nothing_erased(world: World, tmp_path: Path) -> None:
    """The control: every body younger than the period; the job erases and logs nothing."""
    service = service_of(world)
    await fill(world, service, 4, PAST)  # the receipt's own stamp does not count, its age does
    await world.checkpoint()
    registry = CollectorRegistry()
    job = RetentionJob(
        lambda: [world.log],
        Retention(body_days=30.0),
        registry,
    )
    size = world.log.size
    result = await job.run_pass()
    assert (result.expired, result.behind) == (0, False)
    assert world.log.erased() == {} and world.log.queued_erasures() == []
    assert len(list(world.log.bodies())) == 4
    await world.checkpoint()
    assert world.log.size == size  # no erasure leaf
    assert registry.get_sample_value("ztgate_receipts_expired_total") == 0
    assert bundle_report(world, tmp_path / "b").status == "valid"


async def test_a_pass_is_bounded_and_the_next_takes_the_rest(world: World) -> None:
    service = service_of(world)
    old = await fill(world, service, 7, PAST)  # N + k due, N = 4, k = 3
    new = await fill(world, service, 2, dt.datetime.now(dt.UTC))
    job, registry = job_between(world, old, new, max_per_pass=4)

    first = await job.run_pass()
    assert (first.expired, first.behind) == (4, True)
    # oldest first: the first N by index go, the rest wait
    assert [world.log.body(rid) is None for rid in old] == [True] * 4 + [False] * 3
    assert registry.get_sample_value("ztgate_receipt_retention_behind") == 1

    second = await job.run_pass()
    assert (second.expired, second.behind) == (3, False)
    assert all(world.log.body(rid) is None for rid in old)
    assert all(world.log.body(rid) is not None for rid in new)

    third = await job.run_pass()
    assert (third.expired, third.behind) == (0, False)
    assert registry.get_sample_value("ztgate_receipts_expired_total") == 7
    assert registry.get_sample_value("ztgate_receipt_retention_behind") == 0
    # each pass logged its own erasure: two erasure leaves at the next checkpoint
    size = world.log.size
    await world.checkpoint()
    assert [e.type for _, e in world.log.entries(size)] == ["erasure", "erasure"]


def test_while_behind_retention_takes_a_bounded_share_of_the_writer() -> None:
    for seconds in (0.0, 0.001, 0.025, 0.3):
        pause = backlog_pause(seconds)
        assert pause >= BACKLOG_MIN_PAUSE_S and seconds / (seconds + pause) <= 0.1


async def test_due_receipts_reads_a_bounded_prefix(world: World) -> None:
    service = service_of(world)
    old = await fill(world, service, 6, PAST)
    new = await fill(world, service, 2, dt.datetime.now(dt.UTC))
    cut = (max(created(world.log, old)) + min(created(world.log, new))) / 2
    assert due_receipts(world.log, cut, 100) == old
    assert due_receipts(world.log, cut, 2) == old[:2]
    assert due_receipts(world.log, 0.0, 100) == []


async def test_frozen_logs_are_covered_and_their_erasures_logged_by_the_active_one(
    world: World, tmp_path: Path
) -> None:
    service = service_of(world)
    old = await fill(world, service, 3, PAST)
    await world.checkpoint()
    frozen_id = world.log.log_id
    await world.log.close()
    (world.log_dir / frozen_id / "FROZEN").write_text("test: frozen\n")
    world.log = ReceiptLog.open(world.log_dir, world.log_key, ORIGIN)
    frozen = ReceiptLog.open_readonly(world.log_dir / frozen_id)
    try:
        assert world.log.log_id != frozen_id
        new = [(await world.receipt()).receipt.receipt_id for _ in range(2)]
        last_old = max(created(frozen, old))
        first_new = min(created(world.log, new))
        assert last_old < first_new
        cut = (last_old + first_new) / 2
        job = RetentionJob(
            lambda: [world.log, frozen],
            Retention(body_days=1.0),
            CollectorRegistry(),
            clock=lambda: cut + DAY,
        )
        assert (await job.run_pass()).expired == 3
        assert all(frozen.body(rid) is None for rid in old)
        assert all(world.log.body(rid) is not None for rid in new)
        size = world.log.size
        await world.checkpoint()  # the active log appends the frozen log's erasure
        assert [e.type for _, e in world.log.entries(size)] == ["erasure"]
        report = bundle_report(world, tmp_path / "b")
        assert report.status == "valid", report.render()
        erased = [f for f in report.findings if f.status == "erased"]
        assert len(erased) == 3 and all(frozen_id in f.subject for f in erased)
    finally:
        frozen.close_sync()


async def test_checkpoint_history_is_compacted_and_still_verifies(
    world: World, tmp_path: Path
) -> None:
    """The job thins the stored checkpoints with `ReceiptLog.compact_checkpoints` (the log
    keeps what verification needs); proofs and the audit bundle are unaffected."""
    start = 1_750_000_000.0
    receipt = await world.receipt(now=dt.datetime.fromtimestamp(start - 1, dt.UTC))
    for i in range(12):  # a checkpoint every 10 minutes for two hours, events in between
        await world.log.append(LogEntry("policy_load", hashlib.sha256(bytes([i])).digest()))
        world.log.clock = lambda t=start + i * 600.0: t
        await world.checkpoint()
    before = len(world.log.checkpoints())
    registry = CollectorRegistry()
    job = RetentionJob(
        lambda: [world.log],
        Retention(checkpoint_history_keep_every_s=3600.0, checkpoint_history_keep_latest=2),
        registry,
    )
    result = await job.run_pass()
    after = len(world.log.checkpoints())
    assert result.expired == 0 and result.compacted == before - after > 0
    assert registry.get_sample_value("ztgate_receipt_checkpoints_compacted_total") == (
        result.compacted
    )
    assert world.log.proof(receipt.receipt.index) is not None
    assert (await job.run_pass()).compacted == 0  # idempotent: nothing more to thin
    report = bundle_report(world, tmp_path / "b")
    assert report.status == "valid", report.render()


def test_a_running_gateway_erases_by_itself_a_bounded_pass_at_a_time(
    pki: PKI, triton_repository: Path, tmp_path: Path
) -> None:
    """The wiring: `[receipts.retention]` gives the gateway a supervised job that works off
    a backlog pass by pass (3 passes of at most 2) and counts it on /metrics."""
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path / "data",
        [],
        receipts={"retention": {"body_days": 30, "max_per_pass": 2}},
    )
    gw = build_gateway(cfg)
    jobs = [getattr(j, "__self__", None) for j in gw.background]
    [job] = [j for j in jobs if isinstance(j, RetentionJob)]
    assert job.policy == cfg.receipts.retention
    receipts = gw.receipts
    assert receipts is not None

    async def prefill() -> None:
        for i in range(5):
            denial = Denial("urn:ztgate:forbidden", "model not allowed")
            await issue(receipts.log, receipts.signer, denial=denial, request_id=str(i))
        await receipts.close()  # the gateway's lifespan reopens it on its own loop

    asyncio.run(prefill())
    job.clock = lambda: time.time() + 31 * DAY  # every body is past 30 days
    metric = "ztgate_receipts_expired_total"
    with running_gateway(cfg, gw) as running:
        deadline = time.monotonic() + 60  # a wait for the job, not a timing claim
        while (gw.metrics.registry.get_sample_value(metric) or 0) < 5:
            assert time.monotonic() < deadline, "the retention job did not erase the backlog"
            time.sleep(0.05)
        scraped = httpx.get(f"{running.admin_base}/metrics").text
        assert f"{metric} 5.0" in scraped
        assert "ztgate_receipt_retention_last_run_timestamp_seconds" in scraped
        assert not gw.down
    [path] = ReceiptLog.all_logs(cfg.data_dir / "receipts")
    rl = ReceiptLog.open_readonly(path)
    try:
        assert list(rl.bodies()) == [] and len(rl.erased()) == 5
    finally:
        rl.close_sync()
    # control: the defaults (neither an age nor compaction), no job
    quiet = gateway_config(pki, triton_repository.parent / "registry", tmp_path / "quiet", [])
    quiet_gw = build_gateway(quiet)
    try:
        assert not any(
            isinstance(getattr(j, "__self__", None), RetentionJob) for j in quiet_gw.background
        )
    finally:
        assert quiet_gw.receipts is not None
        quiet_gw.receipts.log.close_sync()
        quiet_gw.revocations.close()


# ============================================================================ denial coalescer

MALLORY = ClientRef("spiffe://ztgate.local/client/mallory", "99", "CN=client CA")
RISK = ModelRef("risk", "1", "cd" * 32)


def denier(world: World) -> Callable[..., Awaitable[Issued]]:
    async def issue_fn(**kw: object) -> Issued:
        return await issue(world.log, world.signer, kind="denial", **kw)  # type: ignore[arg-type]

    return issue_fn


def counted_denials(world: World) -> list[Denial]:
    """The denial records of closed runs (those that folded others in)."""
    out = []
    for b in world.log.bodies():
        d = SignedReceipt.from_bytes(b.body).receipt.denial
        if d is not None and d.follows is not None:
            out.append(d)
    return out


async def test_a_denial_looks_at_one_open_run_not_all_of_them(world: World) -> None:
    now = [0.0]
    runs = 2000
    co = DenialCoalescer(denier(world), window_s=10, clock=lambda: now[0])
    # Distinct runs need distinct keys (caller, model, problem type): the type varies here.
    denials = [Denial(f"urn:ztgate:t{i}", "Not allowed by policy") for i in range(runs)]
    await asyncio.gather(*(co.deny(client=MALLORY, model=RISK, denial=d) for d in denials))
    assert co.open_runs == runs

    now[0] = 1.0
    seen = co.examined
    _, coalesced = await co.deny(client=MALLORY, model=RISK, denial=denials[1234])
    assert coalesced and co.examined - seen == 1  # the scan looked at all 2000
    seen = co.examined
    _, coalesced = await co.deny(client=MALLORY, model=RISK, denial=Denial("urn:x", "new"))
    assert not coalesced and co.examined - seen == 1 and co.open_runs == runs + 1

    # Work proportional to what expired: the 2000 opened at 0, then the open one at 1.
    now[0] = 10.5
    seen = co.examined
    _, coalesced = await co.deny(client=MALLORY, model=RISK, denial=Denial("urn:x", "new"))
    assert coalesced and co.examined - seen == runs + 1 and co.open_runs == 1
    # the run that had a follower was recorded with its count as it closed
    assert [(d.problem_type, d.count) for d in counted_denials(world)] == [("urn:ztgate:t1234", 1)]


async def test_open_runs_are_bounded(world: World) -> None:
    co = DenialCoalescer(denier(world), window_s=10, max_runs=50, clock=lambda: 0.0)
    for i in range(80):
        await co.deny(client=MALLORY, model=RISK, denial=Denial(f"urn:r{i}", "x"))
    assert co.open_runs == 50
    # the oldest were the ones let go: a repeat of r0 opens a new run, r79 coalesces
    assert not (await co.deny(client=MALLORY, model=RISK, denial=Denial("urn:r0", "x")))[1]
    assert (await co.deny(client=MALLORY, model=RISK, denial=Denial("urn:r79", "x")))[1]


async def test_identical_first_denials_in_flight_together_lose_no_count(world: World) -> None:
    """Two identical denials both issue a first receipt (neither saw a run yet); one folded
    in between must still be counted when the runs close."""
    gates = [asyncio.Event(), asyncio.Event()]
    calls = 0
    inner = denier(world)

    async def gated(**kw: object) -> Issued:
        nonlocal calls
        gate = gates[calls] if calls < len(gates) else None
        calls += 1
        if gate is not None:
            await gate.wait()
        return await inner(**kw)

    co = DenialCoalescer(gated, window_s=10, clock=lambda: 0.0)
    denial = Denial("urn:ztgate:forbidden", "model not allowed")
    a = asyncio.create_task(co.deny(client=MALLORY, model=RISK, denial=denial))
    b = asyncio.create_task(co.deny(client=MALLORY, model=RISK, denial=denial))
    for _ in range(10):  # let both reach their gate: no run is open yet
        await asyncio.sleep(0)
    assert calls == 2 and co.open_runs == 0
    gates[0].set()
    first, coalesced_a = await a
    assert not coalesced_a
    r, coalesced = await co.deny(client=MALLORY, model=RISK, denial=denial)
    assert coalesced and r is first
    gates[1].set()
    second, coalesced_b = await b
    assert not coalesced_b and second.receipt.receipt_id != first.receipt.receipt_id
    await co.flush()
    counted = counted_denials(world)
    assert [(d.count, d.follows) for d in counted] == [(1, first.receipt.receipt_id)]


# ============================================================================ decision log


@pytest.fixture
def decision_file(tmp_path: Path) -> Iterator[Callable[[int, int], Path]]:
    def make(max_bytes: int, backups: int) -> Path:
        path = tmp_path / "log" / "decisions.jsonl"
        assert configure_decision_log(Logging(f"file:{path}", max_bytes, backups)) is not None
        return path

    yield make
    configure_decision_log(Logging())  # back to stderr for every later test


def _files(path: Path) -> list[Path]:
    """The decision files, oldest first: decisions.jsonl.N ... .1, then the live one."""
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*rotated, path]


def test_decision_log_rotates_at_the_configured_size_and_splits_no_line(
    decision_file: Callable[[int, int], Path],
) -> None:
    max_bytes = 4096
    path = decision_file(max_bytes, 50)
    logger = logging.getLogger(DECISIONS_LOGGER)
    lines = 400
    for i in range(lines):  # lines of varying length, so they do not tile the file evenly
        logger.info(
            json.dumps({"seq": i, "principal": "spiffe://x/client/c", "pad": "z" * (i % 97)})
        )
    files = _files(path)
    assert len(files) > 5  # it rotated
    seqs = []
    for f in files:
        raw = f.read_bytes()
        assert raw.endswith(b"\n") and len(raw) < max_bytes
        seqs += [json.loads(line)["seq"] for line in raw.decode().splitlines()]
    assert seqs == list(range(lines))  # none lost, none split, in order
    # Rotated at the size: each full file took lines until the next would reach max_bytes.
    for full, nxt in itertools.pairwise(files):
        first_next = nxt.read_bytes().split(b"\n", 1)[0] + b"\n"
        assert full.stat().st_size + len(first_next) >= max_bytes


def test_decision_log_disk_use_is_bounded_by_its_backups(
    decision_file: Callable[[int, int], Path],
) -> None:
    max_bytes, backups = 4096, 2
    path = decision_file(max_bytes, backups)
    logger = logging.getLogger(DECISIONS_LOGGER)
    for i in range(2000):
        logger.info(json.dumps({"seq": i, "pad": "z" * 40}))
    files = _files(path)
    assert len(files) == backups + 1
    assert sum(f.stat().st_size for f in files) < (backups + 1) * max_bytes
    last = [json.loads(line)["seq"] for line in path.read_text().splitlines()]
    assert last[-1] == 1999  # the newest lines are kept, the oldest files dropped


def test_decision_log_to_a_file_does_not_also_go_to_stderr(
    decision_file: Callable[[int, int], Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = decision_file(1 << 20, 1)
    with caplog.at_level(logging.INFO):
        logging.getLogger(DECISIONS_LOGGER).info('{"seq": 1}')
    assert path.read_text() == '{"seq": 1}\n'
    assert [r for r in caplog.records if r.name == DECISIONS_LOGGER] == []
    configure_decision_log(Logging())  # stderr again: records propagate, no file handler
    with caplog.at_level(logging.INFO):
        logging.getLogger(DECISIONS_LOGGER).info('{"seq": 2}')
    assert [r.getMessage() for r in caplog.records if r.name == DECISIONS_LOGGER] == ['{"seq": 2}']
    assert path.read_text() == '{"seq": 1}\n'
