"""The Cedar policy engine: one batched, cached decision per inference request.

Built once per policy source and set of model/node facts. Cedar's parsed handles
(policy set, schema, entities) are kept, so a decision costs at most one
`is_authorized_batch` call per piece of the policy set (below) with something new to
answer, and none for a request already cached.

Fail closed, three ways: a pair whose evaluation reports an error in any policy is
denied even if a permit matched (Cedar itself skips an erroring policy, which would
silently disarm a `forbid`); NoDecision (e.g. a context the schema refuses) is a deny;
and every context attribute a policy reads is always filled (facts.infer_context; a
piece gets those its policies read, all of them where that cannot be bounded).

Node classes (node_class.py): nodes whose records agree on every attribute a policy reads
get the same answer, so Cedar decides one representative per class and the answer is
given to each node of it. The set is decided in pieces (_pieces): the policies that read
the node (per class), those that read the caller, and the rest by whether they read the
mode or provider count; each piece's answer is cached by the part of the request it
reads (node_class.policy_reads), so a request the cache has not seen asks Cedar only
about what is new in it (a new batch size: one small request; a caller of a new class:
one per mode), and the answers are combined as one call over the whole set would give
them (_combine, fail closed). Callers are classed too (caller_class.py): the caller's
piece is keyed by what of the caller its policies can tell apart (the grant, compared
strings), the caller itself where a policy could single it out (an owner, a uid named),
so a new caller whose class another caller had asks Cedar nothing; an answer with an
error is kept for its own caller (the error may name it). Only the modes asked for are
decided when no policy reads the mode. tests/test_policy_classes.py,
tests/test_policy_speed.py and tests/test_policy_callers.py hold all of it to deciding
each node and caller alone with the whole set.

Cedar is handed the schema with `infer` requests only where the schema refuses the shape
the gateway builds (then each request is NoDecision: denied); otherwise not: the
policies were validated against it at load, the request is built from typed facts that
the load-time probe (source._probe_schema, and the engine's own) matched to the schema's
types, and a piece is handed only the context attributes it reads. The re-check cost
about half of every Cedar request.

Cache: each (mode, node class) decision is keyed by the exact Cedar request it came from
(every principal, resource and context attribute, via the facts that determine them),
the policy set hash and the caller's revocation version. High-cardinality inputs reach
Cedar only as coarse values the schema names (payload_class, hour), so exact keys still
hit and a cached allow can never straddle a threshold a `forbid` draws. The purpose is
client text: it is keyed by the policy literal it equals, or `other` (`purpose_key`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cedarpy

from gateway.policy import facts as F
from gateway.policy.caller_class import CallerClasses, model_strings
from gateway.policy.node_class import Reads, class_key, node_attributes, policy_reads
from gateway.policy.source import PolicySource, named_actions

log = logging.getLogger(__name__)

# Context attributes whose value differs between the modes of one request.
_MODE_DEPENDENT = frozenset({"mode", "distinct_providers"})

DEFAULT_RATE = F.Rate(60, 60)
_ERROR_POLICY = re.compile(r"evaluating policy `([^`]+)`")


class _Key(NamedTuple):
    """The request facts shared by every (mode, node) pair of one call; with mode, node
    and provider count they fix the exact Cedar request (model and node facts are fixed
    per engine, a client's attributes by its identity and identities.json)."""

    policy_hash: str
    revocation_version: int
    spiffe_id: str
    name: str
    organization: str
    unit: str
    model: str
    batch_size: int
    payload_class: str
    hour: int
    purpose: str  # `PolicyEngine.purpose_key`, not the client's text
    # Generative requests: exact, so no cached allow crosses a token cap (0 for tensors).
    prompt_tokens: int = 0
    max_tokens: int = 0
    temperature_milli: int = 0
    top_p_milli: int = 0


class PairResult(NamedTuple):
    """Cedar's answer for one (mode, node), after the fail-closed rules."""

    allowed: bool
    determining: tuple[str, ...]  # the permits (allowed) or forbids (denied) that matched
    errors: tuple[str, ...]
    distinct_providers: int


@dataclass(frozen=True)
class InferDecision:
    id: str
    allowed: bool
    modes: tuple[str, ...]  # allowed modes, cheapest first
    nodes_by_mode: dict[str, tuple[str, ...]]  # allowed mode -> the nodes allowed in it
    rate: F.Rate | None  # strictest @rate among the permits behind any allowed pair
    determining: tuple[str, ...]
    errors: tuple[str, ...]
    policy_hash: str
    reason: str
    pairs: Mapping[tuple[str, str], PairResult]  # every (mode, node) evaluated
    # The highest @spot_check among the permits behind an allowed mode-`none` pair: a
    # floor under the configured spot-check rates (docs/reputation.md).
    spot_check: F.SpotCheckRate | None = None
    # The token limits (@tokens_per_minute, @token_budget) of the permits behind any
    # allowed pair, the lowest per window length: generative models only.
    token_budgets: tuple[F.TokenBudget, ...] = ()
    # The strictest @proof among the permits behind an allowed mode-`none` pair: the answer
    # is proven later by a zk-capable node (docs/zk.md, "Lazy proofs").
    proof: str | None = None
    # Set when revocation data was past its staleness budget and @stale permits kept
    # these modes (PolicyEngine.past_staleness): how stale, in whole seconds.
    revocation_stale_s: int | None = None
    # The modes Cedar decided, cheapest first: `modes` and everything derived from the
    # permits (rate, spot_check, proof, token_budgets) speak of these alone.
    evaluated: tuple[str, ...] = F.MODES

    def node_allowed(self, mode: str, node: str) -> bool:
        return node in self.nodes_by_mode.get(mode, ())

    def for_mode(self, mode: str) -> tuple[tuple[str, ...], str]:
        """The rules that decided `mode` and why, for a client's or the log's account of
        one mode: the decision's own `reason` speaks of every mode together (its permits
        when any mode is allowed), which is wrong next to a deny of the mode asked for."""
        results = [r for (m, _), r in self.pairs.items() if m == mode]
        if mode not in self.evaluated:
            return (), f"{mode} was not evaluated"
        if mode in self.modes:
            ids = tuple(dict.fromkeys(p for r in results if r.allowed for p in r.determining))
            return ids, f"{mode} allowed by {', '.join(ids)}"
        if not results:  # decided before Cedar ran (unknown model, no node)
            return self.determining, self.reason
        denied = [r for r in results if not r.allowed]
        errors = tuple(dict.fromkeys(e for r in denied for e in r.errors))
        forbids = tuple(dict.fromkeys(p for r in denied for p in r.determining))
        if errors or forbids:
            return forbids, f"{mode} {_deny_reason(forbids, errors)}"
        if not denied:  # policy permits it; the model's registry entry does not offer it
            return (), f"{mode} is not offered for this model (its registry entry)"
        return (), f"{mode} denied: no permit matches"


@dataclass(frozen=True)
class AuthzDecision:
    id: str
    allowed: bool
    action: str
    determining: tuple[str, ...]
    errors: tuple[str, ...]
    policy_hash: str
    reason: str


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    size: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class PolicyEngine:
    def __init__(
        self,
        source: PolicySource,
        *,
        models: Mapping[str, F.ModelFacts],
        nodes: Sequence[F.NodeFacts],
        default_rate: F.Rate = DEFAULT_RATE,
        cache_size: int = 65536,
        check_requests: bool = False,
        node_classes: bool = True,
    ) -> None:
        """`check_requests`: hand Cedar the schema with every `infer` request so it
        re-checks the request's shape (about half of a Cedar request's cost). Off by
        default: the gateway builds every request from typed facts, the policies were
        validated against the schema at load, and the schema is probed here with the
        very shape the gateway builds; where it refuses that shape, every request is
        checked (so each is NoDecision: denied). `node_classes`: False decides every node
        on its own with the whole policy set (the reference the equivalence tests compare
        with)."""
        for m in models.values():
            F.check_model(m)
        self.source = source
        self.policy_hash = source.hash
        self.default_rate = default_rate
        self._models = dict(models)
        self._nodes = {n.name: n for n in nodes}
        policy_json = source.policy_set_json()
        self._policies = cedarpy.PolicySet.from_json_str(policy_json)
        parsed = json.loads(policy_json)
        # What each policy's action scope names, read from the very text Cedar runs.
        self._named = {
            pid: named_actions(body["action"]) for pid, body in parsed["staticPolicies"].items()
        }
        self._schema = cedarpy.Schema.from_str(source.schema_text)
        # The permits with their conditions dropped: what `may_infer` asks.
        permits = {
            pid: {**body, "conditions": []}
            for pid, body in parsed["staticPolicies"].items()
            if body["effect"] == "permit"
        }
        self._scopes = cedarpy.PolicySet.from_json_str(
            json.dumps({**parsed, "staticPolicies": permits})
        )
        self._scope_cache: OrderedDict[tuple[Any, ...], bool] = OrderedDict()
        ents = [F.group_entity(g) for g in source.identities.groups()]
        ents += [F.model_entity(m) for m in self._models.values()]
        ents.append(F.resource_entity(F.ResourceFacts("Gateway")))
        self._base = cedarpy.Entities.from_json_str(json.dumps(ents), self._schema)
        if not check_requests and not self._shape_accepted(nodes):
            log.warning("the schema refuses the infer requests the gateway builds: denied")
            check_requests = True
        # The schema for `infer` requests (None: not re-checked per request, see above).
        # Other actions are rare and always checked.
        self.checks_requests = check_requests
        self._request_schema = self._schema if check_requests else None
        # A permit without @rate still gets a limit: never unlimited.
        self._rates = {
            p.id: p.rate or default_rate for p in source.policies if p.effect == "permit"
        }
        self._proofs = {p.id: p.proof for p in source.policies if p.proof is not None}
        self._stale = {p.id: p.stale for p in source.policies if p.stale is not None}
        self._spot_checks = {
            p.id: p.spot_check for p in source.policies if p.spot_check is not None
        }
        self._token_budgets = {p.id: p.token_budgets for p in source.policies if p.token_budgets}
        self._node_json = {n.name: F.node_record(n) for n in nodes}
        self._fleets: OrderedDict[tuple[str, ...], _Fleet] = OrderedDict()
        # Which node attributes the policies read (None: not known, so all of them).
        keys = {k for record in self._node_json.values() for k in record}
        read = node_attributes(parsed, keys) if node_classes else None
        self.node_attributes = None if read is None else tuple(sorted(read))
        # Each node's class as a small number (the cache keys hold it).
        ids: dict[str, int] = {}
        self._class = {
            name: ids.setdefault(class_key(record, self.node_attributes), len(ids))
            for name, record in self._node_json.items()
        }
        self.class_count = len(ids)
        # Deciding the policy set in pieces by what each reads (_pieces); None: whole.
        self._pieces = _pieces(parsed, keys) if node_classes else None
        # Which callers the pieces cannot tell apart (caller_class.py): the node-free
        # pieces that read the caller are keyed by that class, not by the caller.
        strings = model_strings(F.model_entity(m) for m in self._models.values())
        self._callers = (
            CallerClasses(_infer_bodies(parsed).values(), strings)
            if self._pieces is not None
            and any(p.reads.principal and not p.node for p in self._pieces)
            else None
        )
        # Templates (their links name principals) are not analysed: every caller alone.
        templated = bool(parsed.get("templates") or parsed.get("templateLinks"))
        self._scope_callers = CallerClasses(permits.values(), strings, whole=templated)
        # Deciding only the mode a client names gives the same decision (rate, token
        # budgets, nodes) as deciding all of them only when no policy's answer can change
        # with the mode: a mode-conditional permit or forbid would otherwise change which
        # permits determine the rate, so naming a mode could pick a looser @rate (and,
        # with buckets keyed by rate, add limits together).
        reads = policy_reads(parsed["staticPolicies"].values())
        self.mode_blind = reads.context is not None and not (reads.context & _MODE_DEPENDENT)
        # Answers of the pieces (_Piece), each by the part of the request it reads: the
        # node-free pieces' in _free, the node piece's in _near, then per class.
        self._free: OrderedDict[tuple[Any, ...], _Part] = OrderedDict()
        self._near: OrderedDict[tuple[Any, ...], dict[int, _Part]] = OrderedDict()
        self._interned: dict[_Part, _Part] = {}
        self._rows: OrderedDict[tuple[Any, ...], dict[int, PairResult]] = OrderedDict()
        self._folds: dict[tuple[_Part, ...], _Part] = {}  # _fold's answers
        # Cedar lists reasons in no fixed order; report them in file order.
        self._order = {p.id: i for i, p in enumerate(source.policies)}
        # The purpose literals the policies compare against (None: used some other way).
        self.purpose_literals = purpose_literals(parsed)
        self._cache: OrderedDict[tuple[Any, ...], dict[int, PairResult]] = OrderedDict()
        self._cached = 0  # answers in the cache (each group holds one per class)
        self._cache_size = cache_size
        self._clients: OrderedDict[F.IdentityFacts, tuple[str, cedarpy.Entities]] = OrderedDict()
        self._version: int | None = None
        self._hits = 0
        self._misses = 0

    # ------------------------------------------------------------------ infer

    def decide_infer(
        self,
        identity: F.IdentityFacts,
        model: str,
        ctx: F.InferContext,
        candidate_nodes: Sequence[str],
        revocation_version: int = 0,
        modes: Sequence[str] | None = None,
        decision_id: str | None = None,
    ) -> InferDecision:
        """Which modes and nodes policy allows for this request, and why. `modes`: the
        modes to decide (None: all), honoured only when the policies are `mode_blind`
        (otherwise every mode is decided, so the rate is never the looser one of the mode
        a client names). Deciding `none` also decides `zk` when a permit carries @proof: a
        lazy proof runs on the nodes mode zk allows. `decision_id`: the id the request
        derived from its seed (the pipeline); None draws a fresh one (CLI tools, tests)."""
        asked = F.MODES
        if modes is not None and self.mode_blind:
            if unknown := set(modes) - set(F.MODES):
                raise ValueError(f"unknown modes {sorted(unknown)}; one of {', '.join(F.MODES)}")
            lazy = "none" in modes and bool(self._proofs)
            asked = tuple(m for m in F.MODES if m in modes or (lazy and m == "zk"))
        self._check_version(revocation_version)
        facts = self._models.get(model)
        if facts is None:
            return self._denied(f"unknown model {model!r}: deny by default", decision_id)
        fleet = self._fleet(candidate_nodes)
        if not fleet.names:
            return self._denied(
                f"no known candidate node among {list(candidate_nodes)}", decision_id
            )
        base = _Key(
            self.policy_hash,
            revocation_version,
            identity.spiffe_id,
            identity.name,
            identity.organization,
            identity.unit,
            model,
            ctx.batch_size,
            F.payload_class(ctx.payload_bytes),
            F.utc_hour(ctx.now),
            self.purpose_key(ctx.purpose),
            ctx.prompt_tokens,
            ctx.max_tokens,
            ctx.temperature_milli,
            ctx.top_p_milli,
        )
        everyone = len(frozenset().union(*fleet.providers.values()))
        classes = list(fleet.first)
        wanted = [(m, everyone if m in F.MULTI_NODE_MODES else 1, classes) for m in asked]
        groups = self._evaluate(identity, base, ctx.purpose, fleet.first, wanted)
        decided: dict[str, Mapping[int, PairResult]] = dict(zip(asked, groups, strict=True))
        # Provider independence counts the nodes actually allowed: re-decide a multi-node
        # mode with the smaller count until it holds (it only shrinks, so this ends).
        for mode in (m for m in F.MULTI_NODE_MODES if m in asked):
            count = everyone
            while True:
                ok = [c for c in classes if decided[mode][c].allowed]
                now = len(frozenset().union(*(fleet.providers[c] for c in ok)))
                if not ok or now == count:
                    break
                count = now
                again = self._evaluate(
                    identity, base, ctx.purpose, fleet.first, [(mode, count, ok)]
                )
                decided[mode] = {**decided[mode], **{c: again[0][c] for c in ok}}
        return self._assemble(facts, fleet, decided, asked, decision_id)

    def _fleet(self, candidate_nodes: Sequence[str]) -> _Fleet:
        """The known candidates by class, kept per candidate list (node facts are fixed
        per engine, and a gateway asks with the same few lists again and again)."""
        key = tuple(candidate_nodes)
        hit = self._fleets.get(key)
        if hit is not None:
            self._fleets.move_to_end(key)
            return hit
        names = tuple(n for n in dict.fromkeys(key) if n in self._nodes)
        of = {n: self._class[n] for n in names}
        first: dict[int, F.NodeFacts] = {}
        providers: dict[int, set[str]] = {}
        for n in names:
            first.setdefault(of[n], self._nodes[n])
            providers.setdefault(of[n], set()).add(self._nodes[n].provider)
        fleet = _Fleet(names, of, first, {c: frozenset(p) for c, p in providers.items()}, {})
        self._fleets[key] = fleet
        if len(self._fleets) > 256:
            self._fleets.popitem(last=False)
        return fleet

    def _evaluate(
        self,
        identity: F.IdentityFacts,
        base: _Key,
        purpose: str,
        first: Mapping[int, F.NodeFacts],
        wanted: Sequence[tuple[str, int, Sequence[int]]],
    ) -> list[dict[int, PairResult]]:
        """Cedar's answer per node class, for each (mode, provider count, classes) of
        `wanted`: from the cache, or one batched call where the node `first` gives for a
        class stands for it. `purpose` is the request's own (Cedar decides on it);
        `base.purpose` is only its cache key (`purpose_key`), under which it is shared.
        Each answer is a cached group (one per request, mode and count): read it only."""
        cache = self._cache
        groups: list[dict[int, PairResult]] = []
        todo: list[tuple[dict[int, PairResult], str, int, list[int]]] = []
        asked = 0
        for mode, count, classes in wanted:
            key = (*base, mode, count)
            group = cache.get(key)
            if group is None:
                group = cache[key] = {}
            else:
                cache.move_to_end(key)
            groups.append(group)
            missing = [c for c in classes if c not in group]
            asked += len(classes)
            if missing:
                todo.append((group, mode, count, missing))
        fresh = sum(len(t[3]) for t in todo)
        self._hits += asked - fresh
        self._misses += fresh
        if not todo:
            return groups
        if self._pieces is None:
            asks = [(mode, first[c], count) for _, mode, count, missing in todo for c in missing]
            answers = iter(self._cedar(identity, base, purpose, self._policies, asks))
            for group, _, count, missing in todo:
                for c in missing:
                    group[c] = _judge(next(answers), count, self._order)
        else:
            self._piece_results(identity, base, purpose, self._pieces, first, todo)
        for group, mode, _, missing in todo:
            for c in missing:
                if group[c].errors:
                    log.warning(
                        "policy evaluation error for %s on %s/%s (and its node class), "
                        "denied (fail closed): %s",
                        identity.spiffe_id,
                        mode,
                        first[c].name,
                        "; ".join(group[c].errors),
                    )
        self._cached += fresh
        while self._cached > self._cache_size and cache:
            self._cached -= len(cache.popitem(last=False)[1])
        return groups

    def _cedar(
        self,
        identity: F.IdentityFacts,
        base: _Key,
        purpose: str,
        policies: cedarpy.PolicySet,
        asks: Sequence[tuple[str, F.NodeFacts, int]],
        only: tuple[str, ...] | None = None,
    ) -> list[cedarpy.AuthzResult]:
        """One batched Cedar call: `policies` on each (mode, node, count) of `asks`.
        `only`: the context attributes `policies` read, all Cedar is handed when the
        schema is not (an attribute no policy reads cannot change an answer; one it reads
        is always there, so none errors for lack of one)."""
        principal, entities = self._client(identity)
        action = F.action_uid(F.INFER)
        resource = F.uid("Model", base.model)
        if self._request_schema is not None:
            only = None  # the schema wants every attribute it declares
        requests = []
        for mode, node, count in asks:
            context = {
                "mode": mode,
                "node": self._node_json[node.name],
                "batch_size": base.batch_size,
                "payload_class": base.payload_class,
                "hour": base.hour,
                "purpose": purpose,
                "distinct_providers": count,
                "prompt_tokens": base.prompt_tokens,
                "max_tokens": base.max_tokens,
                "temperature_milli": base.temperature_milli,
                "top_p_milli": base.top_p_milli,
            }
            if only is not None:
                context = {k: context[k] for k in only}
            requests.append(
                {"principal": principal, "action": action, "resource": resource, "context": context}
            )
        return list(cedarpy.is_authorized_batch(requests, policies, entities, self._request_schema))

    def _shape_accepted(self, nodes: Sequence[F.NodeFacts]) -> bool:
        """Whether the schema accepts an `infer` request as _cedar builds it (as the
        source's load-time probe checks; a source can reach the engine another way)."""
        node = nodes[0] if nodes else F.NodeFacts("probe", "eu-west", "prov-a", 1)
        request = {
            "principal": F.uid("Client", "spiffe://probe/client/p"),
            "action": F.action_uid(F.INFER),
            "resource": F.uid("Model", next(iter(self._models), "probe")),
            "context": F.infer_context("none", node, 1, "small", 0, "", 1),
        }
        answer = cedarpy.is_authorized(request, "", self._base, self._schema)
        return answer.decision != cedarpy.Decision.NoDecision

    def _piece_results(
        self,
        identity: F.IdentityFacts,
        base: _Key,
        purpose: str,
        pieces: Sequence[_Piece],
        first: Mapping[int, F.NodeFacts],
        todo: Sequence[tuple[dict[int, PairResult], str, int, list[int]]],
    ) -> None:
        """Fills each group's missing classes from the policy set's pieces (_pieces), each
        answered once per distinct part of the request it reads (cached by that part, so
        shared across callers, modes and requests), then combined as one Cedar call over
        the whole set answers (_combine)."""
        free, near = self._free, self._near
        values: dict[str, Any] = {
            "batch_size": base.batch_size,
            "payload_class": base.payload_class,
            "hour": base.hour,
            "purpose": base.purpose,
            "prompt_tokens": base.prompt_tokens,
            "max_tokens": base.max_tokens,
            "temperature_milli": base.temperature_milli,
            "top_p_milli": base.top_p_milli,
        }
        caller = (base.spiffe_id, base.name, base.organization, base.unit)
        # The node-free pieces by the caller's class (caller_class.py); the node piece by
        # the caller itself, so that an answer with errors (which may name the caller) is
        # never handed to another.
        klass: tuple[str, str, str, str] | int = caller
        if self._callers is not None:
            klass = self._callers.of(identity, self.source.identities.resolve)
        # A class-keyed answer with errors is cached under the caller itself in place of
        # the class (an error may name the caller: never handed to a class-mate), and that
        # key is looked up first: a caller that keeps erring asks once per part, not per request.
        shared = klass is not caller
        stems = [
            (
                i,
                base.policy_hash,
                base.revocation_version,
                (caller if piece.node else klass) if piece.reads.principal else (),
                base.model if piece.reads.resource else "",
            )
            for i, piece in enumerate(pieces)
        ]
        # Per todo entry: the node-free pieces' keys, and the node piece's key and answers.
        keyed: list[tuple[list[tuple[Any, ...]], tuple[Any, ...], dict[int, _Part] | None]] = []
        asks: list[dict[tuple[Any, ...], tuple[str, F.NodeFacts, int]]] = [{} for _ in pieces]
        near_asks: list[tuple[dict[int, _Part], int]] = []
        fixed: dict[int, tuple[Any, ...]] = {}  # keys of pieces that read no mode or count
        for _, mode, count, missing in todo:
            values["mode"], values["distinct_providers"] = mode, count
            keys: list[tuple[Any, ...]] = []
            nkey: tuple[Any, ...] = ()
            parts: dict[int, _Part] | None = None
            for i, piece in enumerate(pieces):
                key = fixed.get(i)
                if key is None:
                    key = (*stems[i], piece.pick(values))
                    if not piece.varies:
                        fixed[i] = key
                if not piece.node:
                    if shared and piece.reads.principal:
                        own = (*key[:3], caller, *key[4:])
                        if own in free:
                            free.move_to_end(own)
                            keys.append(own)
                            continue
                    keys.append(key)
                    if key in free:
                        free.move_to_end(key)
                    elif key not in asks[i]:
                        asks[i][key] = (mode, first[missing[0]], count)
                    continue
                nkey = key
                parts = near.get(key)
                if parts is None:
                    parts = near[key] = {}
                else:
                    near.move_to_end(key)
                if parts.keys() >= set(missing):
                    continue
                for c in missing:
                    if c not in parts and (id(parts), c) not in asks[i]:
                        asks[i][(id(parts), c)] = (mode, first[c], count)
                        near_asks.append((parts, c))
            keyed.append((keys, nkey, parts))
        mine: dict[tuple[Any, ...], _Part] = {}
        interned = self._interned
        if len(interned) > 4096:
            interned.clear()
        for i, piece in enumerate(pieces):
            if not asks[i]:
                continue
            got = self._cedar(
                identity, base, purpose, piece.policies, list(asks[i].values()), piece.context
            )
            if piece.node:
                for (parts, c), answer in zip(near_asks, got, strict=True):
                    part = _part(answer, self._order)
                    # Equal answers as one object: most classes answer alike, and below
                    # they are then combined once.
                    parts[c] = interned.setdefault(part, part)
            else:
                classed = shared and piece.reads.principal
                for key, answer in zip(asks[i], got, strict=True):
                    part = _part(answer, self._order)
                    if classed and (part.errors or part.no_decision):
                        # This request reads it by the class key; later ones by their own.
                        mine[key] = free[(*key[:3], caller, *key[4:])] = part
                    else:
                        free[key] = part
        rows, folds = self._rows, self._folds
        if len(folds) > 4096:
            folds.clear()
        for (group, _, count, missing), (keys, nkey, parts) in zip(todo, keyed, strict=True):
            answers = (
                tuple(mine[k] if k in mine else free[k] for k in keys)
                if mine
                else (tuple(map(free.__getitem__, keys)))
            )
            half = folds.get(answers)
            if half is None:
                half = folds[answers] = _fold(answers, self._order)
            if parts is None:
                whole = _combine(half, _NOTHING, count, self._order)
                group.update(dict.fromkeys(missing, whole))
                continue
            # Each class's answer is fixed by the folded half, the node piece's key and
            # the count: kept as a row, so a request that differs from an earlier one
            # only in what the node-free pieces read, and answers alike, copies it.
            row_key = (half, nkey, count)
            row = rows.get(row_key)
            if row is None:
                row = rows[row_key] = {}
            else:
                rows.move_to_end(row_key)
            if not row.keys() >= set(missing):
                combined: dict[int, PairResult] = {}
                for c in missing:
                    part = parts[c]
                    result = combined.get(id(part))
                    if result is None:
                        result = combined[id(part)] = _combine(half, part, count, self._order)
                    row[c] = result
            group.update(zip(missing, map(row.__getitem__, missing), strict=True))
        # `near` and `rows` hold an answer per node class under each key: bounded by
        # answers, as the main cache is, not by keys.
        per_class = max(1, self._cache_size // max(1, self.class_count))
        for cached, bound in ((free, self._cache_size), (near, per_class), (rows, per_class)):
            while len(cached) > bound:
                cached.popitem(last=False)

    def _assemble(
        self,
        model: F.ModelFacts,
        fleet: _Fleet,
        decided: Mapping[str, Mapping[int, PairResult]],
        evaluated: tuple[str, ...],
        decision_id: str | None = None,
    ) -> InferDecision:
        """The decision from one answer per (mode, class). Classes are visited in the
        order their first node comes in the candidates, and every node of a class has its
        answer, so every list below is what visiting each node would build."""
        modes: list[str] = []
        by_mode: dict[str, tuple[str, ...]] = {}
        permits: set[tuple[str, ...]] = set()  # determining ids of allowed pairs
        spot: F.SpotCheckRate | None = None  # strictest @spot_check behind allowed `none`
        proof: str | None = None  # strictest @proof behind allowed `none`
        forbids: list[str] = []
        errors: list[str] = []
        for mode in evaluated:
            offered = mode in model.allowed_modes  # the registry's technical limit
            results = decided[mode]
            # Each distinct answer once, in the order its first class comes: many classes
            # share one answer object, and lists below keep first occurrences only.
            answers = {id(r): r for r in map(results.__getitem__, fleet.first)}.values()
            some, every = False, True
            for r in answers:
                if r.errors:
                    errors.extend(r.errors)
                if r.allowed:
                    if offered:
                        some = True
                        permits.add(r.determining)
                        if mode == "none":
                            for pid in r.determining:
                                got = self._spot_checks.get(pid)
                                spot = got.stricter(spot) if got is not None else spot
                                proof = F.stricter_proof(proof, self._proofs.get(pid))
                else:
                    every = False
                    forbids.extend(r.determining)
            if some:
                modes.append(mode)
                if every:
                    by_mode[mode] = fleet.names
                else:
                    by_mode[mode] = fleet.only({c for c in fleet.first if results[c].allowed})
        rate: F.Rate | None = None
        if modes:
            determining = tuple(dict.fromkeys(pid for ids in sorted(permits) for pid in ids))
            for pid in determining:
                rate = self._rates.get(pid, self.default_rate).stricter(rate)
            reason = f"allowed by {', '.join(determining)}"
        else:
            determining = tuple(dict.fromkeys(forbids))
            reason = _deny_reason(determining, tuple(dict.fromkeys(errors)))
        return InferDecision(
            id=decision_id or os.urandom(16).hex(),
            allowed=bool(modes),
            modes=tuple(modes),
            nodes_by_mode=by_mode,
            rate=rate,
            determining=determining,
            errors=tuple(dict.fromkeys(errors)),
            policy_hash=self.policy_hash,
            reason=reason,
            pairs=_Pairs(evaluated, fleet, decided),
            spot_check=spot if modes else None,
            proof=proof if modes else None,
            token_budgets=F.strictest_budgets(
                b
                for pid in (determining if modes else ())
                for b in self._token_budgets.get(pid, ())
            ),
            evaluated=evaluated,
        )

    def _denied(self, reason: str, decision_id: str | None = None) -> InferDecision:
        return InferDecision(
            decision_id or os.urandom(16).hex(),
            False,
            (),
            {},
            None,
            (),
            (),
            self.policy_hash,
            reason,
            {},
        )

    def may_infer(self, identity: F.IdentityFacts, model: str) -> bool:
        """False only when no permit's scope (principal, action, resource) can match an
        inference of `model` by `identity`: denied whatever the body says. Conditions are
        not evaluated (they may read the body, which has not been read yet), so True
        promises nothing; the full decision comes after the body.

        This is what a gateway asks before reading a body: a caller with no permit for
        the model costs no body bytes and no decoding."""
        # Keyed by the caller's class for the permits' scopes (a dict lookup per caller):
        # a new caller whose groups another caller had asks Cedar nothing.
        klass = self._scope_callers.of(identity, self.source.identities.resolve)
        key: tuple[Any, ...] = (self.policy_hash, klass, model)
        hit = self._scope_cache.get(key)
        if hit is not None:
            self._scope_cache.move_to_end(key)
            return hit
        principal, entities = self._client(identity)
        request = {
            "principal": principal,
            "action": F.action_uid(F.INFER),
            "resource": F.uid("Model", model),
            "context": {},
        }
        answer = cedarpy.is_authorized(request, self._scopes, entities, None)
        ok = answer.decision == cedarpy.Decision.Allow
        self._scope_cache[key] = ok
        if len(self._scope_cache) > 4096:
            self._scope_cache.popitem(last=False)
        return ok

    # ------------------------------------------------------------------ other actions

    def authorize(
        self, identity: F.IdentityFacts, action: str, resource: F.ResourceFacts
    ) -> AuthzDecision:
        """view, admin_reload, admin_revoke, read_receipt, read_proof, read_decision. Not
        cached: these are rare, and a receipt's owner is part of each request. A `view`
        of a model the engine does not hold has no entity and is denied."""
        expected = F.RESOURCE_ACTIONS.get(action)
        if expected is None:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(F.RESOURCE_ACTIONS)}")
        if resource.type != expected:
            raise ValueError(f"{action} applies to a {expected}, not a {resource.type}")
        principal, entities = self._client(identity)
        if resource.type not in ("Gateway", "Model"):  # those are in the base entities
            delta = json.dumps([F.resource_entity(resource)])
            entities = entities.with_added_json_str(delta, self._schema)
        request = {
            "principal": principal,
            "action": F.action_uid(action),
            "resource": F.uid(resource.type, resource.id),
            "context": {},
        }
        answer = cedarpy.is_authorized(request, self._policies, entities, self._schema)
        r = _judge(answer, 0, self._order)
        blanket: tuple[str, ...] = ()
        if r.allowed and action in F.ADMIN_ACTIONS:
            # Loading refuses a permit that could grant an admin action without naming it
            # (source.admin_finding); this holds the line for a policy set that got here
            # another way: only a determining permit that names the action counts.
            naming = tuple(pid for pid in r.determining if action in (self._named.get(pid) or ()))
            blanket = tuple(pid for pid in r.determining if pid not in naming)
            r = r._replace(allowed=bool(naming), determining=naming)
        if r.errors:
            log.warning(
                "policy evaluation error for %s %s, denied: %s",
                identity.spiffe_id,
                action,
                r.errors,
            )
        if r.allowed:
            reason = f"allowed by {', '.join(r.determining)}"
        elif blanket and not r.errors:
            reason = (
                f"denied: {action} is granted only by a permit that names it, and "
                f"{', '.join(blanket)} does not (deny by default)"
            )
        else:
            reason = _deny_reason(r.determining, r.errors)
        return AuthzDecision(
            os.urandom(16).hex(),
            r.allowed,
            action,
            r.determining,
            r.errors,
            self.policy_hash,
            reason,
        )

    def past_staleness(self, decision: InferDecision, stale_s: float) -> InferDecision:
        """The decision as it stands with revocation data past its staleness budget: only
        the (mode, node) pairs a determining permit keeps with @stale ("serve": any mode,
        "verified": not `none`). Nothing kept: not allowed (deny by default)."""
        kept: dict[str, tuple[str, ...]] = {}
        for mode in decision.modes:
            nodes = tuple(
                node
                for node in decision.nodes_by_mode.get(mode, ())
                if any(
                    self._stale.get(pid) == "serve"
                    or (self._stale.get(pid) == "verified" and mode != "none")
                    for pid in decision.pairs[(mode, node)].determining
                )
            )
            if nodes:
                kept[mode] = nodes
        modes = tuple(m for m in decision.modes if m in kept)
        reason = f"revocation data is {int(stale_s)}s old, past its staleness budget: " + (
            f"{', '.join(modes)} kept by @stale" if modes else "no permit keeps serving (@stale)"
        )
        return dataclasses.replace(
            decision,
            allowed=bool(modes),
            modes=modes,
            nodes_by_mode=kept,
            reason=reason if not modes else decision.reason,
            revocation_stale_s=int(stale_s),
        )

    # ------------------------------------------------------------------ plumbing

    def _client(self, identity: F.IdentityFacts) -> tuple[dict[str, str], cedarpy.Entities]:
        """The caller's entity added to the base set; kept per caller (a small LRU)."""
        hit = self._clients.get(identity)
        if hit is None:
            grant = self.source.identities.resolve(identity)
            delta = json.dumps([F.client_entity(identity, grant)])
            hit = (identity.spiffe_id, self._base.with_added_json_str(delta, self._schema))
            self._clients[identity] = hit
            if len(self._clients) > 1024:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(identity)
        return F.uid("Client", hit[0]), hit[1]

    def _check_version(self, version: int) -> None:
        # The version is part of every key, so entries from before a bump never match;
        # dropping them on the bump frees the memory. A straggler still passing an older
        # version gets its own (unshared) entries and does not wipe the new ones.
        if self._version is None or version > self._version:
            self._cache.clear()
            self._cached = 0
            self._free.clear()
            self._near.clear()
            self._rows.clear()
            self._version = version

    def purpose_key(self, purpose: str) -> str:
        """The cache's stand-in for a purpose: the literal it equals, or `other`.

        The purpose is client text; keyed exactly, every distinct string would take its
        own entries and a client could churn the whole cache. When the policies only test
        it for (in)equality with string literals, every purpose that equals none of them
        decides alike, so all of those share one key. "=" marks a literal so that a
        literal spelled "other" cannot share the catch-all's key."""
        literals = self.purpose_literals
        if literals is None:  # a `like` or another use: only the exact value is safe
            return "=" + purpose
        return "=" + purpose if purpose in literals else "other"

    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, self._cached)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached = 0
        self._free.clear()
        self._near.clear()
        self._rows.clear()
        self._hits = self._misses = 0

    def decide_forward_for(self, identity: F.IdentityFacts, site: str, model: str) -> AuthzDecision:
        """May edge `site` act for this client on `model` (docs/ddil.md, "Forwarding to the
        core")? Only a determining permit that names `forward_for` grants it, as for the
        admin actions: a broad permit must not turn every site into every client's
        deputy. The client's own `infer` is decided afterwards, as for any request."""
        principal, entities = self._client(identity)
        request = {
            "principal": principal,
            "action": F.action_uid(F.FORWARD_FOR),
            "resource": F.uid("Model", model),
            "context": {"site": site},
        }
        if model not in self._models:
            unknown = "denied: unknown model"
            return AuthzDecision(
                os.urandom(16).hex(), False, F.FORWARD_FOR, (), (), self.policy_hash, unknown
            )
        answer = cedarpy.is_authorized(request, self._policies, entities, self._schema)
        r = _judge(answer, 0, self._order)
        naming = tuple(p for p in r.determining if F.FORWARD_FOR in (self._named.get(p) or ()))
        allowed = r.allowed and bool(naming) and not r.errors
        reason = (
            f"allowed by {', '.join(naming)}"
            if allowed
            else _deny_reason(r.determining if not r.allowed else (), r.errors)
        )
        return AuthzDecision(
            os.urandom(16).hex(),
            allowed,
            F.FORWARD_FOR,
            naming if allowed else r.determining,
            r.errors,
            self.policy_hash,
            reason,
        )


