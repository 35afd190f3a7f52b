"""Large JSON bodies are decoded in worker processes, never on the event loop.

`json.loads` holds the GIL (a thread would not help) and costs about 70-100 ms a MiB:
decoded on the loop, eight connections of maximal JSON bodies from one client took a
well-behaved victim from a 6 ms median to seconds (issue 14). Here a body over
`OFFLOAD_BYTES` goes to a small pool of spawned processes, so the loop keeps serving every
other client while it is parsed, and each identity has at most one such decode at a time,
so one client's bodies queue behind each other, not in front of everyone else's.
Bounded: at most `max_pending` decodes queued or running in all; past that, 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
from collections.abc import AsyncIterator
from concurrent.futures.process import BrokenProcessPool

from gateway.protocol.codec import decode_request
from gateway.protocol.problems import Overloaded
from gateway.protocol.tensors import InferRequest, Limits
from gateway.workers import init_worker

log = logging.getLogger(__name__)

# Below this, decoding costs less than sending the body to a worker and the answer back.
OFFLOAD_BYTES = 64 * 1024


def _warm() -> bool:
    return True


class DecodePool:
    def __init__(self, workers: int = 1, max_pending: int = 64) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self.pending = 0
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        # identity -> [its lock, requests holding or waiting for it]: bounded by the
        # identities with a large body in flight, not by identities seen.
        self._mine: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(os.getpid(),),
            )
        return self._pool

    async def warm(self) -> None:
        """Start the workers now (a spawn and the codec's imports take about a second)."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        await asyncio.gather(*(loop.run_in_executor(pool, _warm) for _ in range(self.workers)))

    @contextlib.asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        lock, users = self._mine.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._mine[key]

    async def decode(
        self,
        key: str,
        body: bytes,
        header_length: int | None,
        model: str,
        version: str,
        limits: Limits,
    ) -> InferRequest:
        """`decode_request` in a worker; its problems (400, 413) come back as raised."""
        if self.pending >= self.max_pending:
            raise Overloaded(
                "too many large request bodies are waiting to be decoded", retry_after=1
            )
        self.pending += 1
        try:
            async with self._turn(key):
                loop = asyncio.get_running_loop()
                try:
                    return await loop.run_in_executor(
                        self._executor(),
                        decode_request,
                        body,
                        header_length,
                        model,
                        version,
                        limits,
                    )
                except BrokenProcessPool as exc:
                    log.error("a decode worker died; rebuilding the pool")
                    self.close(wait=False)
                    raise Overloaded("a decode worker failed; retry", retry_after=1) from exc
        finally:
            self.pending -= 1

    def close(self, wait: bool = True) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
