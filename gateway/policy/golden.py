"""Golden requests: example requests a security officer writes, with the expected answer.

A request file (JSON) describes one request; `policies/tests/ALLOW/*.json` must be
allowed and `policies/tests/DENY/*.json` denied. They run through the real engine (the
same batched, cached path the gateway uses), not through Cedar alone. Format::

    {
      "description": "what this shows",
      "principal": {"spiffe_id": "spiffe://ztgate.local/client/demo",
                    "organization": "Acme", "unit": "Risk"},           (O/OU optional)
      "action": "infer",
      "model": {"name": "iris", "classification": "public", "owner": "",
                "residency": ["eu-"], "allowed_modes": ["none", "redundant"]},
      "nodes": [{"name": "n1", "region": "eu-west", "provider": "prov-a", "trust": 1}],
      "context": {"mode": "none", "node": "n1", "batch_size": 1,
                  "payload_bytes": 1024, "purpose": "", "hour": 12},
                  (generative models add prompt_tokens, max_tokens, temperature_milli
                  and top_p_milli)
      "expect": ["apps-call-public-internal"]        (optional: policies that must decide)
    }

For the other actions, `resource` replaces model/nodes/context:
``{"type": "Receipt", "id": "r1", "owner": "spiffe://...", "model": "iris"}``; `view`
(seeing that a model exists) takes `model` alone, without nodes or context;
`forward_for` takes `model` and ``"context": {"site": "site-b"}``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.policy import facts as F
from gateway.policy.engine import AuthzDecision, InferDecision, PolicyEngine
from gateway.policy.source import PolicySource

DEFAULT_NODES = (
    {"name": "n1", "region": "eu-west", "provider": "prov-a", "trust": 1},
    {"name": "n2", "region": "eu-central", "provider": "prov-b", "trust": 1},
)
EXPECTATIONS = ("ALLOW", "DENY")


class RequestFormatError(ValueError):
    """A request file that does not follow the format above; the message says how."""


@dataclass(frozen=True)
class Request:
    identity: F.IdentityFacts
    action: str
    expect: tuple[str, ...] = ()
    description: str = ""
    # infer
    model: F.ModelFacts | None = None
    nodes: tuple[F.NodeFacts, ...] = ()
    mode: str = "none"
    node: str = ""
    context: F.InferContext | None = None
    # other actions
    resource: F.ResourceFacts | None = None
    site: str = ""  # forward_for: the forwarding site


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    determining: tuple[str, ...]  # for infer: of the (mode, node) the request names
    errors: tuple[str, ...]
    reason: str
    decision: InferDecision | AuthzDecision


@dataclass(frozen=True)
class Case:
    file: str
    expected: str  # "ALLOW" or "DENY"
    outcome: Outcome | None
    problem: str = ""  # why it failed, "" when it passed

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class Report:
    cases: tuple[Case, ...]
    coverage: Mapping[str, tuple[str, ...]]  # policy id -> request files it decided
    uncovered: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases) and not self.uncovered


# --------------------------------------------------------------------------- parsing


def parse_request(raw: Any) -> Request:
    if not isinstance(raw, dict):
        raise RequestFormatError("a request file holds one JSON object")
    p = _obj(raw, "principal")
    spiffe_id = _str(p, "spiffe_id", required=True)
    identity = F.IdentityFacts(
        spiffe_id=spiffe_id,
        name=_str(p, "name") or spiffe_id.rsplit("/", 1)[-1],
        organization=_str(p, "organization"),
        unit=_str(p, "unit"),
        issuer=_str(p, "issuer"),
        serial=_str(p, "serial"),
    )
    action = _str(raw, "action", required=True)
    expect = raw.get("expect", [])
    if not isinstance(expect, list) or not all(isinstance(e, str) for e in expect):
        raise RequestFormatError('"expect" must be a list of policy ids')
    common: dict[str, Any] = {
        "identity": identity,
        "action": action,
        "expect": tuple(expect),
        "description": _str(raw, "description"),
    }
    if F.RESOURCE_ACTIONS.get(action) == "Model":
        seen = _model(_obj(raw, "model"))
        return Request(model=seen, resource=F.ResourceFacts("Model", seen.name), **common)
    if action == F.FORWARD_FOR:
        site = _str(_obj(raw, "context"), "site", required=True)
        return Request(model=_model(_obj(raw, "model")), site=site, **common)
    if action in F.RESOURCE_ACTIONS:
        r = _obj(raw, "resource")
        resource = F.ResourceFacts(
            type=_str(r, "type", required=True),
            id=_str(r, "id") or F.GATEWAY_ID,
            owner=_str(r, "owner"),
            model=_str(r, "model"),
        )
        if resource.type != F.RESOURCE_ACTIONS[action]:
            raise RequestFormatError(f"{action} needs a {F.RESOURCE_ACTIONS[action]} resource")
        return Request(resource=resource, **common)
    if action != F.INFER:
        raise RequestFormatError(f"unknown action {action!r}; one of {', '.join(F.ACTIONS)}")
    model = _model(_obj(raw, "model"))
    raw_nodes = raw.get("nodes", list(DEFAULT_NODES))
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise RequestFormatError('"nodes" must be a non-empty list')
    nodes = tuple(_node(n) for n in raw_nodes)
    c = _obj(raw, "context")
    mode = _str(c, "mode") or "none"
    if mode not in F.MODES:
        raise RequestFormatError(f"context.mode {mode!r} is not one of {', '.join(F.MODES)}")
    node = _str(c, "node") or nodes[0].name
    if node not in {n.name for n in nodes}:
        raise RequestFormatError(f"context.node {node!r} is not in nodes")
    hour = _int(c, "hour", 12)
    if not 0 <= hour <= 23:
        raise RequestFormatError("context.hour must be 0-23")
    try:
        ctx = F.InferContext(
            batch_size=_int(c, "batch_size", 1),
            payload_bytes=_int(c, "payload_bytes", 1024),
            purpose=_str(c, "purpose"),
            now=dt.datetime(2025, 1, 1, hour, tzinfo=dt.UTC),
            # Generative requests (0: a tensor request): counts and sampling, never text.
            prompt_tokens=_int(c, "prompt_tokens", 0),
            max_tokens=_int(c, "max_tokens", 0),
            temperature_milli=_int(c, "temperature_milli", 0),
            top_p_milli=_int(c, "top_p_milli", 0),
        )
    except ValueError as exc:  # a number past Cedar's 64-bit Long
        raise RequestFormatError(f"context: {exc}") from exc
    return Request(model=model, nodes=nodes, mode=mode, node=node, context=ctx, **common)


def _model(m: Mapping[str, Any]) -> F.ModelFacts:
    model = F.ModelFacts(
        name=_str(m, "name", required=True),
        classification=_str(m, "classification", required=True),
        owner=_str(m, "owner"),
        residency=_strs(m, "residency", ["*"]),
        allowed_modes=_strs(m, "allowed_modes", list(F.MODES)),
    )
    try:
        F.check_model(model)
    except ValueError as exc:
        raise RequestFormatError(str(exc)) from None
    return model


def load_request(path: Path) -> Request:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RequestFormatError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestFormatError(f"{path} is not JSON: {exc}") from None
    try:
        return parse_request(raw)
    except RequestFormatError as exc:
        raise RequestFormatError(f"{path}: {exc}") from None


def _obj(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise RequestFormatError(f'"{key}" must be an object')
    return value


def _str(raw: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise RequestFormatError(f'"{key}" must be {"a non-empty" if required else "a"} string')
    return value


def _int(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestFormatError(f'"{key}" must be a whole number >= 0')
    return value


def _strs(raw: Mapping[str, Any], key: str, default: list[str]) -> tuple[str, ...]:
    value = raw.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestFormatError(f'"{key}" must be a list of strings')
    return tuple(value)


def _node(raw: Any) -> F.NodeFacts:
    if not isinstance(raw, dict):
        raise RequestFormatError("each node is an object with name, region, provider, trust")
    return F.NodeFacts(
        name=_str(raw, "name", required=True),
        region=_str(raw, "region", required=True),
        provider=_str(raw, "provider", required=True),
        trust=_int(raw, "trust", 1),
    )


# --------------------------------------------------------------------------- running


def engine_for(source: PolicySource, request: Request) -> PolicyEngine:
    models = {request.model.name: request.model} if request.model else {}
    return PolicyEngine(source, models=models, nodes=request.nodes)


def run_request(source: PolicySource, request: Request) -> Outcome:
    """Decide one request through the engine the gateway uses."""
    engine = engine_for(source, request)
    if request.action == F.FORWARD_FOR and request.model is not None:
        d = engine.decide_forward_for(request.identity, request.site, request.model.name)
        return Outcome(d.allowed, d.determining, d.errors, d.reason, d)
    if request.resource is not None:
        d = engine.authorize(request.identity, request.action, request.resource)
        return Outcome(d.allowed, d.determining, d.errors, d.reason, d)
    assert request.model is not None and request.context is not None
    decision = engine.decide_infer(
        request.identity, request.model.name, request.context, [n.name for n in request.nodes]
    )
    pair = decision.pairs[(request.mode, request.node)]
    allowed = decision.node_allowed(request.mode, request.node)
    if allowed:
        reason = f"allowed by {', '.join(pair.determining)}"
    elif pair.allowed:  # Cedar allowed it; the registry does not offer the mode
        reason = f"denied: model does not offer mode {request.mode!r}"
    elif pair.errors:
        reason = f"denied: evaluation error, which denies (fail closed): {pair.errors[0]}"
    elif pair.determining:
        reason = f"denied by {', '.join(pair.determining)}"
    else:
        reason = "denied: no policy permits this (deny by default)"
    return Outcome(allowed, pair.determining, pair.errors, reason, decision)


def run_goldens(source: PolicySource, tests_dir: Path | None = None) -> Report:
    """Run ALLOW/ and DENY/ under `tests_dir` (default: <policy dir>/tests)."""
    root = tests_dir or source.directory / "tests"
    cases: list[Case] = []
    coverage: dict[str, list[str]] = {p.id: [] for p in source.policies}
    for expected in EXPECTATIONS:
        for path in sorted((root / expected).glob("*.json")):
            name = f"{expected}/{path.name}"
            try:
                request = load_request(path)
            except RequestFormatError as exc:
                cases.append(Case(name, expected, None, f"malformed: {exc}"))
                continue
            outcome = run_request(source, request)
            for pid in outcome.determining:
                coverage.setdefault(pid, []).append(name)
            problem = ""
            if outcome.allowed != (expected == "ALLOW"):
                got = "allowed" if outcome.allowed else "denied"
                problem = f"expected {expected}, got {got}: {outcome.reason}"
            missing = [e for e in request.expect if e not in outcome.determining]
            if missing and not problem:
                problem = f"expected {', '.join(missing)} to decide; {outcome.reason}"
            cases.append(Case(name, expected, outcome, problem))
    uncovered = tuple(pid for pid, files in coverage.items() if not files)
    return Report(tuple(cases), {k: tuple(v) for k, v in coverage.items()}, uncovered)
