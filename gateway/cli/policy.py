"""`ztgate policy ...`: check, test, explain and diff Cedar policy (for security officers).

Exit codes: 0 all good, 1 the policies (or their tests) have problems, 2 bad usage;
`explain` exits 2 on a deny (as `cedar authorize` does) and `diff` 3 when an edit widens
access (so a CI gate can ask for a second review).
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from cedarpy import policies_to_json_str

from gateway.cli import UsageError
from gateway.files import atomic_write
from gateway.policy.engine import InferDecision
from gateway.policy.facts import ADMIN_ACTIONS, MODES
from gateway.policy.golden import (
    RequestFormatError,
    load_request,
    run_goldens,
    run_request,
)
from gateway.policy.source import (
    IDENTITIES_FILE,
    SCHEMA_FILE,
    PolicyError,
    PolicyInfo,
    PolicySource,
    load_policy_dir,
    named_actions,
    unmarked_removals,
)

DEFAULT_DIR = Path("policies")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="check, test and explain Cedar policy")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check", help="find mistakes in a policy directory (file:line)")
    check.add_argument("dir", type=Path, metavar="DIR")
    check.add_argument(
        "--registry", type=Path, help="model registry: model ids a rule names must be in it"
    )
    check.add_argument(
        "--nodes", type=Path, help="TOML with [[nodes]]: regions a rule names must be among them"
    )
    check.set_defaults(func=_check)

    test = verbs.add_parser("test", help="run the ALLOW/DENY example requests; show coverage")
    test.add_argument("dir", type=Path, metavar="DIR")
    test.set_defaults(func=_test)

    explain = verbs.add_parser("explain", help="decide one request and say why")
    explain.add_argument("request", type=Path, metavar="REQUEST.json")
    explain.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: policies")
    explain.set_defaults(func=_explain)

    diff = verbs.add_parser(
        "diff", help="what an edit changes: every class of request newly allowed or denied"
    )
    diff.add_argument("old", type=Path, metavar="OLD", help="the policy in force (dir or bundle)")
    diff.add_argument("new", type=Path, metavar="NEW", help="the edited policy (dir or bundle)")
    diff.add_argument("--json", action="store_true", help="one JSON document, for tools")
    diff.set_defaults(func=_diff)

    push = verbs.add_parser(
        "push", help="load a signed bundle into a running gateway (/admin/reload, officer mTLS)"
    )
    push.add_argument("bundle", type=Path, metavar="BUNDLE")
    push.add_argument("--gateway", required=True, metavar="HOST:PORT")
    push.add_argument("--cert", type=Path, required=True, help="your (officer's) certificate")
    push.add_argument("--key", type=Path, required=True, help="its key")
    push.add_argument("--ca", type=Path, required=True, help="CA of the gateway's certificate")
    push.add_argument("--timeout", type=float, default=30.0)
    push.set_defaults(func=_push)

    _register_bundle(verbs)


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
    from gateway.policy.lint import known_from_examples, lint

    source = _load(args.dir)
    if source is None:
        return 1
    known = known_from_examples(source)
    if args.registry is not None:
        from gateway.registry import Registry, RegistryError

        try:
            known.models.update(e.name for e in Registry.open(args.registry).entries())
        except RegistryError as exc:
            raise UsageError(f"{args.registry}: {exc}") from None
    if args.nodes is not None:
        known.regions.update(n.region for n in _read_nodes(args.nodes)[0])
    findings = lint(source, known)
    if findings:
        for finding in findings:
            print(f"{args.dir}/{finding}")
        n = len(findings)
        print(
            f"\n{n} problem{'s' if n != 1 else ''} found (the policy loads, but these never match)."
        )
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
    return 0 if outcome.allowed else 2  # as `cedar authorize`: 2 is a deny


def _load_any(path: Path) -> tuple[PolicySource, Any] | None:
    """A policy directory, or a bundle file (its content; signatures are not checked
    here: `bundle verify` does that). None after printing the findings."""
    if path.is_dir():
        source = _load(path)
        return None if source is None else (source, None)
    from gateway.policy.bundle import BundleFormatError, open_unverified

    try:
        bundle = open_unverified(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (BundleFormatError, ValueError) as exc:
        raise UsageError(f"{path} is neither a policy directory nor a bundle: {exc}") from None
    try:
        return bundle.policy_source(), bundle
    except PolicyError as exc:
        for finding in exc.findings:
            print(f"{path}: {finding}")
        return None


def policy_diff(
    old: PolicySource, new: PolicySource, old_bundle: Any = None, new_bundle: Any = None
) -> dict[str, Any]:
    """What NEW changes against OLD: rule by rule, fact by fact, and every class of
    request whose decision changes (gateway/policy/semantic.py). JSON-able."""
    from gateway.policy.semantic import semantic_diff

    before = {p.id: p for p in old.policies}
    after = {p.id: p for p in new.policies}
    markers = new.removal_markers()
    unmarked = [p.id for p in unmarked_removals(old, new)]  # in file order
    lines: list[str] = []
    for p in old.policies:
        if p.id in after:
            continue
        line = f"- {p.effect} {p.id} ({p.file}:{p.line})"
        if p.id in unmarked:
            line += f'  NOT MARKED: a reload refuses this; add @removes("{p.id}") to confirm'
        elif p.id in markers:
            m = markers[p.id]
            line += f"  marked by @removes on {m.id} ({m.file}:{m.line})"
        lines.append(line)
    for p in new.policies:
        was = before.get(p.id)
        if was is not None and was.text == p.text and was.effect == p.effect:
            continue
        lines.append(f"{'~' if was else '+'} {p.effect} {p.id} ({p.file}:{p.line}){_grants(p)}")
        if was is not None:
            body = difflib.unified_diff(was.text.split("\n"), p.text.split("\n"), lineterm="")
            lines += [f"    {d}" for d in list(body)[2:]]  # skip the ---/+++ header
    if old.schema_text != new.schema_text:
        lines.append(f"~ {SCHEMA_FILE} changed")
    if old.identities.canonical() != new.identities.canonical():
        lines.append(f"~ {IDENTITIES_FILE} changed")
    facts, facts_widen = _fact_changes(old_bundle, new_bundle)
    sem = semantic_diff(old, new)
    return {
        "old_hash": old.hash,
        "new_hash": new.hash,
        "rules": lines,
        "unmarked_removals": unmarked,
        "facts": facts,
        "newly_allowed": [c.to_json() for c in sem.newly_allowed],
        "newly_denied": [c.to_json() for c in sem.newly_denied],
        "unanalysed": sem.unanalysed,
        "complete": sem.complete,
        "widens": sem.widens or facts_widen,
        "seconds": round(sem.seconds, 3),
    }


_SHOWN = 25  # classes listed per direction; --json has them all


def _diff(args: argparse.Namespace) -> int:
    """Rule by rule (by @id) and request class by request class, what NEW changes against
    OLD. Exit 1 when a reload of NEW over OLD would be refused for dropping a forbid
    without a @removes marker, else 3 when NEW allows anything OLD denied, else 0."""
    old, new = _load_any(args.old), _load_any(args.new)
    if old is None or new is None:
        return 1
    report = policy_diff(old[0], new[0], old[1], new[1])
    if args.json:
        print(json.dumps({"old": str(args.old), "new": str(args.new), **report}, indent=2))
    else:
        _print_diff(report, f"{args.old} -> {args.new}")
    if report["unmarked_removals"]:
        return 1
    return 3 if report["widens"] else 0


def _print_diff(report: dict[str, Any], title: str) -> None:
    print(f"policy diff {title}")
    listed = report["rules"] + report["facts"]
    print("\n".join(listed) if listed else "no rule changed")
    print(f"policy set hash {report['old_hash']} -> {report['new_hash']}")
    for key, label in (("newly_allowed", "NEWLY ALLOWED"), ("newly_denied", "newly denied")):
        changes = report[key]
        if not changes:
            continue
        print(f"\n{label} ({len(changes)} class{'es' if len(changes) != 1 else ''} of request):")
        for c in changes[:_SHOWN]:
            print(f"  {'+' if key == 'newly_allowed' else '-'} {c['text']}")
        if len(changes) > _SHOWN:
            print(f"  ... and {len(changes) - _SHOWN} more (--json lists them all)")
    for item in report["unanalysed"]:
        print(f"\nNOT ANALYSED (review by hand; counted as widening): {item}")
    if not report["complete"]:
        print("\nthe search was cut short: counted as widening; review by hand")
    if report["unmarked_removals"]:
        ids = ", ".join(report["unmarked_removals"])
        print(f"\na reload refuses this: forbid rule(s) dropped unmarked: {ids}")
    elif report["widens"]:
        print("\nthis edit WIDENS access: have a second officer review it")
    elif not report["newly_denied"]:
        print("\nno decision changes")


def _fact_changes(old: Any, new: Any) -> tuple[list[str], bool]:
    """Signed facts that differ between two bundles, and whether any loosens: a model or
    node added, a classification lowered, a residency entry or mode added, an owner
    changed, trust raised, a node's region, provider or certificate changed."""
    if old is None or new is None:
        return [], False
    from gateway.policy.facts import CLASSIFICATIONS

    def rank(c: str) -> int:
        return CLASSIFICATIONS.index(c) if c in CLASSIFICATIONS else len(CLASSIFICATIONS)

    out: list[str] = []
    widen = False
    before = {m.name: m for m in old.facts.models}
    after = {m.name: m for m in new.facts.models}
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if b is None:
            out.append(f"- model {name} (facts)")
            continue
        if a is None:
            out.append(f"+ model {name}: {b.classification}, modes {','.join(b.allowed_modes)}")
            widen = True
            continue
        if a.classification != b.classification:
            widen |= rank(b.classification) < rank(a.classification)
            out.append(f"~ model {name}: classification {a.classification} -> {b.classification}")
        for attr in ("residency", "allowed_modes"):
            gained = sorted(set(getattr(b, attr)) - set(getattr(a, attr)))
            lost = sorted(set(getattr(a, attr)) - set(getattr(b, attr)))
            if gained:
                widen = True
                out.append(f"~ model {name}: {attr} gains {', '.join(gained)}")
            if lost:
                out.append(f"~ model {name}: {attr} loses {', '.join(lost)}")
        if a.owner != b.owner:
            widen = True
            out.append(f"~ model {name}: owner {a.owner or '-'} -> {b.owner or '-'}")
    nb = {n.name: n for n in old.facts.nodes}
    na = {n.name: n for n in new.facts.nodes}
    for name in sorted(set(nb) | set(na)):
        x, y = nb.get(name), na.get(name)
        if y is None:
            out.append(f"- node {name} (facts)")
        elif x is None:
            widen = True
            out.append(f"+ node {name}: region {y.region}, provider {y.provider}, trust {y.trust}")
        else:
            for attr in ("region", "provider", "trust", "dns_name", "spiffe_id"):
                u, v = getattr(x, attr), getattr(y, attr)
                if u != v:
                    widen |= attr != "trust" or v > u
                    out.append(f"~ node {name}: {attr} {u} -> {v}")
    return out, widen