class _Fleet(NamedTuple):
    """A candidate list resolved: the known nodes in order, and by class (in the order
    each class's first node comes) its first node, which Cedar sees, and providers."""

    names: tuple[str, ...]
    of: dict[str, int]  # node -> class
    first: dict[int, F.NodeFacts]
    providers: dict[int, frozenset[str]]
    subsets: dict[frozenset[int], tuple[str, ...]]  # `only`'s answers so far

    def only(self, classes: set[int]) -> tuple[str, ...]:
        """The candidates in `classes`, in order."""
        key = frozenset(classes)
        hit = self.subsets.get(key)
        if hit is None:
            hit = tuple(n for n in self.names if self.of[n] in key)
            if len(self.subsets) < 64:
                self.subsets[key] = hit
        return hit


class _Pairs(Mapping[tuple[str, str], PairResult]):
    """InferDecision.pairs: (mode, node) -> its answer, read through the node's class
    rather than copied out per node (a fleet of hundreds would copy hundreds)."""

    __slots__ = ("_decided", "_fleet", "_modes")

    def __init__(
        self, modes: tuple[str, ...], fleet: _Fleet, decided: Mapping[str, Mapping[int, PairResult]]
    ) -> None:
        self._modes = modes
        self._fleet = fleet
        self._decided = decided

    def __getitem__(self, key: tuple[str, str]) -> PairResult:
        if not isinstance(key, tuple) or len(key) != 2:
            raise KeyError(key)
        mode, node = key
        c = self._fleet.of.get(node)
        if mode not in self._modes or c is None:
            raise KeyError(key)
        return self._decided[mode][c]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((m, n) for m in self._modes for n in self._fleet.names)

    def __len__(self) -> int:
        return len(self._modes) * len(self._fleet.names)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class _Piece(NamedTuple):
    """Some policies of the set, with what they read of a request: their answer is shared
    by every request that agrees on it. At most one piece reads the node (`node`), decided
    per class; the others never do."""

    policies: cedarpy.PolicySet
    reads: Reads
    node: bool
    varies: bool  # reads the mode or the provider count: answered per mode and count
    context: tuple[str, ...] | None  # the context attributes read (None: all of them)
    pick: Callable[[Mapping[str, Any]], tuple[Any, ...]]  # their values, the node aside


