"""Signed policy bundles: every refusal comes from a real mutation of a real signed file.

The point of a bundle is that nobody without an officer's key can change what policy
decides, and that includes the facts it decides on (a node's region, a model's
classification): those are relabelled inside the signed payload here and must fail.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.cli import main
from gateway.config import TLS, Config, NodeConfig, PolicyConfig
from gateway.pki import PKI, load_signing_key, signing_key_id
from gateway.policy import ModelFacts, NodeFacts, PolicyError, load_policy_dir
from gateway.policy.bundle import (
    PAYLOAD_TYPE,
    REASONS,
    Bundle,
    BundleFacts,
    BundleResult,
    build_bundle,
    compare_versions,
    facts_from,
    pae,
    sign_bundle,
    verify_bundle,
)
from gateway.policy.live import ACCEPTED_BUNDLE, LivePolicy, bundle_loader
from gateway.registry import Registry, seed_examples

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
NOW = dt.datetime(2025, 6, 1, 12, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
OWNER = "spiffe://ztgate.local/client/alice"

FACTS = BundleFacts(
    models=(
        ModelFacts("iris", "public", "", ("eu-",), ("none", "redundant", "zk")),
        ModelFacts("risk", "restricted", OWNER, ("eu-west",), ("redundant", "mpc")),
    ),
    nodes=(
        NodeFacts("n1", "eu-west", "prov-a", 1, "n1.node.x", "spiffe://x/node/n1"),
        NodeFacts("n2", "eu-central", "prov-b", 2, "n2.node.x", "spiffe://x/node/n2"),
        NodeFacts("n3", "us-east", "prov-c", 0, "n3.node.x", "spiffe://x/node/n3"),
    ),
)

BROKEN = """@id("broken")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { context.mode != };
"""


@dataclasses.dataclass
class Officer:
    key: Ed25519PrivateKey
    key_path: Path
    pub_path: Path

    @property
    def trusted(self) -> dict[str, Any]:
        pub = self.key.public_key()
        return {signing_key_id(pub): pub}


@pytest.fixture(scope="module")
def officer(tmp_path_factory: pytest.TempPathFactory) -> Officer:
    pki = PKI.init(tmp_path_factory.mktemp("pki"))
    path = pki.key_path("officer-policy")
    return Officer(load_signing_key(path), path, path.with_suffix(".pub"))


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return build_bundle(POLICIES, FACTS, 7, 30 * DAY, "0.1.0", 300, now=NOW)


@pytest.fixture(scope="module")
def signed(bundle: Bundle, officer: Officer) -> bytes:
    return sign_bundle(bundle, officer.key)


def check(
    data: bytes, officer: Officer, *, now: dt.datetime = NOW, running: str = "0.1.0", **kw: Any
) -> BundleResult:
    return verify_bundle(data, officer.trusted, now=now, running_version=running, **kw)


def refused(result: BundleResult, reason: str) -> str:
    assert not result.ok and result.bundle is None, result
    assert result.reason == reason, result
    return result.message


def envelope(data: bytes) -> dict[str, Any]:
    env: dict[str, Any] = json.loads(data)
    return env


def payload_of(data: bytes) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(base64.b64decode(envelope(data)["payload"]))
    return body


def with_payload(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Change the signed payload and re-encode it, keeping the old signatures."""
    env, body = envelope(data), payload_of(data)
    edit(body)
    env["payload"] = base64.b64encode(rfc8785.dumps(body)).decode()
    return json.dumps(env).encode()


# --------------------------------------------------------------------------- round trip


