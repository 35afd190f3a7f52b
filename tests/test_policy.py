"""Cedar policy: the shipped policies, the engine's fail-closed rules, its cache, the CLI.

The property tests run the engine's own cached, batched `decide_infer` and hold it to an
uncached oracle that asks Cedar one (mode, node) at a time with plain strings, entities
and context built here by hand: testing Cedar alone would prove nothing about our code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.policy import (
    MODES,
    IdentityFacts,
    InferContext,
    ModelFacts,
    NodeFacts,
    PolicyEngine,
    PolicyError,
    PolicyInfo,
    PolicySource,
    Rate,
    ResourceFacts,
    decision_record,
    load_policy_dir,
)
from gateway.policy.facts import region_prefixes
from gateway.policy.golden import load_request, run_goldens, run_request
from gateway.policy.live import LivePolicy, Loaded, load_checked_dir

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
GOLDENS = sorted(
    f"{kind}/{p.name}"
    for kind in ("ALLOW", "DENY")
    for p in (POLICIES / "tests" / kind).glob("*.json")
)
CLIENT = "spiffe://ztgate.local/client/"
NOON = dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)


def who(name: str, org: str = "", unit: str = "") -> IdentityFacts:
    return IdentityFacts(CLIENT + name, name, org, unit, "CN=client CA", "1f")


def policy_dir(tmp_path: Path, files: dict[str, str] | None = None, only: bool = False) -> Path:
    """A copy of the shipped directory (or just its schema and identities) plus `files`."""
    d = tmp_path / "policies"
    if only:
        d.mkdir()
        for name in ("schema.cedarschema", "identities.json"):
            shutil.copy(POLICIES / name, d / name)
    else:
        shutil.copytree(POLICIES, d)
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def shipped() -> PolicySource:
    return load_policy_dir(POLICIES)


# --------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("golden", GOLDENS)
def test_golden_request(shipped: PolicySource, golden: str) -> None:
    request = load_request(POLICIES / "tests" / golden)
    outcome = run_request(shipped, request)
    assert outcome.allowed == golden.startswith("ALLOW/"), outcome.reason
    assert set(request.expect) <= set(outcome.determining), outcome.reason


def test_goldens_cover_every_shipped_policy(shipped: PolicySource) -> None:
    assert len(GOLDENS) >= 16
    report = run_goldens(shipped)
    assert report.ok and not report.uncovered
    assert {p.id for p in shipped.policies} == {k for k, v in report.coverage.items() if v}


def test_shipped_policies_load_with_ids_and_rates(shipped: PolicySource) -> None:
    ids = [p.id for p in shipped.policies]
    assert len(ids) == len(set(ids)) >= 15
    assert shipped.policy("apps-call-public-internal").rate == Rate(600, 60)  # type: ignore[union-attr]
    assert all(p.rate is None for p in shipped.policies if p.effect == "forbid")


# --------------------------------------------------------------------------- oracle


def _oracle_entities(source: PolicySource, identity: IdentityFacts, model: ModelFacts) -> list[Any]:
    grant = source.identities.resolve(identity)
    groups = [{"type": "Ztgate::Group", "id": g} for g in grant.groups]
    return [
        *({"uid": g, "attrs": {}, "parents": []} for g in groups),
        {
            "uid": {"type": "Ztgate::Client", "id": identity.spiffe_id},
            "attrs": {
                "spiffe_id": identity.spiffe_id,
                "name": identity.name,
                "organization": identity.organization,
                "unit": identity.unit,
                "roles": list(grant.roles),
                "clearance": grant.clearance,
            },
            "parents": groups,
        },
        {
            "uid": {"type": "Ztgate::Model", "id": model.name},
            "attrs": {
                "classification": model.classification,
                "owner": model.owner,
                "residency": list(model.residency),
                "allowed_modes": list(model.allowed_modes),
            },
            "parents": [],
        },
    ]


def _oracle_single(
    policies: str,
    schema: str,
    entities: list[Any],
    model: str,
    mode: str,
    node: NodeFacts,
    ctx: InferContext,
    providers: int,
    identity: IdentityFacts,
) -> tuple[bool, set[str]]:
    """One uncached Cedar call with string inputs; fail closed on errors, as specified."""
    size = ctx.payload_bytes
    prefixes = ["*"] + [node.region[: i + 1] for i, c in enumerate(node.region) if c == "-"]
    request = {
        "principal": {"type": "Ztgate::Client", "id": identity.spiffe_id},
        "action": {"type": "Ztgate::Action", "id": "infer"},
        "resource": {"type": "Ztgate::Model", "id": model},
        "context": {
            "mode": mode,
            "node": {
                "name": node.name,
                "region": node.region,
                "region_prefixes": sorted({*prefixes, node.region}),
                "provider": node.provider,
                "trust": node.trust,
            },
            "batch_size": ctx.batch_size,
            "payload_class": "small" if size <= 65536 else "medium" if size <= 1 << 20 else "large",
            "hour": ctx.now.hour if ctx.now else 12,
            "purpose": ctx.purpose,
            "distinct_providers": providers,
            "prompt_tokens": ctx.prompt_tokens,
            "max_tokens": ctx.max_tokens,
            "temperature_milli": ctx.temperature_milli,
            "top_p_milli": ctx.top_p_milli,
        },
    }
    r = cedarpy.is_authorized(request, policies, json.dumps(entities), schema)
    ids = {r.diagnostics.id_annotations_by_reason.get(p, p) for p in r.diagnostics.reasons}
    return r.allowed and not r.diagnostics.errors, ids


def oracle(
    source: PolicySource,
    identity: IdentityFacts,
    model: ModelFacts,
    nodes: list[NodeFacts],
    ctx: InferContext,
    policies: str | None = None,
) -> dict[tuple[str, str], tuple[bool, set[str]]]:
    """The spec of decide_infer, one pair per call: for redundant and mpc, providers are
    re-counted over the nodes still allowed until the count holds."""
    text = policies if policies is not None else "\n".join(p.text for p in source.policies)
    ents = _oracle_entities(source, identity, model)
    out: dict[tuple[str, str], tuple[bool, set[str]]] = {}
    for mode in MODES:
        multi = mode in ("redundant", "mpc")
        count = len({n.provider for n in nodes}) if multi else 1
        res = {
            n.name: _oracle_single(
                text, source.schema_text, ents, model.name, mode, n, ctx, count, identity
            )
            for n in nodes
        }
        while multi:
            ok = [n for n in nodes if res[n.name][0]]
            now = len({n.provider for n in ok})
            if not ok or now == count:
                break
            count = now
            for n in ok:
                res[n.name] = _oracle_single(
                    text, source.schema_text, ents, model.name, mode, n, ctx, count, identity
                )
        for n in nodes:
            allowed, ids = res[n.name]
            out[(mode, n.name)] = (allowed and mode in model.allowed_modes, ids)
    return out


NODES = [
    NodeFacts("eu-a", "eu-west", "prov-a", 1),
    NodeFacts("eu-b", "eu-central", "prov-b", 1),
    NodeFacts("eu-a2", "eu-west-2", "prov-a", 2),
    NodeFacts("us-c", "us-east", "prov-c", 1),
    NodeFacts("eu-u", "eu-north", "prov-d", 0),
    NodeFacts("us-u", "us-west", "prov-c", 0),
]
MODELS = {
    f"m{i}": ModelFacts(f"m{i}", cls, CLIENT + "bob" if i % 5 == 0 else "", res, modes)
    for i, (cls, res, modes) in enumerate(
        (cls, res, modes)
        for cls in ("public", "internal", "confidential", "restricted")
        for res in (("eu-",), ("*",), ("eu-west",), (), ("us-", "eu-west-"))
        for modes in (MODES, ("none",), ("redundant", "mpc"))
    )
}
IDENTITIES = [who(n) for n in ("demo", "alice", "carol", "olga", "bob", "mallory")] + [
    who("eve", "Acme", "Sales"),
    who("rita", "Acme", "Risk"),
]
PERMIT_ALL = (
    '@id("permit-everything")\npermit (principal, action == Ztgate::Action::"infer", resource);\n'
)
FORBIDS_ONLY_PLUS_PERMIT_ALL = "forbids"

requests = st.fixed_dictionaries(
    {
        "identity": st.sampled_from(IDENTITIES),
        "model": st.sampled_from(sorted(MODELS)),
        "nodes": st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
        "ctx": st.builds(
            InferContext,
            batch_size=st.sampled_from([1, 8, 256, 257, 1000]),
            payload_bytes=st.sampled_from([0, 65536, 65537, 1 << 20, (1 << 20) + 1, 5 << 20]),
            purpose=st.sampled_from(["", "audit"]),
            now=st.integers(0, 23).map(lambda h: dt.datetime(2025, 3, 1, h, tzinfo=dt.UTC)),
        ),
    }
)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PolicyEngine]:
    """One long-lived engine per policy set, so examples also run from its cache."""
    permissive = policy_dir(tmp_path_factory.mktemp("p"), {"95-permit-all.cedar": PERMIT_ALL})
    return {
        name: PolicyEngine(load_policy_dir(d), models=MODELS, nodes=NODES, cache_size=4096)
        for name, d in (("shipped", POLICIES), ("permit-all", permissive))
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(req=requests, version=st.integers(0, 1))
def test_engine_matches_uncached_oracle_and_forbid_always_wins(
    engines: dict[str, PolicyEngine], req: dict[str, Any], version: int
) -> None:
    identity, model, nodes, ctx = req["identity"], MODELS[req["model"]], req["nodes"], req["ctx"]
    names = [n.name for n in nodes]
    for name, engine in engines.items():
        source = engine.source
        first = engine.decide_infer(identity, model.name, ctx, names, version)
        again = engine.decide_infer(identity, model.name, ctx, names, version)  # cached
        expected = oracle(source, identity, model, nodes, ctx)
        for decision in (first, again):
            got = {(m, n): decision.node_allowed(m, n) for m in MODES for n in names}
            assert got == {k: v[0] for k, v in expected.items()}, name
            assert decision.modes == tuple(m for m in MODES if any(got[(m, n)] for n in names))
            for (m, n), (allowed, ids) in expected.items():
                if allowed:  # the permits behind an allowed pair are what it reports
                    assert set(decision.pairs[(m, n)].determining) == ids
        # Forbid wins whatever is permitted: ask Cedar with only the forbids and a
        # permit-everything; any pair that forbids deny must be denied by the engine.
        forbids = "\n".join(p.text for p in source.policies if p.effect == "forbid")
        fenced = oracle(source, identity, model, nodes, ctx, forbids + "\n" + PERMIT_ALL)
        for (m, n), (not_forbidden, _) in fenced.items():
            if not not_forbidden and model.allowed_modes and m in model.allowed_modes:
                assert not first.node_allowed(m, n), (name, m, n)
        if name == "permit-all":  # with everything permitted, only forbids deny
            assert {k: v[0] for k, v in fenced.items()} == {k: v[0] for k, v in expected.items()}
    assert all(e.stats().hits > 0 for e in engines.values())


@given(
    region=st.from_regex(r"[a-z]{1,3}(-[a-z0-9]{1,3}){0,3}", fullmatch=True),
    entry=st.from_regex(r"\*|[a-z]{1,3}(-[a-z0-9]{1,3}){0,3}-?", fullmatch=True),
)
def test_region_prefixes_implement_the_residency_rule(region: str, entry: str) -> None:
    # README: an entry ending in "-" matches regions starting with it, "*" every region,
    # any other entry exactly that region.
    spec = entry == "*" or entry == region or (entry.endswith("-") and region.startswith(entry))
    assert (entry in region_prefixes(region)) == spec


# --------------------------------------------------------------------------- fail closed


def _app_engine(source: PolicySource, residency: tuple[str, ...] = ("eu-",)) -> PolicyEngine:
    model = ModelFacts("iris", "public", "", residency, MODES)
    return PolicyEngine(source, models={"iris": model}, nodes=NODES[:2])


def test_a_forbid_that_errors_at_runtime_still_denies(tmp_path: Path) -> None:
    # Passes validation, but overflows for batch_size >= 2: Cedar skips the erroring
    # forbid and would allow; the engine denies.
    overflow = (
        '@id("overflow-guard")\n'
        'forbid (principal, action == Ztgate::Action::"infer", resource)\n'
        "when { context.batch_size * 4611686018427387904 > 0 };\n"
    )
    source = load_policy_dir(policy_dir(tmp_path, {"95-overflow.cedar": overflow}))
    engine = _app_engine(source)
    ok = engine.decide_infer(who("demo"), "iris", InferContext(1, 10, "", NOON), ["eu-a", "eu-b"])
    assert not ok.allowed and "overflow-guard" in ok.determining  # 1 * 2^62 > 0: it forbids
    d = engine.decide_infer(who("demo"), "iris", InferContext(4, 10, "", NOON), ["eu-a", "eu-b"])
    assert not d.allowed and d.modes == ()
    assert any("overflow-guard" in e for e in d.errors)
    assert "fail closed" in d.reason and "overflow-guard" in d.reason
    # Positive control: Cedar alone allows this very request.
    pair = d.pairs[("none", "eu-a")]
    assert not pair.allowed and pair.determining == ("apps-call-public-internal",)


def test_a_forbid_reading_a_missing_optional_attribute(tmp_path: Path) -> None:
    schema = (POLICIES / "schema.cedarschema").read_text()
    schema = schema.replace(
        "allowed_modes: Set<String>,", "allowed_modes: Set<String>, note?: String,"
    )
    forbid = (
        "// Models noted as withdrawn may not be called.\n"
        '@id("withdrawn")\n'
        'forbid (principal, action == Ztgate::Action::"infer", resource)\n'
        'when { resource.note == "withdrawn" };\n'
    )
    d = policy_dir(tmp_path, {"schema.cedarschema": schema, "95-withdrawn.cedar": forbid})
    # First line of defence: `check` refuses it and says how to fix it, at the right line.
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(d)
    [finding] = exc.value.findings
    assert (finding.file, finding.line, finding.policy_id) == ("95-withdrawn.cedar", 4, "withdrawn")
    assert "has" in finding.message
    # Second: were it loaded anyway, the error denies rather than skipping the forbid.
    (d / "95-withdrawn.cedar").unlink()
    good = load_policy_dir(d)
    info = dataclasses.replace(
        good.policies[-1], id="withdrawn", effect="forbid", rate=None, text=forbid.split("\n", 1)[1]
    )
    engine = _app_engine(dataclasses.replace(good, policies=(*good.policies, info)))
    dec = engine.decide_infer(who("demo"), "iris", InferContext(1, 10, "", NOON), ["eu-a", "eu-b"])
    assert not dec.allowed and any("withdrawn" in e for e in dec.errors)
    assert "fail closed" in dec.reason
    # Positive control: without that forbid, the same engine set-up allows the same request.
    ok = _app_engine(good).decide_infer(
        who("demo"), "iris", InferContext(1, 10, "", NOON), ["eu-a", "eu-b"]
    )
    assert ok.allowed and not ok.errors


def test_no_decision_is_a_deny(shipped: PolicySource) -> None:
    # A schema the gateway's context does not match: Cedar returns NoDecision.
    broken = dataclasses.replace(
        shipped, schema_text=shipped.schema_text.replace("hour: Long,", "hour: String,")
    )
    d = _app_engine(broken).decide_infer(
        who("demo"), "iris", InferContext(1, 10, "", NOON), ["eu-a"]
    )
    assert not d.allowed and d.errors and "fail closed" in d.reason
    # Positive control: the shipped schema, the same request: allowed.
    ok = _app_engine(shipped).decide_infer(
        who("demo"), "iris", InferContext(1, 10, "", NOON), ["eu-a"]
    )
    assert ok.allowed and not ok.errors


def test_schema_that_differs_from_the_gateway_context_is_refused(tmp_path: Path) -> None:
    schema = (
        (POLICIES / "schema.cedarschema")
        .read_text()
        .replace("distinct_providers: Long,", "distinct_providers: Long, weekday: Long,")
    )
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(policy_dir(tmp_path, {"schema.cedarschema": schema}))
    [f] = exc.value.findings
    assert f.file == "schema.cedarschema" and "weekday" in f.message
    assert "action infer" in schema.splitlines()[f.line - 1]


# --------------------------------------------------------------------------- check


BROKEN = """// line 1
@id("ok-one")
permit (principal, action == Ztgate::Action::"infer", resource);

