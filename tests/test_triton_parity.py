"""Triton parity on the HTTP front: what Triton's own example clients do, unchanged.

A real gateway (TLS, the shim, uvicorn) in front of a real tritonserver serving Triton's
`simple` model (tests/simple_model.py, onboarded with `ztgate model add`) and iris; the
clients are `tritonclient.http` and `tritonclient.http.aio` with client certificates.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from gateway.pipeline.decode import read_body
from gateway.pki import PKI
from gateway.protocol.problems import PROBLEM_BASE, PayloadTooLarge
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.simple_model import SIMPLE, example_inputs, simple_node, simple_registry

UNKNOWN = "Request for unknown model"


@pytest.fixture(scope="module")
def gateway(
    pki: PKI, triton_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    base = tmp_path_factory.mktemp("parity")
    registry = simple_registry(base)
    with simple_node(pki, triton_home, registry, base / "n") as node:
        cfg = gateway_config(pki, registry, base / "gw", [node])
        with running_gateway(cfg) as gw:
            yield gw


def http_client(gw: RunningGateway, pki: PKI, name: str) -> httpclient.InferenceServerClient:
    issued = pki.ensure("client", name)
    return httpclient.InferenceServerClient(
        gw.url,
        ssl=True,
        ssl_options={
            "ca_certs": str(pki.root_ca),
            "certfile": str(issued.cert),
            "keyfile": str(issued.key),
        },
        network_timeout=30.0,
        connection_timeout=30.0,
    )


def raw_client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=30)


# --------------------------------------------------------------------------- the examples


def _request(with_outputs: bool) -> dict[str, Any]:
    """The examples' `test_infer` / `test_infer_no_outputs` request (the aio client takes
    the very same InferInput and InferRequestedOutput classes)."""
    input0, input1 = example_inputs()
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(input0, binary_data=False)
    inputs[1].set_data_from_numpy(input1, binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]
    return {
        "inputs": inputs,
        "outputs": outputs if with_outputs else None,
        "query_params": {"test_1": 1, "test_2": 2},
    }


def _infer(
    client: httpclient.InferenceServerClient,
    model: str,
    with_outputs: bool,
    request_compression: str | None = None,
    response_compression: str | None = None,
) -> Any:
    """`test_infer` / `test_infer_no_outputs` of simple_http_infer_client.py."""
    return client.infer(
        model,
        **_request(with_outputs),
        request_compression_algorithm=request_compression,
        response_compression_algorithm=response_compression,
    )


def _validate(result: Any) -> None:
    """The examples' check: OUTPUT0 is the sum, OUTPUT1 the difference, element by element."""
    input0, input1 = example_inputs()
    output0, output1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    for i in range(16):
        assert input0[0][i] + input1[0][i] == output0[0][i], "sync infer error: incorrect sum"
        assert input0[0][i] - input1[0][i] == output1[0][i], "incorrect difference"


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_simple_http_infer_client(
    gateway: RunningGateway, pki: PKI, compression: str | None
) -> None:
    """simple_http_infer_client.py, with --request- and --response-compression-algorithm."""
    client = http_client(gateway, pki, "demo")
    try:
        result = _infer(client, SIMPLE, True, compression, compression)
        statistics = client.get_inference_statistics(model_name=SIMPLE)
        assert len(statistics["model_stats"]) == 1, "FAILED: Inference Statistics"
        _validate(result)
        _validate(_infer(client, SIMPLE, False, compression, compression))
        with pytest.raises(InferenceServerException) as wrong:
            _infer(client, "wrong_model_name", True)
        assert wrong.value.message().startswith(UNKNOWN), wrong.value.message()
        assert wrong.value.message() == f"{UNKNOWN}: 'wrong_model_name' is not found"
    finally:
        client.close()


def test_simple_http_health_metadata(gateway: RunningGateway, pki: PKI) -> None:
    """simple_http_health_metadata.py, except the server's name: `ztgate`, not `triton`
    (docs/clients.md, "Which server answers")."""
    client = http_client(gateway, pki, "demo")
    try:
        assert client.is_server_live(query_params={"test_1": 1, "test_2": 2})
        assert client.is_server_ready()
        assert client.is_model_ready(SIMPLE)
        metadata = client.get_server_metadata()
        assert metadata["name"] == "ztgate"
        assert "statistics" in metadata["extensions"]
        model = client.get_model_metadata(SIMPLE, query_params={"test_1": 1, "test_2": 2})
        assert model["name"] == SIMPLE
        assert [i["datatype"] for i in model["inputs"]] == ["INT32", "INT32"]
        with pytest.raises(InferenceServerException) as wrong:
            client.get_model_metadata("wrong_model_name")
        assert UNKNOWN in wrong.value.message()
        assert wrong.value.status() == "404"
    finally:
        client.close()


