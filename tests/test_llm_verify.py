"""Verified text from untrusted nodes: teacher-forced spot checks and redundant agreement.

Real tritonservers only. Honest nodes: the shared `llm_cluster` (g1, g2; one onnxruntime
thread) and t2 here (two threads: float sums reorder). Liars, each a real node serving a
real model under the name tinygpt:

* sub  -- a different, smaller model: the same recipe (gateway/llm/train.py) with 1 layer,
  width 32, 40 steps and another seed (about 5 s to train here);
* flip -- the shipped model, whose node-side generate code (patched into its copy of the
  template) replaces each generated token, with chance 1/50, by another byte; its random
  stream is seeded, so the run is reproducible.

Every answer here is greedy and `max_tokens` short: the point is many answers cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.config import NodeConfig, Routing
from gateway.examples import SHIPPED_DIR
from gateway.job import NodeFilter
from gateway.llm import tokenizer
from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.protocol.problems import UpstreamFailed
from gateway.routing.node_client import NodeClient, NodeCredentials
from gateway.routing.router import Router
from gateway.routing.streaming import (
    AgreedGeneration,
    GenerateCall,
    open_agreed_generation,
    open_generation,
    score_answer,
)
from gateway.state.memory import MemoryStore
from gateway.verify.text_check import (
    DEFAULT_RULE,
    TextChecks,
    first_rejected,
    seed_draws,
    settle_divergence,
)
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes

FIRST_TOKEN_S = 30.0  # bounds, never assertions about speed
TOKEN_S = 10.0
FLIP_EVERY = 50
HONEST = ("g1", "g2", "t2")

_FLIP_ANCHOR = "                token = self._next(ids, temperature, top_p, rng)\n"
_FLIP_PATCH = (
    _FLIP_ANCHOR
    + f"                if self.flips.random() < 1.0 / {FLIP_EVERY}:\n"
    + "                    token = (token + 1 + int(self.flips.integers(255))) % 256\n"
)
_INIT_ANCHOR = "        self.lock = threading.Lock()\n"
_INIT_PATCH = "        self.flips = np.random.default_rng(50)\n" + _INIT_ANCHOR


def _substitute_model(path: Path) -> Path:
    from gateway.llm import train  # torch: only this fixture needs it

    path.write_bytes(train.export(train.train(40, layers=1, width=32, heads=2, seed=7)))
    return path


@pytest.fixture(scope="module")
def verify_cluster(
    pki: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    """t2 (honest, 2 threads, prov-c), sub (prov-s) and flip (prov-f)."""
    base = tmp_path_factory.mktemp("llm-verify")
    (entry,) = llm_entries(base / "registry")
    small = _substitute_model(base / "small.onnx")
    forged = dataclasses.replace(
        entry, path=small, sha256=hashlib.sha256(small.read_bytes()).hexdigest()
    )
    sub_repo = build_repository([forged], base / "sub-repository")
    flip_repo = build_repository([entry], base / "flip-repository")
    code = flip_repo / LLM_MODEL / "1" / "model.py"
    text = code.read_text()
    assert text.count(_FLIP_ANCHOR) == 1 and text.count(_INIT_ANCHOR) == 1
    code.write_text(text.replace(_FLIP_ANCHOR, _FLIP_PATCH).replace(_INIT_ANCHOR, _INIT_PATCH))
    layout = (
        ("t2", "eu-north", "prov-c"),
        ("sub", "eu-south", "prov-s"),
        ("flip", "eu-east", "prov-f"),
    )
    per_node = {
        "t2": (llm_repository, {"ZTGATE_ORT_THREADS": "2"}),
        "sub": (sub_repo, {}),
        "flip": (flip_repo, {}),
    }
    with llm_nodes(pki, triton_home, llm_repository, base, layout, per_node=per_node) as c:
        yield c


def _config(cluster: TritonCluster, name: str) -> NodeConfig:
    n = cluster.nodes[name]
    return NodeConfig(
        name=n.name,
        address=n.address,
        region=n.region,
        provider=n.provider,
        dns_name=n.dns_name,
        spiffe_id=n.spiffe_id,
        models=(LLM_MODEL,),
    )


def make_router(*clusters: TritonCluster, names: tuple[str, ...] | None = None) -> Router:
    first = clusters[0]
    creds = NodeCredentials(first.node_ca, first.gateway_cert, first.gateway_key)
    configs = [_config(c, n) for c in clusters for n in c.nodes if names is None or n in names]
    clients = [NodeClient(n, creds.channel_credentials()) for n in configs]
    # Charges must not eject a liar here: the tests count every answer it gives.
    routing = Routing(eject_after_failures=1_000_000)
    return Router.from_clients(clients, MemoryStore(), routing)


def prompts(count: int) -> list[tuple[int, ...]]:
    """`count` distinct prose prompts cut mid-sentence from the stdlib text the tiny GPT
    was trained on. Prose, not code: after an indented line any byte model, the real one
    too, answers with runs of spaces, and two identical answers show nothing."""
    spec = importlib.util.find_spec("pydoc_data.topics")
    assert spec is not None and spec.origin is not None
    runs = re.findall(rb"[A-Za-z][a-z]+(?: [a-z]+){3,}", Path(spec.origin).read_bytes())
    step = len(runs) // count
    return [tuple(runs[i * step][: 12 + i % 20]) for i in range(count)]


def greedy(prompt: tuple[int, ...], max_tokens: int) -> GenerateCall:
    return GenerateCall(LLM_MODEL, prompt, max_tokens, 0.0, 1.0, 0, "test")


def only(*names: str) -> NodeFilter:
    return lambda n: n.name in names


async def answer(router: Router, call: GenerateCall, node: str) -> list[int]:
    gen = await open_generation(
        router, call, only=only(node), first_token_timeout_s=FIRST_TOKEN_S, token_timeout_s=TOKEN_S
    )
    return [t async for t in gen.tokens()]


# --------------------------------------------------------------------------- scoring


async def test_one_teacher_forced_pass_scores_every_answer_token(
    llm_cluster: TritonCluster,
) -> None:
    router = make_router(llm_cluster)
    call = greedy(tokenizer.encode("def main("), 20)
    try:
        tokens = await answer(router, call, "g1")
        node, scores = await score_answer(
            router,
            LLM_MODEL,
            call.prompt_ids + tuple(tokens),
            len(tokens),
            0.0,
            only=only("g2"),
            timeout_s=TOKEN_S,
        )
        # Control built the same way: one token replaced by another byte.
        forged = list(tokens)
        forged[7] = (forged[7] + 1) % 256
        _, bad = await score_answer(
            router,
            LLM_MODEL,
            call.prompt_ids + tuple(forged),
            len(forged),
            0.0,
            only=only("g2"),
            timeout_s=TOKEN_S,
        )
        with pytest.raises(UpstreamFailed):  # a bad request is refused, not a hang
            await score_answer(
                router,
                LLM_MODEL,
                call.prompt_ids,
                len(call.prompt_ids),
                0.0,
                only=only("g2"),
                timeout_s=TOKEN_S,
            )
    finally:
        await router.close()
    assert node == "g2" and len(tokens) == 20
    assert list(scores.argmax) == tokens and max(scores.gap) == 0.0
    assert first_rejected(tokens, scores, 0.0, DEFAULT_RULE) is None
    assert first_rejected(forged, bad, 0.0, DEFAULT_RULE) == 7 and bad.gap[7] > 1.0
    # The node's margins are the in-process model's, position by position.
    session = ort.InferenceSession(
        str(SHIPPED_DIR / "tinygpt.onnx"), providers=["CPUExecutionProvider"]
    )
    ids = list(call.prompt_ids) + tokens
    for i in range(len(tokens)):
        logits = session.run(None, {"input_ids": np.asarray([ids[: len(call.prompt_ids) + i]])})[0][
            0
        ]
        top = np.sort(logits)[-2:]
        assert abs((top[1] - top[0]) - scores.margin[i]) < 1e-3


# --------------------------------------------------------------------------- spot checks

FIGURES: dict[str, float] = {}  # what the tests measured (docs/reputation.md, "Text")


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    yield
    print("\ntext verification figures:", {k: round(v, 4) for k, v in FIGURES.items()})


async def check_answers(
    cluster_nodes: tuple[TritonCluster, ...],
    node: str,
    checkers: tuple[str, ...],
    count: int,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> tuple[list[str], list[int], TextChecks]:
    """`count` answers of `node` (greedy, or sampled with a seed per answer), each
    spot-checked by the others in `checkers`: (verdict per answer, tokens per answer, the
    checker)."""
    router = make_router(*cluster_nodes)
    checks = TextChecks(router, timeout_s=TOKEN_S)
    allowed = only(node, *checkers)
    verdicts, lengths = [], []
    try:
        for i, prompt in enumerate(prompts(count)):
            call = dataclasses.replace(
                greedy(prompt, max_tokens), temperature=temperature, top_p=top_p, seed=i
            )
            tokens = await answer(router, call, node)
            verdict, _, _ = await checks.check(call, tuple(tokens), node, allowed)
            verdicts.append(verdict)
            lengths.append(len(tokens))
    finally:
        await router.close()
    return verdicts, lengths, checks


async def test_honest_nodes_with_other_thread_counts_are_never_charged(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    """500 answers: g1 (1 thread) checked by t2 (2 threads), t2 by g1/g2. The positive
    control is the substitute test below, built the same way."""
    clusters = (llm_cluster, verify_cluster)
    a, _, checks_a = await check_answers(clusters, "g1", ("t2",), 250, 8)
    b, _, checks_b = await check_answers(clusters, "t2", ("g1", "g2"), 250, 8)
    assert a.count("confirmed") == 250 and b.count("confirmed") == 250
    for checks in (checks_a, checks_b):
        assert checks.counts["contradicted"] == 0
        assert all(s.failed == 0 and s.charges == 0 for s in checks.router.nodes.values())
        FIGURES["honest tokens accepted by the tie margin"] = (
            FIGURES.get("honest tokens accepted by the tie margin", 0)
            + checks.counts["tie-accepted"]
        )
        FIGURES["honest largest gap"] = max(
            FIGURES.get("honest largest gap", 0), checks.max_tie_gap
        )
    FIGURES["honest charges in 500"] = 0


async def test_substitute_model_is_caught_by_spot_check(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    verdicts, _, checks = await check_answers(
        (llm_cluster, verify_cluster), "sub", ("g1", "t2"), 200, 8
    )
    caught = verdicts.count("contradicted")
    FIGURES["substitute caught by spot-check"] = caught / 200
    assert caught >= 198, caught
    assert checks.router.nodes["sub"].failed == caught  # charged once per caught answer
    assert checks.router.nodes["g1"].failed == checks.router.nodes["t2"].failed == 0


async def test_sampled_answers_are_checked_by_replaying_the_gateway_seed(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    """Temperature 0.7, top_p 0.9, the gateway's seed per answer: 100 honest answers (g1,
    checked by t2 with another thread count) all pass; the substitute's are caught. Controls
    built the same way on one honest answer: the same tokens pass; checked against another
    seed (a node that sampled with its own) they fail; so does one token replaced by the
    model's least likely one, which the probability floor alone also rejects."""
    clusters = (llm_cluster, verify_cluster)
    sampled = {"temperature": 0.7, "top_p": 0.9}
    honest, _, _ = await check_answers(clusters, "g1", ("t2",), 100, 16, **sampled)
    lying, _, _ = await check_answers(clusters, "sub", ("g1", "t2"), 100, 16, **sampled)
    FIGURES["sampled substitute caught"] = lying.count("contradicted") / 100
    assert honest.count("confirmed") == 100
    assert lying.count("contradicted") >= 95  # measured: 99 of 100
    router = make_router(*clusters)
    call = dataclasses.replace(greedy(prompts(1)[0], 16), seed=3, temperature=0.7, top_p=0.9)
    session = ort.InferenceSession(
        str(SHIPPED_DIR / "tinygpt.onnx"), providers=["CPUExecutionProvider"]
    )
    try:
        tokens = await answer(router, call, "g1")
        prefix = np.asarray([list(call.prompt_ids) + tokens[:5]], dtype=np.int64)
        forged = list(tokens)
        forged[5] = int(np.argmin(session.run(None, {"input_ids": prefix})[0][0]))
        verdicts = []
        for given, seed in ((tokens, 3), (tokens, 4), (forged, 3)):
            _, scores = await score_answer(
                router,
                LLM_MODEL,
                call.prompt_ids + tuple(given),
                len(given),
                call.temperature,
                only=only("t2"),
                timeout_s=TOKEN_S,
                top_p=call.top_p,
            )
            draws = seed_draws(seed, len(given))
            verdicts.append(first_rejected(given, scores, call.temperature, DEFAULT_RULE, draws))
        floor_only = first_rejected(forged, scores, call.temperature, DEFAULT_RULE)
    finally:
        await router.close()
    assert verdicts[0] is None and verdicts[1] is not None and verdicts[2] == 5
    assert floor_only == 5


