"""Offline verification of audit bundles and single receipts (what `ztgate verify` runs).

Keys come only from the auditor's trust file (`TrustPolicy`), never from the bundle.
Nothing here opens a socket. Every check yields a `Finding` with a status:

    valid    signature, inclusion in a signed (and, if required, cosigned) checkpoint,
             key window, consistency and, when given, the client's salts all check out
    invalid  something failed; `code` and `reason` say what
    pending  signed, but no checkpoint includes it yet, or (`not-yet-witnessed`) none
             that includes it is cosigned as the witness policy requires, while an
             earlier one of its log is, cosigned within the witness grace of `now`
             (final once one does; past the grace, `missing-cosignature`)
    erased   the body was deleted (retention or erasure); its leaf and proofs remain

A report's status is `invalid` if any finding is, else `pending` if any is, else `valid`.
`docs/compliance.md` is the auditor's guide to these statuses and codes.

Bundles v2 (`gateway.receipts.bundle`) are checked for completeness, not only for the
validity of what they hold: each log's leaves from the range start to its head must
reproduce the head's signed root, every receipt leaf must be matched by exactly one
receipt file or by a logged erasure (`missing-entry`, `duplicate-entry`), each log's
``log_start`` leaf must name a predecessor that is in the bundle with the head it
committed to (`unchained-log`), and each origin the trust file lists must be there
(`missing-log`). A receipt is proven in every checkpoint of its log's consistent chain
that covers it; the earliest judges its key's window, and the latest one satisfying the
witness policy (all `--require-witness` names, and a quorum of trusted witnesses) proves
it witnessed. v1 bundles are checked by the v1 rules and marked `no-inventory`.

zk re-verification: a receipt in mode ``zk`` records hashes of the proof and of its public
instances. `PROOF_VERIFIERS` maps a verification mode to a function that re-verifies the
evidence (``logs/<log id>/evidence/<receipt id>.*`` in a bundle) against the receipt; the
zk package registers one with `register_proof_verifier`. Without one, such receipts are
verified as signed records and the report says the proof itself was not re-checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.protocol.codec import decode_request
from gateway.protocol.problems import Problem
from gateway.protocol.tensors import Tensor
from gateway.receipts.bundle import BundleError, BundleReader
from gateway.receipts.canonical import canonical_json, unb64
from gateway.receipts.commit import commit_tensor
from gateway.receipts.entry import TLOG_PROOF_HEADER, LogEntry
from gateway.receipts.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    leaf_hash,
    root_from_range,
    verify_consistency,
    verify_inclusion,
)
from gateway.receipts.model import FormatError, Receipt, SignedReceipt, TensorRef
from gateway.receipts.note import Checkpoint, NoteError, NoteKey, SignedNote, WitnessKey
from gateway.receipts.signing import (
    SUMMARY_PREFIX,
    KeySet,
    Verdict,
    format_time,
    raw_public,
    verify_summary,
)

__all__ = [
    "NOT_YET_WITNESSED",
    "PROOF_VERIFIERS",
    "WITNESS_GRACE",
    "Finding",
    "Report",
    "TrustError",
    "TrustPolicy",
    "WitnessPolicy",
    "register_proof_verifier",
    "verify_bundle",
    "verify_path",
    "verify_receipt_file",
]

Status = Literal["valid", "invalid", "pending", "erased"]
# Pending: in its log's checkpoints, but none yet cosigned as the witness policy requires
# (the code of such a finding; docs/compliance.md, section 2.1).
NOT_YET_WITNESSED = "not-yet-witnessed"
# The last second `datetime` can hold (9999-12-31T23:59:59Z): times past it are refused.
_LAST_TIME = 253402300799
# How long that may last: past it, a witness that stopped cosigning (down for good, or
# refusing a split view) is `missing-cosignature`, not an open-ended exit 3.
WITNESS_GRACE = dt.timedelta(hours=24)
TRUST_FORMAT = "ztgate-trust/v1"

# mode -> fn(receipt, evidence: {file name: bytes}) -> Verdict
ProofVerifier = Callable[[Receipt, Mapping[str, bytes]], Verdict]
PROOF_VERIFIERS: dict[str, ProofVerifier] = {}


def register_proof_verifier(mode: str, fn: ProofVerifier) -> None:
    """Extension point for re-verifying a mode's evidence (the zk package uses it)."""
    PROOF_VERIFIERS[mode] = fn


class TrustError(Exception):
    """The trust file is unusable (a usage error, exit 2)."""


@dataclass(frozen=True)
class TrustedLogKey:
    """A log key, for origins starting with `origin_prefix` and for each of `origins`.
    `origins` is also the auditor's list of logs a bundle must hold (`missing-log`): a
    prefix alone cannot say which logs exist."""

    origin_prefix: str
    public_key: ed25519.Ed25519PublicKey
    origins: tuple[str, ...] = ()

    def key_for(self, origin: str) -> NoteKey | None:
        covered = (self.origin_prefix and origin.startswith(self.origin_prefix)) or (
            origin in self.origins
        )
        return NoteKey(origin, self.public_key) if covered else None


@dataclass(frozen=True)
class WitnessPolicy:
    """Which cosignatures make a checkpoint witnessed: every one of `names`, and valid
    ones from at least `quorum` of the trust file's witnesses (k-of-n, as in C2SP)."""

    names: tuple[str, ...] = ()
    quorum: int = 0
    # How long after its log's last witnessed checkpoint a receipt may be pending on the
    # witness (`not-yet-witnessed`) before it is `missing-cosignature`.
    grace: dt.timedelta = WITNESS_GRACE

    @property
    def active(self) -> bool:
        return bool(self.names) or self.quorum > 0

    def satisfied(self, cosigned: Mapping[str, int]) -> bool:
        return all(n in cosigned for n in self.names) and len(cosigned) >= self.quorum

    def witnessed_at(self, cosigned: Mapping[str, int]) -> int:
        """When `cosigned` (which satisfies this policy) came to: the latest of the named
        witnesses' times and the quorum-th earliest; a witness the policy does not need,
        cosigning later, does not move it."""
        times = [cosigned[n] for n in self.names]
        if self.quorum:
            times.append(sorted(cosigned.values())[self.quorum - 1])
        return max(times, default=0)

    def describe(self) -> str:
        parts = [f"cosigned by {', '.join(self.names)}"] if self.names else []
        if self.quorum:
            parts.append(f"by at least {self.quorum} trusted witness(es)")
        return " and ".join(parts)


