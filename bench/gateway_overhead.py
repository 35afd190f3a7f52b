"""Gateway overhead: iris (batch 1, FP32 [1,4]) through the gateway vs straight to a node.

Run: ``.venv/bin/python bench/gateway_overhead.py [--requests 2000] [--concurrency 8]``

One run, one machine, one model, side by side:

* ``direct``      tritonclient.grpc to a node over mTLS, channel kept open: the baseline.
* ``gw-tritonclient``  tritonclient.http to the gateway over mTLS (keep-alive), binary tensors.
* ``gw-raw``      the same request to the gateway from a bare ``http.client.HTTPSConnection``
  (keep-alive, body pre-encoded once, reply header parsed with ``json.loads``): what is left
  when the HTTP client library's own cost is taken out.

Each runs sequentially (warm-up, then N requests) and with C threads, each with its own
client. The gateway runs as its own process (``python -m gateway serve``), as in production;
the clients run in this process. Everything (PKI, registry, nodes, gateway config) lives in a
temp dir unless ``--dir`` is given, and nodes and gateway are stopped on exit, Ctrl-C included.

Default ``--nodes 1``: the gateway and the direct client then hit the very same tritonserver,
so the difference is the gateway alone, and no idle extra nodes sit on a small machine's CPUs.
With ``--nodes 3`` the gateway spreads over three nodes while ``direct`` still calls n1.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import psutil

from gateway.ports import wait_ready as _wait_ready

MODEL = "iris"
X = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)

Call = Callable[[], None]
Factory = Callable[[], tuple[Call, Call]]  # -> (one request, close)


# --- the three clients -------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    root: Path
    gateway_port: int
    admin_port: int
    node_address: str
    node_dns_name: str
    node_ca: Path
    node_client_cert: Path
    node_client_key: Path
    client_ca: Path  # the root the gateway's server certificate chains to
    client_cert: Path
    client_key: Path
    gateway_pid: int


def direct_client(s: Setup) -> tuple[Call, Call]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(
        s.node_address,
        ssl=True,
        root_certificates=str(s.node_ca),
        private_key=str(s.node_client_key),
        certificate_chain=str(s.node_client_cert),
        channel_args=[
            ("grpc.ssl_target_name_override", s.node_dns_name),
            # Each client its own connection, as each gateway client has its own.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )
    inp = grpcclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    out = grpcclient.InferRequestedOutput("probabilities")

    def call() -> None:
        r = client.infer(MODEL, [inp], outputs=[out], client_timeout=10)
        r.as_numpy("probabilities")

    return call, client.close


def gateway_tritonclient(s: Setup) -> tuple[Call, Call]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{s.gateway_port}",
        ssl=True,
        ssl_options={
            "ca_certs": str(s.client_ca),
            "certfile": str(s.client_cert),
            "keyfile": str(s.client_key),
        },
        network_timeout=10.0,
    )
    inp = httpclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)

    def call() -> None:
        r = client.infer(MODEL, [inp], outputs=[out])
        r.as_numpy("probabilities")

    return call, client.close


def _raw_body() -> tuple[bytes, dict[str, str]]:
    data = X.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(X.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    return head + data, headers


def gateway_raw(s: Setup) -> tuple[Call, Call]:
    ctx = ssl.create_default_context(cafile=str(s.client_ca))
    ctx.load_cert_chain(str(s.client_cert), str(s.client_key))
    conn = http.client.HTTPSConnection("127.0.0.1", s.gateway_port, context=ctx, timeout=10)
    body, headers = _raw_body()
    path = f"/v2/models/{MODEL}/infer"

    def call() -> None:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"gateway answered {resp.status}: {payload[:300]!r}")
        n = int(resp.getheader("Inference-Header-Content-Length") or len(payload))
        doc = json.loads(payload[:n])
        shape = doc["outputs"][0]["shape"]
        np.frombuffer(payload, np.float32, offset=n).reshape(shape)

    return call, conn.close


def answers(s: Setup) -> dict[str, list[float]]:
    """One reply per client, for the sanity check that all three agree."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    out: dict[str, list[float]] = {}
    g = grpcclient.InferenceServerClient(
        s.node_address,
        ssl=True,
        root_certificates=str(s.node_ca),
        private_key=str(s.node_client_key),
        certificate_chain=str(s.node_client_cert),
        channel_args=[("grpc.ssl_target_name_override", s.node_dns_name)],
    )
    gi = grpcclient.InferInput("input", [1, 4], "FP32")
    gi.set_data_from_numpy(X)
    out["direct"] = g.infer(MODEL, [gi]).as_numpy("probabilities").ravel().tolist()
    g.close()
    h = httpclient.InferenceServerClient(
        f"127.0.0.1:{s.gateway_port}",
        ssl=True,
        ssl_options={
            "ca_certs": str(s.client_ca),
            "certfile": str(s.client_cert),
            "keyfile": str(s.client_key),
        },
    )
    hi = httpclient.InferInput("input", [1, 4], "FP32")
    hi.set_data_from_numpy(X, binary_data=True)
    out["gateway"] = h.infer(MODEL, [hi]).as_numpy("probabilities").ravel().tolist()
    h.close()
    return out


