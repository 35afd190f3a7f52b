"""Policy in the running gateway: decisions, rate limits, revocation, reload, signed bundles."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.cli import main
from gateway.pki import PKI, load_signing_key
from gateway.policy.bundle import build_bundle, facts_from, sign_bundle
from gateway.registry import Registry
from gateway.server import connections_opened
from tests.conftest import TritonCluster
from tests.gateway_harness import (
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_gateway import IRIS, infer_body, node_table


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


def client(pki: PKI, name: str, **kw: Any) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=10, **kw)


def infer(
    c: httpx.Client, gw: RunningGateway, model: str = "iris", **params: Any
) -> httpx.Response:
    body = infer_body(IRIS if model == "iris" else np.zeros((2, 6), np.float32))
    if params:
        body["parameters"] = params
    return c.post(f"{gw.base}/v2/models/{model}/infer", json=body)


@pytest.fixture
def gateway(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> Iterator[RunningGateway]:
    cfg = gateway_config(pki, registry_dir, tmp_path / "data", node_table(triton_cluster))
    with running_gateway(cfg) as gw:
        yield gw


def test_policy_decides_and_every_decision_is_logged(
    gateway: RunningGateway, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ztgate.decisions")
    with client(pki, "demo") as demo, client(pki, "nobody") as nobody:
        ok = infer(demo, gateway)
        assert ok.status_code == 200
        assert ok.json()["parameters"]["ztgate.policy_hash"] == gateway.gw.policy.engine.source.hash
        # A caller nothing in identities.json maps: deny by default.
        denied = infer(nobody, gateway)
        assert denied.status_code == 403
        assert denied.json()["type"].endswith("/forbidden")
        # Restricted model: demo lacks the clearance, and only mpc would be allowed anyway.
        risk = infer(demo, gateway, "risk", **{"ztgate.purpose": "x"})
        assert risk.status_code == 403, risk.text
        # Asking for a mode the policy does not allow for this model.
        assert infer(demo, gateway, **{"ztgate.verification": "zk"}).status_code == 403
    records = [json.loads(r.message) for r in caplog.records if r.name == "ztgate.decisions"]
    assert len(records) >= 4
    allowed = [r for r in records if r["spiffe_id"].endswith("/demo") and r["result"] == "allow"]
    assert allowed and allowed[0]["determining"] and allowed[0]["mode"] == "none"
    assert any(r["spiffe_id"].endswith("/nobody") and r["result"] == "deny" for r in records)
    for r in records:  # never payloads
        assert "inputs" not in r and "data" not in json.dumps(r)


def test_revocation_takes_effect_on_the_same_connection_and_survives_restart(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    bob = pki.issue("client", "bob", organization="Acme")
    cfg = gateway_config(pki, registry_dir, tmp_path / "data", node_table(triton_cluster))
    with running_gateway(cfg) as gw:
        ctx = client_context(pki, bob.cert, bob.key)
        with httpx.Client(verify=ctx, timeout=10) as c, client(pki, "olga") as officer:
            opened = connections_opened()
            assert infer(c, gw).status_code == 200
            # Bob may not revoke (policy authorises admin routes, no separate secret) ...
            assert c.post(f"{gw.base}/admin/revoke", json={"certificate": ""}).status_code == 403
            # ... an officer may.
            pem = bob.cert.read_text().split("-----END CERTIFICATE-----")[0]
            r = officer.post(
                f"{gw.base}/admin/revoke",
                json={"certificate": pem + "-----END CERTIFICATE-----\n"},
            )
            assert r.status_code == 200, r.text
            after = infer(c, gw)
            assert after.status_code == 401 and "revoked" in after.json()["detail"]
            assert connections_opened() == opened + 2  # bob's one connection, olga's one
        # Garbage to the admin endpoint: a clear 400, not a 500.
        with client(pki, "olga") as officer:
            for bad in (b"{", b"[]", b'{"issuer": "x", "serial": "zz"}', b'{"certificate": "no"}'):
                r = officer.post(f"{gw.base}/admin/revoke", content=bad)
                assert r.status_code == 400, bad
    # A restart remembers: revocations are durable, not soft state.
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        assert infer(c, gw).status_code == 401


def test_revocation_reaches_every_replica_and_a_wiped_store_cannot_undo_it(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path, redis_server: str
) -> None:
    carl = pki.issue("client", "carl", organization="Acme")
    state = {"redis_url": redis_server, "revocation_sync_s": 0.2}
    cfg_a = gateway_config(
        pki, registry_dir, tmp_path / "a", node_table(triton_cluster), state=state
    )
    cfg_b = gateway_config(
        pki, registry_dir, tmp_path / "b", node_table(triton_cluster), state=state
    )
    ctx = client_context(pki, carl.cert, carl.key)
    with running_gateway(cfg_a) as a, running_gateway(cfg_b) as b:
        with httpx.Client(verify=ctx, timeout=10) as c:
            assert infer(c, b).status_code == 200
        with client(pki, "olga") as officer:
            r = officer.post(
                f"{a.base}/admin/revoke",
                json={"issuer": _issuer(pki), "serial": format(carl.serial, "x")},
            )
            assert r.status_code == 200, r.text
        with httpx.Client(verify=ctx, timeout=10) as c:
            for _ in range(50):  # replica B learns it within a few sync rounds
                if infer(c, b).status_code == 401:
                    break
                asyncio.run(asyncio.sleep(0.1))
            assert infer(c, b).status_code == 401
    import redis

    redis.Redis.from_url(redis_server).flushall()
    with running_gateway(cfg_b) as b, httpx.Client(verify=ctx, timeout=10) as c:
        assert infer(c, b).status_code == 401  # B's own grow-only copy still has it


def _issuer(pki: PKI) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(
        pki.client_ca_bundle().read_bytes()
    ).subject.rfc4514_string()


LIMITED = """
@id("limited-callers")
@rate("20/minute")
permit (principal in Ztgate::Group::"limited", action == Ztgate::Action::"infer", resource)
when { resource.classification == "public" && context.mode == "none" };
"""


def test_two_replicas_sharing_redis_enforce_one_rate_limit(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path, redis_server: str
) -> None:
    def cfg(name: str) -> Any:
        c = gateway_config(
            pki,
            registry_dir,
            tmp_path / name,
            node_table(triton_cluster),
            state={"redis_url": redis_server},
        )
        pol = c.policy.dir
        assert pol is not None
        (pol / "15-limited.cedar").write_text(LIMITED)
        ids = json.loads((pol / "identities.json").read_text())
        ids["clients"]["spiffe://ztgate.local/client/lena"] = {"groups": ["limited"]}
        (pol / "identities.json").write_text(json.dumps(ids))
        return c

    statuses: list[int] = []
    with running_gateway(cfg("a")) as a, running_gateway(cfg("b")) as b, client(pki, "lena") as c:
        for i in range(60):
            r = infer(c, a if i % 2 else b)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert float(r.headers["retry-after"]) > 0
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}
    assert 19 <= admitted <= 22, statuses  # one bucket of 20, not one per replica


def test_admission_limit_applies_before_policy(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path / "d",
        node_table(triton_cluster),
        policy={"pre_policy_rate": "5/minute"},
    )
    with running_gateway(cfg) as gw, client(pki, "nobody") as c:
        statuses = [infer(c, gw).status_code for _ in range(8)]
    # Denied requests spend the admission budget too: a flood of denials is cut off.
    assert statuses[:5] == [403] * 5 and statuses[5:] == [429] * 3


def test_a_malformed_edit_keeps_the_old_policy_and_a_good_one_takes_effect(
    gateway: RunningGateway, pki: PKI
) -> None:
    live = gateway.gw.policy
    before = live.engine.source.hash
    pol = gateway.cfg.policy.dir
    assert pol is not None
    (pol / "50-broken.cedar").write_text(
        '@id("broken")\npermit (principal, action, resource) when {'
    )
    with client(pki, "olga") as officer, client(pki, "demo") as demo:
        r = officer.post(f"{gateway.base}/admin/reload")
        assert r.status_code == 400 and "50-broken.cedar" in r.json()["detail"]
        assert live.engine.source.hash == before and live.rejected >= 1
        assert infer(demo, gateway).status_code == 200  # still serving, on the old set
        # A valid edit: forbid iris for everyone. It takes effect at once.
        (pol / "50-broken.cedar").write_text(
            '@id("no-iris")\nforbid (principal, action, resource == Ztgate::Model::"iris");\n'
        )
        assert officer.post(f"{gateway.base}/admin/reload").status_code == 200
        assert live.engine.source.hash != before
        denied = infer(demo, gateway)
        assert denied.status_code == 403 and "no-iris" in denied.json()["detail"]
        # Reloading is an officer's right, not a client's.
        assert demo.post(f"{gateway.base}/admin/reload").status_code == 403


def test_production_loads_only_signed_bundles_and_refuses_rollback(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    nodes = node_table(triton_cluster)
    base = gateway_config(pki, registry_dir, tmp_path / "p", nodes)
    facts = facts_from(
        Registry.open(registry_dir).entries(),
        base.nodes,
        {},
        default_residency=("*",),
    )
    key = load_signing_key(pki.key_path("officer-policy"))
    policies = policy_dir(tmp_path / "signed-policies")

    def bundle(version: int) -> bytes:
        b = build_bundle(policies, facts, version, dt.timedelta(days=1), "0.1.0", 300)
        return sign_bundle(b, key)

    (tmp_path / "bundle.json").write_bytes(bundle(5))
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path / "p2",
        nodes,
        policy={
            "dir": None,
            "bundle": str(tmp_path / "bundle.json"),
            "officer_keys": [str(pki.key_path("officer-policy").with_suffix(".pub"))],
        },
    )
    with running_gateway(cfg) as gw, client(pki, "olga") as officer, client(pki, "demo") as demo:
        assert gw.gw.policy.current.version == 5
        assert infer(demo, gw).status_code == 200
        assert officer.post(f"{gw.base}/admin/reload", content=bundle(4)).status_code == 400
        assert "rollback" in (gw.gw.policy.last_error or "")
        tampered = bytearray(bundle(6))
        tampered[len(tampered) // 2] ^= 1
        assert officer.post(f"{gw.base}/admin/reload", content=bytes(tampered)).status_code == 400
        assert gw.gw.policy.current.version == 5
        assert officer.post(f"{gw.base}/admin/reload", content=bundle(6)).status_code == 200
        assert gw.gw.policy.current.version == 6
    # The accepted bundle is what the next start reads.
    assert b'"payloadType"' in (tmp_path / "bundle.json").read_bytes()


def test_cli_revoke_offline_and_errors(pki: PKI, tmp_path: Path) -> None:
    victim = pki.issue("client", "mallory")
    data = tmp_path / "data"
    data.mkdir()
    assert main(["pki", "revoke", str(victim.cert), "--data-dir", str(data)]) == 0
    line = json.loads((data / "revoked.jsonl").read_text().splitlines()[0])
    assert format(victim.serial, "x") in json.dumps(line)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope")
    assert main(["pki", "revoke", str(garbage), "--data-dir", str(data)]) == 2
    assert main(["pki", "revoke", str(victim.cert), "--gateway", "127.0.0.1:1"]) == 2


def test_a_nonce_is_accepted_once_per_window(gateway: RunningGateway, pki: PKI) -> None:
    with client(pki, "demo") as demo:
        url = f"{gateway.base}/v2/models/iris/infer"
        first = demo.post(url, json=infer_body(IRIS), headers={"ztgate-nonce": "n-1"})
        replay = demo.post(url, json=infer_body(IRIS), headers={"ztgate-nonce": "n-1"})
        other = demo.post(url, json=infer_body(IRIS), headers={"ztgate-nonce": "n-2"})
        bad = demo.post(url, json=infer_body(IRIS), headers={"ztgate-nonce": "x" * 200})
    assert first.status_code == 200 and other.status_code == 200
    assert replay.status_code == 409 and replay.json()["type"].endswith("/replayed-request")
    assert bad.status_code == 400
    # Another identity's nonces are its own.
    with client(pki, "bob") as bob:
        again = bob.post(url, json=infer_body(IRIS), headers={"ztgate-nonce": "n-1"})
    assert again.status_code == 200
