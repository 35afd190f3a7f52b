"""Node classes and deciding only the mode asked (issue 19, "Policy flat in the fleet").

The engine decides one representative node per class (the node attributes the policies
read) and, when asked, one mode. These tests hold both to the reference: the same engine
deciding every node on its own (`node_classes=False`) and every mode, on the shipped
policies and on generated ones that read a node's name, region, provider and trust, over
a fleet whose nodes share some attributes and differ in others.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.pipeline import ModeStage, PolicyStage
from gateway.pipeline.decide import flush_decisions
from gateway.pki import PKI
from gateway.policy import (
    InferContext,
    InferDecision,
    NodeFacts,
    PolicyEngine,
    load_policy_dir,
)
from gateway.policy.engine import decision_record
from gateway.policy.facts import MODES, node_record
from gateway.policy.node_class import node_attributes
from gateway.protocol.problems import Forbidden
from tests.test_pipeline import IRIS, decode, gw, json_body
from tests.test_policy import IDENTITIES, MODELS, POLICIES, policy_dir, who

__all__ = ["gw"]  # the pipeline tests' gateway fixture, used here too

# A fleet of mixed nodes: regions, providers and trust repeat across nodes, so some
# share every attribute a policy reads and some differ in one.
REGIONS = ("eu-west", "eu-west-2", "eu-central", "us-east", "us-west")
PROVIDERS = ("prov-a", "prov-b", "prov-c", "prov-d")
FLEET = [
    NodeFacts(f"n{i}", REGIONS[i % 5], PROVIDERS[(i // 2) % 4], (1, 1, 0, 2)[i % 4])
    for i in range(24)
]
NAMES = [n.name for n in FLEET]
ONE_PROVIDER = [n.name for n in FLEET if n.provider == "prov-b"]

# Generated rules, each reading other node attributes; together with the shipped set.
READS_NAME = """
@id("no-n3-unverified")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node.name == "n3" && context.mode == "none" };
"""
READS_REGION_PROVIDER_TRUST = """
@id("no-us-confidential")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node.region like "us-*" && resource.classification == "confidential" };

@id("prov-c-no-zk")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node.provider == "prov-c" && context.mode == "zk" };

@id("trusted-redundant-for-everyone")
@rate("7/minute")
@proof("lazy")
permit (principal, action == Ztgate::Action::"infer", resource)
when { context.node has trust && context.node.trust >= 2 && context.mode != "mpc" };

@id("clearance-over-trust")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node.trust > principal.clearance + 1 && context.batch_size > 1 };

@id("prov-d-no-fraud-review")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node.provider == "prov-d" && context.purpose == "fraud review" };

@id("prov-a-apps-large")
permit (principal in Ztgate::Group::"apps", action == Ztgate::Action::"infer", resource)
when { context.node.provider == "prov-a" && context.payload_class == "large" };

@id("trust-overflow")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.batch_size > 4 && context.node.trust * 4611686018427387904 > 0 };
"""
# No rule here reads the mode (or the provider count, which differs between modes), so
# deciding the mode a client names alone gives the full decision: the engine's fast path.
MODE_BLIND = """
@id("apps-in-eu")
@rate("30/minute")
permit (principal in Ztgate::Group::"apps", action == Ztgate::Action::"infer", resource)
when { context.node.region like "eu-*" };

@id("trusted-anywhere")
@rate("7/minute")
@proof("lazy")
permit (principal, action == Ztgate::Action::"infer", resource)
when { context.node has trust && context.node.trust >= 2 };

@id("no-us-confidential")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node.region like "us-*" && resource.classification == "confidential" };
"""
# The review's attack: a mode-conditional permit with a stricter rate. Naming `none` must
# not pick the looser rate of the permits that allow `none` alone.
STRICT_REDUNDANT = """
@id("redundant-slowly")
@rate("5/minute")
permit (principal, action == Ztgate::Action::"infer", resource)
when { context.mode == "redundant" };
"""
WHOLE_RECORD = """
@id("whole-node")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.node == {"name": "n1", "region": "eu-west", "provider": "prov-a",
                        "trust": 1, "region_prefixes": ["*", "eu-", "eu-west"]} };
"""


def contexts() -> list[InferContext]:
    noon = dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)
    night = dt.datetime(2025, 1, 1, 23, tzinfo=dt.UTC)
    return [
        InferContext(1, 10, "", noon),
        InferContext(8, 10, "fraud review", noon),  # trust-overflow errors on trust 2
        InferContext(1, 3 << 20, "", night),
        InferContext(300, 10, "", noon),
    ]


def same(a: InferDecision, b: InferDecision) -> bool:
    """Equal in everything but the decision's own id, pairs in the same order."""
    return dataclasses.replace(a, id="") == dataclasses.replace(b, id="") and list(a.pairs) == list(
        b.pairs
    )


