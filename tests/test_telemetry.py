"""Observability: the span tree of real requests through a real gateway and real Triton
nodes (a retried one included), what spans may carry, that no trace context reaches a
node, the metrics an operator scrapes, the log format, and tracing off by default."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import telemetry
from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.ports import free_port
from gateway.registry import Registry
from tests.conftest import SITE, TritonCluster, one_off_node
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"

# What a span may carry: ids the gateway made, names from configuration, counts, types.
ALLOWED_ATTRIBUTES = {
    "ztgate.request_id",
    "ztgate.route",
    "ztgate.model",
    "ztgate.mode",
    "ztgate.decision_id",
    "ztgate.nodes",
    "ztgate.attempts",
    "ztgate.node",
    "ztgate.region",
    "ztgate.provider",
    "ztgate.attempt",
    "ztgate.outcome",
    "ztgate.problem_type",
    "ztgate.parties",
    "error.type",
}
REQUEST_STAGES = [
    "ztgate.identity",
    "ztgate.admission",
    "ztgate.pre_policy",
    "ztgate.decode",
    "ztgate.nonce",
    "ztgate.policy",
    "ztgate.mode",
    "ztgate.rate_limit",
    "ztgate.route",
    "ztgate.verify",
    "ztgate.receipt",
]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.enable_tracing([SimpleSpanProcessor(exporter)])
    try:
        yield exporter
    finally:
        telemetry.shutdown_tracing()


def client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=30)


def trace_of(exporter: InMemorySpanExporter, request_id: str) -> list[ReadableSpan]:
    finished = exporter.get_finished_spans()
    root = next(
        s
        for s in finished
        if s.name == "ztgate.request"
        and (s.attributes or {}).get("ztgate.request_id") == request_id
    )
    assert root.context is not None
    tree, ids = [root], {root.context.span_id}
    for s in sorted(finished, key=lambda s: s.start_time or 0):
        if s.parent is not None and s.parent.span_id in ids and s.context is not None:
            tree.append(s)
            ids.add(s.context.span_id)
    return tree


def children(trace: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return sorted(
        (s for s in trace if s.parent and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.start_time or 0,
    )


@pytest.fixture(scope="module")
def retrying_gateway(
    pki: PKI, triton_cluster: TritonCluster, triton_repository: Path, tmp_path_factory: Any
) -> Iterator[RunningGateway]:
    """n1 (real) and `dead` (an address nobody listens on): the router tries `dead` first
    (its latency estimate is the untouched default) and retries on n1."""
    n1 = triton_cluster.nodes["n1"]
    nodes = [
        {
            "name": "dead",
            "address": f"127.0.0.1:{free_port()}",
            "dns_name": n1.dns_name,
            "spiffe_id": n1.spiffe_id,
            "region": "eu-south",
            "provider": "prov-z",
        },
        {
            "name": n1.name,
            "address": n1.address,
            "dns_name": n1.dns_name,
            "spiffe_id": n1.spiffe_id,
            "region": n1.region,
            "provider": n1.provider,
        },
    ]
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path_factory.mktemp("telemetry"),
        nodes,
        routing={"eject_after_failures": 100},  # keep `dead` in the rotation
    )
    with running_gateway(cfg) as gw:
        yield gw


def retried(gw: RunningGateway, demo: httpx.Client) -> dict[str, Any]:
    """The parameters of an answer that took two attempts (`dead`, then n1)."""
    for _ in range(20):  # `dead` is tried first more often than not; never relied on once
        r = demo.post(
            f"{gw.base}/v2/models/iris/infer",
            json=infer_body(IRIS),
            headers={"traceparent": TRACEPARENT},
        )
        assert r.status_code == 200, r.text
        params: dict[str, Any] = r.json()["parameters"]
        if params["ztgate.attempts"] == 2:
            return params
    pytest.fail("no request was retried")


def test_span_tree_of_a_retried_request(
    pki: PKI, retrying_gateway: RunningGateway, spans: InMemorySpanExporter
) -> None:
    gw = retrying_gateway
    with client(pki, "demo") as demo:
        params = retried(gw, demo)
    trace = trace_of(spans, params["ztgate.request_id"])
    (root,) = [s for s in trace if s.name == "ztgate.request"]
    # The client's trace context is the root's parent: one trace across the client and us.
    assert root.context is not None and format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_PARENT
    assert root.attributes is not None
    assert root.attributes["ztgate.model"] == "iris" and root.attributes["ztgate.mode"] == "none"
    assert [s.name for s in children(trace, root)] == REQUEST_STAGES
    (policy,) = [s for s in trace if s.name == "ztgate.policy"]
    assert policy.attributes and policy.attributes["ztgate.decision_id"] == params.get(
        "ztgate.decision_id"
    )
    (verify,) = [s for s in trace if s.name == "ztgate.verify"]
    attempts = children(trace, verify)
    assert [s.name for s in attempts] == ["ztgate.node_attempt"] * 2
    first, second = (dict(s.attributes or {}) for s in attempts)
    assert first == {
        "ztgate.node": "dead",
        "ztgate.region": "eu-south",
        "ztgate.provider": "prov-z",
        "ztgate.attempt": 1,
        "ztgate.model": "iris",
        "ztgate.outcome": "failed",
    }
    assert second["ztgate.node"] == "n1" and second["ztgate.attempt"] == 2
    assert second["ztgate.outcome"] == "ok"
    assert verify.attributes and verify.attributes["ztgate.nodes"] == "n1"


def test_spans_carry_no_tensors_salts_or_client_text(
    pki: PKI, retrying_gateway: RunningGateway, spans: InMemorySpanExporter
) -> None:
    gw = retrying_gateway
    with client(pki, "demo") as demo:
        r = demo.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        # A refusal with client text in it (an unknown mode, a purpose): none of it in spans.
        body = infer_body(IRIS)
        body["parameters"] = {"ztgate.verification": "bogus-mode-XYZ", "ztgate.purpose": "p-XYZ"}
        refused = demo.post(f"{gw.base}/v2/models/iris/infer", json=body)
        assert refused.status_code == 400
    salt = params["ztgate.salt"]
    outputs = r.json()["outputs"][0]["data"]
    finished = spans.get_finished_spans()
    assert len(finished) > 20
    values: list[str] = []
    for s in finished:
        attrs = dict(s.attributes or {})
        assert set(attrs) <= ALLOWED_ATTRIBUTES, (s.name, attrs)
        values += [str(v) for v in attrs.values()]
        values += [str(e.attributes) for e in s.events]
        assert "XYZ" not in str(s.status.description)
    text = " ".join(values)
    assert salt not in text and base64.b64decode(salt).hex() not in text
    for x in [*IRIS.ravel().tolist(), *outputs]:
        assert repr(float(np.float32(x))) not in text and f"{x:.4f}" not in text
    assert "XYZ" not in text
    # Problem types and the refusal are there, as fixed text.
    assert "bad-request" in text


ID_AND_PARAMETERS = """
import json
import os
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

