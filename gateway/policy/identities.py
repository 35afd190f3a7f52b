"""identities.json: which groups, roles and clearance each caller has.

    {
      "clients": {"<SPIFFE ID>": {"groups": [...], "roles": [...], "clearance": 0-3}},
      "organizations": [{"organization": "Acme", "unit": "Risk", "groups": [...], ...}]
    }

Matching rule: a caller gets the entry for its exact SPIFFE ID, plus every
`organizations` rule whose `organization` equals its certificate's O and whose `unit`
(when the rule names one) equals its OU. Groups and roles are the union, clearance the
highest. A caller nothing matches has no groups, no roles and clearance 0, so under
deny-by-default it may do nothing. Certificate subjects come from our own client CA, so
O and OU are as trustworthy as the SPIFFE ID.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import jsonstrict
from gateway.policy.facts import Grant, IdentityFacts

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_GRANT_KEYS = {"groups", "roles", "clearance"}


@dataclass(frozen=True)
class OrgRule:
    organization: str
    unit: str | None
    grant: Grant


@dataclass(frozen=True)
class IdentityMap:
    clients: Mapping[str, Grant]
    rules: tuple[OrgRule, ...]

    def resolve(self, identity: IdentityFacts) -> Grant:
        grants = [g for g in (self.clients.get(identity.spiffe_id),) if g is not None]
        grants += [
            r.grant
            for r in self.rules
            if r.organization == identity.organization and r.unit in (None, identity.unit)
        ]
        return Grant(
            groups=tuple(sorted({x for g in grants for x in g.groups})),
            roles=tuple(sorted({x for g in grants for x in g.roles})),
            clearance=max((g.clearance for g in grants), default=0),
        )

    def groups(self) -> tuple[str, ...]:
        every = [*self.clients.values(), *(r.grant for r in self.rules)]
        return tuple(sorted({x for g in every for x in g.groups}))

    def canonical(self) -> Any:
        """A JSON-able form independent of key order and whitespace, for the policy hash."""

        def grant(g: Grant) -> dict[str, Any]:
            return {"groups": list(g.groups), "roles": list(g.roles), "clearance": g.clearance}

        return {
            "clients": {k: grant(v) for k, v in sorted(self.clients.items())},
            "organizations": [
                {"organization": r.organization, "unit": r.unit, **grant(r.grant)}
                for r in self.rules
            ],
        }


EMPTY = IdentityMap(clients={}, rules=())


def parse_identities(text: str, report: Callable[[int, str], None]) -> IdentityMap:
    """Parse identities.json, calling `report(line, message)` for each problem found."""

    def line_of(needle: str, last: bool = False) -> int:
        idx = text.rfind(needle) if last else text.find(needle)
        return text.count("\n", 0, idx) + 1 if idx >= 0 else 1

    try:
        raw = jsonstrict.loads(text, want_object=False)
    except jsonstrict.StrictJSONError as exc:
        if exc.key is not None:  # two entries for one client would be ambiguous
            report(line_of(f'"{exc.key}"', last=True), f'"{exc.key}" appears twice')
        elif exc.lineno is not None:
            report(
                exc.lineno, f"not valid JSON: {exc.reason.split(': line')[0]} (column {exc.colno})"
            )
        else:
            report(1, f"not valid JSON: {exc.reason}")
        return EMPTY
    if not isinstance(raw, dict) or set(raw) - {"clients", "organizations"}:
        report(1, 'the file must be an object with only "clients" and "organizations"')
        return EMPTY
    clients: dict[str, Grant] = {}
    raw_clients = raw.get("clients") or {}
    if not isinstance(raw_clients, dict):
        report(line_of('"clients"'), '"clients" must map SPIFFE IDs to groups/roles/clearance')
        raw_clients = {}
    for spiffe_id, body in raw_clients.items():
        where = line_of(f'"{spiffe_id}"')
        if not spiffe_id.startswith("spiffe://"):
            report(where, f"{spiffe_id!r} is not a SPIFFE ID (spiffe://...)")
        clients[spiffe_id] = _grant(body, where, spiffe_id, report)
    rules: list[OrgRule] = []
    orgs = raw.get("organizations") or []
    if not isinstance(orgs, list):
        report(line_of('"organizations"'), '"organizations" must be a list of rules')
        orgs = []
    for body in orgs:
        org = body.get("organization") if isinstance(body, dict) else None
        if not isinstance(org, str) or not org:
            report(line_of('"organizations"'), f"rule {body!r} needs a non-empty organization")
            continue
        unit = body.get("unit")
        where = line_of(f'"{unit}"' if isinstance(unit, str) else f'"{org}"')
        if unit is not None and not isinstance(unit, str):
            report(where, f"rule for {org!r}: unit must be a string")
            continue
        rest = {k: v for k, v in body.items() if k not in ("organization", "unit")}
        rules.append(OrgRule(org, unit, _grant(rest, where, f"rule for {org!r}", report)))
    return IdentityMap(clients=clients, rules=tuple(rules))


def _grant(body: Any, line: int, who: str, report_at: Callable[[int, str], None]) -> Grant:
    def report(msg: str) -> None:
        report_at(line, f"{who}: {msg}")

    if not isinstance(body, dict):
        report("must be an object with groups, roles and clearance")
        return Grant()
    extra = set(body) - _GRANT_KEYS
    if extra:
        report(f"unknown key(s) {sorted(extra)}; use groups, roles, clearance")
    groups, roles = body.get("groups", []), body.get("roles", [])
    for label, names in (("groups", groups), ("roles", roles)):
        if not isinstance(names, list) or not all(
            isinstance(n, str) and _NAME_RE.fullmatch(n) for n in names
        ):
            report(f"{label} must be a list of names (letters, digits, _ . -)")
            return Grant()
    clearance = body.get("clearance", 0)
    if not isinstance(clearance, int) or isinstance(clearance, bool) or not 0 <= clearance <= 3:
        report(f"clearance must be a whole number 0-3, not {clearance!r}")
        return Grant()
    return Grant(tuple(groups), tuple(roles), clearance)
