"""Receipts from the running gateway: every answer and denial, readable by policy, and
verifiable offline by an auditor (with the client's salts) from an exported bundle."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.cli import main
from gateway.pki import PKI
from gateway.receipts.issue import verify_summary
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import SignedReceipt
from gateway.receipts.signing import KeySet
from tests.conftest import TritonCluster
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body, node_table


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path_factory.mktemp("gwr"),
        node_table(triton_cluster),
    )
    with running_gateway(cfg) as gw:
        yield gw


def client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=10)


def test_every_answer_carries_a_durable_signed_receipt(gateway: RunningGateway, pki: PKI) -> None:
    assert gateway.gw.receipts is not None
    keys = gateway.gw.receipts.keyset
    with client(pki, "demo") as demo:
        r = demo.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS))
    assert r.status_code == 200
    params = r.json()["parameters"]
    assert params["ztgate.receipt"] == r.headers["ztgate-receipt"]
    assert verify_summary(params["ztgate.receipt"], keys).ok
    assert len(params["ztgate.salt"]) >= 40  # 32 random bytes, base64
    rid = params["ztgate.receipt_id"]
    # Durable before the answer left: a second reader of the log's files finds the body,
    # and it is the receipt the summary signs, for this caller.
    reader = ReceiptLog.open_readonly(gateway.gw.receipts.log.path)
    try:
        stored = reader.body(rid)
    finally:
        asyncio.run(reader.close())
    assert stored is not None
    receipt = SignedReceipt.from_bytes(stored.body).receipt
    assert receipt.receipt_id == rid
    assert verify_summary(params["ztgate.receipt"], keys, receipt).ok
    assert receipt.client is not None and receipt.client.spiffe_id.endswith("/client/demo")
    tampered = params["ztgate.receipt"][:-4] + "AAAA"
    assert not verify_summary(tampered, keys).ok


def test_receipts_are_read_by_their_owner_or_an_auditor_only(
    gateway: RunningGateway, pki: PKI
) -> None:
    with client(pki, "demo") as demo:
        rid = demo.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS)).json()[
            "parameters"
        ]["ztgate.receipt_id"]
        own = demo.get(f"{gateway.base}/v2/receipts/{rid}")
        assert own.status_code == 200
        receipt = own.json()["receipt"]
        assert receipt["client"]["spiffe_id"].endswith("/client/demo")
        assert receipt["model"]["name"] == "iris" and receipt["verification"]["mode"] == "none"
        assert receipt["inputs"][0]["commitment"].startswith("sha256:")
        # No tensor data and no salt are kept in the receipt.
        assert '"data"' not in json.dumps(receipt) and '"salt"' not in json.dumps(receipt)
        assert demo.get(f"{gateway.base}/v2/receipts/not-an-id").status_code == 400
        assert demo.get(f"{gateway.base}/v2/receipts/zz.1.00").status_code == 400
        # Well formed, this log, but no such receipt: the nonce or the index is wrong.
        log_id, index, nonce = rid.split(".")
        for unknown in (f"{log_id}.{index}.{'0' * 16}", f"{log_id}.{10**9}.{nonce}"):
            missing = demo.get(f"{gateway.base}/v2/receipts/{unknown}")
            assert missing.status_code == 404, missing.text
    with client(pki, "alice") as alice:
        assert alice.get(f"{gateway.base}/v2/receipts/{rid}").status_code == 403
    with client(pki, "audrey") as auditor:
        assert auditor.get(f"{gateway.base}/v2/receipts/{rid}").status_code == 200
        # The log endpoints: hashes only, any verified caller.
        logs = auditor.get(f"{gateway.base}/log").json()["logs"]
        assert any(rid.startswith(entry["log_id"]) for entry in logs)


def test_denials_are_receipted_and_coalesced(gateway: RunningGateway, pki: PKI) -> None:
    with client(pki, "nobody") as nobody:
        first = nobody.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS))
        again = nobody.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS))
    assert first.status_code == again.status_code == 403
    summary = first.headers["ztgate-receipt"]
    assert summary.startswith("ztgate-receipt/v1 ")
    assert gateway.gw.receipts is not None
    assert verify_summary(summary, gateway.gw.receipts.keyset).ok
    # The second, identical denial points at the first one's receipt. Timing margin: the
    # coalescing window is 10 s, and two denials in a row take milliseconds.
    assert again.headers["ztgate-receipt"] == summary + "; coalesced"


def test_an_auditor_verifies_offline_with_the_clients_salts(
    gateway: RunningGateway, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.gw.receipts is not None
    x = np.array([[6.1, 2.8, 4.7, 1.2]], np.float32)
    with client(pki, "demo") as demo:
        r = demo.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(x))
    body = r.json()
    rid = body["parameters"]["ztgate.receipt_id"]
    out = body["outputs"][0]
    # Wait for a checkpoint to include it: a receipt is final once a checkpoint does.
    end = time.monotonic() + 10
    while gateway.gw.receipts.log.proof(int(rid.split(".")[1])) is None:
        assert time.monotonic() < end, "no checkpoint covered the receipt"
        time.sleep(0.1)
    log_dir = gateway.gw.receipts.log.path.parent
    bundle = tmp_path / "bundle"
    trust = tmp_path / "trust.json"
    assert main(["audit", "export", "--log-dir", str(log_dir), str(bundle)]) == 0
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(log_dir)]) == 0
    trust.write_text(capsys.readouterr().out)
    salts = {
        rid: {
            "salt": body["parameters"]["ztgate.salt"],
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}
            ],
            "outputs": [out],
        }
    }
    (tmp_path / "salts.json").write_text(json.dumps(salts))
    capsys.readouterr()
    assert (
        main(
            [
                "verify",
                str(bundle),
                "--trust",
                str(trust),
                "--salts",
                str(tmp_path / "salts.json"),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "valid"
    mine = [f["status"] for f in report["findings"] if f["subject"] == f"receipt {rid}"]
    assert mine == ["valid"]
    # A client who misremembers what it sent is told so.
    salts[rid]["inputs"][0]["data"][0] = 9.9
    (tmp_path / "salts.json").write_text(json.dumps(salts))
    capsys.readouterr()
    assert (
        main(
            [
                "verify",
                str(bundle),
                "--trust",
                str(trust),
                "--salts",
                str(tmp_path / "salts.json"),
                "--json",
            ]
        )
        == 1
    )
    report = json.loads(capsys.readouterr().out)
    wrong = [
        (f["subject"], f["code"], f["reason"]) for f in report["findings"] if f["status"] != "valid"
    ]
    assert wrong == [
        (f"receipt {rid}", "commitment-mismatch", "input 'input' does not match its commitment")
    ]
    # The exported key set holds the key that signed this receipt.
    key_id = body["parameters"]["ztgate.receipt"].split(" ")[3]
    assert KeySet.load(log_dir / "keys.json").get(key_id) is not None


def test_configured_witness_cosigns_and_the_auditor_can_require_it(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import threading

    import uvicorn

    from gateway.cli.witness import load_witness
    from gateway.pki import load_signing_key
    from gateway.receipts.canonical import b64
    from gateway.receipts.signing import raw_public
    from gateway.receipts.witness import witness_app
    from tests.gateway_harness import free_port

    name = "witness.example/w1"
    log_pub = b64(raw_public(load_signing_key(pki.key_path("log-checkpoint")).public_key()))
    capsys.readouterr()
    args = ["witness", "init", "--dir", str(tmp_path / "w"), "--name", name]
    assert main([*args, "--trust-log", f"ztgate.local/={log_pub}"]) == 0
    vkey = capsys.readouterr().out.strip()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            witness_app(load_witness(tmp_path / "w")),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # Bound before the gateway picks its own free ports, or they could collide.
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "witness did not start"
        time.sleep(0.02)
    try:
        cfg = gateway_config(
            pki,
            triton_repository.parent / "registry",
            tmp_path / "data",
            node_table(triton_cluster),
            receipts={"witnesses": [[vkey, f"http://127.0.0.1:{port}"]]},
        )
        with running_gateway(cfg) as gw, client(pki, "demo") as demo:
            r = demo.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
            assert r.status_code == 200
            assert gw.gw.receipts is not None
            log_dir = gw.gw.receipts.log.path.parent
            end = time.monotonic() + 15
            while True:  # the checkpointer signs, then pushes to the witness
                note = gw.gw.receipts.log.latest_checkpoint()
                if note is not None and name in note.render():
                    break
                assert time.monotonic() < end, "the witness never cosigned"
                time.sleep(0.2)
        capsys.readouterr()
        assert main(["audit", "trust", "--log-dir", str(log_dir)]) == 0
        trust = json.loads(capsys.readouterr().out)
        trust["witnesses"] = [{"vkey": vkey}]  # obtained out of band from the witness
        (tmp_path / "trust.json").write_text(json.dumps(trust))
        bundle = tmp_path / "bundle"
        assert main(["audit", "export", "--log-dir", str(log_dir), str(bundle)]) == 0
        verify = ["verify", str(bundle), "--trust", str(tmp_path / "trust.json")]
        assert main([*verify, "--require-witness", name]) == 0
        capsys.readouterr()
        assert main([*verify, "--require-witness", "witness.example/absent"]) == 2
        err = capsys.readouterr().err
        assert "required witness 'witness.example/absent' is not in the trust file" in err
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_replica_sends_readers_of_another_replicas_log_to_it(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path: Path,
    redis_server: str,
) -> None:
    from tests.gateway_harness import free_port

    ports = {name: free_port() for name in ("a", "b", "c")}
    urls = {name: f"https://127.0.0.1:{port}" for name, port in ports.items()}

    def cfg(name: str, replicas: tuple[str, ...] = (urls["a"], urls["b"])) -> Any:
        return gateway_config(
            pki,
            triton_repository.parent / "registry",
            tmp_path / name,
            node_table(triton_cluster),
            listen={"port": ports[name]},
            state={"redis_url": redis_server},
            receipts={"public_url": urls[name], "replicas": list(replicas)},
        )

    with running_gateway(cfg("a")) as a, running_gateway(cfg("b")) as b:
        with client(pki, "demo") as demo:
            rid = demo.post(f"{a.base}/v2/models/iris/infer", json=infer_body(IRIS)).json()[
                "parameters"
            ]["ztgate.receipt_id"]
            log_id = rid.split(".")[0]
            assert b.gw.receipts is not None and b.gw.receipts.log.log_id != log_id
            moved = demo.get(f"{b.base}/v2/receipts/{rid}")
            assert moved.status_code == 307
            assert moved.headers["location"] == f"{a.base}/v2/receipts/{rid}"
            assert demo.get(moved.headers["location"]).status_code == 200
            cp = demo.get(f"{b.base}/log/{log_id}/checkpoint")
            assert cp.status_code == 307
            assert cp.headers["location"] == f"{a.base}/log/{log_id}/checkpoint"
            # A log nobody announced is simply not found.
            assert demo.get(f"{b.base}/log/unknownlog/checkpoint").status_code == 404
            # A replica whose configuration does not list a's URL is not sent there, even
            # though the shared store names it.
            with running_gateway(cfg("c", replicas=(urls["c"],))) as c:
                assert demo.get(f"{c.base}/v2/receipts/{rid}").status_code == 404
                assert demo.get(f"{c.base}/log/{log_id}/checkpoint").status_code == 404


def test_a_receipt_verifies_exactly_as_the_api_returns_it(
    gateway: RunningGateway, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a client holds (the body of GET /v2/receipts/{id}, saved as is or pretty-printed,
    and the response's summary line) goes to `ztgate verify` unchanged; a file of another
    kind is a usage error (exit 2), never INVALID."""
    assert gateway.gw.receipts is not None
    log_dir = gateway.gw.receipts.log.path.parent
    trust = tmp_path / "trust.json"
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(log_dir)]) == 0
    trust.write_text(capsys.readouterr().out)
    with client(pki, "demo") as demo:
        answer = demo.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS))
        rid = answer.json()["parameters"]["ztgate.receipt_id"]
        body = demo.get(f"{gateway.base}/v2/receipts/{rid}")
        deadline = time.monotonic() + 30  # hang guard: checkpoints come every second
        while body.json()["inclusion_proof"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
            body = demo.get(f"{gateway.base}/v2/receipts/{rid}")
    as_returned = tmp_path / "as-returned.json"
    as_returned.write_bytes(body.content)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(body.json(), indent=2, sort_keys=False))
    line = tmp_path / "summary.txt"
    line.write_text(answer.headers["ztgate-receipt"] + "\n")

    def verify(path: Path) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["verify", str(path), "--trust", str(trust)])
        return code, capsys.readouterr().out

    for held in (as_returned, pretty):
        code, out = verify(held)
        assert code == 0, out
        assert "VALID" in out
    code, out = verify(line)
    assert code == 0 and "signature-only" in out, out
    # The same forms, altered, are INVALID: a changed receipt field, a forged summary.
    doc = body.json()
    doc["receipt"]["model"]["name"] = "mnist"
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(doc))
    code, out = verify(altered)
    assert code == 1 and "bad-signature" in out, out
    forged = tmp_path / "forged.txt"
    forged.write_text(answer.headers["ztgate-receipt"][:-6] + "AAAAAA\n")
    code, out = verify(forged)
    assert code == 1, out
    # Not a receipt at all: usage errors.
    for name, data in (("notes.txt", b"hello\n"), ("other.json", b'{"logs": []}')):
        wrong = tmp_path / name
        wrong.write_bytes(data)
        capsys.readouterr()
        assert main(["verify", str(wrong), "--trust", str(trust)]) == 2
        assert "not a receipt" in capsys.readouterr().err


