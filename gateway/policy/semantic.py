"""What an edit does to decisions: every class of request whose answer changes.

`semantic_diff(old, new)` searches the space of Cedar requests the gateway can make, not
the principals known today. Each attribute ranges over a small domain: the literals
either policy set (or identities.json) compares it with, the neighbours of each number
literal (so `<` against `<=` shows), a value made to match and a value made to miss each
`like` pattern, the enumerations the gateway itself fixes (modes, classifications,
payload classes, actions) and fresh values no policy names ("a certificate issued
later", "a region not named"). Set attributes (a model's residency and modes) are
decided element by element, only for the elements a rule asks about.

The search evaluates both policy sets on partial requests with three-valued logic:
a rule whose answer does not depend on the attributes still open is settled, and the
search splits on an attribute a rule is waiting for only while the two decisions can
still differ. A branch where both decisions are settled and equal, or where every rule
that differs between the sets is settled and pulls the same way, is dropped whole; a
branch where they differ is one class of request, reported with only the attributes it
fixes (the others are "any"). Decisions follow the gateway: deny by default, any
matching forbid wins, an evaluation error denies, and an admin action counts only from a
permit that names it.

What it cannot see is in policies/README.md ("What `diff` cannot see").
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import cedarpy

from gateway.policy import facts as F
from gateway.policy.identities import IdentityMap
from gateway.policy.source import PolicySource, named_actions

# Fresh values: no policy or identity names them (they cannot be literals: Cedar strings
# may hold anything, but these start with a character the tooling never writes).
FRESH = ("\u27e8other\u27e9", "\u27e8another\u27e9")
MAX_NODES = 2_000_000

_PRINCIPAL_LEAVES = ("spiffe_id", "name", "organization", "unit")
_CERT_VARS = ("principal.spiffe_id", "principal.organization", "principal.unit")
_ENUMS: dict[str, tuple[Any, ...]] = {
    "action": F.ACTIONS,
    "context.mode": F.MODES,
    "resource.classification": F.CLASSIFICATIONS,
    "context.payload_class": ("small", "medium", "large"),
}
# Ranges of the numbers the gateway computes (lo, hi); hi None: unbounded.
_RANGES: dict[str, tuple[int, int | None]] = {
    "principal.clearance": (0, 3),
    "context.node.trust": (0, 2),
    "context.hour": (0, 23),
    "context.batch_size": (1, None),
    "context.distinct_providers": (1, None),
    "context.prompt_tokens": (0, None),
    "context.max_tokens": (0, None),
    "context.temperature_milli": (0, None),
    "context.top_p_milli": (0, None),
}
_RESOURCE_LEAVES: dict[str, tuple[str, ...]] = {
    "Model": ("classification", "owner", "residency", "allowed_modes"),
    "Receipt": ("owner", "model"),
    "Log": ("owner",),
    "Gateway": (),
}
_SETS = ("resource.residency", "resource.allowed_modes")
_CONTEXT_LEAVES = (
    "mode",
    "batch_size",
    "payload_class",
    "hour",
    "purpose",
    "distinct_providers",
    "prompt_tokens",
    "max_tokens",
    "temperature_milli",
    "top_p_milli",
)
_NODE_LEAVES = ("name", "region", "region_prefixes", "provider", "trust")


class _Need(Exception):
    """The value depends on an attribute not decided yet."""

    def __init__(self, var: str) -> None:
        self.var = var


class _Error(Exception):
    """Cedar would report an evaluation error (the gateway denies)."""


class Unsupported(Exception):
    """A construct this analysis does not model (extension functions, set equality...)."""


@dataclass(frozen=True)
class _Ref:
    """principal, resource, context or a record inside it, not yet a value."""

    path: str


@dataclass(frozen=True)
class _SymSet:
    """A model's residency or allowed_modes: membership is decided element by element."""

    path: str


@dataclass(frozen=True)
class Entity:
    type: str
    id: str


_T, _F, _E = "T", "F", "E"


@dataclass(frozen=True)
class Rule:
    id: str
    effect: str
    body: dict[str, Any]
    key: str  # canonical body without annotations: equal keys decide alike
    admin: frozenset[str]  # admin actions its scope names (permits)


@dataclass
class Change:
    """One class of request whose decision changes, `allowed_now` says which way."""

    allowed_now: bool
    conditions: dict[str, tuple[Any, ...]]  # attribute -> the values this class takes
    text: str = ""
    example: dict[str, Any] = field(default_factory=dict)  # one request of the class

    def to_json(self) -> dict[str, Any]:
        return {
            "change": "newly allowed" if self.allowed_now else "newly denied",
            "conditions": {k: [_show(v) for v in vs] for k, vs in self.conditions.items()},
            "text": self.text,
            "example": {k: _show(v) for k, v in self.example.items()},
        }


