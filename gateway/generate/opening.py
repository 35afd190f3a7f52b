"""Opening receipts written while the node's first token is on its way.

The opening receipt names the node, so it cannot be written before a node is picked; but
it need not wait for that node's first token either: it only has to be durable before
anything reaches the client. `EarlyOpenings` starts the receipt (signed, then fsynced by
the log's group commit) as each node is picked (`open_generation`'s `on_attempt`), so its
cost overlaps the node's time to the first token instead of adding to it.

A node that fails before its first token leaves an opening receipt naming it; the next
node gets its own. Each such orphan is closed at once with finish reason "node-error"
(or "cancelled" when the request itself ended) and no token: the log then says which
nodes were tried, and every opening receipt has its closing one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from gateway.receipts.issue import Issued
from gateway.receipts.log import LogError, LogFrozen
from gateway.receipts.model import ExtValue
from gateway.receipts.service import ReceiptService
from gateway.receipts.stream import StreamHeader, close_stream, open_stream

log = logging.getLogger(__name__)

_RECEIPT_ERRORS = (LogError, LogFrozen, OSError)

# Orphans being closed after their request's task was cancelled: referenced until done
# (at most one per node tried, `Router.cfg.max_attempts` per stream).
_CLOSING: set[asyncio.Task[None]] = set()


class EarlyOpenings:
    def __init__(
        self,
        receipts: ReceiptService,
        head_for: Callable[[str], StreamHeader],
        prompt_ids: Sequence[int],
        parameters: Mapping[str, ExtValue],
    ) -> None:
        self.receipts = receipts
        self.head_for = head_for
        self.prompt_ids = prompt_ids
        self.parameters = parameters
        self.attempts: list[tuple[StreamHeader, asyncio.Task[Issued]]] = []

    def attempt(self, node: str) -> None:
        """`open_generation`'s `on_attempt`: start the opening receipt naming `node`."""
        head = self.head_for(node)
        task = asyncio.ensure_future(
            open_stream(self.receipts, head, self.prompt_ids, self.parameters)
        )
        self.attempts.append((head, task))

    async def chosen(self, node: str) -> tuple[StreamHeader, Issued]:
        """The answering node's opening receipt, once durable (raises what the log
        raised); the other attempts' receipts are closed as failed."""
        head, task = next(a for a in reversed(self.attempts) if a[0].node == node)
        self.attempts.remove((head, task))
        self._closing("node-error")  # off the path to the first token
        try:
            return head, await asyncio.shield(task)
        except asyncio.CancelledError:  # the request ended: `abandon` closes it too
            self.attempts.append((head, task))
            raise

    async def abandon(self, reason: str) -> None:
        """Close every opening receipt still held, with no token and `reason`; shielded
        from the request's cancellation."""
        task = self._closing(reason)
        if task is not None:
            await asyncio.shield(task)

    def _closing(self, reason: str) -> asyncio.Task[None] | None:
        attempts, self.attempts = self.attempts, []
        if not attempts:
            return None
        task = asyncio.ensure_future(self._close(attempts, reason))
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)
        return task

    async def _close(
        self, attempts: Sequence[tuple[StreamHeader, asyncio.Task[Issued]]], reason: str
    ) -> None:
        for head, task in attempts:
            try:
                issued = await task
                await close_stream(
                    self.receipts,
                    head,
                    issued.receipt.receipt_id,
                    len(self.prompt_ids),
                    (),
                    reason,
                )
            except _RECEIPT_ERRORS:
                log.exception("an unused opening receipt of request %s not closed", head.request_id)
