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

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
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
    reason,
    receipt,
    receipt_at,
    registry_dir,
    running,
    send,
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
    nonce derived from the job id would have been refused as a replay: docs/ddil.md),
    and the statement names the job: the core computes again and answers under the
    receipt it logged for the first run. One core receipt, the client's, naming the
    job, and the job's result names it. Control: a job run once after the restart is
    forwarded once, under a receipt of its own."""
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
            still = [r for r in forwarded_receipts(core) if r.receipt_id not in before]
            assert [r.receipt_id for r in still] == [once[0].receipt_id]  # reused
            assert view["receipt_id"] == once[0].receipt_id
            r = once[0]
            assert r.client is not None
            assert r.client.spiffe_id == "spiffe://ztgate.local/client/alice"
            assert str(r.extensions["job_id"]).startswith(f"fwd/{EDGE_SITE}/")
            assert str(r.extensions["job_id"]).endswith(f"/{job_id}")
            seen = {r.receipt_id for r in still}
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


class AnswerHold:
    """A real TCP link from an edge to the core's forward listener that can hold the
    core's answers: while `held`, what the core sends on a connection after its TLS
    handshake (the bytes that answer the edge's second flight on) is read and kept back,
    until `cut` resets every connection. That is a link that went down after the core
    answered and before the edge read the answer, without a timing race; `FaultProxy`
    has no one-way hold (its delay is both ways, so it would hold the request too)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.held = False
        self.up = True
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def cut(self) -> None:
        async def reset() -> None:
            self.up = False
            for w in list(self._open):
                w.transport.abort()

        self._call(reset())

    def restore(self) -> None:
        self.held, self.up = False, True

    def close(self) -> None:
        self.cut()
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._open |= {writer, up_w}
        # The handshake's flights pass: the core's first bytes, and whatever it sends
        # before the edge speaks again. Once the edge has spoken after the core's first
        # bytes (its Finished and request, or a request on a kept-alive connection), what
        # the core sends is an answer.
        state = {"down_seen": False, "spoke": False}

        async def up() -> None:
            while data := await reader.read(65536):
                if state["down_seen"]:
                    state["spoke"] = True
                up_w.write(data)
                await up_w.drain()

        async def down() -> None:
            while data := await up_r.read(65536):
                state["down_seen"] = True
                if self.held and state["spoke"]:
                    continue  # read from the core, never passed on
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_w):
                self._open.discard(w)
                w.transport.abort()


def job_receipts(core: Core, job_id: str) -> list[Any]:
    """The core's answer receipts for site-b's job `job_id` (its id at the core ends so)."""
    return [
        r
        for r in forwarded_receipts(core)
        if str(r.extensions.get("job_id", "")).endswith(f"/{job_id}")
    ]


def reruns(core: Core) -> dict[str, float]:
    r = httpx.get(f"http://127.0.0.1:{core.cfg.listen.admin_port}/metrics", timeout=10)
    assert r.status_code == 200
    return {
        s.labels["receipt"]: s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
        if s.name == "ztgate_job_reruns_total"
    }


