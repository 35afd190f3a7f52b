"""The facts a decision is made from, and how each becomes a Cedar value.

This is the one place that turns gateway facts into Cedar entities and contexts, so the
engine, the load-time schema probe and the golden tests all build requests the same way.
Every context attribute the schema declares is filled on every request: Cedar skips a
policy whose evaluation errors, so a missing attribute could silently disarm a `forbid`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

NAMESPACE = "Ztgate"
# Cheapest first; the order decisions report modes in (same as gateway.verify.MODES).
MODES: tuple[str, ...] = ("none", "redundant", "zk", "mpc")
# Modes that spread one request over several nodes, where provider independence counts.
MULTI_NODE_MODES: tuple[str, ...] = ("redundant", "mpc")
CLASSIFICATIONS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
INFER = "infer"
# Seeing that a model exists: its metadata, readiness, statistics, repository index entry.
VIEW = "view"
# Non-infer actions and the resource type each applies to (mirrors schema.cedarschema).
RESOURCE_ACTIONS: dict[str, str] = {
    VIEW: "Model",
    "read_receipt": "Receipt",
    "read_proof": "Receipt",
    "read_decision": "Log",
    "admin_reload": "Gateway",
    "admin_revoke": "Gateway",
    "admin_nodes": "Gateway",  # list nodes: health, reputation, evidence, quarantine
    "admin_release_node": "Gateway",  # release a quarantined node (docs/reputation.md)
}
# An edge site acting for a client at its core (gateway/forward/); context: { site }.
FORWARD_FOR = "forward_for"
ACTIONS: tuple[str, ...] = (INFER, *RESOURCE_ACTIONS, FORWARD_FOR)
# Granted only by a permit that names them in its action scope (source.admin_finding,
# PolicyEngine.authorize): a broad permit must never hand out control of the gateway.
ADMIN_ACTIONS: tuple[str, ...] = tuple(a for a, t in RESOURCE_ACTIONS.items() if t == "Gateway")
GATEWAY_ID = "gateway"

SMALL_PAYLOAD = 64 * 1024
MEDIUM_PAYLOAD = 1024 * 1024

_RATE_RE = re.compile(r"([1-9][0-9]{0,8})/(second|minute|hour)")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600}


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` requests per `per_seconds`, per client."""

    count: int
    per_seconds: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'600/minute' -> Rate(600, 60); ValueError with the accepted forms otherwise."""
        m = _RATE_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(
                f"rate {text!r} is not N/second, N/minute or N/hour with N a positive whole number"
            )
        return cls(int(m.group(1)), _UNIT_SECONDS[m.group(2)])

    @property
    def per_second(self) -> float:
        return self.count / self.per_seconds

    def stricter(self, other: Rate | None) -> Rate:
        return self if other is None or self.per_second <= other.per_second else other

    def __str__(self) -> str:
        unit = {1: "second", 60: "minute", 3600: "hour"}.get(self.per_seconds)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per_seconds}s"


_SPOT_RE = re.compile(r"(?:(suspect|established|trusted)\s*=\s*)?([0-9]+(?:\.[0-9]+)?)%")
STANDINGS: tuple[str, ...] = ("suspect", "established", "trusted")


# @proof obligations, strictest first: "lazy" refuses an answer it cannot schedule a proof
# for (queue full, no prover); "lazy-or-eager" proves it before answering, as mode zk;
# "lazy-or-unverified" answers and records it unverified.
PROOF_OBLIGATIONS: tuple[str, ...] = ("lazy", "lazy-or-eager", "lazy-or-unverified")


def stricter_proof(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return min(a, b, key=PROOF_OBLIGATIONS.index)


@dataclass(frozen=True, slots=True)
class SpotCheckRate:
    """A permit's `@spot_check`: the least share of its mode-`none` answers re-run on
    another provider, by the answering node's standing (docs/reputation.md). A floor:
    the gateway's configured rates may raise it, never lower it."""

    suspect: float
    established: float
    trusted: float

    @classmethod
    def parse(cls, text: str) -> SpotCheckRate:
        """'5%' (every standing) or 'suspect=25%, established=5%, trusted=2%'."""
        parts = [p.strip() for p in text.split(",")]
        got: dict[str | None, float] = {}
        for part in parts:
            m = _SPOT_RE.fullmatch(part)
            if m is None or m.group(1) in got:
                got = {}
                break
            got[m.group(1)] = float(m.group(2)) / 100
        if set(got) == {None}:
            got = dict.fromkeys(STANDINGS, got[None])
        if set(got) != set(STANDINGS):
            raise ValueError(
                f"spot check {text!r} is not a percentage ('5%') or one per standing "
                "('suspect=25%, established=5%, trusted=2%')"
            )
        if not all(0 < got[s] <= 1 for s in STANDINGS):
            raise ValueError(f"spot check {text!r}: each rate must be above 0% and at most 100%")
        return cls(got["suspect"], got["established"], got["trusted"])

    def at(self, standing: str) -> float:
        return float(getattr(self, standing)) if standing in STANDINGS else self.suspect

    def stricter(self, other: SpotCheckRate | None) -> SpotCheckRate:
        """The higher rate at each standing: the strictest permit wins."""
        if other is None:
            return self
        return SpotCheckRate(
            max(self.suspect, other.suspect),
            max(self.established, other.established),
            max(self.trusted, other.trusted),
        )

    def __str__(self) -> str:
        return ", ".join(f"{s}={100 * self.at(s):g}%" for s in STANDINGS)


