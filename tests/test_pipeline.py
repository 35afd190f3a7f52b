"""Each stage of the request pipeline on its own, built from its parts without the app.

The gateway is built (registry, policy, router, stores) but never served, and its nodes
are addresses nobody listens on: every stage here runs before a node is called, or with
a recording verifier standing in for the mode (the modes have their own tests against real
nodes: test_routing, test_redundant, test_zk, test_mpc). Each refusal has a positive
control built the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.app import Gateway
from gateway.job import Job, Outcome
from gateway.jobs.scope import JOB_EXTENSION, JobScope
from gateway.pipeline import (
    AdmissionStage,
    Asked,
    Caller,
    Concurrency,
    Decided,
    DecodeStage,
    DenialStage,
    IdentityStage,
    Incoming,
    ModeStage,
    NonceStage,
    PolicyStage,
    PrePolicyStage,
    RateLimitStage,
    ReceiptStage,
    RouteStage,
    VerifyStage,
    body_of,
)
from gateway.pipeline.decide import decision_id_of
from gateway.pipeline.offload import OFFLOAD_BYTES, DecodePool
from gateway.pki import PKI
from gateway.policy.facts import InferContext, Rate
from gateway.ports import free_port
from gateway.protocol.problems import (
    BadRequest,
    Forbidden,
    InvalidTensor,
    NoHealthyNode,
    Overloaded,
    PayloadTooLarge,
    Problem,
    RateLimited,
    Replayed,
    Unauthenticated,
)
from gateway.protocol.tensors import Limits
from gateway.receipts.issue import derive
from gateway.revocation import Revocations
from gateway.routing.router import Router
from gateway.runtime import build_gateway
from gateway.state.memory import MemoryStore
from tests.gateway_harness import SHIPPED_POLICIES, gateway_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)

# Scoped permits, no catch-all: demo (apps) may call iris in mode none at 2 a minute;
# analysts may call mnist only under a condition no request can meet before its body is
# read (and none here after). carol (cleared) has no permit at all.
POLICY = """
@id("apps-call-iris")
@rate("2/minute")
permit(principal in Ztgate::Group::"apps", action == Ztgate::Action::"infer",
       resource == Ztgate::Model::"iris")
when { context.mode == "none" };

@id("analysts-big-batches")
permit(principal in Ztgate::Group::"analysts", action == Ztgate::Action::"infer",
       resource == Ztgate::Model::"mnist")
