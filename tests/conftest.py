"""Shared fixtures. Each group lives in its own section; keep new ones in new sections."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.node.repository import build_repository
from gateway.node.triton import NodeSpec, NodeStartError, NodeSupervisor, TritonProcess
from gateway.node.triton import triton_home as lay_out_triton_home
from gateway.pipeline.decision_log import flush_decisions
from gateway.pki import PKI
from gateway.ports import free_port
from gateway.registry import ModelEntry, Registry, seed_examples, seed_generative_examples

# The session's own redis-server (tests/redis_fixture.py).
pytest_plugins = ["tests.redis_fixture"]

# =========================================================================== CI: nothing skips


def in_ci() -> bool:
    """CI=true (set by .ci/run): a skip there would hide a test that never ran."""
    return os.environ.get("CI", "").strip().lower() == "true"


def _skip_reason(longrepr: object) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason"); anything else, as text.
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


# Issue 17 asks for tests over network namespaces "where the machine allows, skipped with
# a reason elsewhere": that one skip (tests/test_edge_netns.py) is let through, by reason.
ALLOWED_SKIP = "netns unavailable:"


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report.longrepr)
    if reason.removeprefix("Skipped: ").startswith(ALLOWED_SKIP):
        return
    report.outcome = "failed"
    report.longrepr = f"CI=true: nothing may skip in CI, and this did ({reason})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI=true a skip in any phase (a marker, pytest.skip in a test or a fixture,
    importorskip) is a failure; xfail is not a skip and is left alone."""
    report: pytest.TestReport = yield
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """The same for a whole module skipped at import (module-level importorskip or skip)."""
    report: pytest.CollectReport = yield
    if in_ci() and report.skipped:
        _fail_skip(report)
    return report


# =========================================================================== decision log


@pytest.fixture(autouse=True)
def _decision_log_written() -> Iterator[None]:
    """A test's decision records are written before the next test starts, so none lands
    in another test's caplog or decision file (the log is written by a thread)."""
    yield
    flush_decisions()


# =========================================================================== ports


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    return free_port


# =========================================================================== PKI

SITE = "site-a"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """One dev PKI for the session (trust domain ztgate.local, site-a)."""
    return PKI.init(tmp_path_factory.mktemp("pki"), sites=[SITE])


# =========================================================================== triton nodes

# Every tritonserver this process starts carries the launching pid in its shm prefix
# (see TritonProcess.shm_prefix), which is how the session-end leak check finds ours.
_OUR_SHM_MARK = f"_{os.getpid()}_"


