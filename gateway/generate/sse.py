"""The server-sent-events response of a stream, as a plain ASGI response.

Starlette's StreamingResponse cancels its task when the client goes away but leaves the
body iterator to the garbage collector; here the event source is always closed
(`aclose`), so the generation is cancelled at the node and the closing receipt written
as soon as the client leaves, or stops reading for `send_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


async def client_gone(receive: Receive) -> None:
    """Returns once the client has left: called after the request body was read, the
    ASGI receive channel has nothing else to say (a job's replay blocks instead)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        send_timeout_s: float,
        on_close: Callable[[], Awaitable[object]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`on_close` runs last, whatever happened, even if `events` never started (a
        generator closed before its first step runs none of its own cleanup)."""
        super().__init__(
            status_code=200,
            headers={"cache-control": "no-store", "x-accel-buffering": "no", **(headers or {})},
            media_type=self.media_type,
        )
        # Its length is not known: no Content-Length (Response sets one for its body).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.events = events
        self.on_close = on_close
        self.send_timeout_s = send_timeout_s
        self.outcome = "unsent"  # complete | client-gone | send-timeout | failed

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.events:
            async with asyncio.timeout(self.send_timeout_s):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.outcome = "complete"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(client_gone(receive))
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                self.outcome = "client-gone"
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        except TimeoutError:
            self.outcome = "send-timeout"
        except OSError:
            self.outcome = "client-gone"
        finally:
            watch.cancel()
            if not pump.done():
                pump.cancel()
            # Closing the source cancels the generation and writes the closing receipt.
            try:
                await self.events.aclose()
            finally:
                await self.on_close()