when { context.batch_size > 1000000 };
"""


@pytest.fixture(scope="module")
def gw(pki: PKI, triton_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    data = tmp_path_factory.mktemp("pipeline")
    policies = data / "scoped-policies"  # not "policies": the harness fills that one
    policies.mkdir()
    for name in ("schema.cedarschema", "identities.json"):
        (policies / name).write_text((SHIPPED_POLICIES / name).read_text())
    (policies / "10-test.cedar").write_text(POLICY)
    nodes = [
        {
            "name": name,
            "address": f"127.0.0.1:{free_port()}",  # nobody listens: no node is called
            "region": "eu-west",
            "provider": provider,
            "dns_name": f"{name}.nodes.test",
            "spiffe_id": f"spiffe://{pki.trust_domain}/node/{name}",
            "models": ["iris", "mnist"],
        }
        for name, provider in (("n1", "prov-a"), ("n2", "prov-b"))
    ]
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        data,
        nodes,
        policy={"dir": str(policies)},
    )
    return build_gateway(cfg)


def scope_of(pki: PKI, name: str) -> dict[str, Any]:
    cert = pki.ensure("client", name).cert.read_text()
    return {"extensions": {"tls": {"client_cert_chain": [cert]}}}


def caller(gw: Gateway, pki: PKI, name: str) -> Caller:
    return Caller.of(gw.resolver.resolve(scope_of(pki, name)))


async def decode(
    gw: Gateway, pki: PKI, name: str, body: bytes, pool: DecodePool | None = None, **headers: str
) -> Asked:
    came = Incoming(
        scope=scope_of(pki, name),
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        body=body_of(body),
        model="iris",
    )
    stage = DecodeStage(gw.cfg, pool)
    return await stage(came, caller(gw, pki, name), gw.entry("iris", None))


def json_body(x: np.ndarray[Any, Any], **params: Any) -> bytes:
    inputs = [
        {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    ]
    return json.dumps({"inputs": inputs, "parameters": params}).encode()


# --- identity -----------------------------------------------------------------------------
async def test_identity_stage_refuses_a_revoked_certificate(gw: Gateway, pki: PKI) -> None:
    revocations = Revocations(MemoryStore(), None)
    stage = IdentityStage(gw.resolver, revocations)
    got = stage(scope_of(pki, "demo"))  # control: a valid certificate
    assert got.identity.spiffe_id.endswith("/client/demo") and got.facts.name == "demo"
    await revocations.revoke(got.identity.issuer, got.identity.serial)
    with pytest.raises(Unauthenticated, match="revoked"):
        stage(scope_of(pki, "demo"))
    assert stage(scope_of(pki, "alice")).identity.spiffe_id.endswith("/client/alice")
    with pytest.raises(Unauthenticated):
        stage({})  # no certificate at all


# --- admission ----------------------------------------------------------------------------
async def test_admission_refuses_the_ninth_concurrent_request_of_one_identity(
    gw: Gateway, pki: PKI
) -> None:
    stage = AdmissionStage(MemoryStore(), Rate.parse("1000/minute"), Concurrency(100, 8))
    demo, alice = caller(gw, pki, "demo"), caller(gw, pki, "alice")
    async with contextlib.AsyncExitStack() as held:
        for _ in range(8):
            await held.enter_async_context(stage(demo))
        with pytest.raises(RateLimited, match="at most 8 concurrent"):
            await held.enter_async_context(stage(demo))
        async with stage(alice):  # control: another identity has its own 8
            assert stage.concurrency.in_flight == 9
    async with stage(demo):  # the slots came back
        assert stage.concurrency.by_identity == {demo.identity.spiffe_id: 1}
    assert stage.concurrency.in_flight == 0 and stage.concurrency.by_identity == {}


async def test_admission_rate_is_per_identity(gw: Gateway, pki: PKI) -> None:
    stage = AdmissionStage(MemoryStore(), Rate.parse("2/minute"), Concurrency(100, 8))
    demo, alice = caller(gw, pki, "demo"), caller(gw, pki, "alice")
    for _ in range(2):
        async with stage(demo):
            pass
    with pytest.raises(RateLimited, match="2 requests per 60"):
        async with stage(demo):
            pass
    async with stage(alice):  # control
        pass


# --- pre-policy ---------------------------------------------------------------------------
async def test_pre_policy_denies_only_when_no_permit_scope_can_match(gw: Gateway, pki: PKI) -> None:
    stage = PrePolicyStage(gw.policy)
    iris, mnist = gw.entry("iris", None), gw.entry("mnist", None)
    stage(caller(gw, pki, "demo"), iris)  # control: apps-call-iris names demo's group
    with pytest.raises(Forbidden, match="no permit matches") as denied:
        stage(caller(gw, pki, "demo"), mnist)
    assert denied.value.extra["allowed_modes"] == []
    with pytest.raises(Forbidden, match="no permit matches"):
        stage(caller(gw, pki, "carol"), iris)
    # Conditions are never evaluated before the body: alice's permit for mnist holds only
    # for batches over a million, which no placeholder could decide. It passes here; the
    # full decision after the body denies it.
    stage(caller(gw, pki, "alice"), mnist)


# --- decode -------------------------------------------------------------------------------
async def test_decode_makes_a_typed_request_and_refuses_what_does_not_fit(
    gw: Gateway, pki: PKI
) -> None:
    got = await decode(gw, pki, "demo", json_body(IRIS))
    assert got.entry.name == "iris" and got.request.inputs[0].shape == (1, 4)
    assert got.payload_bytes == len(json_body(IRIS)) and not got.client_deadline
    np.testing.assert_array_equal(got.request.inputs[0].data, IRIS)
    wrong = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    ).encode()
    with pytest.raises(InvalidTensor, match="takes inputs"):
        await decode(gw, pki, "demo", wrong)
    with pytest.raises(BadRequest, match="ztgate-deadline-ms"):
        await decode(gw, pki, "demo", json_body(IRIS), ztgate_deadline_ms="soon")
    short = await decode(gw, pki, "demo", json_body(IRIS), ztgate_deadline_ms="50")
    assert short.client_deadline and short.deadline <= short.incoming.started + 0.05 + 1e-9


async def test_json_over_its_cap_is_refused_naming_the_binary_format(gw: Gateway, pki: PKI) -> None:
    cap = gw.cfg.limits.max_json_bytes
    rows = np.random.default_rng(1).random((cap // 40, 4), dtype=np.float32)
    big = json_body(rows)
    assert len(big) > cap
    with pytest.raises(PayloadTooLarge, match="binary tensor data"):
        await decode(gw, pki, "demo", big)
    # Control: the same tensor in the binary extension is decoded.
    tensor = httpclient.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=True)
    body, header = httpclient.InferenceServerClient.generate_request_body([tensor])
    got = await decode(gw, pki, "demo", body, inference_header_content_length=str(header))
    np.testing.assert_array_equal(got.request.inputs[0].data, rows)


# --- nonce --------------------------------------------------------------------------------
async def test_a_nonce_is_refused_the_second_time_without_echoing_it(gw: Gateway, pki: PKI) -> None:
    stage = NonceStage(MemoryStore(), 60.0)
    once = await decode(gw, pki, "demo", json_body(IRIS), ztgate_nonce="n-1")
    await stage(once)
    with pytest.raises(Replayed) as replayed:
        await stage(once)
    assert "n-1" not in replayed.value.detail
    await stage(await decode(gw, pki, "alice", json_body(IRIS), ztgate_nonce="n-1"))  # control
    await stage(await decode(gw, pki, "demo", json_body(IRIS)))  # no nonce: nothing to check


# --- policy and mode ----------------------------------------------------------------------
async def test_policy_then_mode_make_a_decided_request(gw: Gateway, pki: PKI) -> None:
    policy = PolicyStage(gw.policy, gw.router, gw.revocations)
    mode = ModeStage(gw.verifiers)
    request = await decode(gw, pki, "demo", json_body(IRIS))
    decision = policy(request)
    assert decision.modes == ("none",) and decision.determining == ("apps-call-iris",)
    decided = mode(request, decision)
    assert decided.mode == "none" and decided.deadline == request.deadline
    assert decided.node_allowed(gw.router.nodes["n1"].config)
    # The full decision does read the body's conditions: alice passed pre-policy for mnist.
    mnist = np.zeros((1, 784), dtype=np.float32)
    body = json_body(mnist)
    came = Incoming(scope=scope_of(pki, "alice"), headers={}, body=body_of(body), model="mnist")
    big = await DecodeStage(gw.cfg)(came, caller(gw, pki, "alice"), gw.entry("mnist", None))
    with pytest.raises(Forbidden, match="no mode is allowed") as denied:
        policy(big)
    assert denied.value.extra["decision_id"]


async def test_mode_refusals_name_the_rules_and_the_allowed_modes(gw: Gateway, pki: PKI) -> None:
    policy = PolicyStage(gw.policy, gw.router, gw.revocations)
    mode = ModeStage(gw.verifiers)
    ask_redundant = await decode(
        gw, pki, "demo", json_body(IRIS, **{"ztgate.verification": "redundant"})
    )
    with pytest.raises(Forbidden, match="allowed modes: none") as refused:
        mode(ask_redundant, policy(ask_redundant))
    assert refused.value.extra["allowed_modes"] == ["none"]
    ask_bogus = await decode(gw, pki, "demo", json_body(IRIS, **{"ztgate.verification": "x" * 999}))
    with pytest.raises(BadRequest) as bad:
        mode(ask_bogus, policy(ask_bogus))
    assert "xxx" not in bad.value.detail
    ask_none = await decode(gw, pki, "demo", json_body(IRIS, **{"ztgate.verification": "none"}))
    assert mode(ask_none, policy(ask_none)).mode == "none"  # control


async def test_the_decision_id_comes_from_the_requests_one_draw(
    gw: Gateway, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy stage asks the kernel for nothing: its decision id is a domain-separated
    hash of the request's secret seed, so two requests get two ids and the id (public: in
    problems, receipts, the decision log) gives away neither the seed nor what else comes
    from it (the request id, the receipt's salt and nonce)."""
    policy = PolicyStage(gw.policy, gw.router, gw.revocations)
    one = await decode(gw, pki, "demo", json_body(IRIS))
    two = await decode(gw, pki, "demo", json_body(IRIS))
    draws: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counted)
    first, second = policy(one), policy(two)
    monkeypatch.undo()
    assert draws == []
    assert first.id == decision_id_of(one.incoming.seed) and len(first.id) == 32
    assert second.id == decision_id_of(two.incoming.seed) != first.id
    seed = one.incoming.seed
    salt, nonce = derive(one.incoming.receipt_seed)
    for other in (seed, one.incoming.receipt_seed, salt, bytes.fromhex(one.incoming.request_id)):
        assert other.hex()[:8] not in first.id and first.id[:8] not in other.hex()
    assert nonce not in first.id and first.id != hashlib.sha256(seed).digest()[:16].hex()
    # A denial's id comes from the seed too (the problem and the receipt name it).
    came = Incoming(scope=scope_of(pki, "carol"), headers={}, body=body_of(json_body(IRIS)))
    carol = await DecodeStage(gw.cfg)(came, caller(gw, pki, "carol"), gw.entry("iris", None))
    with pytest.raises(Forbidden) as denied:
        policy(carol)
    assert denied.value.extra["decision_id"] == decision_id_of(came.seed)
    # A job's seed is the same on every run, but each run is a decision of its own.
    job = {**scope_of(pki, "demo"), "extensions": {**scope_of(pki, "demo")["extensions"]}}
    job["extensions"][JOB_EXTENSION] = JobScope("job-1", seed)
    runs = [
        Incoming(scope=job, headers={}, body=body_of(json_body(IRIS)), seed=seed) for _ in range(2)
    ]
    ids = [
        policy(await DecodeStage(gw.cfg)(r, caller(gw, pki, "demo"), gw.entry("iris", None))).id
        for r in runs
    ]
    assert ids[0] != ids[1] and decision_id_of(seed) not in ids
    # Control: a caller that gives no id (the CLI, golden tests) gets a fresh draw each time.
    ctx = InferContext(batch_size=1, payload_bytes=64)
    ask = (one.caller.facts, "iris", ctx, ["n1", "n2"])
    monkeypatch.setattr(os, "urandom", counted)
    drawn = {gw.policy.engine.decide_infer(*ask).id for _ in range(2)}
    monkeypatch.undo()
    assert draws == [16, 16] and len(drawn) == 2 and first.id not in drawn