@dataclass
class SemanticDiff:
    newly_allowed: list[Change] = field(default_factory=list)
    newly_denied: list[Change] = field(default_factory=list)
    unanalysed: list[str] = field(default_factory=list)  # rules (and why) not modelled
    complete: bool = True  # False: the search hit MAX_NODES
    nodes: int = 0
    seconds: float = 0.0

    @property
    def widens(self) -> bool:
        return bool(self.newly_allowed) or bool(self.unanalysed) or not self.complete


# --------------------------------------------------------------------------- rules


def rules_of(source: PolicySource) -> list[Rule]:
    est = json.loads(source.policy_set_json())["staticPolicies"]
    out = []
    for pid, body in est.items():
        plain = {k: v for k, v in body.items() if k != "annotations"}
        admin: frozenset[str] = frozenset()
        if body["effect"] == "permit":
            admin = (named_actions(body["action"]) or frozenset()) & frozenset(F.ADMIN_ACTIONS)
        key = json.dumps(plain, sort_keys=True)
        out.append(Rule(pid, body["effect"], plain, key, admin))
    return out


# --------------------------------------------------------------------------- domains


class _Domains:
    """The values each attribute ranges over (see the module doc)."""

    def __init__(self, rules: Iterable[Rule], identities: Iterable[IdentityMap]) -> None:
        self.lits: dict[str, set[Any]] = defaultdict(set)
        self.patterns: dict[str, list[list[Any]]] = defaultdict(list)
        self._parent: dict[str, str] = {}
        self.residency: set[str] = set()
        for rule in rules:
            for scope in ("principal", "action", "resource"):
                self._scope(scope, rule.body[scope])
            for cond in rule.body.get("conditions", ()):
                self._walk(cond["body"])
        for ids in identities:
            self.lits["principal.spiffe_id"].update(ids.clients)
            for r in ids.rules:
                self.lits["principal.organization"].add(r.organization)
                if r.unit is not None:
                    self.lits["principal.unit"].add(r.unit)
        self.lits["principal.unit"].add("")
        self.lits["principal.organization"].add("")
        self.lits["context.purpose"].add("")
        self._cache: dict[str, tuple[Any, ...]] = {}

    def _find(self, a: str) -> str:
        while self._parent.get(a, a) != a:
            a = self._parent[a]
        return a

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[ra] = rb

    def _scope(self, var: str, scope: Mapping[str, Any]) -> None:
        ents = scope.get("entities") or [scope.get("entity")]
        for e in ents:
            if isinstance(e, dict) and "id" in e:
                self._entity_lit(var, e)

    def _entity_lit(self, var: str, e: Mapping[str, Any]) -> None:
        kind = str(e.get("type", "")).rsplit("::", 1)[-1]
        if var == "principal" and kind == "Client":
            self.lits["principal.spiffe_id"].add(e["id"])
        elif var == "resource" and kind != "Gateway":
            self.lits["resource.id"].add(e["id"])
        elif var == "action":
            self.lits["action"].add(e["id"])

    def _walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self._walk(item)
            return
        if not isinstance(node, dict):
            return
        for op, arg in node.items():
            if op in ("==", "!=", "<", "<=", ">", ">=") and isinstance(arg, dict):
                left, right = _path(arg.get("left")), _path(arg.get("right"))
                for p, other in ((left, arg.get("right")), (right, arg.get("left"))):
                    if p is not None:
                        lit = _literal(other)
                        if isinstance(lit, dict) and "__entity" in lit:
                            self._entity_lit(p.split(".")[0], lit["__entity"])
                        elif lit is not None and not isinstance(lit, (list, dict)):
                            self.lits[p].add(lit)
                if left and right:
                    self._union(left, right)
            elif op == "contains" and isinstance(arg, dict):
                p = _path(arg.get("right"))
                items = _literal(arg.get("left"))
                if p is not None and isinstance(items, list):
                    self.lits[p].update(i for i in items if not isinstance(i, (list, dict)))
                    for i in items:
                        if isinstance(i, dict) and "__entity" in i:
                            self._entity_lit(p.split(".")[0], i["__entity"])
                q = _path(arg.get("left"))
                lit = _literal(arg.get("right"))
                if q == "resource.residency" and isinstance(lit, str):
                    self.residency.add(lit)
            elif op in ("containsAny", "containsAll") and isinstance(arg, dict):
                for side in ("left", "right"):
                    items = _literal(arg.get(side))
                    q = _path(arg.get("right" if side == "left" else "left"))
                    if isinstance(items, list) and q is not None:
                        strs = [i for i in items if isinstance(i, str)]
                        if q == "resource.residency":
                            self.residency.update(strs)
                        else:
                            self.lits[q].update(strs)
            elif op == "like" and isinstance(arg, dict):
                p = _path(arg.get("left"))
                if p is not None:
                    self.patterns[p].append(arg.get("pattern", []))
            elif op == "in" and isinstance(arg, dict):
                p = _path(arg.get("left"))
                lit = _literal(arg.get("right"))
                for e in lit if isinstance(lit, list) else [lit]:
                    if p is not None and isinstance(e, dict) and "__entity" in e:
                        self._entity_lit(p.split(".")[0], e["__entity"])
            self._walk(arg)

    def values(self, var: str) -> tuple[Any, ...]:
        if var in self._cache:
            return self._cache[var]
        if "\u220b" in var:
            out: tuple[Any, ...] = (True, False)
        elif var in _ENUMS:
            out = _ENUMS[var]
        else:
            root = self._find(var)
            cls = [v for v in {*self._parent, var, *self.lits} if self._find(v) == root]
            lits = {x for v in cls for x in self.lits.get(v, ())}
            pats = [p for v in cls for p in self.patterns.get(v, ())]
            if var in _RANGES or any(isinstance(x, int) and not isinstance(x, bool) for x in lits):
                lo, hi = _RANGES.get(var, (0, None))
                nums = {lo}
                for x in lits:
                    if isinstance(x, int) and not isinstance(x, bool):
                        nums.update((x - 1, x, x + 1))
                out = tuple(sorted(n for n in nums if n >= lo and (hi is None or n <= hi)))
            else:
                strs = {x for x in lits if isinstance(x, str)}
                for p in pats:
                    strs.add(_instance(p, ""))
                    strs.add(_instance(p, "zz"))
                if var == "context.node.region":
                    for r in self.residency:
                        strs.add(r + "x" if r.endswith("-") else r)
                    strs.discard("*x")
                    strs.discard("*")
                fresh = FRESH if len(cls) > 1 else FRESH[:1]
                out = (*sorted(strs), *fresh)
        self._cache[var] = out
        return out


