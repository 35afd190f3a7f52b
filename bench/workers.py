"""One replica on 1 and on 2 worker processes (`ztgate serve --workers N`), side by side.

Run: ``.venv/bin/python bench/workers.py [--requests 3000] [--concurrency 8] [--workers 1 2]``

One node, the ``full`` configuration of ``bench/gateway_overhead.py`` (Cedar policy,
admission and ``@rate`` limits, receipts signed and fsynced before each answer), iris
batch 1 over mTLS with raw binary tensors. For each worker count: the gateway is started
(``python -m gateway serve --workers N``), warmed up, then a load generator in a process
of its own sends ``--requests`` requests over ``--concurrency`` keep-alive connections
(one thread each; each new connection is hashed to a worker by the kernel).

Reported per run: req/s and latency seen by the load generator; **gateway CPU ms per
request**, the CPU time of the supervisor and every worker (psutil, all threads) over the
requests served; and the load generator's own CPU ms per request, separately, since on a
small machine it competes with the gateway and the node for the same cores. Without Redis
the workers share the SQLite state store (gateway/state/sqlite.py); ``--redis`` runs both
sides with a local redis-server instead.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from gateway_overhead import (
    MODEL,
    _raw_body,
    _sigterm,
    cluster_env,
    gateway_process,
    pct,
    redis_server,
    variant_config,
)


def gateway_cpu_s(pid: int) -> float:
    """CPU seconds of the supervisor and its live workers (user + system, all threads)."""
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of the supervisor and its workers, keyed
    "<process>/<thread>": process "sup" or "w<pid>", thread "main" (the event loop) or
    the thread's name as the kernel knows it and its id (`/proc/<pid>/task/*/stat`)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        who = "sup" if p.pid == pid else f"w{p.pid}"
        for task in Path(f"/proc/{p.pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
                tid = int(task.name)
                out[f"{who}/{'main' if tid == p.pid else f'{name}:{tid}'}"] = cpu
    return out


def thread_report(before: dict[str, float], after: dict[str, float], n: int) -> list[str]:
    """Per thread µs of CPU per request over the run, the busiest first (>= 1 µs)."""
    rows = [(k, (v - before.get(k, 0.0)) / n * 1e6) for k, v in after.items()]
    return [
        f"    {k:<40} {us:8.1f} µs/req" for k, us in sorted(rows, key=lambda r: -r[1]) if us >= 1
    ]


# --- the load generator (its own process) ---------------------------------------------------
def loadgen(args: argparse.Namespace) -> int:
    """Send `--requests` over `--concurrency` connections; print one JSON line of results."""
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    body, headers = _raw_body()
    path = f"/v2/models/{MODEL}/infer"
    per = [args.requests // args.concurrency] * args.concurrency
    per[0] += args.requests - sum(per)
    lat: list[list[float]] = [[] for _ in per]
    errors: list[str] = []
    start = threading.Barrier(len(per) + 1)

    def worker(i: int) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", args.port, context=ctx, timeout=30)
        try:
            for _ in range(args.warmup):
                conn.request("POST", path, body=body, headers=headers)
                conn.getresponse().read()
            start.wait()
            for _ in range(per[i]):
                t0 = time.perf_counter()
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                lat[i].append(time.perf_counter() - t0)
                if resp.status != 200:
                    errors.append(f"status {resp.status}")
                    return
        except Exception as exc:  # reported, and the run fails
            errors.append(repr(exc))
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(per))]
    for t in threads:
        t.start()
    start.wait()  # every connection open and warm
    print("GO", flush=True)  # the parent reads the gateway's CPU from here
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    flat = [x for xs in lat for x in xs]
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"n": len(flat), "wall_s": wall, "cpu_s": cpu, "lat": flat, "errors": errors}))
    return 1 if errors else 0


# --- one run ---------------------------------------------------------------------------------
def measure(cluster: Any, config: Path, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    log_path = cluster.root / f"gateway-w{workers}.log"
    text = config.read_text().replace("\n[listen]\n", f"\n[listen]\nworkers = {workers}\n")
    cfg_path = cluster.root / f"gateway-w{workers}.toml"
    cfg_path.write_text(text)
    pki = cluster.root / "pki"
    with gateway_process(cluster, cfg_path, log_path) as gw:
        time.sleep(0.5)  # let every worker finish its start-up before the CPU is counted
        idle_ms_s = float("nan")
        if args.idle:  # what the background loops cost with no request at all
            idle0, idle_t0 = thread_cpu_s(gw.pid), time.perf_counter()
            time.sleep(args.idle)
            idle1, idle_s = thread_cpu_s(gw.pid), time.perf_counter() - idle_t0
            idle_ms_s = (sum(idle1.values()) - sum(idle0.values())) / idle_s * 1e3
            if args.threads:
                busy = sorted(
                    ((k, v - idle0.get(k, 0.0)) for k, v in idle1.items()), key=lambda r: -r[1]
                )
                for k, v in busy[:6]:
                    print(f"    idle {k:<35} {v / idle_s * 1e3:8.2f} ms/s", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--loadgen",
            "--port", str(cluster.gateway_port),
            "--ca", str(pki / "root" / "ca.crt"),
            "--cert", str(pki / "clients" / "bench" / "client.crt"),
            "--key", str(pki / "clients" / "bench" / "client.key"),
            "--requests", str(args.requests),
            "--concurrency", str(args.concurrency),
            "--warmup", str(args.warmup),
        ]  # fmt: skip
        print(
            f"  workers={workers}: {args.requests} requests, c={args.concurrency} ...", flush=True
        )
        gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert gen.stdout is not None
        first = gen.stdout.readline().strip()
        if first != "GO":
            gen.wait(timeout=30)
            raise RuntimeError(f"load generator failed before the run: {first!r}")
        cpu0, threads0 = gateway_cpu_s(gw.pid), thread_cpu_s(gw.pid)
        out, _ = gen.communicate(timeout=600)
        cpu = gateway_cpu_s(gw.pid) - cpu0
        threads1 = thread_cpu_s(gw.pid)
    res = json.loads(out.strip().splitlines()[-1])
    if res["errors"]:
        raise RuntimeError(f"workers={workers}: {res['errors'][:3]}")
    n, lat = res["n"], sorted(res["lat"])
    if args.threads:
        print("\n".join(thread_report(threads0, threads1, n)), flush=True)
    return {
        "workers": workers,
        "requests": n,
        "req_s": n / res["wall_s"],
        "p50_ms": pct(lat, 0.50) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "gateway_cpu_ms": cpu / n * 1e3,
        "loadgen_cpu_ms": res["cpu_s"] / n * 1e3,
        "idle_cpu_ms_s": idle_ms_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=25, help="unmeasured requests per connection")
    ap.add_argument("--concurrency", type=int, default=8, help="connections, one thread each")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--redis", action="store_true", help="state in a local redis-server")
    ap.add_argument("--dir", type=Path, help="cluster directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--threads", action="store_true", help="print CPU per request per thread")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds of idle CPU measured first")
    ap.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loadgen:
        return loadgen(args)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ztgate-bench-"))
        )
        try:
            cluster = stack.enter_context(cluster_env(root, 1))
            url = stack.enter_context(redis_server()) if args.redis else None
            config = variant_config(cluster, "redis" if url else "full", url)
            for workers in args.workers:
                rows.append(measure(cluster, config, workers, args))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the gateway and nodes", file=sys.stderr)
            return 130
    print(
        f"\nmachine: {os.cpu_count()} cores ({platform.machine()}), Python "
        f"{platform.python_version()}; load average before the run: {load[0]:.2f}"
    )
    print(
        f"full pipeline (policy, limits, receipts fsynced), state: "
        f"{'Redis' if args.redis else 'SQLite shared by the workers (memory for 1)'}; "
        f"iris batch 1, {args.requests} requests, c={args.concurrency}\n"
    )
    head = ("workers", "req/s", "p50 ms", "p99 ms", "gw CPU ms", "gen CPU ms")
    print("{:>7} {:>8} {:>8} {:>8} {:>10} {:>11}".format(*head))
    for r in rows:
        print(
            f"{r['workers']:>7} {r['req_s']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['gateway_cpu_ms']:>10.2f} {r['loadgen_cpu_ms']:>11.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
