"""Client traffic for the system suite: real mTLS requests with the customer's certificates."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.system.cluster import ProductionCluster

IRIS = [[5.1, 3.5, 1.4, 0.2]]
IRIS_PAIR = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
RISK = [[0.3, 1.2, -0.5, 0.8, 0.0, 1.5]]
PURPOSE = (("ztgate.purpose", "credit-decision"),)
# What the gateway says about an answer, by mode (ztgate.verification_status).
STATUS = {
    "none": {"unverified"},
    "redundant": {"agreed", "agreed-by-majority"},
    "zk": {"verified"},
    "mpc": {"semi-honest-mpc"},
}


@dataclass(frozen=True)
class Call:
    caller: str
    model: str
    mode: str
    replica: int
    expect: int  # 200, or 403 for a denial
    params: tuple[tuple[str, str], ...] = ()

    def body(self) -> dict[str, Any]:
        rows = RISK if self.model == "risk" else (IRIS if self.mode == "zk" else IRIS_PAIR)
        return {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [len(rows), len(rows[0])],
                    "data": [v for row in rows for v in row],
                }
            ],
            "parameters": {"ztgate.verification": self.mode, **dict(self.params)},
        }


@dataclass
class Result:
    call: Call
    status: int
    receipt_id: str | None
    coalesced: bool
    params: dict[str, Any]
    seconds: float
    detail: str


def receipt_from_header(header: str | None) -> tuple[str | None, bool]:
    """(receipt id, coalesced?) from `ztgate-receipt: ztgate-receipt/v1 <id> ...`."""
    if not header:
        return None, False
    parts = header.split(";")[0].split()
    return (parts[1] if len(parts) > 1 else None), "coalesced" in header


def send(cluster: ProductionCluster, clients: dict[str, httpx.Client], call: Call) -> Result:
    replica = cluster.replicas[call.replica]
    t0 = time.monotonic()
    r = clients[call.caller].post(f"{replica.base}/v2/models/{call.model}/infer", json=call.body())
    took = time.monotonic() - t0
    params: dict[str, Any] = {}
    rid, coalesced = receipt_from_header(r.headers.get("ztgate-receipt"))
    try:
        doc = r.json()
    except ValueError:
        doc = {}
    if r.status_code == 200:
        params = doc.get("parameters", {})
        rid = params.get("ztgate.receipt_id", rid)
    return Result(call, r.status_code, rid, coalesced, params, took, str(doc.get("detail", "")))


def burst_calls(k: int) -> list[Call]:
    """One busy moment: plain and redundant answers on both replicas, a zk proof every
    other burst, an mpc answer, and three kinds of denial."""
    calls = [Call("shop", "iris", "none", i % 2, 200) for i in range(6)]
    calls += [Call("shop", "iris", "redundant", i % 2, 200) for i in range(2)]
    if k % 2 == 0:
        calls.append(Call("ana", "iris", "zk", k // 2 % 2, 200))
    purpose = PURPOSE
    # mpc alternates replicas: parties serve each replica's session side by side.
    calls.append(Call("cleo", "risk", "mpc", k % 2, 200, purpose))
    calls += [
        Call("mallory", "iris", "none", k % 2, 403),  # not in the officer's identities
        Call("shop", "risk", "mpc", (k + 1) % 2, 403, purpose),  # not cleared for risk
        Call("shop", "iris", "zk", k % 2, 403),  # apps may not ask for zk
    ]
    return calls


@dataclass
class TrafficLog:
    results: list[Result] = field(default_factory=list)
    bursts: int = 0
    busy_s: float = 0.0
    idle_gaps_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def by_mode(self) -> dict[str, Counter[int]]:
        out: dict[str, Counter[int]] = {}
        for r in self.results:
            out.setdefault(r.call.mode, Counter())[r.status] += 1
        return out


def run_traffic(
    cluster: ProductionCluster,
    clients: dict[str, httpx.Client],
    min_seconds: float,
    gaps: tuple[float, ...],
) -> TrafficLog:
    """Bursts separated by idle gaps (each longer than the checkpoint interval) until at
    least `min_seconds` have passed."""
    log = TrafficLog()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        while time.monotonic() - start < min_seconds:
            t0 = time.monotonic()
            calls = burst_calls(log.bursts)
            log.results += list(pool.map(lambda c: send(cluster, clients, c), calls))
            log.busy_s += time.monotonic() - t0
            gap = gaps[log.bursts % len(gaps)]
            log.bursts += 1
            if time.monotonic() - start < min_seconds:
                time.sleep(gap)  # idle: the logs checkpoint and the witness cosigns meanwhile
                log.idle_gaps_s.append(gap)
    log.seconds = time.monotonic() - start
    return log