def test_simple_http_aio_infer_client(gateway: RunningGateway, pki: PKI) -> None:
    """simple_http_aio_infer_client.py: the same calls through the aio client, then two
    inferences in parallel; with gzip both ways."""
    issued = pki.ensure("client", "demo")
    ctx = ssl.create_default_context()
    ctx.load_cert_chain(certfile=str(issued.cert), keyfile=str(issued.key))
    ctx.load_verify_locations(cafile=str(pki.root_ca))

    async def infer(client: aioclient.InferenceServerClient, model: str, outputs: bool) -> Any:
        return await client.infer(
            model,
            **_request(outputs),
            request_compression_algorithm="gzip",
            response_compression_algorithm="gzip",
        )

    async def main() -> None:
        client = aioclient.InferenceServerClient(gateway.url, ssl=True, ssl_context=ctx)
        try:
            results = await infer(client, SIMPLE, True)
            statistics = await client.get_inference_statistics(model_name=SIMPLE)
            assert len(statistics["model_stats"]) == 1
            _validate(results)
            _validate(await infer(client, SIMPLE, False))
            with pytest.raises(InferenceServerException) as wrong:
                await infer(client, "wrong_model_name", True)
            assert wrong.value.message().startswith(UNKNOWN)
            first, second = await asyncio.gather(
                infer(client, SIMPLE, True), infer(client, SIMPLE, False)
            )
            _validate(first)
            _validate(second)
        finally:
            await client.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- statistics


def _stats(client: httpx.Client, gw: RunningGateway, path: str) -> dict[str, Any]:
    r = client.get(f"{gw.base}{path}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_statistics_count_from_the_gateways_point_of_view(
    gateway: RunningGateway, pki: PKI
) -> None:
    """Triton's JSON shape; successes, failures, rows and durations as the gateway saw
    them; the durations of a success add up to its total, as in Triton."""
    batch = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [3, 16], "data": [1] * 48},
            {"name": "INPUT1", "datatype": "INT32", "shape": [3, 16], "data": [2] * 48},
        ]
    }
    bad = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16}]}
    with raw_client(pki, "demo") as demo:
        before = _stats(demo, gateway, f"/v2/models/{SIMPLE}/stats")["model_stats"][0]
        t0 = time.time()
        r = demo.post(f"{gateway.base}/v2/models/{SIMPLE}/infer", json=batch)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [3] * 48
        r = demo.post(f"{gateway.base}/v2/models/{SIMPLE}/versions/1/infer", json=bad)
        assert r.status_code == 400
        after = _stats(demo, gateway, f"/v2/models/{SIMPLE}/versions/1/stats")["model_stats"][0]
        everything = _stats(demo, gateway, "/v2/models/stats")["model_stats"]
        r = demo.get(f"{gateway.base}/v2/models/{SIMPLE}/versions/7/stats")
        assert r.status_code == 404 and r.json()["type"] == PROBLEM_BASE + "unknown-version"
    assert set(after) >= {
        "name",
        "version",
        "last_inference",
        "inference_count",
        "execution_count",
        "inference_stats",
        "batch_stats",
    }
    assert (after["name"], after["version"]) == (SIMPLE, "1")
    stats, was = after["inference_stats"], before["inference_stats"]
    assert set(stats) >= {
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
    }
    assert stats["success"]["count"] == was["success"]["count"] + 1
    assert stats["fail"]["count"] == was["fail"]["count"] + 1
    assert stats["fail"]["ns"] > was["fail"]["ns"]
    assert after["inference_count"] == before["inference_count"] + 3  # the rows
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["last_inference"] >= int(t0 * 1000)
    parts = ("queue", "compute_input", "compute_infer", "compute_output")
    for part in parts:
        assert stats[part]["count"] == stats["success"]["count"], part
    assert sum(stats[p]["ns"] for p in parts) == stats["success"]["ns"]
    assert stats["compute_infer"]["ns"] > was["compute_infer"]["ns"]  # the node call
    # Every model the caller may view, each version: not risk (restricted).
    assert sorted(s["name"] for s in everything) == ["iris", "mnist", SIMPLE]


# --------------------------------------------------------------------------- visibility


def _problem(r: httpx.Response) -> tuple[int, str, str, str]:
    body = r.json()
    return r.status_code, body["type"], body["title"], body["detail"]