_BUDGET_RE = re.compile(r"([1-9][0-9]{0,11})/(minute|hour|day|week)")
_BUDGET_SECONDS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """At most `count` tokens (prompt and generated) per `per_seconds` window, per client
    identity: a permit's `@tokens_per_minute("N")` or `@token_budget("N/day")`."""

    count: int
    per_seconds: int

    @classmethod
    def parse(cls, text: str) -> TokenBudget:
        """'1000000/day' -> TokenBudget(1000000, 86400); per minute, hour, day or week."""
        m = _BUDGET_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(
                f"token budget {text!r} is not N/minute, N/hour, N/day or N/week "
                "with N a positive whole number"
            )
        return cls(int(m.group(1)), _BUDGET_SECONDS[m.group(2)])

    @classmethod
    def per_minute(cls, text: str) -> TokenBudget:
        """'20000' -> TokenBudget(20000, 60)."""
        return cls.parse(f"{text.strip()}/minute")

    def __str__(self) -> str:
        unit = {v: k for k, v in _BUDGET_SECONDS.items()}.get(self.per_seconds)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per_seconds}s"


def strictest_budgets(budgets: Iterable[TokenBudget]) -> tuple[TokenBudget, ...]:
    """The lowest count for each window length, shortest window first: all of them hold."""
    least: dict[int, int] = {}
    for b in budgets:
        least[b.per_seconds] = min(b.count, least.get(b.per_seconds, b.count))
    return tuple(TokenBudget(c, s) for s, c in sorted(least.items()))


@dataclass(frozen=True, slots=True)
class IdentityFacts:
    """The caller, as its verified certificate says (see gateway.identity.Identity)."""

    spiffe_id: str
    name: str
    organization: str = ""
    unit: str = ""
    issuer: str = ""
    serial: str = ""

    @classmethod
    def from_identity(cls, identity: Any) -> IdentityFacts:
        """From a gateway.identity.Identity (duck-typed to keep this module import-light)."""
        return cls(
            spiffe_id=identity.spiffe_id,
            name=identity.name,
            organization=identity.organization or "",
            unit=identity.unit or "",
            issuer=identity.issuer,
            serial=identity.serial,
        )


@dataclass(frozen=True, slots=True)
class ModelFacts:
    name: str
    classification: str
    owner: str = ""
    residency: tuple[str, ...] = ()
    allowed_modes: tuple[str, ...] = ("none",)


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """A node as the officer signs it. `dns_name` and `spiffe_id` are the node
    certificate's DNS SAN and SPIFFE ID: the gateway pins the node's channel to `dns_name`,
    so these facts (not gateway.toml) decide which certificate may answer as `name`.
    Neither reaches Cedar (node_record): policy decides on region, provider and trust."""

    name: str
    region: str
    provider: str
    trust: int = 1
    dns_name: str = ""
    spiffe_id: str = ""
    # The site the node belongs to ("": the gateway's own). Signed like the region; the
    # router prefers the gateway's own site's nodes (gateway/routing/router.py).
    site: str = ""


@dataclass(frozen=True, slots=True)
class InferContext:
    """Per-request facts; the engine derives the coarse Cedar attributes from them."""

    batch_size: int
    payload_bytes: int
    purpose: str = ""
    now: dt.datetime | None = None  # None: the current time
    # Generative requests only (0 otherwise): token counts and sampling parameters, never
    # the text; sampling parameters in thousandths, since Cedar has no floats.
    prompt_tokens: int = 0
    max_tokens: int = 0
    temperature_milli: int = 0
    top_p_milli: int = 0

    def __post_init__(self) -> None:
        # Cedar is no longer handed the schema per request (engine.py): a bool (an int to
        # Python) would compare unequal to a Long without an error, and a value past 64 bits
        # would go unchecked. Every Long the gateway sends is a plain int in Cedar's range.
        for name in _LONGS:
            v = getattr(self, name)
            if type(v) is not int or not -(2**63) <= v < 2**63:
                raise ValueError(f"InferContext.{name} must be an int in Cedar's Long range")


