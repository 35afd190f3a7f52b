"""Tracing off costs (almost) nothing: CPU per request through the whole request pipeline.

Run: ``.venv/bin/python bench/telemetry.py [--requests 2000] [--rounds 7]``

In one process, without sockets: a real gateway (dev PKI, the shipped iris model and
policies, state in memory, receipts off) whose node client answers from memory, so the
CPU measured is the gateway's own per request (identity, admission, policy, decode,
routing, the reply check, the response body), which makes any overhead look as large as
it can. Three variants, interleaved round by round, median of the rounds:

* ``bare``  every telemetry call (stage timers and spans, the request scope, node-attempt
  spans) replaced by a no-op: the gateway as if it had no telemetry code at all.
* ``untraced``  the stage timers and metrics kept, every tracing branch taken out
  (`Stage` without its tracer check, no traceparent lookup): the same gateway with no
  tracing code. ``off`` against this is the cost of tracing while off (target: 2%).
* ``off``   as shipped, tracing off (no OTEL_TRACES_EXPORTER): what production runs.
* ``on``    tracing on, spans to an in-memory exporter (for scale; not the 2% target).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import telemetry
from gateway.app import Gateway, respond
from gateway.node.repository import build_repository
from gateway.pipeline import Incoming, body_of
from gateway.pki import PKI
from gateway.protocol.problems import RateLimited
from gateway.protocol.tensors import Tensor
from gateway.registry import Registry, seed_examples
from gateway.runtime import build_gateway
from tests.gateway_harness import gateway_config

BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}'
HEADERS = {"content-type": "application/json", "content-length": str(len(BODY))}


def build(root: Path) -> tuple[Gateway, dict[str, Any]]:
    pki = PKI.init(root / "pki", sites=["site-a"])
    registry = Registry.open(root / "registry")
    seed_examples(registry)
    build_repository(list(registry.entries()), root / "repository")
    n1 = {
        "name": "n1",
        "address": "127.0.0.1:1",  # never called: the client below answers from memory
        "region": "eu-west",
        "provider": "prov-a",
        "dns_name": pki.node_dns_name("n1"),
        "spiffe_id": f"spiffe://{pki.trust_domain}/node/n1",
    }
    cfg = gateway_config(
        pki, root / "registry", root / "data", [n1], receipts={"signing_key": None, "log_key": None}
    )
    gw = build_gateway(cfg)
    probs = np.array([[0.9, 0.05, 0.05]], np.float32)

    async def infer(*_: Any, **__: Any) -> list[Tensor]:
        return [Tensor("probabilities", "FP32", (1, 3), probs)]

    for state in gw.router.nodes.values():
        state.client.infer = infer  # type: ignore[method-assign]

    async def take_token(*_: Any) -> tuple[bool, float]:
        return True, 0.0  # the shipped @rate would stop the bench, not a client

    gw.store.take_token = take_token  # type: ignore[method-assign,assignment]
    cert = pki.ensure("client", "bench").cert.read_text()
    return gw, {"extensions": {"tls": {"client_cert_chain": [cert]}}}


async def run(gw: Gateway, scope: dict[str, Any], n: int) -> float:
    """CPU seconds per request over `n` requests."""
    start = time.process_time()
    for _ in range(n):
        came = Incoming(scope=scope, headers=HEADERS, body=body_of(BODY), model="iris")
        response = await gw.pipeline.infer(came, lambda answer: respond(gw, answer))
        assert response.status_code == 200
    return (time.process_time() - start) / n


class _Null:
    span = None

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def set(self, **_: object) -> None:
        return None


NULL = _Null()


@contextlib.contextmanager
def bare(gw: Gateway) -> Any:
    """Every telemetry call a no-op (the gateway without telemetry code)."""
    import gateway.pipeline as pipeline
    import gateway.routing.router as router

    pl, rt = vars(pipeline), vars(router)
    saved = (pl["note"], rt["span"], gw.pipeline.telemetry)

    class NoTelemetry:
        def stage(self, *_: object, **__: object) -> _Null:
            return NULL

        def request(self, *_: object, **__: object) -> _Null:
            return NULL

    pl["note"] = lambda **_: None
    rt["span"] = lambda *_, **__: NULL
    gw.pipeline.telemetry = NoTelemetry()  # type: ignore[assignment]
    try:
        yield
    finally:
        pl["note"], rt["span"], gw.pipeline.telemetry = saved


@contextlib.contextmanager
def untraced() -> Any:
    """Stages that only time and count: no tracer check, no span, no traceparent."""
    Stage = telemetry.Stage
    saved = (Stage.__enter__, Stage.__exit__, telemetry._parent)

    def enter(self: Any) -> Any:
        self._start = time.perf_counter()
        return self

    def exit_(self: Any, et: Any, exc: Any, tb: Any) -> None:
        if self._seconds is not None:
            self._seconds.observe(time.perf_counter() - self._start)
        if self._limited is not None and isinstance(exc, RateLimited):
            self._limited.inc()

    Stage.__enter__, Stage.__exit__ = enter, exit_  # type: ignore[method-assign]
    try:
        yield
    finally:
        Stage.__enter__, Stage.__exit__, _ = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def traced() -> Any:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    telemetry.enable_tracing([SimpleSpanProcessor(exporter)])
    try:
        yield
    finally:
        telemetry.shutdown_tracing()
        exporter.clear()


async def main_async(requests: int, rounds: int) -> dict[str, list[float]]:
    import logging

    logging.disable(logging.WARNING)  # the decision log would dominate what is measured
    with tempfile.TemporaryDirectory() as tmp:
        gw, scope = build(Path(tmp))
        await run(gw, scope, 300)  # warm-up
        results: dict[str, list[float]] = {"bare": [], "untraced": [], "off": [], "on": []}
        for _ in range(rounds):
            with bare(gw):
                results["bare"].append(await run(gw, scope, requests))
            with untraced():
                results["untraced"].append(await run(gw, scope, requests))
            results["off"].append(await run(gw, scope, requests))
            with traced():
                results["on"].append(await run(gw, scope, requests))
        return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    results = asyncio.run(main_async(args.requests, args.rounds))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.rounds} rounds x {args.requests} requests, median CPU per request:")
    for k, v in med.items():
        spread = f"{min(results[k]) * 1e6:.1f}-{max(results[k]) * 1e6:.1f}"
        print(f"  {k:8s} {v * 1e6:8.1f} us   (rounds {spread} us)")
    print(f"off vs untraced (tracing off): {100 * (med['off'] / med['untraced'] - 1):+.2f}%")
    print(f"off vs bare (all telemetry):   {100 * (med['off'] / med['bare'] - 1):+.2f}%")
    print(f"on  vs bare:                   {100 * (med['on'] / med['bare'] - 1):+.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
