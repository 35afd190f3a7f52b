"""Which nodes can prove which model, learned from the nodes themselves.

A node proves model ``<name>`` when its Triton reports ``<name>-zk`` ready (KServe
``ModelReady``, over the same pinned mTLS channel the gateway infers on). Nothing is kept
by hand: a node's ``models`` list (empty meaning every model) says what it may be asked,
not that it holds a proving key, and listing ``<name>-zk`` there is not needed.

The capability only ever **narrows**: a node is asked only if the signed facts and the
policy decision already allow it for this request (``allowed``), and a zk request goes only
to allowed nodes that said yes. A node cannot widen where a request may go by claiming a
prover: asking a node whom the decision excludes never happens.

Answers are cached per (node, model, version) for ``ttl_s``, the cache is bounded, and each
question carries a timeout; a node that does not answer counts as not ready until asked
again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from gateway.config import NodeConfig

MAX_ENTRIES = 4096


class ProverCapability:
    def __init__(
        self, ttl_s: float = 30.0, timeout_s: float = 1.0, max_entries: int = MAX_ENTRIES
    ) -> None:
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str, str], tuple[bool, float]] = OrderedDict()
        self.asked = 0  # ModelReady questions sent (tests count them)

    async def ready(
        self,
        states: Iterable[Any],
        model: str,
        version: str,
        allowed: Callable[[NodeConfig], bool],
    ) -> set[str]:
        """Names of the nodes among ``states`` (the router's `NodeState`s) that ``allowed``
        admits and that report ``model`` ready; only admitted nodes are ever asked."""
        now = time.monotonic()
        admitted = [s for s in states if allowed(s.config)]
        stale = [
            s
            for s in admitted
            if (hit := self._seen.get((s.config.name, model, version))) is None
            or now - hit[1] > self.ttl_s
        ]
        if stale:
            answers = await asyncio.gather(*(self._ask(s, model, version) for s in stale))
            for state, answer in zip(stale, answers, strict=True):
                self._remember((state.config.name, model, version), answer)
        return {
            s.config.name
            for s in admitted
            if self._seen.get((s.config.name, model, version), (False, 0.0))[0]
        }

    def forget(self, node: str) -> None:
        """Ask ``node`` again next time (it failed a proof: it may have lost the model)."""
        for key in [k for k in self._seen if k[0] == node]:
            del self._seen[key]

    def _remember(self, key: tuple[str, str, str], answer: bool) -> None:
        self._seen[key] = (answer, time.monotonic())
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    async def _ask(self, state: Any, model: str, version: str) -> bool:
        self.asked += 1
        ready: bool = await state.client.model_ready(model, version, self.timeout_s)
        return ready
