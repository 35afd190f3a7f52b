"""Which certificate answers for a node name is signed, not configured (issue 13, item 1).

gateway.toml is not signed. Before this, it decided which certificate answered for a node
name (its dns_name was the channel's pin) and which provider a node counted as in the
redundant and MPC modes. So a config edit could point n1 (eu-west in the signed facts) at
n3's address and pin, and n3 answered a residency-restricted request as n1; and two nodes
the officer signed as one provider could be paired as "independent". Now the signed facts
carry each node's DNS SAN and SPIFFE ID; the gateway pins each channel to the signed DNS
SAN and reads provider, region and trust only from the facts.

Everything here runs against the real Triton nodes of the session's cluster, through a
real gateway (dev PKI, so dev mode, with a signed bundle as production has).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Config, ConfigError, NodeConfig
from gateway.pki import PKI, load_signing_key
from gateway.policy.bundle import BundleFacts, build_bundle, facts_from, sign_bundle
from gateway.registry import Registry
from gateway.runtime import build_gateway
from tests.conftest import TritonCluster
from tests.gateway_harness import client_context, gateway_config, policy_dir, running_gateway
from tests.test_gateway import IRIS, infer_body, node_table


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


def signed_facts(
    registry_dir: Path,
    tables: Sequence[dict[str, Any]],
    model_policy: dict[str, dict[str, Any]] | None = None,
) -> BundleFacts:
    """What an officer signs for these node tables (fact-building, as the CLI does it)."""
    return facts_from(
        Registry.open(registry_dir).entries(),
        [NodeConfig(**t) for t in tables],
        model_policy or {},
        default_residency=("*",),
    )


def bundle_config(
    pki: PKI,
    registry_dir: Path,
    work: Path,
    config_nodes: list[dict[str, Any]],
    facts: BundleFacts,
    version: int = 1,
) -> Config:
    """A gateway whose [[nodes]] are `config_nodes`, running a bundle signed over `facts`."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bundle.json"
    path.write_bytes(signed_bundle(pki, work, facts, version))
    officer_pub = pki.key_path("officer-policy").with_suffix(".pub")
    return gateway_config(
        pki,
        registry_dir,
        work / "data",
        config_nodes,
        policy={"dir": None, "bundle": str(path), "officer_keys": [str(officer_pub)]},
    )


def signed_bundle(pki: PKI, work: Path, facts: BundleFacts, version: int) -> bytes:
    policies = work / "policies"
    if not policies.is_dir():
        policy_dir(policies)
    built = build_bundle(policies, facts, version, dt.timedelta(days=1), "0.1.0", 300)
    return sign_bundle(built, load_signing_key(pki.key_path("officer-policy")))


def ask(pki: PKI, gw: Any, mode: str | None = None, name: str = "demo") -> httpx.Response:
    issued = pki.ensure("client", name)
    body = infer_body(IRIS)
    if mode is not None:
        body["parameters"] = {"ztgate.verification": mode}
    with httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=20) as c:
        return c.post(f"{gw.base}/v2/models/iris/infer", json=body)


def without_identity(table: dict[str, Any]) -> dict[str, Any]:
    """A [[nodes]] entry that says only where the node is: the bundle says who it is."""
    return {k: v for k, v in table.items() if k not in ("dns_name", "spiffe_id")}


# --------------------------------------------------------------------------- (a) redundant