class _Part(NamedTuple):
    """Cedar's answer from part of the policy set, before the fail-closed rules."""

    no_decision: bool
    forbids: tuple[str, ...]  # the forbids that matched (Cedar names them on a deny)
    permits: tuple[str, ...]  # the permits that matched, when no forbid did
    errors: tuple[str, ...]


_NOTHING = _Part(False, (), (), ())

# The context attributes of `infer` a piece's key can hold (the node is the class).
_CONTEXT_KEYS = frozenset(
    {
        "mode",
        "node",
        "batch_size",
        "payload_class",
        "hour",
        "purpose",
        "distinct_providers",
        "prompt_tokens",
        "max_tokens",
        "temperature_milli",
        "top_p_milli",
    }
)


def _pieces(parsed: Mapping[str, Any], keys: set[str]) -> tuple[_Piece, ...] | None:
    """The policies that can match `infer`, cut by what they read, so that a request the
    cache has not seen asks Cedar only about what is new in it: the node-reading ones
    (decided per class), those that read the caller, and the rest by whether they read
    the mode or the provider count. A new batch size then costs one small request (the
    piece reading neither caller nor mode), a new caller one per mode (the caller's
    piece, where a policy in it reads the mode); the pieces that do not read the caller
    are shared by every caller. None where cutting is not understood (templates).

    A policy whose action scope is `action == ` another action cannot match an `infer`
    request (the scope is tested before its conditions, so it cannot error either) and
    is left out; `action in [...]` stays (a group may hold `infer`)."""
    if parsed.get("templates") or parsed.get("templateLinks"):
        return None
    groups: dict[tuple[bool, bool, bool], dict[str, Any]] = {}
    for pid, body in _infer_bodies(parsed).items():
        reads = policy_reads([body])
        node = node_attributes({"staticPolicies": {pid: body}}, keys) != frozenset()
        varies = reads.context is None or bool(reads.context & _MODE_DEPENDENT)
        # The caller's policies as one piece: a new caller asks all of them anyway, and
        # one piece is one Cedar call.
        caller = not node and reads.principal
        shape = (node, caller, not node and not caller and varies)
        groups.setdefault(shape, {})[pid] = body
    out = []
    for (node, _, _), bodies in sorted(groups.items(), key=lambda g: g[0]):
        reads = policy_reads(bodies.values())
        context = reads.context
        if context is not None and not context <= _CONTEXT_KEYS:
            context = None  # unknown: all of it
        reads = Reads(reads.principal, reads.resource, context)
        keyed = sorted((_CONTEXT_KEYS if context is None else context) - {"node"})
        out.append(
            _Piece(
                cedarpy.PolicySet.from_json_str(json.dumps({**parsed, "staticPolicies": bodies})),
                reads,
                node,
                context is None or bool(context & _MODE_DEPENDENT),
                None if context is None else tuple(sorted(context | ({"node"} if node else set()))),
                _picker(keyed),
            )
        )
    return tuple(out)


