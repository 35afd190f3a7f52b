"""Caller classes (issue 19, "a new caller's policy miss at most 150 µs").

The engine keys the answers of the policies that read the caller by the caller's class
(gateway/policy/caller_class.py): its grant and the string attributes the policies can
tell apart, the caller itself wherever a policy could single it out. These tests hold
that to the whole set with the schema on every request over many callers (random grants,
organizations, model owners, rules naming a caller by uid or name, group membership),
and count Cedar requests: a second caller of a class asks none, a caller that owns the
model or is named by a rule is never folded into another's answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from gateway.policy import (
    IdentityFacts,
    InferContext,
    ModelFacts,
    NodeFacts,
    PolicyEngine,
    load_policy_dir,
)
from gateway.policy.caller_class import CallerClasses
from gateway.policy.facts import MODES, Grant
from tests.test_policy import CLIENT, NOON, policy_dir
from tests.test_policy_classes import FLEET, same

# The grants identities.json hands out: few, as in a real deployment.
GRANTS = [
    {"groups": ["apps"], "clearance": 1},
    {"groups": ["apps", "analysts"], "clearance": 2},
    {"groups": ["cleared"], "clearance": 3},
    {"groups": ["officers", "auditors"]},
    {"roles": ["on-call"], "clearance": 1},
    {"groups": ["analysts"], "roles": ["on-call"], "clearance": 2},
]
ORGS = (("Acme", "Risk"), ("Acme", "Sales"), ("Initech", ""), ("", ""))

# Rules that read the caller only in ways a class can hold: the grant, comparisons of
# its strings with literals or the model's attributes, membership, a uid named.
FOLDABLE = """
@id("named-forbid")
forbid (principal == Ztgate::Client::"spiffe://ztgate.local/client/c3",
        action == Ztgate::Action::"infer", resource);

@id("named-in-condition")
@rate("11/minute")
permit (principal, action == Ztgate::Action::"infer", resource)
when { principal == Ztgate::Client::"spiffe://ztgate.local/client/c5" && context.mode == "zk" };

@id("name-literal")
@rate("13/minute")
permit (principal, action == Ztgate::Action::"infer", resource)
when { principal.name == "c7" || ["c8", "c9"].contains(principal.name) };

@id("risk-no-none-internal")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { principal.unit == "Risk" && context.mode == "none" &&
       resource.classification == "internal" };

@id("officers-small-batches")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { principal in [Ztgate::Group::"officers", Ztgate::Group::"auditors"] &&
       context.batch_size > 4 };

@id("on-call-public")
@rate("17/minute")
permit (principal, action == Ztgate::Action::"infer", resource)
when { principal.roles.contains("on-call") && resource.classification == "public" &&
       principal.organization != "Initech" };

@id("not-the-owner")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { resource.owner != principal.spiffe_id && principal.clearance == 0 &&
       context.mode == "mpc" };
"""
# Rules that read the caller's own strings another way: every such caller its own class.
OPAQUE = """
@id("purpose-is-my-name")
@rate("19/minute")
permit (principal, action == Ztgate::Action::"infer", resource)
when { context.purpose == principal.name };