def our_tritonservers(names: tuple[str, ...] = ()) -> list[int]:
    """Live tritonserver processes started by this test process (and their stubs); with
    `names`, only those of these nodes (another session cluster may still be serving)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        if names and not any(f"ztgate_{n}{_OUR_SHM_MARK}" in cmd for n in names):
            continue
        if "shm-region-prefix-name=ztgate_" in cmd and _OUR_SHM_MARK in cmd:
            found.append(int(entry.name))
        elif "triton_python_backend_stub" in cmd and "ztgate_" in cmd and _OUR_SHM_MARK in cmd:
            found.append(int(entry.name))
    return found


def our_shm_segments(names: tuple[str, ...] = ()) -> list[Path]:
    return [
        p
        for p in Path("/dev/shm").glob("ztgate_*")
        if _OUR_SHM_MARK in p.name
        and (not names or any(p.name.startswith(f"ztgate_{n}{_OUR_SHM_MARK}") for n in names))
    ]


def example_entries(tmp: Path) -> list[ModelEntry]:
    """Registry entries for the example models, from a registry seeded in ``tmp``."""
    registry = Registry.open(tmp / "registry")
    seed_examples(registry)
    return list(registry.entries())


@pytest.fixture(scope="session")
def triton_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tritonserver home (binary, python backend, stub) shared by every node."""
    return lay_out_triton_home(tmp_path_factory.mktemp("triton-home"))


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python-backend Triton repository with the example models (iris, mnist, risk)."""
    tmp = tmp_path_factory.mktemp("models")
    return build_repository(example_entries(tmp), tmp / "repository")


@dataclass
class ClusterNode:
    name: str
    region: str
    provider: str
    address: str  # host:port of gRPC (mTLS)
    dns_name: str  # what the gateway pins (grpc.ssl_target_name_override)
    spiffe_id: str
    supervisor: NodeSupervisor

    @property
    def process(self) -> TritonProcess:
        return self.supervisor.process


@dataclass
class TritonCluster:
    pki: PKI
    site: str
    nodes: dict[str, ClusterNode]
    gateway_cert: Path  # what the gateway presents to nodes
    gateway_key: Path
    node_ca: Path  # what the gateway trusts for nodes

    def stop(self) -> None:
        threads = [threading.Thread(target=n.supervisor.stop) for n in self.nodes.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)


CLUSTER_LAYOUT = (
    ("n1", "eu-west", "prov-a"),
    ("n2", "eu-central", "prov-b"),
    ("n3", "us-east", "prov-c"),
)


@pytest.fixture(scope="session")
def triton_cluster(
    pki: PKI,
    triton_home: Path,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonCluster]:
    """Three real tritonservers (n1..n3) on loopback gRPC mTLS, each under a supervisor.

    Nodes trust only ``pki.gateway_ca_bundle(site-a)``; call them with the gateway's
    node-client cert, ``node_ca`` as root, and ``dns_name`` pinned.
    """
    base = tmp_path_factory.mktemp("cluster")

    def make_node(name: str, region: str, provider: str) -> ClusterNode:
        issued = pki.ensure("node", name)
        spec = NodeSpec(
            name=name,
            region=region,
            provider=provider,
            grpc_port=free_port(),
            http_port=free_port(),
            repository=triton_repository,
            cert=issued.cert,
            key=issued.key,
            client_ca=pki.gateway_ca_bundle(SITE),
            workdir=base / name,
            labels={"region": region, "provider": provider},
        )
        sup = NodeSupervisor(
            TritonProcess(spec, triton_home),
            interval_s=0.5,
            start_deadline_s=60.0,
            backoff_s=0.2,
            max_restarts=10,
        )
        return ClusterNode(
            name,
            region,
            provider,
            spec.grpc_address,
            pki.node_dns_name(name),
            issued.spiffe_id,
            sup,
        )

    nodes = {name: make_node(name, region, provider) for name, region, provider in CLUSTER_LAYOUT}
    gw_cert, gw_key = pki.leaf_paths("gateway-node-client", SITE, SITE)
    cluster = TritonCluster(pki, SITE, nodes, gw_cert, gw_key, pki.node_ca_bundle())
    errors: list[BaseException] = []

    def start(node: ClusterNode) -> None:
        # A free port can be taken by another process before tritonserver binds it (other
        # test runs share the machine): then, and only then, try again on fresh ports.
        for attempt in range(3):
            try:
                node.supervisor.start()
                return
            except NodeStartError as exc:
                if "already in use" not in str(exc) or attempt == 2:
                    errors.append(exc)
                    return
            except BaseException as exc:
                errors.append(exc)
                return
            node = nodes[node.name] = make_node(node.name, node.region, node.provider)

    # In parallel: three sequential starts would triple the session's set-up time.
    threads = [threading.Thread(target=start, args=(n,)) for n in list(nodes.values())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    try:
        if errors:
            raise errors[0]
        yield cluster
    finally:
        cluster.stop()
    names = tuple(nodes)
    leaked, shm = our_tritonservers(names), our_shm_segments(names)
    assert not leaked and not shm, f"cluster left processes {leaked} and shm {shm}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any tritonserver or shm segment of ours outlived it, then clean up."""
    leaked, shm = our_tritonservers(), our_shm_segments()
    if not leaked and not shm:
        return
    for pid in leaked:
        try:
            # Not killpg: tritonservers share their launcher's (here pytest's) process
            # group; their python-backend stubs exit once the server is gone.
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for seg in shm:
        seg.unlink(missing_ok=True)
    print(f"\nLEAK: tritonserver processes {leaked}, shm segments {[s.name for s in shm]}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# =========================================================================== one-off nodes


@contextlib.contextmanager
def one_off_node(
    pki: PKI,
    triton_home: Path,
    repository: Path,
    name: str,
    workdir: Path,
    region: str = "eu-west",
    provider: str = "prov-x",
    deadline_s: float = 90.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[dict[str, str]]:
    """A real tritonserver serving `repository` (a liar's, a prover's ...) for one test
    module, outside the shared cluster; yields its `[[nodes]]` table for a gateway config."""
    issued = pki.ensure("node", name)
    spec = NodeSpec(
        name=name,
        region=region,
        provider=provider,
        grpc_port=free_port(),
        http_port=free_port(),
        repository=repository,
        cert=issued.cert,
        key=issued.key,
        client_ca=pki.gateway_ca_bundle(SITE),
        workdir=workdir,
    )
    with TritonProcess(spec, triton_home, extra_args=extra_args) as proc:
        proc.start(deadline_s)
        yield {
            "name": name,
            "address": spec.grpc_address,
            "dns_name": pki.node_dns_name(name),
            "spiffe_id": issued.spiffe_id,
            "region": region,
            "provider": provider,
        }


# =========================================================================== generative nodes

LLM_MODEL = "tinygpt"  # the shipped generative example's registry name
LLM_LAYOUT = (("g1", "eu-west", "prov-a"), ("g2", "eu-central", "prov-b"))


def llm_entries(tmp: Path) -> list[ModelEntry]:
    """Registry entries for the shipped generative example, from a registry in ``tmp``."""
    registry = Registry.open(tmp / "registry")
    seed_generative_examples(registry)
    return list(registry.entries())


@pytest.fixture(scope="session")
def llm_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton repository serving tinygpt as a decoupled (token-streaming) model."""
    tmp = tmp_path_factory.mktemp("llm-models")
    return build_repository(llm_entries(tmp), tmp / "repository")


@contextlib.contextmanager
def llm_nodes(
    pki: PKI,
    triton_home: Path,
    repository: Path,
    base: Path,
    layout: tuple[tuple[str, str, str], ...] = LLM_LAYOUT,
    token_delay_ms: int = 0,
    per_node: Mapping[str, tuple[Path, Mapping[str, str]]] | None = None,
) -> Iterator[TritonCluster]:
    """Supervised tritonservers serving `repository`, started in parallel; a per-token
    sleep of `token_delay_ms` in the generative model (ZTGATE_TOKEN_DELAY_MS).
    `per_node`: name -> (its own repository, extra environment), e.g. a liar's model or
    another onnxruntime thread count (ZTGATE_ORT_THREADS)."""
    env = {"ZTGATE_TOKEN_DELAY_MS": str(token_delay_ms)}

    def make_node(name: str, region: str, provider: str) -> ClusterNode:
        issued = pki.ensure("node", name)
        own_repository, own_env = (per_node or {}).get(name, (repository, {}))
        spec = NodeSpec(
            name=name,
            region=region,
            provider=provider,
            grpc_port=free_port(),
            http_port=free_port(),
            repository=own_repository,
            cert=issued.cert,
            key=issued.key,
            client_ca=pki.gateway_ca_bundle(SITE),
            workdir=base / name,
            labels={"region": region, "provider": provider},
        )
        sup = NodeSupervisor(
            TritonProcess(spec, triton_home, env={**env, **own_env}),
            interval_s=0.5,
            start_deadline_s=60.0,
            backoff_s=0.2,
            max_restarts=10,
        )
        return ClusterNode(
            name,
            region,
            provider,
            spec.grpc_address,
            pki.node_dns_name(name),
            issued.spiffe_id,
            sup,
        )

    nodes = {name: make_node(name, region, provider) for name, region, provider in layout}
    gw_cert, gw_key = pki.leaf_paths("gateway-node-client", SITE, SITE)
    cluster = TritonCluster(pki, SITE, nodes, gw_cert, gw_key, pki.node_ca_bundle())
    errors: list[BaseException] = []

    def start(node: ClusterNode) -> None:
        try:
            node.supervisor.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in nodes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    try:
        if errors:
            raise errors[0]
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def llm_cluster(
    pki: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    """Two real nodes (g1, g2; regions eu-west/eu-central, providers prov-a/prov-b) serving
    the generative model ``tinygpt`` (LLM_MODEL), tokens as fast as the model makes them."""
    with llm_nodes(pki, triton_home, llm_repository, tmp_path_factory.mktemp("llm")) as c:
        yield c
