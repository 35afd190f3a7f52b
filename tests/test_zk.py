"""zk mode end to end: real ezkl, a real tritonserver proving, the gateway verifying.

Costly steps run once per module: onboarding iris (dev SRS) and a second, slightly different
iris (production mode, the first SRS pinned) for the wrong-model case; one proving node
start; one proof through the node, two more in-process (another input, the other model).
Every forgery test reuses those proofs. Lying nodes are real tritonservers too (started side
by side, once), each replaying one of those proofs; what reached a node is counted by the
node's own inference statistics. Requests get the gateway's own Router and Cedar policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import numpy_helper

from gateway.app import Gateway
from gateway.config import NodeConfig, parse_config
from gateway.job import Job
from gateway.node.repository import build_repository, render_config
from gateway.pipeline import Asked, Caller, Decided, Incoming, body_of
from gateway.pki import PKI
from gateway.protocol.problems import InvalidTensor, UpstreamFailed
from gateway.protocol.tensors import InferRequest, Tensor
from gateway.registry import ModelEntry, Registry, seed_examples
from gateway.runtime import ProductionRefused, add_proof_modes, build_gateway, srs_refusals
from gateway.verify.zk import ZkVerification
from tests.conftest import SITE, one_off_node
from tests.gateway_harness import client_context, gateway_config, running_gateway
from zk.onboard import onboard
from zk.prover import Prover
from zk.record import NODE_DIR, VerifierArtefacts, ZkError, ZkRecord, load_record, sha256_file
from zk.repository import add_zk_model, zk_entry
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
        yield as_node(node)


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[ZkVerifierPool]:
    p = ZkVerifierPool(workers=1, max_pending=4)
    await p.warm()
    yield p
    p.close()


@contextlib.asynccontextmanager
async def zk_gateway(
    pki: PKI, registry: Registry, nodes: Sequence[NodeConfig], data_dir: Path
) -> AsyncIterator[Gateway]:
    """The gateway `ztgate serve` builds for these nodes, not listening: its Router (real
    node clients, the gateway's node-client certificate) and its Cedar policy engine on the
    shipped policies. Requests go to ZkVerification by hand (see zk_exchange)."""
    rows = [
        {f.name: getattr(n, f.name) for f in dataclasses.fields(n) if f.name in NODE_ROW}
        for n in nodes
    ]
    cfg = gateway_config(
        pki, registry.root, data_dir, rows, receipts={"signing_key": None, "log_key": None}
    )
    gw = build_gateway(cfg)
    try:
        yield gw
    finally:
        await gw.router.close()
        await gw.store.close()


NODE_ROW = ("name", "address", "dns_name", "spiffe_id", "region", "provider")


def as_node(row: dict[str, str]) -> NodeConfig:
    """A `[[nodes]]` row of one_off_node as the gateway's NodeConfig."""
    return NodeConfig(
        name=row["name"],
        address=row["address"],
        region=row["region"],
        provider=row["provider"],
        dns_name=row["dns_name"],
        spiffe_id=row["spiffe_id"],
    )


async def zk_exchange(pki: PKI, gw: Gateway, x: npt.NDArray[Any], deadline_s: float = 240.0) -> Job:
    """alice asks for iris in mode zk; the gateway's own policy stage decides over its
    nodes, as it would for a request on the wire. The deadline leaves room for proving on
    a loaded machine (~20 s a proof there, bench/README.md); it is no claim about speed."""
    alice = pki.ensure("client", "alice")
    scope = {"extensions": {"tls": {"client_cert_chain": [alice.cert.read_text()]}}}
    came = Incoming(scope=scope, headers={}, body=body_of(b""))
    request = InferRequest(
        model="iris",
        version=None,
        id=None,
        inputs=(Tensor("input", "FP32", tuple(x.shape), x),),
        parameters={"ztgate.verification": "zk"},
    )
    caller = Caller.of(gw.resolver.resolve(scope))
    deadline = time.monotonic() + deadline_s
    asked = Asked(came, caller, gw.latest("iris"), request, x.nbytes, deadline, True)
    decision = gw.pipeline.policy(asked)
    assert "zk" in decision.modes
    return Decided(asked, decision, "zk", deadline).job()


def node_inferences(pki: PKI, node: NodeConfig, model: str = "iris-zk") -> int:
    """How many requests for ``model`` the node has answered, by its own statistics
    (gRPC, the gateway's credentials): what a test counts at the node."""
    cert, key = pki.leaf_paths("gateway-node-client", SITE, SITE)
    client = grpcclient.InferenceServerClient(
        node.address,
        ssl=True,
        root_certificates=str(pki.node_ca_bundle()),
        private_key=str(key),
        certificate_chain=str(cert),
        channel_args=[("grpc.ssl_target_name_override", node.dns_name)],
    )
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))


