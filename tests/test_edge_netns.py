"""The link between an edge and its core cut by the kernel: network namespaces, a veth pair.

The core's witness (`ztgate witness serve --vault`, as an operator starts it) runs in a
network namespace of its own, reachable from the root namespace only over a veth pair
with 10.x addresses. The edge is a real gateway in the root namespace, answering from its
local Triton nodes, its log reconciled with that core. The link is cut as a failed cable
is (`ip link set <veth> down`: the route goes, a connection attempt fails at once) and, where
`tc` exists, as a dead radio link is (netem dropping every packet: a connection attempt
hangs until its timeout). The edge keeps answering; once the link is back, the core holds
the edge's log and has cosigned it, and its export verifies with the answers given while
cut off. tests/test_edge_reconcile.py covers the same over the project's fault proxy.

Namespaces need CAP_NET_ADMIN: without it the test skips with a reason starting
`netns unavailable:`, the one skip tests/conftest.py lets through under CI=true.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from gateway.pki import PKI, load_signing_key
from gateway.receipts.canonical import b64
from gateway.receipts.signing import raw_public
from tests.conftest import TritonCluster
from tests.gateway_harness import gateway_config, running_gateway
from tests.system.processes import Service
from tests.test_gateway import IRIS, infer_body, node_table
from tests.test_gateway_receipts import client

pytestmark = pytest.mark.slow

CORE = "core.example/witness"
CUT_REQUESTS = 5
IP_TIMEOUT_S = 10.0


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)


def _must(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"{' '.join(map(str, r.args))}: {r.stderr.strip()}"


@dataclass
class Link:
    """A veth pair from the root namespace (`outer`, `edge_ip`) into `netns` (`core_ip`)."""

    netns: str
    outer: str
    inner: str
    edge_ip: str
    core_ip: str
    netem: bool  # the kernel has sch_netem: a cut can also drop every packet

    def cuts(self) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
        """(what, cut, restore) for each way this machine can cut the link."""
        ways = [
            # The edge's end down: its route goes, a connection attempt fails at once.
            ("edge end down", lambda: self._set(self.outer, "down"),
             lambda: self._set(self.outer, "up")),
            # The core's end down: the edge's route stays, its packets go nowhere.
            ("core end down", lambda: self._set(self.inner, "down", self.netns),
             lambda: self._set(self.inner, "up", self.netns)),
        ]  # fmt: skip
        if self.netem:
            ways.append(("every packet dropped", lambda: _must(_netem(self.outer, True)),
                         lambda: _must(_netem(self.outer, False))))  # fmt: skip
        return ways

    @staticmethod
    def _set(dev: str, state: str, netns: str | None = None) -> None:
        _must(_ip("link", "set", dev, state, netns=netns))


def _netem(dev: str, on: bool) -> subprocess.CompletedProcess[str]:
    how = (
        ["add", "dev", dev, "root", "netem", "loss", "100%"] if on else ["del", "dev", dev, "root"]
    )
    return subprocess.run(
        ["tc", "qdisc", *how], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )


@pytest.fixture(scope="session")
def netns_allowed() -> None:
    """Whether this machine lets the tests make namespaces and veth pairs: asked once,
    before the costly session fixtures start (a session fixture listed first runs first)."""
    if shutil.which("ip") is None:
        pytest.skip("netns unavailable: no `ip` command (iproute2)")
    tag = secrets.token_hex(3)
    netns, outer = f"ztgate-{tag}", f"zto{tag}"
    made = _ip("netns", "add", netns)
    if made.returncode != 0:
        pytest.skip(f"netns unavailable: ip netns add: {made.stderr.strip()}")
    try:
        veth = _ip("link", "add", outer, "type", "veth", "peer", "name", f"zti{tag}")
        if veth.returncode != 0:
            pytest.skip(f"netns unavailable: veth pair: {veth.stderr.strip()}")
    finally:
        _ip("link", "del", outer)
        _ip("netns", "del", netns)


@pytest.fixture
def link(netns_allowed: None) -> Iterator[Link]:
    """A fresh namespace and veth pair, names and subnet unique to this run; both removed
    at teardown whatever the test did."""
    tag = secrets.token_hex(3)
    netns, outer, inner = f"ztgate-{tag}", f"zto{tag}", f"zti{tag}"
    _must(_ip("netns", "add", netns))
    try:
        _must(_ip("link", "add", outer, "type", "veth", "peer", "name", inner))
        # A /30 in 10.200-254.x: a subnet this machine's own interfaces are unlikely to use.
        a, b = 200 + secrets.randbelow(55), secrets.randbelow(64) * 4
        edge_ip, core_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        _must(_ip("link", "set", inner, "netns", netns))
        _must(_ip("addr", "add", f"{edge_ip}/30", "dev", outer))
        _must(_ip("link", "set", outer, "up"))
        _must(_ip("addr", "add", f"{core_ip}/30", "dev", inner, netns=netns))
        _must(_ip("link", "set", inner, "up", netns=netns))
        _must(_ip("link", "set", "lo", "up", netns=netns))
        # netem needs the kernel's sch_netem, which not every machine has: probed.
        netem = shutil.which("tc") is not None and _netem(outer, True).returncode == 0
        if netem:
            _must(_netem(outer, False))
        yield Link(netns, outer, inner, edge_ip, core_ip, netem)
    finally:
        _ip("link", "del", outer)  # takes its peer with it (a no-op if never made)
        _ip("netns", "del", netns)
    assert netns not in _ip("netns", "list").stdout
    assert _ip("link", "show", outer).returncode != 0  # nothing left behind


@dataclass
class Core:
    dir: Path
    url: str
    vkey: str
    service: Service


@pytest.fixture
def core(link: Link, pki: PKI, tmp_path: Path) -> Iterator[Core]:
    """The core's witness with a vault, started as an operator starts it, inside `link`'s
    namespace: the edge reaches it only over the veth pair."""
    d = tmp_path / "core-witness"
    log_pub = b64(raw_public(load_signing_key(pki.key_path("log-checkpoint")).public_key()))
    init = [sys.executable, "-m", "gateway", "witness", "init", "--dir", str(d),
            "--name", CORE, "--trust-log", f"ztgate.local/={log_pub}"]  # fmt: skip
    made = subprocess.run(init, capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    port = 8090
    service = Service(
        "core-witness",
        ["ip", "netns", "exec", link.netns, sys.executable, "-m", "gateway", "witness",
         "serve", "--dir", str(d), "--host", link.core_ip, "--port", str(port), "--vault"],
        tmp_path,
        tmp_path / "core-witness.log",
    )  # fmt: skip
    service.start()
    try:
        url = f"http://{link.core_ip}:{port}"
        end = time.monotonic() + 30
        while not _reachable(url):
            assert service.running(), service.tail()
            assert time.monotonic() < end, (
                f"the core never answered over the link\n{service.tail()}"
            )
            time.sleep(0.2)
        yield Core(d, url, made.stdout.strip(), service)
    finally:
        service.stop()


def _reachable(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(what: str, cond: Callable[[], bool], deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(0.2)


def test_an_edge_cut_off_by_the_kernel_keeps_answering_and_is_cosigned_once_back(
    netns_allowed: None,
    link: Link,
    core: Core,
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path / "edge",
        node_table(triton_cluster),
        receipts={"witnesses": [[core.vkey, core.url]], "reconcile_with": [core.url]},
    )
    given: list[str] = []
    with running_gateway(cfg) as edge, client(pki, "demo") as demo:

        def answer() -> int:
            r = demo.post(f"{edge.base}/v2/models/iris/infer", json=infer_body(IRIS))
            if r.status_code == 200:
                given.append(r.json()["parameters"]["ztgate.receipt_id"])
            return r.status_code

        receipts = edge.gw.receipts
        assert receipts is not None
        log, pushes = receipts.log, receipts.checkpointer.push_failures

        def cosigned() -> int:
            return log.witness_size(CORE)

        def offline(how: str, cut: Callable[[], None], restore: Callable[[], None]) -> None:
            # The whole log cosigned: no push is in flight (a log that has not grown makes
            # no witness traffic), so none that began linked can land once cut.
            _wait(f"cosigned before the cut ({how})", lambda: cosigned() >= log.size)
            before, failed = cosigned(), pushes[CORE]
            cut()
            try:
                assert not _reachable(core.url, timeout=1.0)  # really cut
                assert [answer() for _ in range(CUT_REQUESTS)] == [200] * CUT_REQUESTS
                grown = log.size
                _wait(f"a push that failed ({how})", lambda: pushes[CORE] > failed)
                assert cosigned() == before  # the core learnt nothing while cut off
            finally:
                restore()
            # Restored: the edge's next rounds upload and get the offline log cosigned.
            _wait(f"the offline log cosigned ({how})", lambda: cosigned() >= grown)
            state = httpx.get(f"{core.url}/vault", params={"origin": log.origin}, timeout=5)
            assert state.json()["stored"] >= grown and state.json()["cosigned"] >= grown

        # Positive control: linked, an answer's receipt reaches the core and is cosigned.
        assert answer() == 200
        _wait("cosigned while linked", lambda: cosigned() >= log.size > 1)
        ways = link.cuts()
        for how, cut, restore in ways:
            offline(how, cut, restore)
        log_dir = log.path.parent
    # The auditor, from the core alone: its export verifies, the answers given while cut
    # off among the receipts, each valid with the core's cosignature.
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(log_dir)]) == 0
    trust = json.loads(capsys.readouterr().out)
    trust["witnesses"] = [{"vkey": core.vkey}]
    (tmp_path / "trust.json").write_text(json.dumps(trust))
    bundle = tmp_path / "from-core"
    assert main(["witness", "export", "--dir", str(core.dir), "--out", str(bundle)]) == 0
    capsys.readouterr()
    verify = ["verify", str(bundle), "--trust", str(tmp_path / "trust.json"), "--json"]
    assert main([*verify, "--require-witness", CORE]) == 0
    report = json.loads(capsys.readouterr().out)
    valid = {f["subject"].split()[-1] for f in report["findings"] if f["status"] == "valid"}
    assert len(given) == 1 + CUT_REQUESTS * len(ways)
    assert set(given) <= valid


def test_under_ci_only_a_netns_unavailable_skip_is_let_through() -> None:
    """tests/conftest.py fails every skip under CI=true but this one; the control: any
    other reason, built the same way, still fails."""
    from tests.conftest import _fail_skip

    def skipped(reason: str) -> pytest.TestReport:
        return pytest.TestReport(
            "t", ("t.py", 0, "t"), {}, "skipped", ("t.py", 1, f"Skipped: {reason}"), "setup"
        )

    allowed = skipped("netns unavailable: ip netns add: Operation not permitted")
    _fail_skip(allowed)
    assert allowed.outcome == "skipped"
    for reason in ("redis-server is not installed", "no netns unavailable: here"):
        other = skipped(reason)
        _fail_skip(other)
        assert other.outcome == "failed" and "nothing may skip" in str(other.longrepr)