def test_a_job_whose_core_answer_the_link_lost_keeps_the_one_core_receipt(
    core: Core,
    sites: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """DDIL: the core answers a job's run, and the link goes down before the edge reads
    the answer (`AnswerHold`, then a cut). The edge's run fails as retryable, the job
    stays queued through the outage, and once the link is back it is forwarded again:
    the core computes again and answers under the receipt it logged the first time (its
    rerun counted `reused`). The job's result names that receipt, the one the core
    logged for it. Control: while the answer is held, the job is not done (the edge
    never got it), so the result comes from the second run."""
    alice = client(sites, "alice")
    link = AnswerHold(("127.0.0.1", core.cfg.forward.port or 0))
    fwd = forwarder(sites, EDGE_SITE)
    cfg = site_config(
        sites,
        registry_dir,
        tmp_path / "edge",
        [dead_node(triton_cluster, ["iris"])],
        EDGE_SITE,
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
            timeout_s=PATIENCE_S,  # the edge waits: the test, not a timer, cuts the link
        ),
    )
    base = f"https://127.0.0.1:{cfg.listen.port}"
    try:
        with running(cfg), http(sites, alice) as c:
            link.held = True
            sub = c.post(
                f"{base}/v2/models/iris/jobs",
                content=infer_body(IRIS),
                headers={"idempotency-key": "flap-1", "content-type": "application/json"},
            )
            assert sub.status_code == 202, sub.text
            job_id = sub.json()["id"]
            end = time.monotonic() + PATIENCE_S
            while not (logged := job_receipts(core, job_id)):
                assert time.monotonic() < end, "the core never answered the job's run"
                time.sleep(0.1)
            assert c.get(f"{base}/v2/jobs/{job_id}").json()["status"] != "done"
            before = reruns(core).get("reused", 0.0)
            link.cut()  # the held answer is lost with the link
            kept = poll(c, base, job_id, lambda v: v["attempts"] >= 2)
            assert kept["status"] in ("queued", "running"), kept
            link.restore()
            done = poll(c, base, job_id, lambda v: v["status"] in ("done", "failed"))
            assert done["status"] == "done" and done["http_status"] == 200, done
            assert [r.receipt_id for r in job_receipts(core, job_id)] == [logged[0].receipt_id]
            assert done["receipt_id"] == logged[0].receipt_id
            assert done["response"]["parameters"]["ztgate.receipt_id"] == logged[0].receipt_id
            assert reruns(core).get("reused", 0.0) >= before + 1
    finally:
        link.close()


def test_a_forwarded_job_reuses_its_receipt_only_for_the_same_client_and_body(
    core: Core, sites: PKI
) -> None:
    """Statements signed with site-b's forwarder key, as a captured edge could sign them.
    The same job and body again (a fresh nonce): the core answers under the receipt it
    logged (the positive control). Another body under the same job id: a new receipt
    that supersedes it, never the logged one reused. Another client naming the same job
    id: a job of its own at the core (its id names the client), so neither reused nor
    superseding the first client's. A statement without a job (as before): a receipt per
    request. A job that is no job id: refused as a malformed statement."""
    fwd, alice, demo = forwarder(sites, EDGE_SITE), client(sites, "alice"), client(sites, "demo")
    job = secrets.token_hex(16)
    body, other_body = infer_body(IRIS), infer_body(IRIS * 1.5)

    def run(who: Issued, data: bytes, **kw: Any) -> dict[str, Any]:
        r, _ = send(core, sites, fwd, who, data, **kw)
        assert r.status_code == 200, r.text
        return receipt(core, sites, who, r)

    first = run(alice, body, job=job)
    assert first["ext"]["job_id"].startswith(f"fwd/{EDGE_SITE}/")
    assert first["ext"]["job_id"].endswith(f"/{job}")
    assert "supersedes" not in first["ext"]
    again = run(alice, body, job=job)
    assert again["id"] == first["id"]  # the same answer, its receipt
    swapped = run(alice, other_body, job=job)
    assert swapped["id"] != first["id"]
    assert swapped["ext"]["supersedes"] == first["id"]
    assert swapped["ext"]["job_id"] == first["ext"]["job_id"]
    theirs = run(demo, body, job=job)
    assert theirs["id"] not in (first["id"], swapped["id"])
    assert "supersedes" not in theirs["ext"]
    assert theirs["ext"]["job_id"] != first["ext"]["job_id"]
    assert theirs["ext"]["job_id"].endswith(f"/{job}")
    plain = [run(alice, body) for _ in range(2)]
    assert plain[0]["id"] != plain[1]["id"]
    assert all("job_id" not in p["ext"] for p in plain)
    bad, _ = send(core, sites, fwd, alice, body, job="../" + job)
    assert bad.status_code == 403 and reason(bad) == "forbidden:statement-malformed"


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
