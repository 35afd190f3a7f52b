"""Pick a node, call it, check its reply, retry elsewhere; eject nodes that keep failing.

Selection is power-of-two-choices over the nodes that serve the model, pass the policy's
constraints, are not ejected and are under their pending-request cap: of two random
candidates, the one with the lower (pending + 1) x latency estimate wins. The estimate is
an EWMA of the node's replies that decays toward zero while the node gets none
(`ewma_decay_s`): the estimate only moves when the node is picked, so without the decay a
node whose first reply was slow lost every comparison and was never picked again.
Decayed, it wins a pick after a while idle and its real latency is learnt from traffic.

Ejection is by observed errors, not readiness: a Triton whose python stub crashed stays
"ready" while every inference fails. N consecutive failures eject a node for a time that
doubles with each ejection; at most a set share of a model's nodes is ejected at once;
the health loop readmits a node only after a probe inference succeeds. Ejections live in
the shared store, so every replica stops sending to a node any replica ejected; each
replica keeps a local copy refreshed by its health loop, so the request path never waits
on the store.

Verifiers add reputation on top: `charge` when an independent majority (or a proof) shows a
node's reply was wrong, `vouch` when an independent node confirmed it. Charges accumulate
until a vouch: the transport success of the very reply that lied must not wipe them, or a
liar would never be ejected. When only two parties disagree and nothing breaks the tie,
either could be the liar, so `unresolved` charges neither (else a liar could get honest
nodes ejected) and raises an alert instead: `ztgate_unresolved_disagreements_total{mode}`
and a warning naming the nodes, never the request's data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.config import NodeConfig, Routing
from gateway.forward.site import answered_by
from gateway.job import Job, NodeFilter
from gateway.protocol.problems import BadRequest, DeadlineExceeded, NoHealthyNode, UpstreamFailed
from gateway.protocol.tensors import DATATYPES, Tensor, all_finite
from gateway.registry import ModelEntry
from gateway.routing.node_client import GenerateRequest, NodeClient, NodeError
from gateway.routing.reputation import Reputation
from gateway.state import StateStore, StoreUnavailable
from gateway.telemetry import span

log = logging.getLogger(__name__)


@dataclass
class NodeState:
    client: NodeClient
    pending: int = 0
    ewma_s: float = 0.001  # the estimate as of `learnt_at`
    learnt_at: float = field(default_factory=time.monotonic)
    decay_s: float = 10.0  # Routing.ewma_decay_s
    failures: int = 0  # consecutive, as this replica saw them
    attempts: int = 0  # requests sent to this node (not health probes), whatever the outcome
    served: int = 0
    failed: int = 0
    ejections: int = 0
    charges: int = 0  # verifier charges since an independent node last vouched for it
    disputed: int = 0  # unresolved disagreements it was part of (never counts against it)

    @property
    def config(self) -> NodeConfig:
        return self.client.node

    def latency(self, now: float | None = None) -> float:
        """The latency estimate now: the EWMA, decayed for the time it was not updated."""
        idle = (time.monotonic() if now is None else now) - self.learnt_at
        return self.ewma_s * math.exp(-idle / self.decay_s) if idle > 0 else self.ewma_s

    def learn(self, seconds: float, alpha: float) -> None:
        now = time.monotonic()
        est = self.latency(now)
        self.ewma_s = est + alpha * (seconds - est)
        self.learnt_at = now

    def score(self) -> float:
        return (self.pending + 1) * self.latency()


@dataclass(frozen=True)
class Call:
    """What to ask a node for, when it is not the job's own model and outputs (the zk mode
    asks a node for the proof output of the model's prover)."""

    model: str
    version: str
    outputs: tuple[str, ...]


# Holds a node's reply to what the mode needs; raises NodeError when the node is at fault
# (the reply is dropped, the node charged, the next candidate tried). Its value is kept in
# `Routed.checked`.
ReplyCheck = Callable[[list[Tensor]], Awaitable[Any]]


@dataclass(frozen=True)
class Routed:
    outputs: list[Tensor]
    node: NodeConfig
    attempts: int
    tried: tuple[str, ...]
    nonfinite: bool = False
    checked: Any = None  # what the mode's ReplyCheck returned


