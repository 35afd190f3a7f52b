"""Lying nodes on real Triton: the mechanism of docs/reputation.md end to end.

One python-backend node wraps the registered iris model and, per a control file read on
every request, tells the truth, perturbs its outputs always, on 10% of answers, just
above or just below the tolerance, serves a valid but different model (outputs
permuted), records what it receives (to diff a spot check against live traffic), or
replies slowly once (a real slow first reply, for node selection).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import Config
from gateway.job import Job
from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.protocol.tensors import Tensor
from gateway.registry import Registry
from gateway.routing.node_client import NodeClient, NodeCredentials
from gateway.routing.reputation import Sprt
from gateway.routing.router import Router
from gateway.state.memory import MemoryStore
from tests.conftest import TritonCluster, one_off_node
from tests.gateway_harness import client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body, iris_session, node_table

PRELUDE = """
import json as _json
import os as _os
import random as _random
import time as _time
import uuid as _uuid

_CONTROL = {control!r}


def _lie(results, request):
    kind = open(_os.path.join(_CONTROL, "kind")).read().strip()
    if kind == "slow-once":  # one slow reply, then honest ones
        with open(_os.path.join(_CONTROL, "kind"), "w") as f:
            f.write("honest")
        _time.sleep(1.0)
        return results
    if kind == "record":
        seen = {{
            "id": request.request_id(),
            "inputs": {{
                n: [str(t.as_numpy().dtype), list(t.as_numpy().shape), t.as_numpy().tolist()]
                for n, t in ((n, pb_utils.get_input_tensor_by_name(request, n))
                             for n in ("input",))
            }},
            "outputs": list(request.requested_output_names()),
            "parameters": request.parameters(),
            "flags": request.flags(),
        }}
        with open(_os.path.join(_CONTROL, "seen", _uuid.uuid4().hex), "w") as f:
            f.write(_json.dumps(seen, sort_keys=True))
        return results
    if kind == "always" or (kind == "sometimes" and _random.random() < 0.1):
        return [r + np.float32(0.3) for r in results]
    if kind == "above":  # tolerance: atol 1e-5 + rtol 1e-4 * |x| <= 1.1e-4 for probabilities
        return [r + np.float32(3e-4) for r in results]
    if kind == "below":
        return [r + np.float32(1e-6) for r in results]
    if kind == "other":  # a valid model's answer, but not this model's
        return [np.ascontiguousarray(r[:, ::-1]) for r in results]
    return results
"""


@pytest.fixture(scope="module")
def liar(
    pki: PKI, triton_home: Path, triton_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, Any]]]:
    base = tmp_path_factory.mktemp("liar")
    control = base / "control"
    (control / "seen").mkdir(parents=True)
    (control / "kind").write_text("honest")
    registry = triton_repository.parent / "registry"
    entries = [e for e in Registry.open(registry).entries() if e.name == "iris"]
    repo = build_repository(entries, base / "repository")
    model_py = repo / "iris" / entries[0].version / "model.py"
    text = model_py.read_text()
    honest = "results = self.session.run(self.output_names, feed)"
    assert honest in text
    text = text.replace(honest, honest + "\n            results = _lie(results, request)")
    marker = "class TritonPythonModel"
    text = text.replace(marker, PRELUDE.format(control=str(control)) + "\n\n" + marker, 1)
    model_py.write_text(text)
    with one_off_node(pki, triton_home, repo, "liar", base / "work", provider="prov-x") as node:
        yield control, node


def ask(c: httpx.Client, base: str, mode: str) -> httpx.Response:
    body = infer_body(IRIS)
    body["parameters"] = {"ztgate.verification": mode}
    return c.post(f"{base}/v2/models/iris/infer", json=body)


def client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=30)


def expected(registry: Path) -> np.ndarray:
    out: np.ndarray = iris_session(registry).run(None, {"input": IRIS})[0]
    return out


@dataclass
class Lying:
    """The liar node beside the shared cluster's honest ones, for one test."""

    pki: PKI
    control: Path
    node: dict[str, Any]
    cluster: TritonCluster
    registry: Path
    tmp: Path

    def config(self, kind: str, honest: int, **overrides: Any) -> Config:
        (self.control / "kind").write_text(kind)
        for f in (self.control / "seen").iterdir():
            f.unlink()
        nodes = [self.node, *node_table(self.cluster)[:honest]]
        return gateway_config(self.pki, self.registry, self.tmp, nodes, **overrides)