# --- measuring -----------------------------------------------------------------------------
@dataclass
class Run:
    variant: str
    mode: str  # "seq" or "c=N"
    latencies_s: list[float]
    wall_s: float
    server_mean_ms: float | None = None  # gateway handler, from its own histogram
    gateway_cpu_ms: float | None = None  # gateway process CPU (all threads) per request

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s
        return {
            "variant": self.variant,
            "mode": self.mode,
            "n": len(lat),
            "p50_ms": pct(lat, 0.50) * 1e3,
            "p90_ms": pct(lat, 0.90) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3,
            "rps": len(lat) / self.wall_s,
            "server_mean_ms": self.server_mean_ms,
            "gateway_cpu_ms": self.gateway_cpu_ms,
        }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sequential(factory: Factory, n: int, warmup: int) -> tuple[list[float], float]:
    call, close = factory()
    try:
        for _ in range(warmup):
            call()
        clock = time.perf_counter
        lat = [0.0] * n
        t0 = clock()
        for i in range(n):
            a = clock()
            call()
            lat[i] = clock() - a
        return lat, clock() - t0
    finally:
        close()


def concurrent(factory: Factory, n: int, workers: int, warmup: int) -> tuple[list[float], float]:
    """`workers` threads, each with its own client, share `n` requests after a warm-up."""
    per = [n // workers + (i < n % workers) for i in range(workers)]
    lat: list[list[float]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []
    ready = threading.Barrier(workers + 1)
    go = threading.Event()
    stop = threading.Event()

    def worker(i: int) -> None:
        call, close = factory()
        try:
            for _ in range(warmup):
                call()
            ready.wait()
            go.wait()
            clock = time.perf_counter
            mine = lat[i]
            for _ in range(per[i]):
                if stop.is_set():
                    return
                a = clock()
                call()
                mine.append(clock() - a)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=120)
        t0 = time.perf_counter()
        go.set()
        for t in threads:
            while t.is_alive():  # join in slices so Ctrl-C gets through
                t.join(0.2)
        wall = time.perf_counter() - t0
    except BaseException:
        stop.set()
        go.set()
        if errors:
            raise errors[0] from None
        raise
    if errors:
        raise errors[0]
    return [x for xs in lat for x in xs], wall


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return float("nan")
    return t.user + t.system


def server_histogram(admin_port: int) -> tuple[float, float]:
    """(sum seconds, count) of the gateway's own infer-latency histogram for iris/none."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if f'model="{MODEL}"' not in line or 'mode="none"' not in line:
            continue
        if line.startswith("ztgate_infer_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("ztgate_infer_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def measure(label: str, mode: str, factory: Factory, setup: Setup, args: Any) -> Run:
    """One run of `factory`'s client ("seq", or "c=N" with `args.concurrency` threads), with
    the gateway's own latency and CPU per request served (not for `direct`)."""
    before = server_histogram(setup.admin_port)
    cpu0 = cpu_seconds(setup.gateway_pid)
    print(f"  {label:<26} {mode} ...", flush=True)
    if mode == "seq":
        lat, wall = sequential(factory, args.requests, args.warmup)
    else:
        warm = max(1, args.warmup // args.concurrency)
        lat, wall = concurrent(factory, args.requests, args.concurrency, warm)
    cpu = cpu_seconds(setup.gateway_pid) - cpu0
    after = server_histogram(setup.admin_port)
    srv = cpu_ms = None
    if label != "direct" and after[1] > before[1]:
        served = after[1] - before[1]
        srv = (after[0] - before[0]) / served * 1e3
        cpu_ms = cpu / served * 1e3
    return Run(label, mode, lat, wall, srv, cpu_ms)


# --- the cluster and the gateway process ---------------------------------------------------
def _stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def cluster_env(root: Path, nodes: int) -> Iterator[Any]:
    """The Triton nodes, torn down on the way out whatever happens."""
    from gateway.cluster import LocalCluster
    from gateway.ports import free_port

    cluster = LocalCluster(
        root, nodes, gateway_port=free_port(), admin_port=free_port(), with_zk=False,
        with_mpc=False,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        print(f"starting {nodes} Triton node(s) under {cluster.root} ...", flush=True)
        cluster.start()
        print(f"  nodes ready in {time.monotonic() - t0:.1f}s", flush=True)
        yield cluster
    finally:
        cluster.stop()
        print("nodes stopped", flush=True)


GATEWAY_CONFIGS = ("full", "no-receipts", "redis")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    from gateway.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


BENCH_POLICY = """
// The bench's own caller: every check still runs (policy, @rate bucket, admission), with
// limits high enough that a benchmark is never throttled.
@id("bench-caller")
@rate("100000000/minute")
permit (principal in Ztgate::Group::"bench", action == Ztgate::Action::"infer", resource)
when { resource.classification == "public" && context.mode == "none" };
"""


def bench_identity(cluster: Any) -> None:
    from gateway.pki import PKI

    policies = cluster.root / "policies"
    (policies / "15-bench.cedar").write_text(BENCH_POLICY)
    ids = json.loads((policies / "identities.json").read_text())
    ids["clients"]["spiffe://ztgate.local/client/bench"] = {"groups": ["bench"]}
    (policies / "identities.json").write_text(json.dumps(ids, indent=2))
    PKI.open(cluster.root / "pki").ensure("client", "bench")


def variant_config(cluster: Any, name: str, redis_url: str | None) -> Path:
    """The cluster's gateway.toml, changed for one side of the comparison."""
    bench_identity(cluster)
    text = cluster.config_path.read_text().replace(
        "\n[policy]\n", '\n[policy]\npre_policy_rate = "100000000/minute"\n'
    )
    if name == "no-receipts":
        head, _, rest = text.partition("\n[receipts]\n")
        tail = rest.split("\n[", 1)
        text = head + ("\n[" + tail[1] if len(tail) > 1 else "\n")
    if name == "redis":
        assert redis_url is not None
        text += f'\n[state]\nredis_url = "{redis_url}"\n'
    out = cluster.root / f"gateway-{name}.toml"
    out.write_text(text)
    return out


@contextlib.contextmanager
def gateway_process(
    cluster: Any, config: Path, log_path: Path, prefix: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m gateway serve --config config`, ready, and stopped on the way out."""
    with log_path.open("wb") as log_file:
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        gateway = subprocess.Popen(
            (prefix or []) + cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
        )
    try:
        admin = f"http://127.0.0.1:{cluster.admin_port}/v2/health/ready"
        if not _wait_ready(admin, 60, gateway):
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the gateway did not become ready; its log:\n{tail}")
        print(f"  gateway ready (pid {gateway.pid}), log: {log_path}", flush=True)
        yield gateway
    finally:
        _stop_gateway(gateway)


@contextlib.contextmanager
def gateway_env(cluster: Any, name: str, prefix: list[str]) -> Iterator[Setup]:
    """One gateway process with configuration `name`, stopped on the way out."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server()) if name == "redis" else None
        config = variant_config(cluster, name, url)
        cfg = tomllib.loads(config.read_text())
        print(f"  gateway [{name}]:", flush=True)
        log_path = cluster.root / f"gateway-{name}.log"
        with gateway_process(cluster, config, log_path, prefix) as gateway:
            pki = cluster.root / "pki"
            node = cfg["nodes"][0]
            yield Setup(
                root=cluster.root,
                gateway_port=cluster.gateway_port,
                admin_port=cluster.admin_port,
                node_address=node["address"],
                node_dns_name=node["dns_name"],
                node_ca=cluster.root / cfg["tls"]["node_ca"],
                node_client_cert=cluster.root / cfg["tls"]["node_client_cert"],
                node_client_key=cluster.root / cfg["tls"]["node_client_key"],
                client_ca=pki / "root" / "ca.crt",
                client_cert=pki / "clients" / "bench" / "client.crt",
                client_key=pki / "clients" / "bench" / "client.key",
                gateway_pid=gateway.pid,
            )


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # same clean-up path as Ctrl-C


# --- report --------------------------------------------------------------------------------
def describe_config(root: Path) -> str:
    return (
        "full = Cedar policy (decision cache) + admission and @rate limits + receipts "
        "(signed, fsynced before the answer) with state in memory | no-receipts = the same "
        "without receipts | redis = full with limits and health in Redis | verification: "
        "none | uvicorn: uvloop + httptools, access log off"
    )


def report(rows: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    print(
        f"\n{'variant':<26}{'mode':<6}{'n':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'mean ms':>9}{'req/s':>8}{'gw-side ms':>12}{'gw CPU ms':>11}"
    )
    for r in rows:
        srv = f"{r['server_mean_ms']:.2f}" if r["server_mean_ms"] is not None else "-"
        cpu = f"{r['gateway_cpu_ms']:.2f}" if r["gateway_cpu_ms"] is not None else "-"
        print(
            f"{r['variant']:<26}{r['mode']:<6}{r['n']:>6}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['mean_ms']:>9.2f}{r['rps']:>8.0f}{srv:>12}{cpu:>11}"
        )
    print(
        "\ngw-side ms: mean of the gateway's own ztgate_infer_seconds (its handler, node call "
        "included)\ngw CPU ms:  CPU time of the gateway process (all threads) per request served"
    )
    by = {(r["variant"], r["mode"]): r for r in rows}
    ratios = []
    print(f"\n{'vs direct':<26}{'mode':<6}{'p50 x':>8}{'req/s x':>9}{'added p50 ms':>14}")
    for mode in ("seq", f"c={concurrency}"):
        base = by.get(("direct", mode))
        if base is None:
            continue
        for variant in sorted({r["variant"] for r in rows if r["variant"] != "direct"}):
            gw = by.get((variant, mode))
            if gw is None:
                continue
            ratio = {
                "variant": variant,
                "mode": mode,
                "p50_ratio": gw["p50_ms"] / base["p50_ms"],
                "rps_ratio": gw["rps"] / base["rps"],
                "added_p50_ms": gw["p50_ms"] - base["p50_ms"],
            }
            ratios.append(ratio)
            print(
                f"{variant:<26}{mode:<6}{ratio['p50_ratio']:>8.2f}{ratio['rps_ratio']:>9.2f}"
                f"{ratio['added_p50_ms']:>14.2f}"
            )
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    ap.add_argument("--concurrency", type=int, default=8, help="threads, one client each")
    ap.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="nodes behind the gateway (default 1: gateway and direct hit the same node)",
    )
    ap.add_argument("--dir", type=Path, help="cluster directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="dump raw latencies and summaries")
    ap.add_argument(
        "--only",
        choices=("direct", "gw-tritonclient", "gw-raw"),
        action="append",
        help="run only these variants (repeatable)",
    )
    ap.add_argument(
        "--gateway-config",
        choices=GATEWAY_CONFIGS,
        action="append",
        help="gateway configurations to compare, side by side in one run (repeatable; "
        "default: full)",
    )
    ap.add_argument(
        "--gateway-prefix",
        default="",
        help="command words put before the gateway's command, e.g. 'taskset -c 1' to pin it "
        "(to profile, attach py-spy to the pid it prints instead)",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    # Even when started in the background (SIGINT ignored), SIGINT must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    variants: dict[str, Callable[[Setup], tuple[Call, Call]]] = {
        "direct": direct_client,
        "gw-tritonclient": gateway_tritonclient,
        "gw-raw": gateway_raw,
    }
    chosen = [v for v in variants if not args.only or v in args.only]
    cores = os.cpu_count() or 0
    gpu = "GPU present" if shutil.which("nvidia-smi") else "no GPU"
    machine = f"{cores} cores ({platform.machine()}), {gpu}, Python {platform.python_version()}"

    load = os.getloadavg()
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} before the run: the figures will be noisy")
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        root = args.dir
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ztgate-bench-")))
        try:
            cluster = stack.enter_context(cluster_env(root, args.nodes))
            config_line = describe_config(root)
            direct_done = False
            for cfg_name in args.gateway_config or ["full"]:
                with gateway_env(cluster, cfg_name, args.gateway_prefix.split()) as setup:
                    got = answers(setup)
                    if not np.allclose(got["direct"], got["gateway"], atol=1e-6):
                        raise RuntimeError(f"direct and gateway disagree: {got}")
                    for mode in ("seq", f"c={args.concurrency}"):
                        for name in chosen:
                            if name == "direct" and direct_done:
                                continue
                            label = name if name == "direct" else f"{name}[{cfg_name}]"
                            factory: Factory = functools.partial(variants[name], setup)
                            runs.append(measure(label, mode, factory, setup, args))
                    direct_done = True
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the gateway and nodes", file=sys.stderr)
            return 130

    rows = [r.summary() for r in runs]
    print(f"\nmachine: {machine}; load average before the run: {load[0]:.2f}")
    print(f"config:  {config_line}")
    print(
        f"model:   {MODEL}, batch 1, FP32 [1,4]; {args.requests} requests per run after "
        f"{args.warmup} warm-up; c={args.concurrency}: threads in one process, one client each"
    )
    print(
        f"note:    all on {cores} cores: the bench clients, the gateway process and tritonserver "
        "compete for the same CPUs, so the gateway's CPU time shows up in both latency and "
        "throughput; read the figures as relative."
    )
    ratios = report(rows, args.concurrency)
    print(
        "\ndirect = tritonclient.grpc -> node; gw-tritonclient = tritonclient.http -> gateway; "
        "gw-raw = http.client keep-alive -> gateway (no client-library overhead)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": machine,
                    "load_average_before": load[0],
                    "config": config_line,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "summary": rows,
                    "ratios": ratios,
                    "raw_latencies_s": {f"{r.variant} {r.mode}": r.latencies_s for r in runs},
                },
                indent=1,
            )
        )
        print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
