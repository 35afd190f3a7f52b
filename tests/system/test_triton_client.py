"""Scenario: the stock Triton client flow, unchanged, against the production gateway.

What a Triton user runs (docs/clients.md) with `tritonclient.http`, `ssl=True` and the
customer's client certificate: liveness and readiness, model metadata, model config,
inference with binary and with JSON tensors. The answers are checked against onnxruntime
on the registry's own model file, and against the signed receipt the answer names: its
summary signature (the published receipt key), and its salted commitments to exactly the
tensors the client sent and got. The same client construction without a certificate, or
with a certificate from another CA of the customer's PKI, is refused at the TLS handshake;
the positive control is that construction with the client's own certificate. The same
flow with `tritonclient.grpc` against the replica's gRPC front (`listen.grpc_port`).
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException

from gateway.protocol.tensors import Tensor
from gateway.receipts.canonical import canonical_json
from gateway.receipts.commit import commit_tensor
from gateway.receipts.model import SignedReceipt
from gateway.receipts.signing import verify_summary
from tests.system.cluster import ProductionCluster, Replica
from tests.system.customer_pki import Leaf

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

# What a refused handshake looks like to the client (TLS 1.3: the alert, or only the close).
REFUSED = {
    "alert TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "alert TLSV1_ALERT_UNKNOWN_CA",
    "alert SSLV3_ALERT_BAD_CERTIFICATE",
    "closed",
}
IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def triton_http(replica: Replica, ca: Path, leaf: Leaf | None) -> httpclient.InferenceServerClient:
    """The client exactly as docs/clients.md builds it (no certificate when `leaf` is None)."""
    options: dict[str, Any] = {"ca_certs": str(ca)}
    if leaf is not None:
        options |= {"certfile": str(leaf.cert), "keyfile": str(leaf.key)}
    return httpclient.InferenceServerClient(
        f"127.0.0.1:{replica.port}",
        ssl=True,
        ssl_options=options,
        connection_timeout=10.0,
        network_timeout=30.0,
    )


@pytest.fixture(scope="module")
def shop(production_cluster: ProductionCluster) -> Iterator[httpclient.InferenceServerClient]:
    cluster = production_cluster
    client = triton_http(cluster.replicas[0], cluster.pki.root_ca, cluster.pki.client("shop"))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference(production_cluster: ProductionCluster) -> npt.NDArray[np.float32]:
    """onnxruntime on the registry's iris file: the answer the nodes must reproduce."""
    listed = json.loads(
        production_cluster.cli(
            "model", "list", "--json", "--registry", str(production_cluster.registry)
        ).stdout
    )
    path = Path(next(e["path"] for e in listed if e["name"] == "iris"))
    if not path.is_absolute():
        path = production_cluster.registry / path
    out = ort.InferenceSession(str(path)).run(None, {"input": IRIS})[0]
    return np.asarray(out, dtype=np.float32)


def test_health_metadata_and_config(shop: httpclient.InferenceServerClient) -> None:
    assert shop.is_server_live()
    assert shop.is_server_ready()
    assert shop.is_model_ready("iris")
    assert not shop.is_model_ready("no-such-model")
    meta = shop.get_model_metadata("iris")
    assert meta["name"] == "iris"
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("input", "FP32")]
    assert "probabilities" in [o["name"] for o in meta["outputs"]]
    # The gateway publishes no model configuration (docs/clients.md lists the endpoints);
    # a Triton client asking for one gets the documented problem, readable as an error.
    with pytest.raises(InferenceServerException) as refused:
        shop.get_model_config("iris")
    assert refused.value.status() == "404", refused.value


def _receipt(cluster: ProductionCluster, replica: Replica, params: dict[str, Any]) -> SignedReceipt:
    """The receipt the answer names, read back as its owner over mTLS."""
    rid = params["ztgate.receipt_id"]
    with cluster.client("shop", timeout=30) as c:
        r = c.get(f"{replica.base}/v2/receipts/{rid}")
    assert r.status_code == 200, r.text
    doc = r.json()  # the signed envelope, and what the API adds (proof, late evidence)
    envelope = {k: doc[k] for k in ("receipt", "sig")}
    return SignedReceipt.from_bytes(canonical_json(envelope))  # the API's JSON is not canonical


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime_and_the_receipt(
    production_cluster: ProductionCluster,
    shop: httpclient.InferenceServerClient,
    reference: npt.NDArray[np.float32],
    binary: bool,
) -> None:
    cluster = production_cluster
    replica = cluster.replicas[0]
    inp = httpclient.InferInput("input", list(IRIS.shape), "FP32")
    inp.set_data_from_numpy(IRIS, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = shop.infer("iris", [inp], outputs=[out], parameters={"ztgate.verification": "none"})
    got = result.as_numpy("probabilities")
    assert got is not None and got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    # JSON outputs carry no binary_data_size; binary ones do: the client was answered in
    # the encoding it asked for, not merely decoded one way or another.
    described = result.get_output("probabilities")
    assert described is not None
    assert ("binary_data_size" in described.get("parameters", {})) is binary

    params = result.get_response()["parameters"]
    _check_receipt(cluster, replica, params, got)


def _check_receipt(
    cluster: ProductionCluster,
    replica: Replica,
    params: dict[str, Any],
    got: npt.NDArray[np.float32],
) -> None:
    """The answer's receipt, whichever front answered: its summary signature, and its
    salted commitments to exactly the tensors the client sent and got."""
    assert params["ztgate.verification"] == "none"
    line = params["ztgate.receipt"]
    keys = replica.keyset()
    assert verify_summary(line, keys), line
    assert line.split(" ")[1] == params["ztgate.receipt_id"]

    signed = _receipt(cluster, replica, params)
    assert keys.verify(signed)
    assert verify_summary(line, keys, signed.receipt)
    r = signed.receipt
    assert r.model is not None and r.model.name == "iris"
    # The receipt commits to exactly what this client sent and got, however it travelled.
    salt = base64.b64decode(params["ztgate.salt"])
    sent = Tensor("input", "FP32", IRIS.shape, IRIS)
    answered = Tensor("probabilities", "FP32", got.shape, got)
    assert {t.name: t.commitment for t in r.inputs} == {"input": commit_tensor(sent, salt)}
    assert {t.name: t.commitment for t in r.outputs}["probabilities"] == commit_tensor(
        answered, salt
    )
    # Control for the commitment check: another answer does not match it.
    other = Tensor("probabilities", "FP32", got.shape, got[::-1].copy())
    assert commit_tensor(other, salt) != commit_tensor(answered, salt)


def _refused(replica: Replica, ca: Path, leaf: Leaf | None) -> str:
    """The stock client gets no HTTP answer at all (an HTTP 401/403 would surface as an
    InferenceServerException, not accepted here); a plain TLS socket with the same
    certificate names the alert the gateway sent. Returns that alert."""
    client = triton_http(replica, ca, leaf)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, HTTPConnectionClosed)):
            client.is_server_live()
    finally:
        client.close()
    return _tls_answer(replica, ca, leaf)


