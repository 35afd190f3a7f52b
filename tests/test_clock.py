"""Revocation staleness on a clock that neither a restart nor a clock set back resets.

A cut-off edge keeps serving on its last-known revocations for the bundle's staleness
budget. The budget must run on across restarts and must not be wound back by a captured
box's clock. Setting the real system clock back would disturb every other process on the
machine, so the set-back is a patched `time.time` in gateway.clock (the one fault here
not caused for real); the positive control shows the patch does reach the clock.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from gateway import clock as clock_module
from gateway.clock import PersistedClock
from gateway.revocation import Revocations
from gateway.state.factory import open_store
from gateway.state.memory import MemoryStore


def _unreachable_store() -> object:
    with socket.socket() as s:  # a port nothing listens on: Redis down, for real
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return open_store(f"redis://127.0.0.1:{port}", Path("/nonexistent"), timeout_s=0.2)


class _SetBack:
    """`time` as gateway.clock sees it, with the wall clock an hour behind."""

    def __init__(self, by_s: float) -> None:
        self.by_s = by_s
        self.monotonic = time.monotonic

    def time(self) -> float:
        return time.time() - self.by_s


def _synced_record(path: Path) -> float:
    """A gateway that synced its revocations, persisted its clock and stopped."""
    clock = PersistedClock(path)
    revs = Revocations(MemoryStore(), None, staleness_budget_s=1.0, clock=clock)
    assert asyncio.run(revs.sync()) == 0
    assert not revs.stale()  # positive control: just synced, fresh
    clock.persist()
    assert clock.last_sync is not None
    return clock.last_sync


def test_a_restart_continues_the_staleness_it_had(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    _synced_record(path)
    time.sleep(1.3)
    # Restarted, cut off: the budget (1 s) has run out while it was down.
    revs = Revocations(
        _unreachable_store(),  # type: ignore[arg-type]
        None,
        staleness_budget_s=1.0,
        clock=PersistedClock(path),
    )
    assert asyncio.run(revs.sync()) == -1  # the store really is unreachable
    assert revs.stale_for() >= 1.3
    assert revs.stale()
    # The same restart with the store reachable is fresh again: a sync, not a restart,
    # is what refreshes.
    fresh = Revocations(MemoryStore(), None, staleness_budget_s=1.0, clock=PersistedClock(path))
    assert asyncio.run(fresh.sync()) == 0
    assert not fresh.stale()


def test_setting_the_clock_back_does_not_make_old_data_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "clock.json"
    running = PersistedClock(path)
    revs = Revocations(MemoryStore(), None, staleness_budget_s=1.0, clock=running)
    assert asyncio.run(revs.sync()) == 0
    last_sync = running.last_sync
    assert last_sync is not None
    time.sleep(1.3)
    running.persist()  # what the sync loop does while the link is down
    monkeypatch.setattr(clock_module, "time", _SetBack(3600.0))
    # Set back while running: no effect.
    assert running.now() - last_sync >= 1.3
    assert revs.stale()
    # Set back, then restarted:
    # Positive control: a clock with no record does report the set-back time...
    assert PersistedClock(None).now() < last_sync - 3000
    # ...the persisted one resumes from its mark and runs on.
    clock = PersistedClock(path)
    assert clock.now() - last_sync >= 1.3
    revs = Revocations(
        _unreachable_store(),  # type: ignore[arg-type]
        None,
        staleness_budget_s=1.0,
        clock=clock,
    )
    assert revs.stale()
    time.sleep(0.2)
    assert clock.now() - last_sync >= 0.2  # still running, on the monotonic clock


def test_an_unreadable_clock_record_counts_as_stale_until_a_sync(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    _synced_record(path)
    path.write_text("{not json")
    revs = Revocations(MemoryStore(), None, staleness_budget_s=300.0, clock=PersistedClock(path))
    assert revs.stale()  # deleting or garbling the record does not buy a fresh budget
    assert asyncio.run(revs.sync()) == 0
    assert not revs.stale()
    # And a first start (no record at all) gets the budget from now, as before.
    first = Revocations(
        MemoryStore(), None, staleness_budget_s=300.0, clock=PersistedClock(tmp_path / "new.json")
    )
    assert not first.stale()


def test_the_record_is_written_durably_and_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    clock = PersistedClock(path)
    clock.synced()
    clock.persist()
    rec = json.loads(path.read_text())
    assert rec["last_sync"] == clock.last_sync
    assert rec["high_water"] >= rec["last_sync"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_deleted_clock_record_beside_revocations_is_not_a_first_start(tmp_path: Path) -> None:
    path, revoked = tmp_path / "clock.json", tmp_path / "revoked.jsonl"
    first = Revocations(
        MemoryStore(), revoked, staleness_budget_s=300.0, clock=PersistedClock(path)
    )
    assert not first.stale()  # a first start: the budget runs from now (control)
    assert asyncio.run(first.revoke("CN=client CA", "1f"))  # the data dir has history
    first.clock.persist()
    first.close()
    path.unlink()  # what someone with the box would try
    again = Revocations(
        MemoryStore(), revoked, staleness_budget_s=300.0, clock=PersistedClock(path)
    )
    assert again.stale()
    assert asyncio.run(again.sync()) == 0
    assert not again.stale()
    again.close()


def test_at_an_edge_only_the_cores_crl_refreshes_not_the_local_store(tmp_path: Path) -> None:
    """An edge whose revocations come from its core (gateway/uplink.py) is as fresh as the
    last CRL pulled: its own store answering every sync does not count."""
    clock = PersistedClock(tmp_path / "clock.json")
    revs = Revocations(MemoryStore(), None, staleness_budget_s=1.0, clock=clock)
    revs.fresh_from_store = False
    time.sleep(1.2)
    assert asyncio.run(revs.sync()) == 0  # the local store answers...
    assert revs.stale()  # ...and the data is stale all the same
    revs.clock.synced()  # a CRL pulled from the core
    assert not revs.stale()
