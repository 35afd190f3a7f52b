"""Generative models on real nodes: the decoupled tiny GPT streams tokens over gRPC mTLS.

Real tritonservers from the project's launcher (tests/conftest.py `llm_cluster`, and a
module's own slow cluster whose model sleeps per token so a stream is still running when
the test acts on it); nothing mocked. A node that is down is a real closed port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.config import NodeConfig, Routing
from gateway.examples import SHIPPED_DIR, shipped_sums
from gateway.job import Job
from gateway.llm import tokenizer
from gateway.node.triton import NodeSupervisor
from gateway.pki import PKI
from gateway.ports import free_port
from gateway.protocol.problems import BadRequest, NoHealthyNode, UpstreamFailed
from gateway.protocol.tensors import Tensor
from gateway.registry import ModelEntry, Registry
from gateway.routing.node_client import NodeClient, NodeCredentials
from gateway.routing.router import Router
from gateway.routing.streaming import GenerateCall, Generation, open_generation
from gateway.state.memory import MemoryStore
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes

FIRST_TOKEN_S = 30.0  # generous: a bound, never an assertion about speed
TOKEN_S = 10.0
SLOW_MS = 40


@pytest.fixture(scope="module")
def slow_cluster(
    pki: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    """Two nodes (s1, s2) whose model sleeps SLOW_MS per token."""
    layout = (("s1", "eu-west", "prov-a"), ("s2", "eu-central", "prov-b"))
    base = tmp_path_factory.mktemp("llm-slow")
    with llm_nodes(pki, triton_home, llm_repository, base, layout, SLOW_MS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> ModelEntry:
    (found,) = llm_entries(tmp_path_factory.mktemp("llm-registry"))
    return found


def node_config(cluster: TritonCluster, name: str, address: str | None = None) -> NodeConfig:
    n = cluster.nodes[name]
    return NodeConfig(
        name=n.name,
        address=address or n.address,
        region=n.region,
        provider=n.provider,
        dns_name=n.dns_name,
        spiffe_id=n.spiffe_id,
        models=(LLM_MODEL,),
    )


def make_router(cluster: TritonCluster, nodes: list[NodeConfig], **routing: float) -> Router:
    creds = NodeCredentials(cluster.node_ca, cluster.gateway_cert, cluster.gateway_key)
    clients = [NodeClient(n, creds.channel_credentials()) for n in nodes]
    return Router.from_clients(clients, MemoryStore(), Routing(**routing))  # type: ignore[arg-type]


def call(prompt: str = "def ", max_tokens: int = 24, **kw: float) -> GenerateCall:
    return GenerateCall(
        model=LLM_MODEL,
        prompt_ids=tokenizer.encode(prompt),
        max_tokens=max_tokens,
        temperature=float(kw.get("temperature", 0.0)),
        top_p=float(kw.get("top_p", 1.0)),
        seed=int(kw.get("seed", 0)),
        request_id="test",
    )


async def generate(router: Router, c: GenerateCall, only: str | None = None) -> Generation:
    return await open_generation(
        router,
        c,
        only=None if only is None else (lambda n: n.name == only),
        first_token_timeout_s=FIRST_TOKEN_S,
        token_timeout_s=TOKEN_S,
    )


async def collect(gen: Generation) -> list[int]:
    return [t async for t in gen.tokens()]


def reference_greedy(prompt: tuple[int, ...], max_tokens: int) -> tuple[list[int], str]:
    """onnxruntime's own greedy decoding of the shipped model, in this process."""
    session = ort.InferenceSession(
        str(SHIPPED_DIR / "tinygpt.onnx"), providers=["CPUExecutionProvider"]
    )
    ids, out = list(prompt), list[int]()
    for _ in range(max_tokens):
        window = np.asarray([ids[-128:]], dtype=np.int64)
        token = int(np.argmax(session.run(None, {"input_ids": window})[0][0]))
        if token in tokenizer.END_TOKENS:
            return out, "stop"
        out.append(token)
        ids.append(token)
    return out, "length"


def outcomes(cluster: TritonCluster, name: str) -> list[tuple[str, int]]:
    """The node model's per-stream log lines: (outcome, tokens generated)."""
    text = cluster.nodes[name].process.log_path.read_text(errors="replace")
    return [(m[0], int(m[1])) for m in re.findall(r"ztgate-generate: (\w+) after (\d+)", text)]


# --------------------------------------------------------------------------- streams


async def test_greedy_stream_equals_onnxruntime_in_process(llm_cluster: TritonCluster) -> None:
    router = make_router(llm_cluster, [node_config(llm_cluster, "g1")])
    c = call("def ", max_tokens=40)
    try:
        gen = await generate(router, c)
        tokens = await collect(gen)
    finally:
        await router.close()
    want, reason = reference_greedy(c.prompt_ids, 40)
    assert tokens == want and gen.finish_reason == reason
    assert gen.node == "g1" and len(tokens) > 1
    text = tokenizer.Detokenizer().feed(tokens)
    assert text  # bytes the model chose decode to text (content is not the point)