def test_round_trip_gives_back_the_bundle_and_the_same_policy(
    bundle: Bundle, signed: bytes, officer: Officer
) -> None:
    result = check(signed, officer)
    assert result.ok and result.reason is None and result.source is not None
    got = result.bundle
    assert got == dataclasses.replace(
        bundle, signer_key_id=signing_key_id(officer.key.public_key())
    )
    assert got.facts.node("n3") == NodeFacts(
        "n3", "us-east", "prov-c", 0, "n3.node.x", "spiffe://x/node/n3"
    )
    assert got.facts.model("risk") == FACTS.models[1]
    # the policy as loaded from the bundle is the policy directory, hash for hash
    shipped = load_policy_dir(POLICIES)
    assert result.source.hash == shipped.hash == got.policy_source().hash == got.policy_hash
    assert [p.id for p in result.source.policies] == [p.id for p in shipped.policies]
    assert set(got.policy_files) == {"schema.cedarschema", "identities.json", *shipped.files}
    # the envelope is DSSE: type, payload (JCS bytes), signature over PAE(type, payload)
    env = envelope(signed)
    assert env["payloadType"] == PAYLOAD_TYPE
    body = base64.b64decode(env["payload"])
    assert body == rfc8785.dumps(json.loads(body))
    officer.key.public_key().verify(
        base64.b64decode(env["signatures"][0]["sig"]), pae(PAYLOAD_TYPE, body)
    )
    # deterministic: the same bundle signs to the same bytes
    assert sign_bundle(bundle, officer.key) == signed
    assert set(REASONS) == {
        "malformed",
        "unsigned",
        "untrusted-key",
        "bad-signature",
        "expired",
        "not-yet-valid",
        "rollback",
        "gateway-too-old",
        "invalid-policy",
        "too-few-signatures",
    }


def test_policy_source_into_a_directory(bundle: Bundle, tmp_path: Path) -> None:
    source = bundle.policy_source(tmp_path / "live")
    assert source.directory == tmp_path / "live"
    assert source.hash == load_policy_dir(POLICIES).hash


def test_a_second_signature_by_an_untrusted_key_does_not_matter(
    bundle: Bundle, officer: Officer
) -> None:
    other = Ed25519PrivateKey.generate()
    both = sign_bundle(bundle, other, officer.key)
    assert check(both, officer).ok
    assert len(envelope(both)["signatures"]) == 2


# --------------------------------------------------------------------------- refusals


