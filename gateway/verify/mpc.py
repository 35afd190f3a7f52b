"""Mode `mpc`: the request runs under secret sharing on k >= 2 nodes of distinct providers.

The gateway secret-shares the input (and, once per session, the weights), each node party
computes on its shares with CrypTen, and only the gateway adds the output shares up. No
node sees the input, the weights or the output; the gateway's own dealer supplies the
Beaver tuples. Security is semi-honest: it assumes the parties do not collude with each
other, and a party that deviates can change the output undetected (`docs/mpc.md`).

A session per (model, version, party set) is started on first use and reused; a session
that fails is dropped and the request gets 503, the next one starts a fresh session. A
session closes itself when idle (`MpcSettings.idle_close_s`), freeing its party slots for
the other replicas; a party with no free slot is a 503 with Retry-After, never a queue.

Every answer is held to the model's output range (the registry's, declared or derived from
its last op): a party that shifts its output share out of range gets the request refused
(502 upstream-failed), never clamped. Shares do not say which party shifted, so nobody is
charged; it is an unresolved disagreement (`Router.unresolved`), an alert. A shift that
stays in range goes undetected: that is the semi-honest model's limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.config import NodeConfig
from gateway.job import Job, Outcome
from gateway.protocol.problems import (
    DeadlineExceeded,
    Forbidden,
    InvalidTensor,
    NoHealthyNode,
    UpstreamFailed,
)
from gateway.protocol.tensors import Tensor
from gateway.telemetry import PROCESS_METRICS, timed
from mpc.model import ModelError, MpcModel, Range
from mpc.session import (
    MpcBusy,
    MpcError,
    MpcSession,
    MpcSettings,
    MpcUnavailable,
    PartyEndpoint,
)

if TYPE_CHECKING:
    from gateway.registry import ModelEntry
    from gateway.routing.router import Router

# How far past its range an honest answer may fall: CrypTen's sigmoid/softmax are 16-bit
# fixed-point approximations (measured error on risk ~2e-3; the tests allow 1e-2). Values
# in this margin are passed on as computed, not clamped; anything further is refused.
RANGE_SLACK = 1e-2

SessionKey = tuple[str, str, tuple[str, ...]]
SessionFactory = Callable[[MpcModel, Sequence[PartyEndpoint], MpcSettings], Awaitable[MpcSession]]


async def _start(model: MpcModel, eps: Sequence[PartyEndpoint], s: MpcSettings) -> MpcSession:
    return await MpcSession.start(model, eps, s)


class MpcVerification:
    mode = "mpc"

    def __init__(
        self,
        settings: MpcSettings,
        party_addresses: Mapping[str, str],
        *,
        parties: int = 2,
        start_session: SessionFactory = _start,
    ) -> None:
        if parties < 2:
            raise ValueError("MPC needs at least two node parties")
        self.settings = settings
        self.party_addresses = dict(party_addresses)  # node name -> its party host:port
        self.parties = parties
        self._start_session = start_session
        self._sessions: dict[SessionKey, MpcSession] = {}
        self._models: dict[tuple[str, str], MpcModel] = {}
        self._lock = asyncio.Lock()

    def choose(self, nodes: Sequence[NodeConfig]) -> list[NodeConfig]:
        """k nodes with a party listener, one per provider; stable, so sessions are reused.

        `nodes` come from the router, so each provider is the signed one (signed_nodes)."""
        chosen: list[NodeConfig] = []
        providers: set[str] = set()
        for node in sorted(nodes, key=lambda n: n.name):
            if node.name in self.party_addresses and node.provider not in providers:
                chosen.append(node)
                providers.add(node.provider)
            if len(chosen) == self.parties:
                return chosen
        raise NoHealthyNode(
            f"MPC needs {self.parties} healthy party nodes from distinct providers; "
            f"{len(chosen)} available",
            retry_after=1,
        )

    def model(self, entry: ModelEntry) -> MpcModel:
        key = (entry.name, entry.version)
        if key not in self._models:
            try:
                self._models[key] = MpcModel.from_onnx(entry.path, entry.name)
            except ModelError as exc:
                raise Forbidden(f"model {entry.name} cannot run in mode 'mpc': {exc}") from exc
        return self._models[key]

    def output_range(self, entry: ModelEntry) -> Range:
        """The registry's range for the output, else what the program's last op implies
        (an index written before ranges were recorded); a model with neither is refused."""
        model = self.model(entry)
        spec = next((o for o in entry.outputs if o.name == model.output_name), None)
        declared = spec.value_range if spec is not None else None
        found = declared or model.output_range()
        if found is None:
            raise Forbidden(
                f"model {entry.name} cannot run in mode 'mpc': its output range is neither "
                "declared in the registry nor implied by its last op"
            )
        return found

    async def session(self, entry: ModelEntry, nodes: Sequence[NodeConfig]) -> MpcSession:
        key: SessionKey = (entry.name, entry.version, tuple(n.name for n in nodes))
        async with self._lock:
            current = self._sessions.get(key)
            if current is not None and current.alive:
                return current
            endpoints = [
                PartyEndpoint(n.name, self.party_addresses[n.name], n.provider, n.spiffe_id)
                for n in nodes
            ]
            try:
                session = await self._start_session(self.model(entry), endpoints, self.settings)
            except MpcBusy as exc:
                # Every session slot of a party is taken (other replicas' sessions): refused
                # now, not queued; slots free up as those sessions go idle and close.
                raise NoHealthyNode(
                    f"MPC parties are at their session limit ({exc}); retry later",
                    retry_after=exc.retry_after_s,
                ) from exc
            except MpcError as exc:
                raise NoHealthyNode(
                    f"could not start an MPC session: {exc}", retry_after=1
                ) from exc
            self._sessions[key] = session
            return session

    async def run(self, job: Job, router: Router) -> Outcome:
        entry = job.entry
        if len(job.inputs) != 1:
            raise InvalidTensor("MPC mode takes exactly one input tensor")
        tensor = job.inputs[0]
        if tensor.datatype not in ("FP32", "FP64"):
            raise InvalidTensor("MPC mode takes FP32 or FP64 inputs")
        model = self.model(entry)
        low, high = self.output_range(entry)  # before any party sees the input
        if set(job.output_names) - {model.output_name}:
            raise InvalidTensor(f"model {entry.name} has only the output {model.output_name!r}")
        nodes = self.choose([s.config for s in router.candidates(entry.name, job.allowed)])
        session = await self.session(entry, nodes)
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request deadline passed before MPC started")
        try:
            with timed("mpc_inference", PROCESS_METRICS.mpc_seconds, parties=len(nodes)):
                result = await session.infer(np.asarray(tensor.data), budget_s=remaining)
        except ValueError as exc:
            raise InvalidTensor(str(exc)) from exc
        except MpcUnavailable as exc:
            raise NoHealthyNode(f"MPC session failed: {exc}", retry_after=1) from exc
        y = result.outputs
        outside = ~np.isfinite(y)
        if low is not None:
            outside |= y < low - RANGE_SLACK
        if high is not None:
            outside |= y > high + RANGE_SLACK
        if outside.any():
            # Which party shifted its share cannot be told from the shares: charge nobody,
            # alert. The values stay out of the log and the problem: they are the client's.
            n = int(outside.sum())
            why = f"{n} of {y.size} output values outside [{low}, {high}] (model {entry.name})"
            router.unresolved(self.mode, result.parties, why)
            raise UpstreamFailed(
                f"the MPC answer is outside model {entry.name}'s output range "
                f"[{low}, {high}]: a party deviated from the protocol; nothing was returned"
            )
        out = Tensor(model.output_name, "FP32", tuple(y.shape), y)
        evidence: dict[str, Any] = {
            "parties": list(result.parties),
            "dealer": result.dealer,
            "session": result.session_id,
            "bytes_per_party": result.bytes_per_party,
            "rounds": result.rounds,
            "protocol": "CrypTen 0.4.1 arithmetic sharing, gateway dealer (TTP)",
            "security": "semi-honest, non-colluding parties",
        }
        return Outcome(
            outputs=(out,),
            nodes=result.parties,
            mode=self.mode,
            status="semi-honest-mpc",
            evidence=evidence,
        )

    async def close(self) -> None:
        async with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            await s.close()
