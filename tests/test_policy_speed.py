"""A policy miss in pieces, without the schema per request (issue 19, "a policy miss at
most 150 µs").

The engine decides `infer` in pieces of the policy set, each by the part of a request it
reads (what is new in a request is all Cedar is asked about), hands Cedar only the
context attributes a piece reads, and does not hand it the schema per request: the
gateway builds every request from typed facts, and the schema is probed with that shape
when the engine is built. These tests hold the pieces to the whole set with the schema on
every request, and show that an evaluation error still denies and a schema that refuses
the gateway's shape still refuses every request.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from gateway.policy import (
    InferContext,
    NodeFacts,
    PolicyEngine,
    PolicyError,
    PolicySource,
    load_policy_dir,
)
from gateway.policy.facts import MODES
from tests.test_policy import IDENTITIES, MODELS, NOON, PERMIT_ALL, POLICIES, policy_dir, who
from tests.test_policy_classes import (
    FLEET,
    MODE_BLIND,
    READS_REGION_PROVIDER_TRUST,
    STRICT_REDUNDANT,
    WHOLE_RECORD,
    same,
)

# Errors in a piece that never reads the node, and a permit whose action scope is a list
# (kept: only `action == another` is left out of the infer pieces).
ERRORS_AND_LISTS = """
@id("batch-overflow")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.batch_size > 4 && context.batch_size * 4611686018427387904 > 0 };

@id("listed-actions")
@rate("9/minute")
permit (
  principal in Ztgate::Group::"apps",
  action in [Ztgate::Action::"infer", Ztgate::Action::"view"],
  resource
)
when { resource.classification == "public" };

@id("generative-caps")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.max_tokens > 512 && context.mode == "none" };
"""
NIGHT = dt.datetime(2025, 1, 1, 23, tzinfo=dt.UTC)
CONTEXTS = [
    InferContext(1, 10, "", NOON),
    InferContext(8, 10, "fraud review", NOON),  # batch-overflow and trust-overflow error
    InferContext(1, 3 << 20, "", NIGHT),
    InferContext(300, 10, "", NOON),
    InferContext(1, 10, "", NOON, prompt_tokens=40, max_tokens=1000, temperature_milli=700),
    InferContext(2, 10, "", NOON, prompt_tokens=40, max_tokens=100, top_p_milli=900),
]


def reference(source: PolicySource, nodes: list[NodeFacts]) -> PolicyEngine:
    """The whole set, every node alone, the schema on every request."""
    return PolicyEngine(source, models=MODELS, nodes=nodes, node_classes=False, check_requests=True)


@pytest.mark.parametrize("fleet", [FLEET[:1], FLEET[:6]], ids=["one-node", "six-nodes"])
@pytest.mark.parametrize(
    "files",
    [
        {},
        {"60-errors.cedar": ERRORS_AND_LISTS},
        {"60-attrs.cedar": READS_REGION_PROVIDER_TRUST, "61-strict.cedar": STRICT_REDUNDANT},
        {"60-blind.cedar": MODE_BLIND, "61-whole.cedar": WHOLE_RECORD},
    ],
    ids=["shipped", "errors-and-lists", "node-attrs-strict-rate", "mode-blind-whole-record"],
)
def test_the_pieces_decide_as_the_whole_set_with_the_schema_on_every_request(
    tmp_path: Path, files: dict[str, str], fleet: list[NodeFacts]
) -> None:
    source = load_policy_dir(policy_dir(tmp_path, files)) if files else load_policy_dir(POLICIES)
    fast = PolicyEngine(source, models=MODELS, nodes=fleet)
    slow = reference(source, fleet)
    assert not fast.checks_requests and slow.checks_requests
    names = [n.name for n in fleet]
    allowed = denied = errors = 0
    for identity in IDENTITIES:
        for model in sorted(MODELS)[::3]:
            for ctx in CONTEXTS:
                for modes in (None, ("none",)):
                    got = fast.decide_infer(identity, model, ctx, names, modes=modes)
                    want = slow.decide_infer(identity, model, ctx, names, modes=modes)
                    assert same(got, want), (identity.name, model, ctx, modes)
                    allowed += got.allowed
                    denied += not got.allowed
                    errors += bool(got.errors)
    assert allowed and denied  # both outcomes compared
    if files and "60-errors.cedar" in files:
        assert errors  # and evaluation errors too


def test_without_the_schema_per_request_an_evaluation_error_still_denies(tmp_path: Path) -> None:
    # An overflow in a piece that never reads the node, and one in the node piece: Cedar
    # skips an erroring forbid and would allow; the engine denies (fail closed).
    source = load_policy_dir(
        policy_dir(
            tmp_path,
            {"60-errors.cedar": ERRORS_AND_LISTS, "61-attrs.cedar": READS_REGION_PROVIDER_TRUST},
        )
    )
    engine = PolicyEngine(source, models=MODELS, nodes=FLEET)
    assert not engine.checks_requests
    names = [n.name for n in FLEET]
    d = engine.decide_infer(who("demo"), "m0", InferContext(8, 10, "", NOON), names)
    assert not d.allowed and d.modes == ()
    assert any("batch-overflow" in e for e in d.errors) and "fail closed" in d.reason
    # The node piece's error (trust 2 nodes overflow) denies those nodes alone.
    trusted = [n.name for n in FLEET if n.trust == 2]
    d = engine.decide_infer(who("demo"), "m0", InferContext(5, 10, "", NOON), trusted)
    assert any("trust-overflow" in e for e in d.errors)
    assert all(not r.allowed for r in d.pairs.values())
    # Positive control: the same caller and model, a batch no rule errors on: allowed.
    ok = engine.decide_infer(who("demo"), "m0", InferContext(1, 10, "", NOON), names)
    assert ok.allowed and not ok.errors


@pytest.mark.parametrize(
    "change",
    [("hour: Long,", "hour: decimal,"), ("purpose: String,", "purpose: ipaddr,")],
    ids=["decimal", "ipaddr"],
)
def test_a_schema_that_refuses_the_gateways_requests_is_checked_on_every_request(
    tmp_path: Path, change: tuple[str, str]
) -> None:
    # Extension types take `__extn` escapes (or the schema) to parse: where the schema
    # declares one for a value the gateway sends as a plain Long or String, evaluating
    # without the schema would see a different value. Loading refuses such a schema (the
    # source's probe); an engine given one anyway probes it too and checks every request
    # with it, so each is NoDecision and denied.
    shipped = load_policy_dir(POLICIES)
    broken = dataclasses.replace(shipped, schema_text=shipped.schema_text.replace(*change))
    assert broken.schema_text != shipped.schema_text
    with pytest.raises(PolicyError, match="the gateway computes a different context"):
        load_policy_dir(policy_dir(tmp_path, {"schema.cedarschema": broken.schema_text}))
    nodes = FLEET[:2]
    names = [n.name for n in nodes]
    engine = PolicyEngine(broken, models=MODELS, nodes=nodes)
    assert engine.checks_requests
    d = engine.decide_infer(who("demo"), "m0", InferContext(1, 10, "", NOON), names)
    assert not d.allowed and d.errors and "fail closed" in d.reason
    # Positive control: the shipped schema, the same request: allowed, and not checked.
    engine = PolicyEngine(shipped, models=MODELS, nodes=nodes)
    assert not engine.checks_requests
    ok = engine.decide_infer(who("demo"), "m0", InferContext(1, 10, "", NOON), names)
    assert ok.allowed and not ok.errors


def test_a_new_batch_size_asks_cedar_one_request_and_a_new_caller_one_per_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A spy, not a mock: it counts the requests handed to the real Cedar call.
    asked: list[int] = []
    real = cedarpy.is_authorized_batch

    def spy(requests: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        asked.append(len(requests))
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", spy)
    engine = PolicyEngine(load_policy_dir(POLICIES), models=MODELS, nodes=FLEET)
    names = [n.name for n in FLEET]
    first = engine.decide_infer(who("demo"), "m0", InferContext(1, 10, "", NOON), names)
    assert first.allowed and sum(asked) > 0  # cold: every piece asked
    asked.clear()
    d = engine.decide_infer(who("demo"), "m0", InferContext(2, 10, "", NOON), names)
    assert d.modes == first.modes and sum(asked) == 1  # only the batch-size piece
    asked.clear()
    d = engine.decide_infer(who("alice"), "m0", InferContext(2, 10, "", NOON), names)
    # Alice's grant is not demo's: a new caller class (tests/test_policy_callers.py for
    # a known one). The caller's piece is asked once per mode; the rest is shared.
    assert sum(asked) <= len(MODES) + 1
    # Control: the same request again asks nothing.
    asked.clear()
    engine.decide_infer(who("alice"), "m0", InferContext(2, 10, "", NOON), names)
    assert asked == []


# A record whose field names look like the JSON form's own keys (`__entity`, `Var`): what
# its values read must still key the pieces' answers (found by a review: the reads analysis
# took the field for an entity literal or a variable and never looked at its value).
HIDDEN_READS = {
    "principal-under-__entity": """