SEEN = {seen!r}


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            with open(os.path.join(SEEN, uuid.uuid4().hex), "w") as f:
                json.dump({{"id": request.request_id(), "parameters": request.parameters()}}, f)
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            fixed = np.tile(np.array([[0.0, 0.0, 1.0]], dtype=np.float32), (x.shape[0], 1))
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", fixed)]))
        return out
"""


@pytest.fixture(scope="module")
def telling_node(
    pki: PKI, triton_home: Path, triton_repository: Path, tmp_path_factory: Any
) -> Iterator[tuple[Path, dict[str, str]]]:
    """A node that forwards every gRPC header into the request's parameters
    (``--grpc-header-forward-pattern``) and writes down what each request carried."""
    base = tmp_path_factory.mktemp("telling")
    seen = base / "seen"
    seen.mkdir()
    registry = Registry.open(triton_repository.parent / "registry")
    entries = [e for e in registry.entries() if e.name == "iris"]
    repo = build_repository(entries, base / "repository")
    (repo / "iris" / entries[0].version / "model.py").write_text(
        ID_AND_PARAMETERS.format(seen=str(seen))
    )
    forward = ("--grpc-header-forward-pattern=.*",)
    with one_off_node(
        pki, triton_home, repo, "telling", base / "node", provider="prov-t", extra_args=forward
    ) as node:
        yield seen, node


def test_no_trace_context_reaches_a_node(
    pki: PKI,
    telling_node: tuple[Path, dict[str, str]],
    triton_repository: Path,
    tmp_path: Path,
    spans: InMemorySpanExporter,
) -> None:
    seen, node = telling_node
    # Control: a header the caller sends does reach the model's parameters on this node.
    gw_cert, gw_key = pki.leaf_paths("gateway-node-client", SITE, SITE)
    direct = grpcclient.InferenceServerClient(
        node["address"],
        ssl=True,
        root_certificates=str(pki.node_ca_bundle()),
        private_key=str(gw_key),
        certificate_chain=str(gw_cert),
        channel_args=[("grpc.ssl_target_name_override", node["dns_name"])],
    )
    x = grpcclient.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(IRIS[:1])
    direct.infer("iris", [x], headers={"traceparent": TRACEPARENT, "x-control": "yes"})
    direct.close()
    control = [json.loads(f.read_text()) for f in seen.iterdir()]
    assert any("traceparent" in json.dumps(c["parameters"]) for c in control), control
    for f in seen.iterdir():
        f.unlink()

    cfg = gateway_config(pki, triton_repository.parent / "registry", tmp_path / "g", [node])
    with running_gateway(cfg) as gw, client(pki, "demo") as demo:
        r = demo.post(
            f"{gw.base}/v2/models/iris/infer",
            json=infer_body(IRIS),
            headers={"traceparent": TRACEPARENT, "tracestate": "k=v", "baggage": "a=b"},
        )
        assert r.status_code == 200, r.text
        request_id = r.json()["parameters"]["ztgate.request_id"]
    trace = trace_of(spans, request_id)
    assert any(s.name == "ztgate.node_attempt" for s in trace)  # the attempt was traced
    trace_ids = {format(s.context.trace_id, "032x") for s in trace if s.context}
    span_ids = {format(s.context.span_id, "016x") for s in trace if s.context}
    reached = [f.read_text() for f in seen.iterdir()]
    assert reached, "the request never reached the node"
    trace_headers = {"traceparent", "tracestate", "baggage", "b3", "uber-trace-id"}
    for text in reached:
        # Header names, not substrings of the text: the attempt's random hex id may well
        # contain "b3".
        headers = json.loads(json.loads(text)["parameters"])
        assert not {k.lower() for k in headers} & trace_headers, text
        assert not any("k=v" in str(v) or "a=b" in str(v) for v in headers.values()), text
        lowered = text.lower()
        for ident in trace_ids | span_ids | {request_id}:
            assert ident not in lowered, text


def metric(text: str, name: str, **labels: str) -> float:
    """The first sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric_name, _, rest = sample.partition("{")
        if metric_name != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if labels.items() <= have.items():
            return float(value)
    raise AssertionError(f"no {name} {labels} in /metrics")