async def test_same_seed_gives_same_tokens_on_two_nodes(llm_cluster: TritonCluster) -> None:
    router = make_router(llm_cluster, [node_config(llm_cluster, n) for n in ("g1", "g2")])
    sampled = call("class ", max_tokens=32, temperature=1.0, top_p=0.9, seed=1234)
    try:
        on_g1 = await collect(g1 := await generate(router, sampled, only="g1"))
        on_g2 = await collect(g2 := await generate(router, sampled, only="g2"))
        other_seed = await collect(
            await generate(router, dataclasses.replace(sampled, seed=99), only="g2")
        )
    finally:
        await router.close()
    assert (g1.node, g2.node) == ("g1", "g2")
    assert on_g1 == on_g2 and len(on_g1) > 4
    # Control, built the same way: the seed is what made them equal.
    assert other_seed != on_g1
    assert on_g1 != reference_greedy(sampled.prompt_ids, 32)[0]  # it did sample


async def test_max_tokens_ends_the_stream_with_length(llm_cluster: TritonCluster) -> None:
    router = make_router(llm_cluster, [node_config(llm_cluster, "g1")])
    try:
        gen = await generate(router, call("import ", max_tokens=3))
        tokens = await collect(gen)
    finally:
        await router.close()
    assert len(tokens) == 3 and gen.finish_reason == "length"
    assert router.nodes["g1"].pending == 0


async def test_cancellation_reaches_the_node_model(slow_cluster: TritonCluster) -> None:
    """aclose() after 3 tokens of 200: the node's model logs that it stopped early."""
    router = make_router(slow_cluster, [node_config(slow_cluster, "s1")])
    before = len(outcomes(slow_cluster, "s1"))
    try:
        # Control, built the same way: a stream left alone runs to max_tokens.
        whole = await collect(await generate(router, call("x", max_tokens=5)))
        gen = await generate(router, call("x", max_tokens=200))
        got = []
        async for token in gen.tokens():
            got.append(token)
            if len(got) == 3:
                break
        await gen.aclose()
        await gen.aclose()  # idempotent
    finally:
        await router.close()
    assert len(whole) == 5 and gen.finish_reason == "cancelled"
    # The node's health probes log their one-token streams in between: skip those.
    end = time.monotonic() + 60
    while True:
        found = [o for o in outcomes(slow_cluster, "s1")[before:] if o != ("length", 1)]
        if len(found) >= 2 or time.monotonic() > end:
            break
        await asyncio.sleep(0.05)
    assert found[0] == ("length", 5), found
    outcome, generated = found[1]
    # 200 tokens take the model at least 8 s; it stopped shortly after the third.
    assert outcome == "cancelled" and 3 <= generated < 200, found


async def test_node_down_before_first_token_is_retried_elsewhere(
    llm_cluster: TritonCluster,
) -> None:
    down = node_config(llm_cluster, "g2", address=f"127.0.0.1:{free_port()}")  # nothing there
    router = make_router(llm_cluster, [node_config(llm_cluster, "g1"), down])

    def prefer(name: str) -> None:  # power-of-two-choices takes the lower score
        for state in router.nodes.values():
            state.ewma_s = 1e-6 if state.config.name == name else 10.0

    try:
        prefer("g2")
        gen = await generate(router, call(max_tokens=4))
        tokens = await collect(gen)
        assert gen.node == "g1" and len(tokens) == 4
        assert router.retries == 1 and router.nodes["g2"].failed == 1
        # Control: with only the closed port to try, the stream fails as the router does.
        with pytest.raises(UpstreamFailed, match="g2"):
            await generate(router, call(max_tokens=4), only="g2")
        with pytest.raises(NoHealthyNode):
            await generate(router, call(max_tokens=4), only="nobody")
    finally:
        await router.close()


async def test_node_failure_after_first_token_ends_the_stream(
    slow_cluster: TritonCluster,
) -> None:
    """The node dies mid-answer: node-error, and no other node continues the answer."""
    router = make_router(slow_cluster, [node_config(slow_cluster, n) for n in ("s1", "s2")])
    node = slow_cluster.nodes["s2"]
    try:
        # Control, built the same way: without the kill the stream completes.
        whole = await collect(await generate(router, call("a", max_tokens=6), only="s2"))
        gen = await generate(router, call("a", max_tokens=200), only="s2")
        got = []
        async for token in gen.tokens():
            got.append(token)
            if len(got) == 2:
                pid = node.process.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
    finally:
        await router.close()
    assert len(whole) == 6
    assert gen.finish_reason == "node-error" and gen.node == "s2"
    assert 2 <= len(got) < 200 and got[:2] == whole[:2]
    assert router.retries == 0 and router.nodes["s1"].attempts == 0
    assert router.nodes["s2"].failed == 1
    assert node.supervisor.wait_healthy(90)  # the supervisor restarts it for later tests


# --------------------------------------------------------------------------- refusals, probes


