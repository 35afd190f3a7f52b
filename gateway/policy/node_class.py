"""Node classes: the nodes the policies cannot tell apart, decided once for all of them.

A node reaches Cedar only as `context.node` (facts.node_record), so two nodes whose
records agree on every attribute some policy reads get the same answer for the same
request: Cedar is deterministic and nothing else in the request differs. The engine
evaluates one representative per class and gives its answer to every member, which
makes a cache miss cost the number of classes, not the number of nodes.

The analysis reads the JSON form of the policy set Cedar runs, and fails safe: any use
of `context.node` (or of the whole `context`) it cannot pin to named attributes of the
node's record makes every node its own class. It is generic over the record's keys, so
an attribute added to node_record splits classes as soon as a policy reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CONTEXT = {"Var": "context"}
_NODE = {".": {"left": _CONTEXT, "attr": "node"}}


def node_attributes(policy_set: Mapping[str, Any], keys: Iterable[str]) -> frozenset[str] | None:
    """The attributes of `context.node` the policies read, or None when some policy uses
    the node (or the context) in a way that cannot be pinned to attributes in `keys`
    (the node record's keys): the whole record compared or passed on, `has` or `.` on an
    attribute the record does not have, or a shape this analysis does not know."""
    known = frozenset(keys)
    found: set[str] = set()
    opaque = False

    def visit(node: Any) -> None:
        nonlocal opaque
        if opaque:
            return
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if node == _CONTEXT or node == _NODE:
            opaque = True  # the context or the node record used whole
            return
        for op, arg in node.items():
            if op in (".", "has") and isinstance(arg, dict):
                left, attr = arg.get("left"), arg.get("attr")
                if left == _NODE:
                    if isinstance(attr, str) and attr in known:
                        found.add(attr)
                    else:
                        opaque = True
                    continue
                if left == _CONTEXT:
                    if attr == "node" and op == "has":
                        continue  # always present: says nothing about which node
                    if not isinstance(attr, str):
                        opaque = True
                    continue  # another context attribute: the same for every node
            visit(arg)

    for kind in ("staticPolicies", "templates"):
        for body in policy_set.get(kind, {}).values():
            for condition in body.get("conditions", ()):
                visit(condition.get("body"))
    return None if opaque else frozenset(found)


def class_key(record: Mapping[str, Any], attributes: Sequence[str] | None) -> str:
    """The class a node record belongs to: its values of `attributes` (None: all)."""
    chosen = record if attributes is None else {a: record[a] for a in attributes}
    return json.dumps(chosen, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Reads:
    """What of a request some policies read: the principal (its entity, groups and
    attributes), the resource (the model), and which context attributes (None: the
    context as a whole, or something this analysis cannot bound, such as an entity
    named by literal, which depends on which entities the request brings)."""

    principal: bool
    resource: bool
    context: frozenset[str] | None


EVERYTHING = Reads(True, True, None)


def policy_reads(bodies: Iterable[Mapping[str, Any]]) -> Reads:
    """What the policies `bodies` (Cedar JSON, one static policy each) read."""
    principal = resource = False
    context: set[str] | None = set()

    def visit(node: Any) -> bool:
        """False when the expression cannot be bounded."""
        nonlocal principal, resource, context
        if isinstance(node, list):
            return all(visit(item) for item in node)
        if not isinstance(node, dict):
            return True
        if "Slot" in node or "Unknown" in node:
            return False
        record = node.get("Record")
        if isinstance(record, dict):
            # A record's field names are the policy author's, not operators: a field called
            # `__entity` or `Var` must not hide what its value reads.
            return all(visit(v) for v in record.values())
        literal = node.get("__entity")
        if isinstance(literal, dict):
            # Groups, models and the gateway are the same for every request; a client's
            # entity is there only when that client asks.
            principal = principal or str(literal.get("type", "")).endswith("::Client")
            return True
        var = node.get("Var")
        if var == "principal":
            principal = True
        elif var == "resource":
            resource = True
        elif var == "context":
            context = None
        for op, arg in node.items():
            if op in (".", "has") and isinstance(arg, dict) and arg.get("left") == _CONTEXT:
                if not isinstance(arg.get("attr"), str):
                    return False
                if context is not None:
                    context.add(arg["attr"])
                continue
            if op != "Var" and not visit(arg):
                return False
        return True

    for body in bodies:
        if body.get("principal", {}).get("op") != "All":
            principal = True
        if body.get("resource", {}).get("op") != "All":
            resource = True
        conditions = [c.get("body") for c in body.get("conditions", ())]
        if not visit(conditions) or not visit(body.get("action")):
            return EVERYTHING
    return Reads(principal, resource, None if context is None else frozenset(context))