@id("broken")
forbid (principal, action == Ztgate::Action::"infer", resource)
when {
  resource.classification == "restricted" &&
  context.mode !=
};
"""


def test_malformed_policy_is_reported_at_its_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(policy_dir(tmp_path, {"50-broken.cedar": BROKEN}))
    [f] = exc.value.findings
    assert (f.file, f.line, f.policy_id) == ("50-broken.cedar", 10, "broken")
    assert "unexpected token" in f.message


def test_unknown_attribute_is_reported_where_it_is_named(tmp_path: Path) -> None:
    text = (
        '@id("typo")\nforbid (principal, action == Ztgate::Action::"infer", resource)\n'
        'when { resource.clasification == "x" };\n'
    )
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(policy_dir(tmp_path, {"50-typo.cedar": text}))
    [f] = exc.value.findings
    assert (f.file, f.line, f.column, f.policy_id) == ("50-typo.cedar", 3, 16, "typo")
    assert "clasification" in f.message and "schema.cedarschema" in f.message


def test_duplicate_and_missing_ids_are_refused(tmp_path: Path) -> None:
    text = (
        '@id("residency")\npermit (principal, action == Ztgate::Action::"infer", resource)\n'
        "when { false };\n\n"
        "permit (principal, action, resource) when { false };\n"
    )
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(policy_dir(tmp_path, {"50-ids.cedar": text}))
    got = {(f.file, f.line): f.message for f in exc.value.findings}
    assert "30-residency.cedar:5" in got[("50-ids.cedar", 1)]
    assert "@id" in got[("50-ids.cedar", 5)]


def test_unknown_annotations_templates_and_bad_identities_are_refused(tmp_path: Path) -> None:
    text = (
        '@id("a")\n@rates("5/second")\npermit (principal, action == Ztgate::Action::"infer", '
        "resource) when { false };\n"
        '@id("t")\npermit (principal == ?principal, action, resource);\n'
        '@id("f")\n@rate("5/second")\nforbid (principal, action, resource) when { false };\n'
    )
    ids = '{"clients": {"spiffe://x/client/a": {"groups": ["apps"], "clearance": 7}}}'
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(policy_dir(tmp_path, {"50-x.cedar": text, "identities.json": ids}))
    msgs = [str(f) for f in exc.value.findings]
    assert any("50-x.cedar:1:" in m and "@rates" in m for m in msgs)
    assert any("50-x.cedar:4:" in m and "template" in m for m in msgs)
    assert any("50-x.cedar:6:" in m and "@rate belongs on a permit" in m for m in msgs)
    assert any("identities.json:1:" in m and "clearance" in m for m in msgs)


# --------------------------------------------------------------------------- rates


@pytest.mark.parametrize(
    ("text", "rate"),
    [("600/minute", Rate(600, 60)), ("5/second", Rate(5, 1)), ("1000/hour", Rate(1000, 3600))],
)
def test_rate_parsing(text: str, rate: Rate) -> None:
    assert Rate.parse(text) == rate and str(rate) == text


@pytest.mark.parametrize("text", ["0/minute", "ten/minute", "5/day", "5 per second", "-1/hour", ""])
def test_bad_rates_are_refused(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Rate.parse(text)
    policy = (
        '@id("r")\n@rate("{}")\npermit (principal, action == Ztgate::Action::"infer", resource)'
        " when {{ false }};\n"
    )
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(policy_dir(tmp_path / "bad", {"50-r.cedar": policy.format(text)}))
    assert [(f.line, f.policy_id) for f in exc.value.findings] == [(1, "r")]
    # Positive control: the same policy with a good rate loads, with that rate.
    good = load_policy_dir(policy_dir(tmp_path / "good", {"50-r.cedar": policy.format("5/second")}))
    assert good.policy("r").rate == Rate(5, 1)  # type: ignore[union-attr]


RATES = """
@id("fast-none")
@rate("100/second")
permit (principal, action == Ztgate::Action::"infer", resource) when { context.mode == "none" };

