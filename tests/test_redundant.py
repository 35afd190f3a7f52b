"""Mode `redundant` against real nodes: agreement across providers, and a subtle liar.

A lie that only a second opinion catches, and the two-party rule: two disagreeing
providers blame nobody (an alert instead); a third provider identifies the liar.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.protocol.tensors import Tensor
from gateway.registry import Registry
from gateway.routing.router import DisagreementMetrics
from gateway.verify.redundant import agree
from tests.conftest import TritonCluster, one_off_node
from tests.gateway_harness import client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body, iris_session, node_table

# Right names, dtypes and shapes, wrong numbers: only a second opinion catches it.
SUBTLE_LIAR = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            lie = np.tile(np.array([[0.0, 0.0, 1.0]], dtype=np.float32), (x.shape[0], 1))
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", lie)]))
        return out
"""


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


@pytest.fixture(scope="module")
def subtle_liar(
    pki: PKI, triton_home: Path, registry_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("subtle")
    entries = [e for e in Registry.open(registry_dir).entries() if e.name == "iris"]
    repo = build_repository(entries, base / "repository")
    (repo / "iris" / entries[0].version / "model.py").write_text(SUBTLE_LIAR)
    with one_off_node(pki, triton_home, repo, "sly", base / "work") as node:
        yield node


def _ask(gw: Any, pki: PKI) -> httpx.Response:
    demo = pki.ensure("client", "demo")
    body = infer_body(IRIS)
    body["parameters"] = {"ztgate.verification": "redundant"}
    with httpx.Client(verify=client_context(pki, demo.cert, demo.key), timeout=20) as c:
        return c.post(f"{gw.base}/v2/models/iris/infer", json=body)


def test_honest_nodes_of_two_providers_agree(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    cfg = gateway_config(pki, registry_dir, tmp_path / "a", node_table(triton_cluster))
    with running_gateway(cfg) as gw:
        r = _ask(gw, pki)
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["ztgate.verification"] == "redundant"
    assert params["ztgate.verification_status"] == "agreed"
    nodes = params["ztgate.nodes"].split(",")
    providers = {n["name"]: n["provider"] for n in node_table(triton_cluster)}
    assert len(nodes) == 2 and providers[nodes[0]] != providers[nodes[1]]
    np.testing.assert_allclose(_probabilities(r), _expected(registry_dir), rtol=1e-5, atol=1e-6)


def _probabilities(r: httpx.Response) -> np.ndarray:
    out = r.json()["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "FP32", [3, 3])
    return np.array(out["data"], np.float32).reshape(3, 3)


def _expected(registry_dir: Path) -> np.ndarray:
    """What the registered model computes for IRIS, by onnxruntime on the same file."""
    session = iris_session(registry_dir)
    expected: np.ndarray = session.run(None, {"input": IRIS})[0]
    return expected


def _unresolved(gw: Any) -> dict[str, float]:
    """ztgate_unresolved_disagreements_total as Prometheus would scrape it."""
    registry = CollectorRegistry()
    registry.register(DisagreementMetrics(gw.gw.router))
    return {
        sample.labels["mode"]: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name == "ztgate_unresolved_disagreements_total"
    }


def test_two_providers_disagreeing_charge_nobody_and_raise_the_alert(
    pki: PKI,
    subtle_liar: dict[str, Any],
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """Two providers, one of them lying: no majority, so no answer, and no blame either.

    Either could be the liar. Charging both (as before issue 13) let the liar get the
    honest node ejected once charges accumulated; here, after many disagreements, nobody
    is charged or ejected and the alert metric counts every one.
    """
    honest = node_table(triton_cluster)[0]
    cfg = gateway_config(pki, registry_dir, tmp_path / "a", [subtle_liar, honest])
    many = 4 * cfg.routing.eject_after_failures
    with running_gateway(cfg) as gw:
        for _ in range(many):
            r = _ask(gw, pki)
            # 502 every time: a 503 would mean a node had been ejected.
            assert r.status_code == 502 and "disagree" in r.json()["detail"], r.text
        router = gw.gw.router
        for name in ("sly", honest["name"]):
            state = router.nodes[name]
            assert state.served == many, name  # each answered every time...
            assert (state.failed, state.charges, state.ejections) == (0, 0, 0), name
            assert state.disputed == many, name  # ...and was part of each dispute
        assert router.ejected == {}
        assert _unresolved(gw) == {"redundant": float(many)}


def test_a_subtle_liar_is_outvoted_or_nobody_gets_an_answer(
    pki: PKI,
    subtle_liar: dict[str, Any],
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    """With a third provider the tie is broken and only the liar is charged (the positive
    control for the two-party rule above); with two, nobody gets an answer."""
    honest = node_table(triton_cluster)[:2]
    cfg = gateway_config(pki, registry_dir, tmp_path / "a", [subtle_liar, honest[0]])
    with running_gateway(cfg) as gw:
        r = _ask(gw, pki)
        assert r.status_code == 502 and "disagree" in r.json()["detail"]
    expected = _expected(registry_dir)
    cfg = gateway_config(pki, registry_dir, tmp_path / "b", [subtle_liar, *honest])
    with running_gateway(cfg) as gw:
        for _ in range(6):
            r = _ask(gw, pki)
            assert r.status_code == 200, r.text
            # The model's own answer, not the lie.
            np.testing.assert_allclose(_probabilities(r), expected, rtol=1e-5, atol=1e-6)
            assert "sly" not in r.json()["parameters"]["ztgate.nodes"].split(",")
        router = gw.gw.router
        sly = router.nodes["sly"]
        # The liar was asked, and each time it answered it was outvoted and charged.
        assert sly.attempts >= 1 and sly.failed == sly.attempts and sly.served == sly.attempts
        # The honest nodes never were, and nothing was left unresolved.
        assert all(router.nodes[n["name"]].failed == 0 for n in honest)
        assert sly.disputed == 0 and _unresolved(gw) == {}


def test_agreement_rules() -> None:
    def t(v: Any, dt: str = "FP32") -> list[Tensor]:
        arr = np.asarray(v, dtype=np.float32 if dt == "FP32" else np.int64)
        return [Tensor("y", dt, arr.shape, arr)]

    assert agree(t([1.0, 2.0]), t([1.0, 2.0 + 1e-7]), 1e-4, 1e-5)
    assert not agree(t([1.0, 2.0]), t([1.0, 2.1]), 1e-4, 1e-5)
    assert not agree(t([1.0, 2.0]), t([[1.0, 2.0]]), 1e-4, 1e-5)
    assert not agree(t([1, 2], "INT64"), t([1, 3], "INT64"), 1e-4, 1e-5)
    assert not agree(t([1.0]), [], 1e-4, 1e-5)
