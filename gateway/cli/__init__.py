"""The `ztgate` command: one module per noun, each adding its verbs to the parser.

Conventions every verb keeps: one flag name per kind of path (`--pki`, `--registry`,
`--log-dir`, `--data-dir`, `--config`, `--cluster-dir`, `--witness-dir`, `--zk-artefacts`,
`--out`; older names stay as hidden aliases, `path_option`), `--json` where a verb prints
data, defaults shown in `--help`, a closed pipe (`| head`) ends quietly, long steps show
progress on stderr (`Progress`; never in stdout's data, none with `--json`), and other
libraries' log lines only with `-v`."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

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
    "token",
    "mpc",
    "nodes",
)


class UsageError(Exception):
    """Bad arguments or inputs a person can fix; printed without a traceback, exit 2."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ztgate")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


# Our own loggers: INFO by default. Everyone else's (httpx, asyncio, onnx, ...) only
# from WARNING, and with -v everything at DEBUG (`OwnOrWarning`).
OWN_LOGGERS = ("gateway", "zk", "mpc", "ztgate")
HIDDEN_ALIASES = "hidden_aliases"


def _shows_default(action: argparse.Action) -> bool:
    d = action.default
    if d is None or d is False or d is argparse.SUPPRESS or d == [] or d == ():
        return False
    return bool(action.option_strings) or action.nargs in ("?", "*")


class HelpFormatter(argparse.HelpFormatter):
    """Help with every option's default, and without the old flag names kept as aliases."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "default" not in text.lower():
            text = f"{text} (default: %(default)s)".strip()
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, HIDDEN_ALIASES, ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """Every noun's and verb's parser (subparsers take their parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def path_option(parser: Any, flag: str, *old: str, **kwargs: Any) -> argparse.Action:
    """`flag` for one kind of path, with `old` names still accepted but not shown."""
    action: argparse.Action = parser.add_argument(flag, *old, **kwargs)
    setattr(action, HIDDEN_ALIASES, old)
    return action


def json_option(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """What a verb prints: `data` as JSON with --json, else `text`."""
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


class Progress:
    """Short progress lines of one long step (zk onboarding, a node's start) on stderr:
    `zk onboard iris: calibrating (scale 7)...`, then `zk onboard iris: done in 21 s`.

    Never on stdout, which carries a verb's data; silent with `--json` (`quiet`). One line
    per step, so that log records and other steps (nodes starting in parallel) interleave
    whole lines. Call it with each step as it begins; `done` ends it with the time taken."""

    _lock = threading.Lock()

    def __init__(self, what: str, quiet: bool = False) -> None:
        self.what = what
        self.quiet = quiet
        self.started = time.monotonic()

    @classmethod
    def of(cls, args: argparse.Namespace, what: str) -> Progress:
        return cls(what, quiet=bool(getattr(args, "json", False)))

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:  # sys.stderr looked up now: tests and callers may replace it
            print(f"{self.what}: {text}", file=sys.stderr, flush=True)

    def __call__(self, step: str) -> None:
        self._line(f"{step}...")

    def done(self, text: str = "done", seconds: float | None = None) -> None:
        took = time.monotonic() - self.started if seconds is None else seconds
        self._line(f"{text} in {took:.1f} s" if took < 10 else f"{text} in {took:.0f} s")


class OwnOrWarning(logging.Filter):
    """Our own records from INFO; other libraries' only from WARNING, and their Python
    warnings (`py.warnings`) not at all: those are for `-v`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        return record.levelno >= logging.WARNING and record.name != "py.warnings"


def configure_logging(verbose: bool) -> None:
    """stderr logging for the command: everything with -v, else `OwnOrWarning`. Left alone
    when the process has configured logging already (tests, an embedding program)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(OwnOrWarning())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def _quiet_closed_pipe() -> int:
    """stdout's reader went away (`ztgate ... | head`): stop without a traceback, and keep
    the interpreter's final flush from complaining too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, as a C tool killed by it would report


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ztgate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ztgate {_version()}")
    sub = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")
    for noun in NOUNS:
        importlib.import_module(f"gateway.cli.{noun}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `ztgate ... --help | head`
        return _quiet_closed_pipe()
    configure_logging(args.verbose)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()
    except UsageError as exc:
        print(f"ztgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _quiet_closed_pipe()
    return rc
