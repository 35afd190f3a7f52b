"""Verified text through the gateway (issue 23): `ztgate.verification = redundant` on the
generate routes, and spot checks of mode-none streams as late evidence.

Real parts: the shared `llm_cluster` (g1 prov-a, g2 prov-b, honest) and one liar, `sub`
(prov-s): a real tritonserver serving a different, smaller model under the name tinygpt
(tests/test_llm_verify.py's builder); a real gateway over real mTLS in front of the
three. Which nodes a client's request may reach is set by test policy (forbids on node
names), so every test knows who answers and who checks. Answers are greedy: the same
prompt gives the same tokens, so a prompt on which `sub` diverges keeps diverging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.registry import Registry
from tests.conftest import LLM_MODEL, TritonCluster, llm_entries, llm_nodes
from tests.gateway_harness import (
    TEST_CALLERS,
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_gateway import node_table
from tests.test_generate import pick_stop
from tests.test_llm_verify import _substitute_model, prompts

MAX_TOKENS = 24
CHECK_WAIT_S = 120.0  # a bound on waiting for a verdict, never an assertion about speed

# honest: g1 and g2 only. exposed: g1 and sub (g2, the only third provider, forbidden).
# spot-honest: g1 and g2, every mode-none answer checked. spot-sub: answered by sub
# (mode none only there), checked by g1 and g2 (the decision lets them see the request in
# mode redundant). settle: redundant on g1 and sub; g2 may see its requests in mode none,
# so it can settle a divergence.
TEST_POLICY = """
@id("test-vt-honest")
forbid (principal, action == Ztgate::Action::"infer", resource)
when {
  (principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-honest" ||
   principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-spot-honest") &&
  context.node.name == "sub"
};

@id("test-vt-exposed")
forbid (
  principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-exposed",
  action == Ztgate::Action::"infer",
  resource
)
when { context.node.name == "g2" };

@id("test-vt-settle")
forbid (
  principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-settle",
  action == Ztgate::Action::"infer",
  resource
)
when { context.mode == "redundant" && context.node.name == "g2" };

@id("test-vt-spot-sub")
forbid (
  principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-spot-sub",
  action == Ztgate::Action::"infer",
  resource
)
when { context.mode == "none" && context.node.name != "sub" };

@id("test-vt-spot")
@spot_check("100%")
permit (principal, action == Ztgate::Action::"infer", resource)
when {
  (principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-spot-honest" ||
   principal == Ztgate::Client::"spiffe://ztgate.local/client/vt-spot-sub") &&
  context.mode == "none"
};
"""
CALLERS = ("vt-honest", "vt-exposed", "vt-settle", "vt-spot-honest", "vt-spot-sub")


@pytest.fixture(scope="module")
def sub_node(
    pki: PKI, triton_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonCluster]:
    base = tmp_path_factory.mktemp("vt-sub")
    (entry,) = llm_entries(base / "registry")
    small = _substitute_model(base / "small.onnx")
    forged = dataclasses.replace(
        entry, path=small, sha256=hashlib.sha256(small.read_bytes()).hexdigest()
    )
    repo = build_repository([forged], base / "sub-repository")
    layout = (("sub", "eu-south", "prov-s"),)
    with llm_nodes(pki, triton_home, repo, base, layout) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    llm_cluster: TritonCluster,
    sub_node: TritonCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("vt-gw")
    llm_entries(tmp)
    # An operator's opt-in: the shipped entry offers mode none only.
    Registry.open(tmp / "registry").allow_mode(LLM_MODEL, "1", "redundant")
    policies = policy_dir(tmp / "policies", (*TEST_CALLERS, *CALLERS))
    (policies / "60-test-verified-text.cedar").write_text(TEST_POLICY)
    nodes = [{**n, "models": [LLM_MODEL]} for c in (llm_cluster, sub_node) for n in node_table(c)]
    cfg = gateway_config(pki, tmp / "registry", tmp / "g", nodes, policy={"dir": str(policies)})
    with running_gateway(cfg) as gw:
        yield gw


def client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=60)


def events(r: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in r.iter_lines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def completion(prompt: str, mode: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": LLM_MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    if mode is not None:
        body["ztgate.verification"] = mode
    return body


def stream(c: httpx.Client, gw: RunningGateway, prompt: str, mode: str | None) -> list[Any]:
    with c.stream("POST", f"{gw.base}/v1/completions", json=completion(prompt, mode)) as r:
        assert r.status_code == 200, r.read()
        return events(r)


def text_of(got: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["text"] for e in got if e.get("choices"))


def closing(got: list[dict[str, Any]]) -> dict[str, Any]:
    (last,) = [e for e in got if "receipt_id" in e.get("ztgate", {})]
    return last


PROSE = [bytes(p).decode() for p in prompts(8)]


@pytest.fixture(scope="module")
def diverging(gateway: RunningGateway, pki: PKI) -> tuple[str, list[Any]]:
    """The first prose prompt on which g1 and sub diverge after agreeing on at least one
    token (so the client has an agreed prefix to compare), and that stream's events."""
    with client(pki, "vt-exposed") as c:
        for prompt in PROSE:
            got = stream(c, gateway, prompt, "redundant")
            if closing(got)["ztgate"].get("divergence", 0) > 0:
                return prompt, got
    raise AssertionError("no prompt diverged after an agreed token")


def test_redundant_streams_agreed_tokens_and_receipts_say_agreed(
    gateway: RunningGateway, pki: PKI
) -> None:
    with client(pki, "vt-honest") as c:
        got = stream(c, gateway, PROSE[0], "redundant")
        plain = stream(c, gateway, PROSE[0], None)
        rid = closing(got)["ztgate"]["receipt_id"]
        receipt = c.get(f"{gateway.base}/v2/receipts/{rid}").json()["receipt"]
    opening = got[0]["ztgate"]
    assert opening["verification"] == "redundant" and sorted(opening["nodes"]) == ["g1", "g2"]
    last = closing(got)["ztgate"]
    assert last["verification_status"] == "agreed" and last["finish_reason"] in ("stop", "length")
    assert (receipt["verification"]["mode"], receipt["verification"]["result"]) == (
        "redundant",
        "agreed",
    )
    assert sorted(receipt["nodes"]) == ["g1", "g2"]
    # Positive control built the same way: mode none gives the same greedy text.
    assert text_of(got) == text_of(plain) and text_of(got)
    assert plain[0]["ztgate"]["verification"] == "none"


def test_divergence_ends_the_stream_with_an_error_and_only_the_agreed_prefix(
    gateway: RunningGateway, pki: PKI, diverging: tuple[str, list[Any]]
) -> None:
    prompt, got = diverging
    with client(pki, "vt-honest") as c:  # the honest answer to the same prompt
        honest = stream(c, gateway, prompt, "redundant")
    with client(pki, "vt-exposed") as c:
        rid = closing(got)["ztgate"]["receipt_id"]
        receipt = c.get(f"{gateway.base}/v2/receipts/{rid}").json()["receipt"]
        params = {"max_tokens": MAX_TOKENS, "temperature": 0, "ztgate.verification": "redundant"}
        body = {"text_input": prompt, "parameters": params}
        url = f"{gateway.base}/v2/models/{LLM_MODEL}/generate_stream"
        with c.stream("POST", url, json=body) as r:
            triton = events(r)
        whole = c.post(
            f"{gateway.base}/v1/completions",
            json={**completion(prompt, "redundant"), "stream": False},
        )
    last = closing(got)
    at = last["ztgate"]["divergence"]
    assert last["ztgate"]["verification_status"] == "diverged"
    assert last["usage"]["completion_tokens"] == at < MAX_TOKENS
    # No token past the agreed prefix: the client's text is a prefix of the honest answer.
    assert honest and text_of(honest).startswith(text_of(got))
    assert text_of(got) and len(text_of(got).encode()) <= at
    error = got[-1]["error"]
    assert error["type"].endswith("/upstream-failed") and "diverged" in error["message"]
    assert (receipt["verification"]["mode"], receipt["verification"]["result"]) == (
        "redundant",
        "diverged",
    )
    assert receipt["ext"]["finish_reason"] == "diverged"
    assert receipt["ext"]["divergence"] == at and sorted(receipt["nodes"]) == ["g1", "sub"]
    # Triton's surface: the same end, its error event problem+json shaped.
    assert triton[-2]["finish_reason"] == "diverged"
    assert triton[-1]["type"].endswith("/upstream-failed") and triton[-1]["divergence"] == at
    # Not streamed: no text at all, a 502 naming the closing receipt.
    assert whole.status_code == 502, whole.text
    assert whole.json()["error"]["code"] == "upstream-failed"
    assert whole.headers["ztgate-receipt"].split()[1] != rid


def test_a_third_provider_settles_a_divergence_and_the_liar_is_charged(
    gateway: RunningGateway, pki: PKI, diverging: tuple[str, list[Any]]
) -> None:
    prompt, _ = diverging
    router = gateway.gw.router
    counts = gateway.gw.text_spot.checks.counts  # type: ignore[attr-defined]
    before = {n: router.nodes[n].failed for n in ("g1", "g2", "sub")}
    settled = counts["settled"]
    skipped = counts["settle-no-third"]
    with client(pki, "vt-exposed") as c:  # control: no third provider allowed, none asked
        assert closing(stream(c, gateway, prompt, "redundant"))["ztgate"]["divergence"] > 0
    # Counted before the closing event is sent (Stream.finish), so already here.
    assert counts["settle-no-third"] == skipped + 1
    with client(pki, "vt-settle") as c:
        got = stream(c, gateway, prompt, "redundant")
    assert closing(got)["ztgate"]["verification_status"] == "diverged"
    deadline = time.monotonic() + CHECK_WAIT_S
    while counts["settled"] + counts["unsettled"] == settled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts["settled"] == settled + 1
    after = {n: router.nodes[n].failed for n in ("g1", "g2", "sub")}
    assert after["sub"] == before["sub"] + 1
    assert (after["g1"], after["g2"]) == (before["g1"], before["g2"])


def verdict(c: httpx.Client, gw: RunningGateway, rid: str) -> dict[str, Any]:
    """GET the receipt until its spot check has a verdict (bounded)."""
    deadline = time.monotonic() + CHECK_WAIT_S
    while True:
        got = c.get(f"{gw.base}/v2/receipts/{rid}")
        assert got.status_code == 200, got.text
        doc: dict[str, Any] = got.json()
        if doc["final_status"] != "pending" or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def test_spot_checks_of_text_become_late_evidence_on_the_closing_receipt(
    gateway: RunningGateway, pki: PKI, diverging: tuple[str, list[Any]]
) -> None:
    prompt, _ = diverging
    router = gateway.gw.router
    with client(pki, "vt-spot-honest") as c:
        got = stream(c, gateway, prompt, None)
        honest = verdict(c, gateway, closing(got)["ztgate"]["receipt_id"])
    with client(pki, "vt-spot-sub") as c:
        lied = stream(c, gateway, prompt, None)
        caught = verdict(c, gateway, closing(lied)["ztgate"]["receipt_id"])
    assert got[0]["ztgate"]["node"] in ("g1", "g2") and lied[0]["ztgate"]["node"] == "sub"
    assert honest["receipt"]["ext"]["spot_check"] == "scheduled"
    assert honest["final_status"] == "confirmed"
    assert [d["kind"] for d in honest["late_evidence"]] == ["text_spot_check"]
    assert caught["final_status"] == "contradicted"
    assert caught["late_evidence"][-1]["nodes"][0] == "sub"
    assert router.nodes["sub"].failed >= 1 and router.nodes["g1"].failed == 0


def test_a_stop_sequence_ends_verified_text_at_what_was_delivered(
    gateway: RunningGateway, pki: PKI
) -> None:
    """Redundant agreement and the teacher-forced spot check both cover only the text the
    client got: honest nodes still agree, and are still confirmed."""
    with client(pki, "vt-honest") as c:
        for prompt in PROSE:  # one whose answer is long enough to cut
            plain = stream(c, gateway, prompt, "redundant")
            text = text_of(plain)
            if len(text) > 8:
                break
        stop, at = pick_stop(text)
        body = {**completion(prompt, "redundant"), "stop": stop}
        with c.stream("POST", f"{gateway.base}/v1/completions", json=body) as r:
            got = events(r)
    # Positive control: the same request without stop is the whole agreed answer.
    assert closing(plain)["ztgate"]["verification_status"] == "agreed"
    last = closing(got)
    assert text_of(got) == text[:at]
    assert last["ztgate"]["finish_reason"] == "stop"
    assert last["ztgate"]["verification_status"] == "agreed"
    assert last["usage"]["completion_tokens"] == len(text[:at].encode())
    with client(pki, "vt-spot-honest") as c:
        body = {**completion(prompt, None), "stop": [stop]}
        with c.stream("POST", f"{gateway.base}/v1/completions", json=body) as r:
            spot = events(r)
        doc = verdict(c, gateway, closing(spot)["ztgate"]["receipt_id"])
    assert text_of(spot) == text[:at] and closing(spot)["ztgate"]["finish_reason"] == "stop"
    assert doc["receipt"]["ext"]["spot_check"] == "scheduled"
    assert doc["receipt"]["ext"]["completion_tokens"] == len(text[:at].encode())
    assert doc["final_status"] == "confirmed"