@id("slow-zk")
@rate("30/minute")
permit (principal, action == Ztgate::Action::"infer", resource) when { context.mode == "zk" };

@id("unannotated-mpc")
permit (principal, action == Ztgate::Action::"infer", resource) when { context.mode == "mpc" };
"""


def test_strictest_rate_wins_and_a_permit_without_rate_gets_the_default(tmp_path: Path) -> None:
    source = load_policy_dir(policy_dir(tmp_path, {"10-rates.cedar": RATES}, only=True))
    model = ModelFacts("m", "public", "", ("*",), ("none", "zk", "mpc"))
    nodes = [NodeFacts("a", "eu-west", "p1"), NodeFacts("b", "eu-west", "p2")]
    engine = PolicyEngine(source, models={"m": model}, nodes=nodes, default_rate=Rate(2, 1))
    ctx = InferContext(1, 10, "", NOON)
    assert engine.decide_infer(who("x"), "m", ctx, ["a", "b"]).rate == Rate(30, 60)  # 0.5/s
    engine = PolicyEngine(source, models={"m": model}, nodes=nodes, default_rate=Rate(10, 60))
    d = engine.decide_infer(who("x"), "m", ctx, ["a", "b"])
    assert d.modes == ("none", "zk", "mpc") and d.rate == Rate(10, 60)  # the default, stricter
    only_none = ModelFacts("m", "public", "", ("*",), ("none",))
    engine = PolicyEngine(source, models={"m": only_none}, nodes=nodes)
    assert engine.decide_infer(who("x"), "m", ctx, ["a", "b"]).rate == Rate(100, 1)


# --------------------------------------------------------------------------- cache


def test_cache_hits_and_a_revocation_bump_voids_every_cached_decision(
    shipped: PolicySource,
) -> None:
    engine = _app_engine(shipped)
    ctx = InferContext(1, 10, "", NOON)
    first = engine.decide_infer(who("demo"), "iris", ctx, ["eu-a", "eu-b"], revocation_version=7)
    pairs = len(MODES) * 2
    assert engine.stats().misses == pairs and engine.stats().hits == 0
    for _ in range(9):
        again = engine.decide_infer(who("demo"), "iris", ctx, ["eu-a", "eu-b"], 7)
        assert (again.modes, again.nodes_by_mode) == (first.modes, first.nodes_by_mode)
        assert again.id != first.id  # every decision gets its own id for the log
    s = engine.stats()
    assert (s.hits, s.misses) == (9 * pairs, pairs) and s.hit_rate == 0.9
    engine.decide_infer(who("demo"), "iris", ctx, ["eu-a", "eu-b"], revocation_version=8)
    s = engine.stats()
    assert s.misses == 2 * pairs and s.size == pairs  # all re-evaluated, old entries gone


def test_a_cached_allow_never_crosses_a_forbid_threshold(shipped: PolicySource) -> None:
    engine = _app_engine(shipped)

    def at(hour: int) -> dt.datetime:  # the last second of the hour
        return dt.datetime(2025, 1, 1, hour, 59, 59, tzinfo=dt.UTC)

    nodes = ["eu-a", "eu-b"]
    assert engine.decide_infer(
        who("demo"), "iris", InferContext(1, 1 << 20, "", at(10)), nodes
    ).allowed
    big = engine.decide_infer(
        who("demo"), "iris", InferContext(1, (1 << 20) + 1, "", at(10)), nodes
    )
    assert not big.allowed and big.determining == ("large-payloads-off-peak",)
    assert engine.decide_infer(
        who("demo"), "iris", InferContext(1, 5 << 20, "", at(7)), nodes
    ).allowed
    assert not engine.decide_infer(
        who("demo"), "iris", InferContext(1, 5 << 20, "", at(8)), nodes
    ).allowed
    assert engine.decide_infer(who("demo"), "iris", InferContext(256, 10, "", at(1)), nodes).allowed
    assert not engine.decide_infer(
        who("demo"), "iris", InferContext(257, 10, "", at(1)), nodes
    ).allowed


def test_policy_hash_is_stable_and_covers_every_input(
    tmp_path: Path, shipped: PolicySource
) -> None:
    assert load_policy_dir(POLICIES).hash == shipped.hash
    d = policy_dir(tmp_path)
    ids = json.loads((d / "identities.json").read_text())
    (d / "identities.json").write_text(json.dumps(ids))  # same content, other layout
    assert load_policy_dir(d).hash == shipped.hash
    ids["clients"][CLIENT + "new"] = {"groups": ["apps"]}
    (d / "identities.json").write_text(json.dumps(ids))
    changed = load_policy_dir(d).hash
    (d / "40-admin.cedar").write_text((d / "40-admin.cedar").read_text() + "\n// note\n")
    assert len({shipped.hash, changed, load_policy_dir(d).hash}) == 3


# --------------------------------------------------------------------------- identities


def test_identity_matching_rule(shipped: PolicySource) -> None:
    ids = shipped.identities
    assert ids.resolve(who("demo")).groups == ("apps",)
    assert ids.resolve(who("mallory")) == ids.resolve(who("mallory", "Evil", "X"))
    assert ids.resolve(who("mallory")).groups == () and ids.resolve(who("mallory")).clearance == 0
    assert ids.resolve(who("eve", "Acme", "Sales")).groups == ("apps",)
    rita = ids.resolve(who("rita", "Acme", "Risk"))  # both Acme rules: union, highest clearance
    assert rita.groups == ("analysts", "apps") and rita.clearance == 2
    assert ids.resolve(who("mallory", "acme", "Risk")).groups == ()  # exact, case matters


def test_authorize_checks_resource_types_and_the_decision_record(shipped: PolicySource) -> None:
    engine = _app_engine(shipped)
    with pytest.raises(ValueError, match="Receipt"):
        engine.authorize(who("demo"), "read_receipt", ResourceFacts("Gateway"))
    with pytest.raises(ValueError, match="unknown action"):
        engine.authorize(who("demo"), "infer", ResourceFacts("Gateway"))
    d = engine.decide_infer(who("demo"), "iris", InferContext(1, 10, "", NOON), ["eu-a", "eu-b"])
    rec = decision_record(d, who("demo"), "iris", "none")
    assert json.loads(json.dumps(rec)) == rec
    assert rec["result"] == "allow" and rec["nodes"] == ["eu-a", "eu-b"]
    assert rec["policy_hash"] == shipped.hash and rec["serial"] == "1f"
    assert rec["determining"] == ["apps-call-public-internal"] and rec["rate"] == "600/minute"
    assert decision_record(d, who("demo"), "iris", "mpc")["result"] == "deny"
    admin = engine.authorize(who("demo"), "admin_reload", ResourceFacts("Gateway"))
    assert decision_record(admin, who("demo"))["result"] == "deny"


# --------------------------------------------------------------------------- CLI


def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(POLICIES)]) == 0
    assert "OK: " in capsys.readouterr().out
    bad = policy_dir(tmp_path, {"50-broken.cedar": BROKEN})
    assert main(["policy", "check", str(bad)]) == 1
    assert f"{bad}/50-broken.cedar:10:" in capsys.readouterr().out
    assert main(["policy", "check", str(tmp_path / "nope")]) == 2


def test_cli_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "test", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "NONE" not in out and "residency" in out
    unused = (
        '@id("never-used")\npermit (principal, action == Ztgate::Action::"infer", resource)'
        " when { false };\n"
    )
    d = policy_dir(tmp_path, {"50-unused.cedar": unused})
    assert main(["policy", "test", str(d)]) == 1
    assert "never decided any example: never-used" in capsys.readouterr().out
    wrong = json.loads((d / "tests/DENY/batch-too-big.json").read_text())
    wrong["context"]["batch_size"] = 1
    (d / "50-unused.cedar").unlink()
    (d / "tests/DENY/batch-too-big.json").write_text(json.dumps(wrong))
    (d / "tests/ALLOW/garbage.json").write_text("{not json")
    assert main(["policy", "test", str(d)]) == 1
    out = capsys.readouterr().out
    assert "FAIL DENY/batch-too-big.json" in out and "FAIL ALLOW/garbage.json" in out


def test_cli_explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req = POLICIES / "tests/DENY/residency-us-node.json"
    assert (
        main(["policy", "explain", str(req), "--dir", str(POLICIES)]) == 2
    )  # a deny exits 2, as `cedar authorize`
    out = capsys.readouterr().out
    assert "decision: DENY" in out and "denied by residency" in out
    assert (
        "30-residency.cedar:5" in out and "allowed modes (cheapest first): none, redundant" in out
    )
    garbage = tmp_path / "g.json"
    garbage.write_text('{"principal": {}}')
    assert main(["policy", "explain", str(garbage)]) == 2
    assert "spiffe_id" in capsys.readouterr().err
    assert main(["policy", "explain", str(tmp_path / "missing.json")]) == 2


def test_policies_readme_names_only_tests_that_exist() -> None:
    text = (POLICIES / "README.md").read_text()
    names = re.findall(r"tests/test_policy\.py::(\w+)", text)
    assert len(names) >= 15
    here = Path(__file__).read_text()
    for name in names:
        assert re.search(rf"^def {name}\(", here, re.M), name


# --------------------------------------------------------------------------- admin by name

ADMIN_BY_ACCIDENT = (
    "// Ops may do everything to models (and, by accident, administer the gateway).\n"
    '@id("ops-everything")\n'
    'permit (principal in Ztgate::Group::"ops", action, resource);\n'
)
OPS_BY_NAME = """
@id("ops-reload")
permit (principal in Ztgate::Group::"ops", action == Ztgate::Action::"admin_reload", resource);

