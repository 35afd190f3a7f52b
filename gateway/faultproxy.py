"""A TCP proxy that breaks a link on purpose: cut, flap, delay, throttle, drop mid-stream.

Between an edge gateway and the core (or a gateway and a node) it stands in for a denied,
disconnected, intermittent or limited link, for the tests and the demo's edge scene. It
works on bytes, below TLS, so what goes through is the real handshake and the real
protocol: a cut is a reset connection, a throttled link delivers every byte late, a drop
mid-stream ends a connection after a set number of bytes. Faults change while
connections are open, as a real link's do.

    proxy = FaultProxy(upstream=("127.0.0.1", 8443))
    await proxy.start()              # proxy.port: where to dial instead
    proxy.cut()                      # open connections reset, new ones refused
    proxy.restore()
    proxy.throttle(64_000 // 8)      # 64 kbit/s, each direction
    proxy.drop_after(10_000)         # every connection ends after 10,000 bytes upstream->down
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
import threading
import time

log = logging.getLogger(__name__)

__all__ = ["FaultProxy", "LinkStats", "ThreadedFaultProxy"]

_CHUNK = 16 * 1024
_MAX_CONNECTIONS = 256  # a bound, so a test that leaks connections fails loudly


@dataclasses.dataclass
class LinkStats:
    """What crossed the link, for the DDIL figures (bytes on the wire, both ways)."""

    connections: int = 0
    refused: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client


class _Bucket:
    """Bytes per second for one direction; shared by every connection, as one link is."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._allowance = 0.0
        self._last = time.monotonic()

    def set(self, rate: float | None) -> None:
        self.rate = rate
        self._allowance = 0.0
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        while self.rate is not None:
            now = time.monotonic()
            # No burst: at most one chunk's worth may accumulate, so a link idle for a
            # while does not then deliver faster than its rate.
            self._allowance = min(
                self._allowance + (now - self._last) * self.rate, max(float(n), self.rate / 10)
            )
            self._last = now
            if self._allowance >= n:
                self._allowance -= n
                return
            await asyncio.sleep((n - self._allowance) / self.rate)


class FaultProxy:
    def __init__(
        self, upstream: tuple[str, int], *, host: str = "127.0.0.1", connect_timeout_s: float = 5.0
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.stats = LinkStats()
        self._connect_timeout_s = connect_timeout_s
        self._server: asyncio.Server | None = None
        self._up = True
        self._delay_s = 0.0
        self._drop_after: int | None = None
        self._buckets = {"up": _Bucket(), "down": _Bucket()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flapper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ faults

    @property
    def is_up(self) -> bool:
        return self._up

    def cut(self) -> None:
        """The link goes down: open connections are reset, new ones refused."""
        self._up = False
        for task in list(self._tasks):
            task.cancel()

    def restore(self) -> None:
        """Back up, with no delay, throttle, drop or flapping."""
        self._stop_flapping()
        self._up = True
        self._delay_s = 0.0
        self._drop_after = None
        for b in self._buckets.values():
            b.set(None)

    def delay(self, seconds: float) -> None:
        """Each chunk waits this long before it is forwarded (latency, both ways)."""
        self._delay_s = max(0.0, seconds)

    def throttle(self, bytes_per_s: float | None) -> None:
        """At most this many bytes per second each way, over all connections."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("a throttle is a positive rate; cut() for none")
        for b in self._buckets.values():
            b.set(bytes_per_s)

    def drop_after(self, n_bytes: int | None) -> None:
        """Each connection is reset once it has carried `n_bytes` towards the client."""
        self._drop_after = n_bytes

    def flap(self, up_s: float, down_s: float) -> None:
        """Alternate up and down until `restore()` (an intermittent link)."""
        self._stop_flapping()

        async def run() -> None:
            while True:
                self._up = True
                await asyncio.sleep(up_s)
                self.cut()
                await asyncio.sleep(down_s)

        self._flapper = asyncio.get_running_loop().create_task(run())

    def _stop_flapping(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
            self._flapper = None

    # ------------------------------------------------------------------ serving

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._stop_flapping()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up or len(self._tasks) >= _MAX_CONNECTIONS:
            self.stats.refused += 1
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), self._connect_timeout_s
            )
        except (OSError, TimeoutError):
            self._tasks.discard(task)
            _reset(writer)
            return
        try:
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_w, "up")),
                asyncio.ensure_future(self._pump(up_r, writer, "down")),
            ]
            try:
                # One side closing ends the connection as a whole: a half-open link is
                # not a fault this proxy models.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except asyncio.CancelledError:
            _reset(writer)
            _reset(up_w)
            return
        finally:
            self._tasks.discard(task)
        for w in (writer, up_w):
            w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        carried = 0
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            if way == "down" and self._drop_after is not None:
                room = self._drop_after - carried
                if room <= 0:
                    _reset(writer)
                    return
                data = data[:room]
            await self._buckets[way].take(len(data))
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            writer.write(data)
            await writer.drain()
            carried += len(data)
            if way == "up":
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            if way == "down" and self._drop_after is not None and carried >= self._drop_after:
                _reset(writer)
                return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a link that went away does (not a polite FIN)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ThreadedFaultProxy:
    """A `FaultProxy` on its own event loop thread, for code that is not async (the demo,
    the system suite): the faults are applied on the proxy's loop."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.proxy = FaultProxy(upstream)
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)

    @property
    def port(self) -> int:
        return self.proxy.port

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.restore)

    def throttle(self, bytes_per_s: float | None) -> None:
        self._loop.call_soon_threadsafe(self.proxy.throttle, bytes_per_s)

    def flap(self, up_s: float, down_s: float) -> None:
        self._loop.call_soon_threadsafe(self.proxy.flap, up_s, down_s)

    def delay(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(self.proxy.delay, seconds)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