async def test_unary_infer_to_a_generative_model_is_refused_before_any_node(
    llm_cluster: TritonCluster, entry: ModelEntry
) -> None:
    router = make_router(llm_cluster, [node_config(llm_cluster, "g1")], max_attempts=1)
    inputs = tuple(
        Tensor(
            s.name,
            s.datatype,
            (1,),
            np.zeros(
                1,
                dtype=np.int64
                if s.datatype == "INT64"
                else {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}[s.datatype],
            ),
        )
        for s in entry.inputs
    )

    def job(e: ModelEntry) -> Job:
        return Job(e, inputs, (), time.monotonic() + 30, lambda n: True, "test")

    try:
        with pytest.raises(BadRequest, match="generative"):
            await router.infer(job(entry))
        assert router.nodes["g1"].attempts == 0
        # Control, built the same way but without the generative mark: the request goes
        # to the node, whose decoupled model cannot answer a unary call.
        with pytest.raises(UpstreamFailed):
            await router.infer(job(dataclasses.replace(entry, generative=None)))
        assert router.nodes["g1"].attempts == 1
    finally:
        await router.close()


async def test_router_probe_readmits_a_generative_node_by_a_stream(
    llm_cluster: TritonCluster, entry: ModelEntry
) -> None:
    down = node_config(llm_cluster, "g2", address=f"127.0.0.1:{free_port()}")
    router = make_router(llm_cluster, [node_config(llm_cluster, "g1"), down])
    router.probe_models = {entry.name: entry}
    router.ejected = {"g1": 0.0, "g2": 0.0}
    try:
        await router.refresh()
    finally:
        await router.close()
    assert "g1" not in router.ejected  # its one-token stream answered
    assert "g2" in router.ejected  # control: a node that cannot stream stays out


def test_node_supervisor_probes_a_decoupled_model_by_generate_stream(
    llm_cluster: TritonCluster,
) -> None:
    sup: NodeSupervisor = llm_cluster.nodes["g1"].supervisor
    assert sup.wait_healthy(60)
    with sup.paused():
        assert sup._probe is not None and sup._probe[:2] == (LLM_MODEL, "generate_stream")
        assert sup.probe() is None
        # Control: the same probe against a model the node does not have fails.
        saved = sup._probe
        sup._probe = ("no-such-model", *saved[1:])
        try:
            assert sup.probe() is not None
        finally:
            sup._probe = saved


# --------------------------------------------------------------------------- recipe


@pytest.mark.slow
def test_recipe_reproduces_the_shipped_tinygpt() -> None:
    from gateway.llm import train

    data = train.build()
    assert hashlib.sha256(data).hexdigest() == shipped_sums()["tinygpt"]
    assert data == (SHIPPED_DIR / "tinygpt.onnx").read_bytes()


def test_shipped_tinygpt_is_registered_generative(tmp_path: Path) -> None:
    (got,) = llm_entries(tmp_path)
    assert got.name == LLM_MODEL and got.allowed_modes == ("none",)
    assert got.generative is not None
    assert got.generative.tokenizer_sha256 == tokenizer.TOKENIZER_SPEC_SHA256
    assert got.generative.end_tokens == (tokenizer.EOS,)
    assert Registry.open(tmp_path / "registry").get(LLM_MODEL) == got


def test_detokenizer_holds_back_split_characters() -> None:
    ids = tokenizer.encode("a€b")
    d = tokenizer.Detokenizer()
    pieces = [d.feed([i]) for i in ids]
    assert pieces == ["a", "", "", "€", "b"]
    assert d.feed([tokenizer.EOS]) == "" and d.flush() == ""
    d.feed(tokenizer.encode("€")[:2])
    assert d.flush() == "\ufffd"  # an unfinished character at the end


def test_chat_prompt_template() -> None:
    text = tokenizer.chat_prompt(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(ValueError, match="role"):
        tokenizer.chat_prompt([{"role": "root", "content": "x"}])


async def test_streams_on_one_node_run_concurrently(slow_cluster: TritonCluster) -> None:
    """A second stream gets its first token while the first is still generating: the node
    model does not serialise streams (its execute hands each to a thread)."""
    router = make_router(slow_cluster, [node_config(slow_cluster, "s1")])
    before = len(outcomes(slow_cluster, "s1"))
    try:
        first = await generate(router, call("p", max_tokens=200))
        second = await generate(router, call("q", max_tokens=3))
        assert len(await collect(second)) == 3
        await first.aclose()
    finally:
        await router.close()
    # The node's health probes log their one-token streams in between: wait for these two.
    end = time.monotonic() + 60
    while True:
        found = outcomes(slow_cluster, "s1")[before:]
        short = ("length", 3) in found
        cut = [n for o, n in found if o == "cancelled"]
        if (short and cut) or time.monotonic() > end:
            break
        await asyncio.sleep(0.05)
    # Serialised, the second stream would have waited for all 200 tokens of the first.
    assert short, found
    assert cut and min(cut) < 200, found