def _grants(info: PolicyInfo) -> str:
    """For a permit naming admin actions: say so, they are what an officer must notice."""
    if info.effect != "permit":
        return ""
    body = next(iter(json.loads(policies_to_json_str(info.text))["staticPolicies"].values()))
    admin = sorted((named_actions(body["action"]) or frozenset()) & set(ADMIN_ACTIONS))
    return f"  grants {', '.join(admin)}" if admin else ""


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


# --------------------------------------------------------------------------- bundle sign/verify
# Signed policy bundles (gateway/policy/bundle.py): the policy plus the facts it decides on,
# under an officer's key. Imports are local so this block stands on its own.


def _register_bundle(verbs: Any) -> None:
    import gateway

    parser = verbs.add_parser("bundle", help="sign or verify a policy bundle (officer key)")
    sub = parser.add_subparsers(dest="bundle_verb", required=True, metavar="VERB")

    sign = sub.add_parser(
        "sign",
        help="pack policy and the facts it decides on, run the goldens, diff, sign; or "
        "--cosign: add your signature to a signed bundle (two-person rule)",
    )
    sign.add_argument(
        "--cosign",
        type=Path,
        metavar="BUNDLE",
        help="add one signature (--key) to this signed bundle, after showing its recorded "
        "review and running its goldens; written back in place unless --out is given",
    )
    sign.add_argument("--policies", type=Path, default=DEFAULT_DIR, help="default: policies")
    sign.add_argument("--registry", type=Path, help="model registry directory")
    sign.add_argument("--nodes", type=Path, help="TOML with [[nodes]] (e.g. gateway.toml)")
    sign.add_argument(
        "--current",
        type=Path,
        metavar="BUNDLE",
        help="the bundle in force, to diff against (default: --out, if it exists)",
    )
    sign.add_argument(
        "--model-policy",
        type=Path,
        help='JSON {"MODEL": {"owner": SPIFFE_ID, "residency": [...]}} (default: the '
        "[policy.models.MODEL] tables of --nodes); a model not named runs nowhere",
    )
    sign.add_argument(
        "--node-cert",
        action="append",
        default=[],
        metavar="NAME=CERT.pem",
        help="a node's certificate: its SPIFFE ID and DNS SAN become the node's signed "
        "identity (must match any dns_name/spiffe_id in --nodes); repeat per node",
    )
    sign.add_argument("--key", type=Path, required=True, help="officer Ed25519 key (PEM)")
    sign.add_argument("--version", type=int, help="bundle version (>= 1)")
    sign.add_argument("--expires-in-days", type=float, default=30.0)
    sign.add_argument("--min-gateway-version", default=gateway.__version__)
    sign.add_argument("--staleness-budget-s", type=int, default=300)
    sign.add_argument("--out", type=Path, metavar="BUNDLE")
    sign.set_defaults(func=_bundle_sign)

    verify = sub.add_parser("verify", help="check a bundle's signature, dates and content")
    verify.add_argument("bundle", type=Path, metavar="BUNDLE")
    verify.add_argument(
        "--trust-key",
        type=Path,
        action="append",
        required=True,
        metavar="PUB",
        help="officer public key (PEM); repeat for several",
    )
    verify.add_argument("--min-version", type=int, default=0, help="refuse older bundles")
    verify.add_argument(
        "--required",
        type=int,
        default=1,
        metavar="K",
        help="distinct --trust-key signatures required (policy.signatures_required)",
    )
    verify.add_argument(
        "--gateway-version",
        default=gateway.__version__,
        help="the gateway version to check min_gateway_version against (default: this one)",
    )
    verify.set_defaults(func=_bundle_verify)


