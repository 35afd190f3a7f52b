"""Lie accounting, apart from transport health: evidence, the test, quarantine.

docs/reputation.md states the design and derives its bounds; this module is that design.
Evidence (confirmed, contradicted, outvoted, disputed; a lazy prover's missed or delivered
proofs) goes to a record per node, keyed by its signed identity, and per signed provider,
in the shared store; each record carries a one-sided CUSUM of the SPRT log-likelihood
ratio of "contradicted with rate p1" against "with rate p0" (and of "misses proofs at q1"
against "at q0"). When a node's (or its provider's) statistic reaches ln(1/alpha) the node
(or every node of the provider) is quarantined: no traffic at all until an officer
releases it. Quarantine events are kept in this replica's own grow-only file as well as
the store, so a store that loses them gets them back (deleting the key readmits nothing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import NodeConfig
from gateway.state import StateStore, StoreUnavailable

log = logging.getLogger(__name__)

# Evidence about a node's answers (each one judged reply, counted in `checked`) ...
JUDGED = ("confirmed", "contradicted", "outvoted", "disputed")
# ... and about a node as a lazy prover (zk/lazy.py): whether a proof it was given arrived
# by its deadline. Not a judged answer: a missed proof says nothing about a lie.
PROVER = ("missed", "delivered")
EVENTS = (*JUDGED, *PROVER)
COUNTS = ("checked", *EVENTS)


@dataclass(frozen=True)
class Sprt:
    """Wald's SPRT step, run as Page's CUSUM (docs/reputation.md, "The test")."""

    p0: float = 1e-3  # honest-disagreement rate assumed from the tolerance
    p1: float = 0.05  # the lie rate the test is tuned for
    alpha: float = 1e-9  # false-positive bound per start point
    # A prover's missed proofs, its own Bernoulli in the same statistic: an honest but
    # loaded prover misses at most q0 of its deadlines, one that withholds proofs q1.
    q0: float = 0.05
    q1: float = 0.4

    @property
    def up(self) -> float:
        return math.log(self.p1 / self.p0)

    @property
    def down(self) -> float:
        return math.log((1 - self.p1) / (1 - self.p0))

    @property
    def threshold(self) -> float:
        return math.log(1 / self.alpha)

    def step(self, event: str) -> float:
        if event in ("contradicted", "outvoted"):
            return self.up
        if event == "confirmed":
            return self.down
        # Each step is its observation's log-likelihood ratio, so the statistic stays a
        # supermartingale for a node honest in both roles and the N * alpha bound holds.
        if event == "missed":
            return math.log(self.q1 / self.q0)  # ln 8 = +2.079: 10 in a row to quarantine
        if event == "delivered":
            return math.log((1 - self.q1) / (1 - self.q0))  # -0.460
        return 0.0  # disputed: the two-party rule charges nobody


@dataclass(frozen=True)
class Sampling:
    """Spot-check rates by reputation ([reputation] in gateway.toml); never zero."""

    suspect: float = 0.25
    established: float = 0.05
    trusted: float = 0.02
    trusted_after: int = 50
    long_trusted_after: int = 1000

    def __post_init__(self) -> None:
        for r in (self.suspect, self.established, self.trusted):
            if not 0 < r <= 1:
                raise ValueError("spot-check rates must be in (0, 1]: never zero")


@dataclass(frozen=True)
class Record:
    counts: Mapping[str, int] = field(default_factory=dict)
    statistic: float = 0.0

    def get(self, name: str) -> int:
        return int(self.counts.get(name, 0))

    @property
    def contradicted(self) -> int:
        return self.get("contradicted")

    @property
    def confirmed(self) -> int:
        return self.get("confirmed")

    def to_dict(self) -> dict[str, Any]:
        return {**{k: self.get(k) for k in COUNTS}, "statistic": round(self.statistic, 4)}


@dataclass(frozen=True)
class QuarantineEvent:
    """One quarantine or release: a line of the local file, a log record, a store value."""

    subject: str  # "node:<signed identity>" or "provider:<signed provider>"
    name: str  # the node's name (or the provider) when it happened
    state: str  # "quarantined" | "released"
    at: float
    reason: str
    by: str = "gateway"
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> QuarantineEvent:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("state") not in ("quarantined", "released"):
            raise ValueError("not a quarantine event")
        return cls(
            str(d["subject"]),
            str(d["name"]),
            str(d["state"]),
            float(d["at"]),
            str(d.get("reason", "")),
            str(d.get("by", "gateway")),
            dict(d.get("evidence") or {}),
        )


def node_subject(node: NodeConfig) -> str:
    """A node's record follows its signed identity, not its (config) name."""
    return f"node:{node.spiffe_id or node.dns_name or node.name}"