@id("spiffe-like")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { principal.spiffe_id like "*client/c1*" && context.mode == "redundant" };
"""
OVERFLOW = """
@id("clearance-overflow")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.batch_size > 4 && principal.clearance * 4611686018427387904 > 0 };
"""


def caller(i: int, rng: random.Random) -> IdentityFacts:
    org, unit = rng.choice(ORGS)
    return IdentityFacts(f"{CLIENT}c{i}", f"c{i}", org, unit, "CN=client CA", f"{i:x}")


def identities(rng: random.Random, n: int) -> dict[str, Any]:
    """Grants drawn from few values, so many callers share one; some callers have no
    entry (the organization rules alone, or nothing)."""
    clients = {}
    for i in range(n):
        if rng.random() < 0.25:
            continue
        clients[f"{CLIENT}c{i}"] = rng.choice(GRANTS)
    orgs = [
        {"organization": "Acme", "groups": ["apps"], "clearance": 1},
        {"organization": "Acme", "unit": "Risk", "groups": ["analysts"], "clearance": 2},
    ]
    return {"clients": clients, "organizations": orgs}


def models() -> dict[str, ModelFacts]:
    """One model per classification, some owned by callers of the test."""
    out = {}
    for i, cls in enumerate(("public", "internal", "confidential", "restricted")):
        owner = f"{CLIENT}c{4 * i + 2}" if i != 3 else ""
        out[f"m{i}"] = ModelFacts(f"m{i}", cls, owner, ("eu-",), MODES)
    return out


CONTEXTS = [
    InferContext(1, 10, "", NOON),
    InferContext(8, 10, "fraud review", NOON),
    InferContext(2, 10, "c4", NOON),  # a purpose equal to a caller's name
]


@pytest.mark.parametrize(
    "files",
    [{}, {"60-callers.cedar": FOLDABLE}, {"60-callers.cedar": FOLDABLE + OPAQUE + OVERFLOW}],
    ids=["shipped", "foldable", "opaque-and-errors"],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_caller_classes_decide_as_the_whole_set_with_the_schema_on_every_request(
    tmp_path: Path, files: dict[str, str], seed: int
) -> None:
    rng = random.Random(seed)
    n = 40
    files = {**files, "identities.json": json.dumps(identities(rng, n))}
    source = load_policy_dir(policy_dir(tmp_path, files))
    fleet = FLEET[:6]
    names = [x.name for x in fleet]
    fast = PolicyEngine(source, models=models(), nodes=fleet)
    slow = PolicyEngine(
        source, models=models(), nodes=fleet, node_classes=False, check_requests=True
    )
    callers = [caller(i, rng) for i in range(n)]
    rng.shuffle(callers)  # owners and named callers after others of their grant, or before
    # The classes these callers form: few where the rules let them fold (so the comparison
    # below is between folded answers and the whole set), one per caller where not.
    assert fast._callers is not None
    keys = {fast._callers.key(c, source.identities.resolve(c)) for c in callers}
    if "purpose-is-my-name" in files.get("60-callers.cedar", ""):
        assert len(keys) == n
    else:
        assert not fast._callers.opaque
        assert n - len(keys) >= 10
    allowed = denied = errors = 0
    for ctx in CONTEXTS:
        for model in sorted(models()):
            for ident in callers:
                for modes in (None, ("none",)):
                    got = fast.decide_infer(ident, model, ctx, names, modes=modes)
                    want = slow.decide_infer(ident, model, ctx, names, modes=modes)
                    assert same(got, want), (ident.name, model, ctx, modes)
                    allowed += got.allowed
                    denied += not got.allowed
                    errors += bool(got.errors)
                if ctx is CONTEXTS[0]:
                    # The scope check before the body, against an engine that never
                    # saw another caller.
                    alone = PolicyEngine(source, models=models(), nodes=fleet)
                    assert fast.may_infer(ident, model) == alone.may_infer(ident, model)
    assert allowed
    assert denied
    if "clearance-overflow" in files.get("60-callers.cedar", ""):
        assert errors  # and evaluation errors too


class Spy:
    """Counts the requests handed to the real Cedar call (a spy, not a mock)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked: list[int] = []
        batch, one = cedarpy.is_authorized_batch, cedarpy.is_authorized

        def spy(requests: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
            self.asked.append(len(requests))
            return batch(requests, *args, **kwargs)

        def single(request: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self.asked.append(1)
            return one(request, *args, **kwargs)

        monkeypatch.setattr(cedarpy, "is_authorized_batch", spy)
        monkeypatch.setattr(cedarpy, "is_authorized", single)

    def take(self) -> int:
        n = sum(self.asked)
        self.asked.clear()
        return n


def test_a_second_caller_of_a_class_asks_cedar_nothing_and_an_owner_or_a_named_caller_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # c1 and c2..c9: no identities.json entry, Acme/Sales (apps by the organization rule),
    # so all share one grant. m0 is owned by c2; FOLDABLE forbids c3 by uid and permits
    # c7 by name.
    ids = {"clients": {}, "organizations": [{"organization": "Acme", "groups": ["apps"]}]}
    files = {"60-callers.cedar": FOLDABLE, "identities.json": json.dumps(ids)}
    source = load_policy_dir(policy_dir(tmp_path, files))
    nodes = FLEET[:3]
    names = [x.name for x in nodes]
    mods = models()
    engine = PolicyEngine(source, models=mods, nodes=nodes)
    slow = PolicyEngine(source, models=mods, nodes=nodes, node_classes=False, check_requests=True)
    spy = Spy(monkeypatch)

    def c(i: int) -> IdentityFacts:
        return IdentityFacts(f"{CLIENT}c{i}", f"c{i}", "Acme", "Sales")

    ctx = InferContext(1, 10, "", NOON)
    first = engine.decide_infer(c(1), "m0", ctx, names)
    n = spy.take()
    assert first.allowed
    assert n > 0  # cold
    # A second caller with the same attributes: nothing asked, the same answer.
    d = engine.decide_infer(c(11), "m0", ctx, names)
    n = spy.take()
    assert n == 0
    assert d.modes == first.modes
    assert d.determining == first.determining
    assert same(d, slow.decide_infer(c(11), "m0", ctx, names))
    spy.take()  # the reference's requests
    assert engine.may_infer(c(1), "m0")
    n = spy.take()
    assert n > 0
    assert engine.may_infer(c(12), "m0")
    n = spy.take()
    assert n == 0  # c1's scope answer
    # The owner of m0 (c2): its own class, asked, and allowed by owner-calls-own-model.
    d = engine.decide_infer(c(2), "m0", ctx, names)
    n = spy.take()
    assert n > 0
    assert "owner-calls-own-model" in d.determining
    assert "owner-calls-own-model" not in first.determining
    # The caller forbidden by uid (c3): asked, and denied where its class-mates are not.
    d = engine.decide_infer(c(3), "m0", ctx, names)
    n = spy.take()
    assert n > 0
    assert not d.allowed
    assert "named-forbid" in d.determining
    # The caller a rule names by `name` (c7): asked, and permitted by that rule.
    d = engine.decide_infer(c(7), "m0", ctx, names)
    n = spy.take()
    assert n > 0
    assert "name-literal" in d.determining
    # Each as the whole set decides it.
    for i in (2, 3, 7):
        assert same(engine.decide_infer(c(i), "m0", ctx, names), slow.decide_infer(
            c(i), "m0", ctx, names))  # fmt: skip
    # Control: another caller of the first class after all of these: still nothing asked.
    spy.take()
    d = engine.decide_infer(c(13), "m0", ctx, names)
    n = spy.take()
    assert n == 0
    assert d.determining == first.determining


def test_an_evaluation_error_is_never_handed_to_another_caller_of_the_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error may name the caller: a class's answer with an error is kept for the caller
    # that got it, so the next caller of the class asks again.
    # Clearance 2: clearance-overflow errors on a batch over 4.
    org = {"organization": "Acme", "groups": ["apps"], "clearance": 2}
    files = {
        "60-overflow.cedar": OVERFLOW,
        "identities.json": json.dumps({"clients": {}, "organizations": [org]}),
    }
    source = load_policy_dir(policy_dir(tmp_path, files))
    nodes = FLEET[:2]
    names = [x.name for x in nodes]
    engine = PolicyEngine(source, models=models(), nodes=nodes)
    spy = Spy(monkeypatch)
    a, b = (IdentityFacts(f"{CLIENT}e{i}", f"e{i}", "Acme", "Sales") for i in (1, 2))
    big = InferContext(8, 10, "", NOON)
    d = engine.decide_infer(a, "m0", big, names)
    assert not d.allowed
    assert any("clearance-overflow" in e for e in d.errors)
    spy.take()
    d = engine.decide_infer(b, "m0", big, names)
    n = spy.take()
    assert not d.allowed
    assert n > 0  # asked again, not handed a's answer
    # Positive control: a batch no rule errors on; b's class-mate then asks nothing.
    small = InferContext(1, 10, "", NOON)
    assert engine.decide_infer(a, "m0", small, names).allowed
    spy.take()
    allowed = engine.decide_infer(b, "m0", small, names).allowed
    n = spy.take()
    assert allowed
    assert n == 0


def test_an_evaluation_error_is_cached_for_the_caller_that_got_it_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The errored answer is kept under the caller itself: its repeat asks Cedar nothing
    # (a client that can make a rule err does not make every request a fresh batch),
    # while a class-mate still asks (the error is not shared).
    org = {"organization": "Acme", "groups": ["apps"], "clearance": 2}
    files = {
        "60-overflow.cedar": OVERFLOW,
        "identities.json": json.dumps({"clients": {}, "organizations": [org]}),
    }
    source = load_policy_dir(policy_dir(tmp_path, files))
    nodes = FLEET[:2]
    names = [x.name for x in nodes]
    engine = PolicyEngine(source, models=models(), nodes=nodes)
    slow = PolicyEngine(source, models=models(), nodes=nodes, node_classes=False)
    spy = Spy(monkeypatch)
    a, b = (IdentityFacts(f"{CLIENT}r{i}", f"r{i}", "Acme", "Sales") for i in (1, 2))
    big = InferContext(8, 10, "", NOON)
    first = engine.decide_infer(a, "m0", big, names)
    cold = spy.take()
    assert cold > 0
    assert any("clearance-overflow" in e for e in first.errors)
    # A request that differs only in what no erring piece reads (not the same request,
    # which the decision cache answers): a's own errored answer, nothing asked.
    other = InferContext(8, 10, "", NOON, prompt_tokens=5)
    again = engine.decide_infer(a, "m0", other, names)
    n = spy.take()
    assert n == 0
    assert again.errors == first.errors
    assert same(again, slow.decide_infer(a, "m0", other, names))
    spy.take()  # the reference's requests
    # A class-mate: asked, and its own errors, not a's.
    d = engine.decide_infer(b, "m0", big, names)
    n = spy.take()
    assert n > 0
    assert not d.allowed
    assert same(d, slow.decide_infer(b, "m0", big, names))
    # Positive control: an answer without errors is the class's: the class-mate of a
    # caller that asked asks nothing.
    small = InferContext(1, 10, "", NOON)
    assert engine.decide_infer(a, "m0", small, names).allowed
    spy.take()
    d = engine.decide_infer(b, "m0", small, names)
    n = spy.take()
    assert d.allowed
    assert n == 0


def test_the_class_holds_what_the_policies_can_tell_apart() -> None:
    def classes(text: str, strings: set[str] | None = None) -> CallerClasses:
        est = json.loads(cedarpy.policies_to_json_str(text))
        return CallerClasses(est["staticPolicies"].values(), strings or set())

    grant = Grant(("apps",), (), 1)
    a = IdentityFacts(f"{CLIENT}a", "a", "Acme", "Sales")
    b = IdentityFacts(f"{CLIENT}b", "b", "Acme", "Sales")
    rule = "permit (principal, action, resource) when {{ {} }};"
    # Compared with the model's attribute: one class, unless the caller is the owner.
    owner = classes(rule.format("resource.owner == principal.spiffe_id"), {a.spiffe_id})
    assert owner.key(b, grant) == owner.key(IdentityFacts(f"{CLIENT}z", "z"), grant)
    assert owner.key(a, grant) != owner.key(b, grant)
    # Read another way (the context, a pattern, passed whole): the caller itself.
    for body in (
        "context.purpose == principal.name",
        'principal.spiffe_id like "*a"',
        "resource.owner == principal",
        "principal in resource",
    ):
        found = classes(rule.format(body))
        assert found.key(a, grant) != found.key(b, grant), body
    # Named by uid, in the scope or a condition: that caller alone.
    for text in (
        f'forbid (principal == Ztgate::Client::"{a.spiffe_id}", action, resource);',
        rule.format(f'principal in Ztgate::Client::"{a.spiffe_id}"'),
    ):
        named = classes(text)
        assert named.key(a, grant) != named.key(b, grant)
        assert named.key(b, grant) == named.key(IdentityFacts(f"{CLIENT}z", "z"), grant)
    # The grant always: another clearance is another class.
    plain = classes(rule.format("principal.clearance > 0"))
    assert plain.key(a, grant) == plain.key(b, grant)
    assert plain.key(a, grant) != plain.key(a, Grant(("apps",), (), 2))
    # Unread strings do not split: another organization, the same class.
    assert plain.key(a, grant) == plain.key(IdentityFacts(f"{CLIENT}i", "i", "Initech"), grant)
    # Positive control for the organization: compared with a literal, it splits.
    org = classes(rule.format('principal.organization == "Initech"'))
    assert org.key(a, grant) != org.key(IdentityFacts(f"{CLIENT}i", "i", "Initech"), grant)
    assert org.key(a, grant) == org.key(IdentityFacts(f"{CLIENT}j", "j", "Umbrella"), grant)


def test_the_fleet_bench_callers_share_one_class_on_the_shipped_policies(tmp_path: Path) -> None:
    # bench/policy.py's `caller` row: Acme/Sales strangers, one class: the second asks
    # nothing (the figure in bench/README.md rests on it).
    source = load_policy_dir(policy_dir(tmp_path))
    nodes = [NodeFacts("n1", "eu-west", "prov-a", 1), NodeFacts("n2", "eu-central", "prov-b", 1)]
    engine = PolicyEngine(source, models=models(), nodes=nodes)
    assert engine._callers is not None
    assert not engine._callers.opaque
    keys = {
        engine._callers.key(
            IdentityFacts(f"{CLIENT}new{i}", f"new{i}", "Acme", "Sales"),
            source.identities.resolve(IdentityFacts(f"{CLIENT}new{i}", f"new{i}", "Acme", "Sales")),
        )
        for i in range(50)
    }
    assert len(keys) == 1


def test_a_new_caller_of_a_class_whose_scope_answer_is_oldest_is_answered(
    tmp_path: Path,
) -> None:
    """The scope cache is keyed by class only: a full cache whose oldest entry is the
    class's answer still answers its next caller (it once raised KeyError there)."""
    source = load_policy_dir(policy_dir(tmp_path))  # the shipped rules
    engine = PolicyEngine(source, models=models(), nodes=FLEET[:3])

    def c(i: int) -> IdentityFacts:
        return IdentityFacts(f"{CLIENT}k{i}", f"k{i}", "Acme", "Sales")

    assert engine.may_infer(c(0), "m0")
    assert engine.may_infer(c(1), "m0")  # control: a class-mate while the cache has room
    for i in range(2, 2 + 4096):  # other traffic: the m0 answer becomes the oldest
        engine.may_infer(c(i), "m1")
    assert engine.may_infer(c(99_999), "m0")


def test_one_clients_many_certificates_do_not_push_other_callers_classes_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers are remembered by what their grant reads, not per certificate: one client
    with 4,097 serials is one entry, so a new caller of a long-known class still asks
    Cedar nothing afterwards; a caller of a new class does (control)."""
    ids = {
        "clients": {},
        "organizations": [
            {"organization": "Acme", "groups": ["apps"]},
            {"organization": "Other", "groups": ["apps"], "roles": ["x"]},
        ],
    }
    files = {"60-callers.cedar": FOLDABLE, "identities.json": json.dumps(ids)}
    source = load_policy_dir(policy_dir(tmp_path, files))
    names = [n.name for n in FLEET[:3]]
    engine = PolicyEngine(source, models=models(), nodes=FLEET[:3])
    ctx = InferContext(1, 10, "", NOON)

    def c(i: int, org: str = "Acme", serial: str = "") -> IdentityFacts:
        return IdentityFacts(f"{CLIENT}v{i}", f"v{i}", org, "Sales", "CN=ca", serial)

    engine.decide_infer(c(1), "m0", ctx, names)
    engine.may_infer(c(1), "m0")
    for s in range(4097):
        who = IdentityFacts(f"{CLIENT}att", "att", "Acme", "Sales", "CN=ca", f"{s:x}")
        engine.may_infer(who, "m0")
        engine.decide_infer(who, "m0", ctx, names)
    spy = Spy(monkeypatch)
    engine.decide_infer(c(3), "m0", ctx, names)
    engine.may_infer(c(3), "m0")
    assert spy.take() == 0
    engine.decide_infer(c(4, "Other"), "m0", ctx, names)
    assert spy.take() > 0
