"""The `ztgate` command: one module per noun, each adding its verbs to the parser."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each module exposes `register(subparsers)`, and every verb sets `func(args) -> int`.
NOUNS: tuple[str, ...] = (
    "pki",
    "model",
    "node",
    "serve",
    "up",
    "demo",
    "policy",
    "zk",
    "audit",
    "verify",
    "witness",
    "mpc",
)


class UsageError(Exception):
    """Bad arguments or inputs a person can fix; printed without a traceback, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztgate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")
    for noun in NOUNS:
        importlib.import_module(f"gateway.cli.{noun}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc: int = args.func(args)
    except UsageError as exc:
        print(f"ztgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc
