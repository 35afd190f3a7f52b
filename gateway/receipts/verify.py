"""Offline verification of audit bundles and single receipts (what `ztgate verify` runs).

Keys come only from the auditor's trust file (`TrustPolicy`), never from the bundle.
Nothing here opens a socket. Every check yields a `Finding` with a status:

    valid    signature, inclusion in a signed (and, if required, cosigned) checkpoint,
             key window, consistency and, when given, the client's salts all check out
    invalid  something failed; `code` and `reason` say what
    pending  signed, but no checkpoint includes it yet (final once one does)
    erased   the body was deleted (retention or erasure); its leaf and proofs remain

A report's status is `invalid` if any finding is, else `pending` if any is, else `valid`.
`docs/compliance.md` is the auditor's guide to these statuses and codes.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.protocol.codec import decode_request
from gateway.protocol.problems import Problem
from gateway.protocol.tensors import Tensor
from gateway.receipts.bundle import BundleReader
from gateway.receipts.canonical import unb64
from gateway.receipts.commit import commit_tensor
from gateway.receipts.entry import TLOG_PROOF_HEADER, LogEntry
from gateway.receipts.merkle import HASH_SIZE, leaf_hash, verify_consistency, verify_inclusion
from gateway.receipts.model import FormatError, Receipt, SignedReceipt, TensorRef
from gateway.receipts.note import Checkpoint, NoteError, NoteKey, SignedNote, WitnessKey
from gateway.receipts.signing import KeySet, Verdict, format_time

__all__ = [
    "PROOF_VERIFIERS",
    "Finding",
    "Report",
    "TrustError",
    "TrustPolicy",
    "register_proof_verifier",
    "verify_bundle",
    "verify_path",
    "verify_receipt_file",
]

Status = Literal["valid", "invalid", "pending", "erased"]
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
    origin_prefix: str
    public_key: ed25519.Ed25519PublicKey

    def key_for(self, origin: str) -> NoteKey | None:
        return NoteKey(origin, self.public_key) if origin.startswith(self.origin_prefix) else None


@dataclass
class TrustPolicy:
    """The auditor's trust file: receipt keys (with windows), log keys, witness keys."""

    receipt_keys: KeySet
    log_keys: list[TrustedLogKey]
    witnesses: dict[str, WitnessKey]

    @classmethod
    def load(cls, path: Path) -> TrustPolicy:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise TrustError(f"cannot read trust file {path}: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> TrustPolicy:
        try:
            if not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT:
                raise ValueError(f"format must be {TRUST_FORMAT!r}")
            keys = KeySet.from_json(json.dumps(doc["receipt_keys"]))
            logs = [
                TrustedLogKey(
                    str(entry["origin_prefix"]),
                    ed25519.Ed25519PublicKey.from_public_bytes(unb64(str(entry["public_key"]), 32)),
                )
                for entry in doc["log_keys"]
            ]
            witnesses = {}
            for entry in doc.get("witnesses", []):
                wk = WitnessKey.from_vkey(str(entry["vkey"]))
                witnesses[wk.name] = wk
        except (KeyError, TypeError, ValueError) as exc:
            raise TrustError(f"invalid trust file: {exc}") from None
        if not logs or not len(keys):
            raise TrustError("a trust file needs at least one receipt key and one log key")
        return cls(keys, logs, witnesses)

    def to_dict(self) -> dict[str, Any]:
        from gateway.receipts.canonical import b64
        from gateway.receipts.signing import raw_public

        return {
            "format": TRUST_FORMAT,
            "receipt_keys": json.loads(self.receipt_keys.to_json()),
            "log_keys": [
                {"origin_prefix": k.origin_prefix, "public_key": b64(raw_public(k.public_key))}
                for k in self.log_keys
            ],
            "witnesses": [{"vkey": w.vkey()} for w in self.witnesses.values()],
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
    findings: list[Finding] = field(default_factory=list)

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
        }

    def render(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        lines = [f"status: {self.status.upper()}  ({counts})"]
        for f in self.findings:
            if f.status != "valid":
                lines.append(f"  {f.status.upper():8} {f.subject}: [{f.code}] {f.reason}")
        valid = [f for f in self.findings if f.status == "valid"]
        if valid:
            lines.append(f"  {len(valid)} item(s) valid")
        return "\n".join(lines)


# --- checkpoints -------------------------------------------------------------------------
@dataclass(frozen=True)
class _VerifiedCheckpoint:
    checkpoint: Checkpoint
    text: str
    time: int  # effective time: log's, or the later of it and the required witnesses'


def _check_checkpoint(
    raw: str | bytes, trust: TrustPolicy, require: Sequence[str]
) -> _VerifiedCheckpoint | Verdict:
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
    effective = cp.time
    for name in require:
        status, ts = trust.witnesses[name].verify(note)
        if status == "invalid":
            return Verdict.failure("bad-cosignature", f"witness {name}'s cosignature fails")
        if status == "absent":
            return Verdict.failure("missing-cosignature", f"witness {name} did not cosign")
        effective = max(effective, ts)
    return _VerifiedCheckpoint(cp, note.text, effective)


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
def _check_receipt(
    raw: bytes,
    proof_raw: bytes | None,
    trust: TrustPolicy,
    require: Sequence[str],
    chain: Mapping[str, _VerifiedCheckpoint] | None,
    salts: Mapping[str, Any] | None,
    evidence: Mapping[str, bytes],
    now: dt.datetime,
    report: Report,
    expected_id: str | None = None,
) -> None:
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
    leaf = leaf_hash(LogEntry("receipt", hashlib.sha256(raw).digest()).leaf_data())
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
    vc = _check_checkpoint(note_text, trust, require)
    if isinstance(vc, Verdict):
        report.add(subject, "invalid", vc.code, f"its checkpoint: {vc.reason}")
        return
    if not vc.checkpoint.origin.endswith("/" + r.log_id):
        report.add(subject, "invalid", "wrong-log", f"checkpoint is of {vc.checkpoint.origin}")
        return
    if chain is not None:
        known = chain.get(vc.text)
        if known is None:
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
    when = dt.datetime.fromtimestamp(vc.time, dt.UTC)
    window = trust.receipt_keys.window(r.key_id, when)
    if not window:
        report.add(subject, "invalid", window.code, window.reason)
        return
    details: dict[str, Any] = {
        "index": r.index,
        "log_id": r.log_id,
        "kind": r.kind,
        "checkpoint_size": vc.checkpoint.size,
        "checkpoint_time": format_time(when),
    }
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
    report.add(subject, "valid", **details)


# --- bundles -----------------------------------------------------------------------------
def verify_bundle(
    bundle: BundleReader,
    trust: TrustPolicy,
    require: Sequence[str] = (),
    salts: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> Report:
    now = now or dt.datetime.now(dt.UTC)
    report = Report()
    for entry in bundle.manifest["logs"]:
        try:
            _verify_log(bundle, entry, trust, require, salts, now, report)
        except (KeyError, TypeError, ValueError) as exc:
            report.add("bundle", "invalid", "malformed-manifest", str(exc))
    return report


def _verify_log(
    bundle: BundleReader,
    entry: Mapping[str, Any],
    trust: TrustPolicy,
    require: Sequence[str],
    salts: Mapping[str, Any] | None,
    now: dt.datetime,
    report: Report,
) -> None:
    log_id = str(entry["log_id"])
    base = f"logs/{log_id}"
    subject = f"log {log_id}"
    chain: dict[str, _VerifiedCheckpoint] = {}
    by_size: dict[int, _VerifiedCheckpoint] = {}
    for size in entry["checkpoints"]:
        raw = bundle.read(f"{base}/checkpoints/{int(size)}.checkpoint")
        if raw is None:
            report.add(
                f"{subject} checkpoint {size}", "invalid", "missing-file", "checkpoint missing"
            )
            continue
        vc = _check_checkpoint(raw, trust, require)
        if isinstance(vc, Verdict):
            report.add(f"{subject} checkpoint {size}", "invalid", vc.code, vc.reason)
            continue
        if vc.checkpoint.size != int(size) or not vc.checkpoint.origin.endswith("/" + log_id):
            report.add(
                f"{subject} checkpoint {size}",
                "invalid",
                "misfiled",
                "checkpoint is of another log or size",
            )
            continue
        chain[vc.text] = vc
        by_size[vc.checkpoint.size] = vc
    sizes = sorted(by_size)
    links = {(int(a), int(b)) for a, b in entry["consistency"]}
    for a, b in itertools.pairwise(sizes):
        s = f"{subject} consistency {a}->{b}"
        raw = bundle.read(f"{base}/consistency/{a}-{b}.proof")
        if raw is None or (a, b) not in links:
            report.add(
                s, "invalid", "missing-consistency", "no consistency proof between checkpoints"
            )
            continue
        try:
            proof = _parse_proof_lines(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            report.add(s, "invalid", "malformed-proof", str(exc))
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
            continue
        report.add(s, "valid")
    if sizes:
        report.add(f"{subject} checkpoints", "valid", sizes=sizes)
    for item in entry["receipts"]:
        rid = str(item["id"])
        raw = bundle.read(f"{base}/receipts/{rid}.json")
        if raw is None:
            report.add(f"receipt {rid}", "invalid", "missing-file", "receipt file missing")
            continue
        proof_raw = bundle.read(f"{base}/receipts/{rid}.tlog-proof")
        if proof_raw is None and any(s > int(item["index"]) for s in sizes):
            report.add(
                f"receipt {rid}",
                "invalid",
                "missing-proof",
                "a checkpoint covers it but no proof was given",
            )
            continue
        evidence = {
            n.rsplit("/", 1)[-1]: bundle.read(n) or b""
            for n in bundle.names(f"{base}/evidence/{rid}.")
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
        _check_receipt(raw, proof_raw, trust, require, chain, salts, evidence, now, report, rid)
    for e in entry.get("erased", []):
        report.add(
            f"log {log_id} index {int(e['index'])}", "erased", "erased", str(e.get("reason", ""))
        )


def verify_receipt_file(
    path: Path,
    trust: TrustPolicy,
    require: Sequence[str] = (),
    salts: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> Report:
    """A single receipt (``X.json``), with its ``X.tlog-proof`` beside it if it has one."""
    report = Report()
    proof = path.with_suffix(".tlog-proof")
    _check_receipt(
        path.read_bytes(),
        proof.read_bytes() if proof.is_file() else None,
        trust,
        require,
        None,
        salts,
        {},
        now or dt.datetime.now(dt.UTC),
        report,
    )
    return report


def verify_path(
    path: Path,
    trust: TrustPolicy,
    require: Sequence[str] = (),
    salts: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> Report:
    """A bundle (directory or .tar) or a single receipt file. Raises `BundleError` (usage)."""
    for name in require:
        if name not in trust.witnesses:
            raise TrustError(f"required witness {name!r} is not in the trust file")
    if path.is_file() and path.suffix == ".json":
        return verify_receipt_file(path, trust, require, salts, now)
    return verify_bundle(BundleReader(path), trust, require, salts, now)