@dataclasses.dataclass
class Honest:
    outputs: npt.NDArray[Any]
    evidence: dict[str, Any]
    proof: bytes


@pytest.fixture(scope="module")
async def honest(
    pki: PKI,
    zk_node: NodeConfig,
    registry: Registry,
    artefacts: VerifierArtefacts,
    pool: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Honest:
    """One request through ZkVerification and the real node: the proof every test reuses."""
    verifier = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    async with zk_gateway(pki, registry, [zk_node], tmp_path_factory.mktemp("gw")) as gw:
        outcome = await verifier.run(await zk_exchange(pki, gw, X), gw.router)
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


# A lying node, for real: a tritonserver whose iris-zk answers every request with the proof
# stored beside its model.py, whatever the input. (The proofs are real ones, made above.)
REPLAY_MODEL = """
import os

import numpy as np
import triton_python_backend_utils as pb_utils

PROOF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proof.json")


class TritonPythonModel:
    def initialize(self, args):
        with open(PROOF, "rb") as f:
            self.proof = f.read()

    def execute(self, requests):
        proof = pb_utils.Tensor("proof", np.array([self.proof], dtype=np.object_))
        return [pb_utils.InferenceResponse(output_tensors=[proof]) for _ in requests]
"""


def replay_repository(dest: Path, entry: ModelEntry, record: ZkRecord, proof: bytes) -> Path:
    """A repository with only ``<name>-zk``, configured as the prover's, replaying ``proof``."""
    model_dir = dest / record.zk_model_name
    version_dir = model_dir / record.version
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render_config(zk_entry(entry, record), "python"))
    (version_dir / "model.py").write_text(REPLAY_MODEL)
    (version_dir / "proof.json").write_bytes(proof)
    return dest


@pytest.fixture(scope="module")
def liars(
    pki: PKI,
    triton_home: Path,
    registry: Registry,
    artefacts: VerifierArtefacts,
    other_input_proof: bytes,
    other_model_proof: bytes,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, NodeConfig]]:
    """Three real lying nodes: lazy (an honest proof of another input), impostor (a valid
    proof made with other weights), garbage (``{}``). Started side by side."""
    base = tmp_path_factory.mktemp("zk-liars")
    lies = {"lazy": other_input_proof, "impostor": other_model_proof, "garbage": b"{}"}
    iris = registry.get("iris")
    with contextlib.ExitStack() as stack:
        tables: dict[str, dict[str, str]] = {}
        errors: list[BaseException] = []

        def start(name: str, node: contextlib.AbstractContextManager[dict[str, str]]) -> None:
            try:
                tables[name] = node.__enter__()
            except BaseException as exc:
                errors.append(exc)
            else:
                stack.push(node)  # stopped with the fixture, also when another one failed

        threads = []
        for name, lie in lies.items():
            repo = replay_repository(base / name / "repository", iris, artefacts.record, lie)
            node = one_off_node(pki, triton_home, repo, name, base / name / "work")
            threads.append(threading.Thread(target=start, args=(name, node)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield {name: as_node(tables[name]) for name in lies}


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
    kwargs: dict[str, Any], needle: str, zk_dir: Path, tmp_path: Path
) -> None:
    # Control: zk_dir is this very call, without the unsound setting, and it onboarded.
    assert load_record(zk_dir).check_mode == "SAFE"
    with pytest.raises(ZkError, match=needle):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_onboarding_refuses_srs_that_does_not_match_its_pin(
    other_model_dir: Path, tmp_path: Path
) -> None:
    # Control: other_model_dir onboarded in production mode with an SRS matching its pin.
    assert not load_record(other_model_dir).dev_srs
    srs = tmp_path / "ceremony.srs"
    srs.write_bytes(b"not the ceremony")
    with pytest.raises(ZkError, match="pinned"):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "o", srs=srs, srs_sha256="00" * 32)
    with pytest.raises(ZkError, match="must be pinned"):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "o", mode="production", srs=srs)


