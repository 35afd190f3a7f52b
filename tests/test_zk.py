"""zk mode end to end: real ezkl, a real tritonserver proving, the gateway verifying.

Costly steps run once per module: onboarding iris (dev SRS) and a second, slightly different
iris (production mode, the first SRS pinned) for the wrong-model case; one node start; one
proof through the node, two more in-process (another input, the other model). Every forgery
test reuses those proofs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from gateway.app import Gateway
from gateway.config import NodeConfig, Routing
from gateway.node.repository import build_repository
from gateway.pipeline import Exchange
from gateway.pki import PKI
from gateway.protocol.problems import InvalidTensor, UpstreamFailed
from gateway.protocol.tensors import InferRequest, Tensor
from gateway.registry import ModelEntry, Registry, seed_examples
from gateway.routing.node_client import NodeClient, NodeCredentials
from gateway.routing.router import Router
from gateway.runtime import build_gateway
from gateway.state.memory import MemoryStore
from gateway.verify.zk import ZkVerification
from tests.conftest import SITE, one_off_node
from tests.gateway_harness import client_context, gateway_config, running_gateway
from zk.onboard import onboard
from zk.prover import Prover
from zk.record import NODE_DIR, VerifierArtefacts, ZkError, load_record, sha256_file
from zk.repository import add_zk_model
from zk.verifier import ZkResult, ZkVerifierPool, quantise, verify_proof

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "gateway" / "examples"
IRIS_ONNX = EXAMPLES / "iris.onnx"
# Representative iris rows (setosa, versicolor, virginica), a calibration set in miniature.
CALIBRATION = np.array(
    [
        [5.1, 3.5, 1.4, 0.2],
        [4.9, 3.0, 1.4, 0.2],
        [5.4, 3.9, 1.7, 0.4],
        [4.6, 3.4, 1.4, 0.3],
        [7.0, 3.2, 4.7, 1.4],
        [6.4, 3.2, 4.5, 1.5],
        [5.5, 2.3, 4.0, 1.3],
        [5.7, 2.8, 4.1, 1.3],
        [6.3, 3.3, 6.0, 2.5],
        [5.8, 2.7, 5.1, 1.9],
        [7.1, 3.0, 5.9, 2.1],
        [6.5, 3.0, 5.5, 1.8],
    ],
    np.float32,
)
X = np.array([[5.9, 3.0, 4.2, 1.5]], np.float32)  # what the client asks
OTHER = np.array([[6.7, 3.1, 5.6, 2.4]], np.float32)  # what a lazy node proves instead


def ort_iris(x: npt.NDArray[Any], path: Path = IRIS_ONNX) -> npt.NDArray[Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


# =========================================================================== artefacts


@pytest.fixture(scope="module")
def zk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zk") / "iris"
    result = onboard(IRIS_ONNX, "iris", CALIBRATION, out, mode="dev", tolerance=1e-2)
    assert result.record.check_mode == "SAFE" and result.record.dev_srs
    assert result.record.visibility == {"input": "public", "output": "public", "params": "fixed"}
    assert result.record.quantisation["max_abs_error"] <= 1e-2
    return out


@pytest.fixture(scope="module")
def other_model_dir(zk_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, other weights, onboarded in production mode with a pinned SRS."""
    tmp = tmp_path_factory.mktemp("zk-other")
    model = onnx.load(str(IRIS_ONNX))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) + 0.25, first.name))
    path = tmp / "iris-other.onnx"
    onnx.save(model, str(path))
    record = load_record(zk_dir)
    srs = zk_dir / "verifier" / record.srs_file
    out = tmp / "out"
    result = onboard(
        path,
        "iris",
        CALIBRATION,
        out,
        mode="production",
        srs=srs,
        srs_sha256=sha256_file(srs),
        tolerance=1.0,
        scales=(record.inputs[0].scale,),
    )
    assert not result.record.dev_srs and result.record.logrows == record.logrows
    return out


