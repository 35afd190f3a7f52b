"""openapi.json against the app: the routes it lists, and schemathesis over every operation.

The fuzzing runs in-process through schemathesis' ASGI transport, which has no TLS: a tiny
ASGI wrapper puts an allowed client's certificate into `scope["extensions"]["tls"]`, as the
uvicorn shim does on a real connection (gateway/server.py). Everything behind the app is real:
the gateway's node calls go over gRPC mTLS to the session's three tritonservers.

schemathesis runs every request on one event loop (its portal thread), the one the app's
lifespan and so its grpc.aio channels started on. The totals every fuzz test adds to
(`STATS`) are asserted once the module is done (`fuzz_totals`, a teardown that fails the run):
none answered 5xx, none outside the spec and, when all the fuzz tests ran, enough requests
and a good share of valid inferences a node answered with 200, so a gateway that refuses
everything fails.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from starlette.applications import Starlette

from gateway.app import build_api
from gateway.examples import EXAMPLE_NAMES
from gateway.openapi import check_spec, route_table, spec_table
from gateway.pipeline import DEADLINE_HEADER
from gateway.pki import PKI
from gateway.runtime import build_gateway
from tests.conftest import TritonCluster
from tests.gateway_harness import gateway_config

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())

# Models a caller can run through this gateway: (output name, features per row); each takes
# one FP32 input "input" of shape [-1, features]. `risk` allows only redundant/mpc, which
# this gateway does not offer yet: always 403.
RUNNABLE = {"iris": ("probabilities", 4), "mnist": ("probabilities", 784)}
VERSION = "1"
INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")

MIN_REQUESTS = 1000
MIN_VALID_SHARE = 0.30
GENERATIVE = re.compile(r"/generate(_stream)?$|^\S+ /v1/")
# The jobs API answers 202/200 with a job, never an inference: left out of the share too.
JOBS = re.compile(r"/jobs(/|$)")
# Hypothesis max_examples of each fuzzing phase, per operation (examples and coverage add theirs).
FUZZ_EXAMPLES = {"infer": 400, "infer_negative": 100, "other": 45}
SEED = int(os.environ.get("ZTGATE_FUZZ_SEED", "20240917"))

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


# --- the committed spec against the routes ------------------------------------------------
def test_spec_lists_exactly_the_routes(api_app: Starlette) -> None:
    schemathesis.openapi.from_dict(SPEC).validate()  # a valid OpenAPI 3.1 document
    assert check_spec(api_app, SPEC) == []
    assert ("POST", "/v2/models/{name}/versions/{version}/infer") in route_table(api_app)


def test_check_spec_reports_both_directions(api_app: Starlette) -> None:
    spec = copy.deepcopy(SPEC)
    del spec["paths"]["/v2"]
    spec["paths"]["/v2/models/{name}/config"] = {"get": {"responses": {}}}
    spec["paths"]["/v2/health/live"]["head"] = {"responses": {}}  # implied by GET: ignored
    assert check_spec(api_app, spec) == [
        "GET /v2: served by the app, missing from the spec",
        "GET /v2/models/{name}/config: in the spec, not served by the app",
    ]
    assert spec_table({"openapi": "3.1.0"}) == set()
    assert check_spec(api_app, {"swagger": "2.0", "paths": SPEC["paths"]}) == [
        "not an OpenAPI 3.x document (openapi = None)"
    ]


# --- the app under test -------------------------------------------------------------------
def with_client_cert(app: ASGIApp, pem: str) -> ASGIApp:
    """`app` as the uvicorn shim presents it on a TLS connection with this client certificate."""
    tls = {
        "server_cert": None,
        "client_cert_chain": [pem],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": 0x0304,
        "cipher_suite": None,
    }

    async def wrapped(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {**scope.get("extensions", {}), "tls": tls}}
        await app(scope, receive, send)

    return wrapped


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
def api_app(
    pki: PKI, triton_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Starlette:
    """The API app of a gateway with no nodes: enough to read its routes."""
    cfg = gateway_config(
        pki, triton_repository.parent / "registry", tmp_path_factory.mktemp("routes"), []
    )
    return build_api(build_gateway(cfg))


@pytest.fixture(scope="module")
def fuzz_target(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ASGIApp]:
    """The real API app (lifespan running) of a gateway routing to the session's nodes."""
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path_factory.mktemp("fuzzdata"),
        node_table(triton_cluster),
    )
    leaf = pki.ensure("client", "schemathesis").cert.read_text()
    pem = leaf[: leaf.index("-----END CERTIFICATE-----")] + "-----END CERTIFICATE-----\n"
    app = with_client_cert(build_api(build_gateway(cfg)), pem)
    # The client starts the lifespan on schemathesis' event loop; every later request runs there.
    with asgi.get_client(app) as client:
        end = time.monotonic() + 60  # a readiness wait, generous for loaded machines
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < end, "no node became healthy"
            time.sleep(0.1)
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()  # closes the gateway's channels before the nodes stop


