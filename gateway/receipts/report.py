"""The verification report in words: text for a terminal, Markdown and HTML to file.

`build` turns a `gateway.receipts.verify.Report` into a `View`: a headline and a summary a
non-engineer reads first (what was checked, against which keys, with what result), the
warnings that must stand out (no witness required, evidence made under a development
SRS, a compact receipt whose inclusion was not checked), what is pending or was not
checked, then the details (keys, witness policy, logs and checkpoints, receipts by model,
mode and status, the problems found). The three renderers only lay the view out.

Every value in a report may come from the bundle, which the party being audited wrote:
the HTML escapes each one (`html.escape`) and carries a Content-Security-Policy of
``default-src 'none'`` (inline styles only: no script runs, nothing loads from outside);
Markdown escapes HTML and Markdown syntax; text and Markdown show control characters as
escapes, so a value cannot rewrite the terminal. Like the rest of the offline verifier,
this module imports no web framework.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.receipts.verify import Report

__all__ = [
    "CSP",
    "FORMATS",
    "Section",
    "View",
    "build",
    "render_html",
    "render_markdown",
    "render_text",
]

CSP = "default-src 'none'; style-src 'unsafe-inline'"
TITLE = "ztgate verification report"
# Findings that are valid but say something was not (or could not be) checked.
_LIMITS = {"no-inventory", "no-start-leaf", "signature-only"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Section:
    title: str
    headers: tuple[str, ...]
    rows: Sequence[Sequence[str]]
    note: str = ""


@dataclass
class View:
    status: str  # valid | invalid | pending
    headline: str
    summary: list[str]
    warnings: list[str]
    unchecked: list[str]  # pending, or not (or not yet) checked
    sections: list[Section] = field(default_factory=list)
    problems: Sequence[tuple[str, str, str, str]] = ()  # status, subject, code, reason
    counts: dict[str, int] = field(default_factory=dict)


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _receipt_status(report: Report) -> dict[str, str]:
    """Receipt id -> its final status (the worst of its findings)."""
    rank = {"valid": 0, "erased": 1, "pending": 2, "invalid": 3}
    out: dict[str, str] = {}
    for f in report.findings:
        if f.subject.startswith("receipt "):
            rid = f.subject[len("receipt ") :]
            if rank.get(f.status, 3) >= rank.get(out.get(rid, "valid"), 0):
                out[rid] = f.status
    return out


def build(report: Report) -> View:
    scope = report.scope
    kind = str(scope.get("input", "bundle"))
    status = report.status
    counts = report.counts()
    statuses = _receipt_status(report)
    erased = sum(1 for f in report.findings if f.status == "erased")
    by_status = Counter(statuses.values())
    problems = [
        (f.status, f.subject, f.code, f.reason)
        for f in report.findings
        if f.status != "valid" or f.code not in ("ok", "genesis")
    ]
    invalid = counts.get("invalid", 0)
    policy = scope.get("witness_policy") or {}
    required, quorum = list(policy.get("required", [])), int(policy.get("quorum", 0))
    summary_only = kind == "summary line"

    if summary_only and status == "valid":
        headline = "signature valid, inclusion unchecked"
    elif status == "valid":
        headline = (
            f"Everything checked out: {_n(by_status['valid'], 'receipt')} verified against "
            "the auditor's own keys"
        )
    elif status == "pending":
        # Not yet witnessed (verify.py) is told apart: a witness's cosignature still due.
        waiting = {f.subject for f in report.findings if f.code == "not-yet-witnessed"}
        said = [f"{_n(by_status['pending'] - len(waiting), 'receipt')} not yet in a signed "
                "checkpoint"] if by_status["pending"] > len(waiting) else []  # fmt: skip
        if waiting:
            said.append(f"{_n(len(waiting), 'receipt')} not yet witnessed (no checkpoint "
                        "including it cosigned as required yet)")  # fmt: skip
        headline = "Valid so far, not final: " + "; ".join(said)
    else:
        headline = f"Verification FAILED: {_n(invalid, 'problem')} found (see Problems)"

    what = {
        "summary line": "a compact receipt (the ztgate-receipt/v1 line of a response)",
        "receipt": "a single receipt with its inclusion proof",
        "bundle v1": "an audit bundle (format v1, without an inventory)",
        "bundle v2": "an audit bundle (format v2, with each log's inventory)",
    }.get(kind, kind)
    target = scope.get("target")
    summary = [f"What was checked: {what}" + (f", {target}." if target else ".")]
    kinds = Counter(str(r.get("kind")) for r in report.receipts.values())
    parts = [f"{by_status[s]} {s}" for s in ("valid", "pending", "invalid") if by_status[s]]
    if erased:
        parts.append(f"{erased} erased (body deleted; leaf and proofs kept)")
    summary.append(
        f"Receipts: {_n(len(statuses), 'receipt')}"
        + (f" ({', '.join(_n(v, k) for k, v in sorted(kinds.items()))})" if kinds else "")
        + (f": {', '.join(parts)}." if parts else ".")
    )
    source = scope.get("trust_file") or "the trust policy given"
    summary.append(
        f"Keys: only those of the auditor's trust file ({source}); keys shipped inside the "
        "bundle were ignored."
    )
    if summary_only:
        summary.append("Witnesses: not applicable (a compact receipt carries no checkpoint).")
    elif required or quorum:
        want = [f"every one of {', '.join(required)}"] if required else []
        if quorum:
            want.append(f"at least {quorum} of the {len(scope.get('witnesses', []))} trusted")
        summary.append(f"Witnesses: required, {' and '.join(want)}.")
    else:
        summary.append("Witnesses: none required.")
    times = sorted(str(r["time"]) for r in report.receipts.values() if r.get("time"))
    cp_times = sorted(c["time"] for log in report.logs for c in log.get("checkpoints", []))
    if times:
        line = f"Time range: receipts issued {times[0]} to {times[-1]} (the gateway's clock)"
        if cp_times:
            line += f"; checkpoints signed {cp_times[0]} to {cp_times[-1]}"
        summary.append(line + ".")
    salted = sum(1 for f in report.findings if f.details.get("client_salts") == "match")
    if scope.get("salts") is None:
        summary.append(
            "Client salts: not given, so inputs and outputs were not compared with the "
            "receipts' commitments."
        )
    else:
        bad = sum(1 for f in report.findings if f.code in ("commitment-mismatch", "bad-salts"))
        summary.append(
            f"Client salts: given for {_n(int(scope['salts']), 'receipt')}; "
            f"{salted} matched, {bad} did not."
        )

    warnings: list[str] = []
    if summary_only:
        warnings.append(
            "Only a compact receipt was given: its signature is valid, but whether the log "
            "holds it (inclusion) was not checked. Verify the full receipt or an audit bundle."
        )
    elif not (required or quorum):
        warnings.append(
            "No witness was required: the log's operator alone vouches for its checkpoints, "
            "so a log forked to show you another history would go unnoticed. Run again "
            "with --require-witness NAME or --witness-quorum K."
        )
    dev = sorted(rid for rid, r in report.receipts.items() if r.get("dev_srs"))
    dev_codes = sum(1 for f in report.findings if f.code == "dev-srs")
    if dev or dev_codes:
        warnings.append(
            f"{_n(max(len(dev), dev_codes), 'zk receipt')} name evidence made with a "
            "development SRS: whoever generated it can forge any proof, so those proofs "
            "prove nothing."
        )
    if kind == "bundle v1":
        warnings.append(
            "A v1 bundle: receipts or whole logs left out of it would go unnoticed. Ask for "
            "a v2 bundle."
        )

    unchecked: list[str] = []
    for f in report.findings:
        if f.status == "pending":
            unchecked.append(f"pending: {f.subject}: {f.reason or f.code}")
        elif f.status == "valid" and f.code in _LIMITS:
            unchecked.append(f"not checked: {f.subject}: {f.reason}")
    not_reverified = [
        f.subject for f in report.findings if f.details.get("proof_reverified") is False
    ]
    if not_reverified:
        unchecked.append(
            f"not checked: {_n(len(not_reverified), 'proof')} not re-verified (no verifier "
            "for the mode installed here); those receipts were checked as signed records"
        )
    if scope.get("salts") is None and not summary_only:
        unchecked.append("not checked: commitments to inputs and outputs (no client salts)")

    view = View(status, headline, summary, warnings, unchecked, problems=problems, counts=counts)
    view.sections = _details(report, statuses)
    return view


def _details(report: Report, statuses: dict[str, str]) -> list[Section]:
    scope = report.scope
    sections: list[Section] = []
    used = Counter(str(r.get("key_id")) for r in report.receipts.values())
    sections.append(
        Section(
            "Receipt keys (from the trust file)",
            ("key id", "valid from", "valid until", "receipts signed"),
            [
                (
                    str(k["key_id"]),
                    str(k["valid_from"]),
                    str(k["valid_until"] or "current"),
                    str(used.get(str(k["key_id"]), 0)),
                )
                for k in scope.get("receipt_keys", [])
            ],
            note=f"source: {scope.get('trust_file') or 'the trust policy given'}",
        )
    )
    sections.append(
        Section(
            "Log keys (from the trust file)",
            ("origin prefix", "expected logs", "key fingerprint"),
            [
                (str(k["origin_prefix"]), ", ".join(k["origins"]) or "-", str(k["fingerprint"]))
                for k in scope.get("log_keys", [])
            ],
        )
    )
    policy = scope.get("witness_policy") or {}
    sections.append(
        Section(
            "Witnesses",
            ("", ""),
            [
                ("trusted", ", ".join(scope.get("witnesses", [])) or "none"),
                ("required by name", ", ".join(policy.get("required", [])) or "none"),
                ("quorum", f"{policy.get('quorum', 0)} of {len(scope.get('witnesses', []))}"),
            ],
        )
    )
    rows = []
    for log in report.logs:
        inv = log.get("inventory")
        for c in log.get("checkpoints", []):
            rows.append(
                (
                    str(log["origin"]),
                    f"{inv[0]}..{inv[1]}" if inv else "not checked",
                    str(c["size"]),
                    str(c["time"]),
                    ", ".join(c["witnesses"]) or "none",
                )
            )
        if not log.get("checkpoints"):
            rows.append((str(log["origin"]), "-", "-", "-", "no checkpoint"))
    for f in report.findings:  # a single receipt: the checkpoint its proof names
        if not report.logs and "checkpoint_size" in f.details:
            rows.append(
                (
                    str(f.details.get("log_id", "")),
                    "-",
                    str(f.details["checkpoint_size"]),
                    str(f.details.get("checkpoint_time", "")),
                    ", ".join(f.details.get("witnesses", [])) or "not required",
                )
            )
    sections.append(
        Section(
            "Logs, checkpoints and cosigners",
            ("log", "inventory", "checkpoint size", "signed", "cosigned by"),
            rows,
        )
    )
    groups: Counter[tuple[str, str, str, str]] = Counter()
    for rid, st in statuses.items():
        r = report.receipts.get(rid)
        if r is None:
            groups[("(signature not verified)", "-", "-", st)] += 1
            continue
        model = f"{r['model']} {r['model_version']}" if r.get("model") else "-"
        groups[(model, str(r.get("mode") or "-"), str(r.get("kind")), st)] += 1
    sections.append(
        Section(
            "Receipts by model, mode and status",
            ("model", "mode", "kind", "status", "receipts"),
            [(*k, str(v)) for k, v in sorted(groups.items())],
        )
    )
    denials = Counter(
        (str(r["denial"]["type"]), str(r["denial"]["reason"]))
        for r in report.receipts.values()
        if r.get("denial")
    )
    if denials:
        sections.append(
            Section(
                "Denials",
                ("problem type", "reason", "receipts"),
                [(t, reason, str(n)) for (t, reason), n in sorted(denials.items())],
            )
        )
    sections.append(
        Section(
            "Scope",
            ("", ""),
            [
                ("checked at", str(scope.get("checked_at", ""))),
                ("proofs re-verified for modes", ", ".join(scope.get("proof_reverifiers", []))
                 or "none"),
                ("development SRS accepted", "yes" if scope.get("allow_dev_srs") else "no"),
            ],
        )
    )  # fmt: skip
    return sections


# --- text -------------------------------------------------------------------------------
def _plain(value: Any) -> str:
    """Control characters (and bidi overrides) as escapes: a value cannot move the cursor,
    recolour the terminal or reorder the line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def _columns(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str) -> list[str]:
    if headers and not any(headers):  # label: value
        return [f"{indent}{_plain(a)}: {_plain(b)}" for a, b in rows]
    table = [list(headers), *[[_plain(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in table
    ]


def render_text(report: Report) -> str:
    v = build(report)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(v.counts.items()))
    lines = [f"status: {v.status.upper()}  ({counts})", _plain(v.headline), ""]
    lines += [f"  {_plain(s)}" for s in v.summary]
    for w in v.warnings:
        lines.append(f"WARNING: {_plain(w)}")
    if v.unchecked:
        lines.append("Pending or not checked:")
        lines += [f"  - {_plain(u)}" for u in v.unchecked]
    for s in v.sections:
        lines += ["", f"{s.title}:"]
        if s.note:
            lines.append(f"  ({_plain(s.note)})")
        lines += _columns(s.headers, s.rows, "  ") if s.rows else ["  none"]
    lines += ["", "Findings:"]
    for status, subject, code, reason in v.problems:
        lines.append(f"  {status.upper():8} {_plain(subject)}: [{_plain(code)}] {_plain(reason)}")
    valid = v.counts.get("valid", 0)
    if valid:
        lines.append(f"  {valid} item(s) valid")
    return "\n".join(lines)


# --- Markdown ---------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def _md(value: Any) -> str:
    """HTML escaped (a Markdown viewer renders raw HTML), Markdown syntax backslashed."""
    text = html.escape(_plain(value), quote=True).replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", text)


def render_markdown(report: Report) -> str:
    v = build(report)
    out = [f"# {TITLE}", "", f"**Status: {v.status.upper()}**: {_md(v.headline)}", ""]
    out += [f"- {_md(s)}" for s in v.summary]
    if v.warnings:
        out += ["", "## Warnings", ""]
        out += [f"- **WARNING**: {_md(w)}" for w in v.warnings]
    if v.unchecked:
        out += ["", "## Pending or not checked", ""]
        out += [f"- {_md(u)}" for u in v.unchecked]
    out += ["", "## Problems", ""]
    if v.problems:
        out += ["| status | subject | code | reason |", "|---|---|---|---|"]
        out += [f"| {' | '.join(_md(c) for c in p)} |" for p in v.problems]
    else:
        out.append("None.")
    out += ["", "## Details"]
    for s in v.sections:
        out += ["", f"### {_md(s.title)}", ""]
        if s.note:
            out += [_md(s.note), ""]
        if not s.rows:
            out.append("None.")
            continue
        headers = s.headers if any(s.headers) else ("item", "value")
        out += [f"| {' | '.join(_md(h) for h in headers)} |", "|" + "---|" * len(headers)]
        out += [f"| {' | '.join(_md(c) for c in row)} |" for row in s.rows]
    return "\n".join(out) + "\n"


# --- HTML -------------------------------------------------------------------------------
_STYLE = """
body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#111}
.status{font-size:1.4em;padding:.6em 1em;border-radius:.3em}
.valid{background:#dff5e1}.pending{background:#fff4d6}.invalid{background:#fde2e1}
.warning{background:#fff0c2;border-left:.4em solid #d08a00;padding:.5em 1em;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:.2em .6em;text-align:left;vertical-align:top;
word-break:break-word}
th{background:#f0f0f0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "" if not any(headers) else "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head + '</tr>' if head else ''}{body}</table>"


def render_html(report: Report) -> str:
    """A self-contained page: no script, nothing loaded from outside (CSP), every value
    escaped. The summary comes first, the details after."""
    v = build(report)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',  # a constant
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(TITLE)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(TITLE)}</h1>",
        '<section id="summary"><h2>Summary</h2>',
        f'<p class="status {_e(v.status)}" id="status"><strong>{_e(v.status.upper())}</strong>: '
        f"{_e(v.headline)}</p>",
        "<ul>" + "".join(f"<li>{_e(s)}</li>" for s in v.summary) + "</ul>",
    ]
    out += [f'<p class="warning"><strong>Warning:</strong> {_e(w)}</p>' for w in v.warnings]
    if v.unchecked:
        out.append("<h3>Pending or not checked</h3>")
        out.append("<ul>" + "".join(f"<li>{_e(u)}</li>" for u in v.unchecked) + "</ul>")
    out.append("</section>")
    out.append('<section id="problems"><h2>Problems</h2>')
    if v.problems:
        out.append(_table(("status", "subject", "code", "reason"), v.problems))
    else:
        out.append("<p>None.</p>")
    out.append('</section><section id="details"><h2>Details</h2>')
    for s in v.sections:
        out.append(f"<h3>{_e(s.title)}</h3>")
        if s.note:
            out.append(f"<p>{_e(s.note)}</p>")
        out.append(_table(s.headers, s.rows) if s.rows else "<p>None.</p>")
    out.append("</section></body></html>")
    return "\n".join(out) + "\n"


FORMATS: dict[str, Callable[[Report], str]] = {
    "text": render_text,
    "md": render_markdown,
    "html": render_html,
}