def test_models_a_caller_may_not_view_answer_like_unknown_ones(
    gateway: RunningGateway, pki: PKI
) -> None:
    """Metadata, readiness and statistics of a model the caller may not view get the very
    404 an unknown name gets (only the name differs); positive controls see it."""
    paths = (
        "/v2/models/{}",
        "/v2/models/{}/ready",
        "/v2/models/{}/stats",
        "/v2/models/{}/versions/1",
    )

    def unknown_like(client: httpx.Client, model: str) -> None:
        for path in paths:
            hidden = client.get(gateway.base + path.format(model))
            missing = client.get(gateway.base + path.format("nope"))
            status, type_, title, detail = _problem(hidden)
            assert (
                (status, type_, title)
                == _problem(missing)[:3]
                == (
                    404,
                    PROBLEM_BASE + "unknown-model",
                    "Unknown model",
                )
            ), path
            assert detail == _problem(missing)[3].replace("'nope'", repr(model)), path
            assert detail.startswith(UNKNOWN)
            assert "classification" not in hidden.text

    with raw_client(pki, "mallory") as mallory, raw_client(pki, "demo") as demo:
        unknown_like(mallory, "iris")  # an identity no rule knows sees nothing
        unknown_like(demo, "risk")  # restricted: an application may not see it
        # Positive controls: the application sees iris; a cleared caller sees risk.
        assert demo.get(f"{gateway.base}/v2/models/iris").json()["name"] == "iris"
        assert demo.get(f"{gateway.base}/v2/models/iris/stats").status_code == 200
        assert mallory.get(f"{gateway.base}/v2/models/stats").json() == {"model_stats": []}
    with raw_client(pki, "carol") as carol:
        risk = carol.get(f"{gateway.base}/v2/models/risk")
        assert risk.status_code == 200 and risk.json()["parameters"]["classification"] == (
            "restricted"
        )


def test_repository_index_lists_only_models_the_caller_may_view(
    gateway: RunningGateway, pki: PKI
) -> None:
    client = http_client(gateway, pki, "demo")
    try:
        index = client.get_model_repository_index()
    finally:
        client.close()
    # No node serves mnist in this gateway: listed, but not ready.
    assert index == [
        {"name": "iris", "version": "1", "state": "READY"},
        {
            "name": "mnist",
            "version": "1",
            "state": "UNAVAILABLE",
            "reason": "no healthy node serves this model",
        },
        {"name": SIMPLE, "version": "1", "state": "READY"},
    ]
    with raw_client(pki, "demo") as demo, raw_client(pki, "mallory") as mallory:
        ready = demo.post(f"{gateway.base}/v2/repository/index", json={"ready": True})
        assert [m["name"] for m in ready.json()] == ["iris", SIMPLE]
        assert mallory.post(f"{gateway.base}/v2/repository/index").json() == []
        bad = demo.post(f"{gateway.base}/v2/repository/index", json={"ready": "yes"})
        assert bad.status_code == 400
    with raw_client(pki, "carol") as carol:
        assert [m["name"] for m in carol.post(f"{gateway.base}/v2/repository/index").json()] == [
            "risk"
        ]


# --------------------------------------------------------------------------- compression


def _iris_body() -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
            ]
        }
    ).encode()


def test_compressed_requests_and_responses(gateway: RunningGateway, pki: PKI) -> None:
    body = _iris_body()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    codings = {
        "gzip": gzip.compress(body),
        "deflate": zlib.compress(body),
        "deflate (raw)": raw.compress(body) + raw.flush(),
    }
    url = f"{gateway.base}/v2/models/iris/infer"
    with raw_client(pki, "demo") as demo:
        plain = demo.post(url, content=body, headers={"accept-encoding": "identity"})
        assert plain.status_code == 200 and "content-encoding" not in plain.headers
        expected = plain.json()["outputs"]
        for name, data in codings.items():
            coding = name.split()[0]
            r = demo.post(
                url, content=data, headers={"content-encoding": coding, "accept-encoding": coding}
            )
            assert r.status_code == 200, (name, r.text)
            assert r.headers["content-encoding"] == coding, name  # httpx decoded it
            assert r.json()["outputs"] == expected, name
        # Problems stay uncompressed (tritonclient reads error bodies as they come).
        r = demo.post(url, content=b"{", headers={"accept-encoding": "gzip"})
        assert r.status_code == 400 and "content-encoding" not in r.headers
        r = demo.post(url, content=body, headers={"content-encoding": "br"})
        assert r.status_code == 415 and r.json()["type"] == PROBLEM_BASE + "unsupported-media-type"
        r = demo.post(url, content=gzip.compress(body)[:-6], headers={"content-encoding": "gzip"})
        assert r.status_code == 400, r.text


