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
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.app import Gateway
from gateway.config import Config, Forward
from gateway.faultproxy import ThreadedFaultProxy
from gateway.forward import statement
from gateway.forward.client import SITE_WHY_HEADER
from gateway.pki import PKI, Issued, forwarder_crl
from gateway.ports import free_port
from gateway.runtime import build_gateway, forward_server, servers
from tests.conftest import TritonCluster, one_off_node
from tests.gateway_harness import client_context, gateway_config

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


def node_table(cluster: TritonCluster) -> list[dict[str, Any]]:
    return [
        {
            "name": n.name,
            "address": n.address,
            "dns_name": n.dns_name,
            "spiffe_id": n.spiffe_id,
            "region": n.region,
            "provider": n.provider,
        }
        for n in cluster.nodes.values()
    ]


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
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


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
    sent_body: bytes | None = None,
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
    ok, _ = send(core, sites, fwd, alice, infer_body(IRIS), hops=(OTHER_SITE,))
    assert ok.status_code == 200, ok.text


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
        edge_cfg = gateway_config(sites, registry_dir, tmp_path / "edge", [node], site=EDGE_SITE)
        # The session's nodes trust site-a's gateway CA; the edge's node is one of them.
        gw_a = sites.root / "gateway" / CORE_SITE
        edge_cfg = dataclasses.replace(
            edge_cfg,
            tls=dataclasses.replace(
                edge_cfg.tls,
                node_client_cert=gw_a / "node-client.crt",
                node_client_key=gw_a / "node-client.key",
            ),
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
        cfg = gateway_config(
            sites,
            registry_dir,
            tmp_path / "edge",
            [{**edge2, "site": EDGE_SITE}, {**n1, "site": CORE_SITE}],
            site=EDGE_SITE,
            policy={"models": {"iris": {"residency": ["ap-"]}}},
        )
        gw_a = sites.root / "gateway" / CORE_SITE  # the session's nodes trust site-a's CA
        cfg = dataclasses.replace(
            cfg,
            tls=dataclasses.replace(
                cfg.tls,
                node_client_cert=gw_a / "node-client.crt",
                node_client_key=gw_a / "node-client.key",
            ),
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


def edge_receipt(cfg: Config, sites: PKI, who: Issued, r: httpx.Response) -> dict[str, Any]:
    rid = r.json()["parameters"]["ztgate.receipt_id"]
    with httpx.Client(verify=client_context(sites, who.cert, who.key), timeout=10) as c:
        got = c.get(f"https://127.0.0.1:{cfg.listen.port}/v2/receipts/{rid}")
    assert got.status_code == 200, got.text
    doc: dict[str, Any] = got.json()["receipt"]
    return doc