def _infer_bodies(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """The static policies that can match `infer`: a policy whose action scope is
    `action ==` another action cannot (the scope is tested before its conditions)."""
    infer = F.action_uid(F.INFER)
    return {
        pid: body
        for pid, body in parsed["staticPolicies"].items()
        if body["action"].get("op") != "==" or body["action"].get("entity") == infer
    }


def _picker(keys: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """The values of `keys`, as a tuple, from a mapping."""
    if not keys:
        return lambda _: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda values: (values[key],)
    return operator.itemgetter(*keys)


def _part(answer: cedarpy.AuthzResult, order: Mapping[str, int]) -> _Part:
    errors = tuple(sorted(answer.diagnostics.errors))
    if answer.decision == cedarpy.Decision.NoDecision:
        return _Part(True, (), (), errors)
    reasons = tuple(sorted(answer.diagnostics.reasons, key=lambda pid: order.get(pid, -1)))
    if answer.allowed:
        return _Part(False, (), reasons, errors)
    return _Part(False, reasons, (), errors)


def _fold(parts: Sequence[_Part], order: Mapping[str, int]) -> _Part:
    """Several pieces' answers as one piece's: any no-decision, every forbid, the permits
    (which count only where no forbid matched), every error."""
    if len(parts) == 1:
        return parts[0]
    for p in parts:
        if p.no_decision:
            return p
    forbids = tuple(pid for p in parts for pid in p.forbids)
    permits = tuple(pid for p in parts for pid in p.permits)
    errors = tuple(e for p in parts for e in p.errors)
    return _Part(
        False,
        tuple(sorted(forbids, key=lambda pid: order.get(pid, -1))),
        () if forbids else tuple(sorted(permits, key=lambda pid: order.get(pid, -1))),
        tuple(sorted(errors)),
    )


def _combine(free: _Part, node: _Part, count: int, order: Mapping[str, int]) -> PairResult:
    """What one Cedar call over both halves answers, with the fail-closed rules (as
    _judge): any forbid that matched denies and is the reason; else the permits that
    matched allow; an error anywhere denies."""
    if free.no_decision or node.no_decision:
        errors = free.errors if free.no_decision else node.errors
        return PairResult(False, (), errors or ("no decision",), count)
    errors = _merge(free.errors, node.errors, None)
    forbids = _merge(free.forbids, node.forbids, order)
    reasons = forbids or _merge(free.permits, node.permits, order)
    allowed = not forbids and bool(reasons)
    return PairResult(allowed and not errors, reasons, errors, count)


def _merge(
    a: tuple[str, ...], b: tuple[str, ...], order: Mapping[str, int] | None
) -> tuple[str, ...]:
    """Two sorted tuples as one (by file order, or as strings where `order` is None)."""
    if not a or not b:
        return a or b
    if order is None:
        return tuple(sorted(a + b))
    return tuple(sorted(a + b, key=lambda pid: order.get(pid, -1)))


def _judge(answer: cedarpy.AuthzResult, count: int, order: Mapping[str, int]) -> PairResult:
    """Cedar's result with the fail-closed rules applied."""
    errors = tuple(sorted(answer.diagnostics.errors))
    reasons = tuple(sorted(answer.diagnostics.reasons, key=lambda pid: order.get(pid, -1)))
    if answer.decision == cedarpy.Decision.NoDecision:
        return PairResult(False, (), errors or ("no decision",), count)
    return PairResult(answer.allowed and not errors, reasons, errors, count)


def _deny_reason(forbids: tuple[str, ...], errors: tuple[str, ...]) -> str:
    if errors:
        failing = sorted({m.group(1) for e in errors if (m := _ERROR_POLICY.search(e))})
        named = f" in {', '.join(failing)}" if failing else ""
        return f"denied: evaluation error{named}, which denies (fail closed): {errors[0]}"
    if forbids:
        return f"denied by {', '.join(forbids)}"
    return "denied: no policy permits this (deny by default)"


def _is_purpose(node: Any) -> bool:
    access = node.get(".") if isinstance(node, dict) else None
    return (
        isinstance(access, dict)
        and access.get("left") == {"Var": "context"}
        and access.get("attr") == "purpose"
    )


def _string(node: Any) -> str | None:
    value = node.get("Value") if isinstance(node, dict) else None
    return value if isinstance(value, str) else None


def purpose_literals(policy_set: Mapping[str, Any]) -> frozenset[str] | None:
    """The string literals the policies compare `context.purpose` with (`==`, `!=`, a
    literal set's `contains`), from Cedar's JSON form of the policy set; None if any
    policy reads the purpose (or the whole context) any other way, `like` for one, where
    two non-literal purposes may decide differently."""
    found: set[str] = set()
    other = False

    def visit(node: Any) -> None:
        nonlocal other
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        for op, arg in node.items():
            if op in ("==", "!=") and isinstance(arg, dict):
                left, right = arg.get("left"), arg.get("right")
                for a, b in ((left, right), (right, left)):
                    if _is_purpose(a) and (lit := _string(b)) is not None:
                        found.add(lit)
                        return
            if op == "contains" and isinstance(arg, dict) and _is_purpose(arg.get("right")):
                items = (
                    arg.get("left", {}).get("Set") if isinstance(arg.get("left"), dict) else None
                )
                lits = [_string(i) for i in items] if isinstance(items, list) else [None]
                if all(lit is not None for lit in lits):
                    found.update(lit for lit in lits if lit is not None)
                    return
            if op == "." and _is_purpose(node):
                other = True
                return
            if (
                op in (".", "has")
                and isinstance(arg, dict)
                and arg.get("left") == {"Var": "context"}
            ):
                return  # another context attribute, or a `has` test: not the value
            if op == "Var" and arg == "context":
                other = True  # the context as a whole (compared, passed on)
                return
            visit(arg)

    for kind in ("staticPolicies", "templates"):
        for body in policy_set.get(kind, {}).values():
            for condition in body.get("conditions", ()):
                visit(condition.get("body"))
    return None if other else frozenset(found)


def decision_record(
    decision: InferDecision | AuthzDecision,
    identity: F.IdentityFacts,
    model: str | None = None,
    mode: str | None = None,
    *,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """One JSON-able line for the decision log: who, what, which policies, never data."""
    record: dict[str, Any] = {
        "decision_id": decision.id,
        "time": (now or dt.datetime.now(dt.UTC)).isoformat(),
        "policy_hash": decision.policy_hash,
        "spiffe_id": identity.spiffe_id,
        "serial": identity.serial,
        "issuer": identity.issuer,
        "determining": list(decision.determining),
        "errors": list(decision.errors),
        "reason": decision.reason,
    }
    if isinstance(decision, InferDecision):
        allowed = decision.allowed if mode is None else mode in decision.modes
        if mode is not None:
            # This mode's rules and reason: never "allowed by ..." beside a deny.
            determining, record["reason"] = decision.for_mode(mode)
            record["determining"] = list(determining)
        nodes = decision.nodes_by_mode.get(mode, ()) if mode else ()
        record.update(
            action=F.INFER,
            model=model,
            mode=mode,
            modes=list(decision.modes),
            nodes=list(nodes),
            rate=str(decision.rate) if decision.rate else None,
        )
        if mode == "none" and decision.spot_check is not None:
            record["spot_check"] = str(decision.spot_check)
        if mode == "none" and decision.proof is not None:
            record["proof"] = decision.proof
        if decision.revocation_stale_s is not None:
            record["revocation_stale_s"] = decision.revocation_stale_s
        if decision.evaluated != F.MODES:
            # Only these were decided: `modes` says nothing of the others.
            record["evaluated"] = list(decision.evaluated)
    else:
        allowed = decision.allowed
        record["action"] = decision.action
    record["result"] = "allow" if allowed else "deny"
    return record