@dataclass
class Router:
    nodes: dict[str, NodeState]
    store: StateStore
    cfg: Routing
    rng: random.Random = field(default_factory=random.Random)
    ejected: dict[str, float] = field(default_factory=dict)  # node -> wall-clock until
    probe_models: dict[str, ModelEntry] = field(default_factory=dict)
    # mode -> disagreements nothing could break; this replica's count (Prometheus sums them)
    unresolved_disagreements: Counter[str] = field(default_factory=Counter)
    # Lie accounting apart from transport health (docs/reputation.md); None: not kept.
    reputation: Reputation | None = None
    retries: int = 0  # attempts after a request's first (ztgate_node_retries_total)
    site: str = ""  # this gateway's site: its nodes (and unlabelled ones) are tried first

    @classmethod
    def from_clients(cls, clients: Iterable[NodeClient], store: StateStore, cfg: Routing) -> Router:
        return cls(
            {c.node.name: NodeState(c, decay_s=cfg.ewma_decay_s) for c in clients}, store, cfg
        )

    def candidates(self, model: str, allowed: NodeFilter | None = None) -> list[NodeState]:
        return [
            s
            for s in self.nodes.values()
            if s.config.serves(model)
            and s.config.name not in self.ejected
            and s.pending < self.cfg.max_pending_per_node
            and (self.reputation is None or not self.reputation.quarantined(s.config))
            and (allowed is None or allowed(s.config))
        ]

    def _pick(self, cands: list[NodeState]) -> NodeState:
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        return a if a.score() <= b.score() else b

    async def infer(
        self,
        job: Job,
        *,
        only: NodeFilter | None = None,
        call: Call | None = None,
        check: ReplyCheck | None = None,
        per_try_timeout_s: float | None = None,
        max_attempts: int | None = None,
        learn_latency: bool = True,
        max_output_bytes: int = 64 * 1024 * 1024,
    ) -> Routed:
        """The one attempt loop: run `job` on one node that policy allows (and `only`
        narrows to), retrying on others until the deadline; `job.deadline` is
        time.monotonic() based.

        A reply is held to the model's signature (`check_reply`), or, with `call`, to the
        mode's own `check`. Each failure is charged to the node that caused it. Slow modes
        (proving) pass `learn_latency=False`: their seconds must not skew the latency EWMA
        that plain requests are balanced by."""
        entry = job.entry
        if entry.generative is not None:
            # A decoupled node model refuses unary inference; say why before any node does.
            raise BadRequest(
                f"model {entry.name!r} is generative: ask its generate or chat endpoints, not infer"
            )
        what = call or Call(entry.name, entry.version, job.output_names)
        timeout = self.cfg.per_try_timeout_s if per_try_timeout_s is None else per_try_timeout_s
        tries = self.cfg.max_attempts if max_attempts is None else max_attempts

        def eligible(node: NodeConfig) -> bool:
            return job.allowed(node) and (only is None or only(node))

        tried: list[str] = []
        reasons: list[str] = []
        for attempt in range(1, tries + 1):
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"deadline passed after {attempt - 1} attempt(s): {'; '.join(reasons)}"
                )
            cands = [s for s in self.candidates(entry.name, eligible) if s.config.name not in tried]
            # Hybrid sites: this site's nodes first; another site's only when none of ours
            # is left, and only those policy allowed (`eligible`: residency included).
            cands = [s for s in cands if s.config.site in ("", self.site)] or cands
            if not cands:
                if tried:
                    break
                raise NoHealthyNode(
                    f"no healthy node may serve model {entry.name!r} now", retry_after=1
                )
            state = self._pick(cands)
            name = state.config.name
            tried.append(name)
            state.attempts += 1
            if attempt > 1:
                self.retries += 1
            state.pending += 1
            start = time.monotonic()
            nonfinite = False
            checked: Any = None
            # A span in this process only: the node gets no trace context (telemetry.py).
            with span(
                "node_attempt",
                node=name,
                region=state.config.region,
                provider=state.config.provider,
                attempt=attempt,
                model=what.model,
            ) as attempt_span:
                try:
                    outputs = await state.client.infer(
                        what.model,
                        what.version,
                        job.inputs,
                        what.outputs,
                        timeout_s=min(timeout, remaining),
                        request_id=job.request_id,
                    )
                    if check is None:
                        nonfinite = check_reply(
                            entry, job.inputs, outputs, what.outputs, max_output_bytes
                        )
                    else:
                        checked = await check(outputs)
                except NodeError as exc:
                    attempt_span.set(outcome="failed")
                    reasons.append(f"{name}: {exc.reason}")
                    log.warning("attempt %d failed on %s: %s", attempt, name, exc.reason)
                    await self._failed(state)
                    continue
                finally:
                    state.pending -= 1
                attempt_span.set(outcome="ok")
            if learn_latency:
                state.learn(time.monotonic() - start, self.cfg.ewma_alpha)
            state.served += 1
            if state.failures:
                state.failures = 0
                await self._quiet(self.store.record_success(name))
            return Routed(outputs, state.config, attempt, tuple(tried), nonfinite, checked)
        raise UpstreamFailed(f"every node tried failed ({', '.join(tried)}): {'; '.join(reasons)}")

    def answered(self, nodes: Sequence[str]) -> None:
        """Note the sites of the nodes whose answer the request gets, for its receipt:
        after the mode ran, since only the mode knows which of the nodes it asked made the
        answer (redundant's agreeing pair, the zk prover, the MPC parties)."""
        answered_by([self.nodes[n].config.site for n in nodes if n in self.nodes], self.site)

    async def charge(self, node: str, evidence: str = "contradicted") -> None:
        """Count a failure a verifier proved after the reply passed routing's checks.

        Only for a verdict that singles this node out (outvoted by an independent majority,
        a failed proof); two parties that merely disagree go to `unresolved` instead. The
        verdict is also evidence for the node's reputation (`evidence`: contradicted or
        outvoted), which no later success erases.
        """
        state = self.nodes.get(node)
        if state is None:
            return
        await self.judge(node, evidence)
        # Not `failures`: that count is reset by the transport success of the very reply
        # being charged, so a node that answers every request (with lies) was never ejected.
        state.charges += 1
        await self._failed(state, verified=state.charges)

    async def judge(self, node: str, event: str) -> None:
        """Evidence about a node's answer for its reputation record (a no-op without one)."""
        state = self.nodes.get(node)
        if state is not None and self.reputation is not None:
            await self.reputation.observe(state.config, event)

    async def confirm(self, node: str) -> None:
        """`vouch`, and the confirmation counted as evidence."""
        self.vouch(node)
        await self.judge(node, "confirmed")

    def vouch(self, node: str) -> None:
        """An independent node gave the same answer: the node's charges start over."""
        state = self.nodes.get(node)
        if state is not None:
            state.charges = 0

    def unresolved(self, mode: str, nodes: Sequence[str], why: str) -> None:
        """Parties disagreed and nothing broke the tie: charge nobody, raise the alert.

        Either side may be the liar, so charging both would let one liar eject honest
        nodes, and charging none silently would hide the attack. ``why`` must not carry
        the request's inputs or outputs.
        """
        self.unresolved_disagreements[mode] += 1
        for name in nodes:
            state = self.nodes.get(name)
            if state is not None:
                state.disputed += 1
        log.warning(
            "unresolved disagreement in mode %s between %s (nobody charged): %s",
            mode,
            ", ".join(nodes),
            why,
        )

    async def _failed(self, state: NodeState, verified: int = 0) -> None:
        state.failures += 1
        state.failed += 1
        name = state.config.name
        count = await self._quiet(self.store.record_failure(name))
        failures = max(state.failures, verified, count if isinstance(count, int) else 0)
        if failures >= self.cfg.eject_after_failures and self._may_eject(state.config):
            until = await self._quiet(
                self.store.eject(name, self.cfg.eject_base_s, self.cfg.eject_max_s)
            )
            duration = until if isinstance(until, float) else self.cfg.eject_base_s
            self.ejected[name] = time.time() + duration
            state.ejections += 1
            state.charges = 0  # the ejection is the penalty; a readmitted node starts over
            log.warning("ejected node %s for %.1fs after %d failures", name, duration, failures)

    def _may_eject(self, node: NodeConfig) -> bool:
        """Never eject more than the configured share of any model's nodes."""
        for model in {m for s in self.nodes.values() for m in s.config.models} or {""}:
            if model and not node.serves(model):
                continue
            peers = [s for s in self.nodes.values() if not model or s.config.serves(model)]
            out = sum(1 for s in peers if s.config.name in self.ejected)
            if out + 1 > math.floor(self.cfg.max_ejected_share * len(peers)):
                return False
        return True

    async def _quiet(self, op: object) -> object:
        """A store call that may fail without failing the request (health is soft state)."""
        try:
            return await asyncio.wait_for(op, timeout=0.5)  # type: ignore[arg-type]
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("shared store unavailable for health state: %s", exc)
            return None

    # --- health loop --------------------------------------------------------------------
    async def refresh(self) -> None:
        """Pull ejections other replicas made, and probe nodes whose ejection ran out."""
        got = await self._quiet(self.store.ejected_until(self.nodes))
        now = time.time()
        if isinstance(got, dict):
            # The store forgets an ejection once its time runs out; this replica keeps
            # the node out until its own probe passes.
            expired = {k: v for k, v in self.ejected.items() if k not in got and v <= now}
            self.ejected = {**{k: float(v) for k, v in got.items()}, **expired}
        for name, until in list(self.ejected.items()):
            if until <= now:
                await self._probe(self.nodes[name])
        if self.reputation is not None:
            await self._quiet(self.reputation.sync())

    async def _probe(self, state: NodeState, timeout_s: float = 1.0) -> None:
        name = state.config.name
        try:
            entry = probe_entry(state, self)
            if entry is not None and entry.generative is not None:
                await probe_stream(state.client, entry, timeout_s)
            else:
                await state.client.infer(*probe_request(state, self), timeout_s=timeout_s)
        except NodeError as exc:
            log.info("node %s still failing its probe: %s", name, exc.reason)
            until = await self._quiet(
                self.store.eject(name, self.cfg.eject_base_s, self.cfg.eject_max_s)
            )
            self.ejected[name] = time.time() + (until if isinstance(until, float) else 1.0)
            return
        await self._quiet(self.store.readmit(name))
        self.ejected.pop(name, None)
        state.failures = 0
        log.warning("readmitted node %s after a successful probe", name)

    async def run_health(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # the loop must outlive any one bad round
                log.exception("health round failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.health_interval_s)
            except TimeoutError:
                pass

    async def close(self) -> None:
        for s in self.nodes.values():
            await s.client.close()


class DisagreementMetrics(Collector):
    """``ztgate_unresolved_disagreements_total{mode}``, read from the router at scrape time.

    Register it on the gateway's metrics registry; an operator alerts on any increase (a
    node may be lying, and the two-party rule keeps it from being charged).
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "ztgate_unresolved_disagreements",
            "Parties that disagreed with nothing to break the tie; nobody was charged",
            labels=["mode"],
        )
        for mode, count in sorted(self.router.unresolved_disagreements.items()):
            family.add_metric([mode], count)
        yield family


class NodeMetrics(Collector):
    """Per node, read from the router at scrape time (nothing on the request path):
    ``ztgate_node_attempts_total``, ``ztgate_node_failures_total`` (routing's and the
    verifiers' charges), ``ztgate_node_ejections_total``, ``ztgate_node_ejected``,
    ``ztgate_node_pending``, and ``ztgate_node_retries_total`` (attempts after a
    request's first)."""

    LABELS = ("node", "region", "provider")

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        fams: list[tuple[CounterMetricFamily | GaugeMetricFamily, Callable[[NodeState], float]]]
        fams = [
            (
                CounterMetricFamily(
                    "ztgate_node_attempts", "Requests sent to the node", labels=self.LABELS
                ),
                lambda s: s.attempts,
            ),
            (
                CounterMetricFamily(
                    "ztgate_node_failures",
                    "Attempts that failed on the node, and verifier charges",
                    labels=self.LABELS,
                ),
                lambda s: s.failed,
            ),
            (
                CounterMetricFamily(
                    "ztgate_node_ejections",
                    "Times this replica ejected the node",
                    labels=self.LABELS,
                ),
                lambda s: s.ejections,
            ),
            (
                GaugeMetricFamily(
                    "ztgate_node_ejected", "1 while the node is ejected", labels=self.LABELS
                ),
                lambda s: 1.0 if s.config.name in self.router.ejected else 0.0,
            ),
            (
                GaugeMetricFamily(
                    "ztgate_node_pending", "Requests in flight on the node", labels=self.LABELS
                ),
                lambda s: s.pending,
            ),
        ]
        for name, state in sorted(self.router.nodes.items()):
            labels = [name, state.config.region, state.config.provider]
            for family, value in fams:
                family.add_metric(labels, value(state))
        for family, _ in fams:
            yield family
        retries = CounterMetricFamily(
            "ztgate_node_retries", "Node attempts after a request's first (failover)"
        )
        retries.add_metric([], self.router.retries)
        yield retries


def probe_entry(state: NodeState, router: Router) -> ModelEntry | None:
    """The model a node's health probe asks for: a fixed-shape one when the node has one
    (a unary inference is the cheapest probe), else a generative one."""
    served = [e for e in router.probe_models.values() if state.config.serves(e.name)]
    return min(served, key=lambda e: e.generative is not None, default=None)


async def probe_stream(client: NodeClient, entry: ModelEntry, timeout_s: float) -> None:
    """Probe a generative model by a one-token stream: a decoupled model refuses unary
    inference, and a stream exercises what requests to it use (raises NodeError)."""
    spec = entry.generative
    assert spec is not None
    request = GenerateRequest((spec.end_tokens[0],), 1, 0.0, 1.0, 0)
    stream = await client.generate(entry.name, entry.version, request, timeout_s=timeout_s)
    try:
        if await stream.next(timeout_s, spec.vocab) is None:
            raise NodeError(client.node.name, "probe stream ended without a token")
    finally:
        stream.cancel()


def probe_request(
    state: NodeState, router: Router
) -> tuple[str, str, tuple[Tensor, ...], tuple[str, ...]]:
    """A zero-filled inference of a model the node serves, batch 1."""
    entry = probe_entry(state, router)
    if entry is None:
        raise NodeError(state.config.name, "no registered model to probe")
    inputs = tuple(
        Tensor(
            spec.name,
            spec.datatype,
            shape := tuple(1 if d < 0 else d for d in spec.shape),
            np.zeros(shape, dtype=DATATYPES[spec.datatype].dtype),
        )
        for spec in entry.inputs
    )
    return entry.name, entry.version, inputs, tuple(o.name for o in entry.outputs)


def check_reply(
    entry: ModelEntry,
    inputs: tuple[Tensor, ...],
    outputs: list[Tensor],
    requested: tuple[str, ...],
    max_bytes: int,
) -> bool:
    """Hold a node's reply to the model's signature; True if it holds NaN or Inf.

    A mismatch raises NodeError: the reply is never passed on and the node is charged.
    """
    node = "reply"
    want = requested or tuple(o.name for o in entry.outputs)
    got = {t.name: t for t in outputs}
    if sorted(got) != sorted(want) or len(got) != len(outputs):
        raise NodeError(node, f"outputs {sorted(got)} != expected {sorted(want)}")
    specs = {s.name: s for s in entry.outputs}
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    total = 0
    nonfinite = False
    for name in want:
        t, spec = got[name], specs[name]
        if t.datatype != spec.datatype:
            raise NodeError(node, f"output {name} is {t.datatype}, model says {spec.datatype}")
        if len(t.shape) != len(spec.shape) or any(
            s >= 0 and d != s for d, s in zip(t.shape, spec.shape, strict=True)
        ):
            raise NodeError(node, f"output {name} shape {t.shape} does not fit {spec.shape}")
        in_spec = entry.inputs[0].shape if entry.inputs else ()
        if spec.shape and spec.shape[0] < 0 and in_spec and in_spec[0] < 0 and batch is not None:
            if t.shape[0] != batch:
                raise NodeError(node, f"output {name} batch {t.shape[0]} != input batch {batch}")
        total += t.data.nbytes
        if total > max_bytes:
            raise NodeError(node, f"reply larger than {max_bytes} bytes")
        if t.data.dtype.kind == "f" and not all_finite(t.data):
            nonfinite = True
    return nonfinite
