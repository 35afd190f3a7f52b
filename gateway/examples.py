"""Recipes for the three small example models shipped in ``gateway/examples/``.

The shipped ``.onnx`` files are what the gateway serves; this module is how they were made,
so anyone can reproduce them (``build_examples``) without torch: scikit-learn trains a
one-hidden-layer MLP with a fixed seed and the ONNX graph is written by hand
(MatMul + Add + Relu, then Softmax or Sigmoid). Input standardisation is folded into the
first layer, so every model takes raw features.

* ``iris``  -- 4 -> 8 -> 3 classifier on sklearn's bundled iris data.
* ``mnist`` -- 784 -> 64 -> 10 classifier on sklearn's bundled 8x8 digits, upsampled to 28x28.
* ``risk``  -- 6 -> 16 -> 1 "credit risk score" on synthetic applicants; the sensitive one.

scikit-learn is only needed for the recipes (the ``train`` extra); reading the shipped files
needs nothing beyond the standard library.

Reproducing the bytes: the float maths of a training run depends on the CPU in three places,
each chosen once at process start -- OpenBLAS's kernels (per CPU model), numpy's SIMD loops
(per CPU feature) and glibc's libm variants (FMA or not). ``build_examples`` therefore trains in
a child process with all three pinned to portable choices (``pinned_environment``), so the
bytes depend only on the libraries (``build_environment``, recorded in ``BUILT_WITH``) and not
on which CPU of the instruction set runs the recipe.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from gateway.files import sha256_file

EXAMPLE_NAMES: tuple[str, ...] = ("iris", "mnist", "risk")
# Built by their own recipe (gateway/llm/train.py), not by this module's MLP trainers.
GENERATIVE_NAMES: tuple[str, ...] = ("tinygpt",)
SHIPPED_DIR = Path(__file__).resolve().parent / "examples"
SUMS_FILE = "SHA256SUMS.json"

INPUT_NAME = "input"
OPSET = 17
# onnxruntime accepts newer IRs too, but 8 is what opset 17 was released with, and pinning it
# keeps the bytes independent of the onnx package's default.
IR_VERSION = 8
PRODUCER = "ztgate.examples"
PRODUCER_VERSION = "1"

RISK_FEATURES: tuple[str, ...] = (
    "age_years",
    "annual_income_k",
    "debt_to_income",
    "late_payments_12m",
    "open_credit_lines",
    "years_employed",
)

# The libraries the shipped bytes were built with (``build_environment``). A rebuild with the same
# versions reproduces them byte for byte on any CPU of this instruction set, because the
# CPU-dependent choices are pinned (``pinned_environment``); with other versions the recipe
# yields equivalent models, equal up to float rounding.
BUILT_WITH: dict[str, str] = {
    "machine": "x86_64",
    "libc": "glibc 2.36",
    "numpy": "1.26.4",
    "scipy": "1.17.1",
    "scikit-learn": "1.9.1",
    "onnx": "1.23.2",
    "blas": "openblas 0.3.23.dev,openblas 0.3.30",
}

# The OpenBLAS kernel every build uses, per instruction set: one that every CPU of it can run.
BLAS_CORETYPE: dict[str, str] = {"x86_64": "Nehalem", "aarch64": "ARMV8"}
# glibc's libm picks FMA/AVX variants of exp, log, pow ... per CPU; these take the plain ones.
# (Both spellings: glibc 2.33 dropped the _Usable suffix; unknown names are ignored.)
LIBM_TUNABLES: dict[str, str] = {
    "x86_64": "glibc.cpu.hwcaps="
    + ",".join(f"-{f}{s}" for s in ("", "_Usable") for f in ("AVX", "AVX2", "FMA", "FMA4"))
}
_PINNED_BUILD = "--pinned-build"

FloatArray = NDArray[np.float32]
LabelArray = NDArray[np.int64]


class ExampleError(Exception):
    """A shipped example is missing or does not match its recorded SHA-256."""


@dataclass(frozen=True)
class Dense:
    """One affine layer, ``x @ weight + bias``, in float32 as it will be stored."""

    weight: FloatArray
    bias: FloatArray


@dataclass(frozen=True)
class Mlp:
    """A trained one-hidden-layer network ready for export."""

    hidden: Dense
    out: Dense
    # "softmax" for multi-class, "sigmoid" for a single score.
    head: str
    output_name: str
    doc: str


# --------------------------------------------------------------------------- datasets


def digits_to_mnist(images: NDArray[Any]) -> FloatArray:
    """Turn 8x8 digits (values 0..16) into flattened 28x28 MNIST-like rows in [0, 1].

    Nearest-neighbour 3x upsampling gives 24x24; a 2-pixel border centres it like MNIST.
    """
    imgs = np.asarray(images, dtype=np.float32).reshape(-1, 8, 8) / np.float32(16.0)
    big = np.kron(imgs, np.ones((1, 3, 3), dtype=np.float32))
    padded = np.pad(big, ((0, 0), (2, 2), (2, 2)))
    return padded.reshape(len(imgs), 28 * 28).astype(np.float32)


def _iris() -> tuple[FloatArray, LabelArray]:
    from sklearn.datasets import load_iris

    data = load_iris()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def _digits() -> tuple[FloatArray, LabelArray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return digits_to_mnist(data.images), data.target.astype(np.int64)


def _risk(n: int = 4000, seed: int = 20240607) -> tuple[FloatArray, LabelArray]:
    """Synthetic applicants whose default odds follow a known, mildly non-linear rule."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(21, 70, n)
    income = rng.lognormal(mean=4.0, sigma=0.45, size=n)  # thousands per year
    dti = rng.beta(2.0, 5.0, n)
    late = rng.poisson(0.6, n).astype(np.float64)
    lines = rng.integers(0, 15, n).astype(np.float64)
    employed = np.minimum(rng.exponential(6.0, n), age - 18)
    logit = (
        -1.2
        + 4.0 * (dti - 0.3)
        + 0.9 * late
        - 0.025 * (income - 55.0)
        - 0.04 * (age - 40.0)
        - 0.12 * employed
        + 0.06 * (lines - 7.0) ** 2 / 7.0
    )
    label = rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))
    x = np.stack([age, income, dti, late, lines, employed], axis=1)
    return x.astype(np.float32), label.astype(np.int64)


