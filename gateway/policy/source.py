"""Reading a policy directory, and saying exactly where it is wrong.

A policy directory holds `schema.cedarschema`, any number of `*.cedar` files (read in
name order) and `identities.json`. Cedar reports parse errors without a line and
validation errors by a generated policy id, so each file is split into its policies and
each policy parsed alone; a parse error is then placed on the first line at which the
policy's text, read line by line, produces that same error. Validation errors are mapped
back through the policy's `@id`, and to the line that names the offending attribute.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy

from gateway.policy import facts as F
from gateway.policy.identities import EMPTY, IdentityMap, parse_identities

SCHEMA_FILE = "schema.cedarschema"
IDENTITIES_FILE = "identities.json"
KNOWN_ANNOTATIONS = frozenset(
    {
        "id",
        "rate",
        "description",
        "removes",
        "spot_check",
        "tokens_per_minute",
        "token_budget",
        "proof",
        "stale",
    }
)
# @stale: what a permit still grants once revocation data is past its staleness budget
# (a cut-off edge). "serve": every mode it grants; "verified": all but `none`. A permit
# without it grants nothing then: stale revocations fail closed unless policy says.
STALE_GRANTS = ("serve", "verified")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_EOF = "unexpected end of input"

# Advice for the validation messages a policy author meets most, in their words.
_HINTS: tuple[tuple[str, str], ...] = (
    (
        "in context for",
        "this policy covers actions that have no such context: name the action, "
        'e.g. action == Ztgate::Action::"infer"',
    ),
    (
        "optional attribute",
        "check it is there first, e.g. `resource has note && resource.note == ...`",
    ),
    ("not found", "the attributes you can use are listed in schema.cedarschema"),
    ("unrecognized action", "the actions are listed at the end of schema.cedarschema"),
    ("unrecognized entity type", "the entity types are listed in schema.cedarschema"),
    ("type error", "compare like with like: text with text in quotes, numbers with numbers"),
    ("unexpected type", "compare like with like: text with text in quotes, numbers with numbers"),
    ("impossiblePolicy", "this policy can never apply: check the action and resource types"),
    ("unable to find an applicable action", "this policy names no action that exists"),
)


@dataclass(frozen=True)
class Finding:
    """One problem, placed where the author can fix it."""

    file: str
    line: int  # 1-based
    column: int | None
    policy_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")
        who = f" [{self.policy_id}]" if self.policy_id else ""
        return f"{where}:{who} {self.message}"


class PolicyError(Exception):
    """A policy directory that cannot be used; `findings` says where and why."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


@dataclass(frozen=True)
class PolicyInfo:
    id: str  # the @id: the name decisions, logs and errors use
    file: str
    line: int
    effect: str  # "permit" or "forbid"
    rate: F.Rate | None
    text: str  # the policy's own source, annotations included
    removes: tuple[str, ...] = ()  # @removes: rule ids this edit deletes on purpose
    spot_check: F.SpotCheckRate | None = None  # @spot_check: least mode-none check rate
    # @tokens_per_minute and @token_budget: generative models' token limits per identity
    token_budgets: tuple[F.TokenBudget, ...] = ()
    # @proof("lazy"): a mode-`none` answer under this permit is proven later (docs/zk.md)
    proof: str | None = None
    stale: str | None = None  # @stale: see STALE_GRANTS


@dataclass(frozen=True)
class PolicySource:
    directory: Path
    schema_text: str
    policies: tuple[PolicyInfo, ...]
    identities: IdentityMap
    hash: str  # SHA-256 over schema, policy files in order, identities (canonical)
    files: tuple[str, ...] = field(default=())

    def policy(self, policy_id: str) -> PolicyInfo | None:
        return next((p for p in self.policies if p.id == policy_id), None)

    def forbids(self) -> tuple[PolicyInfo, ...]:
        return tuple(p for p in self.policies if p.effect == "forbid")

    def removal_markers(self) -> dict[str, PolicyInfo]:
        """Rule id -> the policy whose @removes names it."""
        return {pid: p for p in self.policies for pid in p.removes}

    def policy_set_json(self) -> str:
        """The policy set as Cedar JSON keyed by @id, so every diagnostic names our ids."""
        est = json.loads(cedarpy.policies_to_json_str("\n".join(p.text for p in self.policies)))
        static = est["staticPolicies"]
        est["staticPolicies"] = {body["annotations"]["id"]: body for body in static.values()}
        return json.dumps(est)


