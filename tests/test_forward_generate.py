"""Edge -> core forwarding of generations: Triton's generate and generate_stream, OpenAI's
chat and completions, whole and streamed (docs/ddil.md, "Forwarding to the core").

Real parts throughout, as in tests/test_forwarding.py: two real tritonservers serve the
shipped tiny GPT with a per-token sleep (SLOW_MS), one the core's and one the edge's,
which the module stops once the edge has answered from it; the core and the edge are
running gateways (uvicorn, real mTLS, the core's forward listener), the edge reaching the
core through the fault proxy. Every refusal sits beside a request built the same way but
for the one thing under test, and that one is answered. One test (a core stream that
never ends) drives the edge's relay with a fabricated core answer: a real core ends
every stream within its own caps, so that fault cannot be caused with one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.app import Gateway
from gateway.config import Config, Forward, Generate
from gateway.examples import shipped_generative
from gateway.faultproxy import ThreadedFaultProxy
from gateway.forward import statement
from gateway.forward.client import SITE_WHY_HEADER, CoreForwarder, EdgeFailover, _Relay
from gateway.forward.paths import Target
from gateway.pki import PKI, Issued, forwarder_crl
from gateway.ports import free_port
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import Receipt, SignedReceipt
from gateway.registry import Registry
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes
from tests.gateway_harness import client_context, gateway_config, policy_dir
from tests.test_forwarding import (
    CORE_SITE,
    EDGE_SITE,
    client,
    forwarder,
    leaf_pem,
    running,
    site_config,
)
from tests.test_forwarding import sites as sites  # the module's PKI fixture
from tests.test_gateway import node_table

SLOW_MS = 20  # per token: a 100-token stream stays open about 2 s
SECRET = "secretgpt"  # tinygpt again, registered confidential: no forward_for permit
FORWARD_TIMEOUT_S = 3.0  # the edge's per-read bound on the core's answer
# The edge's own forbid, which the core does not have: forwarding must not get round it.
EDGE_POLICY = """
@id("test-edge-hot-alice")
forbid (
  principal == Ztgate::Client::"spiffe://ztgate.local/client/alice",
  action == Ztgate::Action::"infer",
  resource
)
when { context.temperature_milli > 1500 };
"""


@dataclasses.dataclass
class Site:
    cfg: Config
    gw: Gateway

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.cfg.listen.port}"


@pytest.fixture(scope="module")
def llm_pair(
    sites: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    """c1 serves the core, e1 the edge (until `edge` stops it)."""
    layout = (("c1", "eu-west", "prov-a"), ("e1", "eu-west", "prov-b"))
    base = tmp_path_factory.mktemp("fwd-gen-nodes")
    with llm_nodes(sites, triton_home, llm_repository, base, layout, SLOW_MS) as cluster:
        yield cluster


def nodes_of(cluster: TritonCluster, name: str) -> list[dict[str, Any]]:
    return [{**n, "models": [LLM_MODEL]} for n in node_table(cluster) if n["name"] == name]


def registry_with_secret(tmp: Path) -> Path:
    llm_entries(tmp)
    registry = Registry.open(tmp / "registry")
    registry.add_generative(shipped_generative()[LLM_MODEL], SECRET, "1", "confidential")
    return tmp / "registry"


@pytest.fixture(scope="module")
def core(
    sites: PKI, llm_pair: TritonCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("fwd-gen-core")
    cfg = gateway_config(
        sites,
        registry_with_secret(tmp),
        tmp / "data",
        nodes_of(llm_pair, "c1"),
        site=CORE_SITE,
        policy={"dir": str(policy_dir(tmp / "policies"))},
    )
    crl = forwarder_crl(sites, [], cfg.data_dir / "forwarder.crl")
    cfg = dataclasses.replace(
        cfg,
        forward=Forward(port=free_port(), ca=sites.forwarder_ca_bundle(), crl=crl, max_skew_s=30),
    )
    with running(cfg) as gw:
        yield Site(cfg, gw)


@dataclasses.dataclass
class Edge(Site):
    proxy: ThreadedFaultProxy


@pytest.fixture(scope="module")
def edge(
    sites: PKI, core: Site, llm_pair: TritonCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Edge]:
    """The edge, reaching the core through the fault proxy. While its node lives it
    answers itself (checked here, the control of every failover below); then its node is
    stopped for the rest of the module."""
    tmp = tmp_path_factory.mktemp("fwd-gen-edge")
    fwd = forwarder(sites, EDGE_SITE)
    policies = policy_dir(tmp / "policies")
    (policies / "60-test-edge.cedar").write_text(EDGE_POLICY)
    with contextlib.ExitStack() as stack:
        proxy = ThreadedFaultProxy(("127.0.0.1", core.cfg.forward.port or 0))
        stack.callback(proxy.close)
        cfg = site_config(
            sites,
            registry_with_secret(tmp),
            tmp / "data",
            nodes_of(llm_pair, "e1"),
            EDGE_SITE,
            policy={"dir": str(policies)},
        )
        cfg = dataclasses.replace(
            cfg,
            forward=Forward(
                core_url=f"https://127.0.0.1:{proxy.port}",
                core_site=CORE_SITE,
                core_ca=sites.root_ca,
                cert=fwd.cert,
                key=fwd.key,
                timeout_s=FORWARD_TIMEOUT_S,
            ),
        )
        gw = stack.enter_context(running(cfg))
        e = Edge(cfg, gw, proxy)
        with alice_http(sites) as c:
            local = c.post(f"{e.base}/v2/models/{LLM_MODEL}/generate", json=triton())
        assert local.status_code == 200, local.text
        assert SITE_WHY_HEADER not in local.headers
        assert local.json()["ztgate"]["node"] == "e1"
        llm_pair.nodes["e1"].supervisor.stop()
        yield e


def alice_http(sites: PKI, name: str = "alice") -> httpx.Client:
    who = client(sites, name)
    return httpx.Client(verify=client_context(sites, who.cert, who.key), timeout=60)


def triton(max_tokens: int = 8, prompt: str = "def ", **params: Any) -> dict[str, Any]:
    return {
        "text_input": prompt,
        "parameters": {"max_tokens": max_tokens, "temperature": 0, **params},
    }


def chat(model: str = LLM_MODEL, max_tokens: int = 8, **more: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "def "}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **more,
    }


def events(r: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in r.iter_lines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def ext_of(view: dict[str, Any]) -> dict[str, Any]:
    """The extensions of a receipt as a `ztgate` member shows it (signed, the core's)."""
    out: dict[str, Any] = view["signed"]["receipt"]["ext"]
    return out


def assert_forwarded(ext: dict[str, Any]) -> None:
    assert ext["forwarded_by"] == EDGE_SITE
    assert ext["forward_hops"] == [EDGE_SITE]
    assert ext["site"] == CORE_SITE
    assert ext["site_why"] == "forwarded-to-core"


def core_receipts(core: Site) -> list[Receipt]:
    assert core.gw.receipts is not None
    reader = ReceiptLog.open_readonly(core.gw.receipts.log.path)
    try:
        return [SignedReceipt.from_bytes(b.body).receipt for b in reader.bodies()]
    finally:
        asyncio.run(reader.close())


def closing_at_core(core: Site, opening: str) -> Receipt:
    """The core writes its closing receipt when it notices the stream ended: a bound on
    how long that may take, never an assertion about speed."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for r in core_receipts(core):
            if r.kind == "close" and r.extensions.get("opening") == opening:
                return r
        time.sleep(0.1)
    pytest.fail(f"no closing receipt at the core for {opening}")


# --- each surface, whole and streamed ---------------------------------------------------
def test_triton_generate_and_generate_stream_fail_over_to_the_core(edge: Edge, sites: PKI) -> None:
    with alice_http(sites) as c:
        whole = c.post(f"{edge.base}/v2/models/{LLM_MODEL}/generate", json=triton())
        assert whole.status_code == 200, whole.text
        assert whole.headers[SITE_WHY_HEADER] == "forwarded-to-core"
        doc = whole.json()
        assert doc["finish_reason"] in ("stop", "length") and doc["ztgate"]["node"] == "c1"
        assert_forwarded(ext_of(doc["ztgate"]["receipt"]))
        assert_forwarded(ext_of(doc["ztgate"]["opening_receipt"]))
        assert "ztgate-receipt" in whole.headers

        url = f"{edge.base}/v2/models/{LLM_MODEL}/generate_stream"
        with c.stream("POST", url, json=triton()) as r:
            assert r.status_code == 200
            assert r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
            assert r.headers["content-type"].startswith("text/event-stream")
            got = events(r)
    assert_forwarded(ext_of(got[0]["ztgate"]["receipt"]))  # the opening, before any text
    assert got[-1]["finish_reason"] in ("stop", "length")
    assert_forwarded(ext_of(got[-1]["ztgate"]["receipt"]))
    # The same greedy text as the whole answer: one generation, passed on as it came.
    assert "".join(e["text_output"] for e in got) == doc["text_output"]


def test_openai_chat_and_completions_fail_over_to_the_core_whole_and_streamed(
    edge: Edge, sites: PKI
) -> None:
    with alice_http(sites) as c:
        done = c.post(f"{edge.base}/v1/chat/completions", json=chat())
        assert done.status_code == 200, done.text
        assert done.headers[SITE_WHY_HEADER] == "forwarded-to-core"
        assert_forwarded(ext_of(done.json()["ztgate"]["receipt"]))

        body = {"model": LLM_MODEL, "prompt": "def ", "max_tokens": 8, "temperature": 0}
        comp = c.post(f"{edge.base}/v1/completions", json=body)
        assert comp.status_code == 200, comp.text
        assert comp.headers[SITE_WHY_HEADER] == "forwarded-to-core"
        assert_forwarded(ext_of(comp.json()["ztgate"]["receipt"]))

        with c.stream("POST", f"{edge.base}/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
            lines = list(r.iter_lines())
        assert "data: [DONE]" in lines
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert_forwarded(ext_of(chunks[0]["ztgate"]["receipt"]))

    # The official client, unchanged, reads a forwarded stream like a local one.
    who = client(sites, "alice")
    http = httpx2.Client(verify=client_context(sites, who.cert, who.key), timeout=60)
    oa = openai.OpenAI(
        base_url=f"{edge.base}/v1", api_key="not-used", http_client=http, max_retries=0
    )
    streamed = list(
        oa.chat.completions.create(
            model=LLM_MODEL,
            messages=[{"role": "user", "content": "def "}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == done.json()["choices"][0]["message"]["content"]
    assert_forwarded(ext_of((streamed[0].model_extra or {})["ztgate"]["receipt"]))


def test_a_stop_sequence_ends_a_forwarded_generation_as_locally(edge: Edge, sites: PKI) -> None:
    with alice_http(sites) as c:
        free = c.post(f"{edge.base}/v1/completions", json=completion(24))
        assert free.status_code == 200, free.text
        text = free.json()["choices"][0]["text"]
        # A visible character the text first has after its start: the stop cuts there.
        stop = next((ch for ch in text[1:] if not ch.isspace() and text.index(ch) > 0), "")
        assert stop, f"the probe text {text!r} has no stop to cut at"
        cut = c.post(f"{edge.base}/v1/completions", json=completion(24, stop=stop))
    assert cut.status_code == 200, cut.text
    assert cut.headers[SITE_WHY_HEADER] == "forwarded-to-core"
    choice = cut.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]


def completion(max_tokens: int, **more: Any) -> dict[str, Any]:
    return {
        "model": LLM_MODEL,
        "prompt": "def ",
        "max_tokens": max_tokens,
        "temperature": 0,
        **more,
    }


def test_the_edges_own_policy_refusal_is_not_forwarded(edge: Edge, core: Site, sites: PKI) -> None:
    """The edge forbids alice hot sampling; the core does not (it answers her directly),
    so a forwarded one would be answered: the edge's forbid stands, nothing is sent."""
    hot = chat(temperature=1.9)
    with alice_http(sites) as c:
        r = c.post(f"{edge.base}/v1/chat/completions", json=hot)
        assert r.status_code == 403, r.text
        assert SITE_WHY_HEADER not in r.headers
        assert "decision_id" in r.json()["error"]
        direct = c.post(f"{core.base}/v1/chat/completions", json=hot)
        assert direct.status_code == 200, direct.text
        ok = c.post(f"{edge.base}/v1/chat/completions", json=chat())
    assert ok.status_code == 200 and ok.headers[SITE_WHY_HEADER] == "forwarded-to-core"


# --- cancellation and a silent core --------------------------------------------------------
LONG = 100  # tokens: a stream of them stays open about LONG x SLOW_MS


@pytest.fixture(scope="module")
def long_body(edge: Edge, sites: PKI) -> dict[str, Any]:
    """A greedy request that runs to max_tokens (no early end token): greedy decoding is
    deterministic, so a stream of it stays open for LONG x SLOW_MS."""
    with alice_http(sites) as c:
        for prompt in ("def ", "import ", "class ", "hi", "the "):
            body = triton(LONG, prompt)
            r = c.post(f"{edge.base}/v2/models/{LLM_MODEL}/generate", json=body)
            assert r.status_code == 200, r.text
            if r.json()["finish_reason"] == "length":
                return body
    pytest.fail("no probe prompt runs to max_tokens")


def test_a_client_leaving_a_forwarded_stream_closes_the_cores_stream(
    edge: Edge, core: Site, sites: PKI, long_body: dict[str, Any]
) -> None:
    url = f"{edge.base}/v2/models/{LLM_MODEL}/generate_stream"
    with alice_http(sites) as c, c.stream("POST", url, json=long_body) as r:
        assert r.status_code == 200 and r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
        first = next(r.iter_lines())
        opening = json.loads(first[6:])["ztgate"]["receipt"]["id"]
    # The client left after the opening event: the edge closed its link to the core, and
    # the core cancelled at its node and closed the receipt on what it had sent.
    closing = closing_at_core(core, opening)
    assert closing.extensions["finish_reason"] == "cancelled"
    assert isinstance(closing.extensions["completion_tokens"], int)
    assert closing.extensions["completion_tokens"] < LONG
    assert closing.extensions["forwarded_by"] == EDGE_SITE


@pytest.mark.parametrize("verb", ["generate", "generate_stream"])
def test_a_client_leaving_before_the_cores_answer_starts_closes_the_request_to_the_core(
    edge: Edge, sites: PKI, verb: str
) -> None:
    """The link holds every chunk for minutes, so the core's answer (a whole one, or a
    stream's first event) cannot start: the client gives up and leaves, and the edge stops
    waiting and closes its request to the core (its forwarder's `left`) rather than hold
    it to the whole bound. The core never got the request, so it has no receipt to show:
    the edge's count is the observable. The control: the link restored, the same request,
    the client staying, is answered by the core."""
    forwarder = edge.gw.forwarder  # type: ignore[attr-defined]
    before = forwarder.left
    url = f"{edge.base}/v2/models/{LLM_MODEL}/{verb}"
    who = client(sites, "alice")
    ctx = client_context(sites, who.cert, who.key)
    edge.proxy.delay(600)
    try:
        with httpx.Client(verify=ctx, timeout=httpx.Timeout(30, read=2.0)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post(url, json=triton())
        end = time.monotonic() + 60  # far inside the edge's own wait for the core's head
        while forwarder.left == before:
            assert time.monotonic() < end, "the edge kept waiting for the core"
            time.sleep(0.05)
    finally:
        edge.proxy.restore()
    assert forwarder.left == before + 1
    with alice_http(sites) as c:
        ok = c.post(url, json=triton())
    assert ok.status_code == 200, ok.text
    assert ok.headers[SITE_WHY_HEADER] == "forwarded-to-core"
    assert forwarder.left == before + 1


def test_a_core_stream_gone_silent_ends_at_the_forward_timeout_with_an_error_event(
    edge: Edge, core: Site, sites: PKI, long_body: dict[str, Any]
) -> None:
    """The link stalls mid-stream (every chunk held for minutes): the edge's per-read
    timeout ends the client's stream with upstream-failed, as a node failing
    mid-stream does locally. The control: the same stream, the link restored, completes."""
    url = f"{edge.base}/v2/models/{LLM_MODEL}/generate_stream"
    try:
        with alice_http(sites) as c, c.stream("POST", url, json=long_body) as r:
            assert r.status_code == 200 and r.headers[SITE_WHY_HEADER] == "forwarded-to-core"
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            edge.proxy.delay(600)
            rest = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
    finally:
        edge.proxy.restore()
    assert rest, "the stream ended without saying why"
    assert rest[-1]["type"] == "https://ztgate.dev/problems/upstream-failed"
    assert all("finish_reason" not in e for e in rest)
    with alice_http(sites) as c, c.stream("POST", url, json=triton(8)) as ok:
        got = events(ok)
    assert got[-1]["finish_reason"] in ("stop", "length")


# --- what a forwarder certificate could try on the new paths -------------------------------
def forward(
    core: Site,
    sites: PKI,
    path: str,
    body: bytes,
    *,
    model: str,
    version: str = "",
    fwd: Issued | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[httpx.Response, dict[str, str], list[str]]:
    """One request on the core's forward listener, its statement built as an edge
    builds it (or `headers` replayed); the answer read whole, with its SSE lines."""
    fwd = fwd or forwarder(sites, EDGE_SITE)
    if headers is None:
        st = statement.make(
            site=fwd.name,
            aud=f"spiffe://{core.cfg.trust_domain}/gateway/{CORE_SITE}",
            client_cert=leaf_pem(client(sites, "alice")),
            body=body,
            model=model,
            version=version,
        )
        key = serialization.load_pem_private_key(fwd.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        headers = statement.sign(st, key)
    base = f"https://127.0.0.1:{core.cfg.forward.port}"
    with (
        httpx.Client(verify=client_context(sites, fwd.cert, fwd.key), timeout=60) as c,
        c.stream(
            "POST",
            base + path,
            content=body,
            headers={**headers, "content-type": "application/json"},
        ) as r,
    ):
        lines = list(r.iter_lines())
    return r, headers, lines


def reason(r: httpx.Response, lines: list[str]) -> str:
    doc = json.loads("\n".join(lines))
    return f"{doc['type'].rsplit('/', 1)[-1]}:{doc.get('reason', '')}"


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_body_naming_another_model_than_the_statement_is_refused(
    core: Site, sites: PKI, route: str, stream: bool
) -> None:
    """The model swap: forward_for is decided on the statement's model (headers only), so
    an OpenAI body naming another model would be routed to a model the site may not act
    for. The controls: the honest statement for that model is refused by forward_for,
    and the honest statement for the permitted one is answered."""
    path = f"/v1/{route}"

    def body(model: str) -> bytes:
        doc = chat(model) if route == "chat/completions" else completion(4, model=model)
        return json.dumps({**doc, "stream": stream}).encode()

    r, _, lines = forward(core, sites, path, body(SECRET), model=LLM_MODEL)
    assert r.status_code == 403 and reason(r, lines) == "forbidden:statement-model"
    honest, _, lines = forward(core, sites, path, body(SECRET), model=SECRET)
    assert honest.status_code == 403 and reason(honest, lines) == "forbidden:forward-for-denied"
    ok, _, lines = forward(core, sites, path, body(LLM_MODEL), model=LLM_MODEL)
    assert ok.status_code == 200, lines
    first = next(x for x in lines if x.strip())
    assert_forwarded(ext_of(json.loads(first.removeprefix("data: "))["ztgate"]["receipt"]))


def test_a_body_with_the_model_twice_is_refused(core: Site, sites: PKI) -> None:
    """A duplicate key two parsers could read differently: the core reads the body as its
    route does (strict JSON), finds no model the statement may name, and refuses."""
    raw = json.dumps(chat())[:-1] + f', "model": "{SECRET}"}}'
    r, _, lines = forward(core, sites, "/v1/completions", raw.encode(), model=LLM_MODEL)
    assert r.status_code == 403 and reason(r, lines) == "forbidden:statement-model"
    body = json.dumps(completion(4)).encode()
    ok, _, lines = forward(core, sites, "/v1/completions", body, model=LLM_MODEL)
    assert ok.status_code == 200, lines


@pytest.mark.parametrize("verb", ["generate", "generate_stream"])
def test_a_triton_path_or_version_other_than_the_statements_is_refused(
    core: Site, sites: PKI, verb: str
) -> None:
    body = json.dumps(triton()).encode()
    r, _, lines = forward(core, sites, f"/v2/models/{SECRET}/{verb}", body, model=LLM_MODEL)
    assert r.status_code == 403 and reason(r, lines) == "forbidden:statement-model"
    chat_body = json.dumps(chat()).encode()
    v, _, lines = forward(
        core, sites, "/v1/chat/completions", chat_body, model=LLM_MODEL, version="1"
    )
    assert v.status_code == 403 and reason(v, lines) == "forbidden:statement-model"
    ok, _, lines = forward(
        core,
        sites,
        f"/v2/models/{LLM_MODEL}/versions/1/{verb}",
        body,
        model=LLM_MODEL,
        version="1",
    )
    assert ok.status_code == 200, lines


def test_a_replayed_stream_request_is_refused(core: Site, sites: PKI) -> None:
    body = json.dumps(triton()).encode()
    path = f"/v2/models/{LLM_MODEL}/generate_stream"
    first, headers, lines = forward(core, sites, path, body, model=LLM_MODEL)
    assert first.status_code == 200, lines
    data = [x for x in lines if x.startswith("data: ")]
    assert json.loads(data[-1][6:])["finish_reason"] in ("stop", "length")
    again, _, lines = forward(core, sites, path, body, model=LLM_MODEL, headers=headers)
    assert again.status_code == 409 and reason(again, lines) == "replayed-request:replayed"


# --- a core stream that never ends (fabricated: module doc) -------------------------------
def test_a_core_stream_that_never_ends_is_cut_at_the_whole_generations_bound(
    sites: PKI,
) -> None:
    """The core keeps sending events, each well within the per-read timeout, forever; the
    edge ends the client's stream at the bound a local stream of its caps has, with an
    error event, and closes the core's."""
    fwd = forwarder(sites, EDGE_SITE)

    async def scenario() -> tuple[list[bytes], bool]:
        forwarder_ = CoreForwarder(
            site=EDGE_SITE,
            trust_domain=sites.trust_domain,
            core_url="https://127.0.0.1:1",
            core_site=CORE_SITE,
            cert=fwd.cert,
            key=fwd.key,
            core_ca=sites.root_ca,
            timeout_s=5.0,
        )
        closed = False

        async def endless() -> AsyncIterator[bytes]:
            nonlocal closed
            try:
                while True:
                    await asyncio.sleep(0.01)
                    yield b'data: {"text_output":"x"}\n\n'
            finally:
                closed = True

        core = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=endless())
        failover = EdgeFailover(_unused_app, forwarder_, 1 << 20, Generate())
        loop = asyncio.get_running_loop()
        relay = _Relay(failover, core, loop.time() + 0.5, Target("triton", LLM_MODEL, ""))
        sent: list[bytes] = []

        async def send(msg: MutableMapping[str, Any]) -> None:
            if msg["type"] == "http.response.body":
                sent.append(msg.get("body", b""))

        start = {"type": "http.response.start", "status": 200, "headers": []}
        await relay.run(start, loop.create_future(), send)  # the client stays
        await core.aclose()
        await forwarder_.aclose()
        return sent, closed

    sent, closed = asyncio.run(scenario())
    assert sent[-1] == b""  # the response ended
    last = json.loads(sent[-2].decode()[6:])
    assert last["type"] == "https://ztgate.dev/problems/upstream-failed"
    assert closed  # the core's stream was closed


async def _unused_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def relayed(
    parts: list[bytes | float | Exception],
    *,
    surface: str = "triton",
    timeout_s: float = 5.0,
    generate: Generate | None = None,
) -> bytes:
    """What a client receives when the edge relays a core stream made of `parts` (bytes
    sent, a float a pause in seconds, an exception the link raising) (module doc: a
    fabricated core answer, for faults a real core cannot be made to give on cue)."""

    class Forwarder:
        core_site = CORE_SITE

    Forwarder.timeout_s = timeout_s  # type: ignore[attr-defined]

    async def scenario() -> bytes:
        async def body() -> AsyncIterator[bytes]:
            for part in parts:
                if isinstance(part, Exception):
                    raise part
                if isinstance(part, float):
                    await asyncio.sleep(part)
                else:
                    yield part

        core = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())
        failover = EdgeFailover(_unused_app, Forwarder(), 1 << 20, generate)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        model = LLM_MODEL if surface == "triton" else None
        relay = _Relay(failover, core, loop.time() + 60, Target(surface, model, ""))  # type: ignore[arg-type]
        sent: list[bytes] = []

        async def send(msg: MutableMapping[str, Any]) -> None:
            if msg["type"] == "http.response.body":
                sent.append(msg.get("body", b""))

        start = {"type": "http.response.start", "status": 200, "headers": []}
        await relay.run(start, loop.create_future(), send)
        return b"".join(sent)

    return asyncio.run(scenario())


def sse_events(wire: bytes) -> list[dict[str, Any]]:
    """The events a reader of the SSE wire format gets: each ends at a blank line, and its
    `data:` lines together are its JSON."""
    out = []
    for block in wire.split(b"\n\n"):
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if data:
            out.append(json.loads(b"\n".join(data)))
    return out


@pytest.mark.parametrize("surface", ["triton", "openai"])
def test_a_core_stream_broken_inside_an_event_still_ends_with_a_readable_error_event(
    surface: str,
) -> None:
    """The link breaks after half an event: the edge ends that event before its error
    event, so a reader gets the event before it and the error, not one event glued from
    both. The control: broken after a whole event, the wire is that event and the error."""
    whole = b'data: {"text_output":"he"}\n\n'
    cut = relayed([whole, b'data: {"text_output":"l', httpx.ReadError("cut")], surface=surface)
    clean = relayed([whole, httpx.ReadError("cut")], surface=surface)
    for wire in (cut, clean):
        got = sse_events(wire.replace(b'data: {"text_output":"l\n\n', b""))
        assert got[0] == {"text_output": "he"}
        error = got[-1]["error"] if surface == "openai" else got[-1]
        assert error["type"] == "https://ztgate.dev/problems/upstream-failed"
    assert cut.startswith(whole + b'data: {"text_output":"l\n\n')
    assert clean.startswith(whole + b"data: {") and b"\n\n\n" not in clean


def test_a_stream_held_back_by_a_stop_sequence_is_not_cut_by_the_per_read_timeout() -> None:
    """The core holds back tokens that may begin a stop sequence (up to the longest
    one's length, each within its token timeout): a pause between two events longer than
    `forward.timeout_s` but within that is a healthy stream, relayed whole. The control,
    the same pause past the bound (a tiny token timeout), ends with the error event."""
    parts: list[bytes | float | Exception] = [
        b'data: {"text_output":"a"}\n\n',
        0.5,
        b'data: {"text_output":"b","finish_reason":"stop"}\n\n',
    ]
    held = relayed(parts, timeout_s=0.1, generate=Generate(token_timeout_s=0.1))
    assert [e.get("text_output") for e in sse_events(held)] == ["a", "b"]
    cut = relayed(parts, timeout_s=0.1, generate=Generate(token_timeout_s=0.001))
    last = sse_events(cut)[-1]
    assert last["type"] == "https://ztgate.dev/problems/upstream-failed"
