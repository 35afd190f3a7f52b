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
    onboard.add_argument("model", type=Path, metavar="MODEL.onnx")
    onboard.add_argument("--name", required=True)
    onboard.add_argument("--version", default="1")
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

    out = args.out or Path(".ztgate/zk") / args.name / args.version
    scales = (
        tuple(int(s) for s in args.scales.split(",") if s.strip())
        if args.scales
        else DEFAULT_SCALES
    )
    progress = Progress.of(args, f"zk onboard {args.name}")
    try:
        result = onboard(
            args.model,
            args.name,
            load_calibration(args.calibration),
            out,
            version=args.version,
            mode=args.mode,
            srs=args.srs,
            srs_sha256=args.srs_sha256,
            tolerance=args.tolerance,
            scales=scales,
            progress=progress,
        )
    except ZkError as exc:
        raise UsageError(str(exc)) from exc
    progress.done()
    record = result.record
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
        f"scale {t.scale}: logrows {t.logrows}, max |error| vs onnxruntime {t.max_abs_error:.3g}"
        for t in result.tried
    ]
    lines.append(f"onboarded {record.name} v{record.version} into {result.out_dir}")
    lines += [f"  {key + ':':16} {value}" for key, value in _record_lines(record.to_json())]
    lines.append("files:")
    lines += [f"  {size:>12,d}  {name}" for name, size in result.files.items()]
    emit(args, data, "\n".join(lines))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def _record_lines(record: dict[str, Any]) -> list[tuple[str, str]]:
    """zk.json's fields as `key: value` text (tensors and quantisation in one line each)."""
    out: list[tuple[str, str]] = []
    for key, value in record.items():
        if key in ("inputs", "outputs"):
            value = ", ".join(f"{t['name']} {t['shape']} scale {t['scale']}" for t in value)
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
