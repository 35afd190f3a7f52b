"""The shipped example models: integrity, signatures, accuracy, and the recipe behind them."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from gateway import examples
from gateway.registry import TensorSpec, read_signature

SIGNATURES = {
    "iris": (
        (TensorSpec("input", "FP32", (-1, 4)),),
        (TensorSpec("probabilities", "FP32", (-1, 3)),),
    ),
    "mnist": (
        (TensorSpec("input", "FP32", (-1, 784)),),
        (TensorSpec("probabilities", "FP32", (-1, 10)),),
    ),
    "risk": (
        (TensorSpec("input", "FP32", (-1, 6)),),
        (TensorSpec("score", "FP32", (-1, 1)),),
    ),
}
# iris and mnist: training-set accuracy; risk: ROC AUC (the data are noisy by design).
FLOORS = {"iris": 0.9, "mnist": 0.85, "risk": 0.75}


def _run(model: Path | bytes, x: NDArray[Any]) -> NDArray[Any]:
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _auc(score: NDArray[Any], label: NDArray[Any]) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    positives = label == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quality(name: str, model: Path | bytes) -> float:
    x, y = examples.load_dataset(name)
    out = _run(model, x)
    if name == "risk":
        return _auc(out[:, 0], y)
    return float((out.argmax(axis=1) == y).mean())


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return examples.build_examples(tmp_path_factory.mktemp("rebuilt"))


def assert_equivalent(name: str, model: Path, reference: Path) -> None:
    """The same recipe under other library versions: not the same bytes, the same model up to
    what float rounding does to training. Measured between kernels of one machine: argmax
    always agreed, mean |difference| stayed under 0.02 and the risk scores' correlation >= 0.99
    (lbfgs on risk lands on a slightly different optimum)."""
    x, _ = examples.load_dataset(name)
    got, want = _run(model, x), _run(reference, x)
    assert got.shape == want.shape
    assert float(np.abs(got - want).mean()) <= 0.05, name
    if name == "risk":
        assert float(np.corrcoef(got[:, 0], want[:, 0])[0, 1]) >= 0.98
    else:
        assert float((got.argmax(axis=1) == want.argmax(axis=1)).mean()) >= 0.99, name


def test_shipped_files_match_recorded_sums() -> None:
    sums = json.loads((examples.SHIPPED_DIR / "SHA256SUMS.json").read_text())
    assert set(sums) == set(examples.EXAMPLE_NAMES) | set(examples.GENERATIVE_NAMES)
    shipped = examples.shipped_examples()
    for name, path in shipped.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[name]


def test_tampered_shipped_file_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for item in examples.SHIPPED_DIR.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    with (tmp_path / "iris.onnx").open("ab") as fh:
        fh.write(b"\0")
    monkeypatch.setattr(examples, "SHIPPED_DIR", tmp_path)
    with pytest.raises(examples.ExampleError, match=r"iris\.onnx has sha256"):
        examples.shipped_examples()


@pytest.mark.parametrize("name", examples.EXAMPLE_NAMES)
def test_shipped_signature_and_metadata(name: str) -> None:
    path = examples.SHIPPED_DIR / f"{name}.onnx"
    assert read_signature(path) == SIGNATURES[name]
    model = onnx.load(path)
    assert model.ir_version == examples.IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", examples.OPSET)]
    assert model.producer_name == examples.PRODUCER
    assert model.graph.node[-1].op_type == ("Sigmoid" if name == "risk" else "Softmax")


@pytest.mark.parametrize("name", examples.EXAMPLE_NAMES)
def test_shipped_quality(name: str) -> None:
    assert quality(name, examples.SHIPPED_DIR / f"{name}.onnx") >= FLOORS[name]


def test_outputs_are_distributions_for_any_batch_size() -> None:
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        probs = _run(examples.SHIPPED_DIR / "mnist.onnx", rng.random((batch, 784), np.float32))
        assert probs.shape == (batch, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        score = _run(examples.SHIPPED_DIR / "risk.onnx", rng.random((batch, 6), np.float32))
        assert score.shape == (batch, 1)
        assert np.all((score > 0) & (score < 1))


def test_recipe_reproduces_shipped_models(rebuilt: dict[str, Path]) -> None:
    assert set(rebuilt) == set(examples.EXAMPLE_NAMES)
    for name, path in rebuilt.items():
        assert path.name == f"{name}.onnx"
        assert read_signature(path) == SIGNATURES[name]
        assert quality(name, path) >= FLOORS[name]
    if examples.build_environment() == examples.BUILT_WITH:
        # Same library versions: byte for byte, whatever the CPU (the build pins its choices).
        sums = examples.shipped_sums()
        sums = {n: sums[n] for n in examples.EXAMPLE_NAMES}  # tinygpt: tests/test_llm_node.py
        assert {n: examples.sha256_file(p) for n, p in rebuilt.items()} == sums
    else:
        for name, path in rebuilt.items():
            assert_equivalent(name, path, examples.SHIPPED_DIR / f"{name}.onnx")


def test_build_is_pinned_whatever_the_callers_environment(
    rebuilt: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the caller's environment says about kernels, SIMD and libm does not reach the build:
    the same bytes as the module's build."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    monkeypatch.setenv("NPY_DISABLE_CPU_FEATURES", "")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-SSE4_2")
    assert examples.build_example("iris") == rebuilt["iris"].read_bytes()


def test_a_build_on_this_cpus_own_choices_is_equivalent(
    rebuilt: dict[str, Path], tmp_path: Path
) -> None:
    """Trained in this (unpinned) process: other float rounding, an equivalent model."""
    for name in examples.EXAMPLE_NAMES:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(examples._build_here(name))
        assert read_signature(path) == SIGNATURES[name]
        assert_equivalent(name, path, rebuilt[name])


def _unpinned_cases() -> list[tuple[str, str, str]]:
    """(variable, value, expected complaint): each undoes one pin this machine has."""
    machine = platform.machine()
    umath = examples._umath()
    cases = []
    if any(umath.__cpu_features__.get(f) for f in umath.__cpu_dispatch__):  # this CPU has some
        cases.append(("NPY_DISABLE_CPU_FEATURES", "", "numpy still dispatches"))
    if machine in examples.BLAS_CORETYPE:
        other = "Prescott" if machine == "x86_64" else "ARMV8SVE"
        cases.append(("OPENBLAS_CORETYPE", other, "BLAS kernels"))
    if machine in examples.LIBM_TUNABLES:
        cases.append(("GLIBC_TUNABLES", "", "libm variants not pinned"))
    return cases


@pytest.mark.parametrize(("variable", "value", "complaint"), _unpinned_cases())
def test_the_build_child_refuses_an_unpinned_environment(
    tmp_path: Path, variable: str, value: str, complaint: str
) -> None:
    """The child build_examples starts checks its pins before training. Positive control:
    the same command with the full pinned environment (what the `rebuilt` fixture ran)."""
    cmd = [sys.executable, "-m", "gateway.examples", "--pinned-build", str(tmp_path), "iris"]
    env = examples.pinned_environment()
    env[variable] = value
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and complaint in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "iris.onnx").exists()
    ok = subprocess.run(
        cmd, env=examples.pinned_environment(), capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert read_signature(tmp_path / "iris.onnx") == SIGNATURES["iris"]


def test_digits_are_upsampled_and_centred() -> None:
    image = np.zeros((8, 8))
    image[0, 0] = 16.0
    image[7, 7] = 8.0
    flat = examples.digits_to_mnist(image[None])
    assert flat.shape == (1, 784) and flat.dtype == np.float32
    grid = flat.reshape(28, 28)
    assert grid[2:5, 2:5].tolist() == [[1.0] * 3] * 3
    assert grid[23:26, 23:26].tolist() == [[0.5] * 3] * 3
    assert grid.sum() == pytest.approx(9 * 1.5)
    assert not grid[:2].any() and not grid[26:].any()


def test_unknown_example_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown example"):
        examples.build_example("cifar")
    with pytest.raises(ValueError, match="unknown example"):
        examples.load_dataset("cifar")
