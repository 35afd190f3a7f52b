"""Edge -> core forwarding in the production deployment (docs/ddil.md, "Forwarding to
the core"; tests/system/cluster.py builds it).

The edge gateway of site `EDGE_SITE` runs in production mode beside the core; its one
node is down (nothing listens at its address), so every request a client sends it ends
in the edge's own `upstream-failed` after the edge's policy allowed it, and goes to the
core's forward listener through the fault proxy `Edge.link`, with the customer's
forwarder certificate for the site. What the client gets is the core's answer, and the
core's receipt names the client (not the forwarder) and the site that forwarded it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.forward.client import SITE_HEADER, SITE_WHY_HEADER, CoreForwarder
from gateway.protocol.problems import PROBLEM_BASE
from tests.system.cluster import (
    EDGE_SITE,
    FORWARD_TIMEOUT_S,
    SITE,
    TRUST_DOMAIN,
    WITNESS_NAME,
    ProductionCluster,
)
from tests.system.customer_pki import Leaf
from tests.system.figures import say
from tests.system.traffic import Call

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

CLIENT = "shop"  # in group apps: the officer's permit lets the edge act for it
EDGE_REFUSALS = {PROBLEM_BASE + "no-healthy-node", PROBLEM_BASE + "upstream-failed"}
# The core reloads forward.crl every tls.reload_interval_s (5 s by default): a bound on
# the wait for the new CRL to take effect, not a timed assertion.
CRL_DEADLINE_S = 60.0
EXPORT_DEADLINE_S = 60.0

# Receipt ids of the answers the core gave for the edge, for the export test.
FORWARDED: list[str] = []


def _at_edge(cluster: ProductionCluster) -> httpx.Response:
    """One iris inference by the client at the edge (the client's own certificate)."""
    body = Call(CLIENT, "iris", "none", 0, 200).body()
    # A client timeout well past the edge's forward timeout: an answer, not the client
    # giving up, is what the link-cut test reads.
    with cluster.client(CLIENT, timeout=FORWARD_TIMEOUT_S * 6) as c:
        return c.post(f"{cluster.edge.gateway.base}/v2/models/iris/infer", json=body)


def _core_receipt(cluster: ProductionCluster, rid: str) -> dict[str, Any]:
    """The receipt as the core that signed it serves it, read by the client it names."""
    with cluster.client(CLIENT, timeout=30) as c:
        got = c.get(f"{cluster.edge.core.base}/v2/receipts/{rid}")
    assert got.status_code == 200, got.text
    doc: dict[str, Any] = got.json()["receipt"]
    return doc


def _forwarded_answer(cluster: ProductionCluster) -> str:
    """Positive control shared by every test here: the edge's client answered by the
    core, and the core's receipt names the client and the edge's site. Returns its id."""
    r = _at_edge(cluster)
    assert r.status_code == 200, r.text
    assert r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
    assert r.headers[SITE_HEADER] == SITE
    rid = r.json()["parameters"]["ztgate.receipt_id"]
    assert rid in r.headers["ztgate-receipt"]
    rec = _core_receipt(cluster, rid)
    assert rec["client"]["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/client/{CLIENT}"
    assert rec["ext"]["forwarded_by"] == EDGE_SITE
    assert rec["ext"]["forward_hops"] == [EDGE_SITE]
    assert rec["ext"]["site"] == SITE
    assert rec["ext"]["site_why"] == "forwarded-to-core"
    assert cluster.edge.forwarder.spiffe_id not in json.dumps(rec)  # the client's, not its
    FORWARDED.append(rid)
    return rid


def test_an_edge_without_nodes_is_answered_by_the_core_as_the_client(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    t0 = time.monotonic()
    _forwarded_answer(cluster)
    say(f"  forwarding: edge -> core answer in {time.monotonic() - t0:.2f}s (first, new link)")
    t0 = time.monotonic()
    _forwarded_answer(cluster)
    say(f"  forwarding: edge -> core answer in {time.monotonic() - t0:.2f}s (warm)")


def test_the_core_does_not_let_the_edge_act_for_a_client_its_permit_does_not_name(
    production_cluster: ProductionCluster,
) -> None:
    """`ari` (an analyst, no application) may call iris herself, at the edge and at the
    core; the officer's `forward_for` permit names only applications, so the core refuses
    the edge acting for her, and that refusal is what she gets. Control: `shop`, the same
    request at the same edge, answered."""
    cluster = production_cluster
    body = Call("ari", "iris", "none", 0, 200).body()
    with cluster.client("ari", timeout=60) as c:
        direct = c.post(f"{cluster.edge.core.base}/v2/models/iris/infer", json=body)
        assert direct.status_code == 200, direct.text  # the core would answer her call
        r = c.post(f"{cluster.edge.gateway.base}/v2/models/iris/infer", json=body)
    assert r.status_code == 403, r.text
    assert r.headers[SITE_WHY_HEADER] == "forwarded-to-core"  # the core's word, not the edge's
    assert r.json().get("reason") == "forward-for-denied", r.text
    _forwarded_answer(cluster)


def test_a_cut_link_gives_the_edges_own_refusal_not_a_hang(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    _forwarded_answer(cluster)  # positive control: the link up, the same request
    cluster.edge.link.cut()
    try:
        t0 = time.monotonic()
        r = _at_edge(cluster)
        took = time.monotonic() - t0
    finally:
        cluster.edge.link.restore()
    # The edge's own problem: no local node could answer, and the core was not reached.
    assert r.status_code in (502, 503), r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] in EDGE_REFUSALS, r.text
    assert SITE_WHY_HEADER not in r.headers
    say(f"  forwarding: link cut -> edge's own {r.status_code} in {took:.2f}s")
    _forwarded_answer(cluster)  # and once restored, answered again


def test_a_stalled_link_is_bounded_by_the_forward_timeout(
    production_cluster: ProductionCluster,
) -> None:
    """The link up but silent (every chunk held far longer than `forward.timeout_s`): the
    edge gives up on the core after its forward timeout and answers its own refusal,
    before the client's own (much longer) timeout. Control: the same request answered."""
    cluster = production_cluster
    _forwarded_answer(cluster)
    cluster.edge.link.delay(FORWARD_TIMEOUT_S * 4)
    try:
        t0 = time.monotonic()
        r = _at_edge(cluster)  # would raise httpx.ReadTimeout had the edge hung
        took = time.monotonic() - t0
    finally:
        cluster.edge.link.restore()
    assert r.status_code in (502, 503), r.text
    assert r.json()["type"] in EDGE_REFUSALS, r.text
    assert SITE_WHY_HEADER not in r.headers
    say(f"  forwarding: stalled link -> edge's own {r.status_code} in {took:.2f}s "
        f"(forward.timeout_s = {FORWARD_TIMEOUT_S})")  # fmt: skip
    _forwarded_answer(cluster)


def test_serve_check_names_a_missing_forward_file_for_either_role(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    """`serve --check` passed for the core replicas and the edge as deployed (cluster.py,
    the positive control); the same configs with the file a [forward] key names gone are
    refused by --check, one line naming the key, as the other files are, not left for the
    start to find."""
    cluster = production_cluster
    cases = (
        (cluster.replicas[0].config, "crl", cluster.forward_crl),
        (cluster.replicas[0].config, "ca", cluster.pki.ca("forwarder")),
        (cluster.edge.gateway.config, "cert", cluster.edge.forwarder.cert),
        (cluster.edge.gateway.config, "key", cluster.edge.forwarder.key),
        (cluster.edge.gateway.config, "core_ca", cluster.pki.root_ca),
    )
    for i, (config, key, path) in enumerate(cases):
        text = config.read_text()
        line = f"{key} = {json.dumps(str(path))}"
        assert line in text, (config, line)
        broken = tmp_path / f"{i}-{key}.toml"
        broken.write_text(text.replace(line, f"{key} = {json.dumps(str(tmp_path / 'gone'))}"))
        r = cluster.cli("serve", "--config", str(broken), "--check")
        assert r.returncode == 2, (key, r.stdout, r.stderr)
        # (Its ports are taken by the running gateway too: --check says so as well.)
        named = [ln for ln in r.stderr.splitlines() if f": forward.{key}: " in ln]
        assert len(named) == 1 and "does not exist" in named[0], r.stderr


async def _as_forwarder(cluster: ProductionCluster, forwarder: Leaf) -> httpx.Response:
    """What an edge holding `forwarder` sends the core for the client: the product's own
    forwarding client, a new connection (so a new handshake) each time."""
    client = cluster.pki.client(CLIENT)
    pem = client.cert.read_text()
    leaf_pem = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    fwd = CoreForwarder(
        site=EDGE_SITE,
        trust_domain=TRUST_DOMAIN,
        core_url=f"https://127.0.0.1:{cluster.edge.core.forward_port}",
        core_site=SITE,
        cert=forwarder.cert,
        key=forwarder.key,
        core_ca=cluster.pki.root_ca,
        timeout_s=FORWARD_TIMEOUT_S,
    )
    try:
        r = await fwd.open(
            client_cert=leaf_pem + "\n",
            path="/v2/models/iris/infer",
            model="iris",
            version="",
            body=json.dumps(Call(CLIENT, "iris", "none", 0, 200).body()).encode(),
            content_type="application/json",
            extra=None,
            head_s=FORWARD_TIMEOUT_S,
        )
        try:
            await r.aread()  # the whole answer, as the edge reads one
        finally:
            await r.aclose()
        return r
    finally:
        await fwd.aclose()


def test_a_forwarder_certificate_revoked_in_the_crl_is_refused_by_the_core(
    production_cluster: ProductionCluster,
) -> None:
    """The customer revokes a forwarder certificate of the edge's site (a spare, so the
    edge's own keeps working for the other tests) by publishing a new forwarder CRL where
    the core's `forward.crl` points; the running core reloads it and refuses that
    certificate at the handshake. Control: the same certificate answered before, and the
    edge's own (not revoked) still forwards after."""
    cluster = production_cluster
    spare = cluster.pki.forwarder(EDGE_SITE, name=f"{EDGE_SITE}-spare")
    before = asyncio.run(_as_forwarder(cluster, spare))
    assert before.status_code == 200, before.text  # the spare is a good forwarder
    rid = before.json()["parameters"]["ztgate.receipt_id"]
    assert _core_receipt(cluster, rid)["ext"]["forwarded_by"] == EDGE_SITE
    FORWARDED.append(rid)
    cluster.pki.forwarder_crl([spare], cluster.forward_crl)
    published = time.monotonic()
    while True:
        try:
            r = asyncio.run(_as_forwarder(cluster, spare))
        except (httpx.HTTPError, ssl.SSLError) as exc:
            # TLS 1.3: the client finishes its side of the handshake before the core's
            # verdict on its certificate arrives, so the alert surfaces at the first read
            # (raw ssl.SSLError there; the edge's failover catches it as an OSError).
            refused = exc
            break
        # The old CRL at the handshake: still served, or already refused by the listener,
        # which reads forward.crl per request (forwarder-revoked); never half-served.
        assert r.status_code == 200 or r.json().get("reason") == "forwarder-revoked", r.text
        assert time.monotonic() - published < CRL_DEADLINE_S, "the new CRL never took effect"
        time.sleep(0.5)
    assert "CERTIFICATE_REVOKED" in str(refused), repr(refused)  # the core's alert, no other
    say(
        f"  forwarding: revoked forwarder refused {time.monotonic() - published:.1f}s after the CRL"
    )
    _forwarded_answer(cluster)  # the edge's own certificate is not revoked: still forwards


def test_the_cores_export_verifies_with_the_forwarded_receipts(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    """The auditor's view from the core: the witness's export of the core's logs verifies,
    and the receipts the core signed for the edge's client are in it, naming the site."""
    cluster = production_cluster
    FORWARDED.append(_forwarded_answer(cluster))  # at least one, whatever ran before
    wanted = set(FORWARDED)
    trust = tmp_path / "trust.json"
    log_dirs = [a for r in cluster.replicas for a in ("--log-dir", str(r.receipts_dir))]
    r = cluster.cli("audit", "trust", *log_dirs)
    assert r.returncode == 0, r.stderr
    trust.write_text(r.stdout)
    start = time.monotonic()
    attempt = 0
    while True:  # the replicas upload each checkpoint's leaves and bodies to the witness
        attempt += 1
        bundle = tmp_path / f"from-core-{attempt}"
        exported = cluster.cli("witness", "export", "--dir", str(cluster.witness_dir),
                               "--out", str(bundle), "--json")  # fmt: skip
        assert exported.returncode == 0, exported.stdout + exported.stderr
        v = cluster.cli("verify", str(bundle), "--trust", str(trust), "--json",
                        "--require-witness", WITNESS_NAME)  # fmt: skip
        report = json.loads(v.stdout)
        valid = {
            f["subject"].removeprefix("receipt ")
            for f in report["findings"]
            if f["status"] == "valid" and f["subject"].startswith("receipt ")
        }
        if wanted <= valid:
            break
        assert time.monotonic() - start < EXPORT_DEADLINE_S, sorted(wanted - valid)
        time.sleep(1.0)
    bad = [f for f in report.get("findings", []) if f.get("status") != "valid"]
    # As in test_edge_link.py: a zk proof's files may still be in flight; nothing else.
    assert {f["code"] for f in bad} <= {"zk-evidence-missing"}, json.dumps(bad, indent=1)[:4000]
    bodies = {}
    for path in bundle.glob("logs/*/receipts/*.json"):
        rec = json.loads(path.read_text())["receipt"]
        if rec["id"] in wanted:
            bodies[rec["id"]] = rec
    assert set(bodies) == wanted, sorted(wanted - set(bodies))
    for rec in bodies.values():
        assert rec["ext"]["forwarded_by"] == EDGE_SITE
        assert rec["client"]["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/client/{CLIENT}"