// Unconstrained action, but only ever on a model: cannot reach the Gateway.
@id("ops-public-models")
permit (principal in Ztgate::Group::"ops", action, resource is Ztgate::Model)
when { resource.classification == "public" };
"""
GATEWAY = ResourceFacts("Gateway")


def _with_ops(d: Path) -> Path:
    ids = json.loads((d / "identities.json").read_text())
    ids["clients"][CLIENT + "opal"] = {"groups": ["ops"]}
    (d / "identities.json").write_text(json.dumps(ids))
    return d


def test_a_permit_that_does_not_name_the_admin_actions_cannot_grant_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _with_ops(policy_dir(tmp_path, {"50-ops.cedar": ADMIN_BY_ACCIDENT}))
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(d)
    [f] = exc.value.findings
    assert (f.file, f.line, f.policy_id) == ("50-ops.cedar", 2, "ops-everything")
    assert "admin_reload" in f.message and "admin_revoke" in f.message
    assert 'action == Ztgate::Action::"infer"' in f.message  # how to fix it
    assert main(["policy", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"{d}/50-ops.cedar:2: [ops-everything] " in out and "nothing was loaded" in out
    # An action list that names no admin action cannot match one: it loads.
    listed = ADMIN_BY_ACCIDENT.replace(
        "action,", 'action in [Ztgate::Action::"read_receipt", Ztgate::Action::"read_proof"],'
    )
    (d / "50-ops.cedar").write_text(listed)
    assert load_policy_dir(d).policy("ops-everything") is not None


def test_a_permit_that_names_an_admin_action_grants_it_and_only_it(tmp_path: Path) -> None:
    """The positive control: naming admin_reload grants admin_reload, not admin_revoke; an
    unconstrained action on `resource is Model` loads (it can never reach the Gateway)."""
    source = load_policy_dir(_with_ops(policy_dir(tmp_path, {"50-ops.cedar": OPS_BY_NAME})))
    engine = _app_engine(source)
    opal = who("opal")
    reload = engine.authorize(opal, "admin_reload", GATEWAY)
    assert reload.allowed and reload.determining == ("ops-reload",)
    assert not engine.authorize(opal, "admin_revoke", GATEWAY).allowed
    d = engine.decide_infer(opal, "iris", InferContext(1, 10, "", NOON), ["eu-a", "eu-b"])
    assert d.allowed and "ops-public-models" in d.determining


def test_an_admin_decision_counts_only_from_a_permit_that_names_the_action(
    shipped: PolicySource,
) -> None:
    """Defence in depth: a policy set that never went through `check` (built here by
    hand), with a permit for everyone and every action. Cedar allows an admin action
    through it; the engine does not count it."""
    text = '@id("everyone-everything")\npermit (principal, action, resource);'
    broad = PolicyInfo("everyone-everything", "50-x.cedar", 1, "permit", None, text)
    source = dataclasses.replace(shipped, policies=(*shipped.policies, broad), hash="f" * 64)
    engine = _app_engine(source)
    for action in ("admin_reload", "admin_revoke"):
        d = engine.authorize(who("demo"), action, GATEWAY)
        assert not d.allowed and d.determining == (), d
        assert "everyone-everything" in d.reason and "names" in d.reason
        assert decision_record(d, who("demo"))["result"] == "deny"
    # A permit that names the action still grants it, and alone is the reason.
    olga = engine.authorize(who("olga"), "admin_reload", GATEWAY)
    assert olga.allowed and olga.determining == ("officers-administer",)
    oscar = engine.authorize(who("oscar"), "admin_revoke", GATEWAY)
    assert oscar.allowed and oscar.determining == ("on-call-may-revoke",)
    assert not engine.authorize(who("oscar"), "admin_reload", GATEWAY).allowed
    # What is not administration the broad permit still grants.
    log = engine.authorize(who("demo"), "read_decision", ResourceFacts("Log", "l", CLIENT + "x"))
    assert log.allowed and log.determining == ("everyone-everything",)


# --------------------------------------------------------------------------- reload

SENSITIVE = (POLICIES / "20-sensitive.cedar").read_text()
MPC_RULE = "restricted-only-under-mpc"
SENSITIVE_FORBIDS = (
    MPC_RULE,
    "confidential-needs-verification",
    "restricted-needs-clearance",
    "sensitive-needs-purpose",
)


def _without(text: str, pid: str, marker: str = "") -> str:
    """`text` without the rule `pid` (blocks are separated by blank lines), and with
    `marker` put before the first remaining rule's @id."""
    blocks = [b for b in text.split("\n\n") if f'@id("{pid}")' not in b]
    out = "\n\n".join(blocks)
    return out.replace("@id(", f"{marker}\n@id(", 1) if marker else out


