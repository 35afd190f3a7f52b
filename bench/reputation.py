"""What catching liars costs: redundant and spot-checked `none` against plain `none`.

Run: ``.venv/bin/python bench/reputation.py [--requests 300] [--workers 8]``

Starts 3 real Triton nodes (3 providers, `gateway.cluster.LocalCluster`) and, in this
process, one gateway per variant on the same nodes:

- ``none``: plain mode none;
- ``none+spot5%``: mode none with spot checks at 5% for every node (the checks and their
  tiebreaks go through the same nodes, off the request path);
- ``redundant``: k = 2 (two providers agree; a third only on disagreement).

For each: sequential latency (p50, p99), throughput with `--workers` concurrent clients,
and node time: node attempts per answered request (spot checks included, counted once
the queue has drained). Redundant mode runs k = 2 (a third provider is asked only to
break a tie); k = 3 is not a mode option, so it is not measured here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.gateway_overhead import bench_identity, cluster_env  # noqa: E402
from gateway.config import ReputationConfig, load_config  # noqa: E402
from gateway.pki import PKI  # noqa: E402
from tests.gateway_harness import client_context, running_gateway  # noqa: E402

BODY = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}
REDUNDANT_POLICY = """
@id("bench-caller-redundant")
@rate("100000000/minute")
permit (principal in Ztgate::Group::"bench", action == Ztgate::Action::"infer", resource)
when { resource.classification == "public" && context.mode == "redundant" };
"""
VARIANTS: dict[str, tuple[str, ReputationConfig]] = {
    "none": ("none", ReputationConfig()),
    "none+spot5%": (
        "none",
        ReputationConfig(
            spot_checks=True, rate_suspect=0.05, rate_established=0.05, rate_trusted=0.05
        ),
    ),
    "redundant": ("redundant", ReputationConfig()),
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_variant(cluster: Any, name: str, n: int, workers: int) -> dict[str, Any]:
    mode, rep = VARIANTS[name]
    cfg = load_config(cluster.config_path)
    pol = dataclasses.replace(cfg.policy, pre_policy_rate="100000000/minute")
    cfg = dataclasses.replace(cfg, reputation=rep, policy=pol)
    pki = PKI.open(cluster.root / "pki")
    bench = pki.ensure("client", "bench")
    body = {**BODY, "parameters": {"ztgate.verification": mode}}
    with running_gateway(cfg) as gw:
        url = f"{gw.base}/v2/models/iris/infer"

        def one(c: httpx.Client) -> float:
            t0 = time.perf_counter()
            r = c.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
            return time.perf_counter() - t0

        ctx = client_context(pki, bench.cert, bench.key)
        with httpx.Client(verify=ctx, timeout=30) as c:
            for _ in range(20):
                one(c)
            before = sum(s.attempts for s in gw.gw.router.nodes.values())
            lat = [one(c) for _ in range(n)]

        def worker(k: int) -> int:
            with httpx.Client(verify=ctx, timeout=30) as c:
                for _ in range(k):
                    one(c)
            return k

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            done = sum(pool.map(worker, [n // workers] * workers))
        rps = done / (time.perf_counter() - t0)
        spot = getattr(gw.gw, "spot", None)
        if spot is not None:  # the gateway's loop runs in its own thread: poll
            deadline = time.monotonic() + 60
            while spot.queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        attempts = sum(s.attempts for s in gw.gw.router.nodes.values()) - before
        checks = dict(spot.counts) if spot is not None else {}
    return {
        "variant": name,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * pct(lat, 0.99),
        "rps": rps,
        "node_calls_per_request": attempts / (n + done),
        "checks": checks,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, cluster_env(Path(tmp), 3) as cluster:
        bench_identity(cluster)
        # The bench caller may also ask for redundant (gateway_overhead allows none only).
        (cluster.root / "policies" / "16-bench-redundant.cedar").write_text(REDUNDANT_POLICY)
        rows = [run_variant(cluster, v, args.requests, args.workers) for v in VARIANTS]
    base = rows[0]
    print(f"{'variant':<14}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}{'x tput':>8}{'node calls':>11}")
    for r in rows:
        print(
            f"{r['variant']:<14}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['rps']:>8.1f}"
            f"{r['rps'] / base['rps']:>8.2f}{r['node_calls_per_request']:>11.3f}  {r['checks']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
