"""Routing over untrusted nodes, against real tritonservers: failover, ejection, lies, pinning."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.config import NodeConfig
from gateway.job import Job
from gateway.node.repository import build_repository
from gateway.node.triton import pid_alive
from gateway.pki import PKI
from gateway.protocol.tensors import RequestedOutput, Tensor
from gateway.registry import ModelEntry, Registry
from gateway.routing.node_client import NodeClient, NodeCredentials
from gateway.routing.router import Router
from gateway.state import StateStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from tests.conftest import SITE, TritonCluster, free_port, one_off_node
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body, node_table


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


@pytest.fixture
def gateway(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> Iterator[RunningGateway]:
    for node in triton_cluster.nodes.values():
        assert node.supervisor.wait_healthy(30), f"{node.name} not healthy before the test"
    cfg = gateway_config(pki, registry_dir, tmp_path / "data", node_table(triton_cluster))
    with running_gateway(cfg) as gw:
        yield gw


async def _fire(
    gw: RunningGateway, pki: PKI, total: int, concurrency: int, during: Any = None
) -> list[int]:
    caller = pki.ensure("client", "bench")  # apps only: 600/minute
    ctx = client_context(pki, caller.cert, caller.key)
    statuses: list[int] = []
    body = infer_body(IRIS)
    async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                if during is not None and i == total // 4:
                    during()
                try:
                    r = await client.post(f"{gw.base}/v2/models/iris/infer", json=body)
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(-1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_a_killed_node_costs_under_one_percent(
    gateway: RunningGateway, pki: PKI, triton_cluster: TritonCluster
) -> None:
    """Timing margin: a request fails only if it gets no answer within 10 s (the client's
    timeout and the gateway's deadline) or all 3 attempts fail. An iris inference takes
    milliseconds, and a killed node fails its attempt at once (connection refused) or
    after the 2 s per-try timeout, so a request needs at most ~2 s of its 10: even a
    machine several times slower than usual loses none to time."""
    victim = triton_cluster.nodes["n3"]

    def kill() -> None:
        pid = victim.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    statuses = asyncio.run(_fire(gateway, pki, total=240, concurrency=4, during=kill))
    ok = statuses.count(200)
    assert len(statuses) == 240
    assert ok / len(statuses) >= 0.99, {s: statuses.count(s) for s in set(statuses)}
    # The supervisor brings the node back.
    assert victim.supervisor.wait_healthy(30)


def test_a_dead_stub_is_ejected_then_readmitted(
    gateway: RunningGateway, pki: PKI, triton_cluster: TritonCluster
) -> None:
    victim = triton_cluster.nodes["n2"]
    router = gateway.gw.router
    with victim.supervisor.paused():
        stubs = victim.process.stub_pids()
        assert stubs, "n2 has no python stub to kill"
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)
        assert _wait_for(lambda: not any(pid_alive(pid) for pid in stubs), 10), "stubs alive"
        statuses: list[int] = []
        for _ in range(8):  # bounded: until n2 has failed often enough to be ejected
            statuses += asyncio.run(_fire(gateway, pki, total=30, concurrency=3))
            if router.nodes["n2"].ejections:
                break
        assert statuses.count(200) == len(statuses)  # every failure was retried elsewhere
        assert router.nodes["n2"].ejections >= 1
        assert router.nodes["n2"].failed >= router.cfg.eject_after_failures
        assert "n2" in router.ejected  # still out: its probes keep failing
        # While ejected, no request goes to n2: not even a failed attempt.
        attempts = router.nodes["n2"].attempts
        after = asyncio.run(_fire(gateway, pki, total=20, concurrency=2))
        assert after == [200] * 20
        assert "n2" in router.ejected
        assert router.nodes["n2"].attempts == attempts
    # Unpaused, the supervisor restarts n2; the health loop's probe then readmits it.
    assert victim.supervisor.wait_healthy(30)
    assert _wait_for(lambda: "n2" not in router.ejected, 20), "n2 never readmitted"
    before = router.nodes["n2"].served
    assert asyncio.run(_fire(gateway, pki, total=40, concurrency=2)) == [200] * 40
    assert router.nodes["n2"].served > before


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes (a bound, not a pace)."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


LIAR = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            lie = np.full((x.shape[0], 2), 0.5, dtype=np.float32)  # two classes, not three
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", lie)]))
        return out
"""


@pytest.fixture(scope="module")
def liar(
    pki: PKI, triton_home: Path, registry_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A node whose iris answers with the wrong shape: Triton serves the lie as told."""
    base = tmp_path_factory.mktemp("liar")
    entries = [e for e in Registry.open(registry_dir).entries() if e.name == "iris"]
    repo = build_repository(entries, base / "repository")
    version_dir = repo / "iris" / entries[0].version
    (version_dir / "model.py").write_text(LIAR)
    config = repo / "iris" / "config.pbtxt"
    config.write_text(config.read_text().replace("[ -1, 3 ]", "[ -1, 2 ]"))
    with one_off_node(pki, triton_home, repo, "liar", base / "work") as node:
        yield node


def test_a_lying_node_is_never_passed_on(
    pki: PKI,
    liar: dict[str, Any],
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    # First: the lie does reach a direct caller of that node.
    gw_cert, gw_key = pki.leaf_paths("gateway-node-client", SITE, SITE)
    direct = grpcclient.InferenceServerClient(
        liar["address"],
        ssl=True,
        root_certificates=str(pki.node_ca_bundle()),
        private_key=str(gw_key),
        certificate_chain=str(gw_cert),
        channel_args=[("grpc.ssl_target_name_override", liar["dns_name"])],
    )
    inp = grpcclient.InferInput("input", list(IRIS.shape), "FP32")
    inp.set_data_from_numpy(IRIS)
    lie = direct.infer("iris", [inp], client_timeout=10).as_numpy("probabilities")
    direct.close()
    assert lie.shape == (3, 2)

    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    # Only the liar: the gateway answers 502, never the lie.
    cfg = gateway_config(pki, registry_dir, tmp_path / "a", [liar])
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert r.status_code == 502
        assert "shape" in r.json()["detail"]
    # The liar beside an honest node: every answer is the honest one, the liar is charged.
    honest = node_table(triton_cluster)[0]
    cfg = gateway_config(pki, registry_dir, tmp_path / "b", [liar, honest])
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        for _ in range(30):
            r = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
            assert r.status_code == 200
            out = r.json()["outputs"][0]
            assert out["shape"] == [3, 3]
            assert r.json()["parameters"]["ztgate.nodes"] == honest["name"]
        liar_state = gw.gw.router.nodes["liar"]
        # The liar was tried, and every attempt on it was a charged failure.
        assert liar_state.attempts >= 1
        assert liar_state.failed == liar_state.attempts and liar_state.served == 0


def test_a_sibling_nodes_certificate_is_refused(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """n1's entry pointed at n2's address: n2's valid cert is not n1's, so no answer is used."""
    n1, n2 = node_table(triton_cluster)[:2]
    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    impostor = {**n1, "address": n2["address"]}
    cfg = gateway_config(pki, registry_dir, tmp_path / "a", [impostor])
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert r.status_code == 502
        # Refused for the name, at the TLS handshake: nothing was sent to n2.
        assert "Hostname Verification Check failed" in r.json()["detail"], r.text
        state = gw.gw.router.nodes["n1"]
        assert state.attempts == 1 and state.failed == 1 and state.served == 0
    # Positive control, built the same way with n1's real address.
    cfg = gateway_config(pki, registry_dir, tmp_path / "b", [n1])
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert r.status_code == 200
        assert r.json()["parameters"]["ztgate.nodes"] == "n1"


def test_no_node_and_deadline_problems(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    dead = {**node_table(triton_cluster)[0], "address": f"127.0.0.1:{free_port()}"}
    cfg = gateway_config(
        pki, registry_dir, tmp_path / "a", [dead], routing={"eject_after_failures": 1}
    )
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        for _ in range(2):
            r = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
            assert r.status_code == 502
            assert "Connection refused" in r.json()["detail"], r.text
            # The only node is never ejected (max share), so the next attempt fails the
            # same way rather than 503.
            assert gw.gw.router.ejected == {}
        assert gw.gw.router.nodes["n1"].attempts == 2
    # With no node configured at all the answer is 503 + Retry-After.
    cfg = gateway_config(pki, registry_dir, tmp_path / "b", [])
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["detail"] == "no node serves 'iris'"
    # A 1 ms deadline cannot be met by a real node call over TLS.
    cfg = gateway_config(pki, registry_dir, tmp_path / "c", node_table(triton_cluster))
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(
            f"{gw.base}/v2/models/iris/infer",
            json=infer_body(np.tile(IRIS, (80, 1))),
            headers={"ztgate-deadline-ms": "1"},
        )
        assert r.status_code == 504, r.text


def test_at_most_the_ejected_share_of_several_nodes_is_ejected(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """Three nodes, two of them dead, max_ejected_share 0.5: floor(1.5) = 1 may be out."""
    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    n1, n2, n3 = node_table(triton_cluster)
    nodes = [n1, *({**n, "address": f"127.0.0.1:{free_port()}"} for n in (n2, n3))]
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path / "a",
        nodes,
        # Ejections outlast the test, so no probe readmits a node while it runs.
        routing={
            "eject_after_failures": 1,
            "max_ejected_share": 0.5,
            "eject_base_s": 300.0,
            "eject_max_s": 600.0,
        },
    )
    with running_gateway(cfg) as gw, httpx.Client(verify=ctx, timeout=10) as c:
        router = gw.gw.router

        def ask(times: int) -> list[int]:
            url = f"{gw.base}/v2/models/iris/infer"
            return [c.post(url, json=infer_body(IRIS)).status_code for _ in range(times)]

        # Bounded: until both dead nodes have failed once (each such failure would eject).
        statuses: list[int] = []
        for _ in range(30):
            statuses += ask(1)
            if router.nodes["n2"].failed and router.nodes["n3"].failed:
                break
        assert statuses == [200] * len(statuses)  # every failure was retried on n1
        assert router.nodes["n2"].failed >= 1 and router.nodes["n3"].failed >= 1
        # Only one of the two dead nodes is out; the other still gets traffic.
        assert len(router.ejected) == 1, router.ejected
        (out,) = router.ejected
        assert out in {"n2", "n3"}
        kept = "n3" if out == "n2" else "n2"
        before = {name: s.attempts for name, s in router.nodes.items()}
        assert ask(10) == [200] * 10
        assert router.nodes[kept].attempts > before[kept]
        assert router.nodes[out].attempts == before[out]
        assert router.nodes["n1"].served >= 10
        assert set(router.ejected) == {out}


def _router(
    cluster: TritonCluster, pki: PKI, store: StateStore, dead_port: int, registry_dir: Path
) -> tuple[Router, ModelEntry]:
    cfg = gateway_config(
        pki,
        registry_dir,
        registry_dir,
        [*node_table(cluster)[:2], {**node_table(cluster)[2], "address": f"127.0.0.1:{dead_port}"}],
        routing={"eject_after_failures": 1, "eject_base_s": 30.0, "eject_max_s": 60.0},
    )
    creds = NodeCredentials(cfg.tls.node_ca, cfg.tls.node_client_cert, cfg.tls.node_client_key)
    clients = [NodeClient(n, creds.channel_credentials()) for n in cfg.nodes]
    entry = Registry.open(registry_dir).get("iris")
    return Router.from_clients(clients, store, cfg.routing), entry


@pytest.mark.parametrize("shared", [True, False])
def test_replicas_sharing_redis_honour_each_others_ejections(
    shared: bool,
    redis_server: str,
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
) -> None:
    dead_port = free_port()
    inputs = (Tensor("input", "FP32", IRIS.shape, IRIS),)

    def anywhere(_: NodeConfig) -> bool:
        return True

    async def scenario() -> tuple[dict[str, float], int]:
        prefix = f"t{uuid.uuid4().hex}:"
        store_a = RedisStore(redis_server, prefix=prefix, timeout_s=5.0)
        store_b = (
            RedisStore(redis_server, prefix=prefix, timeout_s=5.0) if shared else MemoryStore()
        )
        a, entry = _router(triton_cluster, pki, store_a, dead_port, registry_dir)
        b, _ = _router(triton_cluster, pki, store_b, dead_port, registry_dir)
        try:
            for _ in range(30):  # until replica A has tried, and ejected, the dead node
                await a.infer(Job(entry, inputs, (), time.monotonic() + 5, anywhere, "t"))
                if "n3" in a.ejected:
                    break
            assert "n3" in a.ejected
            await b.refresh()
            for _ in range(20):
                await b.infer(Job(entry, inputs, (), time.monotonic() + 5, anywhere, "t"))
            return b.ejected, b.nodes["n3"].attempts
        finally:
            await a.close()
            await b.close()
            await store_a.close()
            await store_b.close()

    ejected, tried_on_b = asyncio.run(scenario())
    if shared:
        assert "n3" in ejected and tried_on_b == 0  # B never even tried the dead node
    else:
        assert tried_on_b >= 1  # control: without shared state B learns it the hard way


def test_verifier_charges_accumulate_and_unresolved_disagreements_charge_nobody(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path
) -> None:
    """Reputation from verifiers, on replies that really passed routing (real n1).

    A charge lands after the reply's transport success, which resets the consecutive
    failure count; charges must survive that (or a node that answers every request with a
    lie is never ejected), and start over only when an independent node vouches. An
    unresolved two-party disagreement charges nobody and only counts.
    """
    cfg = gateway_config(pki, registry_dir, registry_dir, node_table(triton_cluster))
    creds = NodeCredentials(cfg.tls.node_ca, cfg.tls.node_client_cert, cfg.tls.node_client_key)
    clients = [NodeClient(n, creds.channel_credentials()) for n in cfg.nodes]
    router = Router.from_clients(clients, MemoryStore(), cfg.routing)
    entry = Registry.open(registry_dir).get("iris")
    inputs = (Tensor("input", "FP32", IRIS.shape, IRIS),)
    n1, n2, _ = (n.name for n in cfg.nodes)
    k = cfg.routing.eject_after_failures

    async def answered(node: str) -> str:
        job = Job(
            entry,
            inputs,
            (RequestedOutput("probabilities"),),
            time.monotonic() + 30,
            lambda n: n.name == node,
            "test",
        )
        routed = await router.infer(job)
        return routed.node.name

    async def scenario() -> None:
        try:
            # Control: a vouch between charges (the node was outvoted once, then agreed).
            for _ in range(2 * k):
                await router.charge(await answered(n1))
                router.vouch(await answered(n1))
            assert router.nodes[n1].ejections == 0 and n1 not in router.ejected
            # k verdicts in a row against it, each after a successful reply: ejected.
            for _ in range(k):
                await router.charge(await answered(n1))
            assert router.nodes[n1].ejections == 1 and n1 in router.ejected
            # Disputes nothing resolved, however many: no charge, no ejection, an alert.
            for _ in range(4 * k):
                router.unresolved("redundant", [await answered(n2), "n-other"], "test")
            state = router.nodes[n2]
            assert (state.failed, state.charges, state.ejections) == (0, 0, 0)
            assert state.disputed == 4 * k and n2 not in router.ejected
            assert router.unresolved_disagreements == {"redundant": 4 * k}
        finally:
            await router.close()

    asyncio.run(scenario())