def _bomb(inflated: int) -> bytes:
    """gzip of `inflated` zero bytes, made without holding them."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [z.compress(block) for _ in range(inflated >> 20)]
    return b"".join(parts) + z.flush()


def test_a_gzip_bomb_is_refused_before_it_is_inflated_past_the_cap(
    gateway: RunningGateway, pki: PKI
) -> None:
    """Over the API: 413 naming the decompressed cap. Positive control: the same request
    uncompressed fits. Then the bound itself: reading a 256 MiB bomb against a 1 MiB cap
    never holds more than about the cap."""
    bomb = _bomb(64 << 20)  # about 64 KiB on the wire
    url = f"{gateway.base}/v2/models/iris/infer"
    with raw_client(pki, "demo") as demo:
        r = demo.post(url, content=bomb, headers={"content-encoding": "gzip"})
        assert r.status_code == 413, r.text
        assert r.json()["type"] == PROBLEM_BASE + "payload-too-large"
        assert "once decompressed" in r.json()["detail"]
        ok = demo.post(
            url, content=gzip.compress(_iris_body()), headers={"content-encoding": "gzip"}
        )
        assert ok.status_code == 200

    big = _bomb(256 << 20)
    cap = 1 << 20

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            asyncio.run(read_body({"content-encoding": "gzip"}, stream(), cap))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * cap, peak


# --------------------------------------------------------------------------- extensions


def test_unsupported_extensions_get_their_own_problem(gateway: RunningGateway, pki: PKI) -> None:
    """Shared memory, model control, trace and logging: 501 unsupported-extension, each
    through the stock client call; positive control: an unknown route is still a 404."""
    client = http_client(gateway, pki, "demo")
    calls: dict[str, Callable[[], object]] = {
        "system shm status": lambda: client.get_system_shared_memory_status(),
        "system shm register": lambda: client.register_system_shared_memory("r", "/k", 64),
        "system shm unregister": lambda: client.unregister_system_shared_memory(),
        "cuda shm status": lambda: client.get_cuda_shared_memory_status(),
        "load": lambda: client.load_model(SIMPLE),
        "unload": lambda: client.unload_model(SIMPLE),
        "trace": lambda: client.get_trace_settings(),
        "model trace": lambda: client.get_trace_settings(model_name=SIMPLE),
        "logging": lambda: client.get_log_settings(),
    }
    try:
        for what, call in calls.items():
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "501", what
            assert "does not offer" in refused.value.message(), what
    finally:
        client.close()
    with raw_client(pki, "demo") as demo:
        r = demo.get(f"{gateway.base}/v2/cudasharedmemory/status")
        assert r.json()["type"] == PROBLEM_BASE + "unsupported-extension"
        assert (
            demo.get(f"{gateway.base}/v2/no/such/thing").json()["type"]
            == PROBLEM_BASE + "not-found"
        )


# --------------------------------------------------------------------------- TLS alerts


def _first_read(gw: RunningGateway, ctx: ssl.SSLContext) -> bytes | ssl.SSLError:
    """What a client reading the answer to its first request sees."""
    with socket.create_connection(("127.0.0.1", gw.cfg.listen.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            try:
                tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: gw\r\n\r\n")
                return tls.recv(4096)
            except ssl.SSLError as exc:
                return exc


def test_a_client_without_a_certificate_gets_the_certificate_required_alert(
    gateway: RunningGateway, pki: PKI, tmp_path: Path
) -> None:
    """TLS 1.3 finishes the client's side of the handshake before the server checks its
    certificate, so the refusal arrives on the first read: alert 116 certificate_required
    (no certificate) or unknown_ca (one from another CA). Positive control: an answer."""
    none = _first_read(gateway, client_context(pki, None, None))
    assert isinstance(none, ssl.SSLError), none
    assert none.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", none
    foreign = PKI.init(tmp_path / "foreign", pki.trust_domain)
    stranger = foreign.issue("client", "demo")
    other = _first_read(gateway, client_context(pki, stranger.cert, stranger.key))
    assert isinstance(other, ssl.SSLError) and other.reason == "TLSV1_ALERT_UNKNOWN_CA", other
    # tritonclient lets the same error through (no InferenceServerException: no HTTP).
    client = httpclient.InferenceServerClient(
        gateway.url, ssl=True, ssl_options={"ca_certs": str(pki.root_ca)}, network_timeout=10
    )
    try:
        with pytest.raises(ssl.SSLError, match="TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            client.is_server_live()
    finally:
        client.close()
    demo = pki.ensure("client", "demo")
    answer = _first_read(gateway, client_context(pki, demo.cert, demo.key))
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200"), answer