def _instance(pattern: list[Any], fill: str) -> str:
    return "".join(p["Literal"] if isinstance(p, dict) else fill for p in pattern)


def _literal(node: Any) -> Any:
    """A constant expression's value (sets as lists), or None."""
    if not isinstance(node, dict):
        return None
    if "Value" in node:
        return node["Value"]
    if "Set" in node and isinstance(node["Set"], list):
        items = [_literal(i) for i in node["Set"]]
        return None if any(i is None for i in items) else items
    return None


def _path(node: Any) -> str | None:
    """principal.x / resource.x / context.node.x as a dotted path; principal itself is its
    SPIFFE ID, resource itself its id."""
    if not isinstance(node, dict):
        return None
    if node.get("Var") == "principal":
        return "principal.spiffe_id"
    if node.get("Var") == "resource":
        return "resource.id"
    if node.get("Var") == "action":
        return "action"
    access = node.get(".")
    if isinstance(access, dict) and isinstance(access.get("attr"), str):
        left = access.get("left")
        if isinstance(left, dict) and left.get("Var") in ("principal", "resource", "context"):
            return f"{left['Var']}.{access['attr']}"
        inner = _path(left)
        if inner is not None and inner.startswith("context."):
            return f"{inner}.{access['attr']}"
    return None


# --------------------------------------------------------------------------- evaluation


