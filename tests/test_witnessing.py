"""Witnessing above the log, and background loops that cannot die silently.

The failure these guard against: the checkpoint loop re-pushed the stored note while idle
and appended each new cosignature to it; at 65 signature lines the note no longer parsed,
the loop died silently, every later receipt stayed pending, the checkpoint endpoint
answered 500 and the log refused to reopen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter

from gateway.background import supervise
from gateway.ports import free_port
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.http import log_routes
from gateway.receipts.log import ReceiptLog
from gateway.receipts.note import SignedNote
from gateway.receipts.witness import witness_app
from gateway.runtime import build_gateway
from tests.conftest import TritonCluster
from tests.gateway_harness import gateway_config, running_gateway
from tests.test_gateway import node_table
from tests.test_receipts import ORIGIN, World, make_world

IDLE_TICKS = 200  # far past the 64 signature lines a note may carry


class CountingApp:
    """The real witness app, counting the add-checkpoint requests it is sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.posts = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            self.posts += 1
        await self.app(scope, receive, send)


def counted_checkpointer(world: World) -> tuple[Checkpointer, CountingApp]:
    app = CountingApp(witness_app(world.witness))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    client = WitnessClient(world.witness.key, "http://w", http)
    return Checkpointer(lambda: world.log, [client]), app


async def test_an_idle_log_asks_each_witness_once_per_size_and_its_notes_stay_bounded(
    tmp_path: Path,
) -> None:
    world = await make_world(tmp_path, witness_http=False)
    cpr, witness = counted_checkpointer(world)
    # Each cosignature carries the witness's time: a second passes every tick, so a note
    # that collected cosignatures would grow by one line a tick (it did, up to 64).
    start = int(time.time())
    now = iter(range(start, start + 100_000_000))
    world.witness.clock = lambda: next(now)
    try:
        for _ in range(3):
            await world.receipt()
        first = await cpr.tick()
        assert witness.posts == 1
        assert len(first.signatures) == 2 and world.witness.key.verify(first)[0] == "valid"
        for _ in range(IDLE_TICKS):
            await cpr.tick()
        assert witness.posts == 1  # nothing new, nothing asked
        latest = world.log.latest_checkpoint()
        assert latest is not None and latest.render() == first.render()
        assert SignedNote.parse(latest.render()).signatures == first.signatures
        # The read endpoints and a reopen still work (each failed once the note grew).
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=log_routes(lambda: [world.log])),
            base_url="http://t",
        ) as http:
            r = await http.get(f"/log/{world.log.log_id}/checkpoint")
        assert r.status_code == 200 and SignedNote.parse(r.text).signatures == first.signatures
        # Control: a new leaf is a new size, which the witness is asked to cosign, once.
        await world.receipt()
        second = await cpr.tick()
        assert witness.posts == 2
        assert world.witness.key.verify(second)[0] == "valid" and len(second.signatures) == 2
        for _ in range(10):
            await cpr.tick()
        assert witness.posts == 2
    finally:
        await world.log.close()
    reopened = ReceiptLog.open(world.log_dir, world.log_key, ORIGIN)
    try:
        assert reopened.log_id == world.log.log_id and not reopened.frozen
        again = reopened.latest_checkpoint()
        assert again is not None and world.witness.key.verify(again)[0] == "valid"
    finally:
        await reopened.close()


async def test_an_unreachable_witness_never_stops_the_log_and_is_asked_again(
    tmp_path: Path,
) -> None:
    world = await make_world(tmp_path, witness_http=False)
    nobody = WitnessClient(world.witness.key, f"http://127.0.0.1:{free_port()}")
    cpr = Checkpointer(lambda: world.log, [nobody])
    try:
        await world.receipt()
        note = await cpr.tick()
        assert cpr.push_failures[world.witness.key.name] == 1
        assert len(note.signatures) == 1  # signed by the log, not cosigned
        await cpr.tick()
        assert cpr.push_failures[world.witness.key.name] == 2  # asked again, not forgotten
        # Control: the same witness reachable cosigns the same size.
        reachable, app = counted_checkpointer(world)
        cosigned = await reachable.tick()
        assert app.posts == 1 and world.witness.key.verify(cosigned)[0] == "valid"
    finally:
        await cpr.aclose()
        await world.log.close()


class WatchedSet(set[str]):
    """The supervisor's `down` set, announcing each change (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self.added = asyncio.Event()
        self.emptied = asyncio.Event()

    def add(self, name: str) -> None:
        super().add(name)
        self.added.set()

    def discard(self, name: str) -> None:
        super().discard(name)
        if not self:
            self.emptied.set()


async def test_a_background_loop_that_dies_is_counted_marked_down_and_restarted() -> None:
    failures = Counter("f", "f", ["job"], registry=CollectorRegistry())
    down = WatchedSet()
    runs = 0
    restarted = asyncio.Event()

    async def job(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("the loop died")
        restarted.set()
        await stop.wait()

    async def healthy(stop: asyncio.Event) -> None:
        await stop.wait()

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(supervise("checkpoints", job, stop, down, failures)),
        asyncio.create_task(supervise("control", healthy, stop, down, failures)),
    ]
    await asyncio.wait_for(down.added.wait(), 10)
    assert down == {"checkpoints"} and not restarted.is_set()
    assert failures.labels(job="checkpoints")._value.get() == 1
    await asyncio.wait_for(restarted.wait(), 10)
    assert down.emptied.is_set() and not down and runs == 2
    assert failures.labels(job="control")._value.get() == 0  # control: never counted
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert runs == 2 and not down


def test_readiness_fails_while_a_background_loop_is_down(
    pki: Any, triton_cluster: TritonCluster, triton_repository: Path, tmp_path: Path
) -> None:
    cfg = gateway_config(
        pki, triton_repository.parent / "registry", tmp_path / "data", node_table(triton_cluster)
    )
    gw = build_gateway(cfg)
    broken = True

    async def flaky(stop: asyncio.Event) -> None:
        if broken:
            raise RuntimeError("a loop that keeps dying")
        await stop.wait()

    gw.background.append(flaky)
    with running_gateway(cfg, gw) as running:

        def readiness() -> int:
            return httpx.get(f"{running.admin_base}/readyz", timeout=5).status_code

        _wait(lambda: "flaky" in "".join(gw.down) and readiness() == 503, "readiness fails")
        metrics = httpx.get(f"{running.admin_base}/metrics", timeout=5).text
        assert 'ztgate_background_failures_total{job="' in metrics
        broken = False  # the next restart stays up: readiness comes back
        _wait(lambda: not gw.down and readiness() == 200, "readiness recovers")


def _wait(cond: Callable[[], bool], what: str, bound_s: float = 30.0) -> None:
    end = time.monotonic() + bound_s
    while not cond():
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(0.05)
