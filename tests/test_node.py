"""Inference nodes: real tritonservers behind gRPC mTLS, and their supervision.

Every refusal test calls the node twice through the same helper: once with the gateway's
cert (must answer) and once with the credential under test (must be refused), so a refusal
cannot come from a client that silently sent nothing or dialled the wrong place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.examples import SHIPPED_DIR
from gateway.node.triton import NodeSpec, NodeStartError, NodeSupervisor, TritonProcess
from gateway.pki import PKI
from gateway.ports import free_port as _free_port

if TYPE_CHECKING:
    # Annotations only: importing conftest at run time would load it a second time.
    from tests.conftest import ClusterNode, TritonCluster

pytestmark = pytest.mark.timeout(120)
SITE = "site-a"  # the site the conftest PKI and cluster use

IRIS = SHIPPED_DIR / "iris.onnx"


def _client(
    address: str, dns_name: str, root: Path, cert: Path | None, key: Path | None
) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(root),
        private_key=None if key is None else str(key),
        certificate_chain=None if cert is None else str(cert),
        channel_args=[
            ("grpc.ssl_target_name_override", dns_name),
            # A private subchannel pool: no TLS session is shared with an earlier client.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def _infer_iris(client: grpcclient.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("probabilities")
    result = client.infer("iris", [inp], outputs=[out], client_timeout=10)
    probs: np.ndarray = result.as_numpy("probabilities")
    return probs


def call_node(
    node: ClusterNode | tuple[str, str],
    root: Path,
    cert: Path | None,
    key: Path | None,
    x: np.ndarray | None = None,
    dns_name: str | None = None,
) -> np.ndarray:
    """One iris inference on a fresh mTLS connection; ``node`` or (address, DNS name)."""
    address, pinned = node if isinstance(node, tuple) else (node.address, node.dns_name)
    client = _client(address, dns_name or pinned, root, cert, key)
    try:
        return _infer_iris(client, np.zeros((1, 4), np.float32) if x is None else x)
    finally:
        client.close()


def gateway_call(
    cluster: TritonCluster, node: ClusterNode | tuple[str, str], x: np.ndarray | None = None
) -> np.ndarray:
    return call_node(node, cluster.node_ca, cluster.gateway_cert, cluster.gateway_key, x)


def _reference(x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as in the node's wrapper: same kernels, same bits
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(IRIS), opts, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(["probabilities"], {"input": x})[0]
    return out


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state not in ("Z", "X") and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------- serving


def test_cluster_layout(triton_cluster: TritonCluster) -> None:
    got = {(n.name, n.region, n.provider) for n in triton_cluster.nodes.values()}
    assert got == {
        ("n1", "eu-west", "prov-a"),
        ("n2", "eu-central", "prov-b"),
        ("n3", "us-east", "prov-c"),
    }
    for node in triton_cluster.nodes.values():
        assert node.dns_name == f"{node.name}.node.ztgate.local"
        assert node.spiffe_id == f"spiffe://ztgate.local/node/{node.name}"
        assert node.process.alive() and node.process.ready()
        # HTTP has no TLS, so it must never listen beyond loopback.
        assert "--http-address=127.0.0.1" in node.process.command()


def test_mtls_inference_matches_onnxruntime(triton_cluster: TritonCluster) -> None:
    x = np.random.default_rng(7).normal(5.0, 2.0, size=(16, 4)).astype(np.float32)
    expected = _reference(x)
    for node in triton_cluster.nodes.values():
        got = gateway_call(triton_cluster, node, x)
        assert got.shape == (16, 3)
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    # Same trust domain and names: only the issuing CA differs from the real one.
    return PKI.init(tmp_path_factory.mktemp("foreign-pki"), sites=[SITE])


# What a client sees when the node drops it mid-handshake (gRPC words it either way).
NODE_HUNG_UP = r"Socket closed|Connection reset by peer"


def _bad_credentials(
    kind: str, pki: PKI, foreign: PKI, tmp: Path
) -> tuple[Path | None, Path | None]:
    if kind == "no-client-cert":
        return None, None
    if kind == "foreign-ca":
        return foreign.leaf_paths("gateway-node-client", SITE, SITE)
    if kind == "expired":
        now = dt.datetime.now(dt.UTC)
        issued = pki.issue(
            "gateway-node-client",
            SITE,
            site=SITE,
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
            # Never the default path: that would overwrite the real gateway cert.
            out=(tmp / "expired.crt", tmp / "expired.key"),
        )
        return issued.cert, issued.key
    if kind == "client-role":
        issued = pki.issue("client", "mallory", out=(tmp / "client.crt", tmp / "client.key"))
        return issued.cert, issued.key
    if kind == "sibling-node":
        # Nodes trust only the gateway CA; a node cert (node CA) cannot call another node.
        issued = pki.ensure("node", "n2")
        return issued.cert, issued.key
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["no-client-cert", "foreign-ca", "expired", "client-role", "sibling-node"]
)
def test_node_refuses_callers_other_than_its_gateway(
    kind: str, triton_cluster: TritonCluster, foreign_pki: PKI, tmp_path: Path
) -> None:
    node = triton_cluster.nodes["n1"]
    cert, key = _bad_credentials(kind, triton_cluster.pki, foreign_pki, tmp_path)
    # Positive control: same helper, same node, the gateway's own cert.
    assert gateway_call(triton_cluster, node).shape == (1, 3)
    with pytest.raises(InferenceServerException) as refused:
        call_node(node, triton_cluster.node_ca, cert, key)
    # The node hung up during the TLS handshake (not "Connection refused": it listens).
    assert "UNAVAILABLE" in str(refused.value.status()), refused.value
    assert re.search(NODE_HUNG_UP, str(refused.value)), refused.value


def test_gateway_refuses_a_node_under_the_wrong_name(triton_cluster: TritonCluster) -> None:
    n1, n2 = triton_cluster.nodes["n1"], triton_cluster.nodes["n2"]
    gw = (triton_cluster.node_ca, triton_cluster.gateway_cert, triton_cluster.gateway_key)
    assert call_node(n1, *gw, dns_name=n1.dns_name).shape == (1, 3)
    # n1's address while expecting n2: n1's cert does not name n2, the client must hang up.
    with pytest.raises(InferenceServerException) as refused:
        call_node(n1, *gw, dns_name=n2.dns_name)
    assert "UNAVAILABLE" in str(refused.value.status()), refused.value
    assert "Hostname Verification Check failed" in str(refused.value), refused.value


def test_gateway_refuses_a_node_from_a_foreign_ca(
    triton_cluster: TritonCluster, foreign_pki: PKI
) -> None:
    node = triton_cluster.nodes["n1"]
    gw = (triton_cluster.gateway_cert, triton_cluster.gateway_key)
    assert call_node(node, triton_cluster.node_ca, *gw).shape == (1, 3)
    with pytest.raises(InferenceServerException) as refused:
        call_node(node, foreign_pki.node_ca_bundle(), *gw)
    assert "UNAVAILABLE" in str(refused.value.status()), refused.value
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value), refused.value


# --------------------------------------------------------------------------- supervision


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll until ``predicate`` holds; ``timeout`` only bounds a wait that would never end
    (generous on purpose: a slow machine must not fail a test that would pass)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_killed_tritonserver_is_restarted(triton_cluster: TritonCluster) -> None:
    node = triton_cluster.nodes["n3"]
    sup = node.supervisor
    before, old_pid = sup.restarts, node.process.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    assert _wait_for(lambda: sup.restarts > before, 30), "supervisor did not notice"
    assert sup.last_reason is not None and "exited" in sup.last_reason
    assert sup.wait_healthy(30), f"not back: {sup.state} {sup.last_reason}"
    assert node.process.pid != old_pid
    assert gateway_call(triton_cluster, node).shape == (1, 3)


def test_killed_python_stub_is_detected_and_node_restarted(triton_cluster: TritonCluster) -> None:
    node = triton_cluster.nodes["n2"]
    sup, proc = node.supervisor, node.process
    before = sup.restarts
    with sup.paused():
        stubs = proc.stub_pids()
        assert len(stubs) == 3  # iris, mnist, risk: one instance each
        iris_stub = [p for p in stubs if b"/iris/" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(iris_stub) == 1
        os.kill(iris_stub[0], signal.SIGKILL)
        # The trap: the server still claims ready while iris inference fails.
        assert _wait_for(lambda: iris_stub[0] not in proc.stub_pids(), 30)
        assert proc.ready()
        with pytest.raises(InferenceServerException, match="not healthy"):
            gateway_call(triton_cluster, node)
        failure = sup.probe()
        assert failure is not None and "not healthy" in failure
        reason = sup.check()
        assert reason is not None and str(iris_stub[0]) in reason
    assert _wait_for(lambda: sup.restarts > before, 30)
    assert sup.wait_healthy(30), f"not back: {sup.state} {sup.last_reason}"
    assert gateway_call(triton_cluster, node).shape == (1, 3)
    assert sup.probe() is None


# --------------------------------------------------------------------------- start-up


STUCK_MODEL = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)  # a model that never finishes loading

    def execute(self, requests):
        return []
"""

