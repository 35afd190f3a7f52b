"""One hostile-input corpus against every path that serves inference (issue 19).

The corpus is test_protocol.py's `BAD` (malformed JSON, duplicate keys, NaN, nesting
bombs, lying shapes, out-of-range numbers, oversized tensors...), sent byte for byte to:

* HTTP ``POST /v2/models/iris/infer``
* the jobs submit route ``POST /v2/models/iris/jobs`` (with an Idempotency-Key)
* gRPC ``ModelInfer``, the corpus bytes as the request message itself
* Triton's ``POST /v2/models/{llm}/generate``
* OpenAI ``POST /v1/completions``

Each must refuse with a documented problem (a `PROBLEM_TYPES` type and its 4xx status;
the OpenAI surface carries the same type in its own error shape) or a gRPC status that is
neither INTERNAL nor UNKNOWN: never a 500, never a crash. A well-formed request on each
path, on the same connection setup, is the positive control. Real gateways over mutual
TLS, real tritonservers (iris, the shipped tiny GPT); nothing is mocked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from gateway.pki import PKI
from gateway.ports import free_port
from gateway.protocol.problems import PROBLEM_TYPES
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes
from tests.gateway_harness import (
    TEST_CALLERS,
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_gateway import IRIS, infer_body, node_table
from tests.test_grpc_front import iris_request, wait_listening
from tests.test_protocol import BAD

CORPUS = [
    (case, body if isinstance(body, bytes) else json.dumps(body).encode()) for case, body, *_ in BAD
]
PATHS = ("infer", "jobs", "grpc", "generate", "completions")
GRPC_FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def iris_gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    registry = triton_repository.parent / "registry"
    cfg = gateway_config(
        pki,
        registry,
        tmp_path_factory.mktemp("hostile-iris"),
        node_table(triton_cluster),
        listen={"grpc_port": free_port()},
    )
    with running_gateway(cfg) as gw:
        assert cfg.listen.grpc_port is not None
        wait_listening(cfg.listen.grpc_port)
        yield gw


@pytest.fixture(scope="module")
def llm_gateway(
    pki: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("hostile-llm")
    llm_entries(tmp)
    layout = (("h1", "eu-west", "prov-a"),)
    with llm_nodes(pki, triton_home, llm_repository, tmp / "nodes", layout) as cluster:
        nodes = [{**n, "models": [LLM_MODEL]} for n in node_table(cluster)]
        policies = policy_dir(tmp / "policies", TEST_CALLERS)
        cfg = gateway_config(pki, tmp / "registry", tmp / "g", nodes, policy={"dir": str(policies)})
        with running_gateway(cfg) as gw:
            yield gw


Send = Callable[[bytes], tuple[int, Any]]  # -> (HTTP status or 0 for gRPC OK, detail)


def _http(pki: PKI) -> httpx.Client:
    issued = pki.ensure("client", "demo")
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=60)


@pytest.fixture
def send(request: pytest.FixtureRequest, pki: PKI) -> Iterator[Callable[[str], Send]]:
    """A sender per path: posts raw bytes, returns what came back."""
    opened: list[Any] = []

    def make(path: str) -> Send:
        if path == "grpc":
            gw: RunningGateway = request.getfixturevalue("iris_gateway")
            issued = pki.ensure("client", "demo")
            creds = grpc.ssl_channel_credentials(
                pki.root_ca.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes()
            )
            channel = grpc.secure_channel(f"127.0.0.1:{gw.cfg.listen.grpc_port}", creds)
            opened.append(channel)
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

            def rpc(raw: bytes) -> tuple[int, Any]:
                try:
                    call(raw, timeout=60)
                except grpc.RpcError as err:
                    return -1, err
                return 0, None

            return rpc
        gw = request.getfixturevalue(
            "llm_gateway" if path in ("generate", "completions") else "iris_gateway"
        )
        url = {
            "infer": "/v2/models/iris/infer",
            "jobs": "/v2/models/iris/jobs",
            "generate": f"/v2/models/{LLM_MODEL}/generate",
            "completions": "/v1/completions",
        }[path]
        c = _http(pki)
        opened.append(c)
        counter = iter(range(1 << 30))

        def post(raw: bytes) -> tuple[int, Any]:
            headers = {"content-type": "application/json"}
            if path == "jobs":
                headers["idempotency-key"] = f"hostile-{next(counter)}-{len(raw)}"
            r = c.post(gw.base + url, content=raw, headers=headers)
            return r.status_code, r

        return post

    yield make
    for o in opened:
        o.close()


GOOD: dict[str, bytes] = {
    "infer": json.dumps(infer_body(IRIS)).encode(),
    "jobs": json.dumps(infer_body(IRIS)).encode(),
    "grpc": iris_request().SerializeToString(),
    "generate": json.dumps({"text_input": "def ", "parameters": {"max_tokens": 2}}).encode(),
    "completions": json.dumps({"model": LLM_MODEL, "prompt": "def ", "max_tokens": 2}).encode(),
}


@pytest.mark.parametrize("path", PATHS)
def test_a_well_formed_request_is_served_on_every_path(
    path: str, send: Callable[[str], Send]
) -> None:
    """Positive control: the senders below reach a path that does serve."""
    status, detail = send(path)(GOOD[path])
    if path == "grpc":
        assert status == 0, detail
    else:
        assert status in ((202, 200) if path == "jobs" else (200,)), detail.text[:300]


def _problem_type(path: str, r: httpx.Response) -> str:
    body = r.json()
    if path == "completions":  # OpenAI's error shape, the problem's type inside
        return str(body["error"]["type"])
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    return str(body["type"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("case", "raw"), CORPUS, ids=[c for c, _ in CORPUS])
def test_hostile_input_is_refused_with_a_problem_on_every_path(
    path: str, case: str, raw: bytes, send: Callable[[str], Send]
) -> None:
    status, detail = send(path)(raw)
    if path == "grpc":
        # Either refused with a status a client can act on, or (bytes that happen to be a
        # valid protobuf message) answered: never an internal error.
        if status != 0:
            assert detail.code() not in GRPC_FAILURES, (case, detail.code(), detail.details())
            kind = dict(detail.trailing_metadata() or ())["ztgate-problem-type"]
            assert kind in PROBLEM_TYPES, (case, kind)
        return
    r: httpx.Response = detail
    assert 400 <= status < 500, (case, status, r.text[:300])
    kind = _problem_type(path, r)
    assert kind in PROBLEM_TYPES, (case, kind)
    assert PROBLEM_TYPES[kind].status == status, (case, kind, status)