class _Env:
    """A partial request: the attributes decided so far, read for one policy set."""

    def __init__(self, assign: Mapping[str, Any], identities: IdentityMap) -> None:
        self.a = assign
        self.ids = identities

    def var(self, name: str) -> Any:
        if name in self.a:
            return self.a[name]
        raise _Need(name)

    def action(self) -> str:
        return str(self.var("action"))

    def rtype(self) -> str:
        return F.RESOURCE_ACTIONS.get(self.action(), "Model")

    def grant(self) -> F.Grant:
        for v in _CERT_VARS:
            self.var(v)
        who = F.IdentityFacts(
            str(self.a["principal.spiffe_id"]),
            "",
            str(self.a["principal.organization"]),
            str(self.a["principal.unit"]),
        )
        return self.ids.resolve(who)

    def entity_id(self, ref: _Ref) -> Entity:
        if ref.path == "principal":
            return Entity(f"{F.NAMESPACE}::Client", str(self.var("principal.spiffe_id")))
        if ref.path == "resource":
            rtype = self.rtype()
            rid = F.GATEWAY_ID if rtype == "Gateway" else str(self.var("resource.id"))
            return Entity(f"{F.NAMESPACE}::{rtype}", rid)
        raise Unsupported(f"{ref.path} used as an entity")

    def attr(self, ref: _Ref, attr: str) -> Any:
        path = f"{ref.path}.{attr}"
        if ref.path == "principal":
            if attr in _PRINCIPAL_LEAVES:
                return self.var(path)
            if attr == "roles":
                return frozenset(self.grant().roles)
            if attr == "clearance":
                return self.grant().clearance
            raise _Error(f"no attribute {attr}")
        if ref.path == "resource":
            if attr not in _RESOURCE_LEAVES[self.rtype()]:
                raise _Error(f"no attribute {attr}")
            if path in _SETS:
                return _SymSet(path)
            return self.var(path)
        if ref.path == "context":
            if self.action() != F.INFER:
                raise _Error(f"no context attribute {attr}")
            if attr == "node":
                return _Ref("context.node")
            if attr in _CONTEXT_LEAVES:
                return self.var(path)
            raise _Error(f"no context attribute {attr}")
        if ref.path == "context.node":
            if attr == "region_prefixes":
                return frozenset(F.region_prefixes(str(self.var("context.node.region"))))
            if attr in _NODE_LEAVES:
                return self.var(path)
        raise _Error(f"no attribute {attr}")

    def has(self, ref: _Ref, attr: str) -> bool:
        if ref.path == "principal":
            return attr in (*_PRINCIPAL_LEAVES, "roles", "clearance")
        if ref.path == "resource":
            return attr in _RESOURCE_LEAVES[self.rtype()]
        if ref.path == "context":
            return self.action() == F.INFER and attr in (*_CONTEXT_LEAVES, "node")
        return ref.path == "context.node" and attr in _NODE_LEAVES

    def member(self, s: _SymSet, item: Any) -> bool:
        if not isinstance(item, str):
            return False
        return bool(self.var(f"{s.path}\u220b{item}"))


def _value(v: Any) -> Any:
    """A Cedar literal as a Python value (entities as Entity, sets as frozensets)."""
    if isinstance(v, dict) and "__entity" in v:
        return Entity(v["__entity"]["type"], v["__entity"]["id"])
    if isinstance(v, dict) and "__extn" in v:
        raise Unsupported("extension values (ip, decimal, datetime)")
    if isinstance(v, list):
        return frozenset(_value(i) for i in v)
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Error("not a boolean")
    return v


def _eval(node: Any, env: _Env) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise Unsupported(f"expression {str(node)[:60]}")
    ((op, arg),) = node.items()
    if op == "Value":
        return _value(arg)
    if op == "Var":
        if arg == "action":
            return Entity(f"{F.NAMESPACE}::Action", env.action())
        return _Ref(str(arg))
    if op in ("&&", "||"):
        stop = op == "||"  # the value that decides alone
        try:
            left = _bool(_eval(arg["left"], env))
        except _Need as need:
            try:
                right = _bool(_eval(arg["right"], env))
            except (_Need, _Error):
                raise need from None
            if right is stop:
                return stop
            raise
        if left is stop:
            return stop
        return _bool(_eval(arg["right"], env))
    if op == "!":
        return not _bool(_eval(arg["arg"], env))
    if op == "if-then-else":
        cond = _bool(_eval(arg["if"], env))
        return _eval(arg["then" if cond else "else"], env)
    if op == "Set":
        items = [env.entity_id(i) if isinstance(i, _Ref) else _eval(i, env) for i in arg]
        items = [env.entity_id(i) if isinstance(i, _Ref) else i for i in items]
        if any(isinstance(i, (_SymSet, dict)) for i in items):
            raise Unsupported("a set of sets or records")
        return frozenset(items)
    if op == "Record":
        return {k: _eval(v, env) for k, v in arg.items()}
    if op == ".":
        left = _eval(arg["left"], env)
        if isinstance(left, _Ref):
            return env.attr(left, arg["attr"])
        if isinstance(left, dict):
            if arg["attr"] not in left:
                raise _Error("no such record attribute")
            return left[arg["attr"]]
        raise _Error("attribute of a non-entity")
    if op == "has":
        left = _eval(arg["left"], env)
        if isinstance(left, _Ref):
            return env.has(left, arg["attr"])
        if isinstance(left, dict):
            return arg["attr"] in left
        raise _Error("has on a non-entity")
    if op == "like":
        left = _eval(arg["left"], env)
        if not isinstance(left, str):
            raise _Error("like on a non-string")
        return _like(left, arg["pattern"])
    if op == "is":
        left = _eval(arg["left"], env)
        ent = env.entity_id(left) if isinstance(left, _Ref) else left
        if not isinstance(ent, Entity):
            raise _Error("is on a non-entity")
        ok = ent.type.rsplit("::", 1)[-1] == str(arg["entity_type"]).rsplit("::", 1)[-1]
        if ok and "in" in arg:
            return _in(ent, _eval(arg["in"], env), env)
        return ok
    if op == "in":
        left = _eval(arg["left"], env)
        ent = env.entity_id(left) if isinstance(left, _Ref) else left
        return _in(ent, _eval(arg["right"], env), env)
    if op in ("==", "!="):
        a, b = _eval(arg["left"], env), _eval(arg["right"], env)
        same = _equal(a, b, env)
        return same if op == "==" else not same
    if op in ("<", "<=", ">", ">=", "+", "-", "*"):
        a, b = _eval(arg["left"], env), _eval(arg["right"], env)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
            raise _Error("arithmetic on a non-number")
        return {
            "<": a < b,
            "<=": a <= b,
            ">": a > b,
            ">=": a >= b,
            "+": a + b,
            "-": a - b,
            "*": a * b,
        }[op]
    if op == "neg":
        v = _eval(arg["arg"], env)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Error("negation of a non-number")
        return -v
    if op in ("contains", "containsAny", "containsAll"):
        s, x = _eval(arg["left"], env), _eval(arg["right"], env)
        if isinstance(x, _Ref):
            x = env.entity_id(x)
        if op == "contains":
            if isinstance(s, _SymSet):
                return env.member(s, x)
            if not isinstance(s, frozenset):
                raise _Error("contains on a non-set")
            return x in s
        if isinstance(s, _SymSet) and isinstance(x, _SymSet):
            raise Unsupported("two residency/mode sets compared with each other")
        if isinstance(x, _SymSet) and op == "containsAny":
            s, x = x, s
        if isinstance(s, _SymSet):
            if not isinstance(x, frozenset):
                raise _Error(f"{op} of a non-set")
            return _kleene(
                (lambda item=item: env.member(s, item) for item in sorted(x, key=repr)),
                any_=op == "containsAny",
            )
        if isinstance(x, _SymSet):
            raise Unsupported("a literal set containsAll of a model's set")
        if not isinstance(s, frozenset) or not isinstance(x, frozenset):
            raise _Error(f"{op} on a non-set")
        return bool(s & x) if op == "containsAny" else x <= s
    if op == "isEmpty":
        s = _eval(arg["arg"], env)
        if isinstance(s, _SymSet):
            raise Unsupported("isEmpty() of a model's residency or modes")
        if not isinstance(s, frozenset):
            raise _Error("isEmpty of a non-set")
        return not s
    raise Unsupported(f"the operator {op}")