@pytest.fixture
def lying(
    pki: PKI,
    liar: tuple[Path, dict[str, Any]],
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path: Path,
) -> Lying:
    control, node = liar
    return Lying(
        pki, control, node, triton_cluster, triton_repository.parent / "registry", tmp_path
    )


def probabilities(r: httpx.Response) -> np.ndarray:
    return np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 3)


@pytest.mark.parametrize("kind", ["always", "sometimes", "above", "other"])
def test_in_redundant_mode_no_wrong_answer_reaches_a_client(
    kind: str, pki: PKI, lying: Lying
) -> None:
    cfg = lying.config(kind, 2)
    want = expected(lying.registry)
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        for _ in range(12):
            r = ask(c, gw.base, "redundant")
            assert r.status_code == 200, r.text
            # The model's answer within the tolerance, never the lie.
            np.testing.assert_allclose(probabilities(r), want, rtol=1e-4, atol=1e-5)
        liar_state = gw.gw.router.nodes["liar"]
    if kind != "sometimes":
        assert liar_state.served >= 1 and liar_state.failed == liar_state.served


def test_a_lie_below_the_tolerance_passes(pki: PKI, lying: Lying) -> None:
    """Documented limit: a shift within rtol/atol is agreement, not a lie."""
    cfg = lying.config("below", 1)
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        r = ask(c, gw.base, "redundant")
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["ztgate.verification_status"] == "agreed"
        assert gw.gw.router.nodes["liar"].failed == 0


def test_spot_checks_quarantine_a_node_lying_on_every_answer(pki: PKI, lying: Lying) -> None:
    """Mode none with spot checks: the liar is quarantined within 200 of its answers (the
    derived bound; expected about 24), a checked receipt's final status says contradicted,
    it gets no traffic after, `GET /admin/nodes` says why, and only an officer releases."""
    cfg = lying.config("always", 2, reputation={"spot_checks": True})
    with (
        running_gateway(cfg) as gw,
        client(pki, "demo") as c,
        client(pki, "olga") as officer,
        client(pki, "oscar") as on_call,
    ):
        rep = gw.gw.router.reputation
        assert rep is not None
        liar_cfg = gw.gw.router.nodes["liar"].config
        lied: list[str] = []
        nodes = gw.gw.router.nodes
        for _ in range(600):
            # As fast as the honest nodes, so it is picked as often as they are (a slow
            # first reply would only be forgotten after `ewma_decay_s` idle).
            nodes["liar"].ewma_s = min(s.ewma_s for s in nodes.values())
            r = ask(c, gw.base, "none")
            assert r.status_code == 200, r.text
            params = r.json()["parameters"]
            if params["ztgate.nodes"] == "liar":
                lied.append(params["ztgate.receipt"].split()[1])
            if rep.quarantined(liar_cfg):
                break
            time.sleep(0.01)  # let queued checks run
        # The derived bound: within 200 of its own answers.
        assert rep.quarantined(liar_cfg) and len(lied) <= 200, (len(lied), rep.records)
        # No traffic after quarantine.
        for _ in range(20):
            r = ask(c, gw.base, "none")
            assert r.status_code == 200 and r.json()["parameters"]["ztgate.nodes"] != "liar"
        statuses = set()
        for rid in lied:
            got = c.get(f"{gw.base}/v2/receipts/{rid}")
            assert got.status_code == 200, got.text
            statuses.add(got.json()["final_status"])
        assert "contradicted" in statuses, statuses
        listing = on_call.get(f"{gw.base}/admin/nodes")
        assert listing.status_code == 200, listing.text
        row = next(n for n in listing.json()["nodes"] if n["name"] == "liar")
        assert row["reputation"] == "quarantined" and row["evidence"]["contradicted"] >= 6
        assert on_call.post(f"{gw.base}/admin/nodes/liar/release").status_code == 403
        ok = officer.post(f"{gw.base}/admin/nodes/liar/release")
        assert ok.status_code == 200, ok.text
        assert officer.post(f"{gw.base}/admin/nodes/provider:prov-x/release").status_code == 200
        assert not rep.quarantined(liar_cfg)
        leaves = [e.type for _, e in gw.gw.receipts.log.entries()] if gw.gw.receipts else []
    assert {"node_quarantine", "node_release", "late_evidence"} <= set(leaves)
    lines = (cfg.data_dir / "quarantine.jsonl").read_text().splitlines()
    assert [json.loads(x)["state"] for x in lines].count("released") == 2


