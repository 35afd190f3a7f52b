"""Audit bundles: everything an auditor needs to verify receipts offline, in one place.

Layout (a directory, or the same inside a ``.tar``)::

    manifest.json                                   index of what is below
    keys/receipt-keys.json                          published receipt key set (windows)
    keys/log-keys.json                              each log's origin and checkpoint vkey
    keys/witness-keys.json                          witnesses that cosigned, with vkeys
    logs/<log id>/checkpoints/<size>.checkpoint     signed checkpoints with cosignatures
    logs/<log id>/consistency/<a>-<b>.proof         RFC 9162 proofs between them (base64 lines)
    logs/<log id>/receipts/<receipt id>.json        the signed receipt (canonical JSON)
    logs/<log id>/receipts/<receipt id>.tlog-proof  C2SP tlog-proof: inclusion + checkpoint

The keys in a bundle are for reading only: `ztgate verify` takes keys from the auditor's
trust file and nowhere else, so a bundle re-signed end to end with other keys fails.

Which checkpoints: for each receipt, the earliest checkpoint that includes it (that is
the one whose time judges the receipt key's validity window), plus the log's latest;
consecutive ones are linked by consistency proofs, so a truncated, reordered or forked
history between them cannot verify.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.receipts.canonical import b64
from gateway.receipts.log import ReceiptLog
from gateway.receipts.note import Checkpoint

__all__ = ["BUNDLE_FORMAT", "BundleError", "BundleReader", "ExportSummary", "export_bundle"]

BUNDLE_FORMAT = "ztgate-audit-bundle/v1"
MAX_MEMBER = 256 << 20


class BundleError(Exception):
    """Not a bundle, or one that cannot be read at all (a usage error, exit 2)."""


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    logs: int
    receipts: int
    checkpoints: int
    erased: int


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.written: set[str] = set()
        self.tar: tarfile.TarFile | None = None
        if out.suffix == ".tar":
            out.parent.mkdir(parents=True, exist_ok=True)
            self.tar = tarfile.open(out, "w")
        else:
            out.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        self.written.add(name)
        if self.tar is not None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(data))
        else:
            path = self.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _proof_text(proof: list[bytes]) -> bytes:
    return "".join(f"{b64(h)}\n" for h in proof).encode()


def export_bundle(log_dir: Path, out: Path, since: dt.datetime | None = None) -> ExportSummary:
    """Write an audit bundle of every log under `log_dir` (receipts created since `since`)."""
    paths = ReceiptLog.all_logs(log_dir)
    if not paths:
        raise BundleError(f"no receipt logs under {log_dir}")
    since_ts = since.timestamp() if since is not None else 0.0
    w = _Writer(out)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "since": since.isoformat() if since else None,
        "logs": [],
    }
    log_keys, witness_keys = [], {}
    totals = {"receipts": 0, "checkpoints": 0, "erased": 0}
    try:
        for path in paths:
            rl = ReceiptLog.open_readonly(path)
            try:
                entry = _export_log(rl, w, since_ts, totals)
                manifest["logs"].append(entry)
                log_keys.append({"origin": rl.origin, "vkey": rl.note_key().vkey()})
                witness_keys.update(rl.witness_vkeys())
            finally:
                rl.close_sync()
        keyset = log_dir / "keys.json"
        if keyset.is_file():
            w.put("keys/receipt-keys.json", keyset.read_bytes())
        w.put("keys/log-keys.json", json.dumps(log_keys, indent=1).encode())
        w.put(
            "keys/witness-keys.json",
            json.dumps(
                [{"name": n, "vkey": k} for n, k in witness_keys.items()], indent=1
            ).encode(),
        )
        w.put("manifest.json", json.dumps(manifest, indent=1).encode())
    finally:
        w.close()
    return ExportSummary(
        out, len(paths), totals["receipts"], totals["checkpoints"], totals["erased"]
    )


def _export_evidence(rl: ReceiptLog, w: _Writer, base: str, receipt_id: str) -> None:
    """A receipt's evidence files, and the shared material they name (once per bundle)."""
    root = rl.path / "evidence"
    for f in sorted(root.glob(f"{receipt_id}.*")) if root.is_dir() else ():
        w.put(f"{base}/evidence/{f.name}", f.read_bytes())
        if f.name.endswith(".shared.json"):
            for digest in sorted(set(json.loads(f.read_text()).values())):
                name = f"{base}/evidence/shared/{digest}"
                if name not in w.written:
                    w.put(name, (root / "shared" / digest).read_bytes())


