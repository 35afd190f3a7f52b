"""`ztgate audit ...`: compliance exports, published keys, retention and erasure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.cli import UsageError, emit, json_option


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="receipt logs: audit bundles, keys, retention, erasure")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    # --log-dir is repeatable for export and trust: each replica writes its own log (its
    # receipts dir, mounted read-only on the audit host, say), and one bundle and one trust
    # file must cover them all, or a bundle of one replica would pass for the deployment's.
    multi = "a replica's receipts dir; repeat it for every replica"
    export = verbs.add_parser("export", help="write an offline audit bundle (dir or .tar)")
    export.add_argument(
        "--log-dir", type=Path, action="append", required=True, metavar="DIR", help=multi
    )
    export.add_argument("--since", metavar="ISO", help="receipts created at or after this time")
    export.add_argument("out", type=Path, metavar="OUT", help="directory, or a path ending .tar")
    json_option(export)
    export.set_defaults(func=_export)

    trust = verbs.add_parser(
        "trust",
        help="print a trust-file template from the log dirs' published keys and logs' origins",
    )
    trust.add_argument(
        "--log-dir", type=Path, action="append", required=True, metavar="DIR", help=multi
    )
    trust.add_argument("--origin-prefix", help="trust log keys for origins with this prefix")
    trust.set_defaults(func=_trust)

    erase = verbs.add_parser("erase", help="delete receipt bodies (erasure request)")
    erase.add_argument("--log-dir", type=Path, required=True, metavar="DIR")
    erase.add_argument("--reason", default="erasure-request")
    jobs = erase.add_mutually_exclusive_group()
    jobs.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the replica's data_dir: also delete the jobs (docs/jobs.md) holding these receipts",
    )
    jobs.add_argument(
        "--config",
        type=Path,
        metavar="F",
        help="the gateway's TOML: also delete the jobs holding these receipts where it keeps "
        "them (its Redis, else its data_dir)",
    )
    erase.add_argument(
        "--subject",
        metavar="SPIFFE_ID",
        help="with --data-dir or --config: also delete every job of this client, queued ones "
        "too (its receipts are erased by their ids)",
    )
    erase.add_argument("receipt_ids", nargs="*", metavar="RECEIPT_ID")
    json_option(erase)
    erase.set_defaults(func=_erase)

    expire = verbs.add_parser("expire", help="delete receipt bodies past the retention period")
    expire.add_argument("--log-dir", type=Path, required=True, metavar="DIR")
    expire.add_argument("--older-than-days", type=float, required=True)
    json_option(expire)
    expire.set_defaults(func=_expire)


def _export(args: argparse.Namespace) -> int:
    from gateway.receipts.bundle import BundleError
    from gateway.receipts.export import export_bundle
    from gateway.receipts.signing import parse_time

    try:
        since = parse_time(args.since) if args.since else None
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc
    try:
        s = export_bundle(args.log_dir, args.out, since)
    except BundleError as exc:
        raise UsageError(str(exc)) from exc
    data = {
        "out": str(s.out),
        "logs": s.logs,
        "receipts": s.receipts,
        "checkpoints": s.checkpoints,
        "erased": s.erased,
    }
    text = (
        f"{s.out}: {s.logs} log(s), {s.receipts} receipt(s), {s.checkpoints} checkpoint(s), "
        f"{s.erased} erased"
    )
    emit(args, data, text)
    return 0


def _logs(log_dirs: Path | list[Path]) -> list[Path]:
    from gateway.receipts.bundle import BundleError
    from gateway.receipts.export import gather_logs

    try:
        return gather_logs(log_dirs)
    except BundleError as exc:
        raise UsageError(str(exc)) from exc


def _trust(args: argparse.Namespace) -> int:
    from gateway.receipts.canonical import b64
    from gateway.receipts.export import merged_keyset
    from gateway.receipts.log import ReceiptLog
    from gateway.receipts.signing import KeySet, raw_public

    keys: dict[str, dict[str, Any]] = {}
    witnesses: dict[str, str] = {}
    for path in _logs(args.log_dir):
        rl = ReceiptLog.open_readonly(path)
        try:
            nk = rl.note_key()
            prefix = args.origin_prefix or rl.origin.rsplit("/", 1)[0] + "/"
            entry = keys.setdefault(
                prefix + b64(raw_public(nk.public_key)),
                {
                    "origin_prefix": prefix,
                    "public_key": b64(raw_public(nk.public_key)),
                    "origins": [],
                },
            )
            # Every log the operator has: a bundle missing one of them is then invalid
            # (missing-log). Logs started later must be added by the auditor.
            entry["origins"].append(rl.origin)
            witnesses.update(rl.witness_vkeys())
        finally:
            rl.close_sync()
    keyset = merged_keyset(args.log_dir) or KeySet()
    doc = {
        "format": "ztgate-trust/v1",
        "receipt_keys": json.loads(keyset.to_json()),
        "log_keys": list(keys.values()),
        "witnesses": [{"vkey": v} for v in witnesses.values()],
    }
    print(json.dumps(doc, indent=2))
    return 0


def _erase(args: argparse.Namespace) -> int:
    from gateway.receipts.log import ReceiptLog
    from gateway.receipts.model import FormatError, parse_receipt_id

    if not args.receipt_ids and not args.subject:
        raise UsageError("name the RECEIPT_IDs to erase, or a --subject")
    if args.subject and not (args.data_dir or args.config):
        raise UsageError("--subject erases jobs: give --data-dir or --config")

    by_log: dict[str, list[str]] = {}
    for rid in args.receipt_ids:
        try:
            log_id, _ = parse_receipt_id(rid)
        except FormatError as exc:
            raise UsageError(str(exc)) from exc
        by_log.setdefault(log_id, []).append(rid)
    total, job_ids = 0, set[str]()
    from gateway.receipts.export import replica_dirs

    for log_id, rids in by_log.items():
        # The replica's receipts dir stands for its workers' logs too (`w<i>/`).
        found = [
            d / log_id for d in replica_dirs(args.log_dir) if (d / log_id / "log.db").is_file()
        ]
        if not found:
            raise UsageError(f"no log {log_id} under {args.log_dir}")
        path = found[0]
        rl = ReceiptLog(path, None, read_only=True)
        try:
            job_ids |= _jobs_of(rl, rids)  # read before the bodies go
            total += rl.erase_sync(rids, args.reason)
        finally:
            rl.close_sync()
    jobs = _erase_jobs(args.data_dir, args.config, args.receipt_ids, args.subject, job_ids)
    text = (
        f"erased {total} receipt bod{'y' if total == 1 else 'ies'}; leaves and proofs kept; "
        "the erasure is logged at the active log's next checkpoint"
    )
    if args.data_dir or args.config:
        text += f"; deleted {jobs} job{'' if jobs == 1 else 's'} holding them"
    emit(args, {"erased": total, "jobs": jobs}, text)
    return 0


def _jobs_of(rl: Any, receipt_ids: list[str]) -> set[str]:
    """The jobs these receipts were logged for (`ext.job_id`): a superseded or adopted-from
    receipt is not the one the job's record names, and its job, left, could run its input
    again after the erasure (docs/jobs.md, "Erasure")."""
    from gateway.receipts.model import FormatError, SignedReceipt, parse_receipt_id

    jobs: set[str] = set()
    for rid in receipt_ids:
        body = rl.body_at(parse_receipt_id(rid)[1])
        try:
            receipt = SignedReceipt.from_bytes(body).receipt if body is not None else None
        except (FormatError, ValueError):
            continue
        if receipt is not None and receipt.receipt_id == rid:
            job = receipt.extensions.get("job_id")
            jobs.update([job] if isinstance(job, str) else [])
    return jobs


def _erase_jobs(
    data_dir: Path | None,
    config: Path | None,
    receipt_ids: list[str],
    subject: str | None,
    job_ids: set[str],
) -> int:
    """A job's stored answer carries its receipt: it goes with the receipt's body, and so
    does every job an erased receipt was logged for. A subject's jobs all go, queued ones
    (which have no receipt yet) too."""
    import asyncio

    from gateway.config import ConfigError, load_config
    from gateway.jobs.store import JOBS_FILE, SyncJobStore

    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
        if cfg.state.redis_url:
            from gateway.jobs.redis import RedisJobStore

            async def erase(url: str) -> int:
                shared = RedisJobStore(url, timeout_s=max(cfg.state.timeout_s, 5.0))
                try:
                    n = await shared.erase_receipts(receipt_ids) if receipt_ids else 0
                    n += await shared.erase_jobs(sorted(job_ids)) if job_ids else 0
                    return n + (await shared.erase_owner(subject) if subject else 0)
                finally:
                    await shared.close()

            return asyncio.run(erase(cfg.state.redis_url))
        data_dir = cfg.data_dir
    if data_dir is None:
        return 0
    path = data_dir / JOBS_FILE
    if not path.is_file():
        return 0
    # No lock: a running gateway owns the file, and SQLite orders this write with its own.
    store = SyncJobStore(path, lock=False)
    try:
        n = store.erase_receipts(receipt_ids) if receipt_ids else 0
        n += store.erase_jobs(sorted(job_ids)) if job_ids else 0
        return n + (store.erase_owner(subject) if subject else 0)
    finally:
        store.close()


def _expire(args: argparse.Namespace) -> int:
    from gateway.receipts.log import ReceiptLog

    total = 0
    for path in _logs(args.log_dir):
        rl = ReceiptLog(path, None, read_only=True)
        try:
            total += rl.expire_sync(args.older_than_days * 86400)
        finally:
            rl.close_sync()
    text = f"deleted {total} receipt bod{'y' if total == 1 else 'ies'} past retention"
    emit(args, {"deleted": total}, text)
    return 0
