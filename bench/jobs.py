"""Jobs per second through the asynchronous jobs API against the synchronous call (issue 26).

Run: ``.venv/bin/python bench/jobs.py [--requests 400] [--concurrency 8] [--dir DIR]``

One run, one gateway process (``python -m gateway serve``, as in production), one real
tritonserver node, iris batch 1, receipts on; side by side:

* ``sync``    C threads, each with its own keep-alive mTLS client, POST .../infer N times in all.
* ``jobs``    C threads submit N jobs in all (POST .../jobs, each its own Idempotency-Key)
              and poll each until done (GET /v2/jobs/{id}, every 20 ms): the rate is N over
              the time from the first submit to the last answer collected.

Reported per variant: requests (or jobs) per second, and the p50/p95 of what a client
waits: the answer (sync), the 202 (submit) and the answer in hand (jobs, submit to done).
The gateway's CPU per request (psutil, all threads) shows what a job costs on top of the
call it makes: the durable record (fsync), the polls, the in-process dispatch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.gateway_overhead import bench_identity  # noqa: E402
from gateway.cluster import LocalCluster  # noqa: E402
from gateway.ports import free_port, wait_ready  # noqa: E402

BODY = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}
POLL_S = 0.02


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def timed_calls(
    base: str,
    ctx: ssl.SSLContext,
    n: int,
    c: int,
    check: Callable[[httpx.Response], object] = httpx.Response.raise_for_status,
) -> tuple[list[float], float]:
    """N synchronous iris calls from C threads, each its own keep-alive mTLS client: what
    each waited, and the wall time of all. `check` raises on an answer not as expected."""
    waits: list[float] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        with httpx.Client(base_url=base, verify=ctx, timeout=30) as cl:
            for _ in range(count):
                t = time.perf_counter()
                r = cl.post("/v2/models/iris/infer", json=BODY)
                took = time.perf_counter() - t
                check(r)
                with lock:
                    waits.append(took)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        list(pool.map(worker, [n // c] * c))
    return waits, time.perf_counter() - t0


def run_sync(base: str, ctx: ssl.SSLContext, n: int, c: int) -> dict[str, Any]:
    waits, wall = timed_calls(base, ctx, n, c)
    return {"rate": len(waits) / wall, "p50_ms": pct(waits, 0.5), "p95_ms": pct(waits, 0.95)}


def run_jobs(base: str, ctx: ssl.SSLContext, n: int, c: int) -> dict[str, Any]:
    submits: list[float] = []
    turnarounds: list[float] = []
    polls = 0
    lock = threading.Lock()

    def worker(count: int) -> None:
        nonlocal polls
        with httpx.Client(base_url=base, verify=ctx, timeout=30) as cl:
            pending: dict[str, float] = {}
            for _ in range(count):
                t = time.perf_counter()
                r = cl.post(
                    "/v2/models/iris/jobs",
                    json=BODY,
                    headers={"idempotency-key": str(uuid.uuid4())},
                )
                if r.status_code != 202:
                    raise RuntimeError(f"submit: {r.status_code} {r.text}")
                with lock:
                    submits.append(time.perf_counter() - t)
                pending[r.json()["id"]] = t
            while pending:
                for job_id, started in list(pending.items()):
                    view = cl.get(f"/v2/jobs/{job_id}").json()
                    with lock:
                        polls += 1
                    if view["status"] == "done":
                        with lock:
                            turnarounds.append(time.perf_counter() - started)
                        del pending[job_id]
                    elif view["status"] == "failed":
                        raise RuntimeError(f"job failed: {view}")
                if pending:
                    time.sleep(POLL_S)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        list(pool.map(worker, [n // c] * c))
    wall = time.perf_counter() - t0
    return {
        "rate": len(turnarounds) / wall,
        "submit_p50_ms": pct(submits, 0.5),
        "submit_p95_ms": pct(submits, 0.95),
        "p50_ms": pct(turnarounds, 0.5),
        "p95_ms": pct(turnarounds, 0.95),
        "polls_per_job": polls / max(1, len(turnarounds)),
    }


def one_node_bench(doc: str, name: str, requests: int) -> tuple[argparse.Namespace, LocalCluster]:
    """The command line of a bench on one iris node, and that node started (`ztgate up`'s
    cluster without zk or mpc, in --dir or a fresh temporary directory)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix=f"ztgate-bench-{name}-"))
    cluster = LocalCluster(
        root, 1, gateway_port=free_port(), admin_port=free_port(), with_zk=False, with_mpc=False
    )
    cluster.start()
    return args, cluster


def main() -> int:
    args, cluster = one_node_bench(__doc__, "jobs", 400)
    root = cluster.root
    gateway: subprocess.Popen[bytes] | None = None
    try:
        # The bench's caller: every check runs, with limits no benchmark reaches, and room
        # for the whole burst of jobs (the bench measures throughput, not the caps).
        bench_identity(cluster)
        text = cluster.config_path.read_text().replace(
            "\n[policy]\n", '\n[policy]\npre_policy_rate = "100000000/minute"\n'
        )
        text += f"\n[jobs]\nmax_open_per_identity = {args.requests + 1}\nworkers = 8\n"
        text += "\n[limits]\nmax_concurrent_per_identity = 64\n"
        cluster.config_path.write_text(text)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cluster.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ready = f"http://127.0.0.1:{cluster.admin_port}/v2/health/ready"
        if not wait_ready(ready, 60, gateway):
            raise RuntimeError("gateway not ready")
        pki = root / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "root" / "ca.crt"))
        ctx.load_cert_chain(pki / "clients/bench/client.crt", pki / "clients/bench/client.key")
        base = f"https://127.0.0.1:{cluster.gateway_port}"
        proc = psutil.Process(gateway.pid)
        n, c = args.requests, args.concurrency
        run_sync(base, ctx, 4 * c, c)  # warm-up: connections, caches, the node
        run_jobs(base, ctx, c, c)
        results: dict[str, Any] = {}
        for name, fn in (("sync", run_sync), ("jobs", run_jobs)):
            cpu0 = sum(proc.cpu_times()[:2])
            results[name] = fn(base, ctx, n, c)
            results[name]["gw_cpu_ms"] = (sum(proc.cpu_times()[:2]) - cpu0) / n * 1000
    finally:
        if gateway is not None and gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGTERM)
            try:
                gateway.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(gateway.pid, signal.SIGKILL)
        cluster.stop()
    print(f"iris batch 1, {n} per variant, c={c}, 1 node, receipts on; {platform.platform()}")
    print(
        f"{'variant':8} {'per s':>8} {'p50 ms':>8} {'p95 ms':>8} {'202 p50':>8} {'gw CPU ms':>10}"
    )
    for name, r in results.items():
        submit = f"{r['submit_p50_ms']:8.1f}" if "submit_p50_ms" in r else f"{'-':>8}"
        print(
            f"{name:8} {r['rate']:8.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {submit}"
            f" {r['gw_cpu_ms']:10.2f}"
        )
    print(f"polls per job: {results['jobs']['polls_per_job']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