@pytest.fixture(scope="module")
def artefacts(zk_dir: Path) -> VerifierArtefacts:
    return VerifierArtefacts.from_dir(zk_dir)


def check(proof: bytes, x: npt.NDArray[Any], a: VerifierArtefacts) -> ZkResult:
    return verify_proof(proof, x, a.record, a.vk, a.settings, a.srs)


# =========================================================================== node


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    registry = Registry.open(tmp_path_factory.mktemp("zk-registry") / "registry")
    seed_examples(registry)
    return registry


@pytest.fixture(scope="module")
def zk_node(
    pki: PKI,
    triton_home: Path,
    registry: Registry,
    zk_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NodeConfig]:
    base = tmp_path_factory.mktemp("zk-node")
    iris = registry.get("iris")
    repo = build_repository([iris], base / "repository")
    add_zk_model(repo, "iris", zk_dir, entry=iris)
    with one_off_node(pki, triton_home, repo, "zk1", base / "work", provider="prov-z") as node:
        yield NodeConfig(**node)


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[ZkVerifierPool]:
    p = ZkVerifierPool(workers=1, max_pending=4)
    await p.warm()
    yield p
    p.close()


@dataclasses.dataclass(frozen=True)
class Allow:
    """Stands in for policy's decision: which nodes may serve in which mode."""

    nodes: Callable[[str], bool] = lambda _name: True

    def node_allowed(self, mode: str, node: str) -> bool:
        return mode == "zk" and self.nodes(node)


def exchange(
    entry: ModelEntry, x: npt.NDArray[Any], deadline_s: float = 240.0, allow: Allow = Allow()
) -> Exchange:
    request = InferRequest(
        model="iris",
        version=None,
        id=None,
        inputs=(Tensor("input", "FP32", tuple(x.shape), x),),
        parameters={"ztgate.verification": "zk"},
    )
    return Exchange(
        scope={},
        deadline=time.monotonic() + deadline_s,
        entry=entry,
        request=request,
        decision=allow,  # type: ignore[arg-type]
        mode="zk",
    )


def real_router(pki: PKI, node: NodeConfig) -> Router:
    cert, key = pki.leaf_paths("gateway-node-client", SITE, SITE)
    creds = NodeCredentials(pki.node_ca_bundle(), cert, key).channel_credentials()
    return Router.from_clients([NodeClient(node, creds)], MemoryStore(), Routing())


@dataclasses.dataclass
class Honest:
    outputs: npt.NDArray[Any]
    evidence: dict[str, Any]
    proof: bytes


@pytest.fixture(scope="module")
async def honest(
    pki: PKI, zk_node: NodeConfig, registry: Registry, artefacts: VerifierArtefacts, pool: Any
) -> Honest:
    """One request through ZkVerification and the real node: the proof every test reuses."""
    verifier = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    router = real_router(pki, zk_node)
    try:
        outcome = await verifier.run(exchange(registry.get("iris"), X), router)
    finally:
        await router.close()
    assert outcome.status == "verified" and outcome.mode == "zk" and outcome.nodes == ("zk1",)
    (out,) = outcome.outputs
    assert out.name == "probabilities" and out.datatype == "FP32" and out.shape == (1, 3)
    return Honest(np.asarray(out.data), dict(outcome.evidence), outcome.evidence["proof"].encode())


