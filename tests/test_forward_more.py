"""An edge leans on its core for jobs and for the gRPC front too (docs/ddil.md,
"Forwarding to the core").

Real parts, as in tests/test_forwarding.py (whose core, PKI and helpers these reuse): the
core is a running gateway with its forward listener on this session's tritonservers; the
edge is another, whose one node is dead (an address where nothing listens), reaching the
core through the fault proxy (a real TCP proxy) that the tests cut; clients, forwarders
and gateways hold real certificates; gRPC calls are tritonclient's. Each forwarded answer
has its control: the same call over the cut link gets the edge's own refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.config import Config, Forward
from gateway.faultproxy import ThreadedFaultProxy
from gateway.forward.client import SITE_HEADER, SITE_WHY_HEADER
from gateway.jobs.runner import CRASH_ENV
from gateway.pki import PKI, Issued
from gateway.ports import free_port, wait_ready
from tests.conftest import TritonCluster
from tests.gateway_harness import client_context
from tests.test_forwarding import (
    CORE_SITE,
    EDGE_SITE,
    IRIS,
    Core,
    client,
    core,
    dead_node,
    forwarder,
    infer_body,
    reached,
    receipt_at,
    registry_dir,
    running,
    site_config,
    sites,
)
from tests.test_grpc_front import wait_listening
from tests.test_jobs import receipts_in

__all__ = ["core", "registry_dir", "sites"]  # the fixtures, shared with test_forwarding

FORWARDED = "forwarded-to-core"
JOBS = {"backoff_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 200}
PATIENCE_S = 120.0  # how long a test waits for a job: a bound, not a timing assertion
MNIST = np.zeros((1, 784), np.float32)  # residency: ap- only, where the core has no node


@dataclasses.dataclass
class Edge:
    cfg: Config
    link: ThreadedFaultProxy  # the edge's link to the core's forward listener

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.cfg.listen.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.cfg.listen.grpc_port}"


@pytest.fixture(scope="module")
def edge(
    core: Core,
    sites: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Edge]:
    """An edge (site-b) with a gRPC front and jobs, whose one node (iris, mnist) is dead."""
    fwd = forwarder(sites, EDGE_SITE)
    with contextlib.ExitStack() as stack:
        link = ThreadedFaultProxy(("127.0.0.1", core.cfg.forward.port or 0))
        stack.callback(link.close)
        cfg = site_config(
            sites,
            registry_dir,
            tmp_path_factory.mktemp("edge-more"),
            [dead_node(triton_cluster, ["iris", "mnist"])],
            EDGE_SITE,
            listen={"grpc_port": free_port()},
            jobs=JOBS,
        )
        cfg = dataclasses.replace(
            cfg,
            forward=Forward(
                core_url=f"https://127.0.0.1:{link.port}",
                core_site=CORE_SITE,
                core_ca=sites.root_ca,
                cert=fwd.cert,
                key=fwd.key,
            ),
        )
        stack.enter_context(running(cfg))
        assert cfg.listen.grpc_port is not None
        wait_listening(cfg.listen.grpc_port)
        yield Edge(cfg, link)


@contextlib.contextmanager
def link_cut(edge: Edge) -> Iterator[None]:
    edge.link.cut()
    try:
        yield
    finally:
        edge.link.restore()


def http(sites: PKI, who: Issued) -> httpx.Client:
    return httpx.Client(verify=client_context(sites, who.cert, who.key), timeout=30)


def core_answer(core: Core, sites: PKI, who: Issued) -> dict[str, Any]:
    """The core's own answer to iris, called directly: what a forwarded one must equal."""
    with http(sites, who) as c:
        r = c.post(f"{core.base}/v2/models/iris/infer", content=infer_body(IRIS))
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def outputs(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


# --- jobs ------------------------------------------------------------------------------
def poll(c: httpx.Client, base: str, job_id: str, until: Any) -> dict[str, Any]:
    end = time.monotonic() + PATIENCE_S
    while True:
        r = c.get(f"{base}/v2/jobs/{job_id}")
        assert r.status_code == 200, r.text
        view: dict[str, Any] = r.json()
        if until(view):
            return view
        assert time.monotonic() < end, f"the job never got there: {view}"
        time.sleep(0.1)


def test_a_job_at_an_edge_whose_nodes_are_gone_is_answered_by_the_core(
    core: Core, sites: PKI, edge: Edge
) -> None:
    """With the link cut, the job is tried and kept (the edge's own 502/503 is a retry),
    nothing reaching the core; once the link is back it is done from the core: the
    result is the core's answer, says so, and its receipt is the core's, naming the
    client and the edge that forwarded it."""
    alice = client(sites, "alice")
    want = outputs(core_answer(core, sites, alice))
    with http(sites, alice) as c:
        with link_cut(edge):
            before = reached(core)
            sub = c.post(
                f"{edge.base}/v2/models/iris/jobs",
                content=infer_body(IRIS),
                headers={"idempotency-key": "edge-job-1", "content-type": "application/json"},
            )
            assert sub.status_code == 202, sub.text
            job_id = sub.json()["id"]
            kept = poll(c, edge.base, job_id, lambda v: v["attempts"] >= 2)
            assert kept["status"] in ("queued", "running"), kept
            assert reached(core) == before  # the control: nothing got through the cut
        done = poll(c, edge.base, job_id, lambda v: v["status"] in ("done", "failed"))
        assert done["status"] == "done" and done["http_status"] == 200, done
        answer = done["response"]
        got = outputs(answer)
        assert got.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-6)
        rid = answer["parameters"]["ztgate.receipt_id"]
        assert done["receipt_id"] == rid
        result = c.get(f"{edge.base}/v2/jobs/{job_id}/result")
        assert result.status_code == 200, result.text
        assert result.headers[SITE_WHY_HEADER] == FORWARDED
        assert result.headers[SITE_HEADER] == CORE_SITE
        # The receipt is the core's (the edge logged none for this answer).
        assert c.get(f"{edge.base}/v2/receipts/{rid}").status_code != 200
    rec = receipt_at(core.cfg, sites, alice, rid)
    assert rec["client"]["spiffe_id"] == "spiffe://ztgate.local/client/alice"
    assert rec["ext"]["forwarded_by"] == EDGE_SITE
    assert rec["ext"]["site_why"] == FORWARDED