def unmarked_removals(active: PolicySource, new: PolicySource) -> tuple[PolicyInfo, ...]:
    """The forbids of `active` that `new` lacks and no @removes in `new` names.

    A forbid that disappears is what a truncated or half-written file looks like, as much
    as a deliberate deletion; only the marker tells them apart, so a reload refuses these.
    """
    kept = {p.id for p in new.forbids()}
    marked = new.removal_markers()
    return tuple(p for p in active.forbids() if p.id not in kept and p.id not in marked)


def removal_refusal(missing: tuple[PolicyInfo, ...]) -> str:
    """Why a reload that drops the forbids `missing` is refused, and how to do it on purpose."""
    names = ", ".join(f"{p.id} ({p.file}:{p.line})" for p in missing)
    ids = ", ".join(p.id for p in missing)
    return (
        f"the new policy drops forbid rule(s) {names} and no @removes names them; a file "
        "cut short by a save under way looks just like this. If the removal is meant, "
        f'put @removes("{ids}") on any rule of the new policy (see policies/README.md)'
    )


def named_actions(scope: Mapping[str, Any]) -> frozenset[str] | None:
    """The action ids a policy's action scope (Cedar JSON) lists by name; None when the
    scope is unconstrained (`action`), which matches every action."""
    op = scope.get("op")
    if op == "All":
        return None
    entities = scope.get("entities") or [scope.get("entity") or {}]
    return frozenset(str(e.get("id", "")) for e in entities if isinstance(e, dict))


def admin_finding(body: Mapping[str, Any]) -> str | None:
    """Why a permit could grant an admin action without naming it, or None.

    Admin actions are granted only by permits that list them in the action scope. A scope
    that matches actions it does not name (unconstrained `action`, or `action in` an action
    group) covers them too, unless the resource scope pins a type admin actions never use.
    Static and conservative: conditions (`when`) are not read, so `when { action == ... }`
    does not help; PolicyEngine.authorize applies the same rule per decision.
    """
    if body.get("effect") != "permit":
        return None
    names = named_actions(body.get("action", {}))
    if names is not None and names <= set(F.ACTIONS):
        return None  # only leaf actions: it matches exactly the ones it names
    resource = body.get("resource", {})
    pinned = resource.get("entity_type") if resource.get("op") == "is" else None
    if resource.get("op") == "==":
        pinned = (resource.get("entity") or {}).get("type")
    if pinned is not None and pinned != f"{F.NAMESPACE}::Gateway":
        return None
    admin = " and ".join(F.ADMIN_ACTIONS)
    how = (
        'name the actions it grants, e.g. action == Ztgate::Action::"infer" or '
        'action in [Ztgate::Action::"read_receipt", Ztgate::Action::"read_proof"]; '
        "admin actions are granted only by a permit that names them"
    )
    if names is None:
        return f"this permit names no action, so it would also grant {admin}: {how}"
    groups = ", ".join(sorted(names - set(F.ACTIONS)))
    return f"action group(s) {groups} may contain {admin} without naming them: {how}"


# --------------------------------------------------------------------------- loading


def load_policy_dir(directory: Path | str) -> PolicySource:
    """Read and check a policy directory; PolicyError lists every problem found."""
    root = Path(directory)
    findings: list[Finding] = []
    if not root.is_dir():
        raise PolicyError([Finding(str(root), 1, None, None, "no such policy directory")])

    schema_text = _read(root / SCHEMA_FILE, findings)
    schema = _parse_schema(schema_text, findings) if schema_text is not None else None

    files = sorted(root.glob("*.cedar"))
    if not files:
        findings.append(Finding(str(root), 1, None, None, "no *.cedar policy files here"))
    texts: list[tuple[str, str]] = []
    policies: list[PolicyInfo] = []
    for path in files:
        text = _read(path, findings)
        if text is not None:
            texts.append((path.name, text))
            policies += _parse_file(path.name, text, findings)
    _check_unique_ids(policies, findings)
    _check_removal_markers(policies, findings)

    identities = EMPTY
    id_text = _read(root / IDENTITIES_FILE, findings)
    if id_text is not None:

        def report(line: int, msg: str) -> None:
            findings.append(Finding(IDENTITIES_FILE, line, None, None, msg))

        identities = parse_identities(id_text, report)

    if schema is not None and policies:
        _validate(schema, policies, findings, schema_text or "")
    if schema is not None:
        assert schema_text is not None
        _probe_schema(schema, schema_text, identities, findings)
    if findings:
        raise PolicyError(sorted(findings, key=lambda f: (f.file, f.line)))

    assert schema_text is not None
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": "ztgate.policy/1",
                "schema": schema_text,
                "policies": [{"file": n, "text": t} for n, t in texts],
                "identities": identities.canonical(),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()
    return PolicySource(
        directory=root,
        schema_text=schema_text,
        policies=tuple(policies),
        identities=identities,
        hash=digest,
        files=tuple(n for n, _ in texts),
    )