def test_a_flipped_payload_byte_is_a_bad_signature(signed: bytes, officer: Officer) -> None:
    env = envelope(signed)
    body = bytearray(base64.b64decode(env["payload"]))
    body[len(body) // 2] ^= 0x01
    env["payload"] = base64.b64encode(bytes(body)).decode()
    refused(check(json.dumps(env).encode(), officer), "bad-signature")


@pytest.mark.parametrize(
    "relabel",
    [
        pytest.param(lambda p: p["facts"]["nodes"][2].update(region="eu-west"), id="node-region"),
        pytest.param(lambda p: p["facts"]["nodes"][2].update(trust=2), id="node-trust"),
        pytest.param(lambda p: p["facts"]["nodes"][0].update(provider="prov-b"), id="provider"),
        # Re-pointing a name at another node's certificate is a relabelling too.
        pytest.param(
            lambda p: p["facts"]["nodes"][0].update(dns_name="n3.node.x"), id="node-dns-name"
        ),
        pytest.param(
            lambda p: p["facts"]["nodes"][0].update(spiffe_id="spiffe://x/node/n3"),
            id="node-spiffe-id",
        ),
        pytest.param(
            lambda p: p["facts"]["models"][1].update(classification="public"), id="classification"
        ),
        pytest.param(
            lambda p: p["facts"]["models"][1].update(allowed_modes=["none", "mpc"]), id="modes"
        ),
        pytest.param(lambda p: p["facts"]["models"][0].update(residency=["*"]), id="residency"),
        pytest.param(lambda p: p.update(staleness_budget_s=86400), id="staleness"),
        pytest.param(lambda p: p.update(expires="2099-01-01T00:00:00Z"), id="expiry"),
        pytest.param(
            lambda p: p["policy"]["files"].update(
                {"99-open.cedar": "permit(principal,action,resource);"}
            ),
            id="add-a-permit",
        ),
    ],
)
def test_the_facts_policy_decides_on_cannot_be_changed_without_an_officers_signature(
    signed: bytes, officer: Officer, relabel: Callable[[dict[str, Any]], None]
) -> None:
    forged = with_payload(signed, relabel)
    assert payload_of(forged) != payload_of(signed)
    refused(check(forged, officer), "bad-signature")
    # Positive control: re-encoded the same way, unchanged, the signature still holds.
    assert check(with_payload(signed, lambda p: None), officer).ok


def test_a_signature_made_for_another_purpose_is_not_accepted(
    signed: bytes, officer: Officer
) -> None:
    # Same key, same bytes, but signed without the bundle's PAE type binding.
    env = envelope(signed)
    body = base64.b64decode(env["payload"])
    env["signatures"][0]["sig"] = base64.b64encode(officer.key.sign(body)).decode()
    refused(check(json.dumps(env).encode(), officer), "bad-signature")


def test_another_officer_key_is_untrusted(bundle: Bundle, officer: Officer, tmp_path: Path) -> None:
    stranger = load_signing_key(PKI.init(tmp_path / "other").key_path("officer-policy"))
    message = refused(check(sign_bundle(bundle, stranger), officer), "untrusted-key")
    assert signing_key_id(stranger.public_key()) in message
    # and claiming a trusted key id does not help: it is then a bad signature
    forged = envelope(sign_bundle(bundle, stranger))
    forged["signatures"][0]["keyid"] = signing_key_id(officer.key.public_key())
    refused(check(json.dumps(forged).encode(), officer), "bad-signature")


def test_no_signatures_is_unsigned(signed: bytes, officer: Officer) -> None:
    env = envelope(signed)
    env["signatures"] = []
    refused(check(json.dumps(env).encode(), officer), "unsigned")
    del env["signatures"]
    refused(check(json.dumps(env).encode(), officer), "unsigned")


def test_expired_and_not_yet_valid(signed: bytes, officer: Officer) -> None:
    assert check(signed, officer, now=NOW + 29 * DAY).ok
    assert "expired at 2025-07-01T12:00:00Z" in refused(
        check(signed, officer, now=NOW + 30 * DAY), "expired"
    )
    assert check(signed, officer, now=NOW - dt.timedelta(minutes=4)).ok  # clock skew
    refused(check(signed, officer, now=NOW - DAY), "not-yet-valid")


def test_rollback_to_an_older_version_is_refused(signed: bytes, officer: Officer) -> None:
    assert check(signed, officer, min_version=7).ok  # reloading the running one is fine
    assert "older than v8" in refused(check(signed, officer, min_version=8), "rollback")


def test_a_gateway_older_than_min_gateway_version_says_so(
    officer: Officer,
) -> None:
    newer = sign_bundle(build_bundle(POLICIES, FACTS, 8, DAY, "0.3.0", 300, now=NOW), officer.key)
    msg = refused(check(newer, officer, running="0.2.9"), "gateway-too-old")
    assert "0.3.0" in msg and "last-known-good" in msg
    assert check(newer, officer, running="0.3.0").ok and check(newer, officer, running="0.10").ok
    # a newer body format is reported as the gateway being too old, not as malformed
    future = sign_bundle(build_bundle(POLICIES, FACTS, 9, DAY, "1.0", 300, now=NOW), officer.key)
    resigned = _resign(future, officer, lambda p: p.update(format="ztgate.policy-bundle/3"))
    refused(check(resigned, officer, running="0.1.0"), "gateway-too-old")
    refused(check(resigned, officer, running="1.0"), "malformed")


def test_a_format_1_bundle_without_node_identities_is_refused_with_the_way_forward(
    signed: bytes, officer: Officer
) -> None:
    """Format 1 signed no node certificates: gateway.toml decided which one answered."""

    def format_1(p: dict[str, Any]) -> None:
        p["format"] = "ztgate.policy-bundle/1"
        for node in p["facts"]["nodes"]:
            del node["dns_name"], node["spiffe_id"]

    message = refused(check(_resign(signed, officer, format_1), officer), "malformed")
    assert "signs no node certificate identities" in message
    assert "ztgate policy bundle sign" in message
    assert check(signed, officer).ok  # positive control: the same bundle in format 2
    assert compare_versions("0.10.0", "0.9") == 1 and compare_versions("1.0", "1.0.0") == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[]",
        b'{"payloadType": "application/vnd.other+json", "payload": "", "signatures": []}',
        b'{"payloadType": "' + PAYLOAD_TYPE.encode() + b'", "payload": "%%%", "signatures": []}',
        b'{"payloadType": "' + PAYLOAD_TYPE.encode() + b'", "payload": "", "signatures": {}}',
        b'{"payloadType": "' + PAYLOAD_TYPE.encode() + b'", "payload": "", "signatures": [1]}',
        b'{"payloadType": "x", "payloadType": "' + PAYLOAD_TYPE.encode() + b'"}',
    ],
)
def test_garbage_is_malformed(garbage: bytes, officer: Officer) -> None:
    refused(check(garbage, officer), "malformed")


