"""`ztgate zk ...`: onboard a model for zk mode, add it to a node, re-verify a proof offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cli import Progress, UsageError, emit, json_option, path_option


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("zk", help="zero-knowledge proofs of inference (ezkl)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    onboard = verbs.add_parser("onboard", help="build circuit, keys and zk.json for a model")
    onboard.add_argument(
        "model",
        metavar="MODEL",
        help="a registered model's name (one step: artefacts beside the registry, entry "
        "marked zk-capable), or an ONNX file with --name",
    )
    onboard.add_argument("--name", default=None, help="the model's name (with an ONNX file)")
    onboard.add_argument("--version", default=None, help="default: 1, or the latest registered")
    onboard.add_argument(
        "--registry", type=Path, default=Path(".ztgate/registry"), metavar="DIR",
        help="registry directory, for a registered MODEL (default .ztgate/registry)",
    )  # fmt: skip
    onboard.add_argument(
        "--calibration",
        type=Path,
        required=True,
        metavar="DATA.json|npy",
        help="representative inputs: .npy, ezkl's {input_data: [[...]]} or a list of rows",
    )
    onboard.add_argument("--out", type=Path, default=None, metavar="DIR")
    onboard.add_argument("--mode", choices=("dev", "production"), default="dev")
    onboard.add_argument("--srs", type=Path, default=None, metavar="FILE")
    onboard.add_argument("--srs-sha256", default=None, metavar="HEX")
    onboard.add_argument("--tolerance", type=float, default=1e-2)
    onboard.add_argument(
        "--scales", default=None, help="comma-separated fixed-point scales to try (7..11)"
    )
    onboard.add_argument(
        "--no-tune",
        action="store_true",
        help="only try scales, at ezkl's default decomposition (no circuit search)",
    )
    json_option(onboard)
    onboard.set_defaults(func=_onboard)

    add = verbs.add_parser("add-to-repository", help="add <name>-zk to a Triton repository")
    add.add_argument("repository", type=Path, metavar="REPO")
    add.add_argument("--name", required=True)
    _artefacts(add)
    json_option(add)
    add.set_defaults(func=_add)

    verify = verbs.add_parser("verify", help="re-verify a proof offline (auditor)")
    verify.add_argument("proof", type=Path, metavar="PROOF.json")
    _artefacts(verify)
    verify.add_argument(
        "--input", required=True, help="the request input as a JSON list (or @FILE)"
    )
    verify.set_defaults(func=_verify)


def _artefacts(p: Any) -> None:
    path_option(
        p,
        "--zk-artefacts",
        "--artefacts",
        dest="artefacts",
        type=Path,
        required=True,
        metavar="DIR",
        help="`ztgate zk onboard` output directory",
    )


def _onboard(args: argparse.Namespace) -> int:
    from zk.onboard import DEFAULT_SCALES, load_calibration, onboard
    from zk.record import ZkError

    registered = _registered(args)
    name, version = (registered.name, registered.version) if registered else (args.name, "1")
    version = args.version or version
    model_path = registered.path if registered else Path(args.model)
    if registered is not None:
        from zk.repository import onboarded_dir

        out = args.out or onboarded_dir(args.registry, name, version)
    else:
        out = args.out or Path(".ztgate/zk") / name / version
    scales = (
        tuple(int(s) for s in args.scales.split(",") if s.strip())
        if args.scales
        else DEFAULT_SCALES
    )
    progress = Progress.of(args, f"zk onboard {name}")
    try:
        result = onboard(
            model_path,
            name,
            load_calibration(args.calibration),
            out,
            version=version,
            mode=args.mode,
            srs=args.srs,
            srs_sha256=args.srs_sha256,
            tolerance=args.tolerance,
            scales=scales,
            progress=progress,
            tune=not args.no_tune,
        )
    except ZkError as exc:
        raise UsageError(str(exc)) from exc
    progress.done()
    record = result.record
    if registered is not None:
        from gateway.registry import Registry

        # Only now, with artefacts for exactly these bytes in place, may policy pick zk.
        Registry.open(args.registry).allow_mode(name, version, "zk")
    warnings = (
        ["DEV-ONLY SRS generated here; production needs --mode production --srs"]
        if record.dev_srs
        else []
    )
    data = {
        "out": str(result.out_dir),
        "record": record.to_json(),
        "tried": [
            {"scale": t.scale, "logrows": t.logrows, "max_abs_error": t.max_abs_error}
            for t in result.tried
        ],
        "files": result.files,
        "warnings": warnings,
    }
    lines = [
        f"scale {t.scale}, base {t.decomp_base}^{t.decomp_legs}, {t.head}: "
        + (
            f"logrows {t.logrows} ({t.num_rows} rows), max |error| vs onnxruntime "
            f"{t.max_abs_error:.3g}"
            if t.logrows
            else f"not built ({t.note})"
        )
        for t in result.tried
    ]
    if record.tuning:
        lines.append(f"chose {record.tuning.get('reason', '')}")
    lines.append(f"onboarded {record.name} v{record.version} into {result.out_dir}")
    lines += [f"  {key + ':':16} {value}" for key, value in _record_lines(record.to_json())]
    lines.append("files:")
    lines += [f"  {size:>12,d}  {name}" for name, size in result.files.items()]
    emit(args, data, "\n".join(lines))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def _registered(args: argparse.Namespace) -> Any:
    """The registry entry MODEL names, or None when MODEL is an ONNX file (needs --name)."""
    from gateway.registry import Registry, RegistryError

    if Path(args.model).suffix == ".onnx" or Path(args.model).is_file():
        if not args.name:
            raise UsageError("an ONNX file needs --name (or give a registered model's name)")
        return None
    if args.name and args.name != args.model:
        raise UsageError(f"--name {args.name!r} differs from the registered model {args.model!r}")
    try:
        return Registry.open(args.registry).get(args.model, args.version)
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc


def _record_lines(record: dict[str, Any]) -> list[tuple[str, str]]:
    """zk.json's fields as `key: value` text (tensors and quantisation in one line each)."""
    out: list[tuple[str, str]] = []
    for key, value in record.items():
        if key in ("inputs", "outputs"):
            value = ", ".join(f"{t['name']} {t['shape']} scale {t['scale']}" for t in value)
        elif key == "tuning":
            value = value.get("reason", "") if isinstance(value, dict) else value
        elif key == "quantisation":
            value = (
                f"scale {value.get('scale')}, max |error| {value.get('max_abs_error', 0):.3g} "
                f"(tolerance {value.get('tolerance')}, {value.get('samples')} samples)"
            )
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        out.append((key, str(value)))
    return out


def _add(args: argparse.Namespace) -> int:
    from zk.record import ZkError
    from zk.repository import add_zk_model

    try:
        path = add_zk_model(args.repository, args.name, args.artefacts)
    except ZkError as exc:
        raise UsageError(str(exc)) from exc
    emit(args, {"path": str(path)}, str(path))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from zk.record import VerifierArtefacts, ZkError
    from zk.verifier import verify_proof

    raw = args.input
    try:
        text = Path(raw[1:]).read_text(encoding="utf-8") if raw.startswith("@") else raw
        values = np.asarray(json.loads(text), dtype=np.float32)
        artefacts = VerifierArtefacts.from_dir(args.artefacts)
        proof = args.proof.read_bytes()
    except (OSError, ValueError, ZkError) as exc:
        raise UsageError(str(exc)) from exc
    result = verify_proof(
        proof, values, artefacts.record, artefacts.vk, artefacts.settings, artefacts.srs
    )
    report = {
        "success": result.success,
        "reason": result.reason,
        "detail": result.detail,
        "outputs": [o.tolist() for o in result.outputs],
        "proof_sha256": result.proof_sha256,
        "instances_sha256": result.instances_sha256,
        **artefacts.record.evidence(),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if result.success else 1
