"""The fault proxy breaks real TCP connections the way a bad link does.

Each fault is shown against a real upstream (an echo server on loopback) with the same
connection working when the fault is lifted (the positive control), so a proxy that did
nothing, or that broke everything, would fail here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.faultproxy import FaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest_asyncio.fixture(loop_scope="function")
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy(("127.0.0.1", port)) as p:
        yield p
    server.close()
    await server.wait_closed()


async def _round_trip(port: int, payload: bytes, timeout_s: float = 20.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()

    sending = asyncio.ensure_future(send())  # while reading: an echo fills both buffers
    try:
        got = bytearray()
        while len(got) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), timeout_s)
            if not chunk:
                break
            got += chunk
        return bytes(got)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()


async def _is_refused(port: int) -> bool:
    """Connected-then-reset or refused: nothing comes back."""
    try:
        return await _round_trip(port, b"ping", timeout_s=2.0) == b""
    except (ConnectionError, TimeoutError):
        return True


@pytest.mark.asyncio
async def test_bytes_pass_intact_and_are_counted(proxy: FaultProxy) -> None:
    payload = os.urandom(1 << 20)
    assert await _round_trip(proxy.port, payload) == payload
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)


@pytest.mark.asyncio
async def test_a_cut_resets_open_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"  # open and working
    proxy.cut()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        writer.write(b"after")
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(5), 5)
    writer.close()
    assert await _is_refused(proxy.port)
    assert proxy.stats.refused >= 1
    proxy.restore()
    assert await _round_trip(proxy.port, b"back") == b"back"


@pytest.mark.asyncio
async def test_drop_mid_stream_ends_each_connection_after_n_bytes(proxy: FaultProxy) -> None:
    proxy.drop_after(10_000)
    payload = os.urandom(50_000)
    try:
        got = await _round_trip(proxy.port, payload)
    except ConnectionError:
        got = b""  # reset before anything was read: also short
    assert len(got) <= 10_000
    assert got == payload[: len(got)]  # what did arrive is the start of the stream
    assert proxy.stats.bytes_down <= 10_000
    proxy.restore()
    assert await _round_trip(proxy.port, payload) == payload


@pytest.mark.asyncio
async def test_a_throttled_link_is_never_faster_than_its_rate(proxy: FaultProxy) -> None:
    rate = 32_000  # bytes per second, each way
    proxy.throttle(rate)
    payload = os.urandom(48_000)
    started = time.monotonic()
    assert await _round_trip(proxy.port, payload) == payload
    elapsed = time.monotonic() - started
    # A lower bound only: a slow machine makes it slower, never faster.
    assert elapsed >= 0.9 * len(payload) / rate
    proxy.restore()
    assert await _round_trip(proxy.port, payload) == payload


@pytest.mark.asyncio
async def test_a_flapping_link_is_sometimes_up_and_sometimes_down(proxy: FaultProxy) -> None:
    proxy.flap(up_s=0.3, down_s=0.3)
    outcomes: set[bool] = set()
    deadline = time.monotonic() + 30
    while len(outcomes) < 2 and time.monotonic() < deadline:
        outcomes.add(await _is_refused(proxy.port))
        await asyncio.sleep(0.05)
    assert outcomes == {True, False}
    proxy.restore()
    assert not await _is_refused(proxy.port)