def _resign(data: bytes, officer: Officer, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """An officer really signed this (edited) payload: content checks must still hold."""
    env = envelope(with_payload(data, edit))
    body = base64.b64decode(env["payload"])
    env["signatures"][0]["sig"] = base64.b64encode(
        officer.key.sign(pae(PAYLOAD_TYPE, body))
    ).decode()
    return json.dumps(env).encode()


def test_a_payload_an_officer_really_resigned_is_accepted(signed: bytes, officer: Officer) -> None:
    """The positive control of the two tests below: `_resign` with a harmless edit (a new
    version, a shorter staleness budget) gives a bundle that verifies, with those values."""

    def edit(p: dict[str, Any]) -> None:
        p.update(version=8, staleness_budget_s=120)

    result = check(_resign(signed, officer, edit), officer)
    assert result.ok and result.bundle is not None, result
    assert (result.bundle.version, result.bundle.staleness_budget_s) == (8, 120)


def test_a_signed_payload_that_is_not_a_bundle_is_malformed(
    signed: bytes, officer: Officer
) -> None:
    for edit in (
        lambda p: p.pop("facts"),
        lambda p: p.update(extra=1),
        lambda p: p.update(version="7"),
        lambda p: p.update(expires="next week"),
        lambda p: p["facts"]["nodes"][0].pop("trust"),
        lambda p: p["facts"]["nodes"][0].update(trust="1"),
        lambda p: p["facts"]["nodes"][0].pop("dns_name"),
        lambda p: p["facts"]["nodes"][0].update(spiffe_id=None),
        lambda p: p.update(min_gateway_version="not a version"),
    ):
        refused(check(_resign(signed, officer, edit), officer), "malformed")


def test_a_policy_that_does_not_parse_inside_a_signed_bundle_is_invalid(
    bundle: Bundle, officer: Officer
) -> None:
    broken = dataclasses.replace(
        bundle, policy_files={**bundle.policy_files, "50-broken.cedar": BROKEN}
    )
    message = refused(check(sign_bundle(broken, officer.key), officer), "invalid-policy")
    assert "50-broken.cedar:3" in message


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(
            lambda p: p["facts"]["models"][0].update(classification="secret"), id="classification"
        ),
        pytest.param(lambda p: p["facts"]["models"][0].update(allowed_modes=["fast"]), id="mode"),
        pytest.param(lambda p: p["facts"]["nodes"][0].update(trust=7), id="trust"),
        pytest.param(lambda p: p["facts"]["nodes"].append(p["facts"]["nodes"][0]), id="dup-node"),
        # Two names on one certificate: either node could answer as the other.
        pytest.param(
            lambda p: p["facts"]["nodes"][1].update(dns_name="n1.node.x"), id="shared-dns-name"
        ),
        pytest.param(
            lambda p: p["facts"]["nodes"][1].update(spiffe_id="spiffe://x/node/n1"),
            id="shared-spiffe-id",
        ),
        pytest.param(lambda p: p["facts"]["nodes"][1].update(dns_name=""), id="no-dns-name"),
        pytest.param(lambda p: p["facts"]["nodes"][1].update(spiffe_id="n2"), id="not-spiffe"),
        pytest.param(
            lambda p: p["policy"]["files"].update({"../escape.cedar": "x"}), id="path-traversal"
        ),
        pytest.param(lambda p: p["policy"].update(hash="0" * 64), id="hash"),
        pytest.param(lambda p: p.update(staleness_budget_s=0), id="staleness"),
    ],
)
def test_signed_content_the_gateway_would_refuse_is_invalid_policy(
    signed: bytes, officer: Officer, edit: Callable[[dict[str, Any]], None]
) -> None:
    refused(check(_resign(signed, officer, edit), officer), "invalid-policy")
    assert not Path(tempfile.gettempdir(), "escape.cedar").exists()


