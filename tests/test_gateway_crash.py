"""Killing the gateway process right after it answered 200 loses no receipt."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from gateway.cluster import LocalCluster
from gateway.ports import free_port, wait_ready
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import SignedReceipt
from tests.test_gateway import IRIS, infer_body


def test_sigkill_right_after_a_200_loses_no_receipt(tmp_path: Path) -> None:
    cluster = LocalCluster(
        tmp_path / "c", 1, gateway_port=free_port(), admin_port=free_port(), with_zk=False,
        with_mpc=False,
    )  # fmt: skip
    cluster.start()
    try:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cluster.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            ready = f"http://127.0.0.1:{cluster.admin_port}/v2/health/ready"
            assert wait_ready(ready, 60, gateway), "gateway not ready"
            pki = cluster.root / "pki"
            ctx = ssl.create_default_context(cafile=str(pki / "root" / "ca.crt"))
            ctx.load_cert_chain(pki / "clients/demo/client.crt", pki / "clients/demo/client.key")
            ids = []
            with httpx.Client(verify=ctx, timeout=10) as c:
                for _ in range(5):
                    r = c.post(
                        f"https://127.0.0.1:{cluster.gateway_port}/v2/models/iris/infer",
                        json=infer_body(IRIS),
                    )
                    assert r.status_code == 200
                    ids.append(r.json()["parameters"]["ztgate.receipt_id"])
            os.killpg(gateway.pid, signal.SIGKILL)  # at once: no shutdown, no final checkpoint
            gateway.wait(timeout=10)
        finally:
            if gateway.poll() is None:
                os.killpg(gateway.pid, signal.SIGKILL)
                gateway.wait(timeout=10)
        logs_dir = cluster.root / "data" / "receipts"
        found = set()
        for path in ReceiptLog.all_logs(logs_dir):
            log = ReceiptLog.open_readonly(path)
            for rid in ids:
                stored = log.body(rid)
                if stored is not None:
                    # The body kept is the receipt the client was given, not just a row.
                    assert SignedReceipt.from_bytes(stored.body).receipt.receipt_id == rid
                    found.add(rid)
            asyncio.run(log.close())
        assert found == set(ids)
    finally:
        cluster.stop()