def test_a_check_and_a_live_request_look_the_same_at_the_node(pki: PKI, lying: Lying) -> None:
    """Every answer is checked (rate 1): what the recording node received as live traffic
    and as a spot check of another node's answer differ only in the random id."""
    cfg = lying.config("record", 1, reputation={"spot_checks": True, "rate_suspect": 1.0})
    seen = lying.control / "seen"
    live: list[dict[str, Any]] = []
    check: list[dict[str, Any]] = []
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        nodes = gw.gw.router.nodes
        for _ in range(40):
            nodes["liar"].ewma_s = min(s.ewma_s for s in nodes.values())
            before = set(seen.iterdir())
            r = ask(c, gw.base, "none")
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 3
            while len(set(seen.iterdir()) - before) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            new = [json.loads(p.read_text()) for p in set(seen.iterdir()) - before]
            if r.json()["parameters"]["ztgate.nodes"] == "liar":
                live += new[:1]
            else:
                check += new[:1]
            if live and check:
                break
    assert live and check, (len(live), len(check))
    a, b = live[0], check[0]
    assert a.pop("id") != b.pop("id")
    assert a == b


def test_redundant_copies_are_unlike_each_other_only_in_their_id(pki: PKI, lying: Lying) -> None:
    cfg = lying.config("record", 1)
    seen = lying.control / "seen"
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        assert ask(c, gw.base, "redundant").status_code == 200
        assert ask(c, gw.base, "none").status_code == 200
        del gw
    records = [json.loads(p.read_text()) for p in seen.iterdir()]
    assert len(records) >= 1
    ids = [r.pop("id") for r in records]
    assert len(set(ids)) == len(ids)
    assert all(r == records[0] for r in records)


# ------------------------------------------------------- spot-check rates set by policy

SPOT_CHECK_ALL = '@spot_check("100%")'


def require_spot_checks(cfg: Config, annotation: str) -> None:
    """An officer's annotation on the permit the demo caller's mode-`none` answers rest on."""
    path = cfg.policy.dir / "10-callers.cedar"  # type: ignore[operator]
    rule = '@id("apps-call-public-internal")\n'
    text = path.read_text()
    assert rule in text
    path.write_text(text.replace(rule, rule + annotation + "\n"))


def drained(spot: Any) -> None:
    """Until every check offered so far has a result (bounded: a stuck check fails)."""
    results = ("dropped", "skipped", "confirmed", "contradicted", "disputed", "failed")
    deadline = time.monotonic() + 60
    while sum(spot.counts[k] for k in results) < spot.counts["scheduled"]:
        assert time.monotonic() < deadline, dict(spot.counts)
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["above", "other"])
def test_a_signed_spot_check_rate_quarantines_a_liar_the_config_switched_checks_off_for(
    kind: str, pki: PKI, lying: Lying
) -> None:
    """The config an attacker holds turns spot checks off and sets the lowest rates; the
    permit's `@spot_check("100%")` still checks every answer, and a node lying just above
    the tolerance, or serving a valid but different model, is quarantined within the bound
    docs/reputation.md derives: each check of a lie is one contradiction (two other
    providers agree), `S` grows by ln(p1/p0) per contradiction and quarantines at
    ln(1/alpha), so within ceil(ln(1/alpha) / ln(p1/p0)) = 6 of its answers at rate 1
    (fewer when its own lies as a checker are contradicted too)."""
    low = {"spot_checks": False, "rate_suspect": 1e-9, "rate_established": 1e-9}
    cfg = lying.config(kind, 2, reputation={**low, "rate_trusted": 1e-9})
    require_spot_checks(cfg, SPOT_CHECK_ALL)
    test, rate = Sprt(), 1.0
    bound = math.ceil(math.ceil(test.threshold / test.up) / rate)
    assert bound == 6
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        rep, spot, nodes = gw.gw.router.reputation, gw.gw.spot, gw.gw.router.nodes  # type: ignore[attr-defined]
        assert rep is not None and not spot.configured
        liar_cfg = nodes["liar"].config
        lied = 0
        for _ in range(100):
            # Faster-looking than the honest ones: it answers whenever it is one of the two.
            nodes["liar"].ewma_s = min(s.ewma_s for s in nodes.values()) / 2
            r = ask(c, gw.base, "none")
            assert r.status_code == 200, r.text
            assert r.json()["parameters"]["ztgate.receipt"]
            lied += r.json()["parameters"]["ztgate.nodes"] == "liar"
            drained(spot)
            if rep.quarantined(liar_cfg):
                break
        record = rep.records[f"node:{liar_cfg.spiffe_id}"]
        assert rep.quarantined(liar_cfg) and lied <= bound, (lied, record)
        assert record.contradicted >= math.ceil(test.threshold / test.up)
        # Every answer it gave was checked and contradicted (and its checks of honest
        # answers, if any, add to that).
        assert spot.counts["contradicted"] >= lied and spot.counts["dropped"] == 0


