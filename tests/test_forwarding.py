"""Edge -> core forwarding without a confused deputy, and an edge failing over to its core
(docs/ddil.md, "Forwarding to the core").

Real parts throughout: the core is a running gateway (uvicorn, TLS, the shim) with its
forward listener, on this session's real tritonservers; forwarders, clients and the core
hold real certificates from the dev PKI; the edge's node is a real tritonserver that the
test kills, and the edge reaches the core through the fault proxy (a real TCP proxy).
Every refusal test sends, beside the refused request, one built the same way but for the
one thing under test, and that one is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import uvicorn
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.app import Gateway
from gateway.config import Config, ConfigError, Forward
from gateway.faultproxy import ThreadedFaultProxy
from gateway.forward import statement
from gateway.forward.client import SITE_WHY_HEADER, CoreForwarder
from gateway.forward.crl import CHECK_INTERVAL_S, ForwarderCRL
from gateway.forward.limits import SiteLimits
from gateway.pki import PKI, Issued, forwarder_crl
from gateway.ports import free_port
from gateway.runtime import ProductionRefused, build_gateway, check_mode, forward_server, servers
from tests import test_gateway
from tests.conftest import TritonCluster, one_off_node
from tests.gateway_harness import client_context, gateway_config
from tests.test_gateway import node_table
from tests.test_grpc_front import wait_listening

registry_dir = test_gateway.registry_dir  # the fixture: the session's model registry
CORE_SITE = "site-a"
EDGE_SITE = "site-b"  # policies/60-forwarding.cedar lets it forward for apps
OTHER_SITE = "site-c"  # no permit names it
IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)


def infer_body(x: np.ndarray) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": x.astype(np.float32).ravel().tolist(),
                }
            ]
        }
    ).encode()


@dataclasses.dataclass
class Core:
    cfg: Config
    gw: Gateway

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.cfg.listen.port}"

    @property
    def forward_base(self) -> str:
        return f"https://127.0.0.1:{self.cfg.forward.port}"


def site_config(
    sites: PKI, registry: Path, data: Path, nodes: list[dict[str, Any]], site: str, **more: Any
) -> Config:
    """A gateway of `site` on the session's tritonservers, which trust site-a's gateway CA
    only: it calls them with site-a's node-client certificate."""
    cfg = gateway_config(sites, registry, data, nodes, site=site, **more)
    gw_a = sites.root / "gateway" / CORE_SITE
    tls = dataclasses.replace(
        cfg.tls,
        node_client_cert=gw_a / "node-client.crt",
        node_client_key=gw_a / "node-client.key",
    )
    return dataclasses.replace(cfg, tls=tls)


