"""A whole (non-streamed) generation is cancelled when its client leaves, as a stream is:
Triton's /generate and OpenAI's chat completions without `stream`.

One real tritonserver serves the shipped tiny GPT with a per-token sleep (SLOW_MS), so a
generation is still running when its client leaves; a real gateway over real mTLS in
front of it; the leaving client a raw TLS socket that sends its request and closes without
reading. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.generate.session import Stream
from gateway.pki import PKI
from gateway.receipts.model import Receipt
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes
from tests.gateway_harness import (
    TEST_CALLERS,
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_forward_generate import LONG as FORWARD_LONG
from tests.test_forward_generate import (
    Edge,
    Site,
    closing_at_core,
    core_receipts,
)
from tests.test_forward_generate import core as core  # the forwarding fixtures
from tests.test_forward_generate import edge as edge
from tests.test_forward_generate import llm_pair as llm_pair
from tests.test_forward_generate import long_body as long_body
from tests.test_forward_generate import sites as sites
from tests.test_forwarding import EDGE_SITE
from tests.test_forwarding import client as forward_client
from tests.test_gateway import node_table
from tests.test_generate import client, outcomes, stored, wait_for_closing

SLOW_MS = 25  # per token: a 120-token generation runs about 3 s
LONG = 120
LONG_CHAT = 96  # the chat template's own tokens count towards the context (128)
PROBES = ("def ", "import ", "class ", "hi", "the ")
LEAVER = "leaver"  # the client that leaves; its stream slots are checked after


@pytest.fixture(scope="module")
def llm_node(
    pki: PKI, triton_home: Path, llm_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    layout = (("t1", "eu-west", "prov-a"),)
    base = tmp_path_factory.mktemp("gen-cancel-nodes")
    with llm_nodes(pki, triton_home, llm_repository, base, layout, SLOW_MS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def gateway(
    pki: PKI, llm_node: TritonCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("gen-cancel")
    llm_entries(tmp)
    policies = policy_dir(tmp / "policies", (*TEST_CALLERS, LEAVER))
    nodes = [{**n, "models": [LLM_MODEL]} for n in node_table(llm_node)]
    cfg = gateway_config(pki, tmp / "registry", tmp / "g", nodes, policy={"dir": str(policies)})
    with running_gateway(cfg) as gw:
        yield gw


def whole(surface: str, prompt: str) -> tuple[str, dict[str, Any]]:
    """The path and body of a greedy whole generation on `surface`, as long as fits."""
    if surface == "triton":
        body = {"text_input": prompt, "parameters": {"max_tokens": LONG, "temperature": 0}}
        return f"/v2/models/{LLM_MODEL}/generate", body
    return "/v1/chat/completions", {
        "model": LLM_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": LONG_CHAT,
        "temperature": 0,
        "stream": False,
    }


def finish_reason(surface: str, answer: dict[str, Any]) -> str:
    if surface == "triton":
        return str(answer["finish_reason"])
    return str(answer["choices"][0]["finish_reason"])


def runs_to_length(gw: RunningGateway, pki: PKI, surface: str) -> tuple[str, dict[str, Any]]:
    """The positive control: a request kept open is answered whole, `length` (greedy
    decoding is deterministic, so the same request runs to max_tokens again)."""
    with client(pki, LEAVER) as c:
        for prompt in PROBES:
            path, body = whole(surface, prompt)
            r = c.post(gw.base + path, json=body)
            assert r.status_code == 200, r.text
            if finish_reason(surface, r.json()) == "length":
                return path, body
    pytest.fail("no probe prompt runs to max_tokens")


def leave_once_opened(
    port: int,
    ctx: ssl.SSLContext,
    path: str,
    body: dict[str, Any],
    receipts: Callable[[], list[Receipt]],
) -> Receipt:
    """Sends the request over a raw TLS socket, waits until `receipts` (the log of the
    gateway that runs the generation) shows its opening receipt (its node is generating),
    and closes the socket unread. The wait is a bound, never an assertion about speed."""
    before = {r.receipt_id for r in receipts() if r.kind == "open"}
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head + data)
        end = time.monotonic() + 60
        while not (
            new := [r for r in receipts() if r.kind == "open" and r.receipt_id not in before]
        ):
            assert time.monotonic() < end, "no opening receipt for the request"
            time.sleep(0.02)
    return new[0]


def slots_held(gw: RunningGateway) -> int:
    held = gw.gw.generate.slots.held  # type: ignore[attr-defined]
    return sum(held.values())


def wait_slots_free(gw: RunningGateway) -> None:
    end = time.monotonic() + 30
    while slots_held(gw) > 0:
        assert time.monotonic() < end, "a generation kept its stream slot"
        time.sleep(0.02)


@pytest.mark.parametrize("surface", ["triton", "openai"])
def test_a_whole_generation_whose_client_leaves_is_cancelled_at_the_node(
    gateway: RunningGateway, pki: PKI, llm_node: TritonCluster, surface: str
) -> None:
    path, body = runs_to_length(gateway, pki, surface)
    cancelled_before = [n for o, n in outcomes(llm_node, "t1") if o == "cancelled"]
    issued = pki.ensure("client", LEAVER)
    ctx = client_context(pki, issued.cert, issued.key)
    port = gateway.cfg.listen.port
    opening = leave_once_opened(port, ctx, path, body, lambda: stored(gateway))
    # The gateway noticed the leaving: the node's generation was cancelled, and the
    # closing receipt commits only the tokens produced until then.
    closing = wait_for_closing(gateway, opening.receipt_id)
    assert closing.extensions["finish_reason"] == "cancelled"
    sent = closing.extensions["completion_tokens"]
    assert isinstance(sent, int) and sent < (LONG if surface == "triton" else LONG_CHAT)
    assert closing.outputs[0].shape == (sent,)
    end = time.monotonic() + 30
    while len([o for o, _ in outcomes(llm_node, "t1") if o == "cancelled"]) <= len(
        cancelled_before
    ):
        assert time.monotonic() < end, "the node never logged the cancellation"
        time.sleep(0.05)
    # Its stream slot is back (given after the closing receipt: a bound on the wait) ...
    wait_slots_free(gateway)
    # ... so the same client may open its whole allowance of streams at once.
    cap = gateway.cfg.generate.max_streams_per_identity
    url = f"{gateway.base}/v2/models/{LLM_MODEL}/generate_stream"
    with client(pki, LEAVER) as c, contextlib.ExitStack() as streams:
        readers = []
        for _ in range(cap):
            s = streams.enter_context(c.stream("POST", url, json=whole("triton", "def ")[1]))
            assert s.status_code == 200, s.read()
            readers.append(s.iter_lines())  # kept: dropping one mid-body closes it
            next(readers[-1])
        assert slots_held(gateway) == cap
    wait_slots_free(gateway)  # for the next test: these streams' slots are given back too


def test_a_whole_generation_kept_open_is_answered_after_a_client_left(
    gateway: RunningGateway, pki: PKI
) -> None:
    """After a leaver, the gateway still answers a whole generation in full (the watcher
    on the receive channel sees nothing while the client stays)."""
    path, body = whole("triton", "def ")
    with client(pki, LEAVER) as c:
        r = c.post(gateway.base + path, json={**body, "parameters": {"max_tokens": 8}})
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] in ("stop", "length")
    assert "ztgate-receipt" in r.headers


# --- forwarded: the edge's client leaves, the core cancels --------------------------------


def test_a_forwarded_whole_generation_is_cancelled_at_the_core_when_the_edges_client_leaves(
    edge: Edge, core: Site, sites: PKI, long_body: dict[str, Any]
) -> None:
    """The edge's node is down, so the edge forwards to the core (its forward listener
    replays the edge connection's own receive channel). `long_body` is the control: the
    same request, its client staying, was answered whole by the core, `length`. Here the
    client leaves once the core's node is generating: the edge closes its request to the
    core, and the core cancels at its node and closes the receipt on what it produced."""
    who = forward_client(sites, "alice")
    ctx = client_context(sites, who.cert, who.key)
    path = f"/v2/models/{LLM_MODEL}/generate"
    opening = leave_once_opened(
        edge.cfg.listen.port, ctx, path, long_body, lambda: core_receipts(core)
    )
    closing = closing_at_core(core, opening.receipt_id)
    assert closing.extensions["finish_reason"] == "cancelled"
    sent = closing.extensions["completion_tokens"]
    assert isinstance(sent, int) and sent < FORWARD_LONG
    assert closing.extensions["forwarded_by"] == EDGE_SITE


def test_a_second_finish_while_the_first_writes_the_closing_receipt_waits_for_it() -> None:
    """`Stream.events` ends with `yield await finish()` and a `finally: await finish()`: a
    client leaving while the first writes the closing receipt runs the second at once. It
    must wait for that same finish (one closing receipt, tokens settled once), not fail.
    The real method on a stand-in stream: a slow closing-receipt write cannot be placed
    at that instant with a real node (a mock of a fault, said so)."""

    async def go() -> tuple[int, object, BaseException | None]:
        s = types.SimpleNamespace(closed=None, _done=False, _finishing=None, settled=0)

        async def finish_once() -> None:
            if s._done:
                return
            s._done = True
            await asyncio.sleep(0.2)  # the closing receipt being written
            s.settled += 1
            s.closed = "closed"

        s._finish = finish_once

        async def events() -> AsyncIterator[object]:
            try:
                yield await Stream.finish(s)  # type: ignore[arg-type]
            finally:
                await Stream.finish(s)  # type: ignore[arg-type]

        async def read() -> None:
            async for _ in events():
                pass

        task = asyncio.ensure_future(read())
        await asyncio.sleep(0.05)
        task.cancel()  # the client left while the closing receipt was written
        error: BaseException | None = None
        try:
            await task
        except BaseException as exc:
            error = exc
        await asyncio.sleep(0.3)
        return s.settled, s.closed, error

    settled, closed, error = asyncio.run(go())
    assert settled == 1 and closed == "closed"
    assert isinstance(error, asyncio.CancelledError)  # the client's leaving, not an error