STUCK_CONFIG = """
name: "stuck"
backend: "python"
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


# What tritonserver logs once the python backend initialises the stuck model's instance.
STUCK_LOADING = "TRITONBACKEND_ModelInstanceInitialize: stuck_0"


def _spec(pki: PKI, repository: Path, workdir: Path, name: str = "n9") -> NodeSpec:
    issued = pki.ensure("node", name)
    return NodeSpec(
        name=name,
        region="test",
        provider="test",
        grpc_port=_free_port(),
        http_port=_free_port(),
        repository=repository,
        cert=issued.cert,
        key=issued.key,
        client_ca=pki.gateway_ca_bundle(SITE),
        workdir=workdir,
    )


class LogTriggeredClock:
    """time.monotonic until the node's log shows ``needle``; from then on far past any
    deadline. The deadline then passes at a known point of the start-up (the model is
    loading), however slow the machine, and the test never waits it out."""

    def __init__(self, log: Path, needle: str) -> None:
        self.log, self.needle = log, needle
        self.jumped = False

    def __call__(self) -> float:
        if not self.jumped:
            with contextlib.suppress(OSError):
                self.jumped = self.needle in self.log.read_text(errors="replace")
        return time.monotonic() + (1e6 if self.jumped else 0.0)


def test_node_that_never_gets_ready_is_killed_at_the_deadline(
    pki: PKI, triton_home: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "stuck" / "1").mkdir(parents=True)
    (repo / "stuck" / "config.pbtxt").write_text(STUCK_CONFIG)
    (repo / "stuck" / "1" / "model.py").write_text(STUCK_MODEL)
    spec = _spec(pki, repo, tmp_path / "node")
    # The deadline passes once the python backend is initialising the stuck model.
    clock = LogTriggeredClock(spec.workdir / "triton.log", STUCK_LOADING)
    proc = TritonProcess(spec, triton_home, clock=clock)
    # 90 s is a backstop only: if the log never showed the model loading, the start would
    # fail on real time, without the jump, and the checks below say so.
    with pytest.raises(NodeStartError, match="not ready within 90s, killed") as failed:
        proc.start(deadline_s=90)
    assert clock.jumped, "the deadline passed before the model was loading"
    assert "stuck" in str(failed.value)  # the log tail names the model it was loading
    assert not proc.alive() and proc.pid is None
    assert not _processes_mentioning(proc.shm_prefix)
    assert not proc.shm_segments()


def test_missing_cert_fails_fast_with_the_real_reason(
    pki: PKI, triton_home: Path, triton_repository: Path, tmp_path: Path
) -> None:
    spec = _spec(pki, triton_repository, tmp_path / "node")
    bad = NodeSpec(**{**spec.__dict__, "cert": tmp_path / "missing.crt"})
    with pytest.raises(NodeStartError, match=r"cert file .*missing\.crt does not exist"):
        TritonProcess(bad, triton_home).start(deadline_s=8)


def test_stop_leaves_no_process_or_shm(
    pki: PKI, triton_home: Path, triton_repository: Path, tmp_path: Path
) -> None:
    proc = TritonProcess(_spec(pki, triton_repository, tmp_path / "node"), triton_home)
    sup = NodeSupervisor(proc, interval_s=0.5)
    sup.start()
    try:
        pid, stubs = proc.pid, proc.stub_pids()
        assert pid is not None and len(stubs) == 3 and proc.shm_segments()
    finally:
        sup.stop()
    assert sup.state == "stopped" and sup.restarts == 0
    for p in [pid, *stubs]:
        assert not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text()
    assert not _processes_mentioning(proc.shm_prefix)
    assert not proc.shm_segments()


def test_restarts_are_bounded(
    pki: PKI, triton_home: Path, triton_repository: Path, tmp_path: Path
) -> None:
    proc = TritonProcess(_spec(pki, triton_repository, tmp_path / "node", "n8"), triton_home)
    sup = NodeSupervisor(proc, interval_s=0.3, max_restarts=1, backoff_s=0.1)
    sup.start()
    try:
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _wait_for(lambda: sup.restarts == 1 and sup.state == "running", 60)
        second = proc.pid
        assert second is not None and second != first
        os.kill(second, signal.SIGKILL)
        # The budget (1 restart per window) is spent: give up instead of flapping.
        assert _wait_for(lambda: sup.state == "failed", 30), sup.state
        assert sup.restarts == 1 and "exited" in (sup.last_reason or "")
        assert not sup.wait_healthy(0.5)
        assert not proc.alive() and not proc.shm_segments()
    finally:
        sup.stop()
    assert not _processes_mentioning(proc.shm_prefix)


# --------------------------------------------------------------------------- CLI


def test_cli_node_serve_rejects_unknown_models(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any tritonserver starts; the control, the same command with a known
    model and site, is test_cli_node_serve_until_sigterm (it starts a real node)."""
    from gateway.cli import main
    from gateway.registry import Registry, seed_examples

    seed_examples(Registry.open(tmp_path / "registry"))
    argv = ["node", "serve", "--name", "n6", "--region", "r", "--provider", "p"]
    argv += ["--grpc-port", "1", "--pki", str(pki.root), "--registry", str(tmp_path / "registry")]
    assert main([*argv, "--models", "iris,nope", "--workdir", str(tmp_path / "n6")]) == 2
    assert "--models: not in" in (err := capsys.readouterr().err) and "nope" in err, err
    assert main([*argv, "--site", "site-z", "--workdir", str(tmp_path / "n6")]) == 2
    assert "--site 'site-z' is not in" in (err := capsys.readouterr().err), err
    assert not _processes_mentioning(str(tmp_path / "n6"))


