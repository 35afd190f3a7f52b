"""Mode mpc through the configured gateway: config -> parties -> policy -> receipt."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from gateway.pki import PKI
from tests.conftest import SITE, TritonCluster
from tests.gateway_harness import client_context, gateway_config, running_gateway
from tests.test_gateway import infer_body, node_table
from tests.test_mpc import start_parties


def test_restricted_model_answers_only_under_mpc_through_the_gateway(
    pki: PKI, triton_cluster: TritonCluster, triton_repository: Path, tmp_path: Path
) -> None:
    registry = triton_repository.parent / "registry"
    parties = start_parties(pki, ["n1", "n2"], tmp_path / "parties")
    try:
        address = {p.name: p.address for p in parties}
        nodes = [
            {**n, "mpc_address": address[n["name"]]} if n["name"] in address else n
            for n in node_table(triton_cluster)
        ]
        dealer_cert, dealer_key = pki.leaf_paths("dealer", "dealer", SITE)
        cfg = gateway_config(
            pki,
            registry,
            tmp_path / "data",
            nodes,
            mpc={"dealer_cert": str(dealer_cert), "dealer_key": str(dealer_key)},
        )
        x = np.array([[0.3, 1.2, -0.5, 0.8, 0.0, 1.5], [1.0, -1.0, 0.5, 0.2, 2.0, 0.1]], np.float32)
        carol = pki.ensure("client", "carol")  # cleared, clearance 3 (identities.json)
        body = infer_body(x)
        body["parameters"] = {"ztgate.verification": "mpc", "ztgate.purpose": "test"}
        with running_gateway(cfg) as gw:
            assert "mpc" in gw.gw.verifiers
            ctx = client_context(pki, carol.cert, carol.key)
            with httpx.Client(verify=ctx, timeout=60) as c:
                r = c.post(f"{gw.base}/v2/models/risk/infer", json=body)
                assert r.status_code == 200, r.text
                # The same caller asking for plain inference of the restricted model: denied.
                body["parameters"]["ztgate.verification"] = "none"
                assert c.post(f"{gw.base}/v2/models/risk/infer", json=body).status_code == 403
                rid = r.json()["parameters"]["ztgate.receipt_id"]
                receipt = c.get(f"{gw.base}/v2/receipts/{rid}").json()["receipt"]
        params = r.json()["parameters"]
        assert params["ztgate.verification_status"] == "semi-honest-mpc"
        assert sorted(params["ztgate.nodes"].split(",")) == ["n1", "n2"]
        assert receipt["verification"] == {"mode": "mpc", "result": "semi-honest-mpc"} | {
            k: v for k, v in receipt["verification"].items() if k not in ("mode", "result")
        }
        assert sorted(receipt["nodes"]) == ["n1", "n2"]
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 1)
        session = ort.InferenceSession(
            str(next(registry.glob("models/risk/*/model.onnx"))),
            providers=["CPUExecutionProvider"],
        )
        expected = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-2)
    finally:
        for p in parties:
            p.stop()
