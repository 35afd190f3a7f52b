"""The gRPC front (gateway/grpc_front.py) with Triton's own clients, unchanged.

A real gateway (tests/gateway_harness.py) with `listen.grpc_port`, in front of one real
tritonserver of the session's cluster (one node, so the same request through either front
is answered by the same node and the two receipts can be compared whole). What
`simple_grpc_infer_client.py`, `simple_grpc_aio_infer_client.py` and the streaming example
do, against iris: health, metadata, raw-tensor inference (plain, gzip, deflate), streams
(sync callback and aio), statistics and the repository index; refusals at the handshake
(no certificate, a foreign CA) and on an open channel (revocation, on the next RPC and the
next stream message); Triton's status codes with the problem type in trailing metadata; a
gzip bomb; and the same cases through the HTTP front and the gRPC front, whose receipts
agree.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import queue
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.pki import PKI, Issued, client_crl
from gateway.ports import free_port
from gateway.protocol.tensors import Tensor
from gateway.receipts.canonical import canonical_json
from gateway.receipts.commit import commit_tensor
from gateway.receipts.model import Receipt, SignedReceipt
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.simple_model import SIMPLE, WIDTH, example_inputs, simple_node, simple_registry

CRL_VICTIM = "grpc-crl-victim"
NODE = "grpc-n1"  # the one node: serves simple and iris
IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], np.float32)
PROBLEM = "https://ztgate.dev/problems/"


def wait_listening(port: int, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped examples and Triton's `simple`, onboarded with `ztgate model add`."""
    return simple_registry(tmp_path_factory.mktemp("grpc-front"))