@pytest.fixture(scope="module")
def other_input_proof(zk_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """An honest, valid proof of the registered model, for a different input."""
    prover = Prover(zk_dir / NODE_DIR, workdir=tmp_path_factory.mktemp("prove-other"))
    _, proof = prover.prove(OTHER)
    return proof


@pytest.fixture(scope="module")
def other_model_proof(other_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A valid proof, for the request's input, made with other weights (another vk)."""
    prover = Prover(other_model_dir / NODE_DIR, workdir=tmp_path_factory.mktemp("prove-model"))
    _, proof = prover.prove(X)
    return proof


# =========================================================================== onboarding refusals


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"check_mode": "UNSAFE"}, "only SAFE"),
        ({"param_visibility": "private"}, "other weights"),
        ({"param_visibility": "hashed"}, "requires 'fixed'"),
        ({"input_visibility": "private"}, "requires 'public'"),
        ({"mode": "production"}, "pinned by SHA-256"),
    ],
)
def test_onboarding_refuses_unsound_settings(
    kwargs: dict[str, Any], needle: str, tmp_path: Path
) -> None:
    with pytest.raises(ZkError, match=needle):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_onboarding_refuses_srs_that_does_not_match_its_pin(tmp_path: Path) -> None:
    srs = tmp_path / "ceremony.srs"
    srs.write_bytes(b"not the ceremony")
    with pytest.raises(ZkError, match="pinned"):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "o", srs=srs, srs_sha256="00" * 32)
    with pytest.raises(ZkError, match="must be pinned"):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "o", mode="production", srs=srs)


def test_onboarding_refuses_above_tolerance(tmp_path: Path) -> None:
    with pytest.raises(ZkError, match="above tolerance"):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "o", tolerance=1e-9, scales=(7,))