# --- rate, route, verify, receipt ---------------------------------------------------------
async def decided(gw: Gateway, pki: PKI, name: str = "demo") -> Decided:
    request = await decode(gw, pki, name, json_body(IRIS))
    return ModeStage(gw.verifiers)(
        request, PolicyStage(gw.policy, gw.router, gw.revocations)(request)
    )


async def test_rate_limit_follows_the_determining_permit(gw: Gateway, pki: PKI) -> None:
    stage = RateLimitStage(MemoryStore())
    d = await decided(gw, pki)
    assert d.decision.rate == Rate(2, 60.0)
    await stage(d)
    await stage(d)
    with pytest.raises(RateLimited, match="2 requests per 60"):
        await stage(d)


async def test_route_refuses_when_no_allowed_node_is_healthy(gw: Gateway, pki: PKI) -> None:
    d = await decided(gw, pki)
    router = Router(dict(gw.router.nodes), MemoryStore(), gw.cfg.routing)
    RouteStage(router)(d)  # control: both nodes in, neither ejected
    router.ejected = {"n1": time.time() + 60, "n2": time.time() + 60}
    with pytest.raises(NoHealthyNode, match="in mode 'none'"):
        RouteStage(router)(d)


@dataclasses.dataclass
class Recording:
    """Stands in for a mode: records the job it was given (the modes are tested against
    real nodes elsewhere); what it returns is what the receipt must show."""

    mode: str = "none"
    jobs: list[Job] = dataclasses.field(default_factory=list)

    async def run(self, job: Job, router: Router) -> Outcome:
        self.jobs.append(job)
        out = job.inputs[0]
        return Outcome(outputs=(out,), nodes=("n1",), mode=self.mode, status="unverified")


