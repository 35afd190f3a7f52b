"""`ztgate verify`: check receipts offline against the auditor's trust file.

Exit codes: 0 valid, 1 invalid, 2 usage (bad arguments, unreadable input or trust file),
3 pending (signed, but not yet in a signed checkpoint). No network is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
    p.add_argument("--salts", type=Path, metavar="FILE",
                   help="a client's salts and tensors, to check commitments")  # fmt: skip
    p.add_argument("--allow-dev-srs", action="store_true",
                   help="DANGER: accept zk proofs made under a locally generated SRS "
                   "(forgeable; for a dev cluster only)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--now", metavar="ISO", help="judge key retirement as of this time")
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

    try:
        trust = TrustPolicy.load(args.trust)
        salts = load_salts(args.salts) if args.salts else None
        now = parse_time(args.now) if args.now else dt.datetime.now(dt.UTC)
        if not args.target.exists():
            raise UsageError(f"{args.target} does not exist")
        report = verify_path(
            args.target, trust, args.require_witness, salts, now, args.witness_quorum
        )
    except (TrustError, BundleError) as exc:
        raise UsageError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read input: {exc}") from exc
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.render())
    return report.exit_code