def test_build_refuses_a_policy_with_findings_and_bad_parameters(tmp_path: Path) -> None:
    bad = tmp_path / "policies"
    bad.mkdir()
    for name in ("schema.cedarschema", "identities.json", "10-callers.cedar"):
        (bad / name).write_text((POLICIES / name).read_text())
    (bad / "50-broken.cedar").write_text(BROKEN)
    with pytest.raises(PolicyError):
        build_bundle(bad, FACTS, 1, DAY, "0.1.0", 300)
    for args in ((0, DAY, "0.1.0", 300), (1, -DAY, "0.1.0", 300), (1, DAY, "x", 300)):
        with pytest.raises(ValueError):
            build_bundle(POLICIES, FACTS, *args)
    unknown = BundleFacts((ModelFacts("m", "secret"),), ())
    with pytest.raises(ValueError, match="classification"):
        build_bundle(POLICIES, unknown, 1, DAY, "0.1.0", 300)


# --------------------------------------------------------------------------- facts


def _node(name: str, region: str, provider: str, **kw: Any) -> NodeConfig:
    kw.setdefault("dns_name", f"{name}.node")
    kw.setdefault("spiffe_id", f"spiffe://x/node/{name}")
    return NodeConfig(name, f"{name}:9000", region, provider, **kw)


def test_facts_from_registry_nodes_and_model_policy(pki: PKI, tmp_path: Path) -> None:
    registry = Registry.open(tmp_path / "reg")
    seed_examples(registry)
    nodes = [
        _node("n2", "eu-central", "prov-b", trust=2),
        _node("n1", "eu-west", "prov-a"),
    ]
    facts = facts_from(registry.entries(), nodes, {"risk": {"owner": OWNER, "residency": ["eu-"]}})
    assert facts.nodes == (
        NodeFacts("n1", "eu-west", "prov-a", 1, "n1.node", "spiffe://x/node/n1"),
        NodeFacts("n2", "eu-central", "prov-b", 2, "n2.node", "spiffe://x/node/n2"),
    )
    assert facts.model("risk") == ModelFacts(
        "risk", "restricted", OWNER, ("eu-",), ("redundant", "mpc")
    )
    assert facts.model("iris") == ModelFacts("iris", "public", "", (), ("none", "redundant", "zk"))
    assert BundleFacts.from_json(json.loads(json.dumps(facts.to_json()))) == facts
    # versions of one model: the strictest classification, the modes all of them allow
    iris = registry.get("iris")
    v2 = dataclasses.replace(
        iris, version="2", classification="confidential", allowed_modes=("zk", "mpc")
    )
    merged = facts_from([iris, v2], [], {})
    assert merged.model("iris") == ModelFacts("iris", "confidential", "", (), ("zk",))
    with pytest.raises(ValueError, match="not in the registry"):
        facts_from(registry.entries(), [], {"nope": {}})

    # an inventory without a trust field: the "trust" label, else ordinary (1)
    class Bare:
        def __init__(self, name: str, labels: tuple[tuple[str, str], ...] = ()) -> None:
            self.name, self.region, self.provider, self.labels = name, "eu-west", "p", labels
            self.dns_name, self.spiffe_id = f"{name}.node", f"spiffe://x/node/{name}"

    bare: list[Any] = [Bare("a", (("trust", "0"),)), Bare("b")]
    assert [n.trust for n in facts_from([], bare, {}).nodes] == [0, 1]
    with pytest.raises(ValueError, match="trust"):
        facts_from([], [Bare("n", (("trust", "high"),))], {})  # type: ignore[list-item]
    with pytest.raises(ValueError, match="trust"):
        facts_from([], [_node("n", "r", "p", trust=5)], {})
    # identities: from the node certificates where given, which must agree with the table
    n1 = pki.ensure("node", "n1").cert.read_bytes()
    bare_n1 = _node("n1", "eu-west", "prov-a", dns_name="", spiffe_id="")
    from_cert = facts_from([], [bare_n1], {}, certificates={"n1": n1})
    assert from_cert.nodes == (
        NodeFacts(
            "n1", "eu-west", "prov-a", 1, "n1.node.ztgate.local", "spiffe://ztgate.local/node/n1"
        ),
    )
    wrong_dns = _node("n1", "eu-west", "prov-a", spiffe_id="spiffe://ztgate.local/node/n1")
    with pytest.raises(ValueError, match=r"the inventory's dns_name 'n1\.node' is not the cert"):
        facts_from([], [wrong_dns], {}, certificates={"n1": n1})
    with pytest.raises(ValueError, match="dns_name '' is not a DNS name"):
        facts_from([], [bare_n1], {})
    everywhere = facts_from(registry.entries(), [], {}, default_residency=("*",))
    assert everywhere.model("mnist") == ModelFacts(
        "mnist", "internal", "", ("*",), ("none", "redundant", "zk")
    )


