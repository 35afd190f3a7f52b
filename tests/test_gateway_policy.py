"""Policy in the running gateway: decisions, rate limits, revocation, reload, signed bundles."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.cli import main
from gateway.config import Config
from gateway.pipeline.decide import flush_decisions
from gateway.pki import PKI, load_signing_key
from gateway.policy.bundle import build_bundle, facts_from, sign_bundle
from gateway.registry import Registry
from gateway.runtime import ProductionRefused, build_gateway
from gateway.server import connections_opened
from tests.conftest import TritonCluster
from tests.gateway_harness import (
    SHIPPED_POLICIES,
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
    tls_redis,
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
    flush_decisions()  # the writer thread's records, all of them, before reading
    records = [json.loads(r.message) for r in caplog.records if r.name == "ztgate.decisions"]
    # One record per request, in order: who, what, in which mode, and the result.
    assert [
        (r["spiffe_id"].rsplit("/", 1)[1], r["model"], r["mode"], r["result"]) for r in records
    ] == [
        ("demo", "iris", "none", "allow"),
        ("nobody", "iris", None, "deny"),
        ("demo", "risk", None, "deny"),
        ("demo", "iris", "zk", "deny"),
    ]
    assert records[0]["determining"] == ["apps-call-public-internal"]
    assert "restricted-needs-clearance" in records[2]["determining"]
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
            # (sent without a body: a refusal with body bytes unread closes the connection,
            # and this test is about the one connection bob keeps)
            assert c.post(f"{gw.base}/admin/revoke").status_code == 403
            # ... an officer may.
            pem = bob.cert.read_text().split("-----END CERTIFICATE-----")[0]
            r = officer.post(
                f"{gw.base}/admin/revoke",
                json={"certificate": pem + "-----END CERTIFICATE-----\n"},
            )
            assert r.status_code == 200, r.text
            after = infer(c, gw)
            assert after.status_code == 401
            assert after.json()["detail"] == "client certificate has been revoked"
            assert connections_opened() == opened + 2  # bob's one connection, olga's one
        # Garbage to the admin endpoint: a clear 400, not a 500.
        with client(pki, "olga") as officer:
            for bad in (b"{", b"[]", b'{"issuer": "x", "serial": "zz"}', b'{"certificate": "no"}'):
                r = officer.post(f"{gw.base}/admin/revoke", content=bad)
                assert r.status_code == 400, bad
    # A restart remembers: revocations are durable, not soft state.
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        again = infer(c, gw)
        assert again.status_code == 401
        assert again.json()["detail"] == "client certificate has been revoked"


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
            # Replica B learns it within a few sync rounds of 0.2 s; 30 s only bounds the wait.
            end = time.monotonic() + 30
            while (r := infer(c, b)).status_code == 200 and time.monotonic() < end:
                time.sleep(0.1)
            assert r.status_code == 401
            assert r.json()["detail"] == "client certificate has been revoked"
    import redis

    raw = redis.Redis.from_url(redis_server)
    raw.flushall()
    assert raw.dbsize() == 0  # the wipe is real: the store knows no revocation now
    with running_gateway(cfg_b) as b, httpx.Client(verify=ctx, timeout=10) as c:
        assert infer(c, b).status_code == 401  # B's own grow-only copy still has it
        # ... and B gave the store back what it lost, so a replica without a copy of its
        # own (a new data_dir) learns it from the store.
        cfg_c = gateway_config(
            pki, registry_dir, tmp_path / "c", node_table(triton_cluster), state=state
        )
        with running_gateway(cfg_c) as fresh:
            assert infer(c, fresh).status_code == 401


def _issuer(pki: PKI) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(
        pki.client_ca_bundle().read_bytes()
    ).subject.rfc4514_string()


# Per hour, so no token comes back during the test: a refill takes 180 s, and the 60
# requests below take a few seconds even on a loaded machine (the margin is ~30x).
LIMITED = """
@id("limited-callers")
@rate("20/hour")
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
    # One bucket of 20, not one per replica: the first 20 pass, every later one is limited.
    assert statuses == [200] * 20 + [429] * 40, statuses