def test_redundant_pairs_only_nodes_the_officer_signed_as_independent(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """The config says n1 prov-a, n2 prov-b, n3 prov-c; the officer signed n1 and n2 as
    one provider. Every redundant answer must pair two signed providers, so n3 is always
    one of them and n1 and n2 are never paired (before: the config's providers made the
    first request's pair n1+n2, config order breaking the tie of equal scores)."""
    tables = node_table(triton_cluster)
    n1, n2, n3 = (t["name"] for t in tables)
    one_provider = [tables[0], {**tables[1], "provider": tables[0]["provider"]}, tables[2]]
    facts = signed_facts(registry_dir, one_provider)
    signed_provider = {n.name: n.provider for n in facts.nodes}
    assert signed_provider[n1] == signed_provider[n2] != signed_provider[n3]
    cfg = bundle_config(pki, registry_dir, tmp_path / "a", tables, facts)
    with running_gateway(cfg) as gw:
        for _ in range(4):
            r = ask(pki, gw, "redundant")
            assert r.status_code == 200, r.text
            params = r.json()["parameters"]
            assert params["ztgate.verification_status"] == "agreed"
            pair = params["ztgate.nodes"].split(",")
            assert len(pair) == 2 and n3 in pair, pair
            assert len({signed_provider[n] for n in pair}) == 2, pair
        assert gw.gw.router.nodes[n3].served == 4
        # The routing table holds the signed provider, whatever gateway.toml said.
        assert gw.gw.router.nodes[n2].config.provider == signed_provider[n1]


def test_redundant_pairs_distinct_signed_providers_positive_control(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """Control: signed facts with three providers; whichever pair the router picks (its
    latency estimates decide), the same check as above accepts it as independent."""
    tables = node_table(triton_cluster)
    facts = signed_facts(registry_dir, tables)
    signed_provider = {n.name: n.provider for n in facts.nodes}
    cfg = bundle_config(pki, registry_dir, tmp_path / "a", tables, facts)
    with running_gateway(cfg) as gw:
        r = ask(pki, gw, "redundant")
    assert r.status_code == 200, r.text
    pair = r.json()["parameters"]["ztgate.nodes"].split(",")
    assert len(set(pair)) == 2 and set(pair) <= {t["name"] for t in tables}, pair
    assert len({signed_provider[n] for n in pair}) == 2


# --------------------------------------------------------------------------- (b) the pin


def test_a_name_pointed_at_another_nodes_address_never_answers_with_its_certificate(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """n1 is eu-west in the bundle and iris may run only in eu-; the config points n1 at
    n3 (us-east). The channel is pinned to n1's signed DNS SAN, n3's certificate does not
    carry it, so the handshake fails: n1 is a failed node, n3 never answers as n1.

    The entry names no dns_name: the pin comes from the bundle alone (before this, the
    config's dns_name was the pin, and an entry without one did not load)."""
    tables = node_table(triton_cluster)
    n1, n3 = tables[0], tables[2]
    facts = signed_facts(registry_dir, tables, {"iris": {"residency": ["eu-"]}})
    re_pointed = {**without_identity(n1), "address": n3["address"]}
    cfg = bundle_config(pki, registry_dir, tmp_path / "a", [re_pointed], facts)
    with running_gateway(cfg) as gw:
        client = gw.gw.router.nodes[n1["name"]].client
        assert client.node.dns_name == n1["dns_name"]  # the signed pin
        r = ask(pki, gw)
        assert r.status_code == 502, r.text
        state = gw.gw.router.nodes[n1["name"]]
        assert state.served == 0 and state.failed >= 1
    # Control: the same config with n1's own address answers, from n1.
    cfg = bundle_config(pki, registry_dir, tmp_path / "b", [without_identity(n1)], facts)
    with running_gateway(cfg) as gw:
        r = ask(pki, gw)
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["ztgate.nodes"] == n1["name"]
        assert gw.gw.router.nodes[n1["name"]].served == 1


def test_a_name_re_pointed_at_another_nodes_certificate_is_refused_at_start(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """The attack as reported: n1's entry with n3's address *and* n3's DNS name and
    SPIFFE ID. Before, n3 answered n1's residency-restricted requests; now the gateway
    does not start, and says which entry and key to fix."""
    tables = node_table(triton_cluster)
    n1, n3 = tables[0], tables[2]
    facts = signed_facts(registry_dir, tables, {"iris": {"residency": ["eu-"]}})
    impostor = {**n3, "name": n1["name"], "region": n1["region"], "provider": n1["provider"]}
    cfg = bundle_config(pki, registry_dir, tmp_path / "a", [impostor], facts)
    with pytest.raises(ConfigError) as refused:
        build_gateway(cfg)
    message = str(refused.value)
    assert f"nodes[0] ({n1['name']}): dns_name {n3['dns_name']!r} disagrees" in message
    assert f"nodes[0] ({n1['name']}): spiffe_id {n3['spiffe_id']!r} disagrees" in message


# --------------------------------------------------------------------------- (c) refusals


@pytest.mark.parametrize("key", ["dns_name", "spiffe_id"])
def test_a_config_entry_disagreeing_with_the_signed_identity_is_refused_at_start(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path, key: str
) -> None:
    """n1's entry names n2's certificate (one key at a time): refused, with the fix."""
    tables = node_table(triton_cluster)
    facts = signed_facts(registry_dir, tables)
    wrong = [{**tables[0], key: tables[1][key]}, *tables[1:]]
    cfg = bundle_config(pki, registry_dir, tmp_path / "a", wrong, facts)
    with pytest.raises(ConfigError) as refused:
        build_gateway(cfg)
    message = str(refused.value)
    signed = tables[0][key]
    assert f"nodes[0] ({tables[0]['name']}): {key} {tables[1][key]!r} disagrees" in message
    assert f"with the signed {signed!r}; set it to {signed!r} or remove it" in message


def test_a_config_node_the_bundle_does_not_sign_is_refused_at_start(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    tables = node_table(triton_cluster)
    facts = signed_facts(registry_dir, tables[:2])
    cfg = bundle_config(pki, registry_dir, tmp_path / "a", tables, facts)
    with pytest.raises(ConfigError, match=re.escape(f"nodes[2] ({tables[2]['name']}): the signed")):
        build_gateway(cfg)


def test_an_agreeing_config_starts_and_a_reload_can_relabel_but_not_re_pin(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """Control for the refusals: the config that agrees with the bundle starts and serves.
    A newer bundle that moves a node to another provider takes effect in routing at once;
    one that gives a node another certificate is refused until a restart."""
    tables = node_table(triton_cluster)
    facts = signed_facts(registry_dir, tables)
    work = tmp_path / "a"
    # n1 and n3 repeat their signed identity, n2 leaves it to the bundle: both start.
    config_nodes = [tables[0], without_identity(tables[1]), tables[2]]
    cfg = bundle_config(pki, registry_dir, work, config_nodes, facts)
    n2 = tables[1]["name"]
    with running_gateway(cfg) as gw:
        assert ask(pki, gw).status_code == 200
        live = gw.gw.policy
        relabelled = BundleFacts(
            facts.models,
            tuple(
                dataclasses.replace(n, provider="prov-z") if n.name == n2 else n
                for n in facts.nodes
            ),
        )
        assert live.reload(signed_bundle(pki, work, relabelled, 2)), live.last_error
        assert gw.gw.router.nodes[n2].config.provider == "prov-z"
        re_pinned = BundleFacts(
            facts.models,
            tuple(
                dataclasses.replace(n, dns_name=tables[2]["dns_name"] + ".x") if n.name == n2 else n
                for n in relabelled.nodes
            ),
        )
        assert not live.reload(signed_bundle(pki, work, re_pinned, 3))
        assert "restart the gateway" in (live.last_error or "")
        assert live.current.version == 2
        assert gw.gw.router.nodes[n2].client.node.dns_name == tables[1]["dns_name"]
        assert ask(pki, gw).status_code == 200