def test_metrics_an_operator_scrapes(pki: PKI, retrying_gateway: RunningGateway) -> None:
    gw = retrying_gateway
    with client(pki, "demo") as demo, client(pki, "no-permit") as stranger:
        retried(gw, demo)
        denied = stranger.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert denied.status_code == 403, denied.text
    text = httpx.get(f"{gw.admin_base}/metrics", timeout=30).text
    assert metric(text, "ztgate_infer_requests_total", model="iris", mode="none", outcome="ok") >= 1
    assert metric(text, "ztgate_infer_requests_total", model="iris", outcome="forbidden") >= 1
    for stage in ("identity", "decode", "policy", "verify", "receipt"):
        assert metric(text, "ztgate_stage_duration_seconds_count", stage=stage) >= 1
    assert metric(text, "ztgate_node_attempts_total", node="dead") >= 1
    assert metric(text, "ztgate_node_failures_total", node="dead") >= 1
    assert metric(text, "ztgate_node_attempts_total", node="n1") >= 1
    assert metric(text, "ztgate_node_failures_total", node="n1") == 0
    assert metric(text, "ztgate_node_ejections_total", node="dead") == 0
    assert metric(text, "ztgate_node_retries_total") >= 1
    # Denied by the policy that determined it (a caller with no permit meets this forbid).
    assert metric(text, "ztgate_policy_denials_total", policy="registered-modes-only") >= 1
    assert metric(text, "ztgate_policy_rejected_reloads_total") == 0
    assert re.search(r"^# TYPE ztgate_policy_rejected_reloads(_total)? counter$", text, re.M)
    assert metric(text, "ztgate_receipts_pending") >= 0
    assert metric(text, "ztgate_receipt_checkpoint_age_seconds") < 60
    assert "# TYPE ztgate_zk_proof_verify_seconds histogram" in text
    assert "# TYPE ztgate_mpc_inference_seconds histogram" in text
    assert re.search(r"^# TYPE ztgate_background_failures(_total)? counter$", text, re.M)
    assert re.search(r"^# TYPE ztgate_rate_limit_rejections(_total)? counter$", text, re.M)