def _live(d: Path) -> LivePolicy:
    def load(bundle: bytes | None) -> Loaded:
        return Loaded(_app_engine(load_checked_dir(d)), f"dir:{d}")

    return LivePolicy(load, watch=[d])


def test_a_reload_that_drops_forbid_rules_needs_a_marker_naming_each(tmp_path: Path) -> None:
    d = policy_dir(tmp_path)
    shutil.rmtree(d / "tests")  # the example requests would refuse these too: see below
    live = _live(d)
    first = live.engine.source.hash
    # A truncated file (the first step of a non-atomic save) is valid, empty policy.
    (d / "20-sensitive.cedar").write_text("")
    assert not live.reload()
    assert live.rejected == 1 and live.engine.source.hash == first
    assert live.last_error is not None and "@removes" in live.last_error
    assert all(pid in live.last_error for pid in SENSITIVE_FORBIDS), live.last_error
    # One forbid removed on purpose, but the marker names another rule: still refused.
    (d / "20-sensitive.cedar").write_text(_without(SENSITIVE, MPC_RULE, '@removes("residenc")'))
    assert not live.reload() and live.rejected == 2
    assert MPC_RULE in (live.last_error or "")
    # Marked: it takes effect.
    marked = _without(SENSITIVE, MPC_RULE, f'@removes("{MPC_RULE}")')
    (d / "20-sensitive.cedar").write_text(marked)
    assert live.reload(), live.last_error
    assert live.engine.source.hash != first and live.engine.source.policy(MPC_RULE) is None
    # Adding a forbid needs no marker; a marker left behind for a rule that is back is a
    # mistake (it would let the next removal through unmarked): refused.
    (d / "20-sensitive.cedar").write_text(marked + "\n\n" + SENSITIVE)
    assert not live.reload() and live.rejected == 3
    assert "still" in (live.last_error or "") and MPC_RULE in (live.last_error or "")
    (d / "20-sensitive.cedar").write_text(SENSITIVE)
    assert live.reload() and live.engine.source.hash == first