# --- the spec as the fuzzer sees it -------------------------------------------------------
def fuzz_spec() -> dict[str, Any]:
    """The committed spec, with path parameters narrowed to this deployment's registry.

    Names and versions are free strings in the spec (the registry decides); narrowing them makes
    positive cases name real models, while negative cases still try every other string.
    """
    spec = copy.deepcopy(SPEC)
    params = spec["components"]["parameters"]
    params["name"]["schema"] = {"type": "string", "enum": list(EXAMPLE_NAMES)}
    params["version"]["schema"] = {"type": "string", "enum": [VERSION]}
    return spec


def _rows(features: int) -> st.SearchStrategy[list[list[float]]]:
    """1..3 rows of FP32-representable numbers; wide ones drawn by numpy from a seed."""
    batch = st.integers(1, 3)
    if features <= 8:
        value = st.floats(-1e6, 1e6, allow_nan=False, width=32) | st.integers(-1000, 1000)
        row = st.lists(value, min_size=features, max_size=features)
        return batch.flatmap(lambda n: st.lists(row, min_size=n, max_size=n))
    return st.builds(
        lambda n, seed: np.random.default_rng(seed).random((n, features), np.float32).tolist(),
        batch,
        st.integers(0, 2**32 - 1),
    )


@st.composite
def valid_inputs(draw: st.DrawFn) -> tuple[str, list[list[float]]]:
    """A model this gateway can run, and rows of input for it."""
    name = draw(st.sampled_from(sorted(RUNNABLE)))
    return name, draw(_rows(RUNNABLE[name][1]))


def _json_input(rows: list[list[float]], nested: bool) -> dict[str, Any]:
    return {
        "name": "input",
        "datatype": "FP32",
        "shape": [len(rows), len(rows[0])],
        "data": rows if nested else [x for row in rows for x in row],
    }


def _binary_body(header: dict[str, Any], rows: list[list[float]]) -> tuple[bytes, str]:
    """Triton's binary tensor data extension: the JSON header, then the raw FP32 input."""
    raw = np.asarray(rows, "<f4").tobytes()
    inp = {"name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])]}
    inp["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({**header, "inputs": [inp]}).encode()
    return head + raw, str(len(head))


@st.composite
def steered_infer(draw: st.DrawFn, case: schemathesis.Case) -> schemathesis.Case:
    """`case` turned into a well-formed inference for a runnable model.

    Usually the whole body is ours; sometimes the generated `id`, `parameters`, `outputs`
    and unknown members stay and only `inputs` is replaced, so the fuzzer's choices still
    reach the pipeline past the signature check (and may well be refused there).
    """
    name, rows = draw(valid_inputs())
    output = RUNNABLE[name][0]
    header: dict[str, Any] = {}
    generated = case.body if isinstance(case.body, dict) else {}
    if generated and draw(st.integers(0, 3)) == 2:
        header = {k: v for k, v in generated.items() if k != "inputs"}
        if draw(st.booleans()):
            header.pop("outputs", None)  # generated output names are refused (400)
    else:
        if draw(st.booleans()):
            header["id"] = draw(st.text(max_size=20))
        params = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "binary_data_output": st.booleans(),
                    "ztgate.verification": st.just("none"),
                },
            )
        )
        if params:
            header["parameters"] = params
        if draw(st.booleans()):
            out: dict[str, Any] = {"name": output}
            if draw(st.booleans()):
                out["parameters"] = {"binary_data": draw(st.booleans())}
            header["outputs"] = [out]
    new = case.derive()
    new.path_parameters = {**new.path_parameters, "name": name}
    if "version" in new.path_parameters:
        new.path_parameters["version"] = VERSION
    headers = {
        k: v
        for k, v in new.headers.items()
        if k.lower() not in {"inference-header-content-length", DEADLINE_HEADER, "ztgate-nonce"}
    }
    # A steered (valid) request carries a fresh nonce, or none: a replayed one is a 409.
    if draw(st.booleans()):
        headers["ztgate-nonce"] = uuid.uuid4().hex
    deadline = draw(st.none() | st.integers(1000, 60_000))
    if deadline is not None:
        headers[DEADLINE_HEADER] = str(deadline)
    if draw(st.integers(0, 3)) == 1:
        body, length = _binary_body(header, rows)
        headers["Inference-Header-Content-Length"] = length
        new.media_type = "application/octet-stream"
        new.body = body
    else:
        new.media_type = "application/json"
        new.body = {**header, "inputs": [_json_input(rows, draw(st.booleans()))]}
    new.headers = type(new.headers)(headers)
    return new