def test_rate_limit_rejections_are_counted_by_stage() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.protocol.problems import RateLimited

    registry = CollectorRegistry()
    t = telemetry.Telemetry(registry)
    for stage in ("admission", "rate_limit", "policy"):
        with pytest.raises(RateLimited), t.stage(stage):
            raise RateLimited("slow down", retry_after=1)
    assert registry.get_sample_value("ztgate_rate_limit_rejections_total", {"stage": "admission"})
    assert registry.get_sample_value("ztgate_rate_limit_rejections_total", {"stage": "rate_limit"})
    assert (
        registry.get_sample_value("ztgate_rate_limit_rejections_total", {"stage": "policy"}) is None
    )
    assert registry.get_sample_value("ztgate_stage_duration_seconds_count", {"stage": "policy"})


def test_json_logs_carry_request_and_trace_ids(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter())
    logger = logging.getLogger("ztgate.test")
    decisions = logging.getLogger(telemetry.DECISIONS_LOGGER)
    for lg in (logger, decisions):
        lg.addHandler(handler)
    logger.setLevel(logging.INFO)
    decisions.setLevel(logging.INFO)
    try:
        logger.info("outside")
        t = telemetry.Telemetry()
        with t.request("rid-1", "infer", {}):
            logger.warning("inside %s", "x")
            decisions.info(json.dumps({"decision_id": "d1", "time": "t0", "reason": "ok"}))
    finally:
        for lg in (logger, decisions):
            lg.removeHandler(handler)
        decisions.setLevel(logging.NOTSET)
    outside, inside, decision = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["message"] == "outside" and outside["level"] == "info"
    assert outside["logger"] == "ztgate.test" and "request_id" not in outside and outside["time"]
    assert inside["request_id"] == "rid-1" and len(inside["trace_id"]) == 32
    assert inside["message"] == "inside x" and inside["level"] == "warning"
    # A decision line keeps its own fields (and time), with the envelope's beside them.
    assert decision["decision_id"] == "d1" and decision["time"] == "t0"
    assert decision["request_id"] == "rid-1" and decision["trace_id"] == inside["trace_id"]
    assert decision["logger"] == "ztgate.decisions" and "message" not in decision


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert not telemetry.setup_tracing({})
    assert not telemetry.setup_tracing({"OTEL_TRACES_EXPORTER": "none"})
    assert not telemetry.setup_tracing(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    )
    assert not telemetry.tracing_enabled()
    with telemetry.span("x") as s:
        assert s.span is None  # no SDK call at all
    with pytest.raises(ValueError, match="no trace exporter"):
        telemetry.setup_tracing({"OTEL_TRACES_EXPORTER": "nonesuch"})
    try:
        assert telemetry.setup_tracing({"OTEL_TRACES_EXPORTER": "otlp"})
        assert telemetry.tracing_enabled()
    finally:
        telemetry.shutdown_tracing()
    assert not telemetry.tracing_enabled()