def _kleene(items: Iterator[Any], *, any_: bool) -> bool:
    """OR (any_) or AND of lazily evaluated booleans, settled as soon as one decides."""
    pending: _Need | None = None
    for thunk in items:
        try:
            v = thunk()
        except _Need as need:
            pending = pending or need
            continue
        if v is any_:
            return bool(any_)
    if pending is not None:
        raise pending
    return not any_


def _equal(a: Any, b: Any, env: _Env) -> bool:
    if isinstance(a, _Ref):
        a = env.entity_id(a)
    if isinstance(b, _Ref):
        b = env.entity_id(b)
    if isinstance(a, _SymSet) or isinstance(b, _SymSet):
        raise Unsupported("== on a model's residency or modes")
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _in(ent: Any, target: Any, env: _Env) -> bool:
    if not isinstance(ent, Entity):
        raise _Error("in on a non-entity")
    targets = target if isinstance(target, frozenset) else frozenset([target])
    for t in targets:
        if not isinstance(t, Entity):
            raise _Error("in with a non-entity")
        if t == ent:
            return True
        kind = ent.type.rsplit("::", 1)[-1]
        if kind == "Client" and t.type.rsplit("::", 1)[-1] == "Group":
            if t.id in env.grant().groups:
                return True
    return False


def _like(text: str, pattern: list[Any]) -> bool:
    import re

    regex = "".join(re.escape(p["Literal"]) if isinstance(p, dict) else ".*" for p in pattern)
    return re.fullmatch(regex, text, re.S) is not None


def _scope_ok(var: str, scope: Mapping[str, Any], env: _Env) -> bool:
    op = scope.get("op")
    if op == "All":
        return True
    if var == "action":
        act = env.action()
        ents = scope.get("entities") or [scope.get("entity")]
        return any(isinstance(e, dict) and e.get("id") == act for e in ents)
    ref = _Ref(var)
    if op == "==":
        return bool(env.entity_id(ref) == _value({"__entity": scope["entity"]}))
    if op == "in":
        return _in(env.entity_id(ref), _value({"__entity": scope["entity"]}), env)
    if op == "is":
        kind = str(scope["entity_type"]).rsplit("::", 1)[-1]
        actual = "Client" if var == "principal" else env.rtype()
        if actual != kind:
            return False
        if "in" in scope:
            return _in(env.entity_id(ref), _value({"__entity": scope["in"]["entity"]}), env)
        return True
    raise Unsupported(f"{var} scope {op}")