def _tls_answer(replica: Replica, ca: Path, leaf: Leaf | None) -> str:
    """The first line the gateway answers to a GET over TLS, or the TLS alert it sent
    instead, or "closed" (with TLS 1.3 the client's side of the handshake completes first
    and the server's refusal arrives on the first read: an alert, or just the close)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if leaf is not None:
        ctx.load_cert_chain(leaf.cert, leaf.key)
    try:
        with socket.create_connection(("127.0.0.1", replica.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
                line = tls.recv(64).split(b"\r\n")[0].decode()
                return line or "closed"
    except ssl.SSLError as exc:
        return f"alert {exc.reason}"
    except ConnectionError:
        return "closed"


def test_handshake_refuses_no_and_wrong_certificates(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    replica, ca = cluster.replicas[1], cluster.pki.root_ca
    shop = cluster.pki.client("shop")
    # Positive control: the very same constructions with the client's own certificate.
    ok = triton_http(replica, ca, shop)
    try:
        assert ok.is_server_live()
    finally:
        ok.close()
    assert _tls_answer(replica, ca, shop) == "HTTP/1.1 200 OK"
    # Refused: a TLS alert, or the connection closed before a single byte of HTTP.
    assert _refused(replica, ca, None) in REFUSED
    # A certificate of the customer's own PKI, but from its node CA, not its client CA.
    assert _refused(replica, ca, cluster.pki.node("n1")) in REFUSED


def triton_grpc(replica: Replica, ca: Path, leaf: Leaf | None) -> grpcclient.InferenceServerClient:
    """The stock gRPC client as docs/clients.md builds it (no certificate when `leaf` is None)."""
    kw = {} if leaf is None else {"private_key": str(leaf.key), "certificate_chain": str(leaf.cert)}
    return grpcclient.InferenceServerClient(
        f"127.0.0.1:{replica.grpc_port}", ssl=True, root_certificates=str(ca), **kw
    )


def test_grpc_flow_matches_onnxruntime_and_the_receipt(
    production_cluster: ProductionCluster, reference: npt.NDArray[np.float32]
) -> None:
    """The gRPC front of the production replica: what simple_grpc_infer_client.py does
    (health, metadata, raw-tensor inference, gzip as `compression_algorithm` sends it),
    and the same receipt checks as over HTTP. No certificate, or one from the customer's
    node CA, is refused at the handshake (UNAVAILABLE: no RPC is ever answered)."""
    cluster = production_cluster
    replica = cluster.replicas[0]
    client = triton_grpc(replica, cluster.pki.root_ca, cluster.pki.client("shop"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("iris")
        meta = client.get_model_metadata("iris")
        assert [(i.name, i.datatype) for i in meta.inputs] == [("input", "FP32")]
        inp = grpcclient.InferInput("input", list(IRIS.shape), "FP32")
        inp.set_data_from_numpy(IRIS)
        result = client.infer(
            "iris",
            [inp],
            outputs=[grpcclient.InferRequestedOutput("probabilities")],
            parameters={"ztgate.verification": "none"},
            compression_algorithm="gzip",
        )
    finally:
        client.close()
    got = result.as_numpy("probabilities")
    assert got is not None and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    response = result.get_response()
    params = {
        k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in response.parameters.items()
    }
    _check_receipt(cluster, replica, params, got)
    for leaf in (None, cluster.pki.node("n1")):
        refused = triton_grpc(replica, cluster.pki.root_ca, leaf)
        try:
            with pytest.raises(InferenceServerException) as failed:
                refused.is_server_live(client_timeout=10.0)
            assert "UNAVAILABLE" in str(failed.value.status()), failed.value
        finally:
            refused.close()