@pytest.fixture(scope="module")
def gateway(
    pki: PKI, triton_home: Path, registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    base = tmp_path_factory.mktemp("grpc-gw")
    victim = pki.issue("client", CRL_VICTIM)  # in the client CA's CRL from the start
    crl = client_crl(pki, [victim.serial], base / "client.crl")
    with simple_node(pki, triton_home, registry, base / "n", name=NODE) as node:
        cfg = gateway_config(
            pki,
            registry,
            base / "gw",
            [node],
            listen={"grpc_port": free_port()},
            tls={"crl": str(crl)},
        )
        with running_gateway(cfg) as gw:
            assert cfg.listen.grpc_port is not None
            wait_listening(cfg.listen.grpc_port)
            yield gw


def grpc_url(gw: RunningGateway) -> str:
    return f"127.0.0.1:{gw.cfg.listen.grpc_port}"


def tls_options(pki: PKI, leaf: Issued | None) -> dict[str, Any]:
    """The client's TLS arguments as docs/clients.md gives them (no certificate: None)."""
    kw: dict[str, Any] = {"ssl": True, "root_certificates": str(pki.root_ca)}
    if leaf is not None:
        kw |= {"private_key": str(leaf.key), "certificate_chain": str(leaf.cert)}
    return kw


def triton_grpc(gw: RunningGateway, pki: PKI, name: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        grpc_url(gw), **tls_options(pki, pki.ensure("client", name))
    )


@pytest.fixture(scope="module")
def alice(gateway: RunningGateway, pki: PKI) -> Iterator[grpcclient.InferenceServerClient]:
    client = triton_grpc(gateway, pki, "alice")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference(registry: Path) -> Any:
    path = next(registry.glob("models/iris/*/model.onnx"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": IRIS})[0]


def iris_inputs(x: Any = IRIS) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def params_of(response: Any) -> dict[str, Any]:
    """A ModelInferResponse's parameters as plain values."""
    return {k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in response.parameters.items()}


def status(exc: InferenceServerException) -> str:
    return str(exc.status()).removeprefix("StatusCode.")


# --- Triton's examples, on `simple` ---------------------------------------------------------
def simple_inputs(mod: Any = grpcclient) -> tuple[list[Any], Any, Any]:
    input0, input1 = example_inputs()
    inputs = [
        mod.InferInput("INPUT0", [1, WIDTH], "INT32"),
        mod.InferInput("INPUT1", [1, WIDTH], "INT32"),
    ]
    inputs[0].set_data_from_numpy(input0)
    inputs[1].set_data_from_numpy(input1)
    return inputs, input0, input1


def check_simple(result: Any, input0: Any, input1: Any) -> None:
    """The assertions the examples make: OUTPUT0 is the sum, OUTPUT1 the difference."""
    output0, output1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    for i in range(WIDTH):
        assert input0[0][i] + input1[0][i] == output0[0][i]
        assert input0[0][i] - input1[0][i] == output1[0][i]


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("with_outputs", [True, False], ids=["outputs", "no-outputs"])
def test_simple_grpc_infer_client(
    alice: grpcclient.InferenceServerClient, compression: str | None, with_outputs: bool
) -> None:
    """`test_infer` / `test_infer_no_outputs` of simple_grpc_infer_client.py, with its
    `--grpc-compression-algorithm` choices."""
    inputs, input0, input1 = simple_inputs()
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
    result = alice.infer(
        model_name=SIMPLE,
        inputs=inputs,
        outputs=outputs if with_outputs else None,
        client_timeout=30.0,
        headers={"test": "1"},
        compression_algorithm=compression,
    )
    statistics = alice.get_inference_statistics(model_name=SIMPLE)
    assert len(statistics.model_stats) == 1
    check_simple(result, input0, input1)


def test_simple_grpc_aio_infer_and_stream_clients(gateway: RunningGateway, pki: PKI) -> None:
    """simple_grpc_aio_infer_client.py (infer, statistics), and the aio `stream_infer`."""
    issued = pki.ensure("client", "alice")

    async def run() -> None:
        client = grpcaio.InferenceServerClient(grpc_url(gateway), **tls_options(pki, issued))
        try:
            inputs, input0, input1 = simple_inputs(grpcaio)
            outputs = [grpcaio.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
            result = await client.infer(model_name=SIMPLE, inputs=inputs, outputs=outputs)
            statistics = await client.get_inference_statistics(model_name=SIMPLE)
            assert len(statistics.model_stats) == 1
            check_simple(result, input0, input1)

            async def requests() -> Any:
                for i in range(3):
                    yield {"model_name": SIMPLE, "inputs": inputs, "request_id": str(i)}

            streamed = [r async for r in client.stream_infer(requests())]
            assert [e for _, e in streamed] == [None] * 3
            assert [r.get_response().id for r, _ in streamed] == ["0", "1", "2"]
            for r, _ in streamed:
                check_simple(r, input0, input1)
        finally:
            await client.close()

    asyncio.run(run())


# --- the stock flow ----------------------------------------------------------------------
def test_health_metadata_index_and_statistics(alice: grpcclient.InferenceServerClient) -> None:
    assert alice.is_server_live()
    assert alice.is_server_ready()
    assert alice.is_model_ready("iris")
    assert not alice.is_model_ready("no-such-model")
    server = alice.get_server_metadata()
    assert server.name == "ztgate" and "statistics" in server.extensions
    meta = alice.get_model_metadata("iris")
    assert meta.name == "iris"
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("input", "FP32", [-1, 4])
    ]
    index = alice.get_model_repository_index()
    assert "iris" in {m.name for m in index.models}
    assert all(m.state == "READY" for m in index.models if m.name == "iris")
    # Statistics count inferences, on whichever front they came.
    before = alice.get_inference_statistics("iris").model_stats[0]
    alice.infer("iris", iris_inputs())
    after = alice.get_inference_statistics("iris").model_stats[0]
    assert after.name == "iris"
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + len(IRIS)
    with pytest.raises(InferenceServerException) as unknown:
        alice.get_model_metadata("no-such-model")
    assert status(unknown.value) == "NOT_FOUND"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_config("iris"),
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.unregister_cuda_shared_memory(),
        lambda c: c.load_model("iris"),
        lambda c: c.get_trace_settings(),
        lambda c: c.get_log_settings(),
    ],
    ids=["config", "system-shm", "cuda-shm", "model-control", "trace", "logs"],
)
def test_extensions_not_offered_are_unimplemented(
    alice: grpcclient.InferenceServerClient, call: Any
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        call(alice)
    assert status(refused.value) == "UNIMPLEMENTED"
    assert "this gateway does not offer" in str(refused.value.message())


def test_a_method_the_service_lacks_is_unimplemented(
    alice: grpcclient.InferenceServerClient,
) -> None:
    # The service is added through its generic handler only (`add_service`): every
    # method of it is served (the tests above), and one it lacks is still refused.
    call = alice._channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as refused:
        call(b"", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_what_a_caller_may_not_view_does_not_exist_for_it(
    gateway: RunningGateway, pki: PKI, alice: grpcclient.InferenceServerClient
) -> None:
    """The Cedar `view` action, as on the HTTP front: an officer (no `view` permit) is told
    nothing about iris, in the very words an unknown model gets; alice is the control."""
    olga = triton_grpc(gateway, pki, "olga")
    try:
        assert olga.is_server_live()
        assert not olga.is_model_ready("iris")
        assert "iris" not in {m.name for m in olga.get_model_repository_index().models}
        assert not olga.get_inference_statistics().model_stats
        with pytest.raises(InferenceServerException) as unknown:
            alice.get_model_metadata("no-such-model")
        words = str(unknown.value.message()).replace("no-such-model", "X")
        for call in (olga.get_model_metadata, olga.get_inference_statistics):
            with pytest.raises(InferenceServerException) as hidden:
                call("iris")
            assert status(hidden.value) == "NOT_FOUND"
            assert str(hidden.value.message()).replace("iris", "X") == words
        assert alice.is_model_ready("iris")
    finally:
        olga.close()


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_infer_raw_tensors_matches_onnxruntime_and_carries_the_receipt(
    alice: grpcclient.InferenceServerClient, reference: Any, compression: str | None
) -> None:
    out = grpcclient.InferRequestedOutput("probabilities")
    result = alice.infer(
        "iris",
        iris_inputs(),
        outputs=[out],
        parameters={"ztgate.verification": "none"},
        compression_algorithm=compression,
        request_id="mine-1",
    )
    got = result.as_numpy("probabilities")
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    response = result.get_response()
    assert len(response.raw_output_contents) == len(response.outputs) == 1
    assert response.id == "mine-1"
    params = params_of(response)
    assert params["ztgate.verification"] == "none"
    assert params["ztgate.verification_status"] == "unverified"
    assert params["ztgate.nodes"] == NODE
    assert params["ztgate.receipt"].split(" ")[1] == params["ztgate.receipt_id"]
    assert len(base64.b64decode(params["ztgate.salt"])) > 0


def test_a_bad_stream_message_is_answered_in_the_stream(
    alice: grpcclient.InferenceServerClient,
) -> None:
    """The sync client's stream (start_stream / async_stream_infer): a bad message is
    answered in the stream (Triton's error_message), and the stream goes on."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    alice.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        alice.async_stream_infer("iris", iris_inputs(), request_id="a")
        bad = grpcclient.InferInput("input", [1, 4], "FP64")
        bad.set_data_from_numpy(np.zeros((1, 4), np.float64))
        alice.async_stream_infer("iris", [bad], request_id="b")
        alice.async_stream_infer("iris", iris_inputs(), request_id="c")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        alice.stop_stream()
    assert got[0][1] is None and got[2][1] is None
    assert got[0][0].get_response().id == "a" and got[2][0].get_response().id == "c"
    assert got[1][0] is None and "must be FP32" in got[1][1].message()


# --- refusals ------------------------------------------------------------------------------
def test_no_certificate_and_a_foreign_ca_are_refused_at_the_handshake(
    gateway: RunningGateway, pki: PKI
) -> None:
    reached = gateway.gw.metrics.app_calls
    # Positive control: the same construction with a client certificate.
    ok = triton_grpc(gateway, pki, "alice")
    try:
        assert ok.is_server_live()
    finally:
        ok.close()
    assert gateway.gw.metrics.app_calls == reached + 1
    node = pki.ensure("node", "n1")  # a valid certificate of the PKI, but not the client CA's
    for leaf in (None, node):
        client = grpcclient.InferenceServerClient(grpc_url(gateway), **tls_options(pki, leaf))
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.is_server_live(client_timeout=10)
            assert status(refused.value) == "UNAVAILABLE", refused.value
        finally:
            client.close()
    assert gateway.gw.metrics.app_calls == reached + 1  # the refused never reached the app


def test_a_client_ca_crl_is_honoured_on_every_rpc(gateway: RunningGateway, pki: PKI) -> None:
    """`tls.crl`: Python gRPC takes no CRL at the handshake, so the front refuses a
    certificate the client CA revoked on each RPC (and stream message), before identity."""
    victim = pki.ensure("client", CRL_VICTIM)
    reached = gateway.gw.metrics.app_calls
    client = grpcclient.InferenceServerClient(grpc_url(gateway), **tls_options(pki, victim))
    try:
        for call in (client.is_server_live, lambda: client.infer("iris", iris_inputs())):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert status(refused.value) == "UNAUTHENTICATED"
            assert "revoked" in str(refused.value.message())
    finally:
        client.close()
    assert gateway.gw.metrics.app_calls == reached + 2  # counted, refused before identity
    # The HTTP listener refuses the same certificate at its handshake.
    with (
        pytest.raises(
            (ssl.SSLError, httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)
        ),
        httpx.Client(verify=client_context(pki, victim.cert, victim.key), timeout=10) as c,
    ):
        c.get(f"{gateway.base}/v2/health/live")


def test_revocation_ends_the_next_rpc_and_the_next_stream_message_on_open_channels(
    gateway: RunningGateway, pki: PKI
) -> None:
    bob = pki.issue("client", "bob", organization="Acme")
    client = grpcclient.InferenceServerClient(grpc_url(gateway), **tls_options(pki, bob))
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        assert client.infer("iris", iris_inputs()).as_numpy("probabilities") is not None
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("iris", iris_inputs(), request_id="before")
        result, error = answers.get(timeout=30)
        assert error is None and result.get_response().id == "before"

        olga = pki.ensure("client", "olga")
        with httpx.Client(verify=client_context(pki, olga.cert, olga.key), timeout=10) as c:
            r = c.post(f"{gateway.base}/admin/revoke", json={"certificate": bob.cert.read_text()})
        assert r.status_code == 200, r.text

        # The same channel, already open: the next unary RPC, whatever it is ...
        for call in (lambda: client.is_server_live(), lambda: client.infer("iris", iris_inputs())):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert status(refused.value) == "UNAUTHENTICATED"
            assert "revoked" in str(refused.value.message())
        # ... and the next message of the open stream, which it ends.
        client.async_stream_infer("iris", iris_inputs(), request_id="after")
        result, error = answers.get(timeout=30)
        assert result is None and "UNAUTHENTICATED" in str(error.status()), error
    finally:
        client.stop_stream()
        client.close()


def test_expiry_is_checked_on_every_rpc_and_stream_message_of_an_open_channel(
    gateway: RunningGateway, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a handshake checks once, the pipeline checks per RPC and per stream message: a
    channel opened while the certificate was valid is refused once it has expired."""
    alice = pki.ensure("client", "alice")
    client = grpcclient.InferenceServerClient(grpc_url(gateway), **tls_options(pki, alice))
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    resolver = gateway.gw.pipeline.identity.resolver
    try:
        assert client.is_server_live()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("iris", iris_inputs(), request_id="valid")
        assert answers.get(timeout=30)[1] is None
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)  # past alice's not_after
        monkeypatch.setattr(resolver, "_clock", lambda: later)
        with pytest.raises(InferenceServerException) as refused:
            client.is_server_live()
        assert status(refused.value) == "UNAUTHENTICATED"
        assert "expired" in str(refused.value.message())
        client.async_stream_infer("iris", iris_inputs(), request_id="expired")
        result, error = answers.get(timeout=30)
        assert result is None and "UNAUTHENTICATED" in str(error.status()), error
    finally:
        monkeypatch.undo()
        client.stop_stream()
        client.close()


def raw_stub(gw: RunningGateway, pki: PKI, name: str) -> tuple[grpc.Channel, Any]:
    issued = pki.ensure("client", name)
    creds = grpc.ssl_channel_credentials(
        pki.root_ca.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes()
    )
    channel = grpc.secure_channel(grpc_url(gw), creds)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def iris_request(model: str = "iris", x: Any = IRIS, datatype: str = "FP32", **params: str) -> Any:
    req = service_pb2.ModelInferRequest(model_name=model)
    spec = req.inputs.add()
    spec.name, spec.datatype = "input", datatype
    spec.shape.extend(x.shape)
    req.raw_input_contents.append(x.tobytes())
    for k, v in params.items():
        req.parameters[k].string_param = v
    return req


@pytest.mark.parametrize(
    ("request_", "code", "problem"),
    [
        (iris_request("no-such-model"), "NOT_FOUND", "unknown-model"),
        (
            iris_request(x=IRIS.astype(np.float64), datatype="FP64"),
            "INVALID_ARGUMENT",
            "invalid-tensor",
        ),
        (iris_request(**{"ztgate.verification": "zk"}), "PERMISSION_DENIED", "forbidden"),
        (iris_request(**{"ztgate.verification": "bogus"}), "INVALID_ARGUMENT", "bad-request"),
    ],
    ids=["unknown-model", "wrong-dtype", "mode-forbidden", "bad-parameter"],
)
def test_problems_are_triton_status_codes_with_the_type_in_trailers(
    gateway: RunningGateway, pki: PKI, request_: Any, code: str, problem: str
) -> None:
    channel, stub = raw_stub(gateway, pki, "alice")
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request_, timeout=30)
    err = refused.value
    assert err.code().name == code, err
    trailers = dict(err.trailing_metadata())
    assert trailers["ztgate-problem-type"] == PROBLEM + problem
    assert len(trailers["ztgate-request-id"]) == 32


def test_a_gzip_bomb_is_refused_by_the_decompressed_size_cap(
    gateway: RunningGateway, pki: PKI, alice: grpcclient.InferenceServerClient
) -> None:
    cap = gateway.cfg.limits.max_body_bytes
    reached = gateway.gw.metrics.app_calls
    zeros = np.zeros((cap // 16 + 1, 4), np.float32)  # just over the cap, uncompressed
    assert len(gzip.compress(zeros.tobytes())) < cap // 500  # what travels is tiny
    with pytest.raises(InferenceServerException) as refused:
        alice.infer("iris", iris_inputs(zeros), compression_algorithm="gzip")
    assert status(refused.value) == "RESOURCE_EXHAUSTED", refused.value
    # gRPC's own receive cap, which it applies to the decompressed message (never the
    # gateway's decoder: nothing of it reached the pipeline).
    assert "larger than max" in str(refused.value.message()), refused.value
    assert gateway.gw.metrics.app_calls == reached
    assert alice.is_server_live()  # and the channel still works


# --- the same cases through both fronts ----------------------------------------------------
def read_receipt(gw: RunningGateway, pki: PKI, rid: str) -> Receipt:
    alice = pki.ensure("client", "alice")
    with httpx.Client(verify=client_context(pki, alice.cert, alice.key), timeout=30) as c:
        r = c.get(f"{gw.base}/v2/receipts/{rid}")
    assert r.status_code == 200, r.text
    doc = r.json()  # the signed envelope, and what the API adds (proof, late evidence)
    return SignedReceipt.from_bytes(canonical_json({k: doc[k] for k in ("receipt", "sig")})).receipt


def http_front(gw: RunningGateway, pki: PKI, mode: str) -> tuple[dict[str, Any], Any]:
    alice = pki.ensure("client", "alice")
    client = httpclient.InferenceServerClient(
        gw.url,
        ssl=True,
        ssl_options={
            "ca_certs": str(pki.root_ca),
            "certfile": str(alice.cert),
            "keyfile": str(alice.key),
        },
    )
    try:
        inp = httpclient.InferInput("input", list(IRIS.shape), "FP32")
        inp.set_data_from_numpy(IRIS, binary_data=True)
        result = client.infer("iris", [inp], parameters={"ztgate.verification": mode})
        return result.get_response()["parameters"], result.as_numpy("probabilities")
    finally:
        client.close()


def grpc_front(gw: RunningGateway, pki: PKI, mode: str) -> tuple[dict[str, Any], Any]:
    client = triton_grpc(gw, pki, "alice")
    try:
        result = client.infer("iris", iris_inputs(), parameters={"ztgate.verification": mode})
        return params_of(result.get_response()), result.as_numpy("probabilities")
    finally:
        client.close()


def http_refusal(gw: RunningGateway, pki: PKI, mode: str) -> tuple[str, str | None]:
    alice = pki.ensure("client", "alice")
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 4], "data": IRIS.tolist()}],
        "parameters": {"ztgate.verification": mode},
    }
    with httpx.Client(verify=client_context(pki, alice.cert, alice.key), timeout=30) as c:
        r = c.post(f"{gw.base}/v2/models/iris/infer", json=body)
    return r.json()["type"], r.headers.get("ztgate-receipt")