def _read_nodes(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """[[nodes]] from a TOML file (gateway.toml format) as NodeConfig (only name, region,
    provider and trust matter here, so the connection keys may be left out), and its
    [policy.models.NAME] tables (owner, residency) if it has any."""
    import dataclasses
    import tomllib

    from gateway.config import NodeConfig

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    tables = raw.get("nodes", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{path}: [[nodes]] must be an array of tables")
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    nodes = []
    for i, table in enumerate(tables):
        where = f"{path}: nodes[{i}]"
        for key in ("name", "region", "provider"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise UsageError(f"{where}.{key} is required (a string)")
        labels = table.get("labels", {})
        if not isinstance(labels, dict):
            raise UsageError(f"{where}.labels must be a table")
        kwargs: dict[str, Any] = {k: "" for k in ("address", "dns_name", "spiffe_id")}
        kwargs.update({k: v for k, v in table.items() if k in known and k != "labels"})
        kwargs["models"] = tuple(kwargs.get("models", ()))
        pairs = {str(k): str(v) for k, v in labels.items()}
        if "trust" in table:
            trust = table["trust"]
            if isinstance(trust, bool) or not isinstance(trust, int):
                raise UsageError(f"{where}.trust must be 0, 1 or 2")
            if "trust" not in known:
                pairs["trust"] = str(trust)
        kwargs["labels"] = tuple(sorted(pairs.items()))
        nodes.append(NodeConfig(**kwargs))
    policy = raw.get("policy", {})
    models = policy.get("models", {}) if isinstance(policy, dict) else None
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise UsageError(f"{path}: [policy.models.NAME] must be tables of owner, residency")
    return nodes, models


def _bundle_sign(args: argparse.Namespace) -> int:
    import datetime as dt

    from gateway.pki import PKIError, load_signing_key
    from gateway.policy.bundle import build_bundle, facts_from, sign_bundle
    from gateway.registry import INDEX_FILE, Registry, RegistryError

    if args.cosign is not None:
        return _bundle_cosign(args)
    for name in ("registry", "nodes", "version", "out"):
        if getattr(args, name) is None:
            raise UsageError(f"bundle sign needs --{name} (or --cosign BUNDLE)")
    if not args.policies.is_dir():
        raise UsageError(f"{args.policies} is not a directory")
    if not (args.registry / INDEX_FILE).is_file():
        raise UsageError(f"{args.registry} is not a model registry (no {INDEX_FILE})")
    try:
        key = load_signing_key(args.key)
    except (OSError, ValueError, TypeError, PKIError) as exc:
        raise UsageError(f"{args.key}: not an Ed25519 private key ({exc})") from None
    nodes, model_policy = _read_nodes(args.nodes)
    if args.model_policy is not None:
        try:
            model_policy = json.loads(args.model_policy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"{args.model_policy}: {exc}") from None
        if not isinstance(model_policy, dict) or not all(
            isinstance(v, dict) for v in model_policy.values()
        ):
            raise UsageError(f"{args.model_policy}: expected {{MODEL: {{owner, residency}}}}")
    certificates: dict[str, bytes] = {}
    for item in args.node_cert:
        name, sep, cert_path = item.partition("=")
        if not sep or not name or not cert_path:
            raise UsageError(f"--node-cert {item!r}: expected NAME=CERT.pem")
        try:
            certificates[name] = Path(cert_path).read_bytes()
        except OSError as exc:
            raise UsageError(f"--node-cert {name}: cannot read {cert_path}: {exc}") from None
    try:
        entries = Registry.open(args.registry).entries()
        facts = facts_from(entries, nodes, model_policy, certificates=certificates)
    except (RegistryError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    source = _load(args.policies)
    if source is None:
        return 1
    review = _review(source, args)
    if review is None:
        return 1
    try:
        bundle = build_bundle(
            args.policies,
            facts,
            args.version,
            dt.timedelta(days=args.expires_in_days),
            args.min_gateway_version,
            args.staleness_budget_s,
            review=review,
        )
    except PolicyError as exc:  # changed since _load checked it
        for finding in exc.findings:
            print(f"{args.policies}/{finding}")
        return 1
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data = sign_bundle(bundle, key)
    try:
        args.out.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc}") from None
    for m in bundle.facts.models:
        if not m.residency:
            print(f"warning: model {m.name} has no residency: it will run nowhere")
    print(f"signed policy bundle v{bundle.version} -> {args.out}")
    _bundle_summary(bundle, bundle.policy_hash)
    return 0


def _review(source: PolicySource, args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the goldens (refuse a failing set: None) and diff against the bundle in force;
    what the officer saw, recorded in the signed bundle (`review`)."""
    report = run_goldens(source)
    failed = [c for c in report.cases if not c.ok]
    if not report.cases or failed or report.uncovered:
        for c in failed:
            print(f"FAIL {c.file}: {c.problem}")
        if not report.cases:
            print(f"no example requests under {args.policies}/tests: write some first")
        if report.uncovered:
            print(f"never decided any example: {', '.join(report.uncovered)}")
        print("refused: the example requests must all pass (ztgate policy test) before signing")
        return None
    review: dict[str, Any] = {
        "goldens": {"passed": len(report.cases), "failed": 0},
        "diff_against": None,
    }
    current = args.current or (args.out if args.out is not None and args.out.is_file() else None)
    if current is not None:
        loaded = _load_any(current)
        if loaded is None:
            return None
        old_source, old_bundle = loaded
        diff = policy_diff(old_source, source, old_bundle, None)
        _print_diff(diff, f"{current} -> {args.policies}")
        review["diff_against"] = {
            "bundle": current.name,
            "version": getattr(old_bundle, "version", None),
            "policy_hash": old_source.hash,
            "widens": diff["widens"],
            "rules": diff["rules"],
            "newly_allowed": [c["text"] for c in diff["newly_allowed"]],
            "newly_denied": [c["text"] for c in diff["newly_denied"]],
        }
        if diff["unmarked_removals"]:
            print("refused: the gateway would refuse this bundle (unmarked forbid removal)")
            return None
        print()
    print(f"goldens: {len(report.cases)} passed")
    return review


def _bundle_cosign(args: argparse.Namespace) -> int:
    """The second officer: see what the first one signed, rerun its goldens, add a signature."""
    from gateway.pki import PKIError, load_signing_key
    from gateway.policy.bundle import BundleFormatError, add_signature, open_unverified

    try:
        key = load_signing_key(args.key)
    except (OSError, ValueError, TypeError, PKIError) as exc:
        raise UsageError(f"{args.key}: not an Ed25519 private key ({exc})") from None
    try:
        data = args.cosign.read_bytes()
        bundle = open_unverified(data)
    except OSError as exc:
        raise UsageError(f"cannot read {args.cosign}: {exc.strerror or exc}") from None
    except (BundleFormatError, ValueError) as exc:
        raise UsageError(f"{args.cosign} is not a policy bundle: {exc}") from None
    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ztgate-cosign-") as tmp:
            source = bundle.policy_source(Path(tmp) / "policy")
            # A bundle carries no example requests: run the officer's own (--policies)
            # against the policy the bundle holds.
            if (args.policies / "tests").is_dir():
                import shutil

                shutil.copytree(args.policies / "tests", Path(tmp) / "policy" / "tests")
            report = run_goldens(source)
    except PolicyError as exc:
        for finding in exc.findings:
            print(f"{args.cosign}: {finding}")
        return 1
    review = bundle.review or {}
    diff = review.get("diff_against") or {}
    print(f"bundle v{bundle.version}, policy hash {bundle.policy_hash}")
    print(f"already signed by: {', '.join(bundle.signers) or 'nobody'}")
    if diff:
        print(f"recorded diff against v{diff.get('version')} ({diff.get('policy_hash')}):")
        for line in diff.get("rules", []):
            print(f"  {line}")
        for text in diff.get("newly_allowed", []):
            print(f"  + {text}")
        for text in diff.get("newly_denied", []):
            print(f"  - {text}")
        if diff.get("widens"):
            print("  this edit WIDENS access")
    else:
        print("no diff recorded (a first bundle, or signed without --current)")
    failed = [c for c in report.cases if not c.ok]
    if failed or not report.cases:
        for c in failed:
            print(f"FAIL {c.file}: {c.problem}")
        print(
            f"refused: the example requests under {args.policies}/tests must exist and all "
            "pass against the bundle's policy"
        )
        return 1
    try:
        out = add_signature(data, key)
    except (BundleFormatError, ValueError) as exc:
        print(f"refused: {exc}")
        return 1
    target = args.out or args.cosign
    try:
        atomic_write(target, out, mode=None)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc}") from None
    print(f"goldens: {len(report.cases)} passed; signature added -> {target}")
    return 0


def _push(args: argparse.Namespace) -> int:
    """POST a signed bundle to /admin/reload over mTLS with the officer's certificate."""
    from gateway.cli.admin import admin_request, body_of

    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.bundle}: {exc.strerror or exc}") from None
    r = admin_request(
        args, "POST", "/admin/reload", content=data, headers={"content-type": "application/json"}
    )
    if r is None:
        print(f"push: gateway {args.gateway} unreachable")
        return 1
    body = body_of(r)
    if r.status_code != 200:
        kind = str(body.get("type", "")).rsplit("/", 1)[-1] or str(r.status_code)
        print(f"push REFUSED ({r.status_code} {kind}): {body.get('detail', '')}")
        return 1
    print(
        f"pushed: the gateway now runs {body.get('origin')} "
        f"(version {body.get('version')}, hash {body.get('hash')})"
    )
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    import datetime as dt

    from gateway.policy.bundle import compare_versions, load_trusted_keys, verify_bundle

    try:
        keys = load_trusted_keys(args.trust_key)
        compare_versions(args.gateway_version, args.gateway_version)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.bundle}: {exc.strerror or exc}") from None
    result = verify_bundle(
        data,
        keys,
        now=dt.datetime.now(dt.UTC),
        running_version=args.gateway_version,
        min_version=args.min_version,
        required=args.required,
    )
    if not result.ok or result.bundle is None or result.source is None:
        print(f"INVALID ({result.reason}): {result.message}")
        return 1
    signers = ", ".join(result.bundle.signers)
    print(
        f"OK: policy bundle v{result.bundle.version} signed by {signers} "
        f"({len(result.bundle.signers)} of {args.required} required)"
    )
    _bundle_summary(result.bundle, result.source.hash)
    return 0


def _bundle_summary(bundle: Any, policy_hash: str) -> None:
    print(f"  version:             {bundle.version}")
    if bundle.signers:
        print(f"  signers:             {', '.join(bundle.signers)}")
    diff = (bundle.review or {}).get("diff_against")
    if diff:
        print(
            f"  reviewed against:    v{diff.get('version')} "
            f"({'WIDENS access' if diff.get('widens') else 'no widening'})"
        )
    print(f"  created:             {bundle.created.isoformat()}")
    print(f"  expires:             {bundle.expires.isoformat()}")
    print(f"  min gateway version: {bundle.min_gateway_version}")
    print(f"  staleness budget:    {bundle.staleness_budget_s} s")
    print(f"  policy hash:         {policy_hash}")
    print(f"  policy files:        {', '.join(sorted(bundle.policy_files))}")
    print(f"  models ({len(bundle.facts.models)}):")
    for m in bundle.facts.models:
        print(
            f"    {m.name}: {m.classification}, modes {','.join(m.allowed_modes)}, "
            f"residency {','.join(m.residency) or '(none)'}, owner {m.owner or '-'}"
        )
    print(f"  nodes ({len(bundle.facts.nodes)}):")
    for n in bundle.facts.nodes:
        print(f"    {n.name}: region {n.region}, provider {n.provider}, trust {n.trust}")
        print(f"      certificate: {n.spiffe_id}, DNS {n.dns_name} (pinned)")
