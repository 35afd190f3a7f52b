"""Client text stays out of what the gateway signs, keeps and answers (issue 14).

A receipt is signed and retained for years; a problem body goes back to whoever sent the
request. Neither may grow with what a client sends: a megabyte mode value or request-id
header must cost the log what a one-byte one does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.node.repository import build_repository
from gateway.pipeline.decide import flush_decisions
from gateway.pki import PKI
from gateway.policy import InferContext, PolicyEngine, load_policy_dir
from gateway.receipts.issue import DenialCoalescer
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import ClientRef, Denial, ModelRef, Receipt, SignedReceipt
from gateway.registry import Registry
from gateway.verify import MODES
from tests.conftest import TritonCluster, one_off_node
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body, node_table
from tests.test_policy import MODELS, NODES, NOON, POLICIES, policy_dir, who


def big_mode(gw: RunningGateway) -> str:
    """2 MB of mode value (the issue's case), or as much as a JSON body may carry where the
    gateway caps JSON bodies below that: what reaches the mode check either way."""
    cap = getattr(gw.cfg.limits, "max_json_bytes", 4 * 1024 * 1024)
    return "z" * min(2 * 1024 * 1024, cap - 8 * 1024)


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path_factory.mktemp("gwct"),
        node_table(triton_cluster),
    )
    with running_gateway(cfg) as gw:
        yield gw


def client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=30)


def body_with(mode: str | None) -> dict[str, Any]:
    body = infer_body(IRIS)
    if mode is not None:
        body["parameters"] = {"ztgate.verification": mode}
    return body


def stored_receipt(gw: RunningGateway, summary: str) -> tuple[Receipt, int]:
    """The receipt a `ztgate-receipt` header names, as stored, and its stored size."""
    assert gw.gw.receipts is not None
    rid = summary.split()[1]
    reader = ReceiptLog.open_readonly(gw.gw.receipts.log.path)
    try:
        stored = reader.body(rid)
    finally:
        asyncio.run(reader.close())
    assert stored is not None
    return SignedReceipt.from_bytes(stored.body).receipt, len(stored.body)


def log_bytes(gw: RunningGateway) -> int:
    assert gw.gw.receipts is not None
    return sum(p.stat().st_size for p in gw.gw.receipts.log.path.rglob("*") if p.is_file())


def largest_accepted_header(c: httpx.Client, url: str) -> str:
    """A 1 MB request-id header if the server takes it, else the largest it takes: the
    point is what reaches the app, not what the HTTP layer refuses on its own."""
    for size in (1024 * 1024, 256 * 1024, 60 * 1024, 16 * 1024, 8 * 1024, 4 * 1024):
        value = "r" * size
        try:
            r = c.post(url, json=body_with(None), headers={"ztgate-request-id": value})
        except httpx.HTTPError:
            continue
        if r.status_code == 403:  # reached policy: the header got through
            return value
    pytest.fail("the server took no request-id header of 4 KiB or more")


def test_a_huge_mode_or_request_id_never_reaches_the_log(gateway: RunningGateway, pki: PKI) -> None:
    url = f"{gateway.base}/v2/models/iris/infer"
    with client(pki, "demo") as demo:
        big_header = "r" * (64 * 1024)
        before = log_bytes(gateway)
        big = [
            demo.post(
                url,
                json=body_with(big_mode(gateway) + str(i)),
                headers={"ztgate-request-id": big_header[:-3] + f"{i:03}"},
            )
            for i in range(20)
        ]
        after = log_bytes(gateway)
    for r in big:
        assert r.status_code == 400, r.text[:300]
        assert "zzzz" not in r.text and "rrrr" not in r.text
        assert len(r.content) < 2048
    # Before: each denial its own receipt quoting 2 MB (about 45 MB for these 20).
    assert after - before < 64 * 1024, after - before


def test_denials_coalesce_on_caller_model_and_type_only() -> None:
    client_ = ClientRef("spiffe://x/client/a", "01", "ca")
    model = ModelRef("iris", "1", "00" * 32)
    keys = {
        DenialCoalescer.key(client_, model, Denial("https://ztgate.dev/problems/forbidden", why))
        for why in ("one text", "another text" * 1000)
    }
    assert len(keys) == 1


def test_a_huge_request_id_header_is_not_the_receipts_request_id(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v2/models/iris/infer"
    with client(pki, "nobody") as nobody:
        big_header = largest_accepted_header(nobody, url)
        r = nobody.post(url, json=body_with(None), headers={"ztgate-request-id": big_header})
    assert r.status_code == 403
    receipt, size = stored_receipt(gateway, r.headers["ztgate-receipt"].split(";")[0])
    assert receipt.request_id != big_header and big_header not in r.text
    assert size < 4096


def test_an_unknown_mode_is_a_bad_request_that_quotes_nothing(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v2/models/iris/infer"
    with client(pki, "demo") as demo:
        r = demo.post(url, json=body_with(big_mode(gateway)))
        short = demo.post(url, json=body_with("fastest"))
        ok = demo.post(url, json=body_with("none"))  # control: a valid mode answers
    for bad in (r, short):
        assert bad.status_code == 400, bad.text[:300]
        body = bad.json()
        assert body["type"].endswith("/bad-request")
        assert body["detail"] == (
            "unknown verification mode; ztgate.verification must be one of none, redundant, zk, mpc"
        )
        assert "ztgate-receipt" not in bad.headers  # malformed, not a refusal
    assert len(r.content) < 2048
    assert ok.status_code == 200, ok.text
    # Control: answers are still receipted, with the gateway's id.
    params = ok.json()["parameters"]
    receipt, _ = stored_receipt(gateway, params["ztgate.receipt"])
    assert receipt.request_id == params["ztgate.request_id"] == ok.headers["ztgate-request-id"]


# Honest enough to agree with its twin (a fixed answer), and it writes down the KServe
# request id each request reached it with: what a node can see and compare.
ID_ECHO = """
import os
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

IDS = {ids!r}


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            with open(os.path.join(IDS, uuid.uuid4().hex), "w") as f:
                f.write(request.request_id())
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            fixed = np.tile(np.array([[0.0, 0.0, 1.0]], dtype=np.float32), (x.shape[0], 1))
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", fixed)]))
        return out
"""


@pytest.fixture(scope="module")
def echo_nodes(
    pki: PKI, triton_home: Path, triton_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[dict[str, str]]]]:
    base = tmp_path_factory.mktemp("echo")
    ids = base / "ids"
    ids.mkdir()
    registry = triton_repository.parent / "registry"
    entries = [e for e in Registry.open(registry).entries() if e.name == "iris"]
    repo = build_repository(entries, base / "repository")
    (repo / "iris" / entries[0].version / "model.py").write_text(ID_ECHO.format(ids=str(ids)))
    with (
        one_off_node(pki, triton_home, repo, "echo-a", base / "a", provider="prov-a") as a,
        one_off_node(pki, triton_home, repo, "echo-b", base / "b", provider="prov-b") as b,
    ):
        yield ids, [a, b]


def test_each_node_attempt_carries_its_own_random_id(
    pki: PKI,
    echo_nodes: tuple[Path, list[dict[str, str]]],
    triton_repository: Path,
    tmp_path: Path,
) -> None:
    ids, nodes = echo_nodes
    cfg = gateway_config(pki, triton_repository.parent / "registry", tmp_path / "g", nodes)
    with running_gateway(cfg) as gw, client(pki, "demo") as demo:
        for f in ids.iterdir():  # health probes, if any, before this request
            f.unlink()
        r = demo.post(f"{gw.base}/v2/models/iris/infer", json=body_with("redundant"))
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        assert params["ztgate.verification_status"] == "agreed"
        assert sorted(params["ztgate.nodes"].split(",")) == ["echo-a", "echo-b"]
        receipt, _ = stored_receipt(gw, params["ztgate.receipt"])
    seen = [f.read_text() for f in ids.iterdir()]
    # Both copies (and any probe) reached a node, each with an id of its own...
    assert len(seen) >= 2 and len(set(seen)) == len(seen), seen
    # ...that is not the id the receipt and the client's answer carry.
    assert receipt.request_id == params["ztgate.request_id"]
    assert receipt.request_id not in seen
    assert all(len(s) == 32 for s in seen), seen


def test_purposes_share_cache_keys_by_the_literal_they_match() -> None:
    engine = PolicyEngine(load_policy_dir(POLICIES), models=MODELS, nodes=NODES)
    alice, model, nodes = who("alice"), "m30", ["eu-a", "eu-b"]  # m30: confidential

    def decide(purpose: str) -> Any:
        return engine.decide_infer(alice, model, InferContext(1, 10, purpose, NOON), nodes)

    empty = decide("")  # control: the literal decides as before
    assert not empty.allowed and "sensitive-needs-purpose" in empty.determining
    per_key = engine.stats().size
    audit = decide("audit")
    assert audit.allowed and "analysts-call-confidential" in audit.determining
    for i in range(10_000):
        d = decide(f"purpose-{i}")
        assert (d.allowed, d.modes, d.determining) == (
            audit.allowed,
            audit.modes,
            audit.determining,
        )
    # One set of entries per literal plus one for every other purpose (was: 10,002 sets).
    # The shipped policies compare the purpose with "" only (sensitive-needs-purpose).
    assert engine.stats().size <= per_key * 2
    assert engine.purpose_literals == frozenset({""})
    assert not decide("").allowed


def test_a_purpose_like_pattern_keeps_exact_keys(tmp_path: Path) -> None:
    """A `like` can tell two unlisted purposes apart: then only exact keys are safe."""
    rule = (
        '@id("audit-only")\nforbid (principal, action == Ztgate::Action::"infer", resource)\n'
        'when { context.purpose like "audit*" };\n'
    )
    engine = PolicyEngine(
        load_policy_dir(policy_dir(tmp_path, {"90-audit.cedar": rule})), models=MODELS, nodes=NODES
    )
    assert engine.purpose_literals is None
    ctx = InferContext(1, 10, "audit-1", NOON)
    assert not engine.decide_infer(who("demo"), "m0", ctx, ["eu-a"]).allowed
    ctx = InferContext(1, 10, "other-1", NOON)
    assert engine.decide_infer(who("demo"), "m0", ctx, ["eu-a"]).allowed


def test_a_purpose_over_64_ascii_characters_is_a_bad_request(
    gateway: RunningGateway, pki: PKI
) -> None:
    url = f"{gateway.base}/v2/models/iris/infer"

    def with_purpose(purpose: object) -> dict[str, Any]:
        body = infer_body(IRIS)
        body["parameters"] = {"ztgate.purpose": purpose}
        return body

    with client(pki, "demo") as demo:
        bad = [demo.post(url, json=with_purpose(p)) for p in ("p" * 65, "é", "x" * 100_000)]
        ok = demo.post(url, json=with_purpose("p" * 64))
    for r in bad:
        assert r.status_code == 400, r.text[:300]
        assert r.json()["detail"] == (
            "ztgate.purpose must be a string of at most 64 printable ASCII characters"
        )
    assert ok.status_code == 200, ok.text


def test_problems_name_the_request_the_decision_and_the_modes_allowed(
    gateway: RunningGateway, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{gateway.base}/v2/models/iris/infer"
    with caplog.at_level(logging.INFO, logger="ztgate.decisions"):
        with client(pki, "demo") as demo:
            by_mode = {m: demo.post(url, json=body_with(m)) for m in MODES}
            bad = demo.post(url, json=body_with("fastest"))  # after policy: decided
            early = body_with(None)
            early["parameters"] = {"ztgate.purpose": "p" * 65}  # refused before policy
            early_r = demo.post(url, json=early)
        with client(pki, "nobody-problems") as nobody:
            denied = nobody.post(url, json=body_with(None))
        flush_decisions()  # the writer thread's records, all of them, before reading
    allowed = [m for m, r in by_mode.items() if r.status_code == 200]
    refused = {m: r for m, r in by_mode.items() if r.status_code == 403}
    assert allowed and refused, {m: r.status_code for m, r in by_mode.items()}
    for mode, r in refused.items():
        body = r.json()
        assert len(body["request_id"]) == 32 and len(body["decision_id"]) == 32
        assert body["request_id"] != body["decision_id"]
        assert body["allowed_modes"] == allowed
        assert body["detail"].startswith(f"verification mode {mode!r} is not allowed")
        assert f"allowed modes: {', '.join(allowed)}" in body["detail"]
        assert "denied by " in body["detail"] or "no permit matches" in body["detail"]
        assert "allowed by" not in body["detail"]
    assert bad.status_code == 400 and len(bad.json()["decision_id"]) == 32
    # Before policy, no decision yet: the request id all the same.
    assert early_r.status_code == 400, early_r.text
    assert len(early_r.json()["request_id"]) == 32 and "decision_id" not in early_r.json()
    # A caller with no permit at all: its receipt carries the id its problem names.
    body = denied.json()
    assert denied.status_code == 403 and body["allowed_modes"] == []
    assert "no mode is allowed" in body["detail"]
    receipt, _ = stored_receipt(gateway, denied.headers["ztgate-receipt"])
    assert receipt.request_id == body["request_id"]
    # The decision log never explains a deny with the permits of other modes.
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ztgate.decisions"]
    assert {r["mode"] for r in records if r["result"] == "deny"} >= set(refused)
    for record in records:
        if record["result"] == "deny":
            assert "allowed by" not in record["reason"], record
        else:
            assert record["reason"].startswith(f"{record['mode']} allowed by"), record
