"""Lint: values a policy compares with that nothing the gateway knows ever carries.

Cedar strings have no enums, so `context.mode == "redundnat"` or
`principal in Ztgate::Group::"priceing"` are valid Cedar that can never match: the rule
is dead, and a forbid that is dead protects nothing. `lint` finds, for each rule, the
group names, model ids, modes, classifications, payload classes and regions it names
that no fact or identity carries, and says which known value is spelt most like it.

Known values: groups from identities.json; modes, classifications and payload classes
from what the gateway computes (gateway/policy/facts.py); models and regions from the
facts given (a bundle's, or a registry and node inventory) and from the example
requests under tests/. Without any model or region facts those two are not linted.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.policy import facts as F
from gateway.policy.semantic import _literal, _path
from gateway.policy.source import Finding, PolicyInfo, PolicySource


@dataclass
class Known:
    """What the gateway can carry: anything else a rule names is a finding."""

    groups: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    regions: set[str] = field(default_factory=set)


def known_from_examples(source: PolicySource) -> Known:
    """Models and regions named by the example requests under tests/ALLOW and tests/DENY."""
    known = Known(groups=set(source.identities.groups()))
    root = source.directory / "tests"
    for path in sorted(root.glob("*/*.json")) if root.is_dir() else ():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(raw, dict):
            continue
        model = raw.get("model")
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            known.models.add(model["name"])
        res = raw.get("resource")
        if isinstance(res, dict) and isinstance(res.get("model"), str):
            known.models.add(res["model"])
        for node in raw.get("nodes") or ():
            if isinstance(node, dict) and isinstance(node.get("region"), str):
                known.regions.add(node["region"])
    return known


# The attribute paths whose values are a closed, known set, and what that set is called.
_KINDS = {
    "context.mode": "mode",
    "resource.classification": "classification",
    "context.payload_class": "payload class",
    "resource.id": "model",
    "resource.model": "model",
    "context.node.region": "region",
}


def _named(node: Any) -> Iterator[tuple[str, Any]]:
    """(path, literal) for every literal a condition compares a known path with."""
    if isinstance(node, list):
        for item in node:
            yield from _named(item)
        return
    if not isinstance(node, dict):
        return
    for op, arg in node.items():
        if isinstance(arg, dict) and op in ("==", "!="):
            for a, b in ((arg.get("left"), arg.get("right")), (arg.get("right"), arg.get("left"))):
                p, lit = _path(a), _literal(b)
                if p is not None and lit is not None:
                    yield p, lit
        if isinstance(arg, dict) and op == "contains":
            p, items = _path(arg.get("right")), _literal(arg.get("left"))
            if p is not None and isinstance(items, list):
                for i in items:
                    yield p, i
            p, lit = _path(arg.get("left")), _literal(arg.get("right"))
            if p == "resource.allowed_modes":
                yield "context.mode", lit
            if p == "resource.residency":
                yield "residency", lit
        if isinstance(arg, dict) and op in ("containsAny", "containsAll"):
            for side, other in (("left", "right"), ("right", "left")):
                p, items = _path(arg.get(other)), _literal(arg.get(side))
                if isinstance(items, list) and p == "resource.allowed_modes":
                    yield from (("context.mode", i) for i in items)
                if isinstance(items, list) and p == "resource.residency":
                    yield from (("residency", i) for i in items)
        if isinstance(arg, dict) and op == "in":
            p, lit = _path(arg.get("left")), _literal(arg.get("right"))
            for e in lit if isinstance(lit, list) else [lit]:
                if isinstance(e, dict) and "__entity" in e:
                    yield from _entity(p, e["__entity"])
        yield from _named(arg)


def _entity(path: str | None, e: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    kind = str(e.get("type", "")).rsplit("::", 1)[-1]
    if kind == "Group":
        yield "group", e.get("id")
    elif kind == "Model":
        yield "resource.id", e.get("id")


def _scopes(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for var in ("principal", "resource"):
        scope = body.get(var, {})
        for e in [scope.get("entity"), (scope.get("in") or {}).get("entity")]:
            if isinstance(e, dict):
                yield from _entity(var, e)


def lint(source: PolicySource, known: Known) -> list[Finding]:
    """Every value a rule names that `known` (and the gateway's fixed sets) never carries."""
    from cedarpy import policies_to_json_str

    closed: dict[str, tuple[str, set[str]]] = {
        "group": ("group", known.groups),
        "context.mode": ("mode", set(F.MODES)),
        "resource.classification": ("classification", set(F.CLASSIFICATIONS)),
        "context.payload_class": ("payload class", {"small", "medium", "large"}),
    }
    if known.models:
        closed["resource.id"] = ("model", known.models)
        closed["resource.model"] = ("model", known.models)
    if known.regions:
        closed["context.node.region"] = ("region", known.regions)
    out: list[Finding] = []
    for info in source.policies:
        body = next(iter(json.loads(policies_to_json_str(info.text))["staticPolicies"].values()))
        pairs = [*_scopes(body)]
        for cond in body.get("conditions", ()):
            pairs += list(_named(cond.get("body")))
        seen: set[tuple[str, str]] = set()
        for path, value in pairs:
            if not isinstance(value, str):
                continue
            if path == "residency":
                finding = _residency(info, value, known)
            elif path in closed:
                kind, values = closed[path]
                if value in values or (kind, value) in seen:
                    continue
                seen.add((kind, value))
                finding = _finding(info, kind, value, values)
            else:
                continue
            if finding is not None:
                out.append(finding)
    return out


def _residency(info: PolicyInfo, value: str, known: Known) -> Finding | None:
    if not known.regions or value == "*":
        return None
    if value.endswith("-"):
        if any(r.startswith(value) for r in known.regions):
            return None
    elif value in known.regions:
        return None
    return _finding(info, "region", value, known.regions)


def _finding(info: PolicyInfo, kind: str, value: str, values: Iterable[str]) -> Finding:
    line, col = _position(info, value)
    names = sorted(values)
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    listed = ", ".join(names) if len(names) <= 8 else ", ".join(names[:8]) + ", ..."
    msg = (
        f'{kind} "{value}" is one no fact or identity carries, so this never matches'
        f"{hint} (known: {listed or 'none'})"
    )
    return Finding(info.file, line, col, info.id, msg)


def _position(info: PolicyInfo, value: str) -> tuple[int, int | None]:
    needle = f'"{value}"'
    for k, text in enumerate(info.text.split("\n")):
        at = text.find(needle)
        if at >= 0:
            return info.line + k, at + 1
    return info.line, None