def per_node(engine: PolicyEngine, d: InferDecision, model: str) -> tuple[object, ...]:
    """The decision's summary rebuilt by visiting every (mode, node) pair on its own, as
    the engine did before node classes: what the class-wise assembly must equal."""
    offered = MODELS[model].allowed_modes
    by_mode: dict[str, tuple[str, ...]] = {}
    permits, forbids, errors = set(), [], []
    for mode in d.evaluated:
        ok = []
        for (m, node), r in d.pairs.items():
            if m != mode:
                continue
            errors.extend(r.errors)
            if r.allowed and mode in offered:
                ok.append(node)
                permits.add(r.determining)
            elif not r.allowed:
                forbids.extend(r.determining)
        if ok:
            by_mode[mode] = tuple(ok)
    if by_mode:
        determining = tuple(dict.fromkeys(p for ids in sorted(permits) for p in ids))
    else:
        determining = tuple(dict.fromkeys(forbids))
    return tuple(by_mode), by_mode, determining, tuple(dict.fromkeys(errors))


def engines(tmp_path: Path, files: dict[str, str]) -> tuple[PolicyEngine, PolicyEngine]:
    source = load_policy_dir(policy_dir(tmp_path, files)) if files else load_policy_dir(POLICIES)
    return (
        PolicyEngine(source, models=MODELS, nodes=FLEET),
        # The reference: the whole set, every node alone, the schema on every request.
        PolicyEngine(source, models=MODELS, nodes=FLEET, node_classes=False, check_requests=True),
    )