def test_record_and_artefacts_refuse_unsafe_and_tampering(zk_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((zk_dir / "zk.json").read_text())
    for key, value, needle in (
        ("check_mode", "UNSAFE", "only SAFE"),
        ("visibility", {"input": "public", "output": "public", "params": "private"}, "weights"),
    ):
        bad = tmp_path / key
        bad.mkdir()
        (bad / "zk.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ZkError, match=needle):
            load_record(bad)
    # The verifier's own files are hash-checked against the record.
    copy = tmp_path / "copy"
    (copy / "verifier").mkdir(parents=True)
    (copy / "zk.json").write_text(json.dumps(raw))
    for f in (zk_dir / "verifier").iterdir():
        (copy / "verifier" / f.name).write_bytes(f.read_bytes())
    vk = copy / "verifier" / "vk.key"
    data = bytearray(vk.read_bytes())
    data[-1] ^= 0xFF
    vk.write_bytes(bytes(data))
    with pytest.raises(ZkError, match="vk"):
        VerifierArtefacts.from_dir(copy)


# =========================================================================== the honest path


def test_valid_proof_is_accepted_and_is_the_answer(
    honest: Honest, artefacts: VerifierArtefacts
) -> None:
    record = artefacts.record
    ev = honest.evidence
    assert ev["vk_sha256"] == record.vk_sha256 and ev["settings_sha256"] == record.settings_sha256
    assert ev["srs_sha256"] == record.srs_sha256 and ev["dev_srs"] is True
    assert len(ev["proof_sha256"]) == 64 and len(ev["instances_sha256"]) == 64
    # The answer is what was proven: the output instances, dequantised.
    result = check(honest.proof, X, artefacts)
    assert result.success, result.detail
    assert result.proof_sha256 == ev["proof_sha256"]
    np.testing.assert_array_equal(result.outputs[0], honest.outputs)
    # ...and it is the model's answer, within the onboarding tolerance.
    assert np.max(np.abs(honest.outputs - ort_iris(X))) <= 1e-2


def test_fields_ezkl_ignores_cannot_change_the_answer(
    honest: Honest, artefacts: VerifierArtefacts
) -> None:
    doctored = json.loads(honest.proof)
    doctored["pretty_public_inputs"] = {"rescaled_outputs": [["0", "0", "1"]]}
    doctored["hex_proof"] = "0xdeadbeef"
    result = check(json.dumps(doctored).encode(), X, artefacts)
    assert result.success
    np.testing.assert_array_equal(result.outputs[0], honest.outputs)
    assert result.proof_sha256 == honest.evidence["proof_sha256"]  # canonical form


# =========================================================================== lies, caught


def test_honest_proof_for_another_input_passes_ezkl_but_is_refused(
    other_input_proof: bytes, artefacts: VerifierArtefacts, tmp_path: Path
) -> None:
    import ezkl

    path = tmp_path / "proof.json"
    path.write_bytes(other_input_proof)
    # ezkl alone accepts it: it is a sound proof, just not of this request.
    assert ezkl.verify(
        str(path), str(artefacts.settings), str(artefacts.vk), str(artefacts.srs), False
    )
    assert check(other_input_proof, OTHER, artefacts).success
    for _ in range(3):
        result = check(other_input_proof, X, artefacts)
        assert not result.success and result.reason == "input_mismatch"
        assert "different input" in result.detail


def test_altered_output_is_refused(honest: Honest, artefacts: VerifierArtefacts) -> None:
    import ezkl

    record = artefacts.record
    n_in = record.inputs[0].size
    base = json.loads(honest.proof)
    winner = int(np.argmax(honest.outputs))
    for i in range(record.outputs[0].size):
        doctored = json.loads(json.dumps(base))
        value = 1.0 if i != winner else 0.0
        doctored["instances"][0][n_in + i] = ezkl.float_to_felt(
            value, record.outputs[0].scale, ezkl.PyInputType.F32
        )
        result = check(json.dumps(doctored).encode(), X, artefacts)
        assert not result.success and result.reason == "bad_proof", i


def test_valid_proof_of_another_model_is_refused(
    other_model_proof: bytes, other_model_dir: Path, artefacts: VerifierArtefacts
) -> None:
    other = VerifierArtefacts.from_dir(other_model_dir)
    assert other.record.vk_sha256 != artefacts.record.vk_sha256
    assert check(other_model_proof, X, other).success  # valid under its own vk
    for _ in range(3):
        result = check(other_model_proof, X, artefacts)
        assert not result.success and result.reason == "bad_proof"


def test_flipped_byte_and_malformed_proofs_are_refused(
    honest: Honest, artefacts: VerifierArtefacts
) -> None:
    base = json.loads(honest.proof)
    for index in (0, 17, len(base["proof"]) // 2, len(base["proof"]) - 1):
        doctored = json.loads(honest.proof)
        doctored["proof"][index] ^= 0x01
        result = check(json.dumps(doctored).encode(), X, artefacts)
        assert not result.success and result.reason == "bad_proof", index
    cases: list[tuple[bytes, str]] = [
        (b"", "malformed"),
        (b"not json", "malformed"),
        (b"[]", "malformed"),
        (json.dumps({"instances": base["instances"]}).encode(), "malformed"),
        (json.dumps({**base, "proof": [256]}).encode(), "malformed"),
        (json.dumps({**base, "instances": [base["instances"][0][:-1]]}).encode(), "wrong_model"),
        (json.dumps({**base, "instances": [["zz" * 32] * 7]}).encode(), "malformed"),
        (json.dumps({**base, "instances": [["ff" * 32] * 7]}).encode(), "malformed"),
    ]
    for raw, reason in cases:
        result = check(raw, X, artefacts)
        assert not result.success and result.reason == reason, (raw[:40], result)


def test_quantise_matches_the_node(honest: Honest, artefacts: VerifierArtefacts) -> None:
    import ezkl

    felts = json.loads(honest.proof)["instances"][0]
    assert quantise(ezkl, X, artefacts.record.inputs[0].scale) == felts[:4]


# =========================================================================== through the verifier


@dataclasses.dataclass
class ReplayClient:
    """A node that answers every zk request with a fixed proof."""

    node: NodeConfig
    proof: bytes
    calls: int = 0

    async def infer(self, model: str, *_a: Any, **_k: Any) -> list[Tensor]:
        self.calls += 1
        assert model == "iris-zk"
        data = np.array([self.proof], dtype=np.object_)
        return [Tensor("proof", "BYTES", (1,), data)]

    async def close(self) -> None:
        return None


def fake_node(name: str) -> NodeConfig:
    return NodeConfig(name, "127.0.0.1:1", f"{name}.invalid", f"spiffe://x/{name}", "r", "p")


@pytest.mark.asyncio(loop_scope="session")
async def test_lying_node_is_charged_and_the_request_fails_over(
    honest: Honest,
    other_input_proof: bytes,
    other_model_proof: bytes,
    registry: Registry,
    artefacts: VerifierArtefacts,
    pool: ZkVerifierPool,
) -> None:
    verifier = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    entry = registry.get("iris")
    liars = [
        ReplayClient(fake_node("lazy"), other_input_proof),
        ReplayClient(fake_node("impostor"), other_model_proof),
        ReplayClient(fake_node("garbage"), b"{}"),
    ]
    good = ReplayClient(fake_node("good"), honest.proof)
    router = Router.from_clients([*liars, good], MemoryStore(), Routing())  # type: ignore[list-item]
    for liar in liars:  # the liars look fastest, so they are picked first
        router.nodes[liar.node.name].ewma_s = 1e-6
    router.nodes["good"].ewma_s = 10.0
    # Only the liars: the request fails, every liar is charged, no lie reaches the client.
    only_liars = exchange(entry, X, allow=Allow(lambda n: n != "good"))
    with pytest.raises(UpstreamFailed) as info:
        await verifier.run(only_liars, router)
    for word in ("input_mismatch", "bad_proof", "malformed"):
        assert word in info.value.detail
    assert all(router.nodes[c.node.name].failed == 1 for c in liars)
    # With the honest node in the set the answer comes from it, after the liar.
    lazy_or_good = exchange(entry, X, allow=Allow(lambda n: n in ("lazy", "good")))
    outcome = await verifier.run(lazy_or_good, router)
    assert outcome.nodes == ("good",) and outcome.status == "verified" and outcome.attempts == 2
    assert router.nodes["lazy"].failed == 2 and router.nodes["good"].served == 1
    np.testing.assert_array_equal(outcome.outputs[0].data, honest.outputs)
    assert good.calls == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_requests_a_circuit_cannot_take_are_refused_before_any_node(
    registry: Registry, artefacts: VerifierArtefacts, pool: ZkVerifierPool
) -> None:
    verifier = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    client = ReplayClient(fake_node("n"), b"{}")
    router = Router.from_clients([client], MemoryStore(), Routing())  # type: ignore[list-item]
    entry = registry.get("iris")
    for x in (np.tile(X, (2, 1)), np.array([[np.nan, 1, 1, 1]], np.float32)):
        with pytest.raises(InvalidTensor):
            await verifier.run(exchange(entry, x), router)
    assert client.calls == 0


# =========================================================================== the real gateway


def test_zk_request_through_the_gateway(
    pki: PKI,
    zk_node: NodeConfig,
    registry: Registry,
    artefacts: VerifierArtefacts,
    honest: Honest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = {f.name: getattr(zk_node, f.name) for f in dataclasses.fields(zk_node)}
    node.pop("labels")
    node["models"] = ["iris", "iris-zk"]
    cfg = gateway_config(
        pki,
        registry.root,
        tmp_path,
        [node],
        routing={"deadline_s": 240.0, "max_deadline_s": 300.0},
    )
    base = build_gateway(cfg)
    pool = ZkVerifierPool(workers=1)
    zk = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    # The wiring the app will do itself: the default verifiers plus zk.
    gw = dataclasses.replace(base, verifiers={**Gateway.default_verifiers(cfg), "zk": zk})
    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": X[0].tolist()}],
        "parameters": {"ztgate.verification": "zk"},
    }
    try:
        with running_gateway(cfg, gw) as running, httpx.Client(verify=ctx, timeout=300) as c:
            r = c.post(f"{running.base}/v2/models/iris/infer", json=body)
    finally:
        pool.close()
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["parameters"]["ztgate.verification"] == "zk"
    assert reply["parameters"]["ztgate.verification_status"] == "verified"
    got = np.asarray(reply["outputs"][0]["data"], np.float32).reshape(1, 3)
    np.testing.assert_array_equal(got, honest.outputs)  # same input, same proven answer
    # The auditor, offline: the bundle carries the proof and the verification material,
    # and `ztgate verify` re-verifies the proof against what the receipt names.
    from gateway.cli import main

    rid = reply["parameters"]["ztgate.receipt_id"]
    bundle, trust = tmp_path / "bundle", tmp_path / "trust.json"
    assert main(["audit", "export", "--log-dir", str(tmp_path / "receipts"), str(bundle)]) == 0
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(tmp_path / "receipts")]) == 0
    trust.write_text(capsys.readouterr().out)
    assert main(["verify", str(bundle), "--trust", str(trust), "--json"]) == 0
    report = capsys.readouterr().out
    assert '"proof_reverified": true' in report
    proof = next(bundle.glob(f"logs/*/evidence/{rid}.proof.json"))
    doctored = json.loads(proof.read_text())
    doctored["instances"][0][-1] = doctored["instances"][0][0]  # another claimed output
    proof.write_text(json.dumps(doctored))
    assert main(["verify", str(bundle), "--trust", str(trust), "--json"]) == 1
    assert "zk-evidence-mismatch" in capsys.readouterr().out


def test_pool_runs_off_the_event_loop(honest: Honest, artefacts: VerifierArtefacts) -> None:
    async def main() -> tuple[ZkResult, int]:
        p = ZkVerifierPool(workers=1, max_pending=2)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            results = await asyncio.gather(
                *(p.verify(honest.proof, X, artefacts) for _ in range(3))
            )
        finally:
            ticker.cancel()
            p.close()
        return results[0], ticks

    result, ticks = asyncio.run(main())
    assert result.success and ticks > 5


# =========================================================================== CLI


def test_cli_refuses_unpinned_production_and_auditor_reverifies(
    zk_dir: Path,
    honest: Honest,
    other_input_proof: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.cli import main

    cal = tmp_path / "cal.npy"
    np.save(cal, CALIBRATION)
    args = ["zk", "onboard", str(IRIS_ONNX), "--name", "iris", "--calibration", str(cal)]
    assert main([*args, "--out", str(tmp_path / "o"), "--mode", "production"]) == 2
    assert "pinned by SHA-256" in capsys.readouterr().err
    # The auditor: same proof, same input, offline, with the verifier set only.
    good, lie = tmp_path / "good.json", tmp_path / "lie.json"
    good.write_bytes(honest.proof)
    lie.write_bytes(other_input_proof)
    request = json.dumps(X.tolist())
    assert main(["zk", "verify", str(good), "--artefacts", str(zk_dir), "--input", request]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["proof_sha256"] == honest.evidence["proof_sha256"]
    assert main(["zk", "verify", str(lie), "--artefacts", str(zk_dir), "--input", request]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "input_mismatch"


def test_node_cli_serves_the_prover_from_onboarded_artefacts(
    zk_dir: Path, registry: Registry, tmp_path: Path
) -> None:
    from gateway.cli import main

    out = tmp_path / "repo"
    base = ["node", "repository", "--registry", str(registry.root), "--out", str(out)]
    assert main([*base, "--flavour", "python", "--zk-artefacts", str(zk_dir)]) == 0
    assert (out / "iris" / "config.pbtxt").is_file()
    config = (out / "iris-zk" / "config.pbtxt").read_text()
    assert '"proof"' in config and "TYPE_STRING" in config
    # The prover is a python model: not for the stock onnxruntime flavour.
    assert main([*base, "--flavour", "onnxruntime", "--zk-artefacts", str(zk_dir)]) == 2
    assert main([*base, "--flavour", "python", "--zk-artefacts", str(tmp_path)]) == 2
