"""The gateway's background loops, supervised: a loop that dies is logged, counted,
makes readiness fail while it is down, and is restarted with a bounded backoff.

A silent death is the failure this exists for: a checkpoint loop that died left every
later receipt pending while the gateway kept answering 200 and reporting ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter

__all__ = ["Job", "supervise"]

log = logging.getLogger(__name__)

Job = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


async def supervise(
    name: str, job: Job, stop: asyncio.Event, down: set[str], failures: Counter
) -> None:
    """Run `job(stop)` until it returns or `stop` is set; restart it whenever it raises.

    `down` holds the names of jobs waiting to be restarted (readiness reads it)."""
    delay = FIRST_BACKOFF_S
    while not stop.is_set():
        try:
            await job(stop)
            return
        except Exception:
            failures.labels(job=name).inc()
            down.add(name)
            log.exception("background job %s died; restarting in %.1f s", name, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
            down.discard(name)
