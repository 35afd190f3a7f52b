"""Export audit bundles from a replica's receipt logs (layout: `gateway.receipts.bundle`)."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.receipts.bundle import BUNDLE_FORMAT, BundleError
from gateway.receipts.canonical import b64
from gateway.receipts.log import ReceiptLog
from gateway.receipts.note import Checkpoint

__all__ = ["ExportSummary", "export_bundle"]


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