@dataclass
class TrustPolicy:
    """The auditor's trust file: receipt keys (with windows), log keys, witness keys."""

    receipt_keys: KeySet
    log_keys: list[TrustedLogKey]
    witnesses: dict[str, WitnessKey]
    witness_quorum: int = 0
    source: str = ""  # where the keys came from (the trust file's path), for the report

    @classmethod
    def load(cls, path: Path) -> TrustPolicy:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise TrustError(f"cannot read trust file {path}: {exc}") from None
        policy = cls.from_dict(doc)
        policy.source = str(path)
        return policy

    @classmethod
    def from_dict(cls, doc: Any) -> TrustPolicy:
        try:
            if not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT:
                raise ValueError(f"format must be {TRUST_FORMAT!r}")
            keys = KeySet.from_json(json.dumps(doc["receipt_keys"]))
            logs = []
            for entry in doc["log_keys"]:
                origins = entry.get("origins", [])
                if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
                    raise ValueError("log_keys[].origins must be a list of origins")
                prefix = str(entry.get("origin_prefix", ""))
                if not prefix and not origins:
                    raise ValueError("a log key needs an origin_prefix or origins")
                logs.append(
                    TrustedLogKey(
                        prefix,
                        ed25519.Ed25519PublicKey.from_public_bytes(
                            unb64(str(entry["public_key"]), 32)
                        ),
                        tuple(origins),
                    )
                )
            witnesses = {}
            for entry in doc.get("witnesses", []):
                wk = WitnessKey.from_vkey(str(entry["vkey"]))
                witnesses[wk.name] = wk
            policy = doc.get("witness_policy") or {}
            if not isinstance(policy, dict) or set(policy) - {"quorum"}:
                raise ValueError('witness_policy must be {"quorum": K}')
            quorum = policy.get("quorum", 0)
            if not isinstance(quorum, int) or isinstance(quorum, bool) or quorum < 0:
                raise ValueError("witness_policy.quorum must be a non-negative integer")
        except (KeyError, TypeError, ValueError) as exc:
            raise TrustError(f"invalid trust file: {exc}") from None
        if not logs or not len(keys):
            raise TrustError("a trust file needs at least one receipt key and one log key")
        if quorum > len(witnesses):
            raise TrustError(f"witness quorum {quorum} exceeds the {len(witnesses)} witnesses")
        return cls(keys, logs, witnesses, quorum)

    def to_dict(self) -> dict[str, Any]:
        from gateway.receipts.canonical import b64

        return {
            "format": TRUST_FORMAT,
            "receipt_keys": json.loads(self.receipt_keys.to_json()),
            "log_keys": [
                {
                    "origin_prefix": k.origin_prefix,
                    "public_key": b64(raw_public(k.public_key)),
                    **({"origins": list(k.origins)} if k.origins else {}),
                }
                for k in self.log_keys
            ],
            "witnesses": [{"vkey": w.vkey()} for w in self.witnesses.values()],
            **({"witness_policy": {"quorum": self.witness_quorum}} if self.witness_quorum else {}),
        }


@dataclass(frozen=True)
class Finding:
    subject: str
    status: Status
    code: str = "ok"
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """The findings, and what they were checked against, for `gateway.receipts.report`:
    `scope` (the input, the trust file's keys and witnesses, the witness policy, salts),
    `receipts` (receipt id -> facts of each receipt whose signature verified: model, mode,
    kind, time, key) and `logs` (each log's checkpoints and who cosigned them)."""

    findings: list[Finding] = field(default_factory=list)
    scope: dict[str, Any] = field(default_factory=dict)
    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self, subject: str, status: Status, code: str = "ok", reason: str = "", **details: Any
    ) -> None:
        self.findings.append(Finding(subject, status, code, reason, details))

    @property
    def status(self) -> Status:
        states = {f.status for f in self.findings}
        if "invalid" in states or not self.findings:
            return "invalid"
        return "pending" if "pending" in states else "valid"

    @property
    def exit_code(self) -> int:
        return {"valid": 0, "invalid": 1, "pending": 3}.get(self.status, 1)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.status] = out.get(f.status, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings],
            "scope": self.scope,
            "receipts": self.receipts,
            "logs": self.logs,
        }


# --- checkpoints -------------------------------------------------------------------------
@dataclass(frozen=True)
class _VerifiedCheckpoint:
    checkpoint: Checkpoint
    text: str
    time: int  # effective time: log's, or the later of it and the named witnesses'
    cosigned: Mapping[str, int]  # trusted witness -> timestamp, valid cosignatures only
    note: SignedNote


def _verify_note(raw: str | bytes, trust: TrustPolicy) -> _VerifiedCheckpoint | Verdict:
    """Log signature and every trusted witness's cosignature (a failing one is invalid
    whether or not the policy needs it: a trusted witness never signs garbage)."""
    try:
        note = SignedNote.parse(raw)
        cp = Checkpoint.parse_text(note.text)
    except NoteError as exc:
        return Verdict.failure("malformed-checkpoint", str(exc))
    keys = [k for t in trust.log_keys if (k := t.key_for(cp.origin)) is not None]
    if not keys:
        return Verdict.failure("untrusted-log", f"no trusted log key for origin {cp.origin}")
    results = [k.verify(note) for k in keys]
    if False in results:
        return Verdict.failure("bad-checkpoint-signature", "a trusted log signature fails")
    if True not in results:
        return Verdict.failure(
            "bad-checkpoint-signature", "checkpoint carries no signature from a trusted log key"
        )
    if cp.time is None:
        return Verdict.failure("malformed-checkpoint", "checkpoint has no time line")
    if not 0 <= cp.time <= _LAST_TIME:
        return Verdict.failure("malformed-checkpoint", "checkpoint time out of range")
    cosigned: dict[str, int] = {}
    for name, wk in trust.witnesses.items():
        status, ts = wk.verify(note)
        if status == "invalid":
            return Verdict.failure("bad-cosignature", f"witness {name}'s cosignature fails")
        if status == "valid":
            if not 0 <= ts <= _LAST_TIME:  # signed, but no date: refused, never a crash
                return Verdict.failure(
                    "bad-cosignature", f"witness {name}'s cosignature time is out of range"
                )
            cosigned[name] = ts
    return _VerifiedCheckpoint(cp, note.text, cp.time, cosigned, note)


def _check_checkpoint(
    raw: str | bytes, trust: TrustPolicy, policy: WitnessPolicy
) -> _VerifiedCheckpoint | Verdict:
    """`_verify_note`, and the witness policy on this very checkpoint (v1 rules)."""
    vc = _verify_note(raw, trust)
    if isinstance(vc, Verdict):
        return vc
    for name in policy.names:
        if name not in vc.cosigned:
            return Verdict.failure("missing-cosignature", f"witness {name} did not cosign")
    if not policy.satisfied(vc.cosigned):
        return Verdict.failure(
            "missing-cosignature", f"not {policy.describe()} ({len(vc.cosigned)} valid)"
        )
    effective = max([vc.time, *(vc.cosigned[n] for n in policy.names)])
    return _VerifiedCheckpoint(vc.checkpoint, vc.text, effective, vc.cosigned, vc.note)


def _parse_proof_lines(raw: bytes) -> list[bytes]:
    text = raw.decode("ascii")
    if text and not text.endswith("\n"):
        raise ValueError("proof must end with a newline")
    return [unb64(line, HASH_SIZE) for line in text.split("\n")[:-1]] if text else []