async def test_flipper_catch_rate_matches_the_prediction(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    """Predicted: an answer of n tokens holds a flip with chance 1 - (1 - 1/50)^n, and a
    flip (a random other byte) is caught whenever it lands outside the tie margin,
    which a random byte does all but never."""
    verdicts, lengths, _ = await check_answers(
        (llm_cluster, verify_cluster), "flip", ("g1", "t2"), 300, 24
    )
    predicted = sum(1 - (1 - 1 / FLIP_EVERY) ** n for n in lengths) / len(lengths)
    measured = verdicts.count("contradicted") / len(verdicts)
    FIGURES["flipper predicted"], FIGURES["flipper measured"] = predicted, measured
    assert set(verdicts) == {"confirmed", "contradicted"}
    assert abs(predicted - measured) <= 0.05, (predicted, measured)


async def test_a_lying_checker_cannot_get_an_honest_node_charged(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    """The substitute node checks an honest answer and rejects it: the third provider
    sides with the answer and the checker is charged. Control, built the same way with an
    honest checker: the answer is confirmed without a tiebreak."""
    router = make_router(llm_cluster, verify_cluster)
    checks = TextChecks(router, timeout_s=TOKEN_S)
    call = greedy(prompts(1)[0], 12)
    try:
        tokens = tuple(await answer(router, call, "g1"))
        # The lying checker first: a slow latency estimate makes t2 the second choice.
        router.nodes["t2"].ewma_s = 1e6
        lied = await checks.check(call, tokens, "g1", only("g1", "sub", "t2"))
        honest = await checks.check(call, tokens, "g1", only("g1", "t2"))
    finally:
        await router.close()
    assert lied == ("confirmed", ("g1", "t2"), "a tiebreak accepts every token")
    assert router.nodes["sub"].failed == 1 and router.nodes["g1"].failed == 0
    assert honest[:2] == ("confirmed", ("g1", "t2"))


async def test_checks_run_off_a_bounded_queue_into_signed_late_evidence(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    import asyncio
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.receipts.entry import LogEntry
    from gateway.receipts.late import verify_late_evidence
    from gateway.receipts.signing import KeySet, Signer
    from gateway.verify.text_check import KIND, recorder

    class Sink:  # the receipt log's interface; the real log is tested with tensor checks
        def __init__(self) -> None:
            self.signer = Signer(ed25519.Ed25519PrivateKey.generate())
            self.docs: list[tuple[LogEntry, bytes]] = []

        async def record_document(self, entry: LogEntry, record: bytes) -> int:
            self.docs.append((entry, record))
            return len(self.docs)

    sink = Sink()
    router = make_router(llm_cluster, verify_cluster)
    checks = TextChecks(router, max_queue=2, workers=1, timeout_s=TOKEN_S, record=recorder(sink))
    stop = asyncio.Event()
    allowed = only("g1", "sub", "g2", "t2")
    try:
        honest, lying = greedy(prompts(2)[0], 10), greedy(prompts(2)[1], 10)
        offered = [
            checks.offer(honest, await answer(router, honest, "g1"), "g1", allowed, "r-honest"),
            checks.offer(lying, await answer(router, lying, "sub"), "sub", allowed, "r-lying"),
            checks.offer(honest, [1, 2], "g1", allowed, "r-dropped"),  # the queue is full
        ]
        runner = asyncio.create_task(checks.run(stop))
        await checks.drain()
        stop.set()
        await runner
    finally:
        await router.close()
    keys = KeySet()
    keys.add(sink.signer.public_key, dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    docs = {e.ref: verify_late_evidence(raw, keys, e.ref) for e, raw in sink.docs}
    assert offered == [True, True, False]
    assert {r: d["verdict"] for r, d in docs.items()} == {
        "r-honest": "confirmed",
        "r-lying": "contradicted",
        "r-dropped": "check-missing",
    }
    assert {d["kind"] for d in docs.values()} == {KIND}
    assert checks.counts["dropped"] == 1


# --------------------------------------------------------------------------- redundant


async def agreed(
    router: Router, call: GenerateCall, allowed: NodeFilter
) -> tuple[list[int], AgreedGeneration]:
    gen = await open_agreed_generation(
        router, call, 2, allowed, first_token_timeout_s=FIRST_TOKEN_S, token_timeout_s=TOKEN_S
    )
    return [t async for t in gen.tokens()], gen


async def test_redundant_streams_only_agreed_tokens_and_honest_nodes_agree(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    router = make_router(llm_cluster, verify_cluster)
    try:
        diverged = 0
        for prompt in prompts(100):
            call = greedy(prompt, 8)
            _, gen = await agreed(router, call, only("g1", "t2"))
            diverged += gen.finish_reason != "length"
        single = await answer(router, greedy(prompts(1)[0], 8), "g1")
        first, _ = await agreed(router, greedy(prompts(1)[0], 8), only("g1", "t2"))
        # Early stop by the consumer: every node's stream is cancelled and released.
        gen = await open_agreed_generation(
            router,
            greedy(prompts(1)[0], 50),
            2,
            only("g1", "t2"),
            first_token_timeout_s=FIRST_TOKEN_S,
            token_timeout_s=TOKEN_S,
        )
        async for _ in gen.tokens():
            break
        await gen.aclose()
    finally:
        await router.close()
    assert diverged == 0 and first == single
    assert gen.finish_reason == "cancelled" and set(gen.nodes) == {"g1", "t2"}
    assert all(s.pending == 0 for s in router.nodes.values())
    assert sum(router.unresolved_disagreements.values()) == 0


async def test_redundant_catches_the_substitute_and_a_third_provider_settles_it(
    llm_cluster: TritonCluster, verify_cluster: TritonCluster
) -> None:
    router = make_router(llm_cluster, verify_cluster)
    try:
        caught, settled = 0, []
        for i, prompt in enumerate(prompts(200)):
            call = greedy(prompt, 8)
            tokens, gen = await agreed(router, call, only("g1", "sub"))
            if gen.finish_reason == "diverged":
                caught += 1
                assert gen.divergence == len(tokens) and set(gen.nodes) == {"g1", "sub"}
                if i < 5:  # the tiebreak, on a few: g1's token is accepted, sub's is not
                    proposals = dict(zip(gen.nodes, gen.proposals, strict=True))
                    settled.append(
                        await settle_divergence(
                            router, call, tokens, proposals, only("g1", "sub", "g2")
                        )
                    )
    finally:
        await router.close()
    FIGURES["substitute caught by redundant"] = caught / 200
    assert caught >= 198, caught
    assert settled and all(s == ("sub",) for s in settled)
    assert router.nodes["g1"].failed == 0
