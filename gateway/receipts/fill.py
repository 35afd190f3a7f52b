"""Fill a receipt log directly, without a gateway: for benches (`bench/log_scale.py`) and
tests of large logs (`tests/test_log_scale.py`).

The log is a real one (`ReceiptLog.open`: log_start leaf, head marker, birth inode) and
every leaf goes through the log's own write path (`ReceiptLog.append_many`: leaves, tree
hashes, one transaction per batch), so what is measured on it is what production opens.
The receipts are cheap stand-ins: a leaf of type ``receipt`` whose hash is that of a small
JSON body, stored as the body for the last `bodies` entries only (a million real signed
receipts would take minutes to sign and gigabytes to keep, and nothing here reads them
as receipts). Checkpoints are signed every `checkpoint_every` leaves and at the end, one
second of checkpoint time apart.

    python -m gateway.receipts.fill DIR --entries 100000 [--bodies 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.receipts.log import LogEntry, ReceiptLog

__all__ = ["fill", "fill_log"]

ORIGIN = "ztgate.local/fill/receipts"


def _body(log_id: str, index: int) -> tuple[str, bytes]:
    rid = f"{log_id}.{index}.{secrets.token_hex(8)}"
    return rid, json.dumps({"receipt_id": rid, "filler": True}, sort_keys=True).encode()


async def fill_log(
    rl: ReceiptLog,
    entries: int,
    *,
    bodies: int = 0,
    checkpoint_every: int = 10_000,
    batch: int = 4096,
) -> None:
    """Append `entries` leaves to an open, idle log (bodies for the last `bodies`)."""
    start_time = int(rl.clock())
    tick = 0

    def clock() -> float:
        return float(start_time + tick)

    rl.clock = clock
    target = rl.size + entries
    next_cp = rl.size + checkpoint_every
    while rl.size < target:
        n = min(batch, target - rl.size, max(1, next_cp - rl.size))
        items: list[tuple[LogEntry, tuple[str, bytes] | None]] = []
        for i in range(rl.size, rl.size + n):
            if i >= target - bodies:
                rid, body = _body(rl.log_id, i)
                items.append((LogEntry("receipt", hashlib.sha256(body).digest()), (rid, body)))
            else:
                digest = hashlib.sha256(i.to_bytes(8, "big")).digest()
                items.append((LogEntry("receipt", digest), None))
        await rl.append_many(items)
        if rl.size >= next_cp or rl.size == target:
            tick += 1
            await rl.checkpoint()
            next_cp = rl.size + checkpoint_every


def fill(
    directory: Path,
    entries: int,
    *,
    key: ed25519.Ed25519PrivateKey | None = None,
    bodies: int = 0,
    checkpoint_every: int = 10_000,
    marker: Path | None = None,
) -> Path:
    """Append `entries` leaves to the active log of `directory` (a receipts dir; a new
    log, whose leaf 0 is its log_start, if it has none); returns the log's path."""
    key = key or ed25519.Ed25519PrivateKey.generate()

    async def run() -> Path:
        rl = ReceiptLog.open(directory, key, ORIGIN, marker=marker)
        try:
            await fill_log(rl, entries, bodies=bodies, checkpoint_every=checkpoint_every)
            return rl.path
        finally:
            await rl.close()

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="receipts dir (a new log is made in it)")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--bodies", type=int, default=1000)
    ap.add_argument("--checkpoint-every", type=int, default=10_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = fill(args.dir, args.entries, bodies=args.bodies, checkpoint_every=args.checkpoint_every)
    print(f"{path}: {args.entries} entries in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