def serve_edge(spec_path: str) -> None:
    """The crash test's edge, in a process of its own (its runner may `os._exit`): the
    config the test wrote, served until the process is killed."""
    spec = json.loads(Path(spec_path).read_text())
    sites = PKI.open(Path(spec["pki"]))
    cfg = site_config(
        sites,
        Path(spec["registry"]),
        Path(spec["data"]),
        spec["nodes"],
        EDGE_SITE,
        listen=spec["listen"],
        jobs=JOBS,
    )
    fwd = forwarder(sites, EDGE_SITE)
    cfg = dataclasses.replace(
        cfg,
        forward=Forward(
            core_url=spec["core_url"],
            core_site=CORE_SITE,
            core_ca=sites.root_ca,
            cert=fwd.cert,
            key=fwd.key,
        ),
    )
    with running(cfg):
        while True:
            time.sleep(3600)


def forwarded_receipts(core: Core) -> list[Any]:
    """The core's answer receipts for requests site-b forwarded."""
    return [
        s.receipt
        for s in receipts_in(core.cfg.data_dir / "receipts", "answer")
        if s.receipt.extensions.get("forwarded_by") == EDGE_SITE
    ]


def test_a_job_forwarded_then_crashed_before_its_record_is_forwarded_again(
    core: Core,
    sites: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """The edge's runner dies (`CRASH_ENV`: `os._exit`, what a SIGKILL there leaves) after
    the core answered a job's run, before the job recorded it. Restarted, the edge runs
    the job again and forwards it again, with a fresh nonce, so the core accepts it (a
    nonce derived from the job id would have been refused as a replay: docs/ddil.md):
    two core receipts, both the client's, and the job keeps one result, naming the
    second. Control: a job run once after the restart is forwarded once."""
    alice = client(sites, "alice")
    port, admin = free_port(), free_port()
    spec = {
        "pki": str(sites.root),
        "registry": str(registry_dir),
        "data": str(tmp_path / "edge"),
        "nodes": [dead_node(triton_cluster, ["iris"])],
        "listen": {"port": port, "admin_port": admin},
        "core_url": core.forward_base,
    }
    spec_file = tmp_path / "edge.json"
    spec_file.write_text(json.dumps(spec))
    base = f"https://127.0.0.1:{port}"
    plain_env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    code = f"from tests.test_forward_more import serve_edge; serve_edge({str(spec_file)!r})"

    def serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "edge.log").open("ab"),
            start_new_session=True,
            env=env,
        )
        assert wait_ready(f"http://127.0.0.1:{admin}/v2/health/live", 60, proc)
        return proc

    def kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def submit(c: httpx.Client, key: str) -> str:
        r = c.post(
            f"{base}/v2/models/iris/jobs",
            content=infer_body(IRIS),
            headers={"idempotency-key": key, "content-type": "application/json"},
        )
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    before = {r.receipt_id for r in forwarded_receipts(core)}
    first = serve({**plain_env, CRASH_ENV: "1"})
    try:
        with http(sites, alice) as c:
            job_id = submit(c, "crash-1")
        assert first.wait(timeout=PATIENCE_S) == 137  # died where the test put the crash
    finally:
        kill(first)
    once = [r for r in forwarded_receipts(core) if r.receipt_id not in before]
    assert len(once) == 1  # the core answered the first run

    second = serve(plain_env)
    try:
        with http(sites, alice) as c:
            view = poll(c, base, job_id, lambda v: v["status"] in ("done", "failed"))
            assert view["status"] == "done" and view["node_executions"] == 2, view
            twice = [r for r in forwarded_receipts(core) if r.receipt_id not in before]
            assert len(twice) == 2
            assert view["receipt_id"] in {r.receipt_id for r in twice}
            assert view["receipt_id"] != once[0].receipt_id  # the last run's
            for r in twice:
                assert r.client is not None
                assert r.client.spiffe_id == "spiffe://ztgate.local/client/alice"
            seen = {r.receipt_id for r in twice}
            other = poll(c, base, submit(c, "crash-2"), lambda v: v["status"] == "done")
            assert other["node_executions"] == 1
            fresh = [r for r in forwarded_receipts(core) if r.receipt_id not in before | seen]
            assert [r.receipt_id for r in fresh] == [other["receipt_id"]]
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=20)
        finally:
            kill(second)


