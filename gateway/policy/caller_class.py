"""Caller classes: the callers the policies cannot tell apart, decided once for all.

A caller reaches Cedar as its Client entity (facts.client_entity): its uid, its string
attributes (spiffe_id, name, organization, unit), what identities.json grants it (roles,
clearance, and groups as parents) and nothing else. Two callers whose entities agree on
everything some policy can observe get the same answer to the same request, so the
engine keys the answers of the caller-reading pieces by this class rather than by the
caller: a new caller whose class another caller already had asks Cedar nothing.

What a class holds, failing safe (any doubt keys by the caller itself, as before):

- the whole grant (groups, roles, clearance): few distinct values, from identities.json;
- a string attribute the policies read only by comparing it, with `==`, `!=` or
  `contains`, to string literals or the model's attributes: its value where it equals a
  string the policies or the models hold (`known`), else one stand-in, as every such
  value compares alike (`resource.owner == principal.spiffe_id` is how an owner is
  told apart: an owner's SPIFFE ID is a model attribute, so it stays in the key);
- a string attribute read any other way (`like`, against the context, passed on): its
  value, which for spiffe_id and name is the caller itself;
- a caller a policy names by uid (`principal == Client::"x"`, a Client literal anywhere):
  its own class; the principal used whole in any way not listed here (compared with an
  entity attribute, `in` something other than a Group): every caller its own class.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.policy.facts import NAMESPACE, Grant, IdentityFacts

_PRINCIPAL = {"Var": "principal"}
_RESOURCE = {"Var": "resource"}
_CLIENT = f"{NAMESPACE}::Client"
_GROUP = f"{NAMESPACE}::Group"
# The Client entity's string attributes (facts.client_entity), as IdentityFacts names them.
STRINGS = ("spiffe_id", "name", "organization", "unit")
_OTHER = ("other",)  # a tuple: never equal to a string value
_LIMIT = 4096  # callers and classes remembered (least recently used dropped)


class CallerClasses:
    """The class key of a caller for the policies `bodies` (Cedar JSON, static policies)
    given the strings the models' attributes hold (`model_strings`). `whole`: the set
    holds more than `bodies` (templates): every caller its own class."""

    def __init__(
        self,
        bodies: Iterable[Mapping[str, Any]],
        model_strings: Iterable[str],
        *,
        whole: bool = False,
    ) -> None:
        self.named: set[str] = set()  # Client uids a policy names
        self.exact: set[str] = set()  # string attributes keyed by value
        self.compared: set[str] = set()  # string attributes keyed by value-or-other
        self.known: set[str] = set(model_strings)
        self.opaque = whole  # the principal used in a way not understood: key by caller
        for body in bodies:
            self._scope(body.get("principal", {}))
            self._strings(body)
            for condition in body.get("conditions", ()):
                self._visit(condition.get("body"))
        self.compared -= self.exact
        # Each class as a small number, never reused (`of`): cache keys hold it.
        self._ids: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        # Per caller as its grant sees it (not per certificate: one client's many serials
        # would otherwise push every other caller out).
        self._known: OrderedDict[tuple[str, str, str, str], int] = OrderedDict()
        self._next = itertools.count()

    def of(self, identity: IdentityFacts, resolve: Callable[[IdentityFacts], Grant]) -> int:
        """The caller's class (`key`) as a number, kept per caller, least recently used
        dropped past `_LIMIT`. Numbers are never reused, so a dropped entry only costs
        misses, never another class's answer."""
        caller = (identity.spiffe_id, identity.name, identity.organization, identity.unit)
        hit = self._known.get(caller)
        if hit is not None:
            self._known.move_to_end(caller)
            return hit
        key = self.key(identity, resolve(identity))
        hit = self._ids.get(key)
        if hit is None:
            hit = self._ids[key] = next(self._next)
            if len(self._ids) > _LIMIT:
                self._ids.popitem(last=False)
        else:
            self._ids.move_to_end(key)
        self._known[caller] = hit
        if len(self._known) > _LIMIT:
            self._known.popitem(last=False)
        return hit

    def key(self, identity: IdentityFacts, grant: Grant) -> tuple[Any, ...]:
        """The caller's class: equal keys, equal answers from these policies."""
        if self.opaque or identity.spiffe_id in self.named:
            return ("caller", identity.spiffe_id, identity.name, identity.organization,
                    identity.unit)  # fmt: skip
        values = []
        for attr in STRINGS:
            v = getattr(identity, attr)
            if attr in self.exact:
                values.append(v)
            elif attr in self.compared:
                values.append(v if v in self.known else _OTHER)
            else:
                values.append(None)  # not read
        return ("class", grant.groups, grant.roles, grant.clearance, *values)

    # ------------------------------------------------------------------ analysis

    def _scope(self, scope: Mapping[str, Any]) -> None:
        op = scope.get("op")
        if op == "All":
            return
        if op == "is" and "in" not in scope:
            return  # every caller is a Client
        entity = scope.get("entity") if op in ("==", "in") else None
        if isinstance(entity, dict) and entity.get("type") == _GROUP:
            return  # group membership: in the grant
        if isinstance(entity, dict) and entity.get("type") == _CLIENT:
            self.named.add(str(entity.get("id")))
            return
        self.opaque = True

    def _strings(self, node: Any) -> None:
        """Every string literal in a policy: a compared attribute equal to one of them
        keeps its value in the key."""
        if isinstance(node, str):
            self.known.add(node)
        elif isinstance(node, list):
            for item in node:
                self._strings(item)
        elif isinstance(node, dict):
            for k, v in node.items():
                self.known.add(k)  # record field names too: cheap, and never wrong
                self._strings(v)

    def _attr(self, node: Any) -> str | None:
        """The attribute name when `node` is `principal.<attr>`."""
        if isinstance(node, dict) and len(node) == 1:
            access = node.get(".")
            if isinstance(access, dict) and access.get("left") == _PRINCIPAL:
                attr = access.get("attr")
                return attr if isinstance(attr, str) else None
        return None

    def _fixed(self, node: Any) -> bool:
        """A string literal, a set of them, or an attribute of the model: what a compared
        attribute may be compared with."""
        if not isinstance(node, dict) or len(node) != 1:
            return False
        if isinstance(node.get("Value"), str):
            return True
        items = node.get("Set")
        if isinstance(items, list):
            return all(isinstance(i, dict) and isinstance(i.get("Value"), str) for i in items)
        access = node.get(".")
        return isinstance(access, dict) and access.get("left") == _RESOURCE

    def _member(self, right: Any) -> bool:
        """`principal in <right>` depends on the grant alone: a Group or a set of them."""
        if not isinstance(right, dict):
            return False
        value = right.get("Value")
        if isinstance(value, dict) and isinstance(value.get("__entity"), dict):
            return bool(value["__entity"].get("type") == _GROUP)
        items = right.get("Set")
        return isinstance(items, list) and all(self._member(i) for i in items)

    def _client(self, node: Any) -> str | None:
        """The id when `node` is a Client entity literal."""
        value = node.get("Value") if isinstance(node, dict) else None
        entity = value.get("__entity") if isinstance(value, dict) else None
        if isinstance(entity, dict) and entity.get("type") == _CLIENT:
            return str(entity.get("id"))
        return None

    def _visit(self, node: Any) -> None:
        if self.opaque:
            return
        if isinstance(node, list):
            for item in node:
                self._visit(item)
            return
        if not isinstance(node, dict):
            return
        if node == _PRINCIPAL:
            self.opaque = True  # the principal whole, somewhere not understood
            return
        entity = node.get("__entity")
        if isinstance(entity, dict) and len(node) == 1:
            if entity.get("type") == _CLIENT:
                self.named.add(str(entity.get("id")))
            return
        record = node.get("Record")
        if isinstance(record, dict) and len(node) == 1:
            for value in record.values():
                self._visit(value)
            return
        for op, arg in node.items():
            if not isinstance(arg, dict):
                self._visit(arg)
                continue
            left, right = arg.get("left"), arg.get("right")
            if op in ("==", "in") and left == _PRINCIPAL and (uid := self._client(right)):
                self.named.add(uid)  # that caller alone matches (Clients are no parents)
                continue
            if op in ("==", "!="):
                for a, b in ((left, right), (right, left)):
                    attr = self._attr(a)
                    if attr is not None and self._fixed(b):
                        self.compared.add(attr)
                        break
                else:
                    self._visit(arg)
                continue
            if op == "contains" and (attr := self._attr(right)) is not None and self._fixed(left):
                self.compared.add(attr)
                self._visit(left)
                continue
            if op == "in" and left == _PRINCIPAL and self._member(right):
                continue
            if op == "is" and left == _PRINCIPAL and "in" not in arg:
                continue
            if op in (".", "has") and left == _PRINCIPAL:
                attr = arg.get("attr")
                if op == "." and isinstance(attr, str):
                    self.exact.add(attr)  # read some other way: its value is the key
                elif not isinstance(attr, str):
                    self.opaque = True
                continue
            self._visit(arg)


def model_strings(entities: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every string in the models' attributes (and their ids): what a compared caller
    attribute could equal."""
    out: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            out.add(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)

    for entity in entities:
        walk(entity)
    return out
