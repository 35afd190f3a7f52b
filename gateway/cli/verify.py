"""`ztgate verify`: check receipts offline against the auditor's trust file.

Exit codes: 0 valid, 1 invalid, 2 usage (bad arguments, unreadable input or trust file),
3 pending (signed, but not yet in a signed checkpoint, or not yet witnessed: in no
checkpoint cosigned as the witness policy requires, while an earlier one of its log is,
cosigned within `--witness-grace` of the check; past it, invalid). No network is used.

The report (`--format text|md|html|json`, to stdout or `--output`) is written after the
checks; whatever a library prints or logs while they run goes to stderr (third-party
loggers are silenced unless `-v`), so it never lands in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.cli import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="verify an audit bundle or a receipt offline (exit 0 valid, 1 invalid, "
        "2 usage, 3 pending)",
    )
    p.add_argument("target", type=Path, metavar="BUNDLE_OR_RECEIPT",
                   help="bundle directory, bundle .tar, or a receipt .json (with its "
                   ".tlog-proof beside it)")  # fmt: skip
    p.add_argument("--trust", type=Path, required=True, metavar="TRUST_FILE",
                   help="the auditor's trust file: the only source of keys")  # fmt: skip
    p.add_argument("--require-witness", action="append", default=[], metavar="NAME",
                   help="require a valid cosignature from this witness (repeatable)")  # fmt: skip
    p.add_argument("--witness-quorum", type=int, metavar="K",
                   help="require valid cosignatures from at least K of the trust file's "
                   "witnesses (default: the trust file's witness_policy.quorum)")  # fmt: skip
    p.add_argument("--witness-grace", default="24h", metavar="DURATION",
                   help="how long after its log's last witnessed checkpoint a receipt may "
                   "be pending on the witness (not-yet-witnessed) before it is invalid "
                   "(missing-cosignature): seconds, or with s/m/h/d (default 24h)")  # fmt: skip
    p.add_argument("--salts", type=Path, metavar="FILE",
                   help="a client's salts and tensors, to check commitments")  # fmt: skip
    p.add_argument("--allow-dev-srs", action="store_true",
                   help="DANGER: accept zk proofs made under a locally generated SRS "
                   "(forgeable; for a dev cluster only)")  # fmt: skip
    p.add_argument("--format", choices=("text", "md", "html", "json"), default="text",
                   help="text (default); md, html: a report to file; json")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable report (--format json)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the report to FILE instead of stdout")  # fmt: skip
    p.add_argument("--now", metavar="ISO", help="judge key retirement as of this time")
    p.add_argument("--held", action="append", default=[], type=Path, metavar="RECEIPT",
                   help="a receipt a client holds: flagged unless the bundle's log holds "
                   "it at its index (an edge's log rewritten after reconciliation; "
                   "repeatable; bundles only)")  # fmt: skip
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from gateway.receipts.bundle import BundleError
    from gateway.receipts.signing import parse_time
    from gateway.receipts.verify import (
        TrustError,
        TrustPolicy,
        load_salts,
        register_proof_verifier,
        verify_path,
    )

    try:  # zk receipts' proofs are re-verified when ezkl is installed
        from zk.offline import verify_zk_evidence

        allow = bool(args.allow_dev_srs)
        register_proof_verifier("zk", lambda r, ev: verify_zk_evidence(r, ev, allow_dev_srs=allow))
    except ImportError:
        pass

    from gateway.receipts.report import FORMATS

    fmt = "json" if args.json else args.format
    try:
        trust = TrustPolicy.load(args.trust)
        salts = load_salts(args.salts) if args.salts else None
        now = parse_time(args.now) if args.now else dt.datetime.now(dt.UTC)
        grace = _duration(args.witness_grace)
        if not args.target.exists():
            raise UsageError(f"{args.target} does not exist")
        with _checks_write_nothing_to_stdout(verbose=bool(getattr(args, "verbose", False))):
            report = verify_path(
                args.target, trust, args.require_witness, salts, now, args.witness_quorum, grace
            )
            if args.held:
                from gateway.receipts.bundle import BundleReader
                from gateway.receipts.held import check_held

                if args.target.is_file() and not tarfile.is_tarfile(args.target):
                    raise UsageError("--held checks receipts against a bundle, not a receipt")
                check_held(BundleReader(args.target), args.held, trust, report)
    except (TrustError, BundleError) as exc:
        raise UsageError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read input: {exc}") from exc
    report.scope["allow_dev_srs"] = bool(args.allow_dev_srs)
    text = json.dumps(report.to_json(), indent=2) if fmt == "json" else FORMATS[fmt](report)
    if args.output is not None:
        try:
            args.output.write_text(text if text.endswith("\n") else text + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc}") from exc
        print(f"{report.status.upper()}: report written to {args.output}", file=sys.stderr)
    else:
        print(text)
    return report.exit_code


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> dt.timedelta:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    try:
        if m is None:
            raise ValueError("a duration is seconds, or with s/m/h/d")
        return dt.timedelta(seconds=float(m[1]) * _UNITS[m[2]])
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"--witness-grace {text!r}: {exc}") from None


class _OwnLogsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] in ("gateway", "zk")


@contextlib.contextmanager
def _checks_write_nothing_to_stdout(verbose: bool) -> Iterator[None]:
    """While the checks run, stdout (Python's and file descriptor 1, which native code such
    as ezkl writes to) points at stderr, and records of loggers outside gateway/zk are
    dropped unless `verbose`: the report, written afterwards, holds nothing else."""
    handlers = [] if verbose else list(logging.getLogger().handlers)
    only_ours = _OwnLogsOnly()
    for h in handlers:
        h.addFilter(only_ours)
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        for h in handlers:
            h.removeFilter(only_ours)
