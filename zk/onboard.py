"""Onboard an ONNX model for zk mode: settings, calibration, circuit, SRS, keys, record.

Fixed policy (see docs/zk.md for the measurements behind it):

* inputs **public**: the gateway compares them with its own quantisation of the request;
* outputs **public**: the answer the client gets is read from the verified proof;
* params **fixed**: the weights are fixed columns, so the vk commits to them. ``private``
  is refused (another set of weights verifies under the same vk); ``hashed`` blew up on a
  784-input MLP; ``polycommit`` binds through a commitment the verifier would have to pin
  separately, for no saving on iris (see docs);
* ``check_mode`` **SAFE**; UNSAFE is refused.

Scales are tried smallest first and the first one whose worst error against onnxruntime on
the calibration set is within ``tolerance`` wins: the smallest circuit that is accurate
enough. ``get_srs`` (an internet download) is never called. In ``dev`` mode the SRS is made
here with ``gen_srs``: whoever ran it could forge proofs, so the record says ``dev_srs``. In
``production`` the SRS must be a public ceremony file pinned by SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx

from gateway.registry import RegistryError, read_signature
from zk.record import (
    CIRCUIT_FILE,
    DEV_SRS_FILE,
    NODE_DIR,
    PK_FILE,
    RECORD_FILE,
    REQUIRED_CHECK_MODE,
    SETTINGS_FILE,
    SRS_FILE,
    VERIFIER_DIR,
    VK_FILE,
    ZkError,
    ZkRecord,
    ZkTensor,
    check_policy,
    check_settings,
    sha256_file,
)

log = logging.getLogger(__name__)

Mode = Literal["dev", "production"]
DEFAULT_SCALES: tuple[int, ...] = (7, 8, 9, 10, 11)
DEFAULT_TOLERANCE = 1e-2
MAX_ERROR_SAMPLES = 64  # rows of the calibration set run through the circuit for the report


@dataclass(frozen=True)
class Tried:
    scale: int
    logrows: int
    max_abs_error: float


@dataclass(frozen=True)
class OnboardResult:
    record: ZkRecord
    out_dir: Path
    tried: tuple[Tried, ...]
    files: dict[str, int]  # artefact path (relative) -> bytes


@contextlib.contextmanager
def ezkl_home(directory: Path) -> Iterator[None]:
    """Keep ezkl's cache (``EZKL_REPO_PATH``) in ``directory`` for the duration."""
    old = os.environ.get("EZKL_REPO_PATH")
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["EZKL_REPO_PATH"] = str(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EZKL_REPO_PATH", None)
        else:
            os.environ["EZKL_REPO_PATH"] = old


def load_calibration(path: Path) -> npt.NDArray[np.float32]:
    """A ``.npy`` array, or JSON: ``{"input_data": [[...]]}`` (ezkl) or a plain list of rows."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                raw = raw.get("input_data", raw.get("data"))
                if isinstance(raw, list) and len(raw) == 1:
                    raw = raw[0]
            data = np.asarray(raw, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ZkError(f"cannot read calibration data {path}: {exc}") from exc
    return np.asarray(data, dtype=np.float32)


def _fixed_shapes(model_path: Path) -> tuple[list[tuple[str, int]], tuple[int, ...]]:
    """ezkl ``variables`` binding each symbolic dim to 1, and the input's fixed shape."""
    model = onnx.load(str(model_path))
    weights = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    if len(inputs) != 1:
        raise ZkError(f"{model_path}: zk mode supports one input tensor, found {len(inputs)}")
    variables: dict[str, int] = {}
    shape: list[int] = []
    for i, dim in enumerate(inputs[0].type.tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
            continue
        if i != 0:
            raise ZkError(f"{model_path}: only the batch dimension may be symbolic")
        variables[dim.dim_param or "batch_size"] = 1
        shape.append(1)
    return list(variables.items()) or [("batch_size", 1)], tuple(shape)


def _calibration_rows(data: npt.NDArray[np.float32], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    row = int(np.prod(shape))
    if data.size == 0 or data.size % row:
        raise ZkError(f"calibration data of {data.size} values is not a whole number of {shape}")
    rows = data.reshape(-1, *shape[1:]) if shape[0] == 1 else data.reshape(-1, *shape)
    if not np.isfinite(rows).all():
        raise ZkError("calibration data holds NaN or Inf")
    return rows


def _reference(model_path: Path, rows: npt.NDArray[Any], input_name: str) -> list[npt.NDArray[Any]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    outs: list[npt.NDArray[Any]] = []
    for row in rows:
        result = session.run(None, {input_name: row.reshape(1, *row.shape).astype(np.float32)})
        outs.append(np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1) for r in result]))
    return outs


def _circuit_outputs(ezkl: Any, witness: dict[str, Any], scales: Sequence[int]) -> npt.NDArray[Any]:
    values = [
        ezkl.felt_to_float(felt, scale)
        for tensor, scale in zip(witness["outputs"], scales, strict=True)
        for felt in tensor
    ]
    return np.asarray(values, dtype=np.float64)


def _try_scale(
    ezkl: Any,
    model: Path,
    scale: int,
    run_args: Any,
    calibration_json: Path,
    rows: npt.NDArray[Any],
    reference: list[npt.NDArray[Any]],
    work: Path,
) -> tuple[Tried, Path, Path, dict[str, Any]]:
    settings = work / f"settings-{scale}.json"
    circuit = work / f"network-{scale}.ezkl"
    if not ezkl.gen_settings(str(model), str(settings), py_run_args=run_args):
        raise ZkError("ezkl gen_settings failed")
    ezkl.calibrate_settings(
        str(calibration_json), str(model), str(settings), "resources", scales=[scale]
    )
    if not ezkl.compile_circuit(str(model), str(circuit), str(settings)):
        raise ZkError("ezkl compile_circuit failed")
    parsed = json.loads(settings.read_text(encoding="utf-8"))
    worst = 0.0
    data = work / "row.json"
    for row, want in zip(rows, reference, strict=True):
        data.write_text(json.dumps({"input_data": [row.reshape(-1).tolist()]}), encoding="utf-8")
        witness = ezkl.gen_witness(str(data), str(circuit), str(work / "witness.json"))
        got = _circuit_outputs(ezkl, witness, parsed["model_output_scales"])
        worst = max(worst, float(np.max(np.abs(got - want))))
    return Tried(scale, int(parsed["run_args"]["logrows"]), worst), settings, circuit, parsed


def onboard(
    model: Path | str,
    name: str,
    calibration: npt.NDArray[np.float32],
    out_dir: Path | str,
    *,
    version: str = "1",
    mode: Mode = "dev",
    srs: Path | str | None = None,
    srs_sha256: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    scales: Sequence[int] = DEFAULT_SCALES,
    check_mode: str = REQUIRED_CHECK_MODE,
    input_visibility: str = "public",
    output_visibility: str = "public",
    param_visibility: str = "fixed",
    progress: Callable[[str], None] | None = None,
) -> OnboardResult:
    """Build and write the zk artefacts for ``model``; raises ZkError when it must refuse.

    Every refusal that needs no ezkl work (policy, SRS pinning, signature) happens first.
    ``progress`` is told each long step as it begins (`gateway.cli.Progress`).
    """
    step = progress or (lambda _text: None)
    model = Path(model).absolute()
    out = Path(out_dir).absolute()
    check_policy(
        check_mode,
        {"input": input_visibility, "output": output_visibility, "params": param_visibility},
        where="onboarding",
    )
    if mode not in ("dev", "production"):
        raise ZkError(f"unknown mode {mode!r}: dev or production")
    srs_path = Path(srs).absolute() if srs is not None else None
    if srs_path is not None:
        if not srs_sha256:
            raise ZkError("an SRS file must be pinned: pass its SHA-256 (--srs-sha256)")
        got = sha256_file(srs_path)
        if got != srs_sha256.lower():
            raise ZkError(f"SRS {srs_path} has sha256 {got}, pinned {srs_sha256}; refusing")
    elif mode == "production":
        raise ZkError(
            "production mode needs a public-ceremony SRS pinned by SHA-256 (--srs FILE "
            "--srs-sha256 HEX); a locally generated SRS lets its maker forge proofs"
        )
    if out.exists() and any(out.iterdir()):
        raise ZkError(f"{out} exists and is not empty; onboard into a fresh directory")
    try:
        inputs, outputs = read_signature(model)
    except RegistryError as exc:
        raise ZkError(str(exc)) from exc
    for spec in (*inputs, *outputs):
        if spec.datatype != "FP32":
            raise ZkError(f"zk mode needs FP32 tensors; {spec.name!r} is {spec.datatype}")
    variables, in_shape = _fixed_shapes(model)
    rows = _calibration_rows(calibration, in_shape)
    reference = _reference(model, rows[:MAX_ERROR_SAMPLES], inputs[0].name)

    import ezkl as ezkl_module

    # ezkl ships stubs, but they declare no defaults and omit PyRunArgs' attributes.
    ezkl: Any = ezkl_module
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as tmp, ezkl_home(out / ".ezkl"):
        work = Path(tmp)
        cal = work / "calibration.json"
        cal.write_text(json.dumps({"input_data": [rows.reshape(-1).tolist()]}), encoding="utf-8")
        run_args = ezkl.PyRunArgs()
        run_args.input_visibility = input_visibility
        run_args.output_visibility = output_visibility
        run_args.param_visibility = param_visibility
        run_args.check_mode = check_mode.lower()
        run_args.variables = variables
        tried: list[Tried] = []
        chosen: tuple[Tried, Path, Path, dict[str, Any]] | None = None
        for scale in sorted(scales):
            step(f"calibrating (scale {scale})")
            attempt = _try_scale(
                ezkl, model, scale, run_args, cal, rows[:MAX_ERROR_SAMPLES], reference, work
            )
            tried.append(attempt[0])
            log.info(
                "scale %d: logrows %d, max |error| %.3g vs onnxruntime",
                scale,
                attempt[0].logrows,
                attempt[0].max_abs_error,
            )
            if attempt[0].max_abs_error <= tolerance:
                chosen = attempt
                break
        if chosen is None:
            errors = ", ".join(f"scale {t.scale}: {t.max_abs_error:.3g}" for t in tried)
            raise ZkError(
                f"quantisation error above tolerance {tolerance:g} at every scale ({errors})"
            )
        best, settings_tmp, circuit_tmp, settings = chosen
        check_settings(settings, "generated settings")
        logrows = int(settings["run_args"]["logrows"])

        node_dir, verifier_dir = out / NODE_DIR, out / VERIFIER_DIR
        node_dir.mkdir()
        verifier_dir.mkdir()
        shutil.copyfile(settings_tmp, node_dir / SETTINGS_FILE)
        shutil.copyfile(settings_tmp, verifier_dir / SETTINGS_FILE)
        shutil.copyfile(circuit_tmp, node_dir / CIRCUIT_FILE)
        srs_name = DEV_SRS_FILE if srs_path is None else SRS_FILE
        srs_out = verifier_dir / srs_name
        step(f"{'generating a dev' if srs_path is None else 'copying the'} SRS (logrows {logrows})")
        if srs_path is None:
            log.warning(
                "DEV-ONLY: generating a local SRS (logrows %d); whoever holds this machine's "
                "randomness could forge proofs. Production needs a pinned ceremony SRS.",
                logrows,
            )
            ezkl.gen_srs(str(srs_out), logrows)
        else:
            shutil.copyfile(srs_path, srs_out)
        shutil.copyfile(srs_out, node_dir / srs_name)
        step(f"setup (logrows {logrows})")
        if not ezkl.setup(
            str(node_dir / CIRCUIT_FILE),
            str(verifier_dir / VK_FILE),
            str(node_dir / PK_FILE),
            str(srs_out),
        ):
            raise ZkError("ezkl setup failed")
        step(f"proving key {(node_dir / PK_FILE).stat().st_size / 1e6:.0f} MB; hashing")

    record = ZkRecord(
        name=name,
        version=version,
        model_sha256=hashlib.sha256(model.read_bytes()).hexdigest(),
        settings_sha256=sha256_file(verifier_dir / SETTINGS_FILE),
        vk_sha256=sha256_file(verifier_dir / VK_FILE),
        srs_sha256=sha256_file(srs_out),
        pk_sha256=sha256_file(node_dir / PK_FILE),
        circuit_sha256=sha256_file(node_dir / CIRCUIT_FILE),
        logrows=logrows,
        inputs=tuple(
            ZkTensor(spec.name, in_shape, int(s))
            for spec, s in zip(inputs, settings["model_input_scales"], strict=True)
        ),
        outputs=tuple(
            ZkTensor(spec.name, _output_shape(spec.shape), int(s))
            for spec, s in zip(outputs, settings["model_output_scales"], strict=True)
        ),
        visibility={
            "input": input_visibility,
            "output": output_visibility,
            "params": param_visibility,
        },
        check_mode=str(settings["check_mode"]).upper(),
        dev_srs=srs_path is None,
        ezkl_version=str(settings.get("version", "")),
        quantisation={
            "scale": best.scale,
            "max_abs_error": best.max_abs_error,
            "tolerance": tolerance,
            "samples": int(min(len(rows), MAX_ERROR_SAMPLES)),
            "tried": [t.__dict__ for t in tried],
        },
    )
    (out / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=2) + "\n", "utf-8")
    shutil.rmtree(out / ".ezkl", ignore_errors=True)
    files = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    return OnboardResult(record, out, tuple(tried), files)


def _output_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if any(d < 0 for d in shape[1:]):
        raise ZkError(f"output shape {shape}: only the batch dimension may be symbolic")
    return tuple(1 if d < 0 else d for d in shape)