def cases(seed: int, n: int) -> list[tuple[int, str, InferContext, list[str]]]:
    """Identities, models, contexts and candidate sets: all nodes, a random subset, one
    provider only (where the multi-node modes' provider count decides)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        nodes = rng.choice([NAMES, rng.sample(NAMES, rng.randrange(1, 12)), ONE_PROVIDER])
        out.append(
            (
                rng.randrange(len(IDENTITIES)),
                rng.choice(sorted(MODELS)),
                rng.choice(contexts()),
                nodes,
            )
        )
    return out


@pytest.mark.parametrize(
    "files",
    [{}, {"60-name.cedar": READS_NAME}, {"60-attrs.cedar": READS_REGION_PROVIDER_TRUST}],
    ids=["shipped", "reads-name", "reads-region-provider-trust"],
)
def test_deciding_per_node_class_equals_deciding_every_node(
    tmp_path: Path, files: dict[str, str]
) -> None:
    classes, reference = engines(tmp_path, files)
    assert reference.class_count == len(FLEET)
    if "60-name.cedar" in files:
        assert classes.class_count == len(FLEET)  # the name read: every node its own class
    else:
        assert classes.class_count < len(FLEET)
    allowed = denied = 0
    for i, model, ctx, nodes in cases(19, 150):
        for modes in (None, *((m,) for m in MODES), ("redundant", "mpc")):
            got = classes.decide_infer(IDENTITIES[i], model, ctx, nodes, modes=modes)
            want = reference.decide_infer(IDENTITIES[i], model, ctx, nodes, modes=modes)
            assert same(got, want), (IDENTITIES[i].name, model, ctx, nodes, modes)
            summary = (got.modes, got.nodes_by_mode, got.determining, got.errors)
            assert summary == per_node(classes, want, model)
            allowed += got.allowed
            denied += not got.allowed
    assert allowed and denied  # both outcomes were compared
    # The same, answered from the cache this time.
    for i, model, ctx, nodes in cases(19, 40):
        got = classes.decide_infer(IDENTITIES[i], model, ctx, nodes)
        want = reference.decide_infer(IDENTITIES[i], model, ctx, nodes)
        assert same(got, want)
    assert classes.stats().hits > 0


def test_the_classes_follow_the_attributes_the_policies_read(tmp_path: Path) -> None:
    record = node_record(FLEET[0])
    shipped = json.loads(load_policy_dir(POLICIES).policy_set_json())
    assert node_attributes(shipped, record) == {"region_prefixes", "trust"}
    attrs = load_policy_dir(policy_dir(tmp_path / "a", {"60.cedar": READS_REGION_PROVIDER_TRUST}))
    assert node_attributes(json.loads(attrs.policy_set_json()), record) == {
        "region",
        "region_prefixes",
        "provider",
        "trust",
    }
    named = load_policy_dir(policy_dir(tmp_path / "b", {"60.cedar": READS_NAME}))
    assert "name" in (node_attributes(json.loads(named.policy_set_json()), record) or ())
    # Uses that cannot be pinned to attributes: every node its own class (fail safe).
    whole = load_policy_dir(policy_dir(tmp_path / "c", {"60.cedar": WHOLE_RECORD}))
    assert node_attributes(json.loads(whole.policy_set_json()), record) is None
    engine = PolicyEngine(whole, models=MODELS, nodes=FLEET)
    assert engine.node_attributes is None and engine.class_count == len(FLEET)
    # An attribute the record lacks (a `has` test, or one added to the record later that
    # this record does not carry) is not attributable either.
    unknown = {
        "staticPolicies": {
            "p": {
                "conditions": [
                    {
                        "kind": "when",
                        "body": {
                            "has": {
                                "left": {".": {"left": {"Var": "context"}, "attr": "node"}},
                                "attr": "site",
                            }
                        },
                    }
                ]
            }
        }
    }
    assert node_attributes(unknown, record) is None
    assert node_attributes(unknown, {**record, "site": "s1"}) == {"site"}
    # Control: the same shape on another context attribute leaves the node unread.
    other = json.loads(json.dumps(unknown).replace('"node"', '"mode"'))
    assert node_attributes(other, record) == frozenset()
    whole_context = {"staticPolicies": {"p": {"conditions": [{"body": {"Var": "context"}}]}}}
    assert node_attributes(whole_context, record) is None


def test_a_requested_mode_is_decided_alone_as_the_full_decision_decides_it(
    tmp_path: Path,
) -> None:
    source = load_policy_dir(policy_dir(tmp_path, {"60.cedar": MODE_BLIND}, only=True))
    engine = PolicyEngine(source, models=MODELS, nodes=FLEET)
    assert engine.mode_blind
    checked = 0
    for i, model, ctx, nodes in cases(7, 60):
        full = engine.decide_infer(IDENTITIES[i], model, ctx, nodes)
        for mode in MODES:
            one = engine.decide_infer(IDENTITIES[i], model, ctx, nodes, modes=(mode,))
            assert mode in one.evaluated
            assert (mode in one.modes) == (mode in full.modes)
            assert one.nodes_by_mode.get(mode) == full.nodes_by_mode.get(mode)
            assert one.for_mode(mode) == full.for_mode(mode)
            assert {k: v for k, v in one.pairs.items() if k[0] == mode} == {
                k: v for k, v in full.pairs.items() if k[0] == mode
            }
            if mode in one.modes:  # the limits the determining permits set: the same
                assert one.rate == full.rate and one.token_budgets == full.token_budgets
            checked += mode in one.modes
            if mode == "none":
                # A permit carries @proof: `zk` is decided with `none`, for the lazy proof.
                assert one.evaluated == ("none", "zk")
                assert one.nodes_by_mode.get("zk") == full.nodes_by_mode.get("zk")
                assert one.proof == full.proof and one.spot_check == full.spot_check
            else:
                assert one.evaluated == (mode,)
                for other in set(MODES) - {mode}:
                    assert one.for_mode(other) == ((), f"{other} was not evaluated")
    assert checked


def test_naming_a_mode_never_picks_a_looser_rate_when_policies_read_the_mode(
    tmp_path: Path,
) -> None:
    ctx = contexts()[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dirs = {
        "reads-mode": policy_dir(tmp_path / "a", {"60.cedar": STRICT_REDUNDANT}),
        "mode-blind": policy_dir(tmp_path / "b", {"60.cedar": MODE_BLIND}, only=True),
    }
    engines = {
        k: PolicyEngine(load_policy_dir(d), models=MODELS, nodes=FLEET) for k, d in dirs.items()
    }
    strict = engines["reads-mode"]
    assert not strict.mode_blind  # the shipped rules read the mode too
    full = strict.decide_infer(who("demo"), "m0", ctx, NAMES)
    named = strict.decide_infer(who("demo"), "m0", ctx, NAMES, modes=("none",))
    assert "redundant" in full.modes and full.rate is not None and full.rate.count == 5
    assert named.evaluated == MODES and named.rate == full.rate
    # Control, built the same way: rules that cannot tell modes apart decide the one named.
    blind = engines["mode-blind"]
    assert blind.mode_blind
    one = blind.decide_infer(who("demo"), "m0", ctx, NAMES, modes=("redundant",))
    assert one.evaluated == ("redundant",)
    assert one.rate == blind.decide_infer(who("demo"), "m0", ctx, NAMES).rate


def test_the_decision_log_names_only_the_modes_decided(tmp_path: Path) -> None:
    source = load_policy_dir(policy_dir(tmp_path, {"60.cedar": MODE_BLIND}, only=True))
    engine = PolicyEngine(source, models=MODELS, nodes=FLEET)
    ctx = contexts()[0]
    full = engine.decide_infer(who("demo"), "m0", ctx, NAMES)
    one = engine.decide_infer(who("demo"), "m0", ctx, NAMES, modes=("none",))
    assert full.allowed and one.allowed
    record = decision_record(one, who("demo"), "m0", "none")
    assert record["evaluated"] == ["none", "zk"] and record["modes"] == ["none", "zk"]
    assert "evaluated" not in decision_record(full, who("demo"), "m0", "none")  # control
    with pytest.raises(ValueError, match="unknown modes"):
        engine.decide_infer(who("demo"), "m0", ctx, NAMES, modes=("fast",))


def test_a_fleet_of_300_forms_few_classes_and_one_miss_decides_each_once(tmp_path: Path) -> None:
    rng = random.Random(3)
    fleet = [
        NodeFacts(f"s{i}", rng.choice(REGIONS), rng.choice(PROVIDERS), rng.choice((0, 1, 1, 2)))
        for i in range(300)
    ]
    source = load_policy_dir(policy_dir(tmp_path, {"60.cedar": MODE_BLIND}, only=True))
    engine = PolicyEngine(source, models=MODELS, nodes=fleet)
    assert engine.class_count == len({(n.region, n.trust) for n in fleet}) <= 15
    names = [n.name for n in fleet]
    d = engine.decide_infer(who("demo"), "m0", contexts()[0], names, modes=("none",))
    # `none` and, for the @proof permit's lazy proofs, `zk`: each class decided once.
    assert len(d.pairs) == 600 and engine.stats().misses <= 2 * engine.class_count


# --- the pipeline: a client's named mode ------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_the_policy_stage_decides_a_named_mode_alone_and_all_modes_to_refuse(
    gw: Gateway, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    fast = PolicyStage(gw.policy, gw.router, gw.revocations, offered=gw.verifiers)
    full = PolicyStage(gw.policy, gw.router, gw.revocations)  # decides every mode
    mode = ModeStage(gw.verifiers)
    ask_none = await decode(gw, pki, "demo", json_body(IRIS, **{"ztgate.verification": "none"}))
    # These rules read the mode, so naming one still decides them all: the rate is the
    # one every mode's permits set, never the looser one of the mode named.
    assert not gw.policy.engine.mode_blind
    decision = fast(ask_none)
    assert decision.evaluated == MODES and decision.rate == full(ask_none).rate
    with caplog.at_level(logging.INFO, logger="ztgate.decisions"):
        assert mode(ask_none, decision).mode == "none"
        flush_decisions()
    line = json.loads(caplog.records[-1].getMessage())
    assert "evaluated" not in line and line["result"] == "allow"
    assert line["determining"] == ["apps-call-iris"]
    # The stage does ask for the mode named: the engine narrows when the rules let it
    # (test_naming_a_mode_never_picks_a_looser_rate_when_policies_read_the_mode).
    asked: list[object] = []
    real = gw.policy.engine.decide_infer

    def spy(*args: object, **kwargs: object) -> InferDecision:
        asked.append(kwargs.get("modes"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    gw.policy.engine.decide_infer = spy  # type: ignore[method-assign]
    try:
        fast(ask_none)
        fast(await decode(gw, pki, "demo", json_body(IRIS)))  # control: no mode named
    finally:
        del gw.policy.engine.decide_infer
    assert asked == [("none",), None]
    # A named mode policy refuses: every mode is decided, and the refusal is today's.
    ask_redundant = await decode(
        gw, pki, "demo", json_body(IRIS, **{"ztgate.verification": "redundant"})
    )
    refusals = []
    for stage in (fast, full):
        decision = stage(ask_redundant)
        assert decision.evaluated == MODES
        with pytest.raises(Forbidden, match="allowed modes: none") as refused:
            mode(ask_redundant, decision)
        refusals.append((refused.value.detail, refused.value.extra))
    assert refusals[0] == refusals[1] and refusals[0][1] == {"allowed_modes": ["none"]}
