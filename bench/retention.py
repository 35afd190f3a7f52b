"""Retention cost: what the retention job pays per expired receipt, and what a pass costs
the appends that arrive while it runs.

Run: ``.venv/bin/python bench/retention.py [--receipts 20000] [--per-pass 1000]
[--evidence-share 0.1] [--dir DIR]``

Fills one log with ``--receipts`` receipts (group commit, 256 at a time), an evidence
file for ``--evidence-share`` of them (what zk receipts leave beside the log), and checkpoints
it; then runs `RetentionJob.run_pass` with every body due, ``--per-pass`` at a time,
until none is left. Rows:

* per pass: wall ms (select + erase transaction + evidence unlink + WAL truncate),
  and us per expired receipt;
* append during a pass: the latency of one `issue` started just after the pass, so it
  queues behind the pass's transaction on the log's writer thread: the stall a pass
  causes, against the same append on an idle log.
* checkpoint compaction (``--checkpoints K``, 0 to skip): a log filled by
  `gateway.receipts.fill` with K checkpoints one second apart (what a busy replica stores
  in K seconds), then one pass with ``checkpoint_history_keep_every_s`` = 3600: its wall
  time (one transaction on the writer thread) and the append stall behind it; once with
  no bodies stored (all past retention: most checkpoints go), once with a body under
  every checkpoint (within retention: the log keeps them all, and still reads them all).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import Retention
from gateway.receipts.issue import issue
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import ClientRef, ModelRef
from gateway.receipts.retention import RetentionJob
from gateway.receipts.signing import Signer

CLIENT = ClientRef("spiffe://ztgate.local/client/alice", "5f1e0c2d", "CN=client CA")
MODEL = ModelRef("iris", "1", "9f" * 32)


async def fill(rl: ReceiptLog, signer: Signer, n: int, evidence_share: float) -> None:
    evidence = rl.path / "evidence"
    evidence.mkdir(exist_ok=True)
    every = max(1, round(1 / evidence_share)) if evidence_share > 0 else 0
    done = 0
    while done < n:  # bounded: n receipts, 256 at a time
        batch = min(256, n - done)
        issued = await asyncio.gather(
            *(
                issue(rl, signer, client=CLIENT, model=MODEL, request_id=f"r{done + i}")
                for i in range(batch)
            )
        )
        for i, it in enumerate(issued):
            if every and (done + i) % every == 0:
                (evidence / f"{it.receipt.receipt_id}.proof").write_bytes(b"p" * 2048)
        done += batch
    await rl.checkpoint()


async def timed_append(rl: ReceiptLog, signer: Signer) -> float:
    t0 = time.perf_counter()
    await issue(rl, signer, client=CLIENT, model=MODEL, request_id="probe")
    return time.perf_counter() - t0


async def main(args: argparse.Namespace) -> None:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ztgate-retention-"))
    rl = ReceiptLog.open(root / "logs", ed25519.Ed25519PrivateKey.generate(), "bench/receipts")
    signer = Signer(ed25519.Ed25519PrivateKey.generate())
    t0 = time.perf_counter()
    await fill(rl, signer, args.receipts, args.evidence_share)
    print(f"filled {args.receipts} receipts in {time.perf_counter() - t0:.1f} s ({root})")
    idle = [await timed_append(rl, signer) for _ in range(20)]
    job = RetentionJob(
        lambda: [rl],
        Retention(body_days=1.0, max_per_pass=args.per_pass),
        CollectorRegistry(),
        clock=lambda: time.time() + 2 * 86400.0,  # every body is due
    )
    passes: list[tuple[int, float]] = []
    stalls: list[float] = []
    total = args.receipts + len(idle)
    for _ in range(total // args.per_pass + 2):  # bounded: the passes the fill needs
        pass_task = asyncio.create_task(job.run_pass())
        await asyncio.sleep(0)  # the pass has queued its transaction; an append follows
        probe = asyncio.create_task(timed_append(rl, signer))
        result = await pass_task
        stalls.append(await probe)
        if result.expired == 0:
            break
        passes.append((result.expired, result.seconds))
    expired = sum(n for n, _ in passes)
    us = [s / n * 1e6 for n, s in passes]
    ms = [s * 1e3 for _, s in passes]
    print(f"expired {expired} in {len(passes)} passes of <= {args.per_pass}")
    print(
        f"per pass: median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms; "
        f"per expired receipt: median {statistics.median(us):.0f} us, "
        f"mean {sum(s for _, s in passes) / expired * 1e6:.0f} us"
    )
    print(
        f"append latency: idle median {statistics.median(idle) * 1e3:.2f} ms; "
        f"queued behind a pass median {statistics.median(stalls) * 1e3:.1f} ms, "
        f"max {max(stalls) * 1e3:.1f} ms"
    )
    await rl.close()
    if args.checkpoints:
        await compaction(root / "compaction", args.checkpoints, bodies=False)
        await compaction(root / "compaction-bodies", args.checkpoints, bodies=True)


async def compaction(directory: Path, checkpoints: int, *, bodies: bool) -> None:
    """`bodies`: every leaf keeps its body, so every checkpoint is the earliest to include
    a stored body and the log keeps it (a replica's steady state within body_days)."""
    from gateway.receipts.fill import ORIGIN, fill_log

    rl = ReceiptLog.open(directory, ed25519.Ed25519PrivateKey.generate(), ORIGIN)
    signer = Signer(ed25519.Ed25519PrivateKey.generate())
    t0 = time.perf_counter()
    entries = checkpoints * 4
    await fill_log(rl, entries, bodies=entries if bodies else 0, checkpoint_every=4)
    before = len(rl.checkpoints())
    what = "with a body under each" if bodies else "no bodies"
    print(f"filled {before} checkpoints ({what}) in {time.perf_counter() - t0:.1f} s")
    job = RetentionJob(
        lambda: [rl], Retention(checkpoint_history_keep_every_s=3600.0), CollectorRegistry()
    )
    pass_task = asyncio.create_task(job.run_pass())
    await asyncio.sleep(0)
    probe = asyncio.create_task(timed_append(rl, signer))
    result = await pass_task
    stall = await probe
    print(
        f"compaction: {result.compacted} of {before} checkpoints deleted in "
        f"{result.seconds * 1e3:.0f} ms ({result.seconds / max(1, before) * 1e6:.1f} us per "
        f"stored checkpoint); append queued behind it: {stall * 1e3:.0f} ms"
    )
    await rl.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--receipts", type=int, default=20000)
    p.add_argument("--per-pass", type=int, default=1000)
    p.add_argument("--evidence-share", type=float, default=0.1)
    p.add_argument("--checkpoints", type=int, default=5000)
    p.add_argument("--dir")
    asyncio.run(main(p.parse_args()))