def test_cli_node_serve_until_sigterm(triton_cluster: TritonCluster, tmp_path: Path) -> None:
    from gateway.registry import Registry, seed_examples

    pki = triton_cluster.pki
    registry = Registry.open(tmp_path / "registry")
    seed_examples(registry)
    grpc_port = _free_port()
    workdir = tmp_path / "n7"
    out = (tmp_path / "stdout").open("w+")
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "node",
            "serve",
            "--name",
            "n7",
            "--region",
            "eu-north",
            "--provider",
            "prov-d",
            "--grpc-port",
            str(grpc_port),
            "--pki",
            str(pki.root),
            "--registry",
            str(tmp_path / "registry"),
            "--models",
            "iris",
            "--workdir",
            str(workdir),
            "--check-interval",
            "0.5",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        n7 = (f"127.0.0.1:{grpc_port}", pki.node_dns_name("n7"))
        assert _wait_for(lambda: "ready in" in Path(out.name).read_text(), 60), out.name
        assert gateway_call(triton_cluster, n7).shape == (1, 3)
        assert _processes_mentioning(str(workdir))
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=20) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
        out.close()
    text = Path(out.name).read_text()
    assert f"127.0.0.1:{grpc_port}" in text
    assert "n7.node.ztgate.local" in text
    assert "spiffe://ztgate.local/node/n7" in text
    assert not _processes_mentioning(str(workdir))
    assert not [p for p in Path("/dev/shm").glob("ztgate_n7_*") if f"_{cli.pid}_" in p.name]


def test_cli_node_repository_for_gpu_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stock onnxruntime_onnx repository for NVIDIA's Triton image, from the registry."""
    from gateway.cli import main
    from gateway.registry import Registry, seed_examples

    seed_examples(Registry.open(tmp_path / "reg"))
    out = tmp_path / "repo"
    args = ["node", "repository", "--registry", str(tmp_path / "reg"), "--out", str(out)]
    assert main([*args, "--models", "iris"]) == 0
    config = (out / "iris" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "KIND_GPU" in config
    assert (out / "iris" / "1" / "model.onnx").is_file()
    assert not (out / "mnist").exists()
    capsys.readouterr()
    # Refusals, each the control's command with one thing changed, and each for its reason.
    assert main([*args, "--models", "nope"]) == 2
    assert "--models: not in" in (err := capsys.readouterr().err) and "nope" in err, err
    none = ["node", "repository", "--registry", str(tmp_path / "none"), "--out", str(out)]
    assert main(none) == 2
    assert str(tmp_path / "none") in (err := capsys.readouterr().err), err