def _read(path: Path, findings: list[Finding]) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        findings.append(Finding(path.name, 1, None, None, f"missing {path.name}"))
    except (OSError, UnicodeDecodeError) as exc:
        findings.append(Finding(path.name, 1, None, None, f"cannot read: {exc}"))
    return None


def _parse_schema(text: str, findings: list[Finding]) -> cedarpy.Schema | None:
    try:
        return cedarpy.Schema.from_str(text)
    except ValueError as exc:
        line, col = _locate(text, 1, cedarpy.Schema.from_str, str(exc))
        findings.append(Finding(SCHEMA_FILE, line, col, None, f"schema: {exc}"))
        return None


# --------------------------------------------------------------------------- one file


def split_policies(text: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of each policy: statements end at a `;` outside strings/comments."""
    start, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif ch == ";":
            yield from _chunk(text, start, i + 1)
            start = i + 1
        i += 1
    yield from _chunk(text, start, n)


def _chunk(text: str, start: int, end: int) -> Iterator[tuple[int, str]]:
    """Skip leading blank and comment lines so a policy's line is where its text starts."""
    lines = text[start:end].split("\n")
    line0 = text.count("\n", 0, start) + 1
    for k, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("//"):
            yield line0 + k, "\n".join(lines[k:]).strip()
            return


def _parse_file(name: str, text: str, findings: list[Finding]) -> list[PolicyInfo]:
    out: list[PolicyInfo] = []
    for line, chunk in split_policies(text):
        declared = re.search(r'@id\s*\(\s*"([^"]*)"', chunk)
        pid = declared.group(1) if declared else None
        try:
            est = json.loads(cedarpy.policies_to_json_str(chunk))
        except ValueError as exc:
            at, col = _locate(chunk, line, cedarpy.policies_to_json_str, str(exc))
            findings.append(Finding(name, at, col, pid, _parse_message(str(exc))))
            continue
        if est["templates"]:
            findings.append(
                Finding(
                    name,
                    line,
                    None,
                    pid,
                    "?principal / ?resource placeholders (templates) are not supported: "
                    "name the principal or resource, or use `principal in Ztgate::Group::...`",
                ),
            )
            continue
        for body in est["staticPolicies"].values():
            info = _policy_info(name, line, chunk, body, findings)
            if info is not None:
                out.append(info)
    return out


def _parse_message(raw: str) -> str:
    if raw == _EOF:
        return "the policy is cut short: check every ( { [ is closed and it ends with ;"
    return f"cannot read this policy: {raw}"


def _policy_info(
    name: str, line: int, chunk: str, body: dict[str, Any], findings: list[Finding]
) -> PolicyInfo | None:
    ann: dict[str, str] = body.get("annotations", {})

    def bad(msg: str, pid: str | None = None) -> None:
        findings.append(Finding(name, line, None, pid, msg))

    pid = ann.get("id")
    if not pid:
        bad('every policy needs a name: add @id("...") on the line before permit/forbid')
        return None
    if not _ID_RE.fullmatch(pid):
        bad(f"@id {pid!r}: use letters, digits and _ . : - (at most 128)", pid)
        return None
    for key in sorted(set(ann) - KNOWN_ANNOTATIONS):
        bad(
            f"unknown annotation @{key}; "
            "the gateway reads @id, @rate, @spot_check and @description",
            pid,
        )
    admin = admin_finding(body)
    if admin is not None:
        bad(admin, pid)
    removes: tuple[str, ...] = ()
    if "removes" in ann:
        removes = tuple(x for x in re.split(r"[\s,]+", ann["removes"]) if x)
        wrong = [x for x in removes if not _ID_RE.fullmatch(x)]
        if not removes:
            bad('@removes needs the ids of the rules removed, e.g. @removes("old-rule")', pid)
        elif wrong:
            bad(f"@removes: {', '.join(wrong)} is not a rule id; separate ids with commas", pid)
    rate = None
    if "rate" in ann:
        if body["effect"] != "permit":
            bad("@rate belongs on a permit; a forbid allows nothing to limit", pid)
        try:
            rate = F.Rate.parse(ann["rate"])
        except ValueError as exc:
            bad(f"@rate: {exc}", pid)
    spot_check = None
    if "spot_check" in ann:
        if body["effect"] != "permit":
            bad("@spot_check belongs on a permit; a forbid allows no answer to check", pid)
        try:
            spot_check = F.SpotCheckRate.parse(ann["spot_check"])
        except ValueError as exc:
            bad(f"@spot_check: {exc}", pid)
    budgets: list[F.TokenBudget] = []
    for key, parse in (
        ("tokens_per_minute", F.TokenBudget.per_minute),
        ("token_budget", F.TokenBudget.parse),
    ):
        if key in ann:
            if body["effect"] != "permit":
                bad(f"@{key} belongs on a permit; a forbid allows no tokens to limit", pid)
            try:
                budgets.append(parse(ann[key]))
            except ValueError as exc:
                bad(f"@{key}: {exc}", pid)
    stale = None
    if "stale" in ann:
        if body["effect"] != "permit":
            bad("@stale belongs on a permit; a forbid grants nothing to keep", pid)
        elif ann["stale"] not in STALE_GRANTS:
            bad(f"@stale: one of {', '.join(STALE_GRANTS)} (none: refuse when stale)", pid)
        else:
            stale = ann["stale"]
    proof = None
    if "proof" in ann:
        if body["effect"] != "permit":
            bad("@proof belongs on a permit; a forbid allows no answer to prove", pid)
        elif ann["proof"] not in F.PROOF_OBLIGATIONS:
            bad(f"@proof: one of {', '.join(F.PROOF_OBLIGATIONS)}", pid)
        else:
            proof = ann["proof"]
    return PolicyInfo(
        pid,
        name,
        line,
        body["effect"],
        rate,
        chunk,
        removes,
        spot_check,
        tuple(budgets),
        proof=proof,
        stale=stale,
    )


def _check_unique_ids(policies: list[PolicyInfo], findings: list[Finding]) -> None:
    seen: dict[str, PolicyInfo] = {}
    for p in policies:
        first = seen.setdefault(p.id, p)
        if first is not p:
            findings.append(
                Finding(
                    p.file,
                    p.line,
                    None,
                    p.id,
                    f"@id {p.id!r} is already used at {first.file}:{first.line}; "
                    "every policy needs its own name",
                )
            )


def _check_removal_markers(policies: list[PolicyInfo], findings: list[Finding]) -> None:
    """A marker naming a rule that is here is left over from an earlier removal: it would
    wave the next removal of that rule through unmarked, so it must go first."""
    here = {p.id: p for p in policies}
    for p in policies:
        for pid in p.removes:
            if pid in here:
                found = here[pid]
                msg = (
                    f"@removes names {pid!r}, which is still here at {found.file}:{found.line}:"
                    f" take {pid!r} out of @removes (markers are for the edit that deletes)"
                )
                findings.append(Finding(p.file, p.line, None, p.id, msg))


# --------------------------------------------------------------------------- locating


def _locate(text: str, line0: int, parse: Callable[[str], object], error: str) -> tuple[int, int]:
    """Line and column of a parse error Cedar reported without either.

    Reads the text one more line at a time: the first prefix that fails with the same
    error (rather than "end of input") ends on the offending line.
    """
    lines = text.split("\n")
    last = max((k for k, line in enumerate(lines) if line.strip()), default=0)
    at = last
    if error != _EOF:
        for k in range(1, last + 2):
            try:
                parse("\n".join(lines[:k]))
            except ValueError as exc:
                if str(exc) == error:
                    at = k - 1
                    break
    if at == last and error != _EOF and not _column(lines[last], error):
        # An error only the whole text shows (an unknown type, say) that the last line
        # does not name: the first line naming the error's token is a better guess.
        at = next((k for k, line in enumerate(lines) if _column(line, error)), last)
    return line0 + at, _column(lines[at], error) or 1


def _column(line: str, message: str) -> int | None:
    for token in re.findall(r"`([^`]+)`", message) + re.findall(r":\s*(\S+)$", message):
        m = re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", line)
        if m:
            return m.start() + 1
    return None


# --------------------------------------------------------------------------- schema


def _validate(
    schema: cedarpy.Schema,
    policies: list[PolicyInfo],
    findings: list[Finding],
    schema_text: str = "",
) -> None:
    result = cedarpy.validate_policies("\n".join(p.text for p in policies), schema)
    by_id = {p.id: p for p in policies}
    # One mistake in a policy that names no action is reported once per action: merge.
    merged: dict[tuple[str, int, int | None, str, str], list[str]] = {}
    for err in result.errors:
        # Cedar numbers the policies of one text policy0, policy1, ... in order.
        pos = re.fullmatch(r"policy(\d+)", err.policy_id or "")
        if pos and int(pos.group(1)) < len(policies):
            info: PolicyInfo | None = policies[int(pos.group(1))]
        else:
            info = by_id.get(result.id_annotations_by_policy_id.get(err.policy_id, ""))
        message = re.sub(r"^for policy `[^`]*`, ", "", err.error)
        if info is None:
            findings.append(Finding(SCHEMA_FILE, 1, None, None, message))
            continue
        actions = re.findall(r'for Ztgate::Action::"(\w+)"', message)
        message = re.sub(r'for Ztgate::Action::"\w+"', "for {actions}", message)
        line, col = _attribute_position(info, err.error)
        merged.setdefault((info.file, line, col, info.id, message), []).extend(actions)
    for (file, line, col, pid, message), actions in merged.items():
        text = message.replace("{actions}", "action " + ", ".join(sorted(set(actions))))
        hints = _HINTS[1:] if F.INFER in actions else _HINTS  # infer has a context
        hint = next((h for key, h in hints if key in message), None)
        guess = _did_you_mean(message, schema_attributes(schema_text))
        if guess:
            hint = f"{guess} {hint}" if hint else guess
        findings.append(Finding(file, line, col, pid, text + (f" ({hint})" if hint else "")))


def schema_attributes(schema_text: str) -> list[str]:
    """Every attribute name the schema declares (entity, record and context keys)."""
    return sorted(set(re.findall(r"(\w+)\??\s*:", schema_text)))


def _did_you_mean(message: str, names: list[str]) -> str | None:
    """For `attribute `x` ... not found`: the declared attributes spelt most like x."""
    import difflib

    m = re.search(r"attribute `([^`]+)`.*?not found", message)
    if m is None:
        return None
    close = difflib.get_close_matches(m.group(1), names, n=2, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"


def _attribute_position(info: PolicyInfo, error: str) -> tuple[int, int | None]:
    """Where in the policy the error's first named attribute appears, else its first line."""
    for token in re.findall(r"`([^`:]+)`", error):
        if token == info.id or token.startswith("policy"):
            continue
        for k, text in enumerate(info.text.split("\n")):
            m = re.search(rf"(\.|\bhas\s+){re.escape(token)}\b", text)
            if m:
                return info.line + k, m.start() + 1
    return info.line, None


def _probe_schema(
    schema: cedarpy.Schema, text: str, identities: IdentityMap, findings: list[Finding]
) -> None:
    """Fail at load, not per request, if the schema and what the gateway computes differ.

    Cedar refuses a request whose context does not match the schema (NoDecision), and a
    policy reading an attribute the gateway leaves out would error and be skipped.
    """
    who = F.IdentityFacts("spiffe://probe/client/p", "p")
    model = F.ModelFacts("probe", "public", "", ("*",), F.MODES)
    node = F.NodeFacts("n", "eu-west", "prov-a", 1)
    resources = [
        F.ResourceFacts("Receipt", "r", who.spiffe_id, "probe"),
        F.ResourceFacts("Log", "l", who.spiffe_id),
        F.ResourceFacts("Gateway"),
    ]
    ents = [F.client_entity(who, F.Grant()), F.model_entity(model)]
    ents += [F.group_entity(g) for g in identities.groups()]
    ents += [F.resource_entity(r) for r in resources]
    try:
        entities = cedarpy.Entities.from_json_str(json.dumps(ents), schema)
    except ValueError as exc:
        msg = f"the schema does not match the entities the gateway builds: {exc}"
        findings.append(Finding(SCHEMA_FILE, 1, None, None, msg))
        return
    ctx = F.infer_context("none", node, 1, "small", 0, "", 1)
    requests: list[dict[str, Any]] = [
        {
            "principal": F.uid("Client", who.spiffe_id),
            "action": F.action_uid(F.INFER),
            "resource": F.uid("Model", model.name),
            "context": ctx,
        }
    ]
    for action, rtype in F.RESOURCE_ACTIONS.items():
        rid = model.name if rtype == "Model" else next(r.id for r in resources if r.type == rtype)
        requests.append(
            {
                "principal": F.uid("Client", who.spiffe_id),
                "action": F.action_uid(action),
                "resource": F.uid(rtype, rid),
                "context": {},
            }
        )
    results = cedarpy.is_authorized_batch(requests, "", entities, schema)
    for req, res in zip(requests, results, strict=True):
        if res.decision == cedarpy.Decision.NoDecision:
            action = req["action"]["id"]
            m = re.search(rf"\baction\b[^;{{]*\b{action}\b", text)
            line = text.count("\n", 0, m.start()) + 1 if m else 1
            msg = f"action {action}: the gateway computes a different context than this: "
            msg += "; ".join(res.diagnostics.errors)
            findings.append(Finding(SCHEMA_FILE, line, None, None, msg))
