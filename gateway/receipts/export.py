"""Export audit bundles from the replicas' receipt logs (layout: `gateway.receipts.bundle`)."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.receipts.bundle import BUNDLE_FORMAT, BundleError
from gateway.receipts.canonical import b64
from gateway.receipts.log import ReceiptLog, tlog_proof
from gateway.receipts.note import Checkpoint
from gateway.receipts.signing import KeySet, PublishedKey

__all__ = ["ExportSummary", "Writer", "export_bundle", "gather_logs", "merged_keyset", "proof_text"]


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    logs: int
    receipts: int
    checkpoints: int
    erased: int


class Writer:
    """A bundle being written: a directory, or a tar file when `out` ends in .tar."""

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


def proof_text(proof: list[bytes]) -> bytes:
    return "".join(f"{b64(h)}\n" for h in proof).encode()


def replica_dirs(log_dir: Path) -> list[Path]:
    """`log_dir` and its worker dirs: a replica served by several processes keeps a log
    per worker under `<receipts dir>/w<i>/` (gateway/supervisor.py), and its receipts dir
    stands for all of them, so no worker's log can be left out of a bundle by mistake."""
    workers = sorted(
        (p for p in log_dir.glob("w*") if p.is_dir() and p.name[1:].isdigit()),
        key=lambda p: int(p.name[1:]),
    )
    return [log_dir, *workers]


def gather_logs(log_dirs: Path | Sequence[Path]) -> list[Path]:
    """Every log under each of `log_dirs` (one per replica, say, and each replica's
    worker dirs: `replica_dirs`), oldest first per dir.

    A log found twice (the same log id in two dirs: a dir given twice, or a replica's
    volume mounted twice, or a copy of a log) is refused: a bundle must hold each log
    once, and two copies need not hold the same head."""
    dirs = [log_dirs] if isinstance(log_dirs, Path) else list(log_dirs)
    found: dict[str, Path] = {}
    paths: list[Path] = []
    for d in dirs:
        logs = [p for sub in replica_dirs(d) for p in ReceiptLog.all_logs(sub)]
        if not logs:
            raise BundleError(f"no receipt logs under {d}")
        for path in logs:
            seen = found.setdefault(path.name, path)
            if seen is not path:
                raise BundleError(
                    f"log {path.name} is under more than one --log-dir: {seen.parent} and "
                    f"{d} (give each replica's receipts dir once)"
                )
            paths.append(path)
    return paths


def merged_keyset(log_dirs: Path | Sequence[Path]) -> KeySet | None:
    """The receipt keys published beside the logs (`keys.json`), merged across dirs.

    Replicas sharing one receipt key each publish it with the time they first loaded it,
    and retire it when they rotate; the deployment used it from the earliest of those
    times until the latest retirement (still current if any replica has not retired it).
    None: no dir publishes keys."""
    dirs = [log_dirs] if isinstance(log_dirs, Path) else list(log_dirs)
    merged: dict[str, PublishedKey] = {}
    any_found = False
    for d in (sub for top in dirs for sub in replica_dirs(top)):
        path = d / "keys.json"
        if not path.is_file():
            continue
        any_found = True
        for k in KeySet.load(path):
            have = merged.get(k.key_id)
            if have is None:
                merged[k.key_id] = k
                continue
            until = (
                None
                if have.valid_until is None or k.valid_until is None
                else max(have.valid_until, k.valid_until)
            )
            merged[k.key_id] = replace(
                have, valid_from=min(have.valid_from, k.valid_from), valid_until=until
            )
    return KeySet(merged.values()) if any_found else None


def export_bundle(
    log_dirs: Path | Sequence[Path], out: Path, since: dt.datetime | None = None
) -> ExportSummary:
    """Write one audit bundle of every log under each of `log_dirs` (each replica's
    receipts dir), with receipts created since `since`."""
    paths = gather_logs(log_dirs)
    since_ts = since.timestamp() if since is not None else 0.0
    w = Writer(out)
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
        keyset = merged_keyset(log_dirs)
        if keyset is not None:
            w.put("keys/receipt-keys.json", keyset.to_json())
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


