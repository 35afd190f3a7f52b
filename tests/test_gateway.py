"""The gateway end to end: real uvicorn over TLS, real certificates, real tritonservers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from cryptography import x509

from gateway.identity import IdentityResolver
from gateway.pipeline.decide import flush_decisions
from gateway.pki import PKI
from gateway.receipts.model import SignedReceipt
from gateway.runtime import build_gateway
from gateway.server import connections_opened, handshake_failures
from tests.conftest import TritonCluster
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway


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


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    cfg = gateway_config(
        pki, registry_dir, tmp_path_factory.mktemp("gwdata"), node_table(triton_cluster)
    )
    with running_gateway(cfg) as gw:
        yield gw


@pytest.fixture(scope="module")
def alice(pki: PKI) -> tuple[Path, Path]:
    issued = pki.ensure("client", "alice")
    return issued.cert, issued.key


def iris_session(registry_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(next(registry_dir.glob("models/iris/*/model.onnx"))),
        providers=["CPUExecutionProvider"],
    )


IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], np.float32)


def triton_http(
    gw: RunningGateway, pki: PKI, cert: Path, key: Path
) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(
        gw.url,
        ssl=True,
        ssl_options={"ca_certs": str(pki.root_ca), "certfile": str(cert), "keyfile": str(key)},
        network_timeout=10.0,
        connection_timeout=5.0,
    )


def infer_body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }


# --- mTLS and identity ------------------------------------------------------------------
def _post(gw: RunningGateway, ctx: ssl.SSLContext) -> int:
    with httpx.Client(verify=ctx, timeout=5) as c:
        return c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS)).status_code


def test_refused_callers_never_reach_the_app(
    gateway: RunningGateway, pki: PKI, alice: tuple[Path, Path], tmp_path: Path
) -> None:
    foreign = PKI.init(tmp_path / "foreign", pki.trust_domain)
    stranger = foreign.issue("client", "alice")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = pki.issue("client", "expired", not_before=past, not_after=past + dt.timedelta(days=1))
    node = pki.ensure("node", "n1")
    # Why the handshake refuses each: the client gets the alert, the server records it.
    refused = {
        "no cert": (client_context(pki, None, None), "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        "foreign CA": (
            client_context(pki, stranger.cert, stranger.key),
            "unable to get local issuer certificate",
        ),
        "expired": (client_context(pki, expired.cert, expired.key), "certificate has expired"),
        # Same root, but the node CA is not in the client-auth trust store.
        "node cert": (
            client_context(pki, node.cert, node.key),
            "unable to get local issuer certificate",
        ),
    }
    for why, (ctx, reason) in refused.items():
        before, failures = gateway.gw.metrics.app_calls, handshake_failures()
        with pytest.raises(httpx.HTTPError):
            _post(gateway, ctx)
        assert handshake_failures() - failures == Counter({reason: 1}), why
        assert gateway.gw.metrics.app_calls == before, why
    # Positive control: the same helper with the right certificate gets through.
    before, failures = gateway.gw.metrics.app_calls, handshake_failures()
    assert _post(gateway, client_context(pki, *alice)) == 200
    assert gateway.gw.metrics.app_calls == before + 1
    assert handshake_failures() == failures


# What a proxy in front of a gateway might set, each naming an officer (olga).
OFFICER = "spiffe://ztgate.local/client/olga"
SPOOFING_HEADERS = {
    "x-client-cert": OFFICER,
    "x-forwarded-client-cert": f"By=spiffe://ztgate.local/gateway/site-a;URI={OFFICER}",
    "x-spiffe-id": OFFICER,
    "x-ssl-client-s-dn": "CN=olga",
    "x-client-dn": "CN=olga",
    "x-forwarded-user": "olga",
    "x-remote-user": "olga",
}


def test_identity_ignores_headers(
    gateway: RunningGateway, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Headers naming an officer change nothing: only the certificate counts."""
    caplog.set_level(logging.INFO, logger="ztgate.decisions")
    nobody = pki.ensure("client", "nobody")  # nothing in identities.json maps it
    olga = pki.ensure("client", "olga")  # an officer: may read the policy status
    policy_url = f"{gateway.base}/admin/policy"
    infer_url = f"{gateway.base}/v2/models/iris/infer"
    with httpx.Client(verify=client_context(pki, nobody.cert, nobody.key), timeout=5) as c:
        admin = c.get(policy_url, headers=SPOOFING_HEADERS)
        infer = c.post(infer_url, json=infer_body(IRIS), headers=SPOOFING_HEADERS)
    assert admin.status_code == 403, admin.text
    assert infer.status_code == 403, infer.text
    # Every record of both decisions names the certificate's identity, never the header's.
    authz = [m for m in caplog.messages if m.startswith("authorization ")]
    assert len(authz) == 1, authz
    assert authz[0].startswith(
        f"authorization DENIED: admin_reload gateway by {nobody.spiffe_id} ("
    )
    flush_decisions()  # the writer thread's records, all of them, before reading
    decisions = [json.loads(r.message) for r in caplog.records if r.name == "ztgate.decisions"]
    assert [(d["spiffe_id"], d["result"]) for d in decisions] == [(nobody.spiffe_id, "deny")]
    # And so do the denial receipts.
    assert gateway.gw.receipts is not None
    for response in (admin, infer):
        rid = response.headers["ztgate-receipt"].split(" ")[1]
        stored = gateway.gw.receipts.log.body(rid)
        assert stored is not None
        client = SignedReceipt.from_bytes(stored.body).receipt.client
        assert client is not None and client.spiffe_id == nobody.spiffe_id
    # Positive control: the officer's own certificate, the same requests, is allowed.
    caplog.clear()
    with httpx.Client(verify=client_context(pki, olga.cert, olga.key), timeout=5) as c:
        assert c.get(policy_url).status_code == 200
    authz = [m for m in caplog.messages if m.startswith("authorization ")]
    assert len(authz) == 1, authz
    assert authz[0].startswith(f"authorization granted: admin_reload gateway by {OFFICER} (")