_DATASETS: dict[str, Callable[[], tuple[FloatArray, LabelArray]]] = {
    "iris": _iris,
    "mnist": _digits,
    "risk": _risk,
}


def load_dataset(name: str) -> tuple[FloatArray, LabelArray]:
    """The training data of example ``name`` as (features, labels); needs scikit-learn."""
    try:
        return _DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown example {name!r}; expected one of {EXAMPLE_NAMES}") from None


# --------------------------------------------------------------------------- training


def _fold_standardisation(x: FloatArray, coef: NDArray[Any], intercept: NDArray[Any]) -> Dense:
    """Absorb ``(x - mean) / std`` into the first layer so the exported model eats raw x."""
    mean = x.astype(np.float64).mean(axis=0)
    std = x.astype(np.float64).std(axis=0)
    std[std == 0] = 1.0
    weight = coef / std[:, None]
    bias = intercept - (mean / std) @ coef
    return Dense(weight.astype(np.float32), bias.astype(np.float32))


def _standardise(x: FloatArray) -> NDArray[np.float64]:
    x64 = x.astype(np.float64)
    std = x64.std(axis=0)
    std[std == 0] = 1.0
    return np.asarray((x64 - x64.mean(axis=0)) / std)


def _untyped(module: str) -> Any:
    """Import a train-extra dependency that ships no type information."""
    return importlib.import_module(module)


def _fit(model: Any, x: NDArray[Any], y: LabelArray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    # One BLAS thread: the result must not depend on how many cores the machine has.
    # The short training budgets are deliberate; the accuracy floors are tested instead.
    with _untyped("threadpoolctl").threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _to_mlp(clf: Any, first: Dense, head: str, output_name: str, doc: str) -> Mlp:
    out = Dense(
        np.asarray(clf.coefs_[1], dtype=np.float32),
        np.asarray(clf.intercepts_[1], dtype=np.float32),
    )
    return Mlp(first, out, head, output_name, doc)


def train_iris() -> Mlp:
    from sklearn.neural_network import MLPClassifier

    x, y = _iris()
    clf = _fit(
        MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=2000, random_state=0),
        _standardise(x),
        y,
    )
    first = _fold_standardisation(x, clf.coefs_[0], clf.intercepts_[0])
    doc = "Iris species (setosa, versicolor, virginica) from 4 raw measurements in cm."
    return _to_mlp(clf, first, "softmax", "probabilities", doc)


def train_mnist() -> Mlp:
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    clf = _fit(
        MLPClassifier(
            hidden_layer_sizes=(64,),
            solver="adam",
            learning_rate_init=1e-3,
            max_iter=40,
            random_state=0,
        ),
        x,
        y,
    )
    first = Dense(
        np.asarray(clf.coefs_[0], dtype=np.float32),
        np.asarray(clf.intercepts_[0], dtype=np.float32),
    )
    doc = "Digit 0-9 from a 28x28 grey image in [0, 1], flattened row-major to 784 floats."
    return _to_mlp(clf, first, "softmax", "probabilities", doc)