def _judge_rule(rule: Rule, env: _Env) -> str:
    """T (applies), F (does not), E (evaluation error); _Need when it cannot tell yet."""
    body = rule.body
    try:
        if not _scope_ok("action", body["action"], env):
            return _F
        if rule.effect == "permit" and env.action() in F.ADMIN_ACTIONS:
            if env.action() not in rule.admin:
                return _F  # admin rights only by name (PolicyEngine.authorize)
        for var in ("principal", "resource"):
            if not _scope_ok(var, body[var], env):
                return _F
        conds = body.get("conditions", ())
        thunks = []
        for c in conds:
            want = c["kind"] == "when"
            thunks.append(lambda c=c, want=want: _bool(_eval(c["body"], env)) is want)
        return _T if _kleene(iter(thunks), any_=False) else _F
    except _Error:
        return _E


# --------------------------------------------------------------------------- the search


def _decide(effects: list[str], results: list[str | None]) -> str | None:
    """allow / deny as the gateway decides, None while it depends on open attributes."""
    permit_t = permit_open = forbid_open = False
    for eff, r in zip(effects, results, strict=True):
        if r == _E or (eff == "forbid" and r == _T):
            return "deny"
        if r is None:
            if eff == "forbid":
                forbid_open = True
            else:
                permit_open = True
        elif r == _T:
            permit_t = True
    if not permit_t and not permit_open:
        return "deny"
    if forbid_open:
        return None
    return "allow" if permit_t else None


def _pull(effects: list[str], results: list[str | None]) -> tuple[bool, bool] | None:
    """What the rules of one side pull towards (any permit applies, any forbid/error),
    None while one is open."""
    if any(r is None for r in results):
        return None
    permit = any(r == _T and e == "permit" for e, r in zip(effects, results, strict=True))
    block = any(
        r == _E or (r == _T and e == "forbid") for e, r in zip(effects, results, strict=True)
    )
    return permit, block