def _export_log(
    rl: ReceiptLog, w: _Writer, since_ts: float, totals: dict[str, int]
) -> dict[str, Any]:
    base = f"logs/{rl.log_id}"
    receipts: list[dict[str, Any]] = []
    sizes: set[int] = set()
    for body in rl.bodies(since_ts):
        cp_note = rl.checkpoint_including(body.index)
        item: dict[str, Any] = {"id": body.receipt_id, "index": body.index}
        w.put(f"{base}/receipts/{body.receipt_id}.json", body.body)
        if cp_note is not None:
            size = Checkpoint.parse_text(cp_note.text).size
            sizes.add(size)
            proof = rl.proof(body.index)
            assert proof is not None
            w.put(f"{base}/receipts/{body.receipt_id}.tlog-proof", proof.encode())
            item["proof"] = True
        _export_evidence(rl, w, base, body.receipt_id)
        receipts.append(item)
    latest = rl.latest_checkpoint()
    if latest is not None:
        sizes.add(Checkpoint.parse_text(latest.text).size)
    notes = {
        Checkpoint.parse_text(n.text).size: n
        for n in rl.checkpoints()
        if Checkpoint.parse_text(n.text).size in sizes
    }
    ordered = sorted(notes)
    for size in ordered:
        w.put(f"{base}/checkpoints/{size}.checkpoint", notes[size].render().encode())
    links = []
    for a, b in itertools.pairwise(ordered):
        w.put(f"{base}/consistency/{a}-{b}.proof", _proof_text(rl.consistency(a, b)))
        links.append([a, b])
    first = min((r["index"] for r in receipts), default=None)
    erased = [
        {"index": i, "reason": reason}
        for i, reason in sorted(rl.erased().items())
        if first is None or i >= first
    ]
    others = [
        {"index": i, "type": e.type, "sha256": e.sha256.hex(), **({"ref": e.ref} if e.ref else {})}
        for i, e in rl.entries(first or 0)
        if e.type != "receipt"
    ]
    totals["receipts"] += len(receipts)
    totals["checkpoints"] += len(ordered)
    totals["erased"] += len(erased)
    return {
        "log_id": rl.log_id,
        "origin": rl.origin,
        "size": rl.size,
        "frozen": rl.frozen_reason,
        "checkpoints": ordered,
        "consistency": links,
        "receipts": receipts,
        "erased": erased,
        "entries": others,
    }


class BundleReader:
    """Read-only access to a bundle directory or ``.tar`` (no extraction to disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, bytes] = {}
        if path.is_dir():
            for p in path.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    self._files[p.relative_to(path).as_posix()] = p.read_bytes()
        elif path.is_file() and tarfile.is_tarfile(path):
            try:
                with tarfile.open(path, "r") as tar:
                    for m in tar.getmembers():
                        if not m.isfile() or m.size > MAX_MEMBER:
                            continue
                        f = tar.extractfile(m)
                        if f is not None:
                            self._files[m.name.lstrip("./")] = f.read()
            except (tarfile.TarError, OSError) as exc:
                raise BundleError(f"{path}: unreadable tar: {exc}") from None
        else:
            raise BundleError(f"{path} is not a bundle directory or .tar")
        raw = self._files.get("manifest.json")
        if raw is None:
            raise BundleError(f"{path}: no manifest.json; not an audit bundle")
        try:
            self.manifest = json.loads(raw)
        except ValueError as exc:
            raise BundleError(f"{path}: manifest.json is not JSON: {exc}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: not a {BUNDLE_FORMAT} bundle")
        if not isinstance(self.manifest.get("logs"), list):
            raise BundleError(f"{path}: manifest has no list of logs")

    def read(self, name: str) -> bytes | None:
        return self._files.get(name)

    def names(self, prefix: str = "") -> Iterator[str]:
        return (n for n in sorted(self._files) if n.startswith(prefix))