def steer_to_valid_inferences(
    context: schemathesis.HookContext, case: schemathesis.Case
) -> st.SearchStrategy[schemathesis.Case]:
    """Most positive infer cases become well-formed requests for a runnable model.

    A schema-valid body almost never matches a model's signature (input name, shape, element
    count), so without this nearly every infer case would stop at a 400.
    """
    op = context.operation
    meta = case.meta
    if op is None or op.path not in INFER_PATHS or meta is None:
        return st.just(case)
    if not meta.generation.mode.is_positive:
        return st.just(case)
    return st.integers(0, 15).flatmap(lambda n: st.just(case) if n == 7 else steered_infer(case))


def fuzz_schema(**config: Any) -> Any:
    base: dict[str, Any] = {
        "seed": SEED,
        "generation": {"mode": "all", "database": "none"},
        "phases": {"stateful": {"enabled": False}, **config.pop("phases", {})},
        # 413 is how the gateway refuses shapes and lists over its limits.
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "405", "413", "415"]
            }
        },
    }
    return schemathesis.openapi.from_dict(
        fuzz_spec(), config=schemathesis.Config.from_dict({**base, **config})
    )


# One schema object per test: clones of one schema share the Hypothesis settings of the
# first test parametrized with it. INFER runs every phase (explicit examples, coverage,
# fuzzing) on the infer operations, the fuzzing positive only and mostly steered to valid
# requests; NEGATIVE fuzzes them with schema-violating data; OTHER does both for the rest.
INFER = fuzz_schema(phases={"fuzzing": {"generation": {"mode": "positive"}}}).include(
    path_regex="/infer$"
)
NEGATIVE = fuzz_schema(
    generation={"mode": "negative", "database": "none"},
    phases={"examples": {"enabled": False}, "coverage": {"enabled": False}},
).include(path_regex="/infer$")
# The extensions the gateway does not offer answer 501 `unsupported-extension` by design,
# whatever is sent (tests/test_triton_parity.py): fuzzing them tests nothing but that, and a
# 5xx must stay what the fuzzer treats as a server error.
NOT_OFFERED = r"sharedmemory|/repository/models/|/trace/|/logging$"
OTHER = fuzz_schema().exclude(path_regex="/infer$").exclude(path_regex=NOT_OFFERED)
INFER.hook("flatmap_case")(steer_to_valid_inferences)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]


# --- the fuzzing --------------------------------------------------------------------------
STATS: Counter[tuple[str, int]] = Counter()
VALID_200 = Counter[str]()
VIOLATIONS: list[str] = []
FUZZ_TESTS = frozenset(
    {"test_fuzz_infer", "test_fuzz_infer_negative", "test_fuzz_metadata_and_health"}
)
SENT_BY = Counter[str]()  # requests each fuzz test sent


def _exercise(case: schemathesis.Case, app: ASGIApp, test: str) -> None:
    # A positive deadline under a second is valid, and a 504 the right answer to it: keep the
    # fuzzer's deadlines long enough that the nodes' real latency never decides the outcome.
    raw = case.headers.get(DEADLINE_HEADER) if case.headers else None
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and 0 < int(raw) < 1000:
        case.headers[DEADLINE_HEADER] = str(int(raw) + 1000)
    response = case.call(app=app)
    label = f"{case.method} {case.path}"
    SENT_BY[test] += 1
    STATS[label, response.status_code] += 1
    if response.status_code == 200 and case.path in INFER_PATHS:
        VALID_200[case.path_parameters["name"]] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except Exception as exc:
        VIOLATIONS.append(f"{label} -> {response.status_code}: {exc}")
        raise


def check_fuzz_totals(selected: set[str]) -> None:
    """What the selected fuzz tests sent, taken together."""
    silent = sorted(t for t in selected if not SENT_BY[t])
    assert not silent, f"fuzz tests that ran but sent no request: {silent}"
    total = sum(STATS.values())
    by_status = Counter[int]()
    for (_, status), n in STATS.items():
        by_status[status] += n
    valid = sum(VALID_200.values())
    summary = (
        f"{total} requests, statuses {dict(sorted(by_status.items()))}, "
        f"{valid} valid inferences answered 200 ({valid / total:.0%}): {dict(VALID_200)}"
    )
    print(summary)
    assert not VIOLATIONS, "\n".join(VIOLATIONS[:5])
    assert not [s for s in by_status if s >= 500], summary
    if selected == FUZZ_TESTS:  # the shares below are those of the whole fuzz run
        assert total >= MIN_REQUESTS, summary
        # The generative operations are fuzzed too (no 5xx, conformance), but the gateway
        # under fuzz serves no generative model, so they can only ever be refused: they
        # are left out of the share of valid answers (tests/test_generate.py shows them
        # answering); so are the jobs routes (tests/test_jobs.py).
        tensor = sum(
            n
            for (label, _), n in STATS.items()
            if not GENERATIVE.search(label) and not JOBS.search(label)
        )
        assert valid / tensor >= MIN_VALID_SHARE, summary
        assert set(VALID_200) == set(RUNNABLE), summary


