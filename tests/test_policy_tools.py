"""Officer tools (#25): semantic policy diff, lint, two-person signing, sign/push flow."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.pki import PKI, load_signing_key
from gateway.policy import ModelFacts, NodeFacts, load_policy_dir
from gateway.policy.bundle import (
    BundleFacts,
    add_signature,
    build_bundle,
    load_trusted_keys,
    sign_bundle,
    verify_bundle,
)
from gateway.policy.semantic import semantic_diff

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"

# Rules that give the seeded edits something to widen (`<`, `like`, a model id).
EXTRA = """
@id("night-batch")
permit (principal in Ztgate::Group::"apps", action == Ztgate::Action::"infer", resource)
when { resource.classification == "internal" && context.hour < 6 && context.mode == "zk" };

@id("eu-partners")
permit (principal, action == Ztgate::Action::"infer", resource)
when {
  principal.organization == "Partner" && principal.unit like "eu-*" &&
  resource.classification == "public" && context.mode == "none"
};

@id("pricing-team")
permit (principal, action == Ztgate::Action::"infer", resource == Ztgate::Model::"pricer")
when { principal.unit == "Pricing" && ["none"].contains(context.mode) };
"""

Edit = Callable[[Path], None]


def replace(file: str, old: str, new: str) -> Edit:
    def edit(d: Path) -> None:
        text = (d / file).read_text()
        assert old in text, (file, old)
        (d / file).write_text(text.replace(old, new, 1))

    return edit


def identities(change: Callable[[dict[str, object]], None]) -> Edit:
    def edit(d: Path) -> None:
        raw = json.loads((d / "identities.json").read_text())
        change(raw)
        (d / "identities.json").write_text(json.dumps(raw, indent=2))

    return edit


def drop_rule(file: str, rule: str, marker_on: str | None = None) -> Edit:
    def edit(d: Path) -> None:
        blocks = (d / file).read_text().split("\n\n")
        kept = [b for b in blocks if f'@id("{rule}")' not in b]
        assert len(kept) == len(blocks) - 1
        text = "\n\n".join(kept)
        if marker_on:
            text = text.replace(f'@id("{marker_on}")', f'@removes("{rule}")\n@id("{marker_on}")')
        (d / file).write_text(text)

    return edit


def add_org(raw: dict[str, object]) -> None:
    orgs = raw["organizations"]
    assert isinstance(orgs, list)
    orgs.append({"organization": "Beta", "groups": ["apps"], "clearance": 1})


def acme_analysts(raw: dict[str, object]) -> None:
    orgs = raw["organizations"]
    assert isinstance(orgs, list)
    orgs[0]["groups"] = ["apps", "analysts"]


WIDENINGS: dict[str, Edit] = {
    "unconstrained-principal": replace(
        "10-callers.cedar", 'principal in Ztgate::Group::"apps"', "principal"
    ),
    "lt-to-le": replace("50-extra.cedar", "context.hour < 6", "context.hour <= 6"),
    "set-grows": replace(
        "10-callers.cedar", '["public", "internal"]', '["public", "internal", "confidential"]'
    ),
    "like-widened": replace("50-extra.cedar", 'like "eu-*"', 'like "e*"'),
    "forbid-removed": drop_rule(
        "20-sensitive.cedar", "restricted-needs-clearance", "restricted-only-under-mpc"
    ),
    "unit-no-certificate-carries": replace(
        "50-extra.cedar",
        'principal.unit == "Pricing"',
        '["Pricing", "Beta"].contains(principal.unit)',
    ),
    "batch-cap-raised": replace("90-guards.cedar", "batch_size > 256", "batch_size > 512"),
    "untrusted-threshold": replace("90-guards.cedar", "trust < 1", "trust < 0"),
    "one-provider-redundancy": replace(
        "90-guards.cedar", "distinct_providers < 2", "distinct_providers < 1"
    ),
    "purpose-literal": replace(
        "20-sensitive.cedar", 'context.purpose == ""', 'context.purpose == "none"'
    ),
    "residency-exception": replace(
        "30-residency.cedar",
        "unless { resource.residency.containsAny(context.node.region_prefixes) };",
        "unless { resource.residency.containsAny(context.node.region_prefixes) || "
        'context.node.region == "us-east" };',
    ),
    "org-gains-a-group": identities(acme_analysts),
    "org-no-certificate-carries": identities(add_org),
    "ownerless-models": replace(
        "10-callers.cedar",
        "resource.owner == principal.spiffe_id };",
        'resource.owner == principal.spiffe_id || resource.owner == "" };',
    ),
    "admin-action-added": replace(
        "40-admin.cedar",
        'permit (principal, action == Ztgate::Action::"admin_revoke", resource)',
        'permit (principal, action in [Ztgate::Action::"admin_revoke", '
        'Ztgate::Action::"admin_reload"], resource)',
    ),
    "read-decisions-too": replace(
        "40-admin.cedar",
        'action in [Ztgate::Action::"read_receipt", Ztgate::Action::"read_proof"],\n  resource\n)',
        'action in [Ztgate::Action::"read_receipt", Ztgate::Action::"read_proof", '
        'Ztgate::Action::"read_decision"],\n  resource\n)',
    ),
    "forbid-narrowed": replace(
        "20-sensitive.cedar",
        'context.mode == "none" };',
        'context.mode == "none" && context.node.trust < 2 };',
    ),
    "off-peak-later": replace("90-guards.cedar", "context.hour >= 8", "context.hour >= 9"),
    "mode-exception": replace(
        "20-sensitive.cedar",
        'context.mode != "mpc" };',
        'context.mode != "mpc" && context.mode != "zk" };',
    ),
    "model-id-added": replace(
        "50-extra.cedar",
        'resource == Ztgate::Model::"pricer")\nwhen { ',
        'resource)\nwhen { [Ztgate::Model::"pricer", Ztgate::Model::"pricer-v2"]'
        ".contains(resource) && ",
    ),
}


def _split_analysts(d: Path) -> None:
    text = (d / "10-callers.cedar").read_text()
    old = 'when { ["public", "internal", "confidential"].contains(resource.classification) };'
    assert old in text
    text = text.replace(
        old, 'when { ["public", "internal"].contains(resource.classification) };', 1
    )
    text += (
        '\n@id("analysts-call-confidential-2")\n@rate("120/minute")\n'
        'permit (principal in Ztgate::Group::"analysts", action == Ztgate::Action::"infer", '
        'resource)\nwhen { resource.classification == "confidential" };\n'
    )
    (d / "10-callers.cedar").write_text(text)


def _move_rule(d: Path) -> None:
    blocks = (d / "90-guards.cedar").read_text().split("\n\n")
    [cap] = [b for b in blocks if '@id("batch-size-cap")' in b]
    (d / "90-guards.cedar").write_text("\n\n".join(b for b in blocks if b is not cap))
    (d / "95-caps.cedar").write_text(cap + "\n")


def _merge_forbids(d: Path) -> None:
    drop_rule("20-sensitive.cedar", "restricted-needs-clearance")(d)
    replace(
        "20-sensitive.cedar",
        'when { resource.classification == "restricted" && context.mode != "mpc" };',
        'when { resource.classification == "restricted" && '
        '(context.mode != "mpc" || principal.clearance < 3) };',
    )(d)


REFACTORS: dict[str, Edit] = {
    "reordered-conjuncts": replace(
        "20-sensitive.cedar",
        'resource.classification == "restricted" && context.mode != "mpc"',
        'context.mode != "mpc" && resource.classification == "restricted"',
    ),
    "reordered-set": replace(
        "10-callers.cedar", '["public", "internal"]', '["internal", "public"]'
    ),
    "renamed-permit": replace("10-callers.cedar", '@id("owner-calls-own-model")', '@id("owners")'),
    "split-permit": _split_analysts,
    "negated-comparison": replace(
        "20-sensitive.cedar", "principal.clearance < 3", "!(principal.clearance >= 3)"
    ),
    "when-as-unless": replace(
        "90-guards.cedar",
        "when { context.batch_size > 256 };",
        "unless { !(context.batch_size > 256) };",
    ),
    "moved-to-another-file": _move_rule,
    "merged-forbids": _merge_forbids,
    "bound-restated": replace("90-guards.cedar", "batch_size > 256", "batch_size >= 257"),
    "swapped-equality-and-rate": replace(
        "10-callers.cedar",
        "resource.owner == principal.spiffe_id };",
        "principal.spiffe_id == resource.owner };",
    ),
}


def base(tmp_path: Path, name: str = "old") -> Path:
    d = tmp_path / name
    shutil.copytree(POLICIES, d, ignore=shutil.ignore_patterns("tests", "README.md"))
    (d / "50-extra.cedar").write_text(EXTRA)
    return d


@pytest.mark.parametrize("name", sorted(WIDENINGS))
def test_diff_reports_every_seeded_widening(tmp_path: Path, name: str) -> None:
    old = base(tmp_path)
    new = base(tmp_path, "new")
    WIDENINGS[name](new)
    diff = semantic_diff(load_policy_dir(old), load_policy_dir(new))
    assert diff.complete and not diff.unanalysed
    assert diff.newly_allowed, f"{name}: no widening found"
    assert diff.widens


@pytest.mark.parametrize("name", sorted(REFACTORS))
def test_diff_reports_no_change_for_pure_refactors(tmp_path: Path, name: str) -> None:
    old = base(tmp_path)
    new = base(tmp_path, "new")
    REFACTORS[name](new)
    diff = semantic_diff(load_policy_dir(old), load_policy_dir(new))
    assert diff.complete and not diff.unanalysed
    assert not diff.newly_allowed and not diff.newly_denied, [
        c.text for c in diff.newly_allowed + diff.newly_denied
    ]


def test_diff_finds_a_widening_only_a_later_certificate_reaches(tmp_path: Path) -> None:
    """Members of unit Pricing of an organization nobody has a certificate from yet."""
    old = base(tmp_path)
    new = base(tmp_path, "new")
    replace(
        "50-extra.cedar",
        'principal.unit == "Pricing"',
        'principal.unit == "Pricing" || principal.organization == "Beta"',
    )(new)
    diff = semantic_diff(load_policy_dir(old), load_policy_dir(new))
    assert diff.newly_allowed
    change = diff.newly_allowed[0]
    assert change.conditions["principal.organization"] == ("Beta",)
    assert "'Beta'" in change.text and "may now infer" in change.text
    assert "model 'pricer'" in change.text and "mode 'none'" in change.text


def test_cli_diff_exit_codes_json_and_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = base(tmp_path)
    same = base(tmp_path, "same")
    REFACTORS["split-permit"](same)
    assert main(["policy", "diff", str(old), str(same)]) == 0
    assert "no decision changes" in capsys.readouterr().out
    wide = base(tmp_path, "wide")
    WIDENINGS["set-grows"](wide)
    assert main(["policy", "diff", str(old), str(wide)]) == 3
    out = capsys.readouterr().out
    assert "NEWLY ALLOWED" in out and "WIDENS access" in out
    assert main(["policy", "diff", "--json", str(old), str(wide)]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["widens"] and report["newly_allowed"] and not report["newly_denied"]
    assert report["newly_allowed"][0]["conditions"]["resource.classification"] == ["confidential"]
    # Narrowing only: newly denied, exit 0.
    assert main(["policy", "diff", str(wide), str(old)]) == 0
    assert "newly denied" in capsys.readouterr().out
    # Signed bundles diff like directories, facts included.
    facts = BundleFacts(
        (ModelFacts("iris", "public", "", ("eu-",), ("none",)),),
        (NodeFacts("n1", "eu-west", "p", 1, "n1.x", "spiffe://x/node/n1"),),
    )
    key = load_signing_key(PKI.init(tmp_path / "pki").key_path("officer-policy"))
    b_old, b_new = tmp_path / "old.bundle", tmp_path / "new.bundle"
    b_old.write_bytes(
        sign_bundle(build_bundle(old, facts, 1, dt.timedelta(days=1), "0.1.0", 300), key)
    )
    more = BundleFacts((ModelFacts("iris", "public", "", ("eu-", "us-"), ("none",)),), facts.nodes)
    b_new.write_bytes(
        sign_bundle(build_bundle(old, more, 2, dt.timedelta(days=1), "0.1.0", 300), key)
    )
    assert main(["policy", "diff", str(b_old), str(b_new)]) == 3
    assert "~ model iris: residency gains us-" in capsys.readouterr().out
    assert main(["policy", "diff", str(b_old), str(same)]) == 0


def test_lint_reports_values_nothing_carries_with_did_you_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = base(tmp_path)
    shutil.copytree(POLICIES / "tests", d / "tests")
    (d / "50-extra.cedar").write_text(
        '@id("typos")\n'
        'permit (principal in Ztgate::Group::"priceing", action == Ztgate::Action::"infer",\n'
        '  resource == Ztgate::Model::"pricr")\n'
        'when { context.mode == "redundnat" && context.node.region == "eu-wset" };\n'
    )
    ids = json.loads((d / "identities.json").read_text())
    ids["clients"]["spiffe://ztgate.local/client/pat"] = {"groups": ["pricing"]}
    (d / "identities.json").write_text(json.dumps(ids))
    tests_model = json.loads((d / "tests/ALLOW/apps-public-unverified.json").read_text())
    tests_model["model"]["name"] = "pricer"
    (d / "tests/ALLOW/pricer.json").write_text(json.dumps(tests_model))
    assert main(["policy", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert re.search(
        r'50-extra.cedar:2:\d+: \[typos\] group "priceing".*did you mean "pricing"', out
    )
    assert re.search(r'50-extra.cedar:3:\d+: \[typos\] model "pricr".*did you mean "pricer"', out)
    assert re.search(
        r'50-extra.cedar:4:\d+: \[typos\] mode "redundnat".*did you mean "redundant"', out
    )
    assert re.search(r'region "eu-wset".*did you mean "eu-west"', out)
    # An attribute typo: did you mean; a syntax error: the token and its column.
    (d / "50-extra.cedar").write_text(
        '@id("typo")\npermit (principal, action == Ztgate::Action::"infer", resource)\n'
        "when { principal.clearence > 0 };\n"
    )
    assert main(["policy", "check", str(d)]) == 1
    assert "did you mean `clearance`?" in capsys.readouterr().out
    (d / "50-extra.cedar").write_text(
        '@id("syntax")\npermit (principal, action, resource is Ztgate::Model)\n'
        'when { context.mode == "none" ) };\n'
    )
    assert main(["policy", "check", str(d)]) == 1
    assert "50-extra.cedar:3:31: [syntax] cannot read this policy: unexpected token `)`" in (
        capsys.readouterr().out
    )
    assert main(["policy", "check", str(POLICIES)]) == 0


def test_explain_exits_2_on_deny(capsys: pytest.CaptureFixture[str]) -> None:
    deny = POLICIES / "tests/DENY/residency-us-node.json"
    allow = POLICIES / "tests/ALLOW/apps-public-unverified.json"
    assert main(["policy", "explain", str(deny), "--dir", str(POLICIES)]) == 2
    assert main(["policy", "explain", str(allow), "--dir", str(POLICIES)]) == 0
    capsys.readouterr()


FACTS = BundleFacts(
    (ModelFacts("iris", "public", "", ("eu-",), ("none", "redundant")),),
    (NodeFacts("n1", "eu-west", "prov-a", 1, "n1.x", "spiffe://x/node/n1"),),
)


def test_two_person_rule_counts_distinct_trusted_signatures(tmp_path: Path) -> None:
    pki = PKI.init(tmp_path / "pki")
    first = load_signing_key(pki.key_path("officer-policy"))
    second = load_signing_key(pki.key_path("receipt-signing"))
    keys = load_trusted_keys(
        [pki.key_path(n).with_suffix(".pub") for n in ("officer-policy", "receipt-signing")]
    )
    bundle = build_bundle(POLICIES, FACTS, 3, dt.timedelta(days=1), "0.1.0", 300)
    one = sign_bundle(bundle, first)
    now = dt.datetime.now(dt.UTC)

    def check(data: bytes, k: int) -> str | None:
        return verify_bundle(data, keys, now=now, running_version="0.1.0", required=k).reason

    assert check(one, 1) is None
    assert check(one, 2) == "too-few-signatures"
    with pytest.raises(ValueError, match="already signed"):
        add_signature(one, first)  # one officer twice is still one
    twice = json.loads(one)
    twice["signatures"] *= 2
    assert check(json.dumps(twice).encode(), 2) == "too-few-signatures"
    two = add_signature(one, second)
    assert check(two, 2) is None
    result = verify_bundle(two, keys, now=now, running_version="0.1.0", required=2)
    assert result.bundle is not None and len(result.bundle.signers) == 2


def _signing_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    from gateway.registry import Registry, seed_examples

    registry = tmp_path / "registry"
    seed_examples(Registry.open(registry))
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(
        "[[nodes]]\n"
        'name = "n1"\nregion = "eu-west"\nprovider = "prov-a"\n'
        'dns_name = "n1.x"\nspiffe_id = "spiffe://x/node/n1"\n'
        '[policy.models.iris]\nresidency = ["eu-"]\n'
    )
    edit = tmp_path / "policies"
    shutil.copytree(POLICIES, edit)
    return registry, nodes, edit


def test_sign_runs_the_goldens_records_the_diff_and_cosign_adds_a_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, nodes, edit = _signing_setup(tmp_path)
    pki = PKI.init(tmp_path / "pki")
    key1, key2 = pki.key_path("officer-policy"), pki.key_path("receipt-signing")
    pubs = [str(k.with_suffix(".pub")) for k in (key1, key2)]
    out = tmp_path / "bundle.json"
    sign = ["policy", "bundle", "sign", "--policies", str(edit), "--registry", str(registry)]
    sign += ["--nodes", str(nodes), "--key", str(key1), "--out", str(out)]
    assert main([*sign, "--version", "1"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    # A failing golden: refused, nothing written.
    WIDENINGS["untrusted-threshold"](edit)
    before = out.read_bytes()
    assert main([*sign, "--version", "2"]) == 1
    assert "refused: the example requests must all pass" in capsys.readouterr().out
    assert out.read_bytes() == before
    # A widening that passes the goldens: the diff against the bundle in force (--out) is
    # shown and signed into the bundle's review.
    shutil.rmtree(edit)
    shutil.copytree(POLICIES, edit)
    WIDENINGS["org-no-certificate-carries"](edit)
    assert main([*sign, "--version", "2"]) == 0
    shown = capsys.readouterr().out
    assert "NEWLY ALLOWED" in shown and "goldens:" in shown
    verify = ["policy", "bundle", "verify", str(out), "--trust-key", pubs[0]]
    verify += ["--trust-key", pubs[1], "--required", "2"]
    assert main(verify) == 1
    assert "too-few-signatures" in capsys.readouterr().out
    assert main(["policy", "bundle", "sign", "--cosign", str(out), "--key", str(key2)]) == 0
    cosign = capsys.readouterr().out
    assert "recorded diff against v1" in cosign and "WIDENS access" in cosign
    assert main(verify) == 0
    verified = capsys.readouterr().out
    assert "(2 of 2 required)" in verified and "WIDENS access" in verified


def test_push_reports_an_unreachable_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = PKI.init(tmp_path / "pki")
    olga = pki.issue("client", "olga")
    cert, key = olga.cert, olga.cert.with_suffix(".key")
    for candidate in (getattr(olga, "key", None), key):
        if isinstance(candidate, Path) and candidate.is_file():
            key = candidate
    bundle = tmp_path / "b.json"
    bundle.write_text("{}")
    args = ["policy", "push", str(bundle), "--gateway", "127.0.0.1:9"]
    args += ["--cert", str(cert), "--key", str(key), "--ca", str(pki.root_ca)]
    assert main(args) == 1
    assert "unreachable" in capsys.readouterr().out


def test_diff_of_200_policies_finishes(tmp_path: Path) -> None:
    """A functional bound only (the figure is bench/policy.py's)."""
    from bench.policy import many_policies

    old, new = many_policies(tmp_path, 200)
    start = time.monotonic()
    diff = semantic_diff(load_policy_dir(old), load_policy_dir(new))
    assert diff.complete and diff.newly_allowed
    assert time.monotonic() - start < 300


def test_every_test_policies_readme_names_exists() -> None:
    text = (POLICIES / "README.md").read_text()
    refs = re.findall(r"tests/([\w/]+\.py)::(\w+)", text)
    assert len(refs) > 20
    for file, name in refs:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{file}::{name}"
