"""`ztgate model ...`: register ONNX models and inspect the registry."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from gateway.cli import UsageError, emit, json_option
from gateway.registry import (
    CLASSIFICATIONS,
    MODES,
    ModelEntry,
    Registry,
    RegistryError,
    seed_examples,
)

DEFAULT_REGISTRY = Path(".ztgate/registry")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("model", help="manage the model registry")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    add = verbs.add_parser("add", help="register an ONNX file")
    add.add_argument("file", type=Path, metavar="FILE.onnx")
    add.add_argument("--name", required=True)
    add.add_argument("--version", default="1", help="positive integer (default 1)")
    add.add_argument(
        "--classification",
        default="internal",
        help=f"one of {', '.join(CLASSIFICATIONS)} (default internal)",
    )
    add.add_argument(
        "--modes",
        default="none",
        help=f"comma-separated subset of {','.join(MODES)} (default none)",
    )
    add.add_argument(
        "--output-range",
        action="append",
        default=[],
        metavar="NAME=LOW:HIGH",
        help="an output's range, checked on mpc answers (repeatable; empty side unbounded)",
    )
    gen = add.add_argument_group(
        "generative models", "an ONNX next-token model (input_ids -> logits), served as a stream"
    )
    gen.add_argument("--generative", action="store_true", help="register a generative model")
    gen.add_argument("--context-length", type=int, default=128, help="tokens it sees (128)")
    gen.add_argument(
        "--max-tokens", type=int, default=512, help="most tokens one request may ask for (512)"
    )
    gen.add_argument(
        "--end-tokens", default=None, metavar="ID,...", help="default: the tokenizer's end token"
    )
    gen.add_argument(
        "--tokenizer-sha256",
        default=None,
        metavar="HEX",
        help="the tokenizer it was trained with (default: ztgate's byte-level tokenizer)",
    )
    _registry_option(add)
    add.set_defaults(func=_add)

    listing = verbs.add_parser("list", help="list registered models")
    listing.add_argument("--json", action="store_true", help="one JSON array of entries")
    _registry_option(listing)
    listing.set_defaults(func=_list)

    examples = verbs.add_parser("examples", help="register the shipped example models")
    _registry_option(examples)
    json_option(examples)
    examples.set_defaults(func=_examples)

    verify = verbs.add_parser("verify", help="re-hash every model file (exit 1 on mismatch)")
    _registry_option(verify)
    json_option(verify)
    verify.set_defaults(func=_verify)


def _registry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        type=Path,
        default=DEFAULT_REGISTRY,
        metavar="DIR",
        help=f"registry directory (default {DEFAULT_REGISTRY})",
    )


def _open(args: argparse.Namespace) -> Registry:
    try:
        return Registry.open(args.registry)
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc


def _add(args: argparse.Namespace) -> int:
    if args.generative:
        return _add_generative(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ranges = dict(_output_range(text) for text in args.output_range)
    registry = _open(args)
    try:
        entry = registry.add(
            args.file, args.name, args.version, args.classification, modes, ranges or None
        )
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc
    print(json.dumps(entry.to_json(), indent=2))
    return 0


def _add_generative(args: argparse.Namespace) -> int:
    from gateway.llm.generative import MODES as GENERATIVE_MODES
    from gateway.llm.generative import default_spec

    if args.output_range:
        raise UsageError("--output-range does not apply to generative models")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if tuple(modes) != GENERATIVE_MODES:
        raise UsageError(
            f"generative models allow only mode {','.join(GENERATIVE_MODES)} (zk, mpc and "
            "redundant are defined for one tensor answer, not a sampled token stream)"
        )
    spec = default_spec(args.context_length, args.max_tokens)
    try:
        if args.end_tokens is not None:
            ends = tuple(int(t) for t in args.end_tokens.split(",") if t.strip())
            spec = dataclasses.replace(spec, end_tokens=ends)
    except ValueError:
        raise UsageError(f"--end-tokens {args.end_tokens!r}: expected ID,...") from None
    if args.tokenizer_sha256 is not None:
        spec = dataclasses.replace(spec, tokenizer_sha256=args.tokenizer_sha256)
    registry = _open(args)
    try:
        entry = registry.add_generative(
            args.file, args.name, args.version, args.classification, spec
        )
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc
    print(json.dumps(entry.to_json(), indent=2))
    return 0


def _output_range(text: str) -> tuple[str, list[float | None]]:
    name, sep, bounds = text.partition("=")
    low, colon, high = bounds.partition(":")
    try:
        if not (name and sep and colon):
            raise ValueError
        return name, [float(low) if low else None, float(high) if high else None]
    except ValueError:
        raise UsageError(f"--output-range {text!r}: expected NAME=LOW:HIGH") from None


def _list(args: argparse.Namespace) -> int:
    try:
        entries = _open(args).entries()
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    for entry in entries:
        print(_row(entry) + f"\t{entry.sha256}")
    return 0


def _examples(args: argparse.Namespace) -> int:
    registry = _open(args)
    try:
        entries = seed_examples(registry)
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc
    emit(args, [e.to_json() for e in entries], "\n".join(_row(e) for e in entries))
    return 0


def _row(entry: ModelEntry) -> str:
    modes = ",".join(entry.allowed_modes)
    kind = "\tgenerative" if entry.generative is not None else ""
    return f"{entry.name}\t{entry.version}\t{entry.classification}\t{modes}{kind}"


def _verify(args: argparse.Namespace) -> int:
    try:
        problems = _open(args).verify()
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        emit(args, {"ok": not problems, "problems": problems}, "")
    for problem in [] if args.json else problems:
        print(problem)
    return 1 if problems else 0
