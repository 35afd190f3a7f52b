"""`ztgate policy ...`: check, test and explain Cedar policy (written for security officers).

Exit codes: 0 all good, 1 the policies (or their tests) have problems, 2 bad usage.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli import UsageError
from gateway.policy.engine import InferDecision
from gateway.policy.facts import MODES
from gateway.policy.golden import (
    RequestFormatError,
    load_request,
    run_goldens,
    run_request,
)
from gateway.policy.source import PolicyError, PolicySource, load_policy_dir

DEFAULT_DIR = Path("policies")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="check, test and explain Cedar policy")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check", help="find mistakes in a policy directory (file:line)")
    check.add_argument("dir", type=Path, metavar="DIR")
    check.set_defaults(func=_check)

    test = verbs.add_parser("test", help="run the ALLOW/DENY example requests; show coverage")
    test.add_argument("dir", type=Path, metavar="DIR")
    test.set_defaults(func=_test)

    explain = verbs.add_parser("explain", help="decide one request and say why")
    explain.add_argument("request", type=Path, metavar="REQUEST.json")
    explain.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: policies")
    explain.set_defaults(func=_explain)


def _load(directory: Path) -> PolicySource | None:
    """The source, or None after printing every finding (the caller exits 1)."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    try:
        return load_policy_dir(directory)
    except PolicyError as exc:
        for finding in exc.findings:
            print(f"{directory}/{finding}")
        n = len(exc.findings)
        print(f"\n{n} problem{'s' if n != 1 else ''} found; nothing was loaded.")
        return None


def _check(args: argparse.Namespace) -> int:
    source = _load(args.dir)
    if source is None:
        return 1
    permits = sum(p.effect == "permit" for p in source.policies)
    print(
        f"OK: {len(source.policies)} policies ({permits} permit, "
        f"{len(source.policies) - permits} forbid) in {len(source.files)} files"
    )
    print(f"policy set hash {source.hash}")
    return 0


def _test(args: argparse.Namespace) -> int:
    source = _load(args.dir)
    if source is None:
        return 1
    report = run_goldens(source)
    if not report.cases:
        print(f"no example requests under {args.dir}/tests/ALLOW or {args.dir}/tests/DENY")
        return 1
    for case in report.cases:
        status = "ok  " if case.ok else "FAIL"
        print(f"{status} {case.file}" + (f"\n     {case.problem}" if case.problem else ""))
    print("\ncoverage (which example requests each policy decided):")
    for info in source.policies:
        files = report.coverage.get(info.id, ())
        where = f"{info.file}:{info.line}"
        print(f"  {'ok  ' if files else 'NONE'} {info.id:<36} {where:<24} {len(files)}")
    failed = sum(not c.ok for c in report.cases)
    print(f"\n{len(report.cases) - failed} passed, {failed} failed", end="")
    if report.uncovered:
        print(f"; never decided any example: {', '.join(report.uncovered)}", end="")
    print()
    return 0 if report.ok else 1


def _explain(args: argparse.Namespace) -> int:
    try:
        request = load_request(args.request)
    except RequestFormatError as exc:
        raise UsageError(str(exc)) from None
    source = _load(args.dir)
    if source is None:
        return 1
    outcome = run_request(source, request)
    who = request.identity.spiffe_id
    if request.resource is not None:
        print(f"request:  {who} {request.action} {request.resource.type} {request.resource.id}")
    else:
        assert request.model is not None
        print(
            f"request:  {who} infer {request.model.name} "
            f"(mode {request.mode} on node {request.node})"
        )
    print(f"decision: {'ALLOW' if outcome.allowed else 'DENY'}")
    print(f"why:      {outcome.reason}")
    for pid in outcome.determining:
        info = source.policy(pid)
        if info is not None:
            print(f"          {pid} is at {source.directory}/{info.file}:{info.line}")
    for err in outcome.errors:
        print(f"error:    {err}")
    print(f"policies: {source.hash}")
    if isinstance(outcome.decision, InferDecision):
        _table(outcome.decision, [n.name for n in request.nodes])
    return 0


def _table(decision: InferDecision, nodes: list[str]) -> None:
    """Every mode x node the gateway weighed for this request, and what decided each."""
    print("\nall modes and nodes for this request:")
    rows = [["mode", *nodes]]
    for mode in MODES:
        row = [mode]
        for node in nodes:
            pair = decision.pairs.get((mode, node))
            if pair is None:
                row.append("-")
                continue
            verdict = "allow" if decision.node_allowed(mode, node) else "deny"
            if pair.errors:
                verdict = "deny (error)"
            elif pair.allowed and verdict == "deny":
                verdict = "deny (mode not offered)"
            row.append(f"{verdict} {','.join(pair.determining)}".strip())
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip())
    if decision.allowed:
        print(
            f"\nallowed modes (cheapest first): {', '.join(decision.modes)}; rate {decision.rate}"
        )
