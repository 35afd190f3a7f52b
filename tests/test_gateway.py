"""The gateway end to end: real uvicorn over TLS, real certificates, real tritonservers."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from gateway.pki import PKI
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
    refused = {
        "no cert": client_context(pki, None, None),
        "foreign CA": client_context(pki, stranger.cert, stranger.key),
        "expired": client_context(pki, expired.cert, expired.key),
        "node cert": client_context(pki, node.cert, node.key),
    }
    for why, ctx in refused.items():
        before = gateway.gw.metrics.app_calls
        with pytest.raises(httpx.HTTPError):
            _post(gateway, ctx)
        assert gateway.gw.metrics.app_calls == before, why
    # Positive control: the same helper with the right certificate gets through.
    before = gateway.gw.metrics.app_calls
    assert _post(gateway, client_context(pki, *alice)) == 200
    assert gateway.gw.metrics.app_calls == before + 1


def test_identity_ignores_headers(gateway: RunningGateway, pki: PKI) -> None:
    """A header claiming another identity changes nothing: only the certificate counts."""
    bob = pki.ensure("client", "bob")
    with httpx.Client(verify=client_context(pki, bob.cert, bob.key), timeout=5) as c:
        r = c.post(
            f"{gateway.base}/v2/models/iris/infer",
            json=infer_body(IRIS),
            headers={"x-client-cert": "spiffe://ztgate.local/client/admin"},
        )
    assert r.status_code == 200


def test_expiry_checked_on_every_request_of_one_connection(
    gateway: RunningGateway, pki: PKI
) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    short = pki.issue(
        "client",
        "short",
        not_before=start,
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3),
    )
    with httpx.Client(verify=client_context(pki, short.cert, short.key), timeout=5) as c:
        first = c.get(f"{gateway.base}/v2/models/iris")
        assert first.status_code == 200
        time.sleep(3.5)
        second = c.get(f"{gateway.base}/v2/models/iris")
    assert second.status_code == 401
    assert second.headers["content-type"] == "application/problem+json"
    assert "expired" in second.json()["detail"]


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
    assert json is not None