async def test_verify_gives_the_mode_a_frozen_job_and_nothing_else(gw: Gateway, pki: PKI) -> None:
    d = await decided(gw, pki)
    recording = Recording()
    outcome = await VerifyStage({"none": recording}, gw.router)(d)
    (job,) = recording.jobs
    assert outcome.nodes == ("n1",)
    assert job.entry is d.asked.entry and job.inputs == d.asked.request.inputs
    assert job.deadline == d.deadline and job.request_id == d.asked.incoming.request_id
    assert [job.allowed(s.config) for s in gw.router.nodes.values()] == [True, True]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.deadline = 0.0  # type: ignore[misc]


async def test_receipts_for_an_answer_and_for_a_denial(gw: Gateway, pki: PKI) -> None:
    assert gw.receipts is not None
    d = await decided(gw, pki)
    outcome = await VerifyStage({"none": Recording()}, gw.router)(d)
    issued = await ReceiptStage(gw.receipts)(d, outcome)
    r = issued.receipt
    assert r.request_id == d.asked.incoming.request_id and r.model is not None
    assert r.model.name == "iris" and r.policy is not None and r.policy.decision_id == d.decision.id
    # A denial: fixed text only, whatever the problem's detail quotes.
    problem = Forbidden("detail quoting client text <<" + "x" * 5000 + ">>")
    await DenialStage(gw.receipts)(caller(gw, pki, "carol"), None, problem, "req-1")
    summary = problem.headers["ztgate-receipt"]
    assert summary and "xxxx" not in summary and len(summary) < 1000