# --- the gRPC front -----------------------------------------------------------------------
def grpc_request(model: str, x: np.ndarray) -> Any:
    req = service_pb2.ModelInferRequest(model_name=model)
    spec = req.inputs.add()
    spec.name, spec.datatype = "input", "FP32"
    spec.shape.extend(x.shape)
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    return req


@contextlib.contextmanager
def grpc_stub(edge: Edge, sites: PKI, who: Issued) -> Iterator[Any]:
    creds = grpc.ssl_channel_credentials(
        sites.root_ca.read_bytes(), who.key.read_bytes(), who.cert.read_bytes()
    )
    with grpc.secure_channel(edge.grpc_url, creds) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def param(resp: Any, key: str) -> str:
    return str(resp.parameters[key].string_param)


def test_grpc_at_an_edge_whose_nodes_are_gone_is_answered_by_the_core(
    core: Core, sites: PKI, edge: Edge
) -> None:
    """tritonclient.grpc at the edge, its node dead: the core answers, the answer says so,
    and the core's receipt names the client (not the forwarder) and the edge. The site
    is in the trailing metadata as the HTTP front's headers; the core's refusal (mnist's
    residency) is a gRPC status with the same metadata. Control: over the cut link the
    edge refuses as itself, no site named."""
    alice = client(sites, "alice")
    want = outputs(core_answer(core, sites, alice))
    tc = grpcclient.InferenceServerClient(
        edge.grpc_url,
        ssl=True,
        root_certificates=str(sites.root_ca),
        private_key=str(alice.key),
        certificate_chain=str(alice.cert),
    )
    try:
        x = grpcclient.InferInput("input", list(IRIS.shape), "FP32")
        x.set_data_from_numpy(IRIS)
        result = tc.infer(model_name="iris", inputs=[x])
    finally:
        tc.close()
    for name, value in want.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-6)
    resp = result.get_response()
    assert param(resp, "ztgate.site_why") == FORWARDED
    assert param(resp, "ztgate.site") == CORE_SITE
    rec = receipt_at(core.cfg, sites, alice, param(resp, "ztgate.receipt_id"))
    assert rec["client"]["spiffe_id"] == "spiffe://ztgate.local/client/alice"
    assert rec["ext"]["forwarded_by"] == EDGE_SITE
    assert rec["ext"]["site_why"] == FORWARDED

    with grpc_stub(edge, sites, alice) as stub:
        ok, call = stub.ModelInfer.with_call(grpc_request("iris", IRIS), timeout=60)
        trailers = dict(call.trailing_metadata())
        assert trailers[SITE_WHY_HEADER] == FORWARDED and trailers[SITE_HEADER] == CORE_SITE
        assert param(ok, "ztgate.request_id")
        assert trailers["ztgate-request-id"] == param(ok, "ztgate.request_id")

        with pytest.raises(grpc.RpcError) as far:
            stub.ModelInfer(grpc_request("mnist", MNIST), timeout=60)
        assert far.value.code() == grpc.StatusCode.PERMISSION_DENIED
        md = dict(far.value.trailing_metadata())
        assert md["ztgate-problem-type"] == "https://ztgate.dev/problems/forbidden"
        assert md[SITE_WHY_HEADER] == FORWARDED

        with link_cut(edge), pytest.raises(grpc.RpcError) as cut:
            stub.ModelInfer(grpc_request("iris", IRIS), timeout=60)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        md = dict(cut.value.trailing_metadata())
        assert md["ztgate-problem-type"] in (
            "https://ztgate.dev/problems/upstream-failed",
            "https://ztgate.dev/problems/no-healthy-node",
        )
        assert SITE_WHY_HEADER not in md