class FakeClock:
    """The identity check's clock; the TLS handshake keeps the real one."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clocked_gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> Iterator[tuple[RunningGateway, FakeClock]]:
    """A gateway whose per-request certificate checks read a clock the test sets."""
    cfg = gateway_config(pki, registry_dir, tmp_path / "data", node_table(triton_cluster))
    clock = FakeClock(dt.datetime.now(dt.UTC))
    ca = x509.load_pem_x509_certificates(cfg.tls.client_ca.read_bytes())
    resolver = IdentityResolver(cfg.trust_domain, [c.subject for c in ca], clock=clock)
    # The gateway as built, with only the identity check's clock replaced.
    gw = dataclasses.replace(build_gateway(cfg), resolver=resolver)
    with running_gateway(cfg, gw) as running:
        yield running, clock


def test_expiry_checked_on_every_request_of_one_connection(
    clocked_gateway: tuple[RunningGateway, FakeClock], pki: PKI
) -> None:
    gateway, clock = clocked_gateway
    start = clock.now - dt.timedelta(minutes=1)
    short = pki.issue("client", "short", not_before=start, not_after=start + dt.timedelta(hours=1))
    cert = x509.load_pem_x509_certificate(short.cert.read_bytes())
    url = f"{gateway.base}/v2/models/iris"
    with httpx.Client(verify=client_context(pki, short.cert, short.key), timeout=5) as c:
        opened = connections_opened()
        assert c.get(url).status_code == 200
        clock.now = cert.not_valid_after_utc  # the last second of validity has passed
        expired = c.get(url)
        clock.now = cert.not_valid_before_utc - dt.timedelta(seconds=1)
        early = c.get(url)
        # Control, on the same connection: the certificate's last valid second.
        clock.now = cert.not_valid_after_utc - dt.timedelta(seconds=1)
        valid = c.get(url)
        assert connections_opened() == opened + 1  # all four on one connection
    assert expired.status_code == 401
    assert expired.headers["content-type"] == "application/problem+json"
    assert expired.json()["detail"] == (
        f"client certificate expired at {cert.not_valid_after_utc.isoformat()}"
    )
    assert early.status_code == 401
    assert early.json()["detail"] == "client certificate is not yet valid"
    assert valid.status_code == 200
    # Control: at the instant the short certificate is expired, a longer one is not.
    clock.now = cert.not_valid_after_utc
    alice = pki.ensure("client", "alice")
    with httpx.Client(verify=client_context(pki, alice.cert, alice.key), timeout=5) as c:
        assert c.get(url).status_code == 200


# --- API --------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_round_trip_equals_onnxruntime(
    gateway: RunningGateway, pki: PKI, alice: tuple[Path, Path], registry_dir: Path, binary: bool
) -> None:
    client = triton_http(gateway, pki, *alice)
    try:
        assert client.is_server_live()
        assert client.is_model_ready("iris")
        meta = client.get_model_metadata("iris")
        assert meta["inputs"][0]["name"] == "input"
        inp = httpclient.InferInput("input", list(IRIS.shape), "FP32")
        inp.set_data_from_numpy(IRIS, binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("iris", [inp], outputs=[out])
    finally:
        client.close()
    expected = iris_session(registry_dir).run(None, {"input": IRIS})[0]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6)
    params = result.get_response()["parameters"]
    assert params["ztgate.verification"] == "none"
    assert params["ztgate.nodes"] in {"n1", "n2", "n3"}


def test_errors_are_problems(gateway: RunningGateway, pki: PKI, alice: tuple[Path, Path]) -> None:
    with httpx.Client(verify=client_context(pki, *alice), timeout=5) as c:
        cases = [
            (c.post(f"{gateway.base}/v2/models/nope/infer", json=infer_body(IRIS)), 404),
            (c.get(f"{gateway.base}/v2/models/iris/versions/9"), 404),
            (c.post(f"{gateway.base}/v2/models/iris/infer", content=b"{not json"), 400),
            (
                c.post(
                    f"{gateway.base}/v2/models/iris/infer",
                    json=infer_body(np.zeros((1, 5), np.float32)),
                ),
                400,
            ),
            (
                c.post(
                    f"{gateway.base}/v2/models/iris/infer",
                    content=b"x" * (gateway.cfg.limits.max_body_bytes + 1),
                ),
                413,
            ),
            (c.get(f"{gateway.base}/v2/nowhere"), 404),
            (c.delete(f"{gateway.base}/v2/models/iris/infer"), 405),
            (
                c.post(
                    f"{gateway.base}/v2/models/iris/infer",
                    json=infer_body(IRIS),
                    headers={"ztgate-deadline-ms": "soon"},
                ),
                400,
            ),
        ]
    for response, status in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert body["status"] == status and body["type"].startswith("https://")
        assert body["error"] == body["detail"]


def test_admin_listener_needs_no_cert(gateway: RunningGateway) -> None:
    with httpx.Client(timeout=5) as c:
        assert c.get(f"{gateway.admin_base}/v2/health/ready").status_code == 200
        metrics = c.get(f"{gateway.admin_base}/metrics").text
    assert "ztgate_requests_total" in metrics
    for gauge in ("ztgate_revocation_staleness_seconds", "ztgate_nodes_ejected"):
        assert gauge in metrics
