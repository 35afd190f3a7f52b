"""Generative models through the gateway (issue 22, part B): Triton's generate extension
and the OpenAI-compatible surface with the official `openai` package, token policy, and
the opening and closing receipts around every stream.

One real tritonserver from the project's launcher serves the shipped tiny GPT with a
per-token sleep (SLOW_MS), so a stream is still running when a test acts on it; a real
gateway over real mTLS in front of it. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import httpx2
import openai
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import telemetry
from gateway.cli import main
from gateway.generate.ask import parse
from gateway.generate.meter import TokenMeter
from gateway.generate.routes import _sse
from gateway.generate.session import Stream
from gateway.generate.sse import EventStream
from gateway.generate.stop import StopScan
from gateway.pipeline.context import Caller, new_request_id
from gateway.pki import PKI
from gateway.policy.facts import TokenBudget, strictest_budgets
from gateway.policy.source import PolicyError, load_policy_dir
from gateway.protocol.problems import Forbidden, RateLimited
from gateway.receipts.commit import commit_tensor
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import Receipt, SignedReceipt
from gateway.receipts.stream import OUTPUT, PROMPT, token_tensor
from gateway.receipts.verify import Report, _check_stream_links
from gateway.state import StateStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from tests.conftest import LLM_MODEL, TritonCluster, free_port, llm_entries, llm_nodes
from tests.gateway_harness import (
    TEST_CALLERS,
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_gateway import node_table
from tests.test_telemetry import trace_of

SLOW_MS = 20  # per token: a 100-token stream stays open about 2 s
MARKER = "zq-secret-prompt-7731"  # client text that must appear nowhere the gateway keeps

TEST_POLICY = """
@id("test-capped")
forbid (
  principal == Ztgate::Client::"spiffe://ztgate.local/client/capped",
  action == Ztgate::Action::"infer",
  resource
)
when { context.max_tokens > 16 || context.prompt_tokens > 40 };

@id("test-budget")
@rate("600/minute")
@token_budget("120/week")
permit (
  principal == Ztgate::Client::"spiffe://ztgate.local/client/budget",
  action == Ztgate::Action::"infer",
  resource
)
when { context.max_tokens > 0 };
"""


@pytest.fixture(scope="module")
def llm_node(
    pki: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    layout = (("t1", "eu-west", "prov-a"),)
    base = tmp_path_factory.mktemp("gen-nodes")
    with llm_nodes(pki, triton_home, llm_repository, base, layout, SLOW_MS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def gateway(
    pki: PKI, llm_node: TritonCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("gen")
    llm_entries(tmp)
    policies = policy_dir(
        tmp / "policies", (*TEST_CALLERS, "capped", "budget", "cutter", "streamer")
    )
    (policies / "60-test-generate.cedar").write_text(TEST_POLICY)
    nodes = [{**n, "models": [LLM_MODEL]} for n in node_table(llm_node)]
    cfg = gateway_config(pki, tmp / "registry", tmp / "g", nodes, policy={"dir": str(policies)})
    with running_gateway(cfg) as gw:
        yield gw


def client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=60)


def openai_client(gw: RunningGateway, pki: PKI, name: str) -> openai.OpenAI:
    """The official client, unchanged: its HTTP client carries the client certificate,
    which is the identity; the API key is a placeholder the gateway never reads."""
    issued = pki.ensure("client", name)
    http = httpx2.Client(verify=client_context(pki, issued.cert, issued.key), timeout=60)
    return openai.OpenAI(
        base_url=f"{gw.base}/v1", api_key="not-used", http_client=http, max_retries=0
    )


def events(r: httpx.Response) -> list[dict[str, Any]]:
    out = []
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def stored(gw: RunningGateway) -> list[Receipt]:
    assert gw.gw.receipts is not None
    reader = ReceiptLog.open_readonly(gw.gw.receipts.log.path)
    try:
        return [SignedReceipt.from_bytes(b.body).receipt for b in reader.bodies()]
    finally:
        asyncio.run(reader.close())


def closing_of(gw: RunningGateway, opening: str) -> Receipt | None:
    found = [r for r in stored(gw) if r.kind == "close" and r.extensions.get("opening") == opening]
    return found[0] if found else None


def wait_for_closing(gw: RunningGateway, opening: str) -> Receipt:
    """The closing receipt is written when the gateway notices the client left: a bound on
    how long that may take, never an assertion about speed."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        found = closing_of(gw, opening)
        if found is not None:
            return found
        time.sleep(0.05)
    pytest.fail(f"no closing receipt for {opening}")


