"""A well-behaved client's latency while another authenticated client floods the gateway.

Run: ``.venv/bin/python bench/victim_under_load.py [--seconds 15] [--rate 5]``

The victim (``demo``, group ``apps``) sends iris (batch 1, FP32 [1,4], binary tensors) at
``--rate`` requests per second on one keep-alive mTLS connection, ``--seconds`` long. It is
measured unloaded, then once per attack: an attacker with a client certificate of its own
keeps ``--connections`` keep-alive connections sending the largest JSON bodies it can, as
fast as it can, from a separate process:

* ``permit-under``   ``mallory`` (group ``apps``: the same permit as the victim) sends the
  costliest request its permit allows: 256 iris rows (the policy's batch-size cap) plus an
  unknown member of ~520k zeros that the codec must parse, one byte under the 1 MiB JSON cap;
* ``permit-over``    the same body padded to one byte over the cap;
* ``nopermit-under`` ``eve`` (a valid certificate, no permit) sends the under-cap body;
* ``nopermit-over``  ``eve`` sends the over-cap body.

The gateway runs as in ``ztgate up`` (its own process; Cedar policy, admission limits,
receipts, state in memory) with the default ``[limits]`` and ``pre_policy_rate``, in front of
one Triton node. Reported per phase: victim p50/p95 (and its ratio to unloaded), victim
failures, attacker answers by status and problem type, and the CPU the gateway and the node
used. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import signal
import ssl
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from gateway_overhead import _raw_body, _sigterm, cluster_env, gateway_process, pct

MODEL = "iris"
PATH = f"/v2/models/{MODEL}/infer"
VICTIM, WITH_PERMIT, WITHOUT_PERMIT = "demo", "mallory", "eve"
ATTACKS = ("permit-under", "permit-over", "nopermit-under", "nopermit-over")


@dataclass(frozen=True)
class Endpoint:
    port: int
    ca: Path
    pki: Path

    def connect(self, client: str, timeout: float = 30.0) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        d = self.pki / "clients" / client
        ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=timeout)


def attack_body(cap: int, over: bool) -> bytes:
    """The costliest request the policy still permits, in JSON, one byte under or over ``cap``.

    256 rows of iris (the policy's batch-size cap), then an unknown member the codec parses
    and ignores, as Triton does: an array of zeros filling the body up to the cap.
    """
    rows = 256
    data = ",".join(["0"] * (4 * rows))
    head = f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[{rows},4],"data":[{data}]}}],'
    head += '"pad":['
    tail = "]}"
    size = cap + 1 if over else cap - 1
    pad = (size - len(head) - len(tail)) // 2  # "0," per element
    text = head + ",".join(["0"] * pad) + tail
    assert len(text) <= size, (len(text), size)
    return (text + " " * (size - len(text))).encode()  # trailing blanks are valid JSON


def _outcome(status: int, payload: bytes) -> str:
    if status == 200:
        return "200 ok"
    try:
        kind = str(json.loads(payload).get("type", "")).rsplit("/", 1)[-1]
    except (ValueError, AttributeError):
        kind = "?"
    return f"{status} {kind}"


def attacker(
    ep: Endpoint, client: str, body: bytes, connections: int, seconds: float, out: Any
) -> None:
    """``connections`` threads, one connection each, sending ``body`` until time is up."""
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    headers = {"Content-Type": "application/json"}

    def worker() -> None:
        mine: collections.Counter[str] = collections.Counter()
        conn = None
        while time.monotonic() < end:
            try:
                if conn is None:
                    conn = ep.connect(client)
                    mine["connections opened"] += 1
                conn.request("POST", PATH, body=body, headers=headers)
                resp = conn.getresponse()
                mine[_outcome(resp.status, resp.read())] += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                mine["connection cut before an answer"] += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            counts.update(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    out.put(dict(counts))


@dataclass
class Phase:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    victim_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    attacker: dict[str, int] = field(default_factory=dict)
    gateway_cpu_s: float = 0.0
    node_cpu_s: float = 0.0
    wall_s: float = 0.0


def victim(ep: Endpoint, rate: float, seconds: float, phase: Phase) -> None:
    """Requests on a fixed schedule (one every 1/rate s; late ones go at once)."""
    body, headers = _raw_body()
    conn = ep.connect(VICTIM)
    try:
        for _ in range(5):  # warm-up: TLS handshake, the policy's decision cache
            conn.request("POST", PATH, body=body, headers=headers)
            conn.getresponse().read()
        clock = time.perf_counter
        t0 = clock()
        for i in range(round(rate * seconds)):
            delay = t0 + i / rate - clock()
            if delay > 0:
                time.sleep(delay)
            a = clock()
            try:
                conn.request("POST", PATH, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                phase.victim_failures[type(exc).__name__] += 1
                conn.close()
                conn = ep.connect(VICTIM)
                continue
            if resp.status != 200:
                phase.victim_failures[_outcome(resp.status, payload)] += 1
                continue
            phase.latencies_s.append(clock() - a)
    finally:
        conn.close()


def cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return float("nan")
    return t.user + t.system


def run_phase(
    name: str, ep: Endpoint, args: argparse.Namespace, gw: psutil.Process, node: Any
) -> Phase:
    phase = Phase(name)
    cpu0 = (cpu_s(gw), cpu_s(node))
    t0 = time.monotonic()
    proc = None
    if name != "unloaded":
        client = WITH_PERMIT if name.startswith("permit") else WITHOUT_PERMIT
        body = attack_body(args.json_cap, over=name.endswith("over"))
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        ramp = 1.0  # the attack is in full swing before the victim starts
        proc = ctx.Process(
            target=attacker,
            args=(ep, client, body, args.connections, args.seconds + 2 * ramp, out),
        )
        proc.start()
        time.sleep(ramp)
    victim(ep, args.rate, args.seconds, phase)
    if proc is not None:
        phase.attacker = out.get(timeout=args.seconds + 120)
        proc.join(30)
    phase.wall_s = time.monotonic() - t0
    phase.gateway_cpu_s = cpu_s(gw) - cpu0[0]
    phase.node_cpu_s = cpu_s(node) - cpu0[1]
    return phase


# --- the gateway ---------------------------------------------------------------------------
def prepare_identities(root: Path) -> None:
    from gateway.pki import PKI

    ids_path = root / "policies" / "identities.json"
    ids = json.loads(ids_path.read_text())
    ids["clients"][f"spiffe://ztgate.local/client/{WITH_PERMIT}"] = {"groups": ["apps"]}
    ids_path.write_text(json.dumps(ids, indent=2))  # eve stays unknown: no permit
    pki = PKI.open(root / "pki")
    for name in (VICTIM, WITH_PERMIT, WITHOUT_PERMIT):
        pki.ensure("client", name)


@contextlib.contextmanager
def gateway(cluster: Any) -> Iterator[tuple[Endpoint, psutil.Process, dict[str, Any]]]:
    """The gateway as `ztgate up` configures it: default limits, policy, receipts."""
    prepare_identities(cluster.root)
    config = cluster.config_path
    with gateway_process(cluster, config, cluster.root / "gateway.log") as proc:
        pki = cluster.root / "pki"
        ep = Endpoint(cluster.gateway_port, pki / "root" / "ca.crt", pki)
        yield ep, psutil.Process(proc.pid), tomllib.loads(config.read_text())


# --- report --------------------------------------------------------------------------------
def summarize(p: Phase, base: Phase | None, args: argparse.Namespace) -> dict[str, Any]:
    lat = p.latencies_s
    p50 = pct(lat, 0.50) * 1e3 if lat else float("nan")
    p95 = pct(lat, 0.95) * 1e3 if lat else float("nan")
    row: dict[str, Any] = {
        "phase": p.name,
        "victim_ok": len(lat),
        "victim_failed": sum(p.victim_failures.values()),
        "victim_failures": dict(p.victim_failures),
        "p50_ms": p50,
        "p95_ms": p95,
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        "attacker": p.attacker,
        "attacker_requests": sum(v for k, v in p.attacker.items() if k[:1].isdigit()),
        "gateway_cpu_pct": 100 * p.gateway_cpu_s / p.wall_s,
        "node_cpu_pct": 100 * p.node_cpu_s / p.wall_s,
        "gateway_cpu_ms_per_victim_request": p.gateway_cpu_s / max(1, len(lat)) * 1e3,
    }
    if base is not None and base.latencies_s:
        row["p50_x"] = p50 / (pct(base.latencies_s, 0.50) * 1e3)
        row["p95_x"] = p95 / (pct(base.latencies_s, 0.95) * 1e3)
    return row


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'phase':<16}{'ok':>4}{'fail':>5}{'p50 ms':>8}{'p95 ms':>8}{'p50 x':>7}{'p95 x':>7}"
        f"{'gw CPU %':>9}{'node CPU %':>11}{'gw CPU ms/victim req':>22}"
    )
    for r in rows:
        x50 = f"{r['p50_x']:.2f}" if "p50_x" in r else "-"
        x95 = f"{r['p95_x']:.2f}" if "p95_x" in r else "-"
        print(
            f"{r['phase']:<16}{r['victim_ok']:>4}{r['victim_failed']:>5}{r['p50_ms']:>8.2f}"
            f"{r['p95_ms']:>8.2f}{x50:>7}{x95:>7}{r['gateway_cpu_pct']:>9.0f}"
            f"{r['node_cpu_pct']:>11.0f}{r['gateway_cpu_ms_per_victim_request']:>22.1f}"
        )
    print("\nattacker answers (whole attack, incl. ramp-up/down):")
    for r in rows:
        if r["attacker"]:
            parts = ", ".join(f"{k}: {v}" for k, v in sorted(r["attacker"].items()))
            print(f"  {r['phase']:<16}{parts}")
        if r["victim_failures"]:
            print(f"  {r['phase']:<16}victim failures: {r['victim_failures']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="victim run per phase")
    ap.add_argument("--rate", type=float, default=5.0, help="victim requests per second")
    ap.add_argument("--connections", type=int, default=8, help="attacker connections")
    ap.add_argument(
        "--attack", choices=ATTACKS, action="append", help="attacks to run (default: all)"
    )
    ap.add_argument("--dir", type=Path, help="cluster directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the summaries here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load = os.getloadavg()
    machine = (
        f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
        f"load average before the run {load[0]:.2f}"
    )
    phases: list[Phase] = []
    with contextlib.ExitStack() as stack:
        root = args.dir
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ztgate-bench-")))
        try:
            cluster = stack.enter_context(cluster_env(root, 1))
            ep, gw, cfg = stack.enter_context(gateway(cluster))
            args.json_cap = int(cfg.get("limits", {}).get("max_json_bytes", 1 << 20))
            node_pid = cluster.supervisors[0].process.pid
            node = psutil.Process(node_pid) if node_pid else None
            for name in ["unloaded", *(args.attack or ATTACKS)]:
                print(f"  {name} ...", flush=True)
                phases.append(run_phase(name, ep, args, gw, node))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the gateway and nodes", file=sys.stderr)
            return 130
    base = phases[0]
    rows = [summarize(p, None if p is base else base, args) for p in phases]
    print(f"\nmachine: {machine}")
    print(
        f"victim:  {VICTIM}, iris batch 1 binary, {args.rate:g}/s for {args.seconds:g}s per "
        f"phase; attacker: {args.connections} connections, JSON bodies cap "
        f"{args.json_cap} +/- 1 byte"
    )
    report(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "phases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