def test_onboarding_refuses_above_tolerance(zk_dir: Path, tmp_path: Path) -> None:
    # Control: zk_dir is the same call at tolerance 1e-2, and its measured error is in it.
    assert load_record(zk_dir).quantisation["max_abs_error"] <= 1e-2
    with pytest.raises(ZkError, match="above tolerance"):
        onboard(IRIS_ONNX, "iris", CALIBRATION, tmp_path / "o", tolerance=1e-9, scales=(7,))


def test_record_and_artefacts_refuse_unsafe_and_tampering(zk_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((zk_dir / "zk.json").read_text())
    # Control: the record as written, through the same steps, loads.
    (tmp_path / "as-written").mkdir()
    (tmp_path / "as-written" / "zk.json").write_text(json.dumps(raw))
    assert load_record(tmp_path / "as-written").check_mode == "SAFE"
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
    assert VerifierArtefacts.from_dir(copy).record.vk_sha256 == raw["vk_sha256"]  # control
    vk = copy / "verifier" / "vk.key"
    data = bytearray(vk.read_bytes())
    data[-1] ^= 0xFF
    vk.write_bytes(bytes(data))
    with pytest.raises(ZkError, match="vk"):
        VerifierArtefacts.from_dir(copy)


def test_a_bad_artefact_is_a_config_error_at_start_not_a_traceback(
    pki: PKI, registry: Registry, zk_dir: Path, tmp_path: Path
) -> None:
    """`ztgate serve` reports ConfigError as a usage error (exit 2, one line); a ZkError
    escaping it was a start-up traceback."""
    from gateway.config import ConfigError

    copy = tmp_path / "iris-zk"
    (copy / "verifier").mkdir(parents=True)
    (copy / "zk.json").write_bytes((zk_dir / "zk.json").read_bytes())
    for f in (zk_dir / "verifier").iterdir():
        (copy / "verifier" / f.name).write_bytes(f.read_bytes())

    def build(data: str) -> None:
        cfg = gateway_config(
            pki,
            registry.root,
            tmp_path / data,
            [],
            receipts={"signing_key": None, "log_key": None},
            zk={"artefacts": [str(copy)]},
        )
        gw = build_gateway(cfg)
        gw.verifiers["zk"].pool.close()  # type: ignore[attr-defined]
        gw.revocations.close()

    build("control")  # the same artefacts, untouched, load
    vk = copy / "verifier" / "vk.key"
    vk.write_bytes(vk.read_bytes()[:-1] + bytes([vk.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(ConfigError, match=r"zk\.artefacts: .*vk"):
        build("tampered")


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
    # Control: the same JSON round trip, with no instance altered, verifies.
    assert check(json.dumps(base).encode(), X, artefacts).success
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
    assert check(json.dumps(base).encode(), X, artefacts).success  # control: untouched
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


@pytest.mark.asyncio(loop_scope="session")
async def test_lying_node_is_charged_and_the_request_fails_over(
    pki: PKI,
    zk_node: NodeConfig,
    liars: dict[str, NodeConfig],
    honest: Honest,
    registry: Registry,
    artefacts: VerifierArtefacts,
    pool: ZkVerifierPool,
    tmp_path: Path,
) -> None:
    verifier = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    everyone = {**liars, "zk1": zk_node}  # zk1 is the honest prover
    asked = {name: node_inferences(pki, node) for name, node in everyone.items()}
    # Only the liars: the request fails, every liar is charged, no lie reaches the client.
    async with zk_gateway(pki, registry, list(liars.values()), tmp_path / "liars") as gw:
        with pytest.raises(UpstreamFailed) as info:
            await verifier.run(await zk_exchange(pki, gw, X), gw.router)
        assert all(gw.router.nodes[name].failed == 1 for name in liars)
    for word in ("lazy: input_mismatch", "impostor: bad_proof", "garbage: malformed"):
        assert word in info.value.detail, info.value.detail
    # A liar beside the honest node: the answer comes from the honest one, after the liar.
    lazy_and_good = [liars["lazy"], zk_node]
    async with zk_gateway(pki, registry, lazy_and_good, tmp_path / "mixed") as gw:
        gw.router.nodes["lazy"].ewma_s = 1e-6  # the liar looks fastest: it is tried first
        gw.router.nodes["zk1"].ewma_s = 10.0
        outcome = await verifier.run(await zk_exchange(pki, gw, X), gw.router)
        assert gw.router.nodes["lazy"].failed == 1 and gw.router.nodes["zk1"].served == 1
    assert outcome.nodes == ("zk1",) and outcome.status == "verified" and outcome.attempts == 2
    np.testing.assert_array_equal(outcome.outputs[0].data, honest.outputs)
    # Counted at the nodes: each liar answered every request it was tried for, and the
    # honest node proved exactly once.
    now = {name: node_inferences(pki, node) for name, node in everyone.items()}
    assert {name: now[name] - asked[name] for name in everyone} == {
        "lazy": 2,
        "impostor": 1,
        "garbage": 1,
        "zk1": 1,
    }


@pytest.mark.parametrize(
    ("x", "refused", "needle", "reaches_node"),
    [
        pytest.param(np.tile(X, (2, 1)), InvalidTensor, "one row at a time", 0, id="two-rows"),
        pytest.param(
            np.array([[np.nan, 1, 1, 1]], np.float32), InvalidTensor, "finite", 0, id="nan"
        ),
        # Passes every check of the gateway's: the node is asked, and its reply is refused.
        pytest.param(X, UpstreamFailed, "garbage: malformed", 1, id="node-reply"),
    ],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_zk_refusals_before_the_node_and_of_its_reply(
    x: npt.NDArray[Any],
    refused: type[Exception],
    needle: str,
    reaches_node: int,
    pki: PKI,
    liars: dict[str, NodeConfig],
    registry: Registry,
    artefacts: VerifierArtefacts,
    pool: ZkVerifierPool,
    tmp_path: Path,
) -> None:
    """Requests a circuit cannot take are the client's error (400) and never reach a
    node; the row built the same way with a request it can take does reach it."""
    verifier = ZkVerification({artefacts.record.model_sha256: artefacts}, pool)
    garbage = liars["garbage"]
    before = node_inferences(pki, garbage)
    async with zk_gateway(pki, registry, [garbage], tmp_path) as gw:
        with pytest.raises(refused, match=needle):
            await verifier.run(await zk_exchange(pki, gw, x), gw.router)
    assert node_inferences(pki, garbage) - before == reaches_node


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
    # A dev cluster's proof is made under a locally generated SRS: it proves nothing, and
    # the report says so in words unless the auditor accepts it for a dev cluster.
    assert main(["verify", str(bundle), "--trust", str(trust)]) == 1
    refused = capsys.readouterr().out
    assert "[dev-srs]" in refused and "could forge any proof" in refused
    assert main(["verify", str(bundle), "--trust", str(trust), "--json", "--allow-dev-srs"]) == 0
    report = capsys.readouterr().out
    assert '"proof_reverified": true' in report
    proof = next(bundle.glob(f"logs/*/evidence/{rid}.proof.json"))
    doctored = json.loads(proof.read_text())
    doctored["instances"][0][-1] = doctored["instances"][0][0]  # another claimed output
    proof.write_text(json.dumps(doctored))
    assert main(["verify", str(bundle), "--trust", str(trust), "--allow-dev-srs"]) == 1
    assert "zk-evidence-mismatch" in capsys.readouterr().out


def test_pool_runs_off_the_event_loop(honest: Honest, artefacts: VerifierArtefacts) -> None:
    async def main() -> tuple[list[ZkResult], bool]:
        p = ZkVerifierPool(workers=1, max_pending=2)
        try:
            tasks = [asyncio.ensure_future(p.verify(honest.proof, X, artefacts)) for _ in range(3)]
            # One turn of the loop: each task has handed its proof on and yielded. Had
            # verify run ezkl on the loop, each would have finished before this line ran.
            await asyncio.sleep(0)
            loop_ran_while_verifying = not any(t.done() for t in tasks)
            results = await asyncio.gather(*tasks)
        finally:
            p.close()
        return results, loop_ran_while_verifying

    results, loop_ran_while_verifying = asyncio.run(main())
    assert all(r.success for r in results), results
    assert loop_ran_while_verifying


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
    zk_dir: Path, registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    out = tmp_path / "repo"
    base = ["node", "repository", "--registry", str(registry.root), "--out", str(out)]
    assert main([*base, "--flavour", "python", "--zk-artefacts", str(zk_dir)]) == 0
    assert (out / "iris" / "config.pbtxt").is_file()
    config = (out / "iris-zk" / "config.pbtxt").read_text()
    assert '"proof"' in config and "TYPE_STRING" in config
    capsys.readouterr()
    # The prover is a python model: not for the stock onnxruntime flavour.
    assert main([*base, "--flavour", "onnxruntime", "--zk-artefacts", str(zk_dir)]) == 2
    assert "needs --flavour python" in (err := capsys.readouterr().err), err
    # A directory that holds no onboarded model.
    assert main([*base, "--flavour", "python", "--zk-artefacts", str(tmp_path)]) == 2
    assert f"--zk-artefacts {tmp_path}:" in (err := capsys.readouterr().err), err


def test_production_serves_only_pinned_ceremony_srs(
    zk_dir: Path, other_model_dir: Path, tmp_path: Path
) -> None:
    """A record made with a locally generated SRS, or with an SRS the config does not pin,
    is refused at start in production; the refusal says how to fix it."""
    dev, prod = VerifierArtefacts.from_dir(zk_dir), VerifierArtefacts.from_dir(other_model_dir)
    pin = prod.record.srs_sha256
    [dev_refusal] = srs_refusals([dev], [pin])
    assert "locally generated SRS" in dev_refusal and "--srs FILE" in dev_refusal
    [unpinned] = srs_refusals([prod], [])
    assert pin in unpinned and "zk.srs_sha256" in unpinned
    assert srs_refusals([prod], [pin.upper()]) == []  # control: pinned, ceremony-style

    def start(mode: str, artefacts: Path, pins: list[str]) -> dict[str, Any]:
        raw = {
            "mode": mode,
            "registry": "r",
            "data_dir": str(tmp_path / "data"),
            "tls": dict.fromkeys(
                ("cert", "key", "client_ca", "node_ca", "node_client_cert", "node_client_key"),
                "x",
            ),
            "zk": {"artefacts": [str(artefacts)], "srs_sha256": pins},
        }
        gw: Any = dataclasses.make_dataclass("G", ["verifiers", "background"])({}, [])
        cfg = parse_config(raw, tmp_path)
        add_proof_modes(cfg, gw, cfg.nodes)
        return dict(gw.verifiers)

    with pytest.raises(ProductionRefused, match="locally generated SRS"):
        start("production", zk_dir, [pin])
    with pytest.raises(ProductionRefused, match="does not pin"):
        start("production", other_model_dir, [])
    assert "zk" in start("production", other_model_dir, [pin])
    assert "zk" in start("dev", zk_dir, [])  # dev keeps serving it, with a warning per answer
