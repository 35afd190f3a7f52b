"""One replica on 1 and on 2 worker processes (`ztgate serve --workers N`), side by side.

Run: ``.venv/bin/python bench/workers.py [--requests 3000] [--concurrency 8] [--workers 1 2]``
or, to give each worker the same load whatever the count,
``.venv/bin/python bench/workers.py --runs 1:4 2:8 1:4 2:8`` (``workers:connections`` per run).

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

The per-identity admission limit (``[limits] max_concurrent_per_identity``, 8 by default,
per worker) is raised to four times the run's connections, so that the kernel's uneven
spread of connections over workers never throttles the bench; 429 answers are counted and
reported (a run with any is not a measurement), as is each worker's share of connections.
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
    throttled = [0, 0]  # 429 answers: warm-up, measured
    start = threading.Barrier(len(per) + 1)

    def worker(i: int) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", args.port, context=ctx, timeout=30)
        try:
            for _ in range(args.warmup):
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                throttled[0] += resp.status == 429
            start.wait()
            for _ in range(per[i]):
                t0 = time.perf_counter()
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                lat[i].append(time.perf_counter() - t0)
                if resp.status == 429:  # counted and reported: the run is then not a figure
                    throttled[1] += 1
                elif resp.status != 200:
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
    out = {"n": len(flat), "wall_s": wall, "cpu_s": cpu, "lat": flat, "errors": errors}
    print(json.dumps(out | {"throttled": throttled}))
    return 1 if errors else 0


# --- one run ---------------------------------------------------------------------------------
def connections_per_worker(pid: int, port: int) -> list[int]:
    """Established client connections each worker holds on the gateway's port, busiest
    first: how evenly the kernel spread the load generator's connections."""
    counts = []
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(pid)
        for p in top.children() or [top]:  # one worker: the process itself serves
            with contextlib.suppress(psutil.Error):
                conns = p.net_connections(kind="tcp")
                counts.append(
                    sum(c.status == "ESTABLISHED" and c.laddr.port == port for c in conns)
                )
    return sorted(counts, reverse=True)


def measure(
    cluster: Any, config: Path, workers: int, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    log_path = cluster.root / f"gateway-w{workers}.log"
    limits = f"\n[limits]\nmax_concurrent_per_identity = {max(8, 4 * concurrency)}\n"
    text = config.read_text().replace("\n[listen]\n", f"\n[listen]\nworkers = {workers}\n")
    text += limits  # a new table at the end: after [[nodes]] and [state] alike
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
            "--concurrency", str(concurrency),
            "--warmup", str(args.warmup),
        ]  # fmt: skip
        print(f"  workers={workers}: {args.requests} requests, c={concurrency} ...", flush=True)
        gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert gen.stdout is not None
        first = gen.stdout.readline().strip()
        if first != "GO":
            gen.wait(timeout=30)
            raise RuntimeError(f"load generator failed before the run: {first!r}")
        cpu0, threads0 = gateway_cpu_s(gw.pid), thread_cpu_s(gw.pid)
        spread = connections_per_worker(gw.pid, cluster.gateway_port)
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
        "concurrency": concurrency,
        "spread": spread,
        "throttled": res["throttled"],
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
    ap.add_argument(
        "--runs",
        nargs="+",
        metavar="W:C",
        help="runs as workers:connections (e.g. 1:4 2:8 for the same load per worker); "
        "replaces --workers and --concurrency",
    )
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
    plan = [(w, args.concurrency) for w in args.workers]
    if args.runs:
        try:
            plan = [(int(w), int(c)) for w, c in (r.split(":") for r in args.runs)]
        except ValueError:
            ap.error("--runs takes workers:connections, e.g. 1:4 2:8")
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
            for workers, concurrency in plan:
                rows.append(measure(cluster, config, workers, concurrency, args))
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
        f"iris batch 1, {args.requests} requests a run\n"
    )
    head = ("workers", "c", "conns/worker", "req/s", "p50 ms", "p99 ms", "gw CPU ms", "gen CPU ms")
    print("{:>7} {:>3} {:>12} {:>8} {:>8} {:>8} {:>10} {:>11} 429s".format(*head))
    for r in rows:
        spread = "+".join(map(str, r["spread"]))
        print(
            f"{r['workers']:>7} {r['concurrency']:>3} {spread:>12} {r['req_s']:>8.0f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['gateway_cpu_ms']:>10.2f} "
            f"{r['loadgen_cpu_ms']:>11.2f} {r['throttled'][1]} (warm-up {r['throttled'][0]})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