def test_grpc_stream_messages_each_fail_over_to_the_core_on_their_own(
    core: Core, sites: PKI, edge: Edge
) -> None:
    """On one ModelStreamInfer stream, each message follows the unary rule: iris answered
    by the core, mnist refused by the core in the stream (Triton's error_message, the
    stream stays open), both naming the site as parameters; the next iris, over the cut
    link, is the edge's own refusal and names none; the last, the link back, the core's."""
    alice = client(sites, "alice")
    iris, mnist = grpc_request("iris", IRIS), grpc_request("mnist", MNIST)
    with grpc_stub(edge, sites, alice) as stub:
        out = list(stub.ModelStreamInfer(iter([iris, mnist]), timeout=60))
        assert [bool(m.error_message) for m in out] == [False, True]
        answered, refused = out[0].infer_response, out[1].infer_response
        assert param(answered, "ztgate.site_why") == FORWARDED
        rec = receipt_at(core.cfg, sites, alice, param(answered, "ztgate.receipt_id"))
        assert rec["client"]["spiffe_id"] == "spiffe://ztgate.local/client/alice"
        assert rec["ext"]["forwarded_by"] == EDGE_SITE
        assert param(refused, "ztgate.problem_type") == "https://ztgate.dev/problems/forbidden"
        assert param(refused, "ztgate.site_why") == FORWARDED

        with link_cut(edge):
            own = list(stub.ModelStreamInfer(iter([iris]), timeout=60))
        assert own[0].error_message
        assert "ztgate.site_why" not in own[0].infer_response.parameters
        back = list(stub.ModelStreamInfer(iter([iris]), timeout=60))
        assert not back[0].error_message
        assert param(back[0].infer_response, "ztgate.site_why") == FORWARDED