def test_a_replica_is_not_ready_until_its_receipt_logs_are_announced(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes sends no traffic to a replica before /readyz: with receipts.public_url set,
    that is only once the shared store says where this replica's receipt logs are, so a
    receipt signed here can be read through any replica from its first answer on."""
    from gateway.runtime import build_gateway, close_unserved
    from gateway.state import StoreUnavailable
    from tests.conftest import example_entries

    example_entries(tmp_path)
    url = "https://ztgate-gateway-0.ztgate-gateway.ztgate.svc:8443"
    cfg = gateway_config(
        pki, tmp_path / "registry", tmp_path / "data", [], receipts={"public_url": url}
    )
    gw = build_gateway(cfg)
    try:
        assert gw.announces_logs and gw.receipts is not None
        log_id = gw.receipts.log.log_id
        # No nodes here: only the announcement is left to decide readiness.
        monkeypatch.setattr(gw.router, "candidates", lambda _model: ["a node"])
        publish = gw.store.publish_log
        down = {"publish": True}

        async def flaky_publish(log: str, where: str) -> None:
            if down["publish"]:
                raise StoreUnavailable("publish refused")
            await publish(log, where)

        monkeypatch.setattr(gw.store, "publish_log", flaky_publish)

        async def scenario() -> None:
            assert not gw.ready()  # built, never announced
            assert await gw.check_state()  # the store answers pings, but not the publish
            assert not gw.logs_announced and not gw.ready()
            assert await gw.store.find_log(log_id) is None
            down["publish"] = False
            assert await gw.check_state()  # retried on the next probe, not a minute later
            assert gw.logs_announced and gw.ready()
            assert await gw.store.find_log(log_id) == url

        asyncio.run(scenario())
    finally:
        close_unserved(gw)
    # Without a public URL there is nothing to announce, and readiness does not wait on it.
    single = build_gateway(gateway_config(pki, tmp_path / "registry", tmp_path / "data", []))
    try:
        monkeypatch.setattr(single.router, "candidates", lambda _model: ["a node"])
        assert not single.announces_logs and single.ready()
    finally:
        close_unserved(single)
