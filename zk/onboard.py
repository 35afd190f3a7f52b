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
import math
import os
import shutil
import tempfile
import time
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
from zk.tuning import (
    DEFAULT_DECOMPOSITION,
    SEARCH_BUDGET_S,
    Candidate,
    Head,
    Tried,
    best,
    decompositions,
    intermediate_max_abs,
    max_candidates,
    needed_coverage,
    reason,
    softmax,
    softmax_logits,
    srs_logrows,
    strip_softmax,
)

log = logging.getLogger(__name__)

Mode = Literal["dev", "production"]
DEFAULT_SCALES: tuple[int, ...] = (7, 8, 9, 10, 11)
DEFAULT_TOLERANCE = 1e-2
MAX_ERROR_SAMPLES = 64  # rows of the calibration set run through the circuit for the report


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


@contextlib.contextmanager
def _quiet_ezkl() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("ezkl", "ezkl.execute")]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before, strict=True):
            lg.disabled = was


def _try(
    ezkl: Any,
    model: Path,
    candidate: Candidate,
    run_args: Any,
    calibration_json: Path,
    rows: npt.NDArray[Any],
    reference: list[npt.NDArray[Any]],
    work: Path,
) -> tuple[Tried, Path, Path, dict[str, Any]]:
    """Build one candidate circuit and measure its worst error against onnxruntime."""
    tag = f"{candidate.scale}-{candidate.decomp_base}-{candidate.decomp_legs}-{candidate.head}"
    settings = work / f"settings-{tag}.json"
    circuit = work / f"network-{tag}.ezkl"
    run_args.decomp_base = candidate.decomp_base
    run_args.decomp_legs = candidate.decomp_legs
    if not ezkl.gen_settings(str(model), str(settings), py_run_args=run_args):
        raise ZkError("ezkl gen_settings failed")
    with _quiet_ezkl():  # its fidelity table per candidate is noise; the search logs one line
        ezkl.calibrate_settings(
            str(calibration_json), str(model), str(settings), "resources", scales=[candidate.scale]
        )
    parsed = json.loads(settings.read_text(encoding="utf-8"))
    # Calibration may rewrite run_args; the soundness rules hold on what it wrote.
    check_settings(parsed, "candidate settings")
    got_args = parsed["run_args"]
    if (got_args["decomp_base"], got_args["decomp_legs"]) != (
        candidate.decomp_base,
        candidate.decomp_legs,
    ):
        raise ZkError("calibration changed the decomposition")
    if not ezkl.compile_circuit(str(model), str(circuit), str(settings)):
        raise ZkError("ezkl compile_circuit failed")
    worst = 0.0
    data = work / "row.json"
    for row, want in zip(rows, reference, strict=True):
        data.write_text(json.dumps({"input_data": [row.reshape(-1).tolist()]}), encoding="utf-8")
        witness = ezkl.gen_witness(str(data), str(circuit), str(work / "witness.json"))
        got = _circuit_outputs(ezkl, witness, parsed["model_output_scales"])
        if candidate.head == "logits":
            got = softmax(got)
        worst = max(worst, float(np.max(np.abs(got - want))))
    tried = Tried(
        candidate.scale,
        int(got_args["logrows"]),
        worst,
        candidate.decomp_base,
        candidate.decomp_legs,
        candidate.head,
        int(parsed.get("num_rows", 0)),
    )
    return tried, settings, circuit, parsed


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
    tune: bool = True,
    max_tries: int | None = None,
    budget_s: float = SEARCH_BUDGET_S,
) -> OnboardResult:
    """Build and write the zk artefacts for ``model``; raises ZkError when it must refuse.

    Every refusal that needs no ezkl work (policy, SRS pinning, signature) happens first.
    ``progress`` is told each long step as it begins (`gateway.cli.Progress`).
    ``tune`` searches decomposition and head too (zk/tuning.py); without it only scales
    are tried, at ezkl's default decomposition (the "before" of bench/zk.py).
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
    max_logrows = srs_logrows(srs_path) if srs_path is not None else None
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
        built: dict[int, tuple[Tried, Path, Path, dict[str, Any]]] = {}
        heads: list[Head] = ["as-is"]
        largest = 0.0
        if tune:
            if softmax_logits(onnx.load(str(model))) is not None:
                heads = ["logits", "as-is"]
            step("measuring the calibrated range")
            largest = intermediate_max_abs(model, rows[:MAX_ERROR_SAMPLES], inputs[0].name)
        logits_model = strip_softmax(model, work / "logits.onnx") if "logits" in heads else None
        limit = max_tries if max_tries is not None else max_candidates()
        deadline = time.monotonic() + budget_s

        def out_of_budget() -> bool:
            return len(tried) >= limit or bool(tried and time.monotonic() > deadline)

        def attempt(candidate: Candidate) -> Tried:
            step(f"trying {candidate.label}")
            source = logits_model if candidate.head == "logits" and logits_model else model
            try:
                sample = rows[:MAX_ERROR_SAMPLES]
                built_one = _try(ezkl, source, candidate, run_args, cal, sample, reference, work)
            except (ZkError, RuntimeError) as exc:
                # ezkl refuses some layouts (a table too small for a lookup): not a pick.
                failed = Tried(
                    candidate.scale,
                    0,
                    math.inf,
                    candidate.decomp_base,
                    candidate.decomp_legs,
                    candidate.head,
                    note=str(exc)[:200],
                )
                tried.append(failed)
                return failed
            built[len(tried)] = built_one
            tried.append(built_one[0])
            log.info(
                "%s: logrows %d, max |error| %.3g vs onnxruntime",
                candidate.label,
                built_one[0].logrows,
                built_one[0].max_abs_error,
            )
            return built_one[0]

        # Accuracy is decided by head and scale; the decomposition moves it only slightly
        # (where rescaling happens), so a scale inaccurate under the first decomposition is
        # not tried with the others. Each candidate is still measured against the tolerance
        # on its own, and a larger scale is tried only when no smaller one was accurate.
        # With fewer tries than scales (CI), climbing from the cheapest scale may spend
        # every try below the accurate ones: then start from the most accurate and walk
        # down while still accurate, so a usable circuit is always among those tried.
        descending = limit <= len(scales)
        for head in heads:
            for scale in sorted(scales, reverse=descending):
                group = (
                    decompositions(needed_coverage(largest, scale))
                    if tune
                    else [DEFAULT_DECOMPOSITION]
                )
                accurate = False
                for base, legs in group:
                    if out_of_budget():
                        break
                    outcome = attempt(Candidate(scale, base, legs, head))
                    if outcome.logrows and outcome.max_abs_error > tolerance:
                        break
                    accurate = accurate or bool(outcome.logrows)
                if out_of_budget() or (not accurate if descending else accurate):
                    break
        pick = best(tried, tolerance, max_logrows)
        if pick is None:
            errors = ", ".join(
                f"{t.scale}/{t.decomp_base}^{t.decomp_legs}/{t.head}: {t.max_abs_error:.3g}"
                + (
                    f" (logrows {t.logrows} > SRS {max_logrows})"
                    if max_logrows is not None and t.logrows > max_logrows
                    else ""
                )
                for t in tried
            )
            raise ZkError(
                f"quantisation error above tolerance {tolerance:g}, or no SRS for the "
                f"circuit, at every candidate tried ({errors})"
            )
        chosen = built[tried.index(pick)]
        best_try, settings_tmp, circuit_tmp, settings = chosen
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
            "scale": best_try.scale,
            "max_abs_error": best_try.max_abs_error,
            "tolerance": tolerance,
            "samples": int(min(len(rows), MAX_ERROR_SAMPLES)),
        },
        postprocess={outputs[0].name: "softmax"} if best_try.head == "logits" else {},
        tuning={
            "chosen": best_try.to_json(),
            "reason": reason(best_try, tried, tolerance),
            "tried": [t.to_json() for t in tried],
            "searched": bool(tune),
            "max_srs_logrows": max_logrows,
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
