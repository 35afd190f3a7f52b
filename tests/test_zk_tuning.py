"""Tuned circuits (zk/tuning.py): the onboarding search picks a smaller circuit, keeps it sound.

Real ezkl throughout. One module-scoped onboarding of each kind, shared by every test: a fresh
6->16->4 ReLU MLP tuned and at ezkl's defaults (the "before"), and iris tuned (its softmax
head is left to the gateway). Proofs are made in process with the node's own Prover.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zk.onboard import OnboardResult, onboard
from zk.prover import Prover
from zk.record import VerifierArtefacts, ZkError, ZkRecord, check_settings, load_record, sha256_file
from zk.tuning import (
    CI_MAX_CANDIDATES,
    MIN_COVERAGE,
    decompositions,
    needed_coverage,
    softmax,
    srs_logrows,
)
from zk.verifier import verify_proof

pytestmark = pytest.mark.slow

IRIS_ONNX = Path(__file__).resolve().parent.parent / "gateway" / "examples" / "iris.onnx"
IRIS_CAL = np.array(
    [
        [5.1, 3.5, 1.4, 0.2],
        [4.6, 3.4, 1.4, 0.3],
        [7.0, 3.2, 4.7, 1.4],
        [5.5, 2.3, 4.0, 1.3],
        [6.3, 3.3, 6.0, 2.5],
        [5.8, 2.7, 5.1, 1.9],
        [7.1, 3.0, 5.9, 2.1],
        [4.9, 3.0, 1.4, 0.2],
    ],
    np.float32,
)
TOLERANCE = 1e-2


def relu_mlp(path: Path, seed: int = 7) -> Path:
    """A 6->16->4 ReLU MLP nobody in the project wrote (fresh weights per seed)."""
    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.normal(size=(6, 16)).astype(np.float32) * 0.5,
        "b1": rng.normal(size=16).astype(np.float32) * 0.1,
        "W2": rng.normal(size=(16, 4)).astype(np.float32) * 0.5,
        "b2": rng.normal(size=4).astype(np.float32) * 0.1,
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "W2", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


MLP_CAL = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
MLP_X = np.random.default_rng(1).normal(size=(1, 6)).astype(np.float32)


def ort_run(path: Path, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return relu_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx")


@pytest.fixture(scope="module")
def tuned(mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> OnboardResult:
    out = tmp_path_factory.mktemp("tuned") / "mlp"
    return onboard(mlp, "mlp", MLP_CAL, out, tolerance=TOLERANCE, scales=(8, 9, 10))


@pytest.fixture(scope="module")
def default(mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> OnboardResult:
    out = tmp_path_factory.mktemp("default") / "mlp"
    return onboard(mlp, "mlp", MLP_CAL, out, tolerance=TOLERANCE, scales=(9, 10), tune=False)


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> OnboardResult:
    out = tmp_path_factory.mktemp("iris-tuned") / "iris"
    return onboard(IRIS_ONNX, "iris", IRIS_CAL, out, tolerance=TOLERANCE)


def settings_of(result: OnboardResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((result.out_dir / "verifier" / "settings.json").read_text())
    return data


def test_tuned_circuit_is_smaller_than_defaults_and_within_tolerance(
    tuned: OnboardResult, default: OnboardResult
) -> None:
    # The control is ezkl's default decomposition on the same model and calibration.
    assert settings_of(default)["run_args"]["decomp_base"] == 16384
    assert default.record.logrows == 15
    assert tuned.record.logrows < default.record.logrows
    assert tuned.files["node/pk.key"] * 4 < default.files["node/pk.key"]
    assert tuned.record.quantisation["max_abs_error"] <= TOLERANCE
    # What it chose and why is in the record, and every candidate tried is listed.
    tuning = tuned.record.tuning
    assert tuning["searched"] and "smallest circuit" in tuning["reason"]
    assert tuning["chosen"]["logrows"] == tuned.record.logrows
    assert tuning["tried"] and tuning["chosen"] in tuning["tried"]
    if os.environ.get("CI") == "true":  # CI bounds the search (its time, not its result)
        assert len(tuning["tried"]) <= CI_MAX_CANDIDATES
    assert load_record(tuned.out_dir).tuning == tuning


def test_tuned_settings_stay_sound(tuned: OnboardResult) -> None:
    settings = settings_of(tuned)
    run_args = settings["run_args"]
    check_settings(settings, "tuned")  # SAFE, public/public/fixed, range checks kept
    assert run_args["ignore_range_check_inputs_outputs"] is False
    base, legs = run_args["decomp_base"], run_args["decomp_legs"]
    assert base**legs >= MIN_COVERAGE
    # The same check refuses a settings file that drops the range checks (negative control).
    broken = {**settings, "run_args": {**run_args, "ignore_range_check_inputs_outputs": True}}
    with pytest.raises(ZkError, match="ignore_range_check"):
        check_settings(broken, "tuned")


def test_decomposition_covers_the_calibrated_range() -> None:
    small, large = needed_coverage(3.0, 8), needed_coverage(5e4, 11)
    assert small == MIN_COVERAGE < large  # never less than ezkl's default covers
    for need in (small, large):
        for base, legs in decompositions(need):
            assert base**legs >= need and base ** (legs - 1) < need  # fewest legs that cover


def test_tuned_proof_verifies_and_binds_the_input(tuned: OnboardResult, mlp: Path) -> None:
    prover = Prover(tuned.out_dir / "node")
    outputs, proof = prover.prove(MLP_X)
    v = VerifierArtefacts.from_dir(tuned.out_dir)
    ok = verify_proof(proof, MLP_X, v.record, v.vk, v.settings, v.srs)
    assert ok, ok.detail
    assert np.allclose(ok.outputs[0], ort_run(mlp, MLP_X), atol=TOLERANCE)
    assert np.array_equal(ok.outputs[0], outputs[0])
    # The same proof is refused for another request's input under the tuned circuit.
    other = verify_proof(proof, MLP_X + 0.5, v.record, v.vk, v.settings, v.srs)
    assert not other and other.reason == "input_mismatch"


def test_softmax_head_left_out_of_the_circuit_is_recomputed_by_the_verifier(
    iris: OnboardResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = iris.record
    assert record.postprocess == {"probabilities": "softmax"}
    assert record.tuning["chosen"]["head"] == "logits"
    assert "softmax is applied by the gateway" in record.tuning["reason"]
    assert record.evidence()["postprocess"] == ["probabilities=softmax"]
    x = np.array([[5.9, 3.0, 4.2, 1.5]], np.float32)
    outputs, proof = Prover(iris.out_dir / "node").prove(x)
    v = VerifierArtefacts.from_dir(iris.out_dir)
    ok = verify_proof(proof, x, v.record, v.vk, v.settings, v.srs)
    assert ok, ok.detail
    # The proof's output instances are logits; the answer is their softmax.
    import ezkl

    spec = record.outputs[0]
    felts = json.loads(proof)["instances"][0][record.inputs[0].size :]
    logits = np.array([ezkl.felt_to_float(f, spec.scale) for f in felts]).reshape(spec.shape)
    assert not np.isclose(logits.sum(), 1.0)
    assert np.allclose(ok.outputs[0], softmax(logits), atol=1e-6)
    assert np.allclose(ok.outputs[0], ort_run(IRIS_ONNX, x), atol=TOLERANCE)
    assert np.array_equal(outputs[0], ok.outputs[0])  # the node states the same answer
    # The auditor's `ztgate zk verify` recomputes it the same way.
    from gateway.cli import main

    (tmp_path / "p.json").write_bytes(proof)
    args = ["zk", "verify", str(tmp_path / "p.json"), "--artefacts", str(iris.out_dir)]
    assert main([*args, "--input", json.dumps(x.tolist())]) == 0
    report = json.loads(capsys.readouterr().out)
    assert np.allclose(report["outputs"][0], ok.outputs[0])


def test_record_refuses_an_unknown_postprocess(iris: OnboardResult) -> None:
    raw = iris.record.to_json()
    assert ZkRecord.from_json(raw).postprocess == {"probabilities": "softmax"}  # control
    for bad in ({"probabilities": "exp"}, {"logits": "softmax"}):
        with pytest.raises(ZkError, match="postprocess"):
            ZkRecord.from_json({**raw, "postprocess": bad})


def test_search_only_uses_logrows_a_pinned_srs_covers(
    tuned: OnboardResult, mlp: Path, tmp_path: Path
) -> None:
    import ezkl

    small, big = tmp_path / "k6.srs", tmp_path / "k12.srs"
    ezkl.gen_srs(str(small), 6)
    ezkl.gen_srs(str(big), 12)
    assert (srs_logrows(small), srs_logrows(big)) == (6, 12)
    kw: dict[str, Any] = {"mode": "production", "tolerance": TOLERANCE, "scales": (9,)}
    with pytest.raises(ZkError, match="no SRS for the circuit"):
        onboard(mlp, "mlp", MLP_CAL, tmp_path / "a", srs=small, srs_sha256=sha256_file(small), **kw)
    ok = onboard(mlp, "mlp", MLP_CAL, tmp_path / "b", srs=big, srs_sha256=sha256_file(big), **kw)
    assert ok.record.logrows <= 12 and ok.record.tuning["max_srs_logrows"] == 12
    assert not ok.record.dev_srs
    prover = Prover(ok.out_dir / "node")
    _, proof = prover.prove(MLP_X)
    v = VerifierArtefacts.from_dir(ok.out_dir)
    assert verify_proof(proof, MLP_X, v.record, v.vk, v.settings, v.srs)