# --- the pipeline in order ----------------------------------------------------------------
class Body:
    """A body that records whether anyone read it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read = False

    def __call__(self) -> AsyncIterator[bytes]:
        async def stream() -> AsyncIterator[bytes]:
            self.read = True
            yield self.data

        return stream()


async def test_a_caller_no_permit_names_is_refused_before_its_body_is_read(
    gw: Gateway, pki: PKI
) -> None:
    async def no_answer(_: Any) -> Any:
        raise AssertionError("must not run")

    body = Body(json_body(IRIS))
    came = Incoming(scope=scope_of(pki, "carol"), headers={}, body=body, model="iris")
    with pytest.raises(Forbidden, match="no permit matches") as denied:
        await gw.pipeline.infer(came, no_answer)
    assert not body.read and denied.value.extra["request_id"] == came.request_id
    assert "ztgate-receipt" in denied.value.headers  # receipted, as every policy denial
    # Control, built the same way: demo's body is read (the nodes are down, so 5xx after).
    body = Body(json_body(IRIS))
    came = Incoming(scope=scope_of(pki, "demo"), headers={}, body=body, model="iris")
    with pytest.raises(Problem) as failed:
        await gw.pipeline.infer(came, no_answer)
    assert body.read and failed.value.status >= 500
    assert failed.value.extra["decision_id"] and failed.value.extra["request_id"] == came.request_id


# --- large bodies off the loop -----------------------------------------------------------
def _big_body() -> bytes:
    rows = np.random.default_rng(2).random((6000, 4), dtype=np.float32)
    return json_body(rows)


async def _ticks_while(work: Any) -> tuple[Any, int]:
    """Run `work` and count how often the event loop got round to another task meanwhile."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker's first step, before the work starts
    started = ticks
    try:
        result = await work
    finally:
        done = True
        await task
    return result, ticks - started


async def test_a_large_json_body_is_decoded_off_the_event_loop(gw: Gateway, pki: PKI) -> None:
    body = _big_body()
    assert len(body) > OFFLOAD_BYTES
    pool = DecodePool(workers=1)
    try:
        await pool.warm()
        offloaded, ticks = await _ticks_while(decode(gw, pki, "demo", body, pool=pool))
        assert ticks > 0  # the loop served other tasks while the body was parsed
        # Control: the same body decoded on the loop lets nothing else run meanwhile.
        on_loop, still = await _ticks_while(decode(gw, pki, "demo", body))
        assert still <= 1
        np.testing.assert_array_equal(
            offloaded.request.inputs[0].data, on_loop.request.inputs[0].data
        )
        # The worker's refusals arrive as the same problems.
        with pytest.raises(BadRequest, match="duplicate key"):
            bad = body[:-1] + b', "inputs": []}'
            await decode(gw, pki, "demo", bad, pool=pool)
    finally:
        pool.close()


async def test_the_decode_pool_is_bounded_and_one_identity_decodes_one_at_a_time() -> None:
    pool = DecodePool(workers=1, max_pending=2)
    entered: list[str] = []
    try:
        async with pool._turn("alice"):
            # alice's second body waits for her first; bob's does not.
            second = asyncio.create_task(_enter(pool, "alice", entered))
            bob = asyncio.create_task(_enter(pool, "bob", entered))
            await asyncio.sleep(0.05)
            assert entered == ["bob"] and pool._mine["alice"][1] == [2]
        await second
        await bob
        assert entered == ["bob", "alice"] and pool._mine == {}
        # Past max_pending, a 503 at once rather than a queue.
        pool.pending = 2
        with pytest.raises(Overloaded):
            await pool.decode("carol", b"{}", None, "iris", "1", Limits(1, 1, 1, 1))
    finally:
        pool.close()


async def _enter(pool: DecodePool, key: str, entered: list[str]) -> None:
    async with pool._turn(key):
        entered.append(key)
