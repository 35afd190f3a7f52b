"""Verified text: what spot-check and redundant cost against plain `none`, side by side.

Run: ``.venv/bin/python bench/llm_verify.py [--answers 20] [--tokens 32] [--delays 0,20]``

Three tritonservers from the project's launcher (providers prov-a/b/c) serving the
shipped tiny GPT and its scoring model, driven at the routing level (the pieces the client
surface calls: gateway/routing/streaming.py, gateway/verify/text_check.py), per node
variant (``--delays``: the generate model's sleep per token in ms, ZTGATE_TOKEN_DELAY_MS;
0 is the model's own ~1 ms pace, 20 stands in for a model whose tokens cost real time).
Per answer, greedy, prose prompts, ``--tokens`` tokens:

* ``none``: one stream; latency to the first and to the last token;
* ``spot-check``: the same stream, then one teacher-forced pass on another provider
  (`score_answer`, off the request path: the client's latency is `none`'s); its extra
  node time is that pass's wall time (an upper bound: it includes the network);
* ``redundant``: `open_agreed_generation` with k=2; the extra node time is a second
  stream's whole generation, taken as the agreed stream's wall time.

Prints the medians and the ratio the issue aims at: spot-check's extra node time over
redundant's (aim: under 0.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import NodeConfig, Routing  # noqa: E402
from gateway.llm import tokenizer  # noqa: E402
from gateway.node.repository import build_repository  # noqa: E402
from gateway.node.triton import triton_home  # noqa: E402
from gateway.pki import PKI  # noqa: E402
from gateway.routing.node_client import NodeClient, NodeCredentials  # noqa: E402
from gateway.routing.router import Router  # noqa: E402
from gateway.routing.streaming import (  # noqa: E402
    GenerateCall,
    open_agreed_generation,
    open_generation,
    score_answer,
)
from gateway.state.memory import MemoryStore  # noqa: E402
from tests.conftest import LLM_MODEL, SITE, TritonCluster, llm_entries, llm_nodes  # noqa: E402

LAYOUT = (("v1", "eu-west", "prov-a"), ("v2", "eu-central", "prov-b"), ("v3", "eu-north", "prov-c"))
WORDS = (
    "the value of an expression is",
    "a function call evaluates its",
    "names refer to objects and are",
    "an exception is raised when the",
)


def router_for(cluster: TritonCluster) -> Router:
    creds = NodeCredentials(cluster.node_ca, cluster.gateway_cert, cluster.gateway_key)
    clients = [
        NodeClient(
            NodeConfig(
                name=n.name,
                address=n.address,
                region=n.region,
                provider=n.provider,
                dns_name=n.dns_name,
                spiffe_id=n.spiffe_id,
                models=(LLM_MODEL,),
            ),
            creds.channel_credentials(),
        )
        for n in cluster.nodes.values()
    ]
    return Router.from_clients(clients, MemoryStore(), Routing())


async def measure(cluster: TritonCluster, answers: int, tokens: int) -> dict[str, float]:
    router = router_for(cluster)
    rows: dict[str, list[float]] = {
        k: [] for k in ("none_ttft", "none_all", "score", "red_ttft", "red_all")
    }
    bound = {"first_token_timeout_s": 30.0, "token_timeout_s": 10.0}
    try:
        for i in range(answers + 1):  # the first is a warm-up
            prompt = tokenizer.encode(WORDS[i % len(WORDS)][: 12 + i % 16])
            call = GenerateCall(LLM_MODEL, prompt, tokens, 0.0, 1.0, 0, "bench")
            t0 = time.perf_counter()
            gen = await open_generation(router, call, only=lambda n: n.name == "v1", **bound)
            got, first = [], 0.0
            async for t in gen.tokens():
                first = first or time.perf_counter() - t0
                got.append(t)
            done = time.perf_counter() - t0
            t1 = time.perf_counter()
            await score_answer(
                router,
                LLM_MODEL,
                prompt + tuple(got),
                len(got),
                0.0,
                only=lambda n: n.name == "v2",
                timeout_s=10.0,
            )
            scored = time.perf_counter() - t1
            t2 = time.perf_counter()
            agreed = await open_agreed_generation(
                router, call, 2, lambda n: n.name in ("v1", "v3"), **bound
            )
            red_first = 0.0
            async for _ in agreed.tokens():
                red_first = red_first or time.perf_counter() - t2
            red_all = time.perf_counter() - t2
            if i:
                for key, v in zip(rows, (first, done, scored, red_first, red_all), strict=True):
                    rows[key].append(v * 1000)
    finally:
        await router.close()
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--delays", default="0,20")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = PKI.init(root / "pki", sites=[SITE])
        home = triton_home(root / "home")
        repository = build_repository(llm_entries(root / "registry"), root / "repository")
        for delay in (int(d) for d in args.delays.split(",")):
            base = root / f"d{delay}"
            with llm_nodes(pki, home, repository, base, LAYOUT, delay) as cluster:
                r = asyncio.run(measure(cluster, args.answers, args.tokens))
            print(f"\ntoken delay {delay} ms: {args.answers} answers x {args.tokens} tokens")
            print(f"{'mode':<12}{'first ms':>10}{'last ms':>10}{'extra node ms':>15}")
            table = (
                ("none", r["none_ttft"], r["none_all"], 0.0),
                ("spot-check", r["none_ttft"], r["none_all"], r["score"]),
                ("redundant", r["red_ttft"], r["red_all"], r["red_all"]),
            )
            for mode, first, last, extra in table:
                print(f"{mode:<12}{first:>10.1f}{last:>10.1f}{extra:>15.1f}")
            ratio = r["score"] / r["red_all"]
            print(f"spot-check / redundant extra node time: {ratio:.3f}x (aim < 0.5x)")
            first_x, last_x = r["red_ttft"] / r["none_ttft"], r["red_all"] / r["none_all"]
            print(f"redundant / none latency: first {first_x:.2f}x, last {last_x:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