def test_a_reload_that_fails_a_deny_example_is_refused(tmp_path: Path) -> None:
    d = policy_dir(tmp_path)
    live = _live(d)
    first = live.engine.source.hash
    # Apps may reload policy: parses, validates, names the action, drops no forbid, but
    # tests/DENY/app-cannot-reload.json says otherwise.
    grant = (
        '@id("apps-reload")\n'
        'permit (principal in Ztgate::Group::"apps", action == Ztgate::Action::"admin_reload", '
        "resource);\n"
    )
    (d / "50-apps.cedar").write_text(grant)
    assert not live.reload()
    assert live.engine.source.hash == first
    assert "DENY/app-cannot-reload.json" in (live.last_error or ""), live.last_error
    # Control: the same edit with that example removed loads.
    (d / "tests/DENY/app-cannot-reload.json").unlink()
    assert live.reload(), live.last_error
    assert live.engine.authorize(who("demo"), "admin_reload", GATEWAY).allowed


def test_the_watcher_reloads_only_a_directory_that_has_settled(tmp_path: Path) -> None:
    d = policy_dir(tmp_path)
    live = _live(d)
    assert not live.changed()
    (d / "20-sensitive.cedar").write_text(SENSITIVE[:100])  # a save under way
    assert not live.changed()  # first sight of a change: it may still be being written
    (d / "20-sensitive.cedar").write_text(SENSITIVE + "\n")
    assert not live.changed()  # changed again since the last look
    assert live.changed()  # the same as at the last look: settled, judge it now
    assert not live.changed()  # and judged once


def test_cli_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = policy_dir(tmp_path)
    (new / "20-sensitive.cedar").write_text(_without(SENSITIVE, MPC_RULE))
    (new / "50-ops.cedar").write_text(OPS_BY_NAME)
    assert main(["policy", "diff", str(POLICIES), str(new)]) == 1
    out = capsys.readouterr().out
    assert f"- forbid {MPC_RULE}" in out and "NOT MARKED" in out
    assert "+ permit ops-reload" in out and "grants admin_reload" in out
    assert "+ permit ops-public-models" in out
    marked = _without(SENSITIVE, MPC_RULE, f'@removes("{MPC_RULE}")')
    (new / "20-sensitive.cedar").write_text(marked)
    assert main(["policy", "diff", str(POLICIES), str(new)]) == 3  # marked, but it widens
    out = capsys.readouterr().out
    assert f"- forbid {MPC_RULE}" in out and "marked by @removes" in out
    assert "~ forbid confidential-needs-verification" in out  # the marker is an edit
    assert main(["policy", "diff", str(POLICIES), str(POLICIES)]) == 0
    assert "no rule changed" in capsys.readouterr().out