@contextmanager
def running(cfg: Config) -> Iterator[Gateway]:
    """A gateway with its API, admin and (where configured) forward listeners in one
    event loop in a thread, as `ztgate serve` runs them."""
    gw = build_gateway(cfg)
    fwd = forward_server(cfg, gw)
    api, admin = servers(cfg, gw)
    followers: list[uvicorn.Server] = [admin] if fwd is None else [admin, fwd]

    async def main() -> None:
        tasks = [asyncio.create_task(f.serve()) for f in followers]
        try:
            await api.serve()
        finally:
            for f in followers:
                f.should_exit = True
            await asyncio.wait(tasks, timeout=5)

    thread = threading.Thread(target=uvloop.run, args=(main(),), daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not (api.started and all(f.started for f in followers)):
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield gw
    finally:
        api.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def sites(pki: PKI) -> PKI:
    """The session's PKI with the edge sites added (their gateway CAs, forwarders)."""
    return PKI.init(pki.root, trust_domain=pki.trust_domain, sites=[EDGE_SITE, OTHER_SITE])


@pytest.fixture(scope="module")
def core(
    sites: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Core]:
    cfg = gateway_config(
        sites,
        registry_dir,
        tmp_path_factory.mktemp("core"),
        node_table(triton_cluster),
        site=CORE_SITE,
        # mnist may run only in Asia-Pacific, where the core has no node: a residency
        # refusal for the failover test (iris, the control, runs anywhere).
        policy={"models": {"mnist": {"residency": ["ap-"]}}},
    )
    crl = forwarder_crl(sites, [], cfg.data_dir / "forwarder.crl")  # nobody revoked yet
    cfg = dataclasses.replace(
        cfg,
        forward=Forward(port=free_port(), ca=sites.forwarder_ca_bundle(), crl=crl, max_skew_s=30),
    )
    with running(cfg) as gw:
        yield Core(cfg, gw)


def forwarder(sites: PKI, site: str) -> Issued:
    return sites.ensure("forwarder", site, site=site)


def client(sites: PKI, name: str) -> Issued:
    return sites.ensure("client", name)


def leaf_pem(issued: Issued) -> str:
    """The client's leaf certificate, as an edge read it from the handshake."""
    text = issued.cert.read_text()
    end = "-----END CERTIFICATE-----"
    return text[: text.index(end) + len(end)] + "\n"


def send(
    core: Core,
    sites: PKI,
    fwd: Issued,
    who: Issued,
    body: bytes,
    *,
    sent_body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
    **overrides: Any,
) -> tuple[httpx.Response, dict[str, str]]:
    """One forwarded request, the statement built as an edge builds it; `overrides`
    change statement fields, `sent_body` the body on the wire, `headers` replays."""
    if headers is None:
        fields: dict[str, Any] = {
            "site": fwd.name,
            "aud": f"spiffe://{core.cfg.trust_domain}/gateway/{CORE_SITE}",
            "client_cert": leaf_pem(who),
            "body": body,
            "model": "iris",
            "version": "",
        }
        now = overrides.pop("now", None)
        hops = overrides.pop("hops", ())
        st = statement.make(**fields, hops=hops, now=now)
        st = dataclasses.replace(st, **overrides)
        key = serialization.load_pem_private_key(fwd.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        headers = statement.sign(st, key)
    ctx = client_context(sites, fwd.cert, fwd.key)
    with httpx.Client(verify=ctx, timeout=15) as c:
        r = c.post(
            f"{core.forward_base}/v2/models/iris/infer",
            content=body if sent_body is None else sent_body,
            headers={**headers, "content-type": "application/json"},
        )
    return r, headers


def reason(r: httpx.Response) -> str:
    doc = r.json()
    return f"{doc['type'].rsplit('/', 1)[-1]}:{doc.get('reason', '')}"


def receipt(core: Core, sites: PKI, who: Issued, r: httpx.Response) -> dict[str, Any]:
    params = r.json()["parameters"]
    ctx = client_context(sites, who.cert, who.key)
    with httpx.Client(verify=ctx, timeout=10) as c:
        got = c.get(f"{core.base}/v2/receipts/{params['ztgate.receipt_id']}")
    assert got.status_code == 200, got.text
    doc: dict[str, Any] = got.json()["receipt"]
    return doc


# --- the core's checks ------------------------------------------------------------------
def test_a_forwarded_request_is_answered_as_the_client_and_the_receipt_names_the_site(
    core: Core, sites: PKI
) -> None:
    alice = client(sites, "alice")
    r, _ = send(core, sites, forwarder(sites, EDGE_SITE), alice, infer_body(IRIS))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"][0] == len(IRIS)
    rec = receipt(core, sites, alice, r)
    assert rec["client"]["spiffe_id"] == "spiffe://ztgate.local/client/alice"
    assert rec["ext"]["forwarded_by"] == EDGE_SITE
    assert rec["ext"]["forward_hops"] == [EDGE_SITE]
    assert rec["ext"]["site"] == CORE_SITE
    assert rec["ext"]["site_why"] == "forwarded-to-core"


def test_a_client_certificate_on_the_forward_listener_fails_the_handshake(
    core: Core, sites: PKI
) -> None:
    alice = client(sites, "alice")
    listener = core.gw.forward_listener  # type: ignore[attr-defined]
    reached = listener.accepted + sum(listener.refusals.values())
    with pytest.raises(httpx.HTTPError):
        send(core, sites, alice, alice, infer_body(IRIS))
    assert listener.accepted + sum(listener.refusals.values()) == reached  # never got in
    r, _ = send(core, sites, forwarder(sites, EDGE_SITE), alice, infer_body(IRIS))
    assert r.status_code == 200, r.text


def test_a_forwarder_certificate_on_the_client_listener_fails_the_handshake(
    core: Core, sites: PKI
) -> None:
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")

    def call(who: Issued) -> int:
        with httpx.Client(verify=client_context(sites, who.cert, who.key), timeout=10) as c:
            return c.post(f"{core.base}/v2/models/iris/infer", content=infer_body(IRIS)).status_code

    with pytest.raises(httpx.HTTPError):
        call(fwd)
    assert call(alice) == 200


def test_a_replayed_statement_is_refused(core: Core, sites: PKI) -> None:
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    body = infer_body(IRIS)
    first, headers = send(core, sites, fwd, alice, body)
    assert first.status_code == 200, first.text
    again, _ = send(core, sites, fwd, alice, body, headers=headers)
    assert again.status_code == 409
    assert reason(again) == "replayed-request:replayed"


def test_a_swapped_body_is_refused(core: Core, sites: PKI) -> None:
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    body, other = infer_body(IRIS), infer_body(IRIS[::-1].copy())
    r, _ = send(core, sites, fwd, alice, body, sent_body=other)
    assert r.status_code == 403 and reason(r) == "forbidden:body-digest"
    ok, _ = send(core, sites, fwd, alice, other)
    assert ok.status_code == 200, ok.text


def test_a_statement_for_another_gateway_is_refused(core: Core, sites: PKI) -> None:
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    r, _ = send(
        core, sites, fwd, alice, infer_body(IRIS), aud="spiffe://ztgate.local/gateway/site-z"
    )
    assert r.status_code == 403 and reason(r) == "forbidden:statement-audience"
    ok, _ = send(core, sites, fwd, alice, infer_body(IRIS))
    assert ok.status_code == 200, ok.text


def test_a_stale_statement_is_refused(core: Core, sites: PKI) -> None:
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    skew = core.cfg.forward.max_skew_s
    r, _ = send(core, sites, fwd, alice, infer_body(IRIS), now=time.time() - 4 * skew)
    assert r.status_code == 403 and reason(r) == "forbidden:statement-time"
    ahead, _ = send(core, sites, fwd, alice, infer_body(IRIS), now=time.time() + 4 * skew)
    assert ahead.status_code == 403 and reason(ahead) == "forbidden:statement-time"
    ok, _ = send(core, sites, fwd, alice, infer_body(IRIS), now=time.time() - skew / 3)
    assert ok.status_code == 200, ok.text


def test_a_loop_back_through_the_core_is_refused(core: Core, sites: PKI) -> None:
    """edge -> core -> edge -> core: the hop list names the core, which refuses it."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    r, _ = send(core, sites, fwd, alice, infer_body(IRIS), hops=(EDGE_SITE, CORE_SITE))
    assert r.status_code == 403 and reason(r) == "forbidden:forward-loop"
    ok, _ = send(core, sites, fwd, alice, infer_body(IRIS))
    assert ok.status_code == 200, ok.text


def test_a_hop_list_naming_more_than_the_sender_is_refused(core: Core, sites: PKI) -> None:
    """Nothing forwards a forwarded request, so the only hop is the sender: a longer list
    would put the edge's word alone into the core's receipt (`ext.forward_hops`)."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    r, _ = send(core, sites, fwd, alice, infer_body(IRIS), hops=(OTHER_SITE,))
    assert r.status_code == 403 and reason(r) == "forbidden:forward-hops"
    ok, _ = send(core, sites, fwd, alice, infer_body(IRIS))
    assert ok.status_code == 200, ok.text
    assert receipt(core, sites, alice, ok)["ext"]["forward_hops"] == [EDGE_SITE]


def test_a_statement_naming_another_site_than_its_certificate_is_refused(
    core: Core, sites: PKI
) -> None:
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    r, _ = send(core, sites, fwd, alice, infer_body(IRIS), site=OTHER_SITE, hops=(OTHER_SITE,))
    assert r.status_code == 403 and reason(r) == "forbidden:statement-site"


def test_a_client_revoked_at_the_core_is_refused_though_the_edge_accepts_it(
    core: Core, sites: PKI, tmp_path: Path
) -> None:
    """The edge has no idea (it still signs for the client); the core's own revocation
    set decides. `bob` is an application like alice, revoked at the core only."""
    fwd = forwarder(sites, EDGE_SITE)
    bob = sites.issue("client", "bob", out=(tmp_path / "bob.crt", tmp_path / "bob.key"))
    before, _ = send(core, sites, fwd, bob, infer_body(IRIS))
    assert before.status_code == 200, before.text
    olga = client(sites, "olga")
    with httpx.Client(verify=client_context(sites, olga.cert, olga.key), timeout=10) as c:
        revoked = c.post(f"{core.base}/admin/revoke", json={"certificate": bob.cert.read_text()})
    assert revoked.status_code == 200, revoked.text
    after, _ = send(core, sites, fwd, bob, infer_body(IRIS))
    assert after.status_code in (401, 403), after.text
    assert "revoked" in after.json()["detail"]
    ok, _ = send(core, sites, fwd, client(sites, "alice"), infer_body(IRIS))
    assert ok.status_code == 200, ok.text


def test_forward_for_decides_which_site_may_act_for_which_client(
    core: Core, sites: PKI, tmp_path: Path
) -> None:
    alice = client(sites, "alice")
    other, _ = send(core, sites, forwarder(sites, OTHER_SITE), alice, infer_body(IRIS))
    assert other.status_code == 403 and reason(other) == "forbidden:forward-for-denied"
    # carol calls the core herself under her own permits; no permit lets a site act for her.
    carol = client(sites, "carol")
    r, _ = send(core, sites, forwarder(sites, EDGE_SITE), carol, infer_body(IRIS))
    assert r.status_code == 403 and reason(r) == "forbidden:forward-for-denied"
    ok, _ = send(core, sites, forwarder(sites, EDGE_SITE), alice, infer_body(IRIS))
    assert ok.status_code == 200, ok.text


def test_a_client_certificate_not_from_the_client_ca_is_refused(
    core: Core, sites: PKI, tmp_path: Path
) -> None:
    """An edge cannot mint clients: the certificate it names must be the core's CA's."""
    stranger_pki = PKI.init(tmp_path / "stranger", sites=[CORE_SITE])
    mallory = stranger_pki.issue("client", "alice")
    r, _ = send(core, sites, forwarder(sites, EDGE_SITE), mallory, infer_body(IRIS))
    assert r.status_code == 403 and reason(r) == "forbidden:client-certificate"


def test_forward_refusals_are_counted_on_the_gateways_metrics_by_reason(
    core: Core, sites: PKI
) -> None:
    """What the listener counts reaches Prometheus: a refusal under its reason, and
    (the control) an accepted request under `accepted`, on the core's own /metrics."""

    def scrape() -> dict[tuple[str, str], float]:
        r = httpx.get(f"http://127.0.0.1:{core.cfg.listen.admin_port}/metrics", timeout=10)
        assert r.status_code == 200
        return {
            (s.name, s.labels.get("reason", "")): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
            if s.name.startswith("ztgate_forward_")
        }

    refused = ("ztgate_forward_refusals_total", "statement-audience")
    accepted = ("ztgate_forward_accepted_total", "")
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    before = scrape()
    r, _ = send(
        core, sites, fwd, alice, infer_body(IRIS), aud="spiffe://ztgate.local/gateway/site-z"
    )
    assert reason(r) == "forbidden:statement-audience"
    ok, _ = send(core, sites, fwd, alice, infer_body(IRIS))
    assert ok.status_code == 200, ok.text
    after = scrape()
    assert after[refused] == before.get(refused, 0.0) + 1
    assert after[accepted] == before[accepted] + 1


def test_a_revoked_forwarder_fails_the_handshake_from_the_next_crl_on(
    core: Core, sites: PKI, tmp_path: Path
) -> None:
    """A captured site's forwarder certificate, revoked in the forwarder CA's CRL, no
    longer reaches the core; another site's forwarder still does."""
    captured = sites.issue(
        "forwarder", OTHER_SITE, site=OTHER_SITE, out=(tmp_path / "f.crt", tmp_path / "f.key")
    )
    alice = client(sites, "alice")
    before, _ = send(core, sites, captured, alice, infer_body(IRIS))
    assert reason(before) == "forbidden:forward-for-denied"  # it got in: policy refused
    assert core.cfg.forward.crl is not None
    forwarder_crl(sites, [captured.serial], core.cfg.forward.crl)
    end = time.monotonic() + 20
    while True:
        try:
            send(core, sites, captured, alice, infer_body(IRIS))
        except httpx.HTTPError:
            break  # refused at the handshake: the CRL was loaded
        assert time.monotonic() < end, "the forwarder CRL was never loaded"
        time.sleep(0.2)
    ok, _ = send(core, sites, forwarder(sites, EDGE_SITE), alice, infer_body(IRIS))
    assert ok.status_code == 200, ok.text


# --- an edge failing over to its core ----------------------------------------------------
def test_an_edge_whose_nodes_died_answers_from_the_core_and_says_so(
    core: Core,
    sites: PKI,
    triton_home: Path,
    triton_repository: Path,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """The edge's own node answers while it lives (no forwarding); killed, with the link
    up, the core answers and its receipt says the edge forwarded it; mnist, whose
    residency no core region meets, is refused by the core with a stable problem type;
    with the link cut too, the edge refuses as it did before forwarding existed."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    with contextlib.ExitStack() as stack:
        proxy = ThreadedFaultProxy(("127.0.0.1", core.cfg.forward.port or 0))
        stack.callback(proxy.close)
        node_life = contextlib.ExitStack()
        stack.callback(node_life.close)
        node = node_life.enter_context(
            one_off_node(sites, triton_home, triton_repository, "edge1", tmp_path / "edge1")
        )
        edge_cfg = site_config(sites, registry_dir, tmp_path / "edge", [node], EDGE_SITE)
        edge_cfg = dataclasses.replace(
            edge_cfg,
            forward=Forward(
                core_url=f"https://127.0.0.1:{proxy.port}",
                core_site=CORE_SITE,
                core_ca=sites.root_ca,
                cert=fwd.cert,
                key=fwd.key,
            ),
        )
        stack.enter_context(running(edge_cfg))
        edge = f"https://127.0.0.1:{edge_cfg.listen.port}"
        c = stack.enter_context(
            httpx.Client(verify=client_context(sites, alice.cert, alice.key), timeout=30)
        )
        local = c.post(f"{edge}/v2/models/iris/infer", content=infer_body(IRIS))
        assert local.status_code == 200, local.text
        assert SITE_WHY_HEADER not in local.headers
        assert local.json()["parameters"]["ztgate.nodes"] == "edge1"

        node_life.close()  # the edge's only tritonserver is stopped
        r = c.post(f"{edge}/v2/models/iris/infer", content=infer_body(IRIS))
        assert r.status_code == 200, r.text
        assert r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
        rec = receipt(core, sites, alice, r)
        assert rec["ext"]["forwarded_by"] == EDGE_SITE
        assert rec["ext"]["site_why"] == "forwarded-to-core"
        assert rec["ext"]["site"] == CORE_SITE

        far = c.post(f"{edge}/v2/models/mnist/infer", content=infer_body(np.zeros((1, 784))))
        assert far.status_code == 403, far.text
        assert far.json()["type"] == "https://ztgate.dev/problems/forbidden"
        assert far.headers[SITE_WHY_HEADER] == "forwarded-to-core"

        proxy.cut()
        cut = c.post(f"{edge}/v2/models/iris/infer", content=infer_body(IRIS))
        # The edge's own answer: every node it has failed (its dead one), and no core.
        assert cut.status_code == 502, cut.text
        assert cut.json()["type"] == "https://ztgate.dev/problems/upstream-failed"
        assert SITE_WHY_HEADER not in cut.headers
        proxy.restore()
        back = c.post(f"{edge}/v2/models/iris/infer", content=infer_body(IRIS))
        assert back.status_code == 200 and back.headers[SITE_WHY_HEADER] == "forwarded-to-core"


# --- hybrid sites: this site's nodes first, others where policy allows -------------------
def test_an_edge_prefers_its_own_sites_nodes_and_falls_back_where_residency_allows(
    sites: PKI,
    triton_cluster: TritonCluster,
    triton_home: Path,
    triton_repository: Path,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """One edge gateway (site-b) with its own node (edge2, ap-south) and a core node it
    may also reach (n1, eu-west, site site-a). While edge2 lives every answer is its, and
    the receipt says `local`; killed, mnist (may run anywhere) is answered by n1 and the
    receipt says `fallback-region`, while iris (residency `ap-` only) is refused with a
    stable problem type, n1 never tried."""
    alice = client(sites, "alice")
    n1 = next(n for n in node_table(triton_cluster) if n["name"] == "n1")
    with contextlib.ExitStack() as stack:
        node_life = contextlib.ExitStack()
        stack.callback(node_life.close)
        edge2 = node_life.enter_context(
            one_off_node(
                sites, triton_home, triton_repository, "edge2", tmp_path / "edge2", "ap-south"
            )
        )
        cfg = site_config(
            sites,
            registry_dir,
            tmp_path / "edge",
            [{**edge2, "site": EDGE_SITE}, {**n1, "site": CORE_SITE}],
            EDGE_SITE,
            policy={"models": {"iris": {"residency": ["ap-"]}}},
        )
        stack.enter_context(running(cfg))
        edge = f"https://127.0.0.1:{cfg.listen.port}"
        c = stack.enter_context(
            httpx.Client(verify=client_context(sites, alice.cert, alice.key), timeout=30)
        )

        def ask(model: str, x: np.ndarray) -> httpx.Response:
            return c.post(f"{edge}/v2/models/{model}/infer", content=infer_body(x))

        digit = np.zeros((1, 784))
        for _ in range(4):
            r = ask("mnist", digit)
            assert r.status_code == 200, r.text
            assert r.json()["parameters"]["ztgate.nodes"] == "edge2"
        rec = edge_receipt(cfg, sites, alice, r)
        assert (rec["ext"]["site"], rec["ext"]["site_why"]) == (EDGE_SITE, "local")

        node_life.close()  # edge2's tritonserver is stopped
        far = ask("mnist", digit)
        assert far.status_code == 200, far.text
        assert far.json()["parameters"]["ztgate.nodes"] == "n1"
        rec = edge_receipt(cfg, sites, alice, far)
        assert (rec["ext"]["site"], rec["ext"]["site_why"]) == (CORE_SITE, "fallback-region")

        refused = ask("iris", IRIS)
        assert refused.status_code in (502, 503), refused.text
        doc = refused.json()
        assert doc["type"].rsplit("/", 1)[-1] in ("upstream-failed", "no-healthy-node")
        assert "n1" not in doc["detail"]


def test_a_redundant_answer_names_the_sites_of_both_nodes_that_gave_it(
    sites: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """Mode redundant chooses its own nodes (one per provider); the receipt names the sites
    of the two that agreed, not only a mode-none answer's one. A gateway at site-b whose
    n1 is its own and n2, n3 are site-a's: every pair the mode can pick is named as such.
    Control: the same gateway's mode-none answer comes from its own n1, `local`."""
    alice = client(sites, "alice")
    site_of = {"n1": EDGE_SITE, "n2": CORE_SITE, "n3": CORE_SITE}
    table = [{**n, "site": site_of[n["name"]]} for n in node_table(triton_cluster)]
    cfg = site_config(sites, registry_dir, tmp_path / "gw", table, EDGE_SITE)
    body = json.loads(infer_body(IRIS))
    with (
        running(cfg),
        httpx.Client(verify=client_context(sites, alice.cert, alice.key), timeout=30) as c,
    ):
        url = f"https://127.0.0.1:{cfg.listen.port}/v2/models/iris/infer"
        plain = c.post(url, json=body)
        assert plain.status_code == 200, plain.text
        assert plain.json()["parameters"]["ztgate.nodes"] == "n1"
        rec = edge_receipt(cfg, sites, alice, plain)
        assert (rec["ext"]["site"], rec["ext"]["site_why"]) == (EDGE_SITE, "local")

        body["parameters"] = {"ztgate.verification": "redundant"}
        r = c.post(url, json=body)
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        assert params["ztgate.verification_status"] == "agreed"
        nodes = params["ztgate.nodes"].split(",")
        assert len(nodes) == 2
        rec = edge_receipt(cfg, sites, alice, r)
        assert rec["nodes"] == nodes
        want = ",".join(sorted({site_of[n] for n in nodes}))
        assert (rec["ext"]["site"], rec["ext"]["site_why"]) == (want, "fallback-region")


def edge_receipt(cfg: Config, sites: PKI, who: Issued, r: httpx.Response) -> dict[str, Any]:
    return receipt_at(cfg, sites, who, r.json()["parameters"]["ztgate.receipt_id"])


def receipt_at(cfg: Config, sites: PKI, who: Issued, rid: str) -> dict[str, Any]:
    with httpx.Client(verify=client_context(sites, who.cert, who.key), timeout=10) as c:
        got = c.get(f"https://127.0.0.1:{cfg.listen.port}/v2/receipts/{rid}")
    assert got.status_code == 200, got.text
    doc: dict[str, Any] = got.json()["receipt"]
    return doc


# --- security review (issue 26) ----------------------------------------------------------
def test_grpc_stream_messages_each_name_only_their_own_answering_site(
    sites: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """The messages of one gRPC stream run in one task: the site one message's node had
    must not reach the next message's receipt. A gateway at site-b where only n1 (site-a)
    serves iris and only n2 (the gateway's own, no site) serves mnist: on one stream, iris
    then mnist, mnist's receipt names no site. Control: the same stream the other way
    round, and iris's receipt names site-a both times."""
    alice = client(sites, "alice")
    table = {n["name"]: n for n in node_table(triton_cluster)}
    nodes = [
        {**table["n1"], "site": CORE_SITE, "models": ["iris"]},
        {**table["n2"], "models": ["mnist"]},
    ]
    port = free_port()
    cfg = site_config(
        sites, registry_dir, tmp_path / "gw", nodes, EDGE_SITE, listen={"grpc_port": port}
    )

    def request(model: str, x: np.ndarray) -> Any:
        req = service_pb2.ModelInferRequest(model_name=model)
        spec = req.inputs.add()
        spec.name, spec.datatype = "input", "FP32"
        spec.shape.extend(x.shape)
        req.raw_input_contents.append(x.astype(np.float32).tobytes())
        return req

    iris, mnist = request("iris", IRIS), request("mnist", np.zeros((1, 784)))
    creds = grpc.ssl_channel_credentials(
        sites.root_ca.read_bytes(), alice.key.read_bytes(), alice.cert.read_bytes()
    )
    with running(cfg):
        wait_listening(port)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def sites_named(*reqs: Any) -> list[tuple[str, str] | None]:
                out = list(stub.ModelStreamInfer(iter(reqs), timeout=60))
                assert [m.error_message for m in out] == [""] * len(reqs)
                named: list[tuple[str, str] | None] = []
                for m in out:
                    rid = m.infer_response.parameters["ztgate.receipt_id"].string_param
                    ext = receipt_at(cfg, sites, alice, rid).get("ext", {})
                    named.append((ext["site"], ext["site_why"]) if "site" in ext else None)
                return named

            far = (CORE_SITE, "fallback-region")
            assert sites_named(iris, mnist) == [far, None]
            assert sites_named(mnist, iris) == [None, far]


def dead_node(cluster: TritonCluster, models: list[str]) -> dict[str, Any]:
    """n1's table entry at an address where nothing listens: a node that died."""
    n1 = next(n for n in node_table(cluster) if n["name"] == "n1")
    return {**n1, "address": f"127.0.0.1:{free_port()}", "models": models}


def edge_config(
    sites: PKI, registry: Path, data: Path, nodes: list[dict[str, Any]], core: Core
) -> Config:
    fwd = forwarder(sites, EDGE_SITE)
    cfg = site_config(sites, registry, data, nodes, EDGE_SITE)
    forward = Forward(
        core_url=core.forward_base,
        core_site=CORE_SITE,
        core_ca=sites.root_ca,
        cert=fwd.cert,
        key=fwd.key,
    )
    return dataclasses.replace(cfg, forward=forward)


@pytest.fixture(scope="module")
def edge(
    core: Core,
    sites: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """An edge (site-b) whose one node, for iris only, is down: iris goes to the core."""
    data = tmp_path_factory.mktemp("edge")
    cfg = edge_config(sites, registry_dir, data, [dead_node(triton_cluster, ["iris"])], core)
    with running(cfg):
        yield f"https://127.0.0.1:{cfg.listen.port}"


def reached(core: Core) -> int:
    """Requests the core's forward listener has seen (accepted or refused)."""
    listener = core.gw.forward_listener  # type: ignore[attr-defined]
    return int(listener.accepted + sum(listener.refusals.values()))


def test_an_edge_with_no_node_for_a_model_refuses_it_itself_and_does_not_forward(
    core: Core,
    sites: PKI,
    edge: str,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """ "No node serves" comes before the edge's policy decides, so forwarding on it would
    skip the edge's own forbids and @rate: the edge fails over only on a refusal that
    names its decision. An edge with no node for iris refuses iris itself (the core,
    the control shows, would answer); an edge whose iris node is down forwards it."""
    alice = client(sites, "alice")
    ctx = client_context(sites, alice.cert, alice.key)
    cfg = edge_config(
        sites, registry_dir, tmp_path / "e", [dead_node(triton_cluster, ["mnist"])], core
    )
    with running(cfg), httpx.Client(verify=ctx, timeout=30) as c:
        before = reached(core)
        r = c.post(
            f"https://127.0.0.1:{cfg.listen.port}/v2/models/iris/infer", content=infer_body(IRIS)
        )
        assert r.status_code == 503, r.text
        assert r.json()["type"] == "https://ztgate.dev/problems/no-healthy-node"
        assert SITE_WHY_HEADER not in r.headers
        assert reached(core) == before  # never sent to the core
    with httpx.Client(verify=ctx, timeout=30) as c:
        ok = c.post(f"{edge}/v2/models/iris/infer", content=infer_body(IRIS))
    assert ok.status_code == 200, ok.text
    assert ok.headers[SITE_WHY_HEADER] == "forwarded-to-core"


def test_a_binary_answer_from_the_core_keeps_the_headers_that_read_it(
    sites: PKI, edge: str
) -> None:
    """The binary tensor extension: the core's `inference-header-content-length` (and
    its `ztgate-receipt`) reach the client, which reads the same probabilities as the
    JSON control request gets."""
    alice = client(sites, "alice")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(IRIS.shape),
                    "parameters": {"binary_data_size": IRIS.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    with httpx.Client(verify=client_context(sites, alice.cert, alice.key), timeout=30) as c:
        url = f"{edge}/v2/models/iris/infer"
        control = c.post(url, content=infer_body(IRIS))
        r = c.post(
            url,
            content=header + IRIS.tobytes(),
            headers={
                "inference-header-content-length": str(len(header)),
                "content-type": "application/octet-stream",
            },
        )
    assert control.status_code == 200, control.text
    assert "inference-header-content-length" not in control.headers
    assert r.status_code == 200, r.text
    assert r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
    assert r.headers["ztgate-receipt"]
    n = int(r.headers["inference-header-content-length"])
    [out] = json.loads(r.content[:n])["outputs"]
    got = np.frombuffer(r.content[n:], np.float32).reshape(out["shape"])
    want = np.array(control.json()["outputs"][0]["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_edge_pins_the_cores_ca_and_spiffe_id(core: Core, sites: PKI) -> None:
    """`core_ca` is required with `core_url`; and a core whose certificate does not name
    the statement's audience fails the handshake before anything is sent. Control: the
    same forwarder aimed at the audience the core's certificate names is answered."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    with pytest.raises(ConfigError, match="core_ca"):
        Forward(core_url="https://core.example:8444", cert=fwd.cert, key=fwd.key)

    def attempt(core_site: str) -> httpx.Response:
        async def go() -> httpx.Response:
            f = CoreForwarder(
                site=EDGE_SITE,
                trust_domain=core.cfg.trust_domain,
                core_url=core.forward_base,
                core_site=core_site,
                cert=fwd.cert,
                key=fwd.key,
                core_ca=sites.root_ca,
                timeout_s=15,
            )
            try:
                r = await f.open(
                    client_cert=leaf_pem(alice),
                    path="/v2/models/iris/infer",
                    model="iris",
                    version="",
                    body=infer_body(IRIS),
                    content_type="application/json",
                    extra=None,
                    head_s=15,
                )
                try:
                    await r.aread()
                finally:
                    await r.aclose()
                return r
            finally:
                await f.aclose()

        return asyncio.run(go())

    before = reached(core)
    with pytest.raises(httpx.ConnectError):
        attempt(OTHER_SITE)  # the core's certificate names site-a's gateway
    assert reached(core) == before
    ok = attempt(CORE_SITE)
    assert ok.status_code == 200, ok.text


def test_production_refuses_a_forward_listener_without_a_crl(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    """Without `forward.crl` a captured edge's forwarder certificate cannot be revoked:
    production refuses it, dev warns. Control: with the CRL, no such item."""
    prod = dataclasses.replace(core.cfg, mode="production")
    no_crl = dataclasses.replace(prod, forward=dataclasses.replace(prod.forward, crl=None))
    [item] = [i for i in no_crl.dev_only_items() if i.startswith("forward.")]
    assert "forward.crl" in item
    with pytest.raises(ProductionRefused, match=r"forward\.crl"):
        check_mode(no_crl)
    assert not [i for i in prod.dev_only_items() if i.startswith("forward.")]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gateway.runtime"):
        check_mode(dataclasses.replace(no_crl, mode="dev"))
    assert f"DEV-ONLY in use: {item}" in [r.getMessage() for r in caplog.records]


@contextmanager
def site_limits(core: Core, **kw: Any) -> Iterator[SiteLimits]:
    """The running core's per-site bounds, replaced for one test."""
    listener = core.gw.forward_listener  # type: ignore[attr-defined]
    old, listener.limits = listener.limits, SiteLimits(**kw)
    try:
        yield listener.limits
    finally:
        listener.limits = old


def test_forward_for_is_decided_before_the_body_is_read(core: Core, sites: PKI) -> None:
    """A site policy does not let act for the client is refused on its headers: its
    body, larger than the core takes, is never read. Control: the same body from a site
    that may forward is read, and refused as too large."""
    alice = client(sites, "alice")
    listener = core.gw.forward_listener  # type: ignore[attr-defined]
    old, listener.max_body_bytes = listener.max_body_bytes, 1024
    try:
        big = b"x" * 4096
        denied, _ = send(core, sites, forwarder(sites, OTHER_SITE), alice, big)
        assert denied.status_code == 403 and reason(denied) == "forbidden:forward-for-denied"
        read, _ = send(core, sites, forwarder(sites, EDGE_SITE), alice, big)
        assert read.status_code == 413, read.text
    finally:
        listener.max_body_bytes = old


def test_a_sites_token_bucket_is_taken_before_its_nonce_is_spent(core: Core, sites: PKI) -> None:
    """One token a second, a burst of one, on a clock the test moves: the second statement
    at once is refused with a stable reason, and the same statement, once a token is
    back, is answered: the refusal spent no nonce."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    body = infer_body(IRIS)
    now = [0.0]
    with site_limits(core, rate_per_s=1.0, burst=1, concurrency=8, clock=lambda: now[0]):
        first, _ = send(core, sites, fwd, alice, body)
        assert first.status_code == 200, first.text
        r, headers = send(core, sites, fwd, alice, body)
        assert r.status_code == 429 and reason(r) == "rate-limited:site-rate"
        now[0] += 1.0
        again, _ = send(core, sites, fwd, alice, body, headers=headers)
        assert again.status_code == 200, again.text


def test_a_site_has_at_most_its_concurrency_cap_in_the_core(core: Core, sites: PKI) -> None:
    """A cap of one: while one request of the site is in the core (its body held back by
    the test), the next is refused before its body is read; released, both are answered."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    body = infer_body(IRIS)
    gate = threading.Event()

    def slow() -> Iterator[bytes]:
        yield body[:10]
        gate.wait(30)
        yield body[10:]

    got: list[httpx.Response] = []
    with site_limits(core, rate_per_s=1000.0, burst=1000, concurrency=1) as limits:
        held = threading.Thread(
            target=lambda: got.append(send(core, sites, fwd, alice, body, sent_body=slow())[0])
        )
        held.start()
        try:
            end = time.monotonic() + 20
            while limits.busy(EDGE_SITE) == 0:
                assert time.monotonic() < end, "the first request never reached the core"
                time.sleep(0.02)
            r, _ = send(core, sites, fwd, alice, body)
            assert r.status_code == 503 and reason(r) == "overloaded:site-concurrency"
        finally:
            gate.set()
            held.join(30)
        assert got and got[0].status_code == 200, got
        ok, _ = send(core, sites, fwd, alice, body)
        assert ok.status_code == 200, ok.text


# --- findings of the forwarding review ------------------------------------------------------
def signed(
    core: Core, fwd: Issued, who: Issued, body: bytes, model: str = "iris"
) -> dict[str, str]:
    """A statement's headers, built as an edge builds them."""
    st = statement.make(
        site=fwd.name,
        aud=f"spiffe://{core.cfg.trust_domain}/gateway/{CORE_SITE}",
        client_cert=leaf_pem(who),
        body=body,
        model=model,
        version="",
    )
    key = serialization.load_pem_private_key(fwd.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return {**statement.sign(st, key), "content-type": "application/json"}


def test_a_forwarder_revoked_while_its_connection_is_open_is_refused_at_its_next_request(
    core: Core, sites: PKI, tmp_path: Path
) -> None:
    """The CRL is checked at a handshake, and an edge's kept-alive connection outlives its
    handshake: the listener checks the current `forward.crl` per request too (the file
    looked at once a second at most). On one connection, the request before the
    revocation is answered (the control), and once the new CRL is written the next ones
    are refused within that second, counted under their reason."""
    fwd = sites.issue(
        "forwarder", EDGE_SITE, site=EDGE_SITE, out=(tmp_path / "f.crt", tmp_path / "f.key")
    )
    alice = client(sites, "alice")
    body = infer_body(IRIS)
    listener = core.gw.forward_listener  # type: ignore[attr-defined]
    conn = http.client.HTTPSConnection(
        "127.0.0.1",
        core.cfg.forward.port or 0,
        context=client_context(sites, fwd.cert, fwd.key),
        timeout=15,
    )

    def post() -> tuple[int, dict[str, Any]]:
        conn.request(
            "POST", "/v2/models/iris/infer", body=body, headers=signed(core, fwd, alice, body)
        )
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    try:
        status, doc = post()
        assert status == 200, doc
        kept = conn.sock
        assert kept is not None
        refused = listener.refusals["forwarder-revoked"]
        assert core.cfg.forward.crl is not None
        forwarder_crl(sites, [fwd.serial], core.cfg.forward.crl)
        # The listener looks at the file at most once per CHECK_INTERVAL_S: answered
        # until then (a bound on the wait, not a timed assertion).
        end = time.monotonic() + 20
        while True:
            status, doc = post()
            assert conn.sock is kept  # the same connection: no handshake in between
            if status != 200:
                break
            assert time.monotonic() < end, "the new CRL never reached the open connection"
            time.sleep(0.1)
        assert status == 403, doc
        assert doc["type"] == "https://ztgate.dev/problems/forbidden"
        assert doc["reason"] == "forwarder-revoked"
        assert listener.refusals["forwarder-revoked"] == refused + 1
    finally:
        conn.close()
    ok, _ = send(core, sites, forwarder(sites, EDGE_SITE), alice, body)
    assert ok.status_code == 200, ok.text


def test_the_forward_crl_is_looked_at_once_a_second_at_most(
    sites: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-request check stats `forward.crl` at most once per CHECK_INTERVAL_S (a
    syscall on the event loop per forwarded request, else), on a clock the test moves: two
    requests within the interval stat it once, and miss a CRL written in between; the
    first after the interval reads it (the control). A CRL that does not parse keeps the
    revocations read before, and is read again at the next look. Stats are counted by a
    wrapper around the real os.stat (counting, not faking)."""
    path = forwarder_crl(sites, [], tmp_path / "forwarder.crl")
    now = [100.0]
    crl = ForwarderCRL(path, sites.forwarder_ca_bundle(), clock=lambda: now[0])
    fwd = sites.issue(
        "forwarder", EDGE_SITE, site=EDGE_SITE, out=(tmp_path / "f.crt", tmp_path / "f.key")
    )
    cert = x509.load_pem_x509_certificate(fwd.cert.read_bytes())
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(p: Any, *args: Any, **kw: Any) -> os.stat_result:
        if os.fspath(p) == os.fspath(path):
            stats.append(os.fspath(p))
        return real_stat(p, *args, **kw)

    monkeypatch.setattr(os, "stat", counting_stat)
    now[0] += CHECK_INTERVAL_S
    asyncio.run(crl.refresh())
    assert len(stats) == 1
    assert not crl.revoked(cert)
    forwarder_crl(sites, [fwd.serial], path)
    now[0] += CHECK_INTERVAL_S / 2
    asyncio.run(crl.refresh())  # a second request within the interval: no stat
    assert len(stats) == 1
    assert not crl.revoked(cert)
    now[0] += CHECK_INTERVAL_S / 2
    asyncio.run(crl.refresh())  # the interval is over: looked at, and the change read
    assert len(stats) == 2
    assert crl.revoked(cert)
    path.write_bytes(b"half a file")
    now[0] += CHECK_INTERVAL_S
    asyncio.run(crl.refresh())
    assert len(stats) == 3
    assert crl.revoked(cert)  # the revocations read before stand
    other = SimpleNamespace(issuer=cert.issuer, serial_number=cert.serial_number + 1)
    assert not crl.revoked(other)  # type: ignore[arg-type]
    forwarder_crl(sites, [other.serial_number], path)  # the file fixed: read at the next look
    now[0] += CHECK_INTERVAL_S
    asyncio.run(crl.refresh())
    assert len(stats) == 4
    assert crl.revoked(other)  # type: ignore[arg-type]
    assert crl.revoked(cert)  # revocations only accumulate: dropping a serial needs a restart


def test_a_compressed_request_is_not_forwarded(core: Core, sites: PKI, edge: str) -> None:
    """The edge decides on a gzip body decompressed, but the statement would bind, and
    the core read, the bytes as sent: the edge's own refusal stands (its policy allowed
    the request: only the encoding kept it at the edge) and the core sees nothing. The
    control: the same body uncompressed is forwarded and answered."""
    alice = client(sites, "alice")
    body = infer_body(IRIS)
    url = f"{edge}/v2/models/iris/infer"
    with httpx.Client(verify=client_context(sites, alice.cert, alice.key), timeout=30) as c:
        before = reached(core)
        r = c.post(
            url,
            content=gzip.compress(body),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
        assert reached(core) == before
        assert r.status_code in (502, 503), r.text
        doc = r.json()
        assert doc["type"].rsplit("/", 1)[-1] in ("no-healthy-node", "upstream-failed")
        assert "decision_id" in doc
        assert SITE_WHY_HEADER not in r.headers
        ok = c.post(url, content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    assert ok.headers[SITE_WHY_HEADER] == "forwarded-to-core"


def test_a_sites_generations_take_at_most_half_its_slots(core: Core, sites: PKI) -> None:
    """A cap of two: while one of the site's generations is in the core (its body held
    back by the test), a second generation is refused before its body is read, and an
    inference (the control, built the same way) still gets the other slot."""
    fwd, alice = forwarder(sites, EDGE_SITE), client(sites, "alice")
    gen = json.dumps({"text_input": "def ", "parameters": {"max_tokens": 4}}).encode()
    gate = threading.Event()
    base = f"{core.forward_base}/v2/models/iris"

    def slow() -> Iterator[bytes]:
        yield gen[:10]
        gate.wait(30)
        yield gen[10:]

    def post(path: str, body: bytes, sent: bytes | Iterator[bytes]) -> httpx.Response:
        with httpx.Client(verify=client_context(sites, fwd.cert, fwd.key), timeout=30) as c:
            return c.post(base + path, content=sent, headers=signed(core, fwd, alice, body))

    got: list[httpx.Response] = []
    with site_limits(core, rate_per_s=1000.0, burst=1000, concurrency=2) as limits:
        held = threading.Thread(target=lambda: got.append(post("/generate", gen, slow())))
        held.start()
        try:
            end = time.monotonic() + 20
            while limits.busy(EDGE_SITE) == 0:
                assert time.monotonic() < end, "the first generation never reached the core"
                time.sleep(0.02)
            r = post("/generate_stream", gen, gen)
            assert r.status_code == 503 and reason(r) == "overloaded:site-generations"
            infer = infer_body(IRIS)
            ok = post("/infer", infer, infer)
            assert ok.status_code == 200, ok.text
        finally:
            gate.set()
            held.join(30)
    # The held one was let in: what the core then says of iris is its own answer.
    assert got and got[0].json().get("reason", "").startswith("site-") is False, got