def test_admission_limit_applies_before_policy(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path / "d",
        node_table(triton_cluster),
        # Per hour: a token comes back after 720 s, and 8 requests take far less.
        policy={"pre_policy_rate": "5/hour"},
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


def test_signed_bundles_refuse_tampering_and_rollback(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """Everything of production but the PKI: this session's nodes and clients hold dev
    certificates, which production now recognises by themselves (so it runs as dev, and
    tests/system/ runs the same bundle flow in production on a customer PKI)."""
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

    def bundle(version: int, signer: Any = key) -> bytes:
        b = build_bundle(policies, facts, version, dt.timedelta(days=1), "0.1.0", 300)
        return sign_bundle(b, signer)

    path = tmp_path / "bundle.json"
    path.write_bytes(bundle(5))
    officer_pub = str(pki.key_path("officer-policy").with_suffix(".pub"))
    with tls_redis(pki, tmp_path / "redis") as redis_url:

        def production(data: str, mode: str = "production", **policy: Any) -> Config:
            return gateway_config(
                pki,
                registry_dir,
                tmp_path / data,
                nodes,
                mode=mode,
                tls={"dev_pki": False},
                state={"redis_url": redis_url},
                jobs={"key_file": str(tmp_path / data / "jobs.key")},
                policy={"dir": None, "bundle": str(path), "officer_keys": [officer_pub], **policy},
            )

        # The flag says production PKI; the certificates say otherwise, and nothing else
        # in this config is dev-only.
        [only] = production("p1").dev_only_items()
        assert "issued by the development PKI" in only
        with pytest.raises(ProductionRefused, match="issued by the development PKI"):
            build_gateway(production("p1"))
        cfg = production("p2", mode="dev")
        # Production refuses an unsigned policy directory, and a bundle with no key to check.
        unsigned = production("p3", dir=str(policies), bundle=None)
        with pytest.raises(ProductionRefused, match=re.escape("policy.dir: an unsigned")):
            build_gateway(unsigned)
        unchecked = production("p4", officer_keys=[])
        with pytest.raises(ProductionRefused, match=re.escape("without policy.officer_keys")):
            build_gateway(unchecked)
        with (
            running_gateway(cfg) as gw,
            client(pki, "olga") as officer,
            client(pki, "demo") as demo,
        ):
            assert gw.gw.policy.current.version == 5
            assert infer(demo, gw).status_code == 200

            def refused(data: bytes, status: int = 400, kind: str = "bad-request") -> str:
                r = officer.post(f"{gw.base}/admin/reload", content=data)
                assert r.status_code == status, r.text
                assert r.json()["type"].endswith("/" + kind)
                assert gw.gw.policy.current.version == 5
                detail: str = r.json()["detail"]
                return detail.removeprefix("policy rejected, previous policy kept: ")

            rollback = refused(bundle(4), 409, "policy-rollback")
            assert rollback.startswith("rollback: bundle v4 is older than v5")
            envelope = json.loads(bundle(6))
            payload = json.loads(base64.b64decode(envelope["payload"]))
            payload["version"] = 7  # altered after signing
            envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
            altered = json.dumps(envelope).encode()
            assert refused(altered).startswith("bad-signature: ")
            other_key = load_signing_key(pki.key_path("receipt-signing"))
            assert refused(bundle(6, other_key)).startswith("untrusted-key: ")
            six = bundle(6)
            assert officer.post(f"{gw.base}/admin/reload", content=six).status_code == 200
            assert gw.gw.policy.current.version == 6
        # The accepted bundle is what the next start reads; it is kept in the gateway's
        # data dir, and the officer's file is never written.
        assert path.read_bytes() != six
        assert (tmp_path / "p2" / "policy" / "accepted-bundle.json").read_bytes() == six
        with running_gateway(cfg) as gw, client(pki, "demo") as demo:
            assert gw.gw.policy.current.version == 6
            assert infer(demo, gw).status_code == 200


def test_cli_revoke_offline_and_errors(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = pki.issue("client", "mallory")
    data = tmp_path / "data"
    data.mkdir()
    assert main(["pki", "revoke", str(victim.cert), "--data-dir", str(data)]) == 0
    lines = (data / "revoked.jsonl").read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert (line["issuer"], line["serial"]) == (_issuer(pki), format(victim.serial, "x"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope")
    capsys.readouterr()
    assert main(["pki", "revoke", str(garbage), "--data-dir", str(data)]) == 2
    assert f"{garbage}: not a PEM certificate" in capsys.readouterr().err
    assert main(["pki", "revoke", str(victim.cert), "--gateway", "127.0.0.1:1"]) == 2
    assert "--gateway needs --cert, --key and --ca" in capsys.readouterr().err


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


# A new rule for 20-sensitive.cedar, so the two-step save below changes something real.
SMALL_BATCHES = """// Restricted models: small batches only.
@id("restricted-small-batches")
forbid (principal, action == Ztgate::Action::"infer", resource)
when { resource.classification == "restricted" && context.batch_size > 64 };"""
MPC_RULE = "restricted-only-under-mpc"


def test_a_half_written_policy_file_never_decides_a_request(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dev hot reload while a client keeps asking for the restricted model `risk` in mode
    `redundant`, which only `restricted-only-under-mpc` forbids (carol is cleared, clearance
    3, declares a purpose). 20-sensitive.cedar is saved non-atomically: truncated, then the
    new content in two writes, the first ending on a complete rule so that it parses. The
    new content puts the mpc rule last, so both intermediate states lack it."""
    caplog.set_level(logging.ERROR, logger="gateway.policy.live")
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path / "data",
        node_table(triton_cluster),
        policy={"watch_interval_s": 0.2},
    )
    pol = cfg.policy.dir
    assert pol is not None
    path = pol / "20-sensitive.cedar"
    header, *rules = path.read_text().strip().split("\n\n")
    mpc = next(r for r in rules if f'@id("{MPC_RULE}")' in r)
    half = "\n\n".join([header, *(r for r in rules if r is not mpc)]) + "\n\n"
    new = half + SMALL_BATCHES + "\n\n" + mpc + "\n"
    params = {"ztgate.verification": "redundant", "ztgate.purpose": "test"}
    answers: list[tuple[str, int]] = []  # (phase, status) of every request
    phase = ["start"]
    stop = threading.Event()

    with running_gateway(cfg) as gw, client(pki, "carol") as carol:
        live = gw.gw.policy

        def asker() -> None:
            with client(pki, "carol") as c:
                while not stop.is_set():
                    label = phase[0]
                    answers.append((label, infer(c, gw, "risk", **params).status_code))

        def step(label: str, edit: Any) -> None:
            """Edit, then wait until the watcher has judged the directory as it now is
            (refused it or loaded it) and the asker made requests against that state;
            then ask once more here, so each state is asked at least once after judgment."""
            rejected, current = live.rejected, live.engine.source.hash
            phase[0] = label
            edit()
            end = time.monotonic() + 60  # only bounds the wait: no timing is asserted
            while live.rejected == rejected and live.engine.source.hash == current:
                assert time.monotonic() < end, f"{label}: the watcher never judged it"
                time.sleep(0.02)
            seen = sum(p == label for p, _ in answers)
            while not stop.is_set() and sum(p == label for p, _ in answers) < seen + 5:
                assert time.monotonic() < end and thread.is_alive(), label
                time.sleep(0.02)
            answers.append((label, infer(carol, gw, "risk", **params).status_code))

        first = infer(carol, gw, "risk", **params)
        assert first.status_code == 403, first.text
        thread = threading.Thread(target=asker, daemon=True)
        thread.start()
        try:
            with open(path, "r+", encoding="utf-8") as f:  # one non-atomic save
                step("truncated", lambda: (f.truncate(0), f.flush()))
                step("first write", lambda: (f.write(half), f.flush()))
                step("second write", lambda: (f.write(new[len(half) :]), f.flush()))
            # The complete save took effect: the new rule is in force.
            assert live.engine.source.policy("restricted-small-batches") is not None
            # Removing the forbid, atomically, but without the marker: refused too.
            step("atomic, unmarked", lambda: _replace(path, new.replace(mpc, "")))
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive()

        phases = ("truncated", "first write", "second write", "atomic, unmarked")
        counts = {p: sum(q == p for q, _ in answers) for p in phases}
        assert all(n >= 6 for n in counts.values()), counts
        assert len(answers) >= 24
        print(f"requests during the reloads: {len(answers)} ({counts})")  # shown with -s
        slipped = [(p, s) for p, s in answers if s != 403]
        assert slipped == [], f"{len(slipped)} of {len(answers)} answered: {slipped[:5]}"
        # Each refusal is counted (the metric operators alert on) and logged with why.
        assert live.rejected == 3
        metrics = httpx.get(f"{gw.admin_base}/metrics", timeout=10).text
        assert "ztgate_policy_rejected_reloads_total 3.0" in metrics
        refusals = [r.getMessage() for r in caplog.records if "REJECTED" in r.getMessage()]
        assert len(refusals) == 3 and all(MPC_RULE in m and "@removes" in m for m in refusals)

        # Positive control: the same removal, atomic and marked, takes effect, and the very
        # request the loop made is then answered: the 403s above were the forbid's doing.
        marked = new.replace(mpc, "").replace(
            '@id("restricted-small-batches")',
            f'@removes("{MPC_RULE}")\n@id("restricted-small-batches")',
        )
        step("atomic, marked", lambda: _replace(path, marked))
        assert live.engine.source.policy(MPC_RULE) is None and live.rejected == 3
        assert infer(carol, gw, "risk", **params).status_code == 200


def _replace(path: Path, text: str) -> None:
    """An atomic save: write a file the loader does not read, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def test_the_officer_walkthrough_from_edit_to_live(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """policies/README.md "Signing, two officers, and pushing", step by step with the CLI,
    against a running gateway that requires two officers' signatures."""
    nodes = node_table(triton_cluster)
    toml = tmp_path / "gateway.toml"  # the [[nodes]] the bundle's facts are made from
    toml.write_text(
        "".join(
            f'[[nodes]]\nname = "{n["name"]}"\nregion = "{n["region"]}"\n'
            f'provider = "{n["provider"]}"\naddress = "{n["address"]}"\n'
            f'dns_name = "{n["dns_name"]}"\nspiffe_id = "{n["spiffe_id"]}"\n'
            for n in nodes
        )
        # Residency is the officer's to sign: every example model may run anywhere here.
        + "".join(f'[policy.models.{m}]\nresidency = ["*"]\n' for m in ("iris", "mnist", "risk"))
    )
    officer1, officer2 = pki.key_path("officer-policy"), pki.key_path("receipt-signing")
    pubs = [str(k.with_suffix(".pub")) for k in (officer1, officer2)]
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)  # with its example requests (tests/)
    current, following = tmp_path / "current.bundle", tmp_path / "next.bundle"

    def sign(version: int, out: Path, *extra: str) -> int:
        args = ["policy", "bundle", "sign", "--policies", str(policies)]
        args += ["--registry", str(registry_dir), "--nodes", str(toml), "--key", str(officer1)]
        return main([*args, "--version", str(version), "--out", str(out), *extra])

    # The bundle in force: v5, signed by both officers.
    assert sign(5, current) == 0
    assert main(["policy", "bundle", "sign", "--cosign", str(current), "--key", str(officer2)]) == 0
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path / "data",
        nodes,
        policy={
            "dir": None,
            "bundle": str(current),
            "officer_keys": pubs,
            "signatures_required": 2,
        },
    )
    with (
        running_gateway(cfg) as gw,
        client(pki, "olga") as officer,
        client(pki, "zed") as zed,
    ):
        assert gw.gw.policy.current.version == 5
        assert infer(zed, gw).status_code == 403  # zed is in no group yet
        # 1. edit (zed joins the apps group), then check and test
        mapping = json.loads((policies / "identities.json").read_text())
        mapping["clients"]["spiffe://ztgate.local/client/zed"] = {"groups": ["apps"]}
        (policies / "identities.json").write_text(json.dumps(mapping, indent=2))
        capsys.readouterr()
        assert main(["policy", "check", str(policies)]) == 0, capsys.readouterr().out
        assert main(["policy", "test", str(policies)]) == 0, capsys.readouterr().out
        # 2. what it changes against the bundle in force: it widens (exit 3)
        assert main(["policy", "diff", str(current), str(policies)]) == 3
        assert "NEWLY ALLOWED" in capsys.readouterr().out
        # 3. sign v6 with the diff against the bundle in force signed into it
        assert sign(6, following, "--current", str(current)) == 0
        # One signature is not enough for this gateway: push is refused, v5 stays.
        push = ["policy", "push", str(following), "--gateway", f"127.0.0.1:{cfg.listen.port}"]
        olga = pki.ensure("client", "olga")
        push += ["--cert", str(olga.cert), "--key", str(olga.key), "--ca", str(pki.root_ca)]
        capsys.readouterr()
        assert main(push) == 1
        assert "too-few-signatures" in capsys.readouterr().out
        assert gw.gw.policy.current.version == 5
        # 4. the second officer sees the recorded diff and adds a signature
        cosign = ["policy", "bundle", "sign", "--cosign", str(following), "--key", str(officer2)]
        assert main(cosign) == 0
        assert "WIDENS access" in capsys.readouterr().out
        verify = ["policy", "bundle", "verify", str(following), "--required", "2"]
        assert main([*verify, "--trust-key", pubs[0], "--trust-key", pubs[1]]) == 0
        # 5. push it through /admin/reload with the officer's certificate
        capsys.readouterr()
        assert main(push) == 0
        # 6. see it live
        assert "(version 6," in capsys.readouterr().out
        assert gw.gw.policy.current.version == 6
        answered = infer(zed, gw)
        assert answered.status_code == 200, answered.text
        assert officer.get(f"{gw.base}/admin/policy").json()["version"] == 6