@pytest.fixture(scope="module", autouse=True)
def fuzz_totals(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module's last test, the totals of the fuzz tests that were selected; a
    failure here is an error at teardown, which fails the run. Nothing selected, nothing
    to check."""
    yield
    here = Path(__file__).resolve()
    selected = {
        item.name.split("[")[0]
        for item in request.session.items
        if Path(str(item.path)).resolve() == here
    }
    if selected & FUZZ_TESTS:
        check_fuzz_totals(selected & FUZZ_TESTS)


_settings = {
    "deadline": None,
    "derandomize": False,
    "database": None,
    "suppress_health_check": list(hypothesis.HealthCheck),
    "print_blob": True,
}


@INFER.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES["infer"], **_settings)
def test_fuzz_infer(case: schemathesis.Case, fuzz_target: ASGIApp) -> None:
    _exercise(case, fuzz_target, "test_fuzz_infer")


@NEGATIVE.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES["infer_negative"], **_settings)
def test_fuzz_infer_negative(case: schemathesis.Case, fuzz_target: ASGIApp) -> None:
    _exercise(case, fuzz_target, "test_fuzz_infer_negative")


@OTHER.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES["other"], **_settings)
def test_fuzz_metadata_and_health(case: schemathesis.Case, fuzz_target: ASGIApp) -> None:
    _exercise(case, fuzz_target, "test_fuzz_metadata_and_health")


# --- regressions: what fuzzing and writing the spec turned up --------------------------------
def _iris_infer(client: Any, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v2/models/iris/infer", json=body, headers=headers)


IRIS_ROW = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (DEADLINE_HEADER, "\u00b2"),  # str.isdigit() says yes, int() says no
        (DEADLINE_HEADER, "0" * 5000),
        ("Inference-Header-Content-Length", "\u00b3"),
        ("Inference-Header-Content-Length", "1" * 5000),  # over int()'s 4300 digits
    ],
)
def test_numeric_headers_are_refused_not_crashed(
    fuzz_target: ASGIApp, header: str, value: str
) -> None:
    body = json.dumps({"inputs": [IRIS_ROW]}).encode()
    # Positive control: the same request with a well-formed value of the same header.
    good = {DEADLINE_HEADER: "30000", "Inference-Header-Content-Length": str(len(body))}[header]
    with asgi.get_client(fuzz_target) as client:
        ok = _iris_raw(client, body, header, good)
        r = _iris_raw(client, body, header, value)
    assert ok.status_code == 200, ok.text
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "https://ztgate.dev/problems/bad-request"


def _iris_raw(client: Any, body: bytes, header: str, value: str) -> Any:
    headers = {"content-type": "application/json", header: value}
    return client.post("/v2/models/iris/infer", data=body, headers=headers)


def test_huge_deadline_is_capped_not_crashed(fuzz_target: ASGIApp) -> None:
    with asgi.get_client(fuzz_target) as client:
        r = _iris_infer(client, {"inputs": [IRIS_ROW]}, **{DEADLINE_HEADER: "9" * 5000})
    assert r.status_code == 200, r.text


def test_unknown_output_is_400_before_any_node(fuzz_target: ASGIApp) -> None:
    """It was a 502 after all three nodes refused it, each charged a failure for it."""
    with asgi.get_client(fuzz_target) as client:
        ok = _iris_infer(client, {"inputs": [IRIS_ROW], "outputs": [{"name": "probabilities"}]})
        r = _iris_infer(client, {"inputs": [IRIS_ROW], "outputs": [{"name": "logits"}]})
    assert ok.status_code == 200, ok.text  # the model's own output name, asked the same way
    assert [o["name"] for o in ok.json()["outputs"]] == ["probabilities"]
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "https://ztgate.dev/problems/invalid-tensor"
    assert "logits" in r.json()["detail"]


def test_405_names_the_allowed_methods(fuzz_target: ASGIApp) -> None:
    with asgi.get_client(fuzz_target) as client:
        r = client.delete("/v2/models/iris/infer")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.headers["content-type"] == "application/problem+json"
