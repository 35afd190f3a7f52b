"""Node start-up time and iris latency over gRPC mTLS: kept-open channel vs fresh TLS each call.

Run: ``.venv/bin/python bench/node_latency.py [--requests 500] [--concurrency 8]``

Everything (dev PKI, registry, repository, tritonserver home) lives in a temp dir and the node
is stopped at the end. The client side runs in this process, so on a small machine the two
share the CPU: read the figures as relative, not as a capacity plan.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from gateway.node.repository import build_repository
from gateway.node.triton import NodeSpec, TritonProcess, triton_home
from gateway.pki import PKI
from gateway.ports import free_port
from gateway.registry import Registry, seed_examples

SITE = "site-a"


class Target:
    """How to reach the node as the gateway does: node CA as root, pinned DNS name, own cert."""

    def __init__(self, address: str, dns_name: str, root: Path, cert: Path, key: Path) -> None:
        self.address, self.dns_name = address, dns_name
        self.root, self.cert, self.key = root, cert, key
        x = np.random.default_rng(0).normal(5.0, 2.0, size=(1, 4)).astype(np.float32)
        self.x = x

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(
            self.address,
            ssl=True,
            root_certificates=str(self.root),
            private_key=str(self.key),
            certificate_chain=str(self.cert),
            channel_args=[
                ("grpc.ssl_target_name_override", self.dns_name),
                # Without this, grpc shares subchannels between "fresh" clients in one process
                # and the fresh-connection figures would silently measure a reused one.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )

    def infer(self, client: grpcclient.InferenceServerClient) -> None:
        inp = grpcclient.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(self.x)
        out = grpcclient.InferRequestedOutput("probabilities")
        client.infer("iris", [inp], outputs=[out], client_timeout=10)

    def infer_fresh(self) -> None:
        client = self.client()
        try:
            self.infer(client)
        finally:
            client.close()


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sequential(fn: Callable[[], None], n: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    lat = [timed(fn) for _ in range(n)]
    return lat, time.perf_counter() - t0


def concurrent(fn: Callable[[], None], n: int, workers: int) -> tuple[list[float], float]:
    lat: list[float] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        dt = timed(fn)
        with lock:
            lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return lat, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500, help="per kept-open run")
    ap.add_argument("--fresh-requests", type=int, default=150, help="per fresh-connection run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="ztgate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki = PKI.init(tmp / "pki", sites=[SITE])
        registry = Registry.open(tmp / "registry")
        seed_examples(registry)
        repo = build_repository([e for e in registry.entries() if e.name == "iris"], tmp / "repo")
        home = triton_home(tmp / "home")
        issued = pki.ensure("node", "bench")
        spec = NodeSpec(
            name="bench",
            region="local",
            provider="local",
            grpc_port=free_port(),
            http_port=free_port(),
            repository=repo,
            cert=issued.cert,
            key=issued.key,
            client_ca=pki.gateway_ca_bundle(SITE),
            workdir=tmp / "node",
        )
        proc = TritonProcess(spec, home)
        starts, stops = [], []
        try:
            for _ in range(args.starts):
                starts.append(proc.start(deadline_s=60))
                stops.append(timed(proc.stop))
            proc.start(deadline_s=60)
            gw_cert, gw_key = pki.leaf_paths("gateway-node-client", SITE, SITE)
            target = Target(
                spec.grpc_address, pki.node_dns_name("bench"), pki.node_ca_bundle(), gw_cert, gw_key
            )
            kept = target.client()
            for _ in range(50):  # warm-up: first calls pay for the handshake and the stub's JIT
                target.infer(kept)

            def kept_call() -> None:
                target.infer(kept)

            runs = {
                "seq, kept-open": sequential(kept_call, args.requests),
                "seq, fresh TLS/request": sequential(target.infer_fresh, args.fresh_requests),
                f"c={args.concurrency}, kept-open (1 channel)": concurrent(
                    kept_call, args.requests, args.concurrency
                ),
                f"c={args.concurrency}, fresh TLS/request": concurrent(
                    target.infer_fresh, args.fresh_requests, args.concurrency
                ),
            }
            kept.close()
        finally:
            proc.stop()

    rows = []
    print(f"\nnode start-to-ready ({args.starts} starts, iris only, python backend):")
    print("  " + ", ".join(f"{s:.2f}s" for s in starts) + f"   (stop: {max(stops):.2f}s max)")
    print(f"\n{'mode':<34}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'req/s':>9}")
    for mode, (lat, wall) in runs.items():
        row = {
            "mode": mode,
            "n": len(lat),
            "p50_ms": pct(lat, 0.50) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3,
            "rps": len(lat) / wall,
        }
        rows.append(row)
        print(
            f"{mode:<34}{row['n']:>6}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{row['mean_ms']:>9.2f}{row['rps']:>9.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"starts_s": starts, "stops_s": stops, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