def chat(max_tokens: int = 8, content: str = "def ", mode: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": LLM_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if mode is not None:
        body["ztgate.verification"] = mode
    return body


def long_running(gw: RunningGateway, c: httpx.Client, tokens: int) -> dict[str, Any]:
    """A greedy request that runs to max_tokens (no early end token): greedy decoding is
    deterministic, so a stream of it stays open for tokens x SLOW_MS."""
    for prompt in ("def ", "import ", "class ", "hi", "the "):
        body = {"text_input": prompt, "parameters": {"max_tokens": tokens, "temperature": 0}}
        r = c.post(f"{gw.base}/v2/models/{LLM_MODEL}/generate", json=body)
        assert r.status_code == 200, r.text
        if r.json()["finish_reason"] == "length":
            return body
    pytest.fail("no probe prompt runs to max_tokens")


# ------------------------------------------------------------------------- the surfaces


def test_openai_client_chat_and_completions_streaming_and_not(
    gateway: RunningGateway, pki: PKI
) -> None:
    oa = openai_client(gateway, pki, "demo")
    models = [m.id for m in oa.models.list()]
    assert models == [LLM_MODEL]

    done = oa.chat.completions.create(
        model=LLM_MODEL, messages=[{"role": "user", "content": "def "}], max_tokens=8
    )
    assert isinstance(done.choices[0].message.content, str)
    assert done.usage is not None and 1 <= done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens > 4
    z = (done.model_extra or {})["ztgate"]
    assert z["receipt"]["kind"] == "close" and z["opening_receipt"]["kind"] == "open"
    closing = z["receipt"]["signed"]["receipt"]
    assert closing["ext"]["opening"] == z["opening_receipt"]["id"]
    assert closing["ext"]["completion_tokens"] == done.usage.completion_tokens

    chunks = list(
        oa.chat.completions.create(
            model=LLM_MODEL,
            messages=[{"role": "user", "content": "def "}],
            max_tokens=8,
            stream=True,
        )
    )
    first, last = (chunks[0].model_extra or {}), (chunks[-1].model_extra or {})
    assert first["ztgate"]["receipt"]["kind"] == "open"
    assert chunks[0].choices[0].delta.content == ""  # the receipt comes before any text
    assert last["ztgate"]["receipt"]["kind"] == "close"
    assert last["ztgate"]["opening_receipt_id"] == first["ztgate"]["receipt"]["id"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all("ztgate" not in (c.model_extra or {}) for c in chunks[1:-1])

    plain = oa.completions.create(model=LLM_MODEL, prompt="import ", max_tokens=6)
    assert plain.usage is not None and plain.usage.prompt_tokens == len(b"import ")
    assert isinstance(plain.choices[0].text, str)


def test_stream_options_include_usage_adds_openais_usage_chunk(
    gateway: RunningGateway, pki: PKI
) -> None:
    oa = openai_client(gateway, pki, "demo")
    ask: dict[str, Any] = {
        "model": LLM_MODEL,
        "messages": [{"role": "user", "content": "def "}],
        "max_tokens": 5,
        "stream": True,
    }
    chunks = list(oa.chat.completions.create(**ask, stream_options={"include_usage": True}))
    *rest, last = chunks
    assert last.choices == [] and last.usage is not None
    closing = (rest[-1].model_extra or {})["ztgate"]
    assert rest[-1].usage is None and closing["receipt"]["kind"] == "close"
    assert (
        last.usage.completion_tokens
        == closing["receipt"]["signed"]["receipt"]["ext"]["completion_tokens"]
    )
    # Control, built the same way: without the option every chunk has its choice.
    plain = list(oa.chat.completions.create(**ask))
    assert all(c.choices for c in plain) and plain[-1].usage is not None


def test_triton_generate_and_generate_stream(gateway: RunningGateway, pki: PKI) -> None:
    body = {"text_input": "def ", "parameters": {"max_tokens": 6, "temperature": 0}}
    with client(pki, "demo") as c:
        r = c.post(f"{gateway.base}/v2/models/{LLM_MODEL}/generate", json=body)
        assert r.status_code == 200, r.text
        whole = r.json()
        assert whole["model_name"] == LLM_MODEL and isinstance(whole["text_output"], str)
        rid = whole["ztgate"]["receipt_id"]
        read = c.get(f"{gateway.base}/v2/receipts/{rid}")
        assert read.status_code == 200
        assert read.json()["receipt"]["kind"] == "close"
        assert r.headers["ztgate-receipt"].split()[1] == rid

        with c.stream(
            "POST", f"{gateway.base}/v2/models/{LLM_MODEL}/generate_stream", json=body
        ) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            got = events(s)
    assert got[0]["ztgate"]["receipt"]["kind"] == "open" and got[0]["text_output"] == ""
    assert got[-1]["ztgate"]["receipt"]["kind"] == "close"
    outputs = got[-1]["ztgate"]["receipt"]["signed"]["receipt"]["outputs"]
    assert got[-1]["usage"]["completion_tokens"] == outputs[0]["shape"][0]
    assert "".join(e["text_output"] for e in got) == "".join(e["text_output"] for e in got[1:-1])


# ------------------------------------------------------------------------- refusals


def test_zk_and_mpc_are_refused_for_generative_models_with_the_reason(
    gateway: RunningGateway, pki: PKI
) -> None:
    with client(pki, "demo") as c:
        url = f"{gateway.base}/v1/chat/completions"
        for mode in ("zk", "mpc", "redundant"):
            r = c.post(url, json=chat(mode=mode))
            assert r.status_code == 403, r.text
            err = r.json()["error"]
            assert err["type"].endswith("/forbidden") and err["code"] == "forbidden"
            assert "does not apply to generative models" in err["message"]
        ok = c.post(url, json=chat(mode="none"))
        assert ok.status_code == 200, ok.text


def test_openai_errors_take_openai_shape_and_the_client_raises(
    gateway: RunningGateway, pki: PKI
) -> None:
    oa = openai_client(gateway, pki, "demo")
    with pytest.raises(openai.NotFoundError) as nf:
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body is not None
    with pytest.raises(openai.BadRequestError) as br:
        oa.chat.completions.create(
            model=LLM_MODEL, messages=[cast(Any, {"role": "robot", "content": "x"})]
        )
    assert "unknown chat role" in str(br.value)
    with client(pki, "demo") as c:  # over the model's own max_tokens
        r = c.post(f"{gateway.base}/v1/chat/completions", json=chat(max_tokens=100000))
        assert r.status_code == 400 and "max_tokens must be at most" in r.json()["error"]["message"]


def test_a_replayed_nonce_is_refused_on_the_generate_routes_too(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v1/chat/completions"
    with client(pki, "demo") as c:
        first = c.post(url, json=chat(max_tokens=2), headers={"ztgate-nonce": "gen-n-1"})
        assert first.status_code == 200, first.text
        again = c.post(url, json=chat(max_tokens=2), headers={"ztgate-nonce": "gen-n-1"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "replayed-request"
        fresh = c.post(url, json=chat(max_tokens=2), headers={"ztgate-nonce": "gen-n-2"})
        assert fresh.status_code == 200


def test_policy_caps_max_tokens_and_prompt_length_per_principal(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v1/chat/completions"
    with client(pki, "capped") as capped, client(pki, "demo") as demo:
        over = capped.post(url, json=chat(max_tokens=17))
        assert over.status_code == 403, over.text
        assert "test-capped" in over.json()["error"]["message"]
        assert capped.post(url, json=chat(max_tokens=16)).status_code == 200
        long_prompt = capped.post(url, json=chat(content="x" * 40))
        assert long_prompt.status_code == 403
        assert capped.post(url, json=chat(content="x" * 8)).status_code == 200
        # Another caller under the same permits is not capped by the forbid.
        assert demo.post(url, json=chat(max_tokens=17)).status_code == 200


def test_token_budget_reserves_while_streaming_and_settles_after(
    gateway: RunningGateway, pki: PKI
) -> None:
    """120 tokens a week for `budget`: a stream reserves prompt + max_tokens (over 100)
    while open, so a request for about 20 more is refused; cancelled early, the stream
    settles to what it used and the very same request fits."""
    url = f"{gateway.base}/v1/completions"
    with client(pki, "demo") as demo:
        prompt = long_running(gateway, demo, 100)["text_input"]
    body = {"model": LLM_MODEL, "prompt": prompt, "max_tokens": 100, "temperature": 0}
    small = {**body, "max_tokens": 16}
    with client(pki, "budget") as c:
        never = c.post(url, json={**body, "prompt": "x" * 20, "max_tokens": 101})
        assert never.status_code == 403 and "token limit" in never.json()["error"]["message"]
        with c.stream("POST", url, json={**body, "stream": True}) as s:
            assert s.status_code == 200
            lines = s.iter_lines()  # kept: dropping it mid-body closes the connection
            first = json.loads(next(lines)[6:])
            opening = first["ztgate"]["receipt"]["id"]
            held = c.post(url, json=small)
            assert held.status_code == 429, held.text
            assert held.json()["error"]["code"] == "rate-limited"
            assert "token limit of 120/week" in held.json()["error"]["message"]
        closing = wait_for_closing(gateway, opening)
        assert closing.extensions["finish_reason"] == "cancelled"
        used = closing.extensions["completion_tokens"]
        assert isinstance(used, int) and used < 100
        after = c.post(url, json=small)
        assert after.status_code == 200, after.text


def test_open_streams_per_identity_are_capped(gateway: RunningGateway, pki: PKI) -> None:
    """generate.max_streams_per_identity (4 here): a fifth concurrent generation is 429;
    once one stream has closed, the same request is served."""
    cap = gateway.cfg.generate.max_streams_per_identity
    url = f"{gateway.base}/v2/models/{LLM_MODEL}/generate_stream"
    small = {"text_input": "def ", "parameters": {"max_tokens": 2}}
    with client(pki, "streamer") as c, contextlib.ExitStack() as streams:
        body = long_running(gateway, c, 120)
        openings, readers = [], []
        for _ in range(cap):
            s = streams.enter_context(c.stream("POST", url, json=body))
            assert s.status_code == 200
            # Keep each line iterator: dropping one mid-body closes its connection.
            readers.append(s.iter_lines())
            openings.append(json.loads(next(readers[-1])[6:])["ztgate"]["receipt"]["id"])
        over = c.post(f"{gateway.base}/v2/models/{LLM_MODEL}/generate", json=small)
        assert over.status_code == 429, over.text
        assert f"at most {cap} open streams per client" in over.json()["detail"]
        streams.close()
        for opening in openings:
            wait_for_closing(gateway, opening)
        again = c.post(f"{gateway.base}/v2/models/{LLM_MODEL}/generate", json=small)
        assert again.status_code == 200, again.text


# ------------------------------------------------------------------------- receipts


def test_a_client_that_leaves_cancels_the_stream_and_still_gets_a_closing_receipt(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v2/models/{LLM_MODEL}/generate_stream"
    with client(pki, "demo") as demo:
        body = long_running(gateway, demo, 100)
    with client(pki, "cutter") as c, c.stream("POST", url, json=body) as s:
        lines = s.iter_lines()
        opening_event = json.loads(next(lines)[6:])
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
                if seen == 3:
                    break
    opening = opening_event["ztgate"]["receipt"]["id"]
    closing = wait_for_closing(gateway, opening)
    assert closing.extensions["finish_reason"] == "cancelled"
    sent = closing.extensions["completion_tokens"]
    assert isinstance(sent, int) and 3 <= sent < 100
    assert closing.outputs[0].shape == (sent,)
    assert closing.request_id == opening_event["ztgate"]["request_id"]
    # Only the client holds the salt: with it, the commitment opens to the prompt sent.
    open_receipt = next(r for r in stored(gateway) if r.receipt_id == opening)
    salt = base64.b64decode(opening_event["ztgate"]["salt"])
    prompt = token_tensor(PROMPT, tuple(body["text_input"].encode()))
    assert open_receipt.inputs[0].commitment == commit_tensor(prompt, salt)
    assert open_receipt.inputs[0].commitment != commit_tensor(prompt, b"\0" * 32)
    assert OUTPUT == closing.outputs[0].name


def test_prompt_and_output_text_never_reach_receipts_or_logs(
    gateway: RunningGateway, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with client(pki, "demo") as c:
        # The stop sequence is client text too (the marker never occurs in the answer).
        body = {**chat(content=MARKER), "stop": [MARKER]}
        r = c.post(f"{gateway.base}/v1/chat/completions", json=body)
        assert r.status_code == 200
        text = r.json()["choices"][0]["message"]["content"]
        denied = c.post(
            f"{gateway.base}/v1/chat/completions",
            json=chat(content=MARKER, mode="zk"),
        )
        assert denied.status_code == 403 and MARKER not in denied.text
    assert gateway.gw.receipts is not None
    blobs = b"".join(p.read_bytes() for p in gateway.gw.receipts.log.path.rglob("*") if p.is_file())
    assert MARKER.encode() not in blobs
    assert MARKER not in caplog.text
    # The positive control: the marker did go through (the answer shows the model got it).
    assert isinstance(text, str)
    assert any(r.kind == "open" for r in stored(gateway))


def test_ztgate_verify_pairs_the_closing_receipt_with_its_opening(
    gateway: RunningGateway, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"text_input": "def ", "parameters": {"max_tokens": 4, "temperature": 0}}
    with client(pki, "demo") as c:
        r = c.post(f"{gateway.base}/v2/models/{LLM_MODEL}/generate", json=body)
    z = r.json()["ztgate"]
    opening, closing = z["opening_receipt"]["id"], z["receipt_id"]
    assert gateway.gw.receipts is not None
    log = gateway.gw.receipts.log
    end = time.monotonic() + 30
    while log.proof(int(closing.split(".")[1])) is None:
        assert time.monotonic() < end, "no checkpoint covered the closing receipt"
        time.sleep(0.1)
    bundle, trust = tmp_path / "bundle", tmp_path / "trust.json"
    assert main(["audit", "export", "--log-dir", str(log.path.parent), str(bundle)]) == 0
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(log.path.parent)]) == 0
    trust.write_text(capsys.readouterr().out)
    # The client's salt opens the opening receipt's commitment to the prompt's tokens.
    prompt = {"name": PROMPT, "datatype": "INT64", "shape": [4], "data": list(b"def ")}
    salts = {opening: {"salt": z["salt"], "inputs": [prompt], "outputs": []}}
    (tmp_path / "salts.json").write_text(json.dumps(salts))
    args = ["verify", str(bundle), "--trust", str(trust), "--salts", str(tmp_path / "salts.json")]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mine = {(f["subject"], f["code"]) for f in report["findings"]}
    assert (f"receipt {closing}", "stream-linked") in mine
    assert report["receipts"][opening]["kind"] == "open"
    # Misremember the prompt and the same check fails.
    prompt["data"] = list(b"def!")
    (tmp_path / "salts.json").write_text(json.dumps(salts))
    assert main([*args, "--json"]) == 1
    capsys.readouterr()


def test_a_closing_receipt_that_names_another_stream_is_invalid() -> None:
    def facts(kind: str, index: int, request: str, opening: str | None = None) -> dict[str, Any]:
        return {
            "kind": kind,
            "log_id": "l",
            "index": index,
            "model": LLM_MODEL,
            "client": "spiffe://ztgate.local/client/demo",
            "request_id": request,
            "opening": opening,
        }

    good, bad = Report(), Report()
    good.receipts = {"o": facts("open", 1, "r1"), "c": facts("close", 2, "r1", "o")}
    bad.receipts = {"o": facts("open", 1, "r1"), "c": facts("close", 2, "r2", "o")}
    _check_stream_links(good)
    _check_stream_links(bad)
    assert [(f.status, f.code) for f in good.findings] == [("valid", "stream-linked")]
    assert [(f.status, f.code) for f in bad.findings] == [("invalid", "stream-link-mismatch")]


# ------------------------------------------------------------------------- units


def test_token_annotations_parse_and_the_strictest_per_window_wins() -> None:
    assert TokenBudget.per_minute("20000") == TokenBudget(20000, 60)
    assert TokenBudget.parse("1000000/day") == TokenBudget(1000000, 86400)
    with pytest.raises(ValueError):
        TokenBudget.parse("10/fortnight")
    got = strictest_budgets([TokenBudget(500, 60), TokenBudget(300, 60), TokenBudget(10**6, 86400)])
    assert got == (TokenBudget(300, 60), TokenBudget(10**6, 86400))


def test_a_forbid_cannot_carry_a_token_limit(tmp_path: Path) -> None:
    src = policy_dir(tmp_path / "p")
    (src / "70-bad.cedar").write_text(
        '@id("bad-budget")\n@token_budget("5/day")\n'
        "forbid (principal, action, resource) when { context.max_tokens > 9 };\n"
        '@id("bad-tpm")\n@tokens_per_minute("lots")\n'
        'permit (principal, action == Ztgate::Action::"infer", resource);\n'
    )
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(src)
    text = str(exc.value)
    assert "@token_budget belongs on a permit" in text
    assert "@tokens_per_minute" in text


def test_meter_reserves_all_windows_or_none_and_settles() -> None:
    now = [1000.0]
    meter = TokenMeter(MemoryStore(clock=lambda: now[0]), clock=lambda: now[0])
    budgets = (TokenBudget(100, 60), TokenBudget(120, 3600))

    async def run() -> None:
        a = await meter.reserve("id", budgets, 80)
        with pytest.raises(RateLimited):
            await meter.reserve("id", budgets, 30)  # 110 > 100 in the minute
        await meter.settle(a, 20)
        b = await meter.reserve("id", budgets, 30)  # 50 after the settle
        now[0] += 60  # a new minute; the hour still holds 50
        with pytest.raises(RateLimited):
            await meter.reserve("id", budgets, 80)  # the hour refuses: 130 > 120
        # ... and the minute's share of that refused reservation was given back.
        await meter.reserve("id", budgets, 70)
        with pytest.raises(Forbidden):
            await meter.reserve("id", budgets, 101)  # never fits the minute
        await meter.settle(b, 30)

    asyncio.run(run())


def test_two_replicas_on_one_redis_share_a_token_budget(redis_server: str) -> None:
    """The meters are in the shared store: what one replica reserved, the other sees;
    a refund on one frees tokens for the other. The memory store answers the same."""
    prefix = f"ztgate-test-{time.monotonic_ns()}:"

    async def run(a: StateStore, b: StateStore) -> list[tuple[bool, int]]:
        got = [
            await a.spend("k", 80, 100, 60),
            await b.spend("k", 30, 100, 60),  # 110 > 100: refused, nothing added
            await b.spend("k", 20, 100, 60),
            await a.spend("k", -50, 100, 60),  # a settle
            await b.spend("k", 30, 100, 60),
            await b.spend("k", -500, 100, 60),  # never below zero
        ]
        for s in {id(a): a, id(b): b}.values():
            await s.close()
        return got

    want = [(True, 80), (False, 80), (True, 100), (True, 50), (True, 80), (True, 0)]
    replicas = asyncio.run(
        run(RedisStore(redis_server, prefix=prefix), RedisStore(redis_server, prefix=prefix))
    )
    assert replicas == want
    one = MemoryStore()
    assert asyncio.run(run(one, one)) == want


# ------------------------------------------------------ a stalled reader, statistics


def outcomes(cluster: TritonCluster, name: str) -> list[tuple[str, int]]:
    """The node model's per-stream log lines: (outcome, tokens generated), without the
    health probe's one-token streams."""
    text = cluster.nodes[name].process.log_path.read_text(errors="replace")
    found = re.findall(r"ztgate-generate: (\w+) after (\d+)", text)
    return [(m[0], int(m[1])) for m in found if (m[0], m[1]) != ("length", "1")]


def node_outcomes(cluster: TritonCluster, name: str, count: int) -> list[tuple[str, int]]:
    """The node's first `count` stream outcomes (a bound on the wait, not an assertion)."""
    end = time.monotonic() + 60
    while len(found := outcomes(cluster, name)) < count and time.monotonic() < end:
        time.sleep(0.05)
    return found


def test_a_client_that_reads_nothing_loses_its_stream_at_the_send_timeout(
    gateway: RunningGateway, pki: PKI, llm_node: TritonCluster
) -> None:
    """The one stand-in here is the stalled reader, an ASGI `send` that never returns
    after the opening event: a real client that stops reading cannot block the gateway's
    send, because tinygpt's context (128 tokens, a few KiB of events) fits in uvicorn's
    64 KiB write buffer and the kernel's socket buffers. The service, the node, the
    receipts and the response class are the gateway's own, on the gateway's event loop."""
    gw = gateway.gw
    cert = pki.ensure("client", "cutter").cert.read_text()
    who = Caller.of(gw.resolver.resolve({"extensions": {"tls": {"client_cert_chain": [cert]}}}))
    with client(pki, "demo") as c:
        body = long_running(gateway, c, 100)
    ask = parse("triton", json.dumps(body).encode(), model=LLM_MODEL, default_max_tokens=64)
    entry = gw.seen(who, LLM_MODEL)
    before = len(outcomes(llm_node, "t1"))

    async def serve(stall: bool) -> tuple[str, int, Stream]:
        service = gw.generate  # type: ignore[attr-defined]  # set by generate_routes
        stream: Stream = await service.start(who, entry, ask, new_request_id())
        bodies = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal bodies
            if message["type"] == "http.response.body" and message.get("body"):
                bodies += 1
                if stall and bodies == 2:  # the opening event went; nothing more is read
                    await asyncio.Event().wait()

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client stays connected
            return {"type": "http.disconnect"}

        response = EventStream(_sse(stream), 0.5, stream.finish)
        await response({"type": "http"}, receive, send)  # type: ignore[arg-type]
        return response.outcome, bodies, stream

    loop = gateway.api.servers[0].get_loop()
    # Control, built the same way: a reader that reads gets the whole stream.
    outcome, bodies, whole = asyncio.run_coroutine_threadsafe(serve(False), loop).result(90)
    assert outcome == "complete" and whole.closed is not None
    assert whole.closed.finish_reason == "length" and whole.closed.completion_tokens == 100
    outcome, bodies, cut = asyncio.run_coroutine_threadsafe(serve(True), loop).result(90)
    assert outcome == "send-timeout" and bodies == 2
    closed = cut.closed
    assert closed is not None and closed.finish_reason == "cancelled"
    assert closed.issued is not None and closed.completion_tokens < 100
    opened = cut.opened.issued
    assert opened is not None
    logged = closing_of(gateway, opened.receipt.receipt_id)
    assert logged is not None and logged.extensions["finish_reason"] == "cancelled"
    # The node stopped generating: its model logs the stream cancelled, short of 100.
    found = node_outcomes(llm_node, "t1", before + 2)[before:]
    assert found[0] == ("length", 100)
    assert found[1][0] == "cancelled" and found[1][1] < 100, found


def test_generate_routes_feed_model_statistics_and_stage_metrics(
    gateway: RunningGateway, pki: PKI
) -> None:
    """Triton's statistics extension and the stage histogram count generations as they
    count inferences: an answered stream is a success, a refused one a failure."""

    def tinygpt_stats(c: httpx.Client) -> dict[str, Any]:
        r = c.get(f"{gateway.base}/v2/models/{LLM_MODEL}/stats")
        assert r.status_code == 200, r.text
        stats: dict[str, Any] = r.json()["model_stats"][0]["inference_stats"]
        return stats

    def stage_count(name: str) -> float:
        text = httpx.get(f"{gateway.admin_base}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(f'ztgate_stage_duration_seconds_count{{stage="{name}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    url = f"{gateway.base}/v1/chat/completions"
    with client(pki, "demo") as demo, client(pki, "capped") as capped:
        before = tinygpt_stats(demo)
        firsts = stage_count("node_first_token")
        assert demo.post(url, json=chat(max_tokens=4)).status_code == 200
        with demo.stream("POST", url, json={**chat(max_tokens=4), "stream": True}) as s:
            assert s.status_code == 200 and events(s)
        assert capped.post(url, json=chat(max_tokens=17)).status_code == 403
        after = tinygpt_stats(demo)
    for key in ("success", "compute_input", "compute_infer", "compute_output", "queue"):
        assert after[key]["count"] == before[key]["count"] + 2, key
    assert after["fail"]["count"] == before["fail"]["count"] + 1
    assert after["compute_infer"]["ns"] > before["compute_infer"]["ns"]
    assert stage_count("node_first_token") == firsts + 2
    text = httpx.get(f"{gateway.admin_base}/metrics", timeout=30).text
    assert re.search(
        r'ztgate_infer_requests_total\{mode="none",model="tinygpt",outcome="ok"\} [1-9]', text
    ), "generations are not counted by model and outcome"


def test_a_generation_is_one_trace_with_its_stages_and_no_text(
    gateway: RunningGateway, pki: PKI
) -> None:
    exporter = InMemorySpanExporter()
    telemetry.enable_tracing([SimpleSpanProcessor(exporter)])
    try:
        with client(pki, "demo") as c:
            r = c.post(f"{gateway.base}/v1/chat/completions", json=chat(4, content=MARKER))
    finally:
        telemetry.shutdown_tracing()
    assert r.status_code == 200, r.text
    tree = trace_of(exporter, r.json()["ztgate"]["request_id"])
    names = {s.name for s in tree}
    stages = ("identity", "admission", "decode", "policy", "node_first_token", "receipt")
    assert {f"ztgate.{n}" for n in stages} <= names, names
    assert "ztgate.node_stream_open" in names  # the router's attempt, under the stage
    root = dict(tree[0].attributes or {})
    assert root["ztgate.route"] == "generate" and root["ztgate.model"] == LLM_MODEL
    values = [str(v) for s in tree for v in (s.attributes or {}).values()]
    assert values and not any(MARKER in v for v in values)


def test_a_v1_denial_receipt_names_the_model_the_body_named(
    gateway: RunningGateway, pki: PKI
) -> None:
    """/v1 paths name no model; the denial receipt takes it from the body, once the
    caller was found to see it (an unknown or hidden name is a 404, never receipted)."""
    url = f"{gateway.base}/v1/chat/completions"
    with client(pki, "capped") as capped:
        denied = capped.post(url, json=chat(max_tokens=17))
        assert denied.status_code == 403, denied.text
        rid = denied.headers["ztgate-receipt"].split()[1]
        receipt = capped.get(f"{gateway.base}/v2/receipts/{rid}").json()["receipt"]
    assert receipt["kind"] == "denial" and receipt["model"]["name"] == LLM_MODEL
    assert receipt["denial"]["problem_type"].endswith("/forbidden")


# ------------------------------------------------------------------ a node that dies
# Last in the module: it kills the node, and waits for its supervisor to bring it back.


def test_a_node_killed_mid_stream_ends_it_with_an_error_event_and_a_closing_receipt(
    gateway: RunningGateway, pki: PKI, llm_node: TritonCluster
) -> None:
    url = f"{gateway.base}/v1/chat/completions"
    with client(pki, "demo") as c:
        prompt = long_running(gateway, c, 100)["text_input"]
        body = {**chat(max_tokens=100, content=prompt), "stream": True}
        # Control, built the same way: a stream the node completes has no error event.
        with c.stream("POST", url, json=body) as s:
            control = events(s)
        assert "error" not in control[-1] and control[-1]["ztgate"]["finish_reason"] in (
            "stop",
            "length",
        )
        pid = llm_node.nodes["t1"].process.pid
        assert pid is not None
        with c.stream("POST", url, json=body) as s:
            lines = (
                json.loads(x[6:])
                for x in s.iter_lines()
                if x.startswith("data: ") and x != "data: [DONE]"
            )
            got = [next(lines)]
            while not got[-1]["choices"][0]["delta"].get("content"):
                got.append(next(lines))  # up to the first token's text
            os.kill(pid, signal.SIGKILL)
            got.extend(lines)
        # The node's supervisor restarts it; later requests are served again.
        end = time.monotonic() + 120
        while c.post(url, json=chat(max_tokens=2)).status_code != 200:
            assert time.monotonic() < end, "the node did not come back"
            time.sleep(0.5)
    closing, error = got[-2], got[-1]
    assert closing["ztgate"]["finish_reason"] == "node-error"
    assert error["error"]["code"] == "upstream-failed"
    assert "failed during the stream" in error["error"]["message"]
    opening = got[0]["ztgate"]["receipt"]["id"]
    logged = closing_of(gateway, opening)
    assert logged is not None
    assert logged.receipt_id == closing["ztgate"]["receipt_id"]
    assert logged.extensions["finish_reason"] == "node-error"
    sent = closing["usage"]["completion_tokens"]
    assert sent >= 1  # after the first token's text
    assert sent < 100  # cut short by the kill
    assert logged.extensions["completion_tokens"] == sent


# ------------------------------------------------------------------------- stop sequences


def pick_stop(text: str, start: int = 4) -> tuple[str, int]:
    """A two-character stop sequence taken from `text` (two tokens: the tokenizer is
    byte-level) whose first occurrence is at `start` or later, and that position."""
    for at in range(start, len(text) - 2):
        stop = text[at : at + 2]
        if stop.isascii() and stop.isprintable() and text.find(stop) == at:
            return stop, at
    pytest.fail("no two-character stop sequence to pick from the answer")


def cancelled(cluster: TritonCluster) -> list[int]:
    """Tokens generated by each stream the node model logged as cancelled."""
    return [n for outcome, n in outcomes(cluster, "t1") if outcome == "cancelled"]


def test_stop_scan_holds_back_only_what_may_start_a_stop_and_cuts_at_the_earliest() -> None:
    def run(stops: list[bytes], data: bytes) -> tuple[list[bytes], bytes, bool]:
        scan = StopScan(stops)
        steps = [bytes(scan.feed(b)) for b in data]
        return steps, bytes(scan.flush()), scan.matched

    # "a" may start "ab": held until "c" shows it does not, then released with it.
    steps, tail, matched = run([b"ab", b"xyz"], b"qacxyab")
    assert steps == [b"q", b"", b"ac", b"", b"", b"xy", b""] and tail == b"" and matched
    # A stop spanning two tokens: "é" is two UTF-8 bytes, two tokens.
    steps, tail, matched = run(["é".encode()], "caf\u00e9s".encode())
    assert b"".join(steps) == b"caf" and matched and tail == b""
    # The earliest start wins when two stops end at the same token.
    steps, _, matched = run([b"cd", b"bcd"], b"abcdef")
    assert b"".join(steps) == b"a" and matched
    # Controls: no stop passes every token at once; a stop that never completes is text.
    assert run([], b"abc") == ([b"a", b"b", b"c"], b"", False)
    steps, tail, matched = run([b"xyz"], b"abxy")
    assert b"".join(steps) + tail == b"abxy" and not matched and tail == b"xy"
    with pytest.raises(ValueError):
        StopScan([b""])


def test_openai_stop_ends_the_text_before_it_and_cancels_generation_at_the_node(
    gateway: RunningGateway, pki: PKI, llm_node: TritonCluster
) -> None:
    with client(pki, "demo") as c:
        body = long_running(gateway, c, 60)
    oa = openai_client(gateway, pki, "demo")
    ask: dict[str, Any] = {
        "model": LLM_MODEL,
        "prompt": body["text_input"],
        "max_tokens": 60,
        "temperature": 0,
    }
    whole = oa.completions.create(**ask)
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    stop, at = pick_stop(text)
    absent = "\u00a7\u00a4"  # two characters, four bytes, that the answer does not contain
    assert absent not in text
    # Positive control, built the same way: a stop that never occurs changes nothing.
    same = oa.completions.create(**ask, stop=[absent])
    assert same.choices[0].text == text and same.choices[0].finish_reason == "length"
    assert same.usage is not None and same.usage.completion_tokens == 60
    gone = len(cancelled(llm_node))

    cut = oa.completions.create(**ask, stop=[absent, stop])
    assert cut.choices[0].text == text[:at] and cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens == len(text[:at].encode())
    z = (cut.model_extra or {})["ztgate"]
    closing = closing_of(gateway, z["opening_receipt"]["id"])
    assert closing is not None and closing.extensions["finish_reason"] == "stop"
    salt = base64.b64decode(z["salt"])
    delivered = token_tensor(OUTPUT, tuple(text[:at].encode()))
    assert closing.outputs[0].commitment == commit_tensor(delivered, salt)
    opening = next(r for r in stored(gateway) if r.receipt_id == z["opening_receipt"]["id"])
    assert opening.extensions["stop_sequences"] == 2  # the count only: they are client text

    chunks = list(oa.completions.create(**ask, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"
    last = (chunks[-1].model_extra or {})["ztgate"]
    assert last["finish_reason"] == "stop"
    assert last["receipt"]["signed"]["receipt"]["ext"]["completion_tokens"] == len(
        text[:at].encode()
    )
    # The node stopped generating both: its model logs each stream cancelled, short of 60.
    end = time.monotonic() + 60  # a bound on the wait, not an assertion about speed
    while len(cancelled(llm_node)) < gone + 2 and time.monotonic() < end:
        time.sleep(0.05)
    found = cancelled(llm_node)[gone:]
    assert len(found) == 2 and all(n < 60 for n in found), found


def test_triton_generate_stream_takes_stop_in_its_parameters(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v2/models/{LLM_MODEL}/generate_stream"
    with client(pki, "demo") as c:
        body = long_running(gateway, c, 40)
        body["parameters"]["max_tokens"] = 40
        with c.stream("POST", url, json=body) as r:
            plain = events(r)
        text = "".join(e["text_output"] for e in plain)
        stop, at = pick_stop(text)
        body["parameters"]["stop"] = [stop]
        with c.stream("POST", url, json=body) as r:
            got = events(r)
    assert plain[-1]["finish_reason"] == "length"
    assert "".join(e["text_output"] for e in got) == text[:at]
    assert got[-1]["finish_reason"] == "stop"
    assert got[-1]["usage"]["completion_tokens"] == len(text[:at].encode())


def test_bad_stop_sequences_are_refused_in_openais_error_shape(
    gateway: RunningGateway, pki: PKI
) -> None:
    oa = openai_client(gateway, pki, "demo")
    ask: dict[str, Any] = {"model": LLM_MODEL, "prompt": "def ", "max_tokens": 4}
    # Controls: four sequences, and one of 64 bytes, are taken.
    ok = oa.completions.create(**ask, stop=["\x01", "\x02", "\x03", "\x04"])
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert oa.completions.create(**ask, stop="\u00e9" * 32).choices
    for stop, why in (
        (["\x01", "\x02", "\x03", "\x04", "\x05"], "at most 4 sequences"),
        ("\u00e9" * 33, "at most 64 bytes"),
        (7, "must be a string or a list"),
        (["\x01", 2], "must be a string or a list"),
        (["\x01", ""], "must be a string or a list"),
    ):
        with pytest.raises(openai.BadRequestError) as br:
            oa.completions.create(**ask, stop=cast(Any, stop))
        error = cast(dict[str, Any], br.value.body)
        assert why in error["message"] and error["type"].endswith("/bad-request")
        assert "\u00e9" not in error["message"]  # the client's text is not echoed
    with client(pki, "demo") as c:
        url = f"{gateway.base}/v2/models/{LLM_MODEL}/generate"
        bad = {"text_input": "def ", "parameters": {"max_tokens": 4, "stop": {"a": 1}}}
        r = c.post(url, json=bad)
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
        good = {"text_input": "def ", "parameters": {"max_tokens": 4, "stop": "\x01"}}
        assert c.post(url, json=good).status_code == 200


# ------------------------------------------------- the opening receipt, early and failed over


def test_a_node_that_fails_before_its_first_token_leaves_a_closed_opening_receipt(
    pki: PKI, llm_node: TritonCluster, tmp_path: Path
) -> None:
    """The opening receipt is written as a node is picked, while its first token comes
    (gateway/generate/opening.py). `dead` is a real address with nothing listening: its
    attempt's opening receipt names it and is closed as node-error with no token; the
    stream the client gets opens on t1 with a receipt of its own."""
    llm_entries(tmp_path)
    policies = policy_dir(tmp_path / "policies", TEST_CALLERS)
    (t1,) = node_table(llm_node)
    dead = {**t1, "name": "dead", "address": f"127.0.0.1:{free_port()}"}
    nodes = [{**n, "models": [LLM_MODEL]} for n in (t1, dead)]
    cfg = gateway_config(
        pki, tmp_path / "registry", tmp_path / "g", nodes, policy={"dir": str(policies)}
    )
    body = {"text_input": "def ", "parameters": {"max_tokens": 4, "temperature": 0}}
    url = f"/v2/models/{LLM_MODEL}/generate"
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        router = gw.gw.router
        loop = gw.api.servers[0].get_loop()

        async def prefer(name: str) -> None:  # power-of-two-choices takes the lower score
            for state in router.nodes.values():
                router.ejected.pop(state.config.name, None)
                state.ewma_s = 1e-6 if state.config.name == name else 10.0
                state.learnt_at = time.monotonic()

        # Control, built the same way: t1 preferred, one attempt, one opening receipt.
        asyncio.run_coroutine_threadsafe(prefer("t1"), loop).result(10)
        plain = c.post(gw.base + url, json=body).json()
        asyncio.run_coroutine_threadsafe(prefer("dead"), loop).result(10)
        r = c.post(gw.base + url, json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        receipts = stored(gw)
        first = next(x for x in receipts if x.kind == "open" and x.nodes == ("dead",))
        orphan = wait_for_closing(gw, first.receipt_id)  # closed off the first token's path
    assert router.nodes["dead"].failed >= 1
    for answer, tried in ((plain, ["t1"]), (got, ["dead", "t1"])):
        z = answer["ztgate"]
        opened = [x for x in receipts if x.kind == "open" and x.request_id == z["request_id"]]
        assert [x.nodes[0] for x in opened] == tried
        assert opened[-1].receipt_id == z["opening_receipt"]["id"] and z["node"] == "t1"
        closed = {x.extensions["opening"]: x for x in receipts if x.kind == "close"}
        assert closed[z["opening_receipt"]["id"]].extensions["finish_reason"] == "length"
    assert orphan.request_id == got["ztgate"]["request_id"]
    assert orphan.extensions["finish_reason"] == "node-error"
    assert orphan.extensions["completion_tokens"] == 0 and orphan.nodes == ("dead",)


def test_no_token_leaves_while_the_opening_receipt_cannot_be_logged(
    pki: PKI, llm_node: TritonCluster, tmp_path: Path
) -> None:
    """The opening receipt is written while the first token comes, and the first token
    still waits for it: with the receipt log refusing appends, the client gets a 503 and
    no text, and the node's generation is cancelled. The one stand-in: the log is frozen
    by setting its reason, as opening a log restored from a backup does."""
    llm_entries(tmp_path)
    policies = policy_dir(tmp_path / "policies", TEST_CALLERS)
    nodes = [{**n, "models": [LLM_MODEL]} for n in node_table(llm_node)]
    cfg = gateway_config(
        pki, tmp_path / "registry", tmp_path / "g", nodes, policy={"dir": str(policies)}
    )
    url = f"/v2/models/{LLM_MODEL}/generate_stream"
    with running_gateway(cfg) as gw, client(pki, "demo") as c:
        body = long_running(gw, c, 60)
        gone = len(cancelled(llm_node))
        # Control, built the same way: the log appends, the stream opens.
        with c.stream("POST", gw.base + url, json=body) as r:
            assert r.status_code == 200
            assert json.loads(next(r.iter_lines())[6:])["ztgate"]["receipt"]["kind"] == "open"
        assert gw.gw.receipts is not None
        gw.gw.receipts.log.frozen_reason = "restored from a backup (test)"
        r = c.post(gw.base + url, json=body)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "receipt log is unavailable" in r.json()["detail"] and "text_output" not in r.text
    end = time.monotonic() + 60  # a bound on the wait, not an assertion about speed
    while len(cancelled(llm_node)) < gone + 2 and time.monotonic() < end:
        time.sleep(0.05)
    found = cancelled(llm_node)[gone:]  # the control (left early) and the refused stream
    assert len(found) == 2 and all(n < 60 for n in found), found
