"""The receipt log's hop to its database thread (`ReceiptLog._in_db`): results and errors
come back to the caller, and a cancelled wait behaves as `run_in_executor`'s did (work not
started yet never runs; work already running finishes, its result dropped)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.receipts.entry import LogEntry
from gateway.receipts.log import ReceiptLog


@pytest.fixture
def receipt_log(tmp_path: Path) -> ReceiptLog:
    return ReceiptLog.open(tmp_path / "logs", ed25519.Ed25519PrivateKey.generate(), "t.local/r")


async def test_results_and_errors_come_back(receipt_log: ReceiptLog) -> None:
    main = threading.get_ident()
    where = await receipt_log._in_db(threading.get_ident)
    assert where != main  # it ran on the database thread

    def boom() -> None:
        raise ValueError("from the database thread")

    with pytest.raises(ValueError, match="from the database thread"):
        await receipt_log._in_db(boom)
    # the thread is still usable: appends commit after the error
    assert await receipt_log.append(LogEntry("receipt", bytes(32))) == 1
    await receipt_log.close()


async def test_cancelled_wait_before_the_work_starts_never_runs_it(
    receipt_log: ReceiptLog,
) -> None:
    gate = threading.Event()
    ran: list[str] = []
    blocker = asyncio.ensure_future(receipt_log._in_db(gate.wait))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(receipt_log._in_db(lambda: ran.append("cancelled")))
    kept = asyncio.ensure_future(receipt_log._in_db(lambda: ran.append("kept")))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued  # cancelled while the thread is still busy with `blocker`
    gate.set()
    await blocker
    await kept  # positive control: the same kind of call, not cancelled, runs
    assert ran == ["kept"]
    await receipt_log.close()


async def test_cancelled_wait_after_the_work_started_lets_it_finish(
    receipt_log: ReceiptLog,
) -> None:
    loop = asyncio.get_running_loop()
    started, gate = asyncio.Event(), threading.Event()
    finished: list[bool] = []

    def slow() -> int:
        loop.call_soon_threadsafe(started.set)
        gate.wait()
        finished.append(True)
        return 7

    waiter = asyncio.ensure_future(receipt_log._in_db(slow))
    await started.wait()
    waiter.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # the next call queues behind it on the one thread: by then it has finished
    assert await receipt_log._in_db(lambda: 8) == 8
    assert finished == [True]
    await receipt_log.close()