# --------------------------------------------------------------------------- CLI

NODES_TOML = """
mode = "dev"
[[nodes]]
name = "n1"
address = "127.0.0.1:9001"
dns_name = "n1.node.ztgate.local"
spiffe_id = "spiffe://ztgate.local/node/n1"
region = "eu-west"
provider = "prov-a"

[[nodes]]
name = "n3"
region = "us-east"
provider = "prov-c"
trust = 0

[policy.models.risk]
owner = "spiffe://ztgate.local/client/alice"
residency = ["eu-west"]
"""


def test_cli_sign_and_verify(
    officer: Officer, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "reg"
    seed_examples(Registry.open(registry))
    (tmp_path / "gateway.toml").write_text(NODES_TOML)
    (tmp_path / "models.json").write_text(json.dumps({"iris": {"residency": ["eu-"]}}))
    out = tmp_path / "policy.bundle"
    # n3's table names no certificate: its identity is read from the certificate itself.
    n3_cert = pki.ensure("node", "n3").cert
    sign = [
        "policy", "bundle", "sign", "--policies", str(POLICIES), "--registry", str(registry),
        "--nodes", str(tmp_path / "gateway.toml"), "--key", str(officer.key_path),
        "--version", "3", "--model-policy", str(tmp_path / "models.json"), "--out", str(out),
        "--node-cert", f"n3={n3_cert}",
    ]  # fmt: skip
    assert main(sign) == 0
    text = capsys.readouterr().out
    assert "signed policy bundle v3" in text and "model risk has no residency" in text
    verify = ["policy", "bundle", "verify", str(out), "--trust-key", str(officer.pub_path)]
    assert main(verify) == 0
    text = capsys.readouterr().out
    assert "OK: policy bundle v3" in text and signing_key_id(officer.key.public_key()) in text
    assert load_policy_dir(POLICIES).hash in text
    assert "n3: region us-east, provider prov-c, trust 0" in text
    assert "certificate: spiffe://ztgate.local/node/n3, DNS n3.node.ztgate.local" in text
    assert "certificate: spiffe://ztgate.local/node/n1, DNS n1.node.ztgate.local" in text
    assert "iris: public, modes none,redundant,zk, residency eu-" in text
    # refusals: exit 1 with the reason
    assert main([*verify, "--min-version", "4"]) == 1
    assert "INVALID (rollback)" in capsys.readouterr().out
    assert main([*verify, "--gateway-version", "0.0.1"]) == 1
    assert "INVALID (gateway-too-old)" in capsys.readouterr().out
    other = PKI.init(tmp_path / "other").key_path("officer-policy").with_suffix(".pub")
    assert main(["policy", "bundle", "verify", str(out), "--trust-key", str(other)]) == 1
    assert "INVALID (untrusted-key)" in capsys.readouterr().out
    forged = tmp_path / "forged.bundle"
    forged.write_bytes(
        with_payload(out.read_bytes(), lambda p: p["facts"]["nodes"][1].update(region="eu-west"))
    )
    assert (
        main(["policy", "bundle", "verify", str(forged), "--trust-key", str(officer.pub_path)]) == 1
    )
    assert "INVALID (bad-signature)" in capsys.readouterr().out
    # without --model-policy, the [policy.models.*] tables of the gateway.toml are used
    without = [*sign[: sign.index("--model-policy")], "--out", str(out)]
    assert main([*without, "--node-cert", f"n3={n3_cert}"]) == 0
    text = capsys.readouterr().out
    assert f"risk: restricted, modes redundant,mpc, residency eu-west, owner {OWNER}" in text
    assert "model iris has no residency" in text
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(b"\x00garbage")
    assert (
        main(["policy", "bundle", "verify", str(garbage), "--trust-key", str(officer.pub_path)])
        == 1
    )
    assert "INVALID (malformed)" in capsys.readouterr().out


def test_cli_usage_errors(
    officer: Officer, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "reg"
    seed_examples(Registry.open(registry))
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(NODES_TOML)
    junk = tmp_path / "junk"
    junk.write_text("not a key")
    out = tmp_path / "b"
    n1_cert, n3_cert = (pki.ensure("node", n).cert for n in ("n1", "n3"))
    base = [
        "policy", "bundle", "sign", "--policies", str(POLICIES), "--registry", str(registry),
        "--nodes", str(nodes), "--key", str(officer.key_path), "--version", "1",
        "--out", str(out), "--node-cert", f"n3={n3_cert}",
    ]  # fmt: skip
    no_cert = base[: base.index("--node-cert")]

    def usage_error(argv: list[str], complaint: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ztgate: error: ") and complaint in err, err
        assert not out.exists()

    # Each is `base` with one thing wrong (a later option wins over base's own).
    usage_error([*base, "--policies", str(tmp_path / "nope")], "nope is not a directory")
    usage_error([*base, "--key", str(junk)], "junk: not an Ed25519 private key")
    usage_error([*base, "--registry", str(tmp_path / "no-registry")], "is not a model registry")
    assert not (tmp_path / "no-registry").exists()  # not created by the signing tool
    usage_error([*base, "--version", "0"], "version must be a whole number >= 1, got 0")
    # A node's certificate identity is signed, so it must be known and must be its own.
    usage_error(no_cert, "node 'n3': dns_name '' is not a DNS name")
    usage_error([*base, "--node-cert", f"n1={n3_cert}"], "node 'n1': the inventory's spiffe_id")
    usage_error([*no_cert, "--node-cert", f"n3={n1_cert}"], "node dns_name(s) listed twice")
    usage_error([*base, "--node-cert", f"n9={n3_cert}"], "nodes not in the inventory: n9")
    usage_error([*base, "--node-cert", f"n3={junk}"], "not a node certificate")
    usage_error([*base, "--node-cert", "n3"], "expected NAME=CERT.pem")
    nodes.write_text("[[nodes]]\nname = 'n1'\n")
    usage_error(base, "region is required")
    nodes.write_text("[[nodes\n")
    usage_error(base, "nodes.toml: Expected ']]'")
    nodes.write_text(NODES_TOML)
    # a policy with findings: exit 1, each finding named
    bad = tmp_path / "policies"
    bad.mkdir()
    for name in ("schema.cedarschema", "identities.json", "10-callers.cedar"):
        (bad / name).write_text((POLICIES / name).read_text())
    (bad / "50-broken.cedar").write_text(BROKEN)
    assert main([*base, "--policies", str(bad)]) == 1
    assert "50-broken.cedar:3" in capsys.readouterr().out
    assert not out.exists()
    # verify: missing bundle, junk trust key, no trust key at all
    trust = ["--trust-key", str(officer.pub_path)]
    usage_error(["policy", "bundle", "verify", str(tmp_path / "missing"), *trust], "cannot read")
    usage_error(
        ["policy", "bundle", "verify", str(nodes), "--trust-key", str(junk)],
        "junk: not a PEM public key",
    )
    with pytest.raises(SystemExit) as exc:
        main(["policy", "bundle", "verify", str(nodes)])
    assert exc.value.code == 2
    capsys.readouterr()
    # Positive control: `base` itself signs, and the bundle verifies with the same options.
    assert main(base) == 0 and out.is_file()
    assert main(["policy", "bundle", "verify", str(out), *trust]) == 0


# --------------------------------------------------------------------------- admin by name

ADMIN_BY_ACCIDENT = (
    '@id("ops-everything")\npermit (principal in Ztgate::Group::"ops", action, resource);\n'
)


def test_a_permit_granting_admin_actions_unnamed_is_never_signed_nor_loaded(
    bundle: Bundle, officer: Officer, tmp_path: Path
) -> None:
    d = tmp_path / "policies"
    shutil.copytree(POLICIES, d)
    (d / "50-ops.cedar").write_text(ADMIN_BY_ACCIDENT)
    with pytest.raises(PolicyError) as exc:
        build_bundle(d, FACTS, 8, DAY, "0.1.0", 300, now=NOW)
    [finding] = exc.value.findings
    assert finding.file == "50-ops.cedar" and "admin_reload and admin_revoke" in finding.message
    # Signed by a tool that does not check (built by hand here): the gateway refuses it.
    # The policy check runs before the recorded hash is compared, so its finding is what
    # the refusal names.
    files = {**bundle.policy_files, "50-ops.cedar": ADMIN_BY_ACCIDENT}
    sneaky = dataclasses.replace(bundle, version=8, policy_files=files)
    message = refused(check(sign_bundle(sneaky, officer.key), officer), "invalid-policy")
    assert "50-ops.cedar:1" in message and "ops-everything" in message, message
    assert "admin_reload and admin_revoke" in message


# --------------------------------------------------------------------------- reload

MPC_RULE = "restricted-only-under-mpc"


def test_a_signed_bundle_that_drops_a_forbid_needs_the_marker_too(
    officer: Officer, tmp_path: Path
) -> None:
    """Production reload: a newer bundle, validly signed, that lacks a forbid the running
    one has is refused unless it marks the removal; the refusal moves neither the rollback
    floor nor the file read at the next start."""
    path = tmp_path / "bundle.json"

    def signed_of(d: Path, version: int) -> bytes:
        return sign_bundle(build_bundle(d, FACTS, version, DAY, "0.1.0", 300), officer.key)

    def on_disk() -> int:
        """The version of the bundle a restart would read: the officer's file is never
        written; an accepted push is kept in the gateway's data dir."""
        assert path.read_bytes() == first
        kept = tmp_path / "d" / ACCEPTED_BUNDLE
        data = kept.read_bytes() if kept.is_file() else first
        result = check(data, officer, now=dt.datetime.now(dt.UTC))
        assert result.bundle is not None, result
        return result.bundle.version

    first = signed_of(POLICIES, 1)
    path.write_bytes(first)
    tls = TLS(*(tmp_path / n for n in ("c", "k", "ca", "nca", "ncc", "nck")))
    policy = PolicyConfig(bundle=path, officer_keys=(str(officer.pub_path),))
    cfg = Config(tls, tmp_path / "r", tmp_path / "d", mode="production", policy=policy)
    live = LivePolicy(bundle_loader(cfg, {}))
    assert live.current.version == 1
    d = tmp_path / "policies"
    shutil.copytree(POLICIES, d)
    blocks = (d / "20-sensitive.cedar").read_text().split("\n\n")
    kept = [b for b in blocks if f'@id("{MPC_RULE}")' not in b]
    (d / "20-sensitive.cedar").write_text("\n\n".join(kept))
    assert not live.reload(signed_of(d, 2))
    assert live.current.version == 1 and live.rejected == 1
    assert MPC_RULE in (live.last_error or "") and "@removes" in (live.last_error or "")
    assert on_disk() == 1
    # Marked, as the same version 2: the refused one did not raise the floor.
    marked = "\n\n".join(kept).replace("@id(", f'@removes("{MPC_RULE}")\n@id(', 1)
    (d / "20-sensitive.cedar").write_text(marked)
    assert live.reload(signed_of(d, 2)), live.last_error
    assert live.current.version == 2 and live.engine.source.policy(MPC_RULE) is None
    assert on_disk() == 2
