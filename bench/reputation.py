"""What catching liars costs: redundant and spot-checked `none` against plain `none`.

Run: ``.venv/bin/python bench/reputation.py [--requests 200] [--workers 8] [--rounds 3]
[--node-delay-ms 0,20]``

Starts 3 real Triton nodes (3 providers, `gateway.cluster.LocalCluster`) and, in this
process, one gateway per variant on the same nodes:

- ``none``: plain mode none;
- ``none+spot5%``: mode none with spot checks at 5% for every node (the checks and their
  tiebreaks go through the same nodes, off the request path);
- ``redundant``: k = 2 (two providers agree; a third only on disagreement).

Each node's iris model can add a fixed delay to every reply (``--node-delay-ms``): 0 is
the local, CPU-bound node; 20 ms is what a remote node looks like to the gateway (its
time is not this host's CPU). For each node delay and variant, in one run: sequential
latency (p50, p99), throughput with `--workers` concurrent clients (separate processes,
so this process's CPU is the gateway's), CPU per answered request of the gateway process
and of the node processes (tritonserver and its python stubs), and node calls per
answered request (spot checks included, counted once the queue has drained). Variants
run interleaved for `--rounds` rounds and each figure is the median over the rounds, so
a burst of other load on a shared host does not land on one variant only. k = 3 is not
a mode option (redundant asks a third provider only to break a tie), so it is not
measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

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
DELAY_FILE = "node-delay-s"  # under the cluster root; every node's model reads it per reply
HONEST = "results = self.session.run(self.output_names, feed)"


def delayed_repository(build: Any) -> Any:
    """`build_repository`, with the iris model sleeping for what DELAY_FILE says."""

    def build_with_delay(entries: Any, dest: Path) -> Path:
        repo: Path = build(entries, dest)
        control = dest.parent.parent / DELAY_FILE
        control.write_text("0")
        for model_py in repo.glob("iris/*/model.py"):
            text = model_py.read_text()
            assert HONEST in text, "the iris model changed: update bench/reputation.py"
            delay = (
                f"\n            import time as _t\n"
                f"            _t.sleep(float(open({str(control)!r}).read() or 0))"
            )
            model_py.write_text(text.replace(HONEST, HONEST + delay))
        return repo

    return build_with_delay


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load(args: tuple[str, str, dict[str, Any], int]) -> int:
    """One client process: `k` requests in a row on one connection."""
    pki_root, url, body, k = args
    pki = PKI.open(Path(pki_root))
    bench = pki.ensure("client", "bench")
    with httpx.Client(verify=client_context(pki, bench.cert, bench.key), timeout=30) as c:
        for _ in range(k):
            r = c.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
    return k


def warm(seconds: float) -> None:
    """Start a client process (spawned: imports this module) before anything is timed."""
    time.sleep(seconds)


def node_processes(root: Path) -> list[psutil.Process]:
    """tritonserver and its python-backend stubs: every process started under `root`."""
    me = psutil.Process().pid
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if p.pid != me and str(root) in cmd:
            out.append(p)
    return out


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def run_variant(
    cluster: Any, name: str, n: int, workers: int, pool: concurrent.futures.Executor
) -> dict[str, Any]:
    mode, rep = VARIANTS[name]
    cfg = load_config(cluster.config_path)
    pol = dataclasses.replace(cfg.policy, pre_policy_rate="100000000/minute")
    cfg = dataclasses.replace(cfg, reputation=rep, policy=pol)
    pki = PKI.open(cluster.root / "pki")
    bench = pki.ensure("client", "bench")
    body = {**BODY, "parameters": {"ztgate.verification": mode}}
    nodes = node_processes(cluster.root)
    gateway = [psutil.Process()]
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
        cpu0 = (cpu_s(gateway), cpu_s(nodes))
        calls0 = sum(s.attempts for s in gw.gw.router.nodes.values())
        t0 = time.perf_counter()
        done = sum(pool.map(load, [(str(pki.root), url, body, n // workers)] * workers))
        rps = done / (time.perf_counter() - t0)
        spot = getattr(gw.gw, "spot", None)
        if spot is not None:  # the gateway's loop runs in its own thread: poll
            deadline = time.monotonic() + 60
            results = ("dropped", "skipped", "confirmed", "contradicted", "disputed", "failed")
            while (
                sum(spot.counts[k] for k in results) < spot.counts["scheduled"]
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
        cpu1 = (cpu_s(gateway), cpu_s(nodes))
        calls = sum(s.attempts for s in gw.gw.router.nodes.values())
        checks = dict(spot.counts) if spot is not None else {}
    return {
        "variant": name,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * pct(lat, 0.99),
        "rps": rps,
        "gateway_cpu_ms": 1000 * (cpu1[0] - cpu0[0]) / done,
        "node_cpu_ms": 1000 * (cpu1[1] - cpu0[1]) / done,
        "node_calls_per_request": (calls - before) / (n + done),
        "throughput_node_calls": (calls - calls0) / done,
        "checks": checks,
    }


def median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in rows)
    checks: dict[str, int] = {}
    for r in rows:
        for k, v in r["checks"].items():
            checks[k] = checks.get(k, 0) + v
    out["checks"] = checks
    return out


def report(delay_ms: float, rows: list[dict[str, Any]]) -> Iterator[str]:
    base = rows[0]
    cpu = base["gateway_cpu_ms"] + base["node_cpu_ms"]
    yield f"node delay {delay_ms:g} ms (CPU in ms per answered request, during the load)"
    yield (
        f"{'variant':<14}{'p50 ms':>8}{'p99 ms':>8}{'x p50':>7}{'req/s':>8}{'x tput':>8}"
        f"{'gw cpu':>8}{'node cpu':>9}{'x cpu':>7}{'calls':>7}  checks (all rounds)"
    )
    for r in rows:
        yield (
            f"{r['variant']:<14}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['p50_ms'] / base['p50_ms']:>7.2f}{r['rps']:>8.1f}{r['rps'] / base['rps']:>8.2f}"
            f"{r['gateway_cpu_ms']:>8.2f}{r['node_cpu_ms']:>9.2f}"
            f"{(r['gateway_cpu_ms'] + r['node_cpu_ms']) / cpu:>7.2f}"
            f"{r['node_calls_per_request']:>7.3f}  {r['checks']}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--node-delay-ms", default="0,20")
    args = ap.parse_args()
    delays = [float(x) for x in args.node_delay_ms.split(",")]
    import gateway.cluster

    gateway.cluster.build_repository = delayed_repository(gateway.cluster.build_repository)  # type: ignore[attr-defined]
    spawn = multiprocessing.get_context("spawn")  # never fork a process running a gateway
    lines: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        cluster_env(Path(tmp), 3) as cluster,
        concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn) as pool,
    ):
        list(pool.map(warm, [0.5] * args.workers))
        print(f"node processes measured: {len(node_processes(cluster.root))}", flush=True)
        bench_identity(cluster)
        # The bench caller may also ask for redundant (gateway_overhead allows none only).
        (cluster.root / "policies" / "16-bench-redundant.cedar").write_text(REDUNDANT_POLICY)
        for delay in delays:
            (cluster.root / DELAY_FILE).write_text(str(delay / 1000))
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    runs[v].append(run_variant(cluster, v, args.requests, args.workers, pool))
            lines += report(delay, [median_rows(runs[v]) for v in VARIANTS])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