def provider_subject(provider: str) -> str:
    return f"provider:{provider}"


OnEvent = Callable[[QuarantineEvent], Awaitable[None]]


class Reputation:
    """Evidence per node and provider in the shared store, and quarantine on top of it."""

    def __init__(
        self,
        store: StateStore,
        nodes: Iterable[NodeConfig] = (),
        *,
        test: Sprt | None = None,
        sampling: Sampling | None = None,
        path: Path | None = None,
        on_event: OnEvent | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.test = test or Sprt()
        self.sampling = sampling or Sampling()
        self.path = path
        self.on_event = on_event
        self.clock = clock
        self.nodes: dict[str, NodeConfig] = {n.name: n for n in nodes}
        self.records: dict[str, Record] = {}  # subject -> last record seen (a cache)
        self.events: dict[str, QuarantineEvent] = {}  # subject -> latest event
        self.quarantines = 0  # this replica's counts, for the metrics
        self.releases = 0
        self._load_file()

    # --- what routing asks ----------------------------------------------------------------
    def quarantined(self, node: NodeConfig) -> bool:
        if not self.events:  # the usual case, asked for every candidate of every request
            return False
        return self._is_out(node_subject(node)) or self._is_out(provider_subject(node.provider))

    def sampled_as(self, node: NodeConfig) -> str:
        """suspect, established or trusted: which spot-check rate a reply of `node` gets,
        the configured one or a policy's @spot_check floor (docs/reputation.md)."""
        s = self.sampling
        rec = self.records.get(node_subject(node), Record())
        prov = self.records.get(provider_subject(node.provider), Record())
        if rec.contradicted or prov.contradicted or rec.confirmed < s.trusted_after:
            return "suspect"
        if rec.confirmed < s.long_trusted_after:
            return "established"
        return "trusted"

    def rate(self, node: NodeConfig) -> float:
        """The configured spot-check rate for a reply of `node` (docs/reputation.md)."""
        return float(getattr(self.sampling, self.sampled_as(node)))

    def standing(self, node: NodeConfig) -> str:
        return "quarantined" if self.quarantined(node) else self.sampled_as(node)

    # --- evidence -------------------------------------------------------------------------
    async def observe(self, node: NodeConfig, event: str) -> bool:
        """Count one piece of evidence about `node`; True if it quarantined something."""
        if event not in EVENTS:
            raise ValueError(f"unknown evidence {event!r}")
        counts = {"checked": 1, event: 1} if event in JUDGED else {event: 1}
        if event == "outvoted":
            counts["contradicted"] = 1
        step = self.test.step(event)
        subjects = (
            (node_subject(node), node.name),
            (provider_subject(node.provider), node.provider),
        )
        # The node's and the provider's records are independent: one round trip for both.
        got = await asyncio.gather(
            *(self.store.add_evidence(subject, counts, step) for subject, _ in subjects),
            return_exceptions=True,
        )
        hit = False
        for (subject, name), result in zip(subjects, got, strict=True):
            if isinstance(result, StoreUnavailable):
                log.warning("evidence about %s not recorded, store unavailable: %s", name, result)
                continue
            if isinstance(result, BaseException):
                raise result
            have, stat = result
            rec = Record(have, stat)
            self.records[subject] = rec
            if stat >= self.test.threshold and not self._is_out(subject):
                await self._quarantine(subject, name, rec)
                hit = True
        return hit

    async def refresh_records(self) -> None:
        subjects = [node_subject(n) for n in self.nodes.values()]
        subjects += [provider_subject(p) for p in {n.provider for n in self.nodes.values()}]
        got = await self.store.evidence(subjects)
        for subject, (counts, stat) in got.items():
            self.records[subject] = Record(counts, stat)

    # --- quarantine -----------------------------------------------------------------------
    def _is_out(self, subject: str) -> bool:
        ev = self.events.get(subject)
        return ev is not None and ev.state == "quarantined"

    async def _quarantine(self, subject: str, name: str, rec: Record) -> None:
        what = "node" if subject.startswith("node:") else "provider"
        why = (
            f"evidence implausible for an honest {what}: "
            f"CUSUM {rec.statistic:.2f} >= {self.test.threshold:.2f} "
            f"({rec.contradicted} contradicted of {rec.get('checked')} checked)"
        )
        ev = QuarantineEvent(
            subject, name, "quarantined", self.clock(), why, "gateway", rec.to_dict()
        )
        log.warning("quarantined %s: %s", name, why)
        self.quarantines += 1
        await self._apply(ev)

    async def release(self, name: str, by: str) -> QuarantineEvent:
        """An officer's release of a node (by name) or a provider (`provider:NAME`)."""
        if name.startswith("provider:"):
            subject = name
        else:
            node = self.nodes.get(name)
            if node is None:
                raise KeyError(name)
            subject = node_subject(node)
        if not self._is_out(subject):
            raise LookupError(f"{name} is not quarantined")
        rec = self.records.get(subject, Record())
        ev = QuarantineEvent(
            subject, name, "released", self.clock(), "released by an officer", by, rec.to_dict()
        )
        await self.store.reset_statistic(subject)
        self.records[subject] = Record(rec.counts, 0.0)
        self.releases += 1
        log.warning("released %s from quarantine (by %s)", name, by)
        await self._apply(ev)
        return ev

    async def _apply(self, ev: QuarantineEvent) -> None:
        self.events[ev.subject] = ev
        self._append_file(ev)
        try:
            await self.store.put_quarantine(ev.subject, ev.to_json())
        except StoreUnavailable as exc:  # the local file holds it; the next sync publishes it
            log.warning("quarantine event for %s not in the store yet: %s", ev.name, exc)
        if self.on_event is not None:
            await self.on_event(ev)

    async def sync(self) -> None:
        """Merge the store's events with this replica's (the latest per subject wins) and
        give the store back any it lost or holds older."""
        stored = await self.store.quarantine_records()
        for subject, text in stored.items():
            try:
                ev = QuarantineEvent.from_json(text)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed quarantine record for %s", subject)
                continue
            mine = self.events.get(subject)
            if mine is None or ev.at > mine.at:
                self.events[subject] = ev
                self._append_file(ev)
        for subject, ev in self.events.items():
            if stored.get(subject) != ev.to_json():
                theirs = stored.get(subject)
                if theirs is None or QuarantineEvent.from_json(theirs).at < ev.at:
                    await self.store.put_quarantine(subject, ev.to_json())
        await self.refresh_records()

    # --- the local file -------------------------------------------------------------------
    def _load_file(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        for line in self.path.read_text().splitlines():
            try:
                ev = QuarantineEvent.from_json(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
            mine = self.events.get(ev.subject)
            if mine is None or ev.at >= mine.at:
                self.events[ev.subject] = ev

    def _append_file(self, ev: QuarantineEvent) -> None:
        if self.path is None:
            return
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, ev.to_json().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- what `ztgate nodes` shows --------------------------------------------------------
    def describe(self, node: NodeConfig) -> dict[str, Any]:
        rec = self.records.get(node_subject(node), Record())
        prov = self.records.get(provider_subject(node.provider), Record())
        ev = self.events.get(node_subject(node)) or self.events.get(provider_subject(node.provider))
        return {
            "identity": node_subject(node).removeprefix("node:"),
            "reputation": self.standing(node),
            "spot_check_rate": self.rate(node),
            "evidence": rec.to_dict(),
            "provider_evidence": prov.to_dict(),
            "quarantine": None if ev is None else asdict(ev),
        }