def _parse_tlog_proof(raw: bytes) -> tuple[int, list[bytes], str]:
    text = raw.decode("utf-8")
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise ValueError("no blank line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != TLOG_PROOF_HEADER:
        raise ValueError("not a c2sp.org/tlog-proof@v1")
    rest = lines[1:]
    if rest and rest[0].startswith("extra "):
        rest = rest[1:]
    if not rest or not rest[0].startswith("index "):
        raise ValueError("no index line")
    idx = rest[0][6:]
    if not idx.isdigit() or (idx != "0" and idx.startswith("0")):
        raise ValueError("bad index")
    return int(idx), [unb64(h, HASH_SIZE) for h in rest[1:]], note


# --- salts -------------------------------------------------------------------------------
def load_salts(path: Path) -> dict[str, dict[str, Any]]:
    """The client's record: {receipt id: {"salt": b64, "inputs": [...], "outputs": [...]}},
    tensors as KServe v2 JSON tensors ({name, datatype, shape, data})."""
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError("a salts file maps receipt ids to records")
    return doc


def _tensors(items: Any) -> list[Tensor]:
    if not items:
        return []
    body = json.dumps({"inputs": items}).encode()
    return list(decode_request(body, None, "salts", None).inputs)


def _check_salts(receipt: Receipt, record: Any) -> Verdict:
    try:
        salt = unb64(str(record["salt"]), 32)
        sent = _tensors(record.get("inputs"))
        got = _tensors(record.get("outputs"))
    except (KeyError, TypeError, ValueError, Problem) as exc:
        return Verdict.failure("bad-salts", f"client record unusable: {exc}")

    def match(refs: tuple[TensorRef, ...], tensors: list[Tensor], side: str) -> Verdict:
        by_name = {r.name: r for r in refs}
        for t in tensors:
            ref = by_name.get(t.name)
            if ref is None:
                return Verdict.failure("commitment-mismatch", f"receipt has no {side} {t.name!r}")
            if commit_tensor(t, salt) != ref.commitment:
                return Verdict.failure(
                    "commitment-mismatch", f"{side} {t.name!r} does not match its commitment"
                )
        return Verdict.success()

    v = match(receipt.inputs, sent, "input")
    return v if not v else match(receipt.outputs, got, "output")


# --- receipts ----------------------------------------------------------------------------
@dataclass
class _LogState:
    """One log of a v2 bundle, as far as it has been verified."""

    log_id: str
    origin: str
    base: str
    entry: Mapping[str, Any]
    chain: dict[int, _VerifiedCheckpoint] = field(default_factory=dict)  # by size
    consistent: bool = True  # every link between the chain's checkpoints verified
    start: int = 0
    size: int = 0
    leaves: dict[int, LogEntry] | None = None  # the inventory, once it reproduces the head
    matched: set[int] = field(default_factory=set)  # receipt leaves matched by a file
    head: tuple[int, bytes] = (0, EMPTY_ROOT)

    def proven_in(self, index: int, leaf_ok: bool, proof_size: int) -> list[int]:
        """Sizes of the chain's checkpoints that provably include leaf `index`: the
        proof's, and, when the inventory matched the leaf and the chain is consistent,
        every later-or-equal one covering it (consistency proofs carry inclusion on)."""
        if leaf_ok and self.leaves is not None and self.consistent:
            return sorted(s for s in self.chain if s > index)
        return [proof_size]


def _check_receipt(
    raw: bytes,
    proof_raw: bytes | None,
    trust: TrustPolicy,
    policy: WitnessPolicy,
    chain: Mapping[str, _VerifiedCheckpoint] | None,
    salts: Mapping[str, Any] | None,
    evidence: Mapping[str, bytes],
    now: dt.datetime,
    report: Report,
    expected_id: str | None = None,
    state: _LogState | None = None,
) -> None:
    """One receipt. Without `state` (v1 bundles, a lone receipt), its proof's checkpoint
    must itself satisfy the witness policy and judges the key window; with it (v2), the
    log's chain does (see the module docstring)."""
    subject = f"receipt {expected_id}" if expected_id else "receipt"
    try:
        signed = SignedReceipt.from_bytes(raw)
    except FormatError as exc:
        report.add(subject, "invalid", "malformed-receipt", str(exc))
        return
    r = signed.receipt
    subject = f"receipt {r.receipt_id}"
    if expected_id is not None and r.receipt_id != expected_id:
        report.add(subject, "invalid", "misfiled", f"filed as {expected_id}")
        return
    sig = trust.receipt_keys.verify(signed)
    if not sig:
        report.add(subject, "invalid", sig.code, sig.reason)
        return
    report.receipts[r.receipt_id] = _receipt_facts(r)
    leaf = leaf_hash(LogEntry("receipt", hashlib.sha256(raw).digest()).leaf_data())
    leaf_ok = False
    if state is not None and state.leaves is not None and state.start <= r.index < state.size:
        leaf_ok = r.index in state.matched
        if not leaf_ok:
            report.add(
                subject,
                "invalid",
                "leaf-mismatch",
                f"not the receipt the log holds at index {r.index}",
            )
            return
    key = trust.receipt_keys.get(r.key_id)
    assert key is not None
    if proof_raw is None:
        if key.valid_until is not None and now > key.valid_until:
            report.add(
                subject,
                "invalid",
                "retired-key-unlogged",
                f"signed by key {r.key_id}, retired {format_time(key.valid_until)}, and no "
                "checkpoint from its validity window includes it",
            )
        else:
            report.add(
                subject, "pending", "not-in-checkpoint", "no signed checkpoint includes it yet"
            )
        return
    try:
        index, path, note_text = _parse_tlog_proof(proof_raw)
    except (ValueError, UnicodeDecodeError) as exc:
        report.add(subject, "invalid", "malformed-proof", str(exc))
        return
    if index != r.index:
        report.add(
            subject,
            "invalid",
            "index-mismatch",
            f"proof is for index {index}, receipt says {r.index}",
        )
        return
    vc = (
        _check_checkpoint(note_text, trust, policy)
        if state is None
        else _verify_note(note_text, trust)
    )
    if isinstance(vc, Verdict):
        report.add(subject, "invalid", vc.code, f"its checkpoint: {vc.reason}")
        return
    if not vc.checkpoint.origin.endswith("/" + r.log_id):
        report.add(subject, "invalid", "wrong-log", f"checkpoint is of {vc.checkpoint.origin}")
        return
    in_chain = (
        (chain is None or vc.text in chain)
        if state is None
        else (
            (shipped := state.chain.get(vc.checkpoint.size)) is not None
            and shipped.note.render() == vc.note.render()
        )
    )
    if not in_chain:
        report.add(
            subject,
            "invalid",
            "checkpoint-not-in-chain",
            "its checkpoint is not one of the bundle's consistent checkpoints",
        )
        return
    if not verify_inclusion(index, vc.checkpoint.size, leaf, path, vc.checkpoint.root):
        report.add(
            subject,
            "invalid",
            "inclusion-proof",
            f"not included at index {index} of the checkpoint of size {vc.checkpoint.size}",
        )
        return
    judge, witnessed = vc, vc
    behind: str | None = None  # why it is not yet witnessed, when it is pending on that
    if state is not None:
        proven = state.proven_in(index, leaf_ok, vc.checkpoint.size)
        judge = state.chain[proven[0]]
        if policy.active:
            ok = [s for s in proven if policy.satisfied(state.chain[s].cosigned)]
            late = None if ok else _not_yet_witnessed(state, policy, index, leaf_ok, now)
            if not ok and (late is None or late[0] == "invalid"):
                report.add(
                    subject,
                    "invalid",
                    "missing-cosignature",
                    f"no checkpoint of the bundle that includes it is {policy.describe()}"
                    + (f"; {late[1]}" if late else ""),
                )
                return
            behind = late[1] if late else None
            witnessed = state.chain[ok[-1]] if ok else witnessed
    when = dt.datetime.fromtimestamp(judge.time, dt.UTC)
    window = trust.receipt_keys.window(r.key_id, when)
    if not window:
        report.add(subject, "invalid", window.code, window.reason)
        return
    details: dict[str, Any] = {
        "index": r.index,
        "log_id": r.log_id,
        "kind": r.kind,
        "checkpoint_size": judge.checkpoint.size,
        "checkpoint_time": format_time(when),
    }
    if policy.active and behind is None:
        details["witnessed_size"] = witnessed.checkpoint.size
        details["witnesses"] = sorted(witnessed.cosigned)
    if salts is not None and r.receipt_id in salts:
        v = _check_salts(r, salts[r.receipt_id])
        if not v:
            report.add(subject, "invalid", v.code, v.reason)
            return
        details["client_salts"] = "match"
    if r.verification is not None and r.verification.mode in PROOF_VERIFIERS:
        v = PROOF_VERIFIERS[r.verification.mode](r, evidence)
        if not v:
            report.add(subject, "invalid", v.code, v.reason)
            return
        details["proof_reverified"] = True
    elif r.verification is not None and r.verification.proof_sha256:
        details["proof_reverified"] = False
    if behind is not None:
        report.add(subject, "pending", NOT_YET_WITNESSED, behind, **details)
        return
    report.add(subject, "valid", **details)


def _not_yet_witnessed(
    state: _LogState, policy: WitnessPolicy, index: int, leaf_ok: bool, now: dt.datetime
) -> tuple[Literal["pending", "invalid"], str] | None:
    """Whether a receipt no witnessed checkpoint includes is pending, and why; None: it is
    invalid (`missing-cosignature`), as it is with ("invalid", why) past the grace.

    Pending: it is proven in each of its log's checkpoints that cover it (its inventory
    leaf matched, the chain consistent), none satisfies the policy, and an earlier
    checkpoint of the log does: witnessing of this log stands, and has not reached it.
    That lasts `policy.grace` from the log's last witnessed checkpoint, timed by its
    cosignatures (when the policy's witnesses made it witnessed: a time they vouched for,
    which the log cannot move; one after the check's time counts as past the grace): past
    it the witness has stopped for good, or refuses this log's checkpoints.
    A later witnessed checkpoint that does not prove it, or a log the policy never
    covered in this bundle, is `missing-cosignature`. A failing cosignature never gets
    here (`bad-cosignature`, `_verify_note`). The bundle records no witness's refusal:
    one that refused these checkpoints looks the same until a later export, where a
    pending receipt either verifies or stays pending (docs/compliance.md, section 2.1).
    """
    if not (leaf_ok and state.leaves is not None and state.consistent):
        return None
    done = [s for s, vc in state.chain.items() if policy.satisfied(vc.cosigned)]
    if not done or max(done) > index:
        return None
    last = state.chain[max(done)]
    vouched = dt.datetime.fromtimestamp(policy.witnessed_at(last.cosigned), dt.UTC)
    if now - vouched > policy.grace or vouched > now:  # a time after the check's: no grace
        age = f"{_span(now - vouched)} before" if vouched <= now else "after"
        return "invalid", (
            f"past the witness grace of {_span(policy.grace)}: its log's last witnessed "
            f"checkpoint (size {max(done)}) was cosigned {format_time(vouched)}, "
            f"{age} this check"
        )
    head = state.chain[max(state.chain)]
    cosigners = ", ".join(sorted(head.cosigned)) or "no trusted witness"
    return "pending", (
        f"not yet witnessed: no checkpoint including it is {policy.describe()} yet; its "
        f"log's are, up to size {max(done)}; the latest (size {head.checkpoint.size}, signed "
        f"{format_time(dt.datetime.fromtimestamp(head.time, dt.UTC))}) is cosigned by "
        f"{cosigners}. Final once a witnessed checkpoint covers it: verify a later export"
    )


def _span(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s}s" if s < 120 else f"{s // 3600}h {s % 3600 // 60}m"


# --- what the report says was checked -----------------------------------------------------
def _receipt_facts(r: Receipt) -> dict[str, Any]:
    """What a receipt whose signature verified says about itself, for the report."""
    v = r.verification
    facts: dict[str, Any] = {
        "kind": r.kind,
        "time": r.time,
        "key_id": r.key_id,
        "log_id": r.log_id,
        "index": r.index,
        "model": r.model.name if r.model else None,
        "model_version": r.model.version if r.model else None,
        "mode": v.mode if v else None,
        "result": v.result if v else None,
    }
    if r.denial is not None:
        facts["denial"] = {
            "type": r.denial.problem_type,
            "reason": r.denial.reason,
            "count": r.denial.count,
        }
    if "dev_srs" in r.extensions:
        facts["dev_srs"] = r.extensions["dev_srs"] is True
    if r.kind in ("open", "close"):
        # What `_check_stream_links` compares: a stream's two receipts name one request.
        facts["request_id"] = r.request_id
        facts["client"] = r.client.spiffe_id if r.client else None
        facts["finish_reason"] = r.extensions.get("finish_reason")
        facts["opening"] = r.extensions.get("opening")
    for key in ("job_id", "supersedes", "supersedes_in"):  # `_check_job_links`
        if key in r.extensions:
            value = r.extensions[key]
            facts[key] = list(value) if isinstance(value, tuple) else value
    return facts


def _check_job_links(report: Report, logs: set[str]) -> None:
    """A job's receipt that names earlier ones (docs/jobs.md, "Exactly once"), each
    resolved against this bundle. `supersedes`: a receipt of the same job that a second run
    answered otherwise than. `supersedes_in`: other replicas' logs the job was marked for,
    which held it until it was adopted: their receipts of the job (`ext.job_id`) if the
    bundle holds any, else whether it holds that log at all (a run that died before its
    receipt was logged leaves none). Then `_check_unlinked_jobs`."""
    by_job: dict[tuple[str, str], list[str]] = {}  # (log id, job id) -> its receipts there
    for rid, facts in report.receipts.items():
        if isinstance(facts.get("job_id"), str):
            by_job.setdefault((str(facts["log_id"]), facts["job_id"]), []).append(rid)
    _check_unlinked_jobs(report)
    for rid, facts in sorted(report.receipts.items()):
        job, subject = facts.get("job_id"), f"receipt {rid}"
        first = facts.get("supersedes")
        if isinstance(first, str):
            named = report.receipts.get(first)
            if named is not None and (not isinstance(job, str) or named.get("job_id") != job):
                report.add(
                    subject,
                    "invalid",
                    "supersedes-mismatch",
                    f"supersedes {first}, which is not a receipt of the same job",
                )
            else:
                where = "in this bundle" if named is not None else "not in this bundle"
                report.add(
                    subject,
                    "valid",
                    "supersedes",
                    f"job {job} ran again and answered otherwise: supersedes {first} ({where})",
                    job_id=job,
                    supersedes=[first],
                )
        others = facts.get("supersedes_in")
        if not isinstance(others, list) or not isinstance(job, str):
            continue
        for other in sorted(str(o) for o in others):
            found = sorted(by_job.get((other, job), []))
            if found:
                held = f"supersedes {', '.join(found)}"
            elif other in logs:
                # Not "the log has none": an export from a later leaf, an erasure or
                # retention leaves bodies out of the bundle.
                held = (
                    "no receipt body of the job among those the bundle holds from that log "
                    "(an export from a later leaf, an erasure or retention may leave one out)"
                )
            else:
                held = "that log is not in this bundle"
            report.add(
                subject,
                "valid",
                "supersedes-adopted",
                f"job {job} was adopted from another replica's log {other}: {held}",
                job_id=job,
                log_id=other,
                supersedes=found,
            )


def _check_unlinked_jobs(report: Report) -> None:
    """Answer receipts of one job (`ext.job_id`) that `supersedes` / `supersedes_in` do not
    all tie together: what a lost or removed job-store mark, a replica from before marks,
    or a store writer leaves. Reported whatever the job store said, so that no second
    receipt of a job is silent (docs/jobs.md, "Replicas sharing Redis")."""
    jobs: dict[str, list[str]] = {}
    for rid, facts in report.receipts.items():
        if facts.get("kind") == "answer" and isinstance(facts.get("job_id"), str):
            jobs.setdefault(facts["job_id"], []).append(rid)
    for job, rids in sorted(jobs.items()):
        if len(rids) < 2:
            continue
        group = {r: r for r in rids}  # union-find over the job's receipts

        def root(r: str, group: dict[str, str] = group) -> str:
            while group[r] != r:
                r = group[r]
            return r

        by_log: dict[str, list[str]] = {}
        for r in sorted(rids):
            by_log.setdefault(str(report.receipts[r]["log_id"]), []).append(r)
        for r in rids:
            facts = report.receipts[r]
            tied = [facts["supersedes"]] if facts.get("supersedes") in group else []
            named = facts.get("supersedes_in")
            for other in named if isinstance(named, list) else []:
                # all of that log's receipts of the job: tied there by `supersedes`, or
                # left apart (and reported) when they are not
                tied += by_log.get(str(other), [])[:1]
            for o in tied:
                group[root(o)] = root(r)
        if len({root(r) for r in rids}) > 1:
            report.add(
                f"job {job}",
                "valid",
                "job-receipts-unlinked",
                f"{len(rids)} answer receipts of job {job}, not all tied by supersedes or "
                "supersedes_in: more than one answer to the job, unexplained",
                job_id=job,
                receipts=sorted(rids),
            )


def _check_stream_links(report: Report) -> None:
    """Each closing receipt against its opening one, where the bundle holds both: the
    opening is an `open` receipt of the same request, client and model, logged earlier.
    A closing receipt whose opening is not in the bundle is left as it is (an export by
    time may cut a stream in two); an opening without a close is named, as it must not
    happen on a gateway that ran to the end (docs/compliance.md)."""
    closed: set[str] = set()
    for rid, facts in sorted(report.receipts.items()):
        if facts.get("kind") != "close":
            continue
        opening = facts.get("opening")
        if not isinstance(opening, str):
            report.add(
                f"receipt {rid}", "invalid", "stream-link-missing", "names no opening receipt"
            )
            continue
        closed.add(opening)
        first = report.receipts.get(opening)
        if first is None:
            continue
        same = (
            first.get("kind") == "open"
            and all(first.get(k) == facts.get(k) for k in ("request_id", "client", "model"))
            and first.get("log_id") == facts.get("log_id")
            and int(first.get("index", -1)) < int(facts.get("index", -1))
        )
        if same:
            report.add(
                f"receipt {rid}", "valid", "stream-linked", f"closes the stream {opening} opened"
            )
        else:
            report.add(
                f"receipt {rid}",
                "invalid",
                "stream-link-mismatch",
                f"{opening} is not the opening receipt of this stream",
            )
    for rid, facts in sorted(report.receipts.items()):
        if facts.get("kind") == "open" and rid not in closed:
            report.add(
                f"receipt {rid}", "valid", "stream-unclosed", "no closing receipt in this bundle"
            )


def _fingerprint(key: ed25519.Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def _scope(
    kind: str,
    trust: TrustPolicy,
    policy: WitnessPolicy,
    salts: Mapping[str, Any] | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """The input, and the keys, witnesses and policy it was checked against."""
    return {
        "input": kind,
        "trust_file": trust.source,
        "receipt_keys": [
            {
                "key_id": k.key_id,
                "valid_from": format_time(k.valid_from),
                "valid_until": format_time(k.valid_until) if k.valid_until else None,
            }
            for k in trust.receipt_keys
        ],
        "log_keys": [
            {
                "origin_prefix": t.origin_prefix,
                "origins": list(t.origins),
                "fingerprint": _fingerprint(t.public_key),
            }
            for t in trust.log_keys
        ],
        "witnesses": sorted(trust.witnesses),
        "witness_policy": {
            "required": list(policy.names),
            "quorum": policy.quorum,
            "grace_s": policy.grace.total_seconds(),
        },
        "salts": None if salts is None else len(salts),
        "proof_reverifiers": sorted(PROOF_VERIFIERS),
        "checked_at": format_time(now),
    }


def _log_facts(
    log_id: str,
    origin: str,
    chain: Mapping[int, _VerifiedCheckpoint],
    inventory: tuple[int, int] | None,
) -> dict[str, Any]:
    """A log's verified checkpoints, each with its signed time and valid cosigners."""
    return {
        "log_id": log_id,
        "origin": origin,
        "inventory": list(inventory) if inventory is not None else None,
        "checkpoints": [
            {
                "size": size,
                "time": format_time(
                    dt.datetime.fromtimestamp(
                        vc.checkpoint.time if vc.checkpoint.time is not None else vc.time, dt.UTC
                    )
                ),
                "witnesses": sorted(vc.cosigned),
            }
            for size, vc in sorted(chain.items())
        ],
    }


# --- bundles -----------------------------------------------------------------------------
def verify_bundle(
    bundle: BundleReader,
    trust: TrustPolicy,
    require: Sequence[str] = (),
    salts: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
    quorum: int | None = None,
    witness_grace: dt.timedelta = WITNESS_GRACE,
) -> Report:
    """`require`: witnesses that must all cosign; `quorum`: how many of the trust file's
    witnesses must (default: the trust file's ``witness_policy``); `witness_grace`: how
    long after its log's last witnessed checkpoint (by its cosignatures' time) a receipt
    may still be pending on the witness (`not-yet-witnessed`) rather than invalid."""
    now = now or dt.datetime.now(dt.UTC)
    quorum = trust.witness_quorum if quorum is None else quorum
    policy = WitnessPolicy(tuple(require), quorum, witness_grace)
    report = Report(scope=_scope(f"bundle v{bundle.version}", trust, policy, salts, now))
    origins: set[str] = set()
    states: list[_LogState] = []
    if bundle.version == 1:
        report.add(
            "bundle",
            "valid",
            "no-inventory",
            "v1 bundle: completeness not checked (receipts or logs left out would go "
            "unnoticed); ask for a v2 bundle",
        )
    for entry in bundle.manifest["logs"]:
        try:
            origins.add(str(entry["origin"]))
            if bundle.version == 1:
                _verify_log_v1(bundle, entry, trust, policy, salts, now, report)
            else:
                states.append(_verify_log_checkpoints(bundle, entry, trust, report))
        except (KeyError, TypeError, ValueError) as exc:
            report.add("bundle", "invalid", "malformed-manifest", str(exc))
    erased = _logged_erasures(bundle, states, report)
    for st in states:
        try:
            _verify_log_receipts(bundle, st, trust, policy, salts, now, report)
            _classify(st, erased, report)
        except (KeyError, TypeError, ValueError) as exc:
            report.add(f"log {st.log_id}", "invalid", "malformed-manifest", str(exc))
    _check_chains(bundle, states, report)
    _check_stream_links(report)
    _check_job_links(report, {st.log_id for st in states})
    _final_statuses(bundle, states, trust, report)
    for st in states:
        inventory = (st.start, st.size) if st.leaves is not None else None
        report.logs.append(_log_facts(st.log_id, st.origin, st.chain, inventory))
    for t in trust.log_keys:
        for origin in t.origins:
            if origin not in origins:
                report.add(
                    f"log {origin}",
                    "invalid",
                    "missing-log",
                    "the trust file lists this log and the bundle does not hold it",
                )
    return report


def _final_statuses(
    bundle: BundleReader, states: Sequence[_LogState], trust: TrustPolicy, report: Report
) -> None:
    """Late evidence (docs/reputation.md): each `late_evidence` leaf's record must be a
    document signed by a trusted receipt key; a receipt's final status (pending,
    confirmed, contradicted, check-missing) is derived from it, never from the receipt."""
    from gateway.receipts.late import final_status, verify_late_evidence

    docs: dict[str, list[dict[str, Any]]] = {}
    for st in states:
        for i, e in sorted((st.leaves or {}).items()):
            if e.type != "late_evidence" or e.ref is None:
                continue
            raw = bundle.read(f"{st.base}/records/{i}.json")
            if raw is None or hashlib.sha256(raw).digest() != e.sha256:
                report.add(
                    f"log {st.log_id} index {i}",
                    "invalid",
                    "missing-file",
                    "a late_evidence leaf whose record is missing or does not match it",
                )
                continue
            try:
                docs.setdefault(e.ref, []).append(
                    verify_late_evidence(raw, trust.receipt_keys, e.ref)
                )
            except ValueError as exc:
                report.add(f"log {st.log_id} index {i}", "invalid", "bad-signature", str(exc))
    for st in states:
        for item in st.entry.get("receipts", []):
            rid = str(item["id"])
            raw = bundle.read(f"{st.base}/receipts/{rid}.json")
            try:
                ext = SignedReceipt.from_bytes(raw).receipt.extensions if raw else {}
            except (ValueError, KeyError, TypeError):
                continue  # its own findings say so
            status = final_status(ext, docs.get(rid, []))
            if status is not None:
                report.add(
                    f"receipt {rid}",
                    _lazy_finding(ext, status),
                    "final-status",
                    f"late evidence: {status}",
                    final_status=status,
                )


def _lazy_finding(ext: Mapping[str, Any], status: str) -> Literal["valid", "invalid", "pending"]:
    """A lazily proven answer (docs/zk.md) is valid only with its proof's late evidence:
    pending before it, invalid when the proof contradicts it or never came."""
    if "lazy_proof" not in ext or ext.get("lazy_proof") != "pending":
        return "valid"
    return {"verified": "valid", "pending": "pending"}.get(status, "invalid")  # type: ignore[return-value]


def _receipt_evidence(bundle: BundleReader, base: str, rid: str) -> dict[str, bytes]:
    evidence = {
        n.rsplit("/", 1)[-1]: bundle.read(n) or b"" for n in bundle.names(f"{base}/evidence/{rid}.")
    }
    shared = evidence.get(f"{rid}.shared.json")
    if shared:
        # Large material stored once per bundle by content hash; hashed again on use.
        try:
            refs = json.loads(shared)
        except ValueError:
            refs = {}
        for name, digest in refs.items() if isinstance(refs, dict) else ():
            data = bundle.read(f"{base}/evidence/shared/{digest}")
            if isinstance(name, str) and data is not None:
                if hashlib.sha256(data).hexdigest() == digest:
                    evidence[f"{rid}.{name}"] = data
    return evidence


def _link_checkpoints(
    bundle: BundleReader,
    base: str,
    subject: str,
    by_size: Mapping[int, _VerifiedCheckpoint],
    links: set[tuple[int, int]],
    report: Report,
) -> bool:
    """Consistency proofs between consecutive checkpoints; True if every one verifies."""
    sizes = sorted(by_size)
    ok = True
    for a, b in itertools.pairwise(sizes):
        s = f"{subject} consistency {a}->{b}"
        raw = bundle.read(f"{base}/consistency/{a}-{b}.proof")
        if raw is None or (a, b) not in links:
            report.add(
                s, "invalid", "missing-consistency", "no consistency proof between checkpoints"
            )
            ok = False
            continue
        try:
            proof = _parse_proof_lines(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            report.add(s, "invalid", "malformed-proof", str(exc))
            ok = False
            continue
        first, second = by_size[a].checkpoint, by_size[b].checkpoint
        if not verify_consistency(a, b, first.root, second.root, proof):
            report.add(
                s,
                "invalid",
                "inconsistent-checkpoints",
                "the later checkpoint does not extend the earlier one (truncated, reordered "
                "or forked log)",
            )
            ok = False
            continue
        report.add(s, "valid")
    if sizes:
        report.add(f"{subject} checkpoints", "valid", sizes=sizes)
    return ok


def _read_checkpoints(
    bundle: BundleReader,
    entry: Mapping[str, Any],
    check: Callable[[bytes], _VerifiedCheckpoint | Verdict],
    report: Report,
) -> dict[int, _VerifiedCheckpoint]:
    log_id = str(entry["log_id"])
    origin = str(entry.get("origin", ""))
    subject = f"log {log_id}"
    by_size: dict[int, _VerifiedCheckpoint] = {}
    for size in entry["checkpoints"]:
        raw = bundle.read(f"logs/{log_id}/checkpoints/{int(size)}.checkpoint")
        if raw is None:
            report.add(
                f"{subject} checkpoint {size}", "invalid", "missing-file", "checkpoint missing"
            )
            continue
        vc = check(raw)
        if isinstance(vc, Verdict):
            report.add(f"{subject} checkpoint {size}", "invalid", vc.code, vc.reason)
            continue
        cp = vc.checkpoint
        if (
            cp.size != int(size)
            or not cp.origin.endswith("/" + log_id)
            or (origin and cp.origin != origin)
        ):
            report.add(
                f"{subject} checkpoint {size}",
                "invalid",
                "misfiled",
                "checkpoint is of another log or size",
            )
            continue
        by_size[cp.size] = vc
    return by_size


def _verify_log_v1(
    bundle: BundleReader,
    entry: Mapping[str, Any],
    trust: TrustPolicy,
    policy: WitnessPolicy,
    salts: Mapping[str, Any] | None,
    now: dt.datetime,
    report: Report,
) -> None:
    """The v1 rules: every checkpoint satisfies the witness policy, each receipt is
    judged by the checkpoint its proof names; no inventory, no chain."""
    log_id = str(entry["log_id"])
    base = f"logs/{log_id}"
    by_size = _read_checkpoints(
        bundle, entry, lambda raw: _check_checkpoint(raw, trust, policy), report
    )
    chain = {vc.text: vc for vc in by_size.values()}
    report.logs.append(_log_facts(log_id, str(entry.get("origin", "")), by_size, None))
    links = {(int(a), int(b)) for a, b in entry["consistency"]}
    _link_checkpoints(bundle, base, f"log {log_id}", by_size, links, report)
    for item in entry["receipts"]:
        rid = str(item["id"])
        raw = bundle.read(f"{base}/receipts/{rid}.json")
        if raw is None:
            report.add(f"receipt {rid}", "invalid", "missing-file", "receipt file missing")
            continue
        proof_raw = bundle.read(f"{base}/receipts/{rid}.tlog-proof")
        if proof_raw is None and any(s > int(item["index"]) for s in by_size):
            report.add(
                f"receipt {rid}",
                "invalid",
                "missing-proof",
                "a checkpoint covers it but no proof was given",
            )
            continue
        evidence = _receipt_evidence(bundle, base, rid)
        _check_receipt(raw, proof_raw, trust, policy, chain, salts, evidence, now, report, rid)
    for e in entry.get("erased", []):
        report.add(
            f"log {log_id} index {int(e['index'])}", "erased", "erased", str(e.get("reason", ""))
        )


def _verify_log_checkpoints(
    bundle: BundleReader, entry: Mapping[str, Any], trust: TrustPolicy, report: Report
) -> _LogState:
    """v2, first pass: the chain of checkpoints and the inventory against its head."""
    log_id = str(entry["log_id"])
    st = _LogState(log_id, str(entry["origin"]), f"logs/{log_id}", entry)
    subject = f"log {log_id}"
    st.chain = _read_checkpoints(bundle, entry, lambda raw: _verify_note(raw, trust), report)
    links = {(int(a), int(b)) for a, b in entry["consistency"]}
    st.consistent = _link_checkpoints(bundle, st.base, subject, st.chain, links, report)
    if st.chain:
        top = st.chain[max(st.chain)].checkpoint
        st.head = (top.size, top.root)
    inv = entry["inventory"]
    st.start, st.size = int(inv["start"]), int(inv["size"])
    s = f"{subject} inventory"
    if st.size != st.head[0] or not 0 <= st.start <= st.size:
        report.add(
            s,
            "invalid",
            "inventory-mismatch",
            f"inventory of indices {st.start}..{st.size} does not end at the head "
            f"checkpoint (size {st.head[0]})",
        )
        return st
    if bundle.manifest.get("since") is None and st.start != 0:
        report.add(s, "invalid", "missing-entry", f"a full export starts at {st.start}, not 0")
        return st
    try:
        lines = (bundle.read(f"{st.base}/leaves") or b"").split(b"\n")
        if lines[-1] != b"":
            raise ValueError("the inventory must end with a newline")
        leaves = [LogEntry.parse(line) for line in lines[:-1]]
        left = _parse_proof_lines(bundle.read(f"{st.base}/leaves.left") or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        report.add(s, "invalid", "malformed-inventory", str(exc))
        return st
    hashes = [leaf_hash(line) for line in lines[:-1]]
    if root_from_range(st.start, st.size, hashes, left) != st.head[1]:
        report.add(
            s,
            "invalid",
            "inventory-mismatch",
            "the leaves shipped do not reproduce the head checkpoint's root",
        )
        return st
    st.leaves = {st.start + i: e for i, e in enumerate(leaves)}
    return st


def _record(bundle: BundleReader, st: _LogState, index: int, entry: LogEntry) -> Any:
    """The JSON record a log_start / erasure leaf hashes, or None if absent or not it."""
    raw = bundle.read(f"{st.base}/records/{index}.json")
    if raw is None or hashlib.sha256(raw).digest() != entry.sha256:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _logged_erasures(
    bundle: BundleReader, states: Sequence[_LogState], report: Report
) -> dict[tuple[str, int], str]:
    """(origin, index) -> reason, from the erasure leaves of every verified inventory (an
    erasure in a frozen log is logged by its successor, so this spans the bundle)."""
    out: dict[tuple[str, int], str] = {}
    for st in states:
        for i, e in sorted((st.leaves or {}).items()):
            if e.type != "erasure":
                continue
            doc = _record(bundle, st, i, e)
            try:
                origin, reason = str(doc["origin"]), str(doc["reason"])
                indices = [int(x) for x in doc["indices"]]
            except (KeyError, TypeError, ValueError):
                report.add(
                    f"log {st.log_id} index {i}",
                    "invalid",
                    "missing-file",
                    "an erasure leaf whose record is missing or does not match it",
                )
                continue
            for x in indices:
                out[(origin, x)] = reason
    return out


def _verify_log_receipts(
    bundle: BundleReader,
    st: _LogState,
    trust: TrustPolicy,
    policy: WitnessPolicy,
    salts: Mapping[str, Any] | None,
    now: dt.datetime,
    report: Report,
) -> None:
    """v2, second pass: match receipt files to receipt leaves (each leaf once), then
    check each receipt."""
    by_hash: dict[bytes, int] = {}
    for i, e in (st.leaves or {}).items():
        if e.type == "receipt":
            by_hash.setdefault(e.sha256, i)
    claimed: set[int] = set()
    listed: set[str] = set()
    for item in st.entry["receipts"]:
        rid, index = str(item["id"]), int(item["index"])
        subject = f"receipt {rid}"
        if index in claimed or rid in listed:
            report.add(
                subject, "invalid", "duplicate-entry", f"index {index} is listed more than once"
            )
            continue
        claimed.add(index)
        listed.add(rid)
        raw = bundle.read(f"{st.base}/receipts/{rid}.json")
        if raw is None:
            report.add(subject, "invalid", "missing-file", "receipt file missing")
            continue
        found = by_hash.get(hashlib.sha256(raw).digest())
        if found is not None and (found != index or found in st.matched):
            report.add(
                subject,
                "invalid",
                "duplicate-entry",
                f"a copy of the receipt at index {found}, listed as index {index}",
            )
            continue
        if found is not None:
            st.matched.add(found)
        proof_raw = bundle.read(f"{st.base}/receipts/{rid}.tlog-proof")
        if proof_raw is None and any(s > index for s in st.chain):
            report.add(
                subject, "invalid", "missing-proof", "a checkpoint covers it but no proof was given"
            )
            continue
        evidence = _receipt_evidence(bundle, st.base, rid)
        _check_receipt(raw, proof_raw, trust, policy, None, salts, evidence, now, report, rid, st)
    for name in bundle.names(f"{st.base}/receipts/"):
        rid = name.rsplit("/", 1)[-1].removesuffix(".json")
        if not name.endswith(".json") or rid in listed:
            continue
        found = by_hash.get(hashlib.sha256(bundle.read(name) or b"").digest())
        dup = found is not None and found in claimed
        report.add(
            f"receipt {rid}",
            "invalid",
            "duplicate-entry" if dup else "unlisted-file",
            f"a second file for the receipt at index {found}"
            if dup
            else "a receipt file the manifest does not list",
        )


def _classify(st: _LogState, erased: Mapping[tuple[str, int], str], report: Report) -> None:
    """v2, third pass: every index of the inventory is a receipt present, an erased one,
    or an event; a receipt leaf with neither file nor logged erasure was left out."""
    if st.leaves is None:
        return
    counts: dict[str, Any] = {"start": st.start, "size": st.size, "receipts": 0, "erased": 0}
    counts["events"] = 0
    for i, e in sorted(st.leaves.items()):
        if e.type != "receipt":
            counts["events"] += 1
        elif i in st.matched:
            counts["receipts"] += 1
        elif (st.origin, i) in erased:
            counts["erased"] += 1
            report.add(f"log {st.log_id} index {i}", "erased", "erased", erased[(st.origin, i)])
        else:
            report.add(
                f"log {st.log_id} index {i}",
                "invalid",
                "missing-entry",
                "the log holds a receipt here; the bundle has neither it nor a logged erasure",
            )
    report.findings.append(Finding(f"log {st.log_id} inventory", "valid", details=counts))


def _check_chains(bundle: BundleReader, states: Sequence[_LogState], report: Report) -> None:
    """Each log's leaf 0 names its predecessor; that log, with that head, must be here."""
    heads = {st.origin: st.head for st in states}
    for st in states:
        subject = f"log {st.log_id} chain"
        inv = st.entry["inventory"]
        if not st.chain:
            report.add(subject, "pending", "not-in-checkpoint", "no checkpoint yet")
            continue
        if st.head[0] != st.size:
            continue  # the inventory is already invalid: its head is not the one shipped
        try:
            first = LogEntry.parse(str(inv["first_leaf"]).encode())
            proof = [unb64(h, HASH_SIZE) for h in inv["start_proof"]]
        except (KeyError, TypeError, ValueError) as exc:
            report.add(subject, "invalid", "unchained-log", f"no usable first leaf: {exc}")
            continue
        size, root = st.head
        if not verify_inclusion(0, size, leaf_hash(first.leaf_data()), proof, root):
            report.add(subject, "invalid", "unchained-log", "the first leaf is not leaf 0")
            continue
        if first.type != "log_start":
            report.add(
                subject,
                "valid",
                "no-start-leaf",
                "log created before chained logs: its predecessor cannot be checked",
            )
            continue
        doc = _record(bundle, st, 0, first)
        pred: Any = doc.get("predecessor", "?") if isinstance(doc, dict) else "?"
        if pred is None:
            report.add(subject, "valid", "genesis")
            continue
        try:
            want = (int(pred["size"]), unb64(str(pred["root"]), HASH_SIZE))
            origin = str(pred["origin"])
        except (KeyError, TypeError, ValueError):
            report.add(subject, "invalid", "unchained-log", "its log_start record is missing")
            continue
        if origin not in heads:
            report.add(
                subject,
                "invalid",
                "unchained-log",
                f"its predecessor {origin} is not in the bundle",
            )
        elif heads[origin] != want:
            report.add(
                subject,
                "invalid",
                "unchained-log",
                f"its predecessor {origin} is shipped with head size {heads[origin][0]}, "
                f"not the size {want[0]} it committed to",
            )
        else:
            report.add(subject, "valid", predecessor=origin)


def verify_receipt_file(
    path: Path,
    trust: TrustPolicy,
    require: Sequence[str] = (),
    salts: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
    quorum: int | None = None,
) -> Report:
    """One receipt as a user holds it, each checked against the trust file's keys:

    - the stored envelope (``X.json``, canonical), with ``X.tlog-proof`` beside it if any;
    - the body of ``GET /v2/receipts/{id}`` exactly as the API returns it (the envelope
      plus ``inclusion_proof``, in whatever JSON formatting the client saved);
    - the compact ``ztgate-receipt/v1 ...`` line of a response (signature only).

    Anything else raises `BundleError` (a usage error): a wrong file is not a forgery.
    Its proof's checkpoint must itself satisfy the witness policy."""
    raw = path.read_bytes()
    now = now or dt.datetime.now(dt.UTC)
    policy = WitnessPolicy(tuple(require), trust.witness_quorum if quorum is None else quorum)
    if raw.lstrip().startswith(SUMMARY_PREFIX.encode() + b" "):
        report = Report(scope=_scope("summary line", trust, policy, salts, now))
        _check_summary_line(raw, trust, report)
        return report
    report = Report(scope=_scope("receipt", trust, policy, salts, now))
    envelope, proof_raw = _receipt_input(path, raw)
    sidecar = path.with_suffix(".tlog-proof")
    if proof_raw is None and sidecar.is_file():
        proof_raw = sidecar.read_bytes()
    _check_receipt(
        envelope,
        proof_raw,
        trust,
        policy,
        None,
        salts,
        {},
        now,
        report,
    )
    return report


def _receipt_input(path: Path, raw: bytes) -> tuple[bytes, bytes | None]:
    """(canonical envelope, embedded tlog-proof) from a stored receipt or an API body."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BundleError(
            f"{path} is not a receipt: expected a receipt .json, the body of "
            "GET /v2/receipts/{id}, or a ztgate-receipt/v1 line"
        ) from None
    if not isinstance(doc, dict) or not {"receipt", "sig"} <= set(doc):
        raise BundleError(f"{path} is JSON but not a receipt (no 'receipt' and 'sig')")
    proof = doc.pop("inclusion_proof", None)
    if proof is not None and not isinstance(proof, str):
        raise BundleError(f"{path}: inclusion_proof must be a tlog-proof string")
    # What the API derives beside the receipt (docs/reputation.md) is not signed and not
    # believed: a final status is derived here only from signed late evidence in a bundle.
    doc.pop("final_status", None)
    doc.pop("late_evidence", None)
    if set(doc) != {"receipt", "sig"}:
        return raw, None  # judged as stored, so the report names what is extra
    # The API's JSON formatting is not the receipt's: the signature and the log leaf are
    # over the canonical form, which is recomputed here and then checked like any other.
    return canonical_json(doc), proof.encode() if proof is not None else None


def _check_summary_line(raw: bytes, trust: TrustPolicy, report: Report) -> None:
    line = raw.decode("utf-8", "replace").strip()
    parts = line.split(" ")
    subject = f"receipt {parts[1]}" if len(parts) > 1 else "receipt summary"
    v = verify_summary(line, trust.receipt_keys)
    if not v:
        report.add(subject, "invalid", v.code, v.reason)
        return
    report.add(
        subject,
        "valid",
        "signature-only",
        "a summary line: its signature checks against the trust file; its place in the "
        "log is not checked (verify the full receipt or a bundle for that)",
        key_id=parts[3],
    )


def verify_path(
    path: Path,
    trust: TrustPolicy,
    require: Sequence[str] = (),
    salts: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
    quorum: int | None = None,
    witness_grace: dt.timedelta = WITNESS_GRACE,
) -> Report:
    """A bundle (directory or .tar) or a single receipt file. Raises `BundleError` (usage).
    `witness_grace`: see `verify_bundle`."""
    for name in require:
        if name not in trust.witnesses:
            raise TrustError(f"required witness {name!r} is not in the trust file")
    if quorum is not None and not 0 <= quorum <= len(trust.witnesses):
        raise TrustError(f"witness quorum {quorum}: the trust file has {len(trust.witnesses)}")
    if witness_grace < dt.timedelta(0):
        raise TrustError("the witness grace cannot be negative")
    if path.is_file() and not tarfile.is_tarfile(path):
        report = verify_receipt_file(path, trust, require, salts, now, quorum)
    else:
        report = verify_bundle(
            BundleReader(path), trust, require, salts, now, quorum, witness_grace
        )
    report.scope["target"] = str(path)
    return report