def test_without_a_signed_rate_the_config_that_switched_checks_off_checks_nothing(
    pki: PKI, lying: Lying
) -> None:
    """Control for the test above, built the same way less the annotation: the liar lies
    on every answer and nothing is checked, so the checks above came from the policy."""
    low = {"spot_checks": False, "rate_suspect": 1e-9, "rate_established": 1e-9}
    cfg = lying.config("always", 2, reputation={**low, "rate_trusted": 1e-9})
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        rep, spot, nodes = gw.gw.router.reputation, gw.gw.spot, gw.gw.router.nodes  # type: ignore[attr-defined]
        lied = 0
        for _ in range(30):
            nodes["liar"].ewma_s = min(s.ewma_s for s in nodes.values())
            r = ask(c, gw.base, "none")
            assert r.status_code == 200, r.text
            lied += r.json()["parameters"]["ztgate.nodes"] == "liar"
        assert rep is not None and lied >= 6
        assert spot.counts["scheduled"] == 0 and not rep.quarantined(nodes["liar"].config)


# ------------------------------------------------------------------ node selection


def test_a_node_whose_first_reply_was_slow_gets_traffic_again(pki: PKI, lying: Lying) -> None:
    """Power-of-two-choices on a real node whose first reply is slow (it sleeps 1 s once).

    The latency estimate moves only when a node is picked, so a node that lost every
    comparison after one slow reply was never picked again. With the estimate decaying
    while a node is idle (`routing.ewma_decay_s`), traffic tries it again and learns it is
    fast. Control, built the same way: with a decay too slow to matter, it gets nothing."""
    inputs = (Tensor("input", "FP32", IRIS.shape, IRIS),)
    entry = Registry.open(lying.registry).get("iris")

    async def after_a_slow_first_reply(decay_s: float, requests: int) -> int:
        cfg = lying.config("slow-once", 1, routing={"ewma_decay_s": decay_s})
        creds = NodeCredentials(cfg.tls.node_ca, cfg.tls.node_client_cert, cfg.tls.node_client_key)
        clients = [NodeClient(n, creds.channel_credentials()) for n in cfg.nodes]
        router = Router.from_clients(clients, MemoryStore(), cfg.routing)

        def job() -> Job:
            return Job(entry, inputs, (), time.monotonic() + 30, lambda n: True, "t")

        try:
            honest = next(n for n in router.nodes if n != "liar")
            await router.infer(job(), only=lambda n: n.name == honest)
            first = await router.infer(job(), only=lambda n: n.name == "liar")
            assert first.node.name == "liar"
            assert (lying.control / "kind").read_text() == "honest"  # it was the slow one
            liar = router.nodes["liar"]
            for _ in range(requests):
                await router.infer(job())
                if liar.attempts > 1:
                    break
                await asyncio.sleep(0.01)
            return liar.attempts - 1
        finally:
            await router.close()

    assert asyncio.run(after_a_slow_first_reply(1e9, 30)) == 0  # control: out for good
    assert asyncio.run(after_a_slow_first_reply(0.2, 500)) >= 1
