"""MPC latency and bytes: the gateway path (`MpcSession`) vs raw CrypTen, side by side.

Run: ``.venv/bin/python bench/mpc.py [--model risk|iris|mnist] [--requests 20]``

Both paths run in the same two party processes, on the same TLS transport (`mpc.comm`),
with the same dealer, model and batch, alternating request by request:

- gateway: the coordinator secret-shares the input, each party computes on its share and
  returns its output share, the coordinator adds them (what `MpcVerification` does);
  latency is measured at the coordinator, call to plaintext.
- raw: CrypTen's usual flow inside the parties: party 0 encrypts a plaintext input of the
  same shape (``crypten.cryptensor(x, src=0)``; weights likewise, once), the same ops, and
  ``get_plain_text()`` among the parties; latency is party 0's wall time for that.

Bytes are per party per request: ``mesh`` (to/from the other party and the dealer) and
``gw`` (to/from the gateway). Everything lives in a temp dir and is stopped at the end.
On a 2-core machine the coordinator and both parties share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.pki import PKI  # noqa: E402
from mpc.model import MpcModel  # noqa: E402
from mpc.session import MpcSession, MpcSettings, PartyEndpoint  # noqa: E402

# Requests with an even id run the raw CrypTen path inside the party workers.
WORKER = r"""
import sys, time, torch
from mpc import party
from mpc.crypten_shim import crypten
from mpc.worker_args import build_parser, config_from_args

class BenchWorker(party.PartyWorker):
    raw_weights = None

    def infer(self, session, comm, weights, msg):
        if int(msg["id"]) % 2:
            return super().infer(session, comm, weights, msg)
        plan, control = session.plan, session.control
        batch = int(msg["batch"])
        control.recv(plan.message_timeout_s)  # the gateway's share: unused on this path
        mesh = [*session.peers.values(), session.dealer]
        s0, r0 = sum(x.sent for x in mesh), sum(x.received for x in mesh)
        t0 = time.perf_counter()
        if self.raw_weights is None:
            self.raw_weights = {
                k: crypten.cryptensor(torch.randn(*shape) * 0.3, src=0)
                for k, shape in plan.weight_shapes.items()
            }
        x = crypten.cryptensor(torch.randn(batch, plan.input_dim), src=0)
        y = party.run_program(x, self.raw_weights, plan.program).get_plain_text()
        stats = {
            "raw_s": time.perf_counter() - t0,
            "mesh_sent": sum(x.sent for x in mesh) - s0,
            "mesh_received": sum(x.received for x in mesh) - r0,
        }
        control.send_json({"type": "output", "id": msg.get("id"), "stats": stats})
        control.send_tensor(torch.zeros(batch, plan.output_dim, dtype=torch.long).numpy())

sys.exit(party.run_worker(config_from_args(build_parser().parse_args()), BenchWorker))
"""


def start_parties(pki: PKI, base: Path) -> tuple[list[subprocess.Popen[str]], list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs, addrs = [], []
    for name in ("n1", "n2"):
        pki.ensure("node", name)
        cmd = [sys.executable, "-c", WORKER, "--name", name, "--pki", str(pki.root)]
        log = (base / f"{name}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env))
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if "LISTENING" not in line:
            raise RuntimeError(f"party did not start; see {base}")
        addrs.append(line.split()[-1])
    return procs, addrs


def summarise(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:7.1f} ms (mean {statistics.mean(xs) * 1e3:6.1f})"


async def bench(model: MpcModel, settings: MpcSettings, addrs: list[str], requests: int) -> None:
    eps = [PartyEndpoint("n1", addrs[0], "prov-a"), PartyEndpoint("n2", addrs[1], "prov-b")]
    t0 = time.perf_counter()
    session = await MpcSession.start(model, eps, settings)
    print(f"session start (dealer, TLS mesh, weight sharing): {time.perf_counter() - t0:.2f} s")
    rng = np.random.default_rng(0)
    rows: list[tuple[int, str, str, float, dict[str, Any], dict[str, Any]]] = []
    try:
        for batch in (1, 64):
            gw: list[float] = []
            raw: list[float] = []
            gw_bytes: dict[str, Any] = {}
            raw_bytes: dict[str, Any] = {}
            for i in range(2 * requests + 4):  # 4 warm-up requests (2 of each path)
                x = rng.normal(size=(batch, model.input_dim))
                is_raw = (session.requests + 1) % 2 == 0
                t = time.perf_counter()
                result = await session.infer(x)
                dt = time.perf_counter() - t
                if i < 4:
                    continue
                if is_raw:
                    raw.append(float(result.party_stats["n1"]["raw_s"]))
                    raw_bytes = result.bytes_per_party
                else:
                    gw.append(dt)
                    gw_bytes = result.bytes_per_party
            ratio = statistics.median(gw) / statistics.median(raw)
            rows.append((batch, summarise(gw), summarise(raw), ratio, gw_bytes, raw_bytes))
    finally:
        await session.close()
    print(f"\nmodel {model.name}, 2 parties + dealer, TLS 1.3 mesh, {requests} requests each\n")
    print(f"{'batch':>5}  {'gateway path':>28}  {'raw CrypTen':>28}  ratio")
    for batch, g, r, ratio, _, _ in rows:
        print(f"{batch:>5}  {g:>28}  {r:>28}  {ratio:5.2f}x")
    print("\nbytes per party per request (mesh sent/received; gateway link in/out)")
    for batch, _, _, _, gb, rb in rows:
        for name in ("n1", "n2"):
            g, r = gb[name], rb[name]
            print(
                f"  batch {batch:>3} {name}: gateway path mesh {g['mesh_sent']}/"
                f"{g['mesh_received']} gw {g['from_gateway']}/{g['to_gateway']}   "
                f"raw mesh {r['mesh_sent']}/{r['mesh_received']}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="risk", choices=["risk", "iris", "mnist"])
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ztgate-mpc-bench-") as tmp:
        base = Path(tmp)
        pki = PKI.init(base / "pki")
        settings = MpcSettings.from_pki(pki.root, message_timeout_s=30.0)
        model = MpcModel.from_onnx(REPO / "gateway" / "examples" / f"{args.model}.onnx")
        procs, addrs = start_parties(pki, base)
        try:
            asyncio.run(bench(model, settings, addrs, args.requests))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
