"""Generative models: time to first token and tokens/s, straight to the node vs through the
gateway, side by side in one run.

Run: ``.venv/bin/python bench/llm.py [--streams 16] [--tokens 32] [--concurrency 8]``

One tritonserver per variant from the project's launcher serving the shipped tiny GPT
(``tinygpt``), and one gateway process (``python -m gateway serve``, dev PKI, receipts
on, the shipped policies, state in memory) in front of it. Two node variants:

* ``delay50``: the model sleeps 50 ms per token (ZTGATE_TOKEN_DELAY_MS): a model whose
  tokens come at the pace of a real one, the case the issue's aims are about
  (TTFT through the gateway at most 1.2x direct; tokens/s at least 0.9x direct);
* ``plain``: the tiny model's own pace (about a millisecond a token): what is measured is
  then mostly the gateway's fixed cost per stream and per token.

Two paths per variant, each sequentially and with ``--concurrency`` streams at once:

* ``direct``: the gateway's own node client (gRPC ModelStreamInfer over mTLS, channel
  kept open) to the node, in this process;
* ``gateway``: ``POST /v2/models/tinygpt/generate_stream`` over mTLS (httpx, keep-alive),
  opening and closing receipts included; TTFT is the first event with text.

Per stream: TTFT, and tokens/s = (tokens - 1) / (last token - first token). Greedy
(temperature 0), a fixed prompt, max_tokens = --tokens.

Where a gateway stream's first token waits: the gateway's own stage histogram
(``ztgate_stage_duration_seconds``, scraped from its /metrics before and after each
gateway run), the mean milliseconds per stream in each stage up to the first token
(identity, admission, decode, policy, token_limit, node_first_token: the node's stream
open and first token, receipt: what is left of the opening receipt's signing and fsync
once the first token is in: it is written while the node computes it), printed per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import NodeConfig  # noqa: E402
from gateway.llm import tokenizer  # noqa: E402
from gateway.node.repository import build_repository  # noqa: E402
from gateway.node.triton import triton_home  # noqa: E402
from gateway.pki import PKI  # noqa: E402
from gateway.ports import wait_ready  # noqa: E402
from gateway.routing.node_client import GenerateRequest, NodeClient, NodeCredentials  # noqa: E402
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes  # noqa: E402
from tests.gateway_harness import client_context, dev_toml, policy_dir  # noqa: E402

PROMPT = "def main():\n    "
Stream = Callable[[], Awaitable[tuple[float, float, int]]]  # -> (ttft_s, tokens/s, tokens)


FIRST_TOKEN_STAGES = (
    "identity",
    "admission",
    "decode",
    "pre_policy",
    "caps",
    "nonce",
    "policy",
    "token_limit",
    "node_first_token",
    "receipt",
)


def stage_totals(admin: str) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) per stage from the gateway's /metrics."""
    text = httpx.get(f"{admin}/metrics", timeout=30).text
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for suffix, i in (("_sum", 0), ("_count", 1)):
            head = f'ztgate_stage_duration_seconds{suffix}{{stage="'
            if line.startswith(head):
                stage = line[len(head) :].split('"', 1)[0]
                out.setdefault(stage, [0.0, 0.0])[i] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_profile(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean ms per call of each first-token stage between two scrapes."""
    prof = {}
    for stage in FIRST_TOKEN_STAGES:
        s0, n0 = before.get(stage, (0.0, 0.0))
        s1, n1 = after.get(stage, (0.0, 0.0))
        if n1 > n0:
            prof[stage] = (s1 - s0) / (n1 - n0) * 1000
    return prof


def summary(rows: list[tuple[float, float, int]], wall: float) -> dict[str, float]:
    ttft = sorted(r[0] * 1000 for r in rows)
    rate = [r[1] for r in rows if r[1] > 0]
    return {
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p90_ms": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "tok_s_per_stream": statistics.median(rate) if rate else 0.0,
        "tok_s_total": sum(r[2] for r in rows) / wall,
        "streams": len(rows),
    }


async def run(stream: Stream, n: int, concurrency: int) -> dict[str, float]:
    # Warm-up, `concurrency` streams at once: the channel, the node model, and as many
    # keep-alive TLS connections as the run will use (the gRPC channel multiplexes one;
    # without this, the first c=8 streams through the gateway pay 7 mTLS handshakes).
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    sem = asyncio.Semaphore(concurrency)

    async def one() -> tuple[float, float, int]:
        async with sem:
            return await stream()

    start = time.perf_counter()
    rows = await asyncio.gather(*(one() for _ in range(n)))
    return summary(list(rows), time.perf_counter() - start)


def direct(cluster: TritonCluster, name: str, tokens: int) -> tuple[Stream, NodeClient]:
    n = cluster.nodes[name]
    node = NodeConfig(
        name=n.name,
        address=n.address,
        region=n.region,
        provider=n.provider,
        dns_name=n.dns_name,
        spiffe_id=n.spiffe_id,
        models=(LLM_MODEL,),
    )
    creds = NodeCredentials(cluster.node_ca, cluster.gateway_cert, cluster.gateway_key)
    client = NodeClient(node, creds.channel_credentials())
    req = GenerateRequest(tokenizer.encode(PROMPT), tokens, 0.0, 1.0, 1)

    async def stream() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        s = await client.generate(LLM_MODEL, "1", req, timeout_s=120, request_id="bench")
        first = last = 0.0
        count = 0
        try:
            while (tok := await s.next(30, tokenizer.VOCAB)) is not None:
                if tok in tokenizer.END_TOKENS:
                    break
                last = time.perf_counter()
                first = first or last
                count += 1
        finally:
            s.cancel()
        return first - t0, (count - 1) / (last - first) if count > 1 else 0.0, count

    return stream, client


def through_gateway(base: str, http: httpx.AsyncClient, tokens: int) -> Stream:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": tokens, "temperature": 0}}
    url = f"{base}/v2/models/{LLM_MODEL}/generate_stream"

    async def stream() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first = last = 0.0
        count = 0
        async with http.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if "usage" in ev:
                    count = ev["usage"]["completion_tokens"]
                elif ev.get("text_output"):
                    last = time.perf_counter()
                    first = first or last
        return (
            first - t0,
            (count - 1) / (last - first) if count > 1 and last > first else 0.0,
            count,
        )

    return stream


@contextlib.contextmanager
def gateway(
    pki: PKI, root: Path, cluster: TritonCluster, registry: Path, concurrency: int
) -> Iterator[tuple[str, str]]:
    policies = policy_dir(root / "policies", ("bench",))
    toml = dev_toml(pki, registry, root / "gw-data", policies)
    toml = toml.replace("[policy]\n", '[policy]\npre_policy_rate = "1000000/minute"\n')
    toml += f"""
[receipts]
signing_key = "{pki.key_path("receipt-signing")}"
log_key = "{pki.key_path("log-checkpoint")}"
[logging]
decisions = "file:{root / "decisions.log"}"
[generate]
max_streams_per_identity = {max(16, concurrency)}
"""
    for n in cluster.nodes.values():
        toml += f"""
[[nodes]]
name = "{n.name}"
address = "{n.address}"
dns_name = "{n.dns_name}"
spiffe_id = "{n.spiffe_id}"
region = "{n.region}"
provider = "{n.provider}"
models = ["{LLM_MODEL}"]
"""
    config = root / "gateway.toml"
    config.write_text(toml)
    port = int(toml.split("port = ", 1)[1].split()[0])
    admin = int(toml.split("admin_port = ", 1)[1].split()[0])
    log = (root / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if not wait_ready(f"http://127.0.0.1:{admin}/readyz", 60, proc):
            raise RuntimeError(f"the gateway did not get ready; see {root / 'gateway.log'}")
        yield f"https://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def measure(
    pki: PKI, root: Path, cluster: TritonCluster, registry: Path, args: Any
) -> dict[str, dict[str, float]]:
    (name,) = cluster.nodes
    out: dict[str, dict[str, float]] = {}
    stream, client = direct(cluster, name, args.tokens)
    issued = pki.ensure("client", "bench")
    try:
        with gateway(pki, root, cluster, registry, args.concurrency) as (base, admin):
            ctx = client_context(pki, issued.cert, issued.key)
            limits = httpx.Limits(max_connections=args.concurrency + 2)
            async with httpx.AsyncClient(verify=ctx, timeout=120, limits=limits) as http:
                via = through_gateway(base, http, args.tokens)
                for c in (1, args.concurrency):
                    out[f"direct c={c}"] = await run(stream, args.streams, c)
                    before = stage_totals(admin)
                    out[f"gateway c={c}"] = await run(via, args.streams, c)
                    prof = stage_profile(before, stage_totals(admin))
                    out[f"gateway c={c}"].update({f"stage_{k}_ms": v for k, v in prof.items()})
    finally:
        await client.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--streams", type=int, default=16, help="measured streams per run")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per stream")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--only", choices=("delay50", "plain"), action="append")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cpu = platform.processor() or platform.machine()
    print(f"load average before: {os.getloadavg()} ({cpu}, {os.cpu_count()} CPUs)")
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ztgate-llm-bench-") as tmp:
        root = Path(tmp)
        pki = PKI.init(root / "pki", sites=["site-a"])
        home = triton_home(root / "triton-home")
        entries = llm_entries(root)
        repository = build_repository(entries, root / "repository")
        for variant, delay in (("delay50", 50), ("plain", 0)):
            if args.only and variant not in args.only:
                continue
            base = root / variant
            layout = ((f"b-{variant}", "eu-west", "prov-a"),)
            with llm_nodes(pki, home, repository, base, layout, delay) as cluster:
                results[variant] = asyncio.run(measure(pki, base, cluster, root / "registry", args))
            shutil.rmtree(base / "gw-data", ignore_errors=True)
    for variant, rows in results.items():
        print(f"\n{variant}: {args.streams} streams x {args.tokens} tokens per run")
        head = ("TTFT p50 ms", "TTFT p90 ms", "tok/s/stream", "tok/s total")
        print(f"{'path':<14}{head[0]:>12}{head[1]:>12}{head[2]:>14}{head[3]:>13}")
        for label, r in rows.items():
            print(
                f"{label:<14}{r['ttft_p50_ms']:>12.1f}{r['ttft_p90_ms']:>12.1f}"
                f"{r['tok_s_per_stream']:>14.1f}{r['tok_s_total']:>13.1f}"
            )
        for c in (1, args.concurrency):
            d, g = rows[f"direct c={c}"], rows[f"gateway c={c}"]
            print(
                f"  c={c}: TTFT gateway/direct {g['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x, "
                f"tokens/s gateway/direct {g['tok_s_per_stream'] / d['tok_s_per_stream']:.2f}x"
            )
            stages = {k[6:-3]: v for k, v in g.items() if k.startswith("stage_")}
            shown = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
            print(f"    gateway c={c}, mean ms per stream before its first token: {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