def _export_evidence(rl: ReceiptLog, w: Writer, base: str, receipt_id: str) -> None:
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
    rl: ReceiptLog, w: Writer, since_ts: float, totals: dict[str, int]
) -> dict[str, Any]:
    base = f"logs/{rl.log_id}"
    notes = {Checkpoint.parse_text(n.text).size: n for n in rl.checkpoints()}
    _, head, _ = rl.head()
    cosigners = rl.cosigners()
    cosigned = sorted((s for s in notes if cosigners.get(s)), reverse=True)
    # Checkpoints a verifier may need to satisfy any witness policy over this log's
    # witnesses: the latest cosigned by each witness, and by at least k of them for each k
    # (a later cosigned checkpoint covers every earlier leaf, through consistency).
    witnessed: set[int] = set()
    names = set().union(*cosigners.values()) if cosigners else set()
    for name in names:
        witnessed.add(next(s for s in cosigned if name in cosigners[s]))
    for k in range(1, len(names) + 1):
        witnessed.add(next(s for s in cosigned if len(cosigners[s]) >= k))
    sizes: set[int] = (witnessed | {head}) & notes.keys()

    bodies = list(rl.bodies(since_ts))
    # The inventory range: every leaf from the first exported receipt (or logged erasure,
    # which may account for receipts of this range) to the head. Without `since`, all.
    firsts = [b.index for b in bodies] + rl.records_since(since_ts) if since_ts else [0]
    start = min([*firsts, head])
    receipts: list[dict[str, Any]] = []
    for body in bodies:
        item: dict[str, Any] = {"id": body.receipt_id, "index": body.index}
        w.put(f"{base}/receipts/{body.receipt_id}.json", body.body)
        covering = [s for s in notes if s > body.index]
        if covering:
            sizes.add(min(covering))  # its earliest: judges the receipt key's window
            # The proof a lone receipt is checked with: against the most witnessed
            # checkpoint that covers it (the latest such), so it satisfies a witness policy.
            best = max(covering, key=lambda s: (len(cosigners.get(s, ())), s))
            sizes.add(best)
            note = notes[best]
            w.put(
                f"{base}/receipts/{body.receipt_id}.tlog-proof",
                tlog_proof(body.index, rl.inclusion(body.index, best), note.render()).encode(),
            )
            item["proof"] = True
        _export_evidence(rl, w, base, body.receipt_id)
        receipts.append(item)
    ordered = sorted(sizes)
    for size in ordered:
        w.put(f"{base}/checkpoints/{size}.checkpoint", notes[size].render().encode())
    links = []
    for a, b in itertools.pairwise(ordered):
        w.put(f"{base}/consistency/{a}-{b}.proof", proof_text(rl.consistency(a, b)))
        links.append([a, b])

    leaves = []
    for i, e in rl.entries(start, head):
        leaves.append(e.leaf_data() + b"\n")
        if e.type in ("erasure", "log_start", "late_evidence", "node_quarantine", "node_release"):
            record = rl.record(i)
            if record is not None:
                w.put(f"{base}/records/{i}.json", record)
    w.put(f"{base}/leaves", b"".join(leaves))
    w.put(f"{base}/leaves.left", proof_text(rl.tree.left_hashes(start, head)))
    start_record = rl.record(0)
    if start_record is not None:
        w.put(f"{base}/records/0.json", start_record)
    erased = [
        {"index": i, "reason": reason} for i, reason in sorted(rl.erased(start, head).items())
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
        "inventory": {
            "start": start,
            "size": head,
            # Leaf 0 (the log_start entry) and its proof: a log's chain is checkable
            # whatever range it is exported with.
            "first_leaf": rl.entry(0).leaf_data().decode() if head else None,
            "start_proof": [b64(h) for h in rl.inclusion(0, head)] if head else [],
        },
    }
