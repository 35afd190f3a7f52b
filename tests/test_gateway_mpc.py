"""Mode mpc through the configured gateway: config -> parties -> policy -> receipt."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from gateway.pki import PKI
from tests.conftest import SITE, TritonCluster
from tests.gateway_harness import client_context, gateway_config, running_gateway
from tests.test_gateway import infer_body, node_table
from tests.test_mpc import start_parties


def our_dealers() -> set[int]:
    """Live MPC dealer processes this test process started (the gateway runs in it)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if b"mpc.dealer" in cmd and stat[0] not in ("Z", "X") and int(stat[1]) == os.getpid():
            found.add(int(entry.name))
    return found


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
        earlier_dealers = our_dealers()
        with running_gateway(cfg) as gw:
            assert "mpc" in gw.gw.verifiers
            ctx = client_context(pki, carol.cert, carol.key)
            url = f"{gw.base}/v2/models/risk/infer"
            with httpx.Client(verify=ctx, timeout=60) as c:
                r = c.post(url, json=body)
                assert r.status_code == 200, r.text
                session_dealer = our_dealers() - earlier_dealers
                assert len(session_dealer) == 1  # the session stays up for the next request
                # The same caller asking for plain inference of the restricted model: denied.
                plain = {
                    **body,
                    "parameters": {**body["parameters"], "ztgate.verification": "none"},
                }
                denied = c.post(url, json=plain)
                assert denied.status_code == 403, denied.text
                assert "mode 'none' is not allowed" in denied.json()["detail"], denied.text
                rid = r.json()["parameters"]["ztgate.receipt_id"]
                receipt = c.get(f"{gw.base}/v2/receipts/{rid}").json()["receipt"]
                # n2's party dies between requests. The next request finds the session
                # broken: 503, and that session's dealer is stopped.
                parties[1].proc.kill()
                parties[1].proc.wait(10)
                broken = c.post(url, json=body)
                assert broken.status_code == 503, broken.text
                assert broken.headers["retry-after"] == "1"
                assert "MPC session failed" in broken.json()["detail"], broken.text
                assert not our_dealers() & session_dealer
                # The one after cannot start a session without n2: 503, no dealer left.
                again = c.post(url, json=body)
                assert again.status_code == 503, again.text
                assert "could not start an MPC session" in again.json()["detail"], again.text
                assert our_dealers() == earlier_dealers
        params = r.json()["parameters"]
        assert params["ztgate.verification_status"] == "semi-honest-mpc"
        assert sorted(params["ztgate.nodes"].split(",")) == ["n1", "n2"]
        assert receipt["verification"]["mode"] == "mpc"
        assert receipt["verification"]["result"] == "semi-honest-mpc"
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