@id("cleared-only")
permit (principal, action == Ztgate::Action::"infer", resource)
when { {"__entity": principal.clearance >= 3}["__entity"] };
""",
    "principal-under-Var": """
@id("cleared-only")
permit (principal, action == Ztgate::Action::"infer", resource)
when { {"Var": principal.clearance >= 3}["Var"] };
""",
    "context-under-Var": """
@id("no-none")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { {"Var": context has mode && context.mode == "none"}["Var"] };
"""
    + PERMIT_ALL,
    "resource-under-__entity": """
@id("no-restricted")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { {"__entity": resource.classification == "restricted"}["__entity"] };
"""
    + PERMIT_ALL,
}


@pytest.mark.parametrize("rules", sorted(HIDDEN_READS))
def test_a_record_field_named_like_the_json_forms_keys_hides_nothing_from_the_pieces(
    tmp_path: Path, rules: str
) -> None:
    src = load_policy_dir(policy_dir(tmp_path, {"70-probe.cedar": HIDDEN_READS[rules]}, only=True))
    nodes = FLEET[:3]
    names = [n.name for n in nodes]
    fast = PolicyEngine(src, models=MODELS, nodes=nodes)
    whole = PolicyEngine(src, models=MODELS, nodes=nodes, node_classes=False, check_requests=True)
    ctx = InferContext(1, 10, "", NOON)
    # The cleared caller first: a piece keyed without the caller would hand its permit on.
    callers = [who("carol"), *IDENTITIES]
    allowed = denied = 0
    for model in sorted(MODELS):
        for ident in callers:
            got = fast.decide_infer(ident, model, ctx, names)
            want = whole.decide_infer(ident, model, ctx, names)
            assert same(got, want), (rules, ident.name, model)
            allowed += bool(want.modes)
            denied += not want.modes
    assert allowed and denied  # the rule decides both ways on these cases