def train_risk() -> Mlp:
    from sklearn.neural_network import MLPClassifier

    x, y = _risk()
    clf = _fit(
        MLPClassifier(
            hidden_layer_sizes=(16,), solver="lbfgs", alpha=1e-3, max_iter=1000, random_state=0
        ),
        _standardise(x),
        y,
    )
    first = _fold_standardisation(x, clf.coefs_[0], clf.intercepts_[0])
    doc = "Probability of default from 6 applicant features: " + ", ".join(RISK_FEATURES) + "."
    return _to_mlp(clf, first, "sigmoid", "score", doc)


_TRAINERS: dict[str, Callable[[], Mlp]] = {
    "iris": train_iris,
    "mnist": train_mnist,
    "risk": train_risk,
}


# --------------------------------------------------------------------------- export


def mlp_to_onnx(name: str, mlp: Mlp) -> onnx.ModelProto:
    """Hand-build the ONNX graph; nothing in it depends on time, host or random state."""
    n_in = mlp.hidden.weight.shape[0]
    n_out = mlp.out.weight.shape[1]
    inits = [
        numpy_helper.from_array(mlp.hidden.weight, "w1"),
        numpy_helper.from_array(mlp.hidden.bias, "b1"),
        numpy_helper.from_array(mlp.out.weight, "w2"),
        numpy_helper.from_array(mlp.out.bias, "b2"),
    ]
    head = (
        helper.make_node("Softmax", ["logits"], [mlp.output_name], axis=-1)
        if mlp.head == "softmax"
        else helper.make_node("Sigmoid", ["logits"], [mlp.output_name])
    )
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "w1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b2"], ["logits"]),
        head,
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(mlp.output_name, TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        doc_string=mlp.doc,
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def _build_here(name: str) -> bytes:
    """Train example ``name`` in this process; the bytes depend on this process's CPU choices."""
    try:
        trainer = _TRAINERS[name]
    except KeyError:
        raise ValueError(f"unknown example {name!r}; expected one of {EXAMPLE_NAMES}") from None
    return bytes(mlp_to_onnx(name, trainer()).SerializeToString())


def build_example(name: str) -> bytes:
    """Train example ``name`` (in a pinned child process) and return its serialised model."""
    with tempfile.TemporaryDirectory(prefix="ztgate-example-") as tmp:
        return build_examples(Path(tmp), (name,))[name].read_bytes()


def build_examples(out_dir: Path, names: Sequence[str] = EXAMPLE_NAMES) -> dict[str, Path]:
    """Write ``<name>.onnx`` for each example into ``out_dir`` (created if missing).

    Training runs in a child process started with ``pinned_environment()``, which is the only
    way to pin the BLAS kernels, numpy's SIMD loops and libm's variants: each is chosen at start.
    """
    unknown = [n for n in names if n not in _TRAINERS]
    if unknown:
        raise ValueError(f"unknown example {unknown[0]!r}; expected one of {EXAMPLE_NAMES}")
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.examples", _PINNED_BUILD, str(out_dir), *names],
        env=pinned_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ExampleError(f"building {list(names)} failed:\n{proc.stderr[-4000:]}")
    return {name: out_dir / f"{name}.onnx" for name in names}


def write_sums(paths: dict[str, Path], out_dir: Path) -> Path:
    """Record each file's SHA-256 in ``out_dir/SHA256SUMS.json``."""
    target = out_dir / SUMS_FILE
    # Entries built elsewhere (the generative examples) are kept.
    kept = json.loads(target.read_text(encoding="utf-8")) if target.is_file() else {}
    sums = {**kept, **{name: sha256_file(path) for name, path in sorted(paths.items())}}
    sums = dict(sorted(sums.items()))
    target.write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


def _umath() -> Any:
    try:
        return _untyped("numpy._core._multiarray_umath")
    except ImportError:  # numpy < 1.26
        return _untyped("numpy.core._multiarray_umath")


def pinned_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the CPU-dependent choices pinned.

    One BLAS thread and the ``BLAS_CORETYPE`` kernel; numpy's runtime-dispatched SIMD loops off
    (its baseline, which every CPU of the instruction set has, stays); libm's plain variants.
    """
    env = dict(os.environ if base is None else base)
    machine = platform.machine()
    umath = _umath()
    dispatched = [f for f in umath.__cpu_dispatch__ if f not in umath.__cpu_baseline__]
    env.pop("NPY_ENABLE_CPU_FEATURES", None)  # numpy 2 refuses both variables together
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(dispatched)
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    env.pop("OPENBLAS_CORETYPE", None)
    if machine in BLAS_CORETYPE:
        env["OPENBLAS_CORETYPE"] = BLAS_CORETYPE[machine]
    if machine in LIBM_TUNABLES:
        others = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        others = [t for t in others if not t.startswith("glibc.cpu.hwcaps=")]
        env["GLIBC_TUNABLES"] = ":".join([*others, LIBM_TUNABLES[machine]])
    return env


def _blas_libraries() -> list[dict[str, Any]]:
    _untyped("scipy.linalg")  # loads scipy's own BLAS, so threadpoolctl reports it too
    info: list[dict[str, Any]] = _untyped("threadpoolctl").threadpool_info()
    return [lib for lib in info if lib["user_api"] == "blas"]


def check_pinned() -> None:
    """Raise ExampleError unless this process runs with ``pinned_environment``'s choices."""
    machine = platform.machine()
    umath = _umath()
    dispatching = [
        f
        for f in umath.__cpu_dispatch__
        if f not in umath.__cpu_baseline__ and umath.__cpu_features__.get(f)
    ]
    if dispatching:
        raise ExampleError(f"numpy still dispatches {dispatching}: not a pinned_environment()")
    kernels = {str(lib.get("architecture")) for lib in _blas_libraries()}
    if machine in BLAS_CORETYPE and kernels != {BLAS_CORETYPE[machine]}:
        raise ExampleError(f"BLAS kernels {sorted(kernels)}, not {BLAS_CORETYPE[machine]}")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if machine in LIBM_TUNABLES and LIBM_TUNABLES[machine] not in tunables:
        raise ExampleError("libm variants not pinned: not a pinned_environment()")


def build_environment() -> dict[str, str]:
    """The library versions a rebuild here would use (cf. ``BUILT_WITH``).

    Versions only: the CPU-dependent choices are pinned for every build, so with equal versions
    the bytes are equal whatever the CPU. ``machine`` is the instruction set, whose kernels are
    other code altogether.
    """
    import sklearn

    blas = sorted(f"{lib.get('internal_api')} {lib.get('version')}" for lib in _blas_libraries())
    libc, libc_version = platform.libc_ver()
    return {
        "machine": platform.machine(),
        "libc": f"{libc} {libc_version}".strip(),
        "numpy": np.__version__,
        "scipy": _untyped("scipy").__version__,
        "scikit-learn": sklearn.__version__,
        "onnx": onnx.__version__,
        "blas": ",".join(blas),
    }


# --------------------------------------------------------------------------- shipped files


def shipped_sums() -> dict[str, str]:
    """The recorded SHA-256 of each shipped example."""
    raw = json.loads((SHIPPED_DIR / SUMS_FILE).read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ExampleError(f"{SHIPPED_DIR / SUMS_FILE} is not a name -> sha256 map")
    return {str(k): str(v) for k, v in raw.items()}


def shipped_examples(names: Sequence[str] = EXAMPLE_NAMES) -> dict[str, Path]:
    """Paths of the shipped examples, each checked against SHA256SUMS.json."""
    sums = shipped_sums()
    found: dict[str, Path] = {}
    for name in names:
        path = SHIPPED_DIR / f"{name}.onnx"
        if not path.is_file():
            raise ExampleError(f"shipped example {path} is missing")
        actual = sha256_file(path)
        if sums.get(name) != actual:
            raise ExampleError(f"{path} has sha256 {actual}, SHA256SUMS.json says {sums.get(name)}")
        found[name] = path
    return found


def shipped_generative() -> dict[str, Path]:
    """Paths of the shipped generative examples, each checked against SHA256SUMS.json."""
    return shipped_examples(GENERATIVE_NAMES)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.examples``: rebuild the shipped examples and their SHA256SUMS.json."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [_PINNED_BUILD]:  # the child build_examples starts
        check_pinned()
        out = Path(args[1])
        for name in args[2:]:
            (out / f"{name}.onnx").write_bytes(_build_here(name))
        return 0
    if args:
        print("usage: python -m gateway.examples", file=sys.stderr)
        return 2
    write_sums(build_examples(SHIPPED_DIR), SHIPPED_DIR)
    print(f"built with {build_environment()} (update BUILT_WITH if it changed)")
    for example, digest in shipped_sums().items():
        print(f"{digest}  {example}.onnx")
    return 0


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    raise SystemExit(main())