class _Search:
    def __init__(self, old: PolicySource, new: PolicySource) -> None:
        self.ids = (old.identities, new.identities)
        old_rules, new_rules = rules_of(old), rules_of(new)
        same_ids = old.identities.canonical() == new.identities.canonical()
        old_keys: dict[str, int] = defaultdict(int)
        for r in old_rules:
            old_keys[r.key] += 1
        shared: list[Rule] = []
        only_new: list[Rule] = []
        for r in new_rules:
            # A rule that reads what identities.json grants (groups, roles, clearance)
            # decides differently when that file changed: it is not shared then.
            if (same_ids or not _reads_grant(r)) and old_keys[r.key] > 0:
                old_keys[r.key] -= 1
                shared.append(r)
            else:
                only_new.append(r)
        taken: dict[str, int] = defaultdict(int)
        for r in shared:
            taken[r.key] += 1
        only_old: list[Rule] = []
        for r in old_rules:
            if taken[r.key] > 0:
                taken[r.key] -= 1
            else:
                only_old.append(r)
        self.shared, self.only_old, self.only_new = shared, only_old, only_new
        self.domains = _Domains([*old_rules, *new_rules], self.ids)
        self.unanalysed: dict[str, str] = {}
        # (newly allowed?, the class, an example request in it)
        self.found: list[tuple[bool, dict[str, Any], dict[str, Any]]] = []
        self.nodes = 0
        self.complete = True

    def judge(self, rule: Rule, env: _Env) -> tuple[str | None, str | None]:
        """(result, the attribute it waits for)."""
        if rule.id in self.unanalysed:
            return _E, None
        try:
            return _judge_rule(rule, env), None
        except _Need as need:
            return None, need.var
        except Unsupported as exc:
            self.unanalysed[rule.id] = str(exc)
            return _E, None

    def run(self) -> None:
        self._visit({}, {})

    def _side(
        self,
        rules: list[Rule],
        tag: int,
        env: _Env,
        memo: dict[tuple[int, int], str],
        waits: list[str],
    ) -> list[str | None]:
        """Each rule's answer; settled answers are kept in `memo` (a request only grows)."""
        out: list[str | None] = []
        for i, rule in enumerate(rules):
            r = memo.get((tag, i))
            if r is None:
                r, wait = self.judge(rule, env)
                if r is None:
                    assert wait is not None
                    waits.append(wait)
                else:
                    memo[(tag, i)] = r
            out.append(r)
        return out

    def _judge_all(
        self, assign: dict[str, Any], memo: dict[tuple[int, int], str]
    ) -> tuple[list[str | None], list[str | None], list[str | None], list[str], list[str]]:
        old_env, new_env = _Env(assign, self.ids[0]), _Env(assign, self.ids[1])
        waits: list[str] = []
        shared_waits: list[str] = []
        old_res = self._side(self.only_old, 0, old_env, memo, waits)
        new_res = self._side(self.only_new, 1, new_env, memo, waits)
        # Shared rules decide alike on both sides (they are shared only when
        # identities.json did not change), so they are judged once.
        shared_res = self._side(self.shared, 2, old_env, memo, shared_waits)
        return old_res, new_res, shared_res, waits, shared_waits

    def _decisions(
        self, old_res: list[str | None], new_res: list[str | None], shared_res: list[str | None]
    ) -> tuple[str | None, str | None]:
        shared_eff = [r.effect for r in self.shared]
        before = _decide(shared_eff + [r.effect for r in self.only_old], shared_res + old_res)
        after = _decide(shared_eff + [r.effect for r in self.only_new], shared_res + new_res)
        return before, after

    def _visit(self, assign: dict[str, Any], memo_in: dict[tuple[int, int], str]) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.complete = False
            return
        memo = dict(memo_in)
        old_res, new_res, shared_res, waits, shared_waits = self._judge_all(assign, memo)
        pulls = (
            _pull([r.effect for r in self.only_old], old_res),
            _pull([r.effect for r in self.only_new], new_res),
        )
        if pulls[0] is not None and pulls[1] is not None:
            if pulls[0] == pulls[1]:
                return  # the rules that differ are settled and pull alike: same decisions
            # The rules that differ are settled and pull apart: this is one class of
            # request; it changes wherever the shared rules leave the decision open to
            # them, so one example request decides it (and shows it).
            example = self._example(assign, memo)
            if example is not None:
                self.found.append((example[1] == "allow", dict(assign), example[0]))
            return
        before, after = self._decisions(old_res, new_res, shared_res)
        if before is not None and after is not None:
            if before != after:
                self.found.append((after == "allow", dict(assign), dict(assign)))
            return
        var = (waits or shared_waits or [""])[0]
        if not var:  # cannot happen: an open decision waits for something
            return
        for value in self.domains.values(var):
            assign[var] = value
            self._visit(assign, memo)
            del assign[var]
            if not self.complete:
                return

    def _example(
        self, assign: dict[str, Any], memo_in: dict[tuple[int, int], str]
    ) -> tuple[dict[str, Any], str] | None:
        """A request in this class whose decisions differ (and the new one), or None."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.complete = False
            return None
        memo = dict(memo_in)
        old_res, new_res, shared_res, _, shared_waits = self._judge_all(assign, memo)
        before, after = self._decisions(old_res, new_res, shared_res)
        if before is not None and after is not None:
            return (dict(assign), after) if before != after else None
        if not shared_waits:
            return None
        var = shared_waits[0]
        for value in self.domains.values(var):
            assign[var] = value
            found = self._example(assign, memo)
            del assign[var]
            if found is not None or not self.complete:
                return found
        return None


def _reads_grant(rule: Rule) -> bool:
    key = rule.key
    return "::Group" in key or '"roles"' in key or '"clearance"' in key


def semantic_diff(old: PolicySource, new: PolicySource) -> SemanticDiff:
    """Every class of request whose decision differs between `old` and `new`."""
    start = time.monotonic()
    search = _Search(old, new)
    search.run()
    out = SemanticDiff(
        unanalysed=[f"{pid}: {why}" for pid, why in sorted(search.unanalysed.items())],
        complete=search.complete,
        nodes=search.nodes,
    )
    for allowed_now in (True, False):
        cubes = [a for ok, a, _ in search.found if ok is allowed_now]
        examples = [e for ok, _, e in search.found if ok is allowed_now]
        for cond in _merge(cubes, search.domains):
            example = next(
                (e for e in examples if all(e.get(k) in vs for k, vs in cond.items())), {}
            )
            change = Change(allowed_now, cond, example=example)
            change.text = describe(change, search.ids[1] if allowed_now else search.ids[0])
            (out.newly_allowed if allowed_now else out.newly_denied).append(change)
    out.seconds = time.monotonic() - start
    return out


def _merge(cubes: list[dict[str, Any]], domains: _Domains) -> list[dict[str, tuple[Any, ...]]]:
    """Classes that differ in one attribute's value only become one class; an attribute
    that takes every value of its domain is dropped (any value)."""
    items = [{k: (v,) for k, v in c.items()} for c in cubes]
    changed = True
    while changed:
        changed = False
        for c in items:
            for var in [k for k, vs in c.items() if set(vs) >= set(domains.values(k))]:
                del c[var]
        groups: dict[tuple[Any, ...], list[dict[str, tuple[Any, ...]]]] = {}
        for var in sorted({k for c in items for k in c}):
            groups.clear()
            for c in items:
                if var not in c:
                    continue
                rest = tuple(sorted((k, v) for k, v in c.items() if k != var))
                groups.setdefault(rest, []).append(c)
            merged: list[dict[str, tuple[Any, ...]]] = []
            used: set[int] = set()
            for group in groups.values():
                if len(group) > 1:
                    values = tuple(dict.fromkeys(v for c in group for v in c[var]))
                    new = dict(group[0])
                    new[var] = values
                    merged.append(new)
                    used.update(id(c) for c in group)
                    changed = True
            if used:
                items = [c for c in items if id(c) not in used] + merged
    return sorted(
        items,
        key=lambda c: json.dumps(
            {k: [_show(v) for v in vs] for k, vs in c.items()}, sort_keys=True
        ),
    )


# --------------------------------------------------------------------------- words

_LABELS = {
    "principal.spiffe_id": "SPIFFE ID",
    "principal.name": "name",
    "principal.organization": "organization (O)",
    "principal.unit": "unit (OU)",
    "resource.id": "model",
    "resource.classification": "classification",
    "resource.owner": "owner",
    "resource.model": "model",
    "context.mode": "mode",
    "context.node.name": "node",
    "context.node.region": "region",
    "context.node.provider": "provider",
    "context.node.trust": "node trust",
    "context.batch_size": "batch size",
    "context.payload_class": "payload",
    "context.hour": "hour (UTC)",
    "context.purpose": "purpose",
    "context.distinct_providers": "distinct providers",
    "context.prompt_tokens": "prompt tokens",
    "context.max_tokens": "max tokens",
    "context.temperature_milli": "temperature (x1000)",
    "context.top_p_milli": "top_p (x1000)",
}


def _show(v: Any) -> Any:
    if v == FRESH[0]:
        return "<any other value>"
    if v == FRESH[1]:
        return "<yet another value>"
    return v


def _words(var: str, values: tuple[Any, ...]) -> str:
    if "\u220b" in var:
        path, item = var.split("\u220b", 1)
        what = "residency" if path.endswith("residency") else "modes offered"
        label = "any other value" if item in FRESH else repr(item)
        verb = {(True,): "includes", (False,): "excludes"}.get(tuple(values), "any")
        return f"{what} {verb} {label}"
    shown = [
        repr(_show(v)) if isinstance(v, str) and v not in FRESH else str(_show(v)) for v in values
    ]
    if var == "resource.id" and any(v in FRESH for v in values):
        shown = [s if s != "<any other value>" else "a model no rule names" for s in shown]
    if var == "principal.spiffe_id" and any(v in FRESH for v in values):
        shown = [
            s if not s.startswith("<") else "a certificate no rule or identity names" for s in shown
        ]
    label = _LABELS.get(var, var)
    return f"{label} {' or '.join(shown)}"


def describe(change: Change, identities: IdentityMap) -> str:
    """One class of request in words an officer reads."""
    c = change.conditions
    verb = "may now" if change.allowed_now else "may no longer"
    acts = c.get("action", F.ACTIONS)
    who = [
        _words(k, c[k])
        for k in (
            "principal.spiffe_id",
            "principal.organization",
            "principal.unit",
            "principal.name",
        )
        if k in c
    ]
    whom = "any caller" if not who else "callers with " + ", ".join(who)
    cert = [c.get(k) for k in _CERT_VARS]
    if all(v is not None and len(v) == 1 for v in cert):
        assert all(v is not None for v in cert)
        grant = identities.resolve(
            F.IdentityFacts(str(cert[0][0]), "", str(cert[1][0]), str(cert[2][0]))  # type: ignore[index]
        )
        bits = []
        if grant.groups:
            bits.append("groups " + ", ".join(grant.groups))
        if grant.roles:
            bits.append("roles " + ", ".join(grant.roles))
        bits.append(f"clearance {grant.clearance}")
        whom += f" ({'; '.join(bits)})"
    rest = [_words(k, v) for k, v in c.items() if k != "action" and not k.startswith("principal.")]
    what = " or ".join(str(a) for a in acts) if len(acts) < len(F.ACTIONS) else "do anything"
    text = f"{whom} {verb} {what}"
    if rest:
        text += ": " + "; ".join(rest)
    return text


def _evaluate_concrete(source: PolicySource, assign: Mapping[str, Any]) -> str:
    """The decision `source` makes on a complete request (for tests: cross-check with
    Cedar itself)."""
    rules = rules_of(source)
    env = _Env(assign, source.identities)
    results: list[str | None] = [_judge_rule(r, env) for r in rules]
    return _decide([r.effect for r in rules], results) or "deny"


__all__ = [
    "FRESH",
    "Change",
    "SemanticDiff",
    "Unsupported",
    "cedarpy",
    "describe",
    "semantic_diff",
]