def grpc_refusal(gw: RunningGateway, pki: PKI, mode: str) -> tuple[str, str | None]:
    channel, stub = raw_stub(gw, pki, "alice")
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(iris_request(**{"ztgate.verification": mode}), timeout=30)
    trailers = dict(refused.value.trailing_metadata())
    return trailers["ztgate-problem-type"], trailers.get("ztgate-receipt")


@pytest.mark.parametrize("front", [http_front, grpc_front], ids=["http", "grpc"])
def test_an_answer_is_receipted_alike_on_both_fronts(
    gateway: RunningGateway, pki: PKI, reference: Any, front: Any
) -> None:
    """Each front's answer against a reference answer from the other front: the receipts
    agree on identity, model, policy set and decision, node and verification, and each
    commits (under its own salt) to exactly the tensors sent and answered."""
    other = grpc_front if front is http_front else http_front
    mine, got = front(gateway, pki, "none")
    theirs, _ = other(gateway, pki, "none")
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    a = read_receipt(gateway, pki, mine["ztgate.receipt_id"])
    b = read_receipt(gateway, pki, theirs["ztgate.receipt_id"])
    assert a.kind == b.kind
    assert a.client == b.client and a.client is not None
    assert a.client.spiffe_id == "spiffe://ztgate.local/client/alice"
    assert a.model == b.model and a.model is not None and a.model.name == "iris"
    assert a.policy is not None and b.policy is not None
    assert a.policy.set_hash == b.policy.set_hash
    assert a.verification == b.verification
    assert a.nodes == b.nodes == (NODE,)
    assert [(t.name, t.datatype, t.shape) for t in a.inputs] == [
        (t.name, t.datatype, t.shape) for t in b.inputs
    ]
    for params, receipt in ((mine, a), (theirs, b)):
        salt = base64.b64decode(params["ztgate.salt"])
        sent = Tensor("input", "FP32", IRIS.shape, IRIS)
        assert [t.commitment for t in receipt.inputs] == [commit_tensor(sent, salt)]
        assert params["ztgate.decision_id"] == receipt.policy.decision_id  # type: ignore[union-attr]
    assert {k for k in mine if k.startswith("ztgate.")} == {
        k for k in theirs if k.startswith("ztgate.")
    }


def test_a_refusal_is_the_same_problem_and_denial_receipt_on_both_fronts(
    gateway: RunningGateway, pki: PKI
) -> None:
    http_type, http_receipt = http_refusal(gateway, pki, "zk")
    grpc_type, grpc_receipt = grpc_refusal(gateway, pki, "zk")
    assert http_type == grpc_type == PROBLEM + "forbidden"
    assert http_receipt is not None and grpc_receipt is not None
    # Both name a denial receipt (identical denials within a window share the first one)
    # of this caller, this model and this problem type.
    for line in (http_receipt, grpc_receipt):
        denial = read_receipt(gateway, pki, line.split(" ")[1])
        assert denial.denial is not None and denial.denial.problem_type == PROBLEM + "forbidden"
        assert denial.client is not None and denial.client.spiffe_id.endswith("/alice")
        assert denial.model is not None and denial.model.name == "iris"
