"""An edge site reconciling its offline receipts with the core over a poor link (issue 17).

The edge's log holds N real signed receipts issued while the link was cut (the same
`issue()` the gateway uses, each ~0.9 KiB of canonical JSON); the core is a witness with
a vault served by uvicorn; between them the project's fault proxy, throttled. Measured:
bytes on the wire each way, and the time from the link's restoration to a checkpoint
the core has cosigned with every leaf and body stored.

Run: ``.venv/bin/python bench/ddil_reconcile.py [--receipts 10000] [--kbit 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway import ports
from gateway.faultproxy import FaultProxy
from gateway.protocol.tensors import Tensor
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.issue import issue
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import ClientRef, ModelRef, PolicyRef, VerificationRef
from gateway.receipts.note import Checkpoint
from gateway.receipts.signing import Signer
from gateway.receipts.vault import Vault
from gateway.receipts.witness import TrustedLog, Witness, witness_app

ORIGIN = "ztgate.local/edge-1/receipts"


async def run(receipts: int, kbit: float, tmp: Path) -> dict[str, object]:
    log_key = ed25519.Ed25519PrivateKey.generate()
    receipt_key = ed25519.Ed25519PrivateKey.generate()
    rl = ReceiptLog.open(tmp / "edge", log_key, ORIGIN)
    vault = Vault(tmp / "core" / "vault.db")
    core = Witness(
        "core.example/w",
        ed25519.Ed25519PrivateKey.generate(),
        [TrustedLog("ztgate.local/", log_key.public_key())],
        tmp / "core" / "state.json",
        vault=vault,
    )
    port = ports.free_port()
    server = uvicorn.Server(
        uvicorn.Config(witness_app(core), port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.ensure_future(server.serve())
    for _ in range(3000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    proxy = FaultProxy(("127.0.0.1", port))
    await proxy.start()
    client = WitnessClient(
        core.key, f"http://127.0.0.1:{proxy.port}", httpx.AsyncClient(timeout=60), vault=True
    )
    cpr = Checkpointer(lambda: rl, [client])
    try:
        proxy.cut()
        started = time.perf_counter()
        for i in range(receipts):
            x = np.array([[5.1, 3.5, 1.4, 0.2 + i % 7]], "<f4")
            await issue(
                rl,
                Signer(receipt_key),
                client=ClientRef(f"spiffe://ztgate.local/client/app-{i % 5}", f"{i:x}", "CN=CA"),
                model=ModelRef("iris", "1", "ab" * 32),
                inputs=[Tensor("input", "FP32", x.shape, x)],
                outputs=[Tensor("label", "INT64", (1,), np.array([i % 3], "<i8"))],
                policy=PolicyRef("sha256:" + "00" * 32, f"decision-{i}"),
                verification=VerificationRef("none", "unverified"),
                nodes=["spiffe://ztgate.local/node/edge-n1"],
                request_id=f"req-{i}",
            )
        issue_s = time.perf_counter() - started
        await cpr.tick()  # link down: signed locally, nothing reaches the core
        assert rl.witness_size(core.key.name) == 0
        body_bytes = sum(len(b.body) for b in rl.bodies())
        proxy.restore()
        proxy.throttle(kbit * 1000 / 8)
        restored = time.perf_counter()
        for _ in range(100):
            note = await cpr.tick()
            size = Checkpoint.parse_text(note.text).size
            if rl.witness_size(core.key.name) == size:
                break
        elapsed = time.perf_counter() - restored
        assert rl.witness_size(core.key.name) == rl.size
        return {
            "receipts": receipts,
            "leaves": rl.size,
            "link_kbit_s": kbit,
            "receipt_bodies_bytes": body_bytes,
            "bytes_up": proxy.stats.bytes_up,
            "bytes_down": proxy.stats.bytes_down,
            "upload_bytes_compressed": client.uploaded_bytes,
            "restore_to_cosigned_s": round(elapsed, 1),
            "issue_s": round(issue_s, 1),
            "vault_stored": vault.stored(rl.origin),
        }
    finally:
        await client.aclose()
        await proxy.close()
        server.should_exit = True
        await serving
        await rl.close()
        vault.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--receipts", type=int, default=10_000)
    ap.add_argument("--kbit", type=float, default=64.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.receipts, args.kbit, Path(tmp)))
    result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["machine"] = platform.machine()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
