"""Receipt throughput with group commit: sign + append + fsync, against receipts off.

Run: ``.venv/bin/python bench/receipts.py [--seconds 5] [--concurrency 256] [--dir DIR]``

Rows, one machine, one run:

* ``fsync alone``       4 KiB write + fdatasync on one file, one at a time: the disk's floor.
* ``sqlite commit``     one-row SQLite WAL commit (synchronous=FULL), one at a time: what a
                        receipt would cost without group commit.
* ``receipts off``      the same asyncio request loop with no receipt at all: the baseline.
* ``receipts on``       C concurrent "requests", each awaiting `gateway.receipts.issue`
                        (commit two tensors, build, JCS, Ed25519 sign, append, group fsync)
                        before it counts as answered. Sustained for ``--seconds``.
* ``sign only``         build + JCS + sign, no log: the CPU part alone.

CPU us/receipt is process CPU time (all threads: event loop, database and marker threads)
divided by receipts, minus the same for "receipts off". Latency is issue()'s own, per call.
The log lives in a temp dir (on the same disk as the rest of the run) unless ``--dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.protocol.tensors import Tensor
from gateway.receipts.issue import issue, tensor_refs
from gateway.receipts.log import ReceiptLog
from gateway.receipts.model import (
    ClientRef,
    ModelRef,
    PolicyRef,
    Receipt,
    VerificationRef,
    make_receipt_id,
)
from gateway.receipts.signing import Signer

CLIENT = ClientRef(
    "spiffe://ztgate.local/client/alice",
    "5f1e0c2d9a7b3c4d5e6f708192a3b4c5",
    "CN=ztgate dev client CA,O=ztgate dev PKI (ztgate.local)",
)
MODEL = ModelRef("iris", "1", "9f" * 32)
POLICY = PolicyRef("sha256:" + "00" * 32, "0123456789abcdef0123456789abcdef")
VERIFY = VerificationRef("none", "unverified")
INPUT = Tensor("input", "FP32", (1, 4), np.array([[5.1, 3.5, 1.4, 0.2]], "<f4"))
OUTPUT = Tensor("probabilities", "FP32", (1, 3), np.array([[0.9, 0.05, 0.05]], "<f4"))


def fields() -> dict[str, object]:
    return {
        "client": CLIENT,
        "model": MODEL,
        "inputs": [INPUT],
        "outputs": [OUTPUT],
        "policy": POLICY,
        "verification": VERIFY,
        "nodes": ["spiffe://ztgate.local/node/n1"],
        "request_id": "4b1f0e7c2a9d4c3e8f6a5b4c3d2e1f00",
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def bench_fsync(d: Path, n: int) -> list[float]:
    path = d / "fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    block = os.urandom(4096)
    lat = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, block, (i % 256) * 4096)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return lat


def bench_sqlite(d: Path, n: int) -> list[float]:
    db = sqlite3.connect(d / "one.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t(i INTEGER PRIMARY KEY, b BLOB)")
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        db.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 100))
        lat.append(time.perf_counter() - t0)
    db.close()
    return lat


async def run_load(
    seconds: float, concurrency: int, work: object
) -> tuple[int, float, float, list[float]]:
    """(completed, wall s, cpu s, latencies) of `concurrency` loops calling `work()`."""
    stop = time.perf_counter() + seconds
    lat: list[float] = []
    done = 0

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await work()  # type: ignore[operator]
            lat.append(time.perf_counter() - t0)
            done += 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return done, time.perf_counter() - wall0, time.process_time() - cpu0, lat


async def main_async(args: argparse.Namespace, d: Path) -> None:
    fsync_lat = bench_fsync(d, args.fsyncs)
    sqlite_lat = bench_sqlite(d, args.fsyncs)

    async def nothing() -> None:
        await asyncio.sleep(0)

    off = await run_load(args.seconds, args.concurrency, nothing)

    rl = ReceiptLog.open(d / "logs", ed25519.Ed25519PrivateKey.generate(), "bench.local/receipts")
    signer = Signer(ed25519.Ed25519PrivateKey.generate())
    f = fields()

    async def receipt() -> None:
        await issue(rl, signer, **f)  # type: ignore[arg-type]

    for _ in range(200):  # warm-up
        await receipt()
    rl.stats.batches = rl.stats.entries = 0
    rl.stats.fsync_seconds = 0.0
    on = await run_load(args.seconds, args.concurrency, receipt)
    batches, entries = rl.stats.batches, rl.stats.entries
    write_s = rl.stats.fsync_seconds
    t0 = time.perf_counter()
    await rl.checkpoint()
    checkpoint_s = time.perf_counter() - t0
    await rl.close()

    n = 5000
    cpu0 = time.process_time()
    for i in range(n):
        from gateway.receipts.commit import new_salt

        salt = new_salt()
        r = Receipt(
            make_receipt_id("a" * 16, i, "00" * 8), "a" * 16, i, "2026-01-01T00:00:00.000Z",
            "answer", signer.key_id, CLIENT, MODEL, tensor_refs([INPUT], salt),
            tensor_refs([OUTPUT], salt), POLICY, VERIFY, ("spiffe://ztgate.local/node/n1",),
        )  # fmt: skip
        signer.sign(r).to_bytes()
    sign_cpu_us = (time.process_time() - cpu0) / n * 1e6

    off_n, off_wall, off_cpu, off_lat = off
    on_n, on_wall, on_cpu, on_lat = on
    off_cpu_us = off_cpu / off_n * 1e6
    on_cpu_us = on_cpu / on_n * 1e6
    host = f"{platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}"
    print(f"# receipts bench: {host}, {args.seconds:.0f}s x {args.concurrency} concurrent, dir {d}")
    print()
    head = f"| {'row':<16} | {'per second':>11} | {'CPU us/op':>10} | {'p50 ms':>8} | {'p99 ms':>8}"
    print(head + " | notes")
    print(f"|{'-' * 18}|{'-' * 13}|{'-' * 12}|{'-' * 10}|{'-' * 10}|------")

    def row(name: str, rate: float, cpu: str, lat: list[float], note: str = "") -> None:
        print(f"| {name:<16} | {rate:>11,.0f} | {cpu:>10} | {pct(lat, 50) * 1e3:>8.3f} | "
              f"{pct(lat, 99) * 1e3:>8.3f} | {note}")  # fmt: skip

    row("fsync alone", 1 / statistics.mean(fsync_lat), "-", fsync_lat, "4 KiB pwrite + fdatasync")
    row("sqlite commit", 1 / statistics.mean(sqlite_lat), "-", sqlite_lat, "1 row, WAL, FULL")
    row("receipts off", off_n / off_wall, f"{off_cpu_us:.1f}", off_lat, "asyncio loop only")
    row("receipts on", on_n / on_wall, f"{on_cpu_us - off_cpu_us:.1f}", on_lat,
        f"{entries / max(batches, 1):.0f} receipts per fsync, {batches} batches, "
        f"{write_s / max(batches, 1) * 1e3:.1f} ms per batch write+fsync")  # fmt: skip
    print(f"| {'sign only':<16} | {1e6 / sign_cpu_us:>11,.0f} | {sign_cpu_us:>10.1f} | {'-':>8} | "
          f"{'-':>8} | commit 2 tensors + build + JCS + Ed25519, 1 core")  # fmt: skip
    print()
    print(
        f"checkpoint of {on_n + 200:,} leaves (sign + store + marker): {checkpoint_s * 1e3:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--fsyncs", type=int, default=300)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(main_async(args, Path(tempfile.mkdtemp(dir=args.dir))))
    else:
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