_LONGS = (
    "batch_size",
    "payload_bytes",
    "prompt_tokens",
    "max_tokens",
    "temperature_milli",
    "top_p_milli",
)


@dataclass(frozen=True, slots=True)
class ResourceFacts:
    """A receipt, decision-log entry, the gateway, or a model (for `view`: its facts are
    the registered ones the engine holds), for the non-infer actions."""

    type: str  # "Receipt", "Log", "Gateway" or "Model"
    id: str = GATEWAY_ID
    owner: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True)
class Grant:
    """What identities.json gives a caller."""

    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    clearance: int = 0


# --------------------------------------------------------------------------- coarse values


def payload_class(payload_bytes: int) -> str:
    """A coarse size, so decisions cache well and no cached allow crosses a size forbid."""
    if payload_bytes <= SMALL_PAYLOAD:
        return "small"
    return "medium" if payload_bytes <= MEDIUM_PAYLOAD else "large"


def utc_hour(now: dt.datetime | None) -> int:
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:  # a naive time is taken as UTC rather than the host's zone
        return now.hour
    return now.astimezone(dt.UTC).hour


def region_prefixes(region: str) -> tuple[str, ...]:
    """What residency entries match `region`: '*', each prefix ending in '-', the region.

    Cedar has no "starts with one of" over a set, and `like` needs literal patterns, so
    the gateway lists the prefixes and policies ask `residency.containsAny(...)`.
    'eu-west-1' -> ('*', 'eu-', 'eu-west-', 'eu-west-1').
    """
    out = ["*"]
    for i, ch in enumerate(region):
        if ch == "-":
            out.append(region[: i + 1])
    out.append(region)
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------- Cedar JSON


def uid(type_: str, id_: str) -> dict[str, str]:
    return {"type": f"{NAMESPACE}::{type_}", "id": id_}


def action_uid(action: str) -> dict[str, str]:
    return uid("Action", action)


def client_entity(identity: IdentityFacts, grant: Grant) -> dict[str, Any]:
    return {
        "uid": uid("Client", identity.spiffe_id),
        "attrs": {
            "spiffe_id": identity.spiffe_id,
            "name": identity.name,
            "organization": identity.organization,
            "unit": identity.unit,
            "roles": sorted(grant.roles),
            "clearance": grant.clearance,
        },
        "parents": [uid("Group", g) for g in sorted(grant.groups)],
    }


def model_entity(model: ModelFacts) -> dict[str, Any]:
    return {
        "uid": uid("Model", model.name),
        "attrs": {
            "classification": model.classification,
            "owner": model.owner,
            "residency": sorted(model.residency),
            "allowed_modes": sorted(model.allowed_modes),
        },
        "parents": [],
    }


def group_entity(name: str) -> dict[str, Any]:
    return {"uid": uid("Group", name), "attrs": {}, "parents": []}


def resource_entity(resource: ResourceFacts) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if resource.type == "Receipt":
        attrs = {"owner": resource.owner, "model": resource.model}
    elif resource.type == "Log":
        attrs = {"owner": resource.owner}
    return {"uid": uid(resource.type, resource.id), "attrs": attrs, "parents": []}


def node_record(node: NodeFacts) -> dict[str, Any]:
    return {
        "name": node.name,
        "region": node.region,
        "region_prefixes": list(region_prefixes(node.region)),
        "provider": node.provider,
        "trust": node.trust,
    }


def infer_context(
    mode: str,
    node: NodeFacts,
    batch_size: int,
    payload_cls: str,
    hour: int,
    purpose: str,
    distinct_providers: int,
    tokens: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> dict[str, Any]:
    """Every attribute the schema declares for `infer`, always all of them. `tokens`:
    prompt_tokens, max_tokens, temperature_milli, top_p_milli (all 0 for tensors)."""
    return {
        "mode": mode,
        "node": node_record(node),
        "batch_size": batch_size,
        "payload_class": payload_cls,
        "hour": hour,
        "purpose": purpose,
        "distinct_providers": distinct_providers,
        "prompt_tokens": tokens[0],
        "max_tokens": tokens[1],
        "temperature_milli": tokens[2],
        "top_p_milli": tokens[3],
    }


def check_model(model: ModelFacts) -> None:
    """Cedar strings have no enums: hold the registry values to the known set here."""
    if model.classification not in CLASSIFICATIONS:
        raise ValueError(f"model {model.name!r}: unknown classification {model.classification!r}")
    unknown = set(model.allowed_modes) - set(MODES)
    if unknown:
        raise ValueError(f"model {model.name!r}: unknown modes {sorted(unknown)}")
