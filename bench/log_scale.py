"""The receipt log at 10k, 100k and 1M entries (issue 15): memory and time to open, proof
and export times, and the append hot path, for the log as it is (tree on disk) and, with
``--old DIR``, side by side with an older checkout of ztgate (tree in memory, every leaf
re-hashed at open).

Run: ``.venv/bin/python bench/log_scale.py [--sizes 10000 100000 1000000] [--old DIR]
[--dir NEW_DIR] [--appends 20000] [--append-rounds 3]``

``--old DIR`` is the root of another tree (``git archive <commit> | tar -x -C /tmp/old``);
its `gateway` package is imported in the workers instead of this one, against the very
same log files (the stored-hash table is one more table to it). Without it, the "old"
rows rebuild the in-memory tree from every leaf with this checkout's `MerkleTree`: the
work the old open did, less its checks.

Rows, each measured in a fresh worker process:

* ``fill``             writing the log with `gateway.receipts.fill` (this checkout only).
* ``open s``           `ReceiptLog.open` of the directory's active log: integrity checks,
                       head marker, tree.
* ``heap MiB``         Python heap the open log holds (tracemalloc, after open), then after
                       ``--proofs`` random inclusion proofs (the cache filled).
* ``proof us``         mean inclusion / consistency proof against the latest checkpoint.
* ``export s``         `ztgate audit export` (`export_bundle`) of the last ``--bodies``
                       receipts: the log opened read-only, inventory range, proofs.
* ``append us``        the serving path: ``--appends`` appends from 256 concurrent tasks on
                       a fresh log, wall and process CPU per append (group commit, fsync).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER = r"""
import asyncio, hashlib, json, os, random, sqlite3, sys, time, tracemalloc
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ed25519

task, arg = sys.argv[1], json.loads(sys.argv[2])
from gateway.receipts.log import LogEntry, ReceiptLog
ORIGIN = "ztgate.local/fill/receipts"
out = {}

def key():
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(arg["key"]))

def open_log():
    return ReceiptLog.open(Path(arg["dir"]), key(), ORIGIN)

if task == "open":
    t0 = time.perf_counter()
    rl = open_log()
    out["open_s"] = time.perf_counter() - t0
    assert not rl.frozen, rl.frozen_reason
    rl.close_sync()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    rl = open_log()
    out["heap_mib"] = (tracemalloc.get_traced_memory()[0] - base) / 2**20
    n = rl.latest_checkpoint()
    from gateway.receipts.note import Checkpoint
    size = Checkpoint.parse_text(n.text).size
    rng = random.Random(1)
    for _ in range(arg["proofs"]):
        rl.inclusion(rng.randrange(size), size)
    out["heap_after_proofs_mib"] = (tracemalloc.get_traced_memory()[0] - base) / 2**20
    tracemalloc.stop()
    rl.close_sync()
elif task == "rebuild":  # the old open's work, with this checkout's in-memory tree
    from gateway.receipts.merkle import MerkleTree, leaf_hash
    db = sqlite3.connect(Path(arg["log"]) / "log.db")
    def build():
        return MerkleTree(leaf_hash(bytes(d)) for (d,) in db.execute(
            "SELECT data FROM leaves ORDER BY idx"))
    t0 = time.perf_counter()
    tree = build()
    out["open_s"] = time.perf_counter() - t0
    del tree
    tracemalloc.start()
    tree = build()
    out["heap_mib"] = out["heap_after_proofs_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    size = tree.size
    rng = random.Random(1)
    idx = [rng.randrange(size) for _ in range(arg["proofs"])]
    t0 = time.perf_counter()
    for i in idx:
        tree.inclusion_proof(i, size)
    out["inclusion_us"] = (time.perf_counter() - t0) / len(idx) * 1e6
    t0 = time.perf_counter()
    for i in idx:
        tree.consistency_proof(i + 1, size)
    out["consistency_us"] = (time.perf_counter() - t0) / len(idx) * 1e6
elif task == "proofs":
    rl = open_log()
    from gateway.receipts.note import Checkpoint
    size = Checkpoint.parse_text(rl.latest_checkpoint().text).size
    rng = random.Random(1)
    idx = [rng.randrange(size) for _ in range(arg["proofs"])]
    t0 = time.perf_counter()
    rl.inclusion(idx[0], size)
    out["first_proof_us"] = (time.perf_counter() - t0) * 1e6
    t0 = time.perf_counter()
    for i in idx:
        rl.inclusion(i, size)
    out["inclusion_us"] = (time.perf_counter() - t0) / len(idx) * 1e6
    t0 = time.perf_counter()
    for i in idx:
        rl.consistency(i + 1, size)
    out["consistency_us"] = (time.perf_counter() - t0) / len(idx) * 1e6
    rl.close_sync()
elif task == "export":
    import datetime as dt
    from gateway.receipts.export import export_bundle
    t0 = time.perf_counter()
    s = export_bundle(Path(arg["dir"]), Path(arg["out"]),
                      since=dt.datetime.fromtimestamp(arg["since"], dt.UTC))
    out["export_s"] = time.perf_counter() - t0
    out["receipts"] = s.receipts
elif task == "append":
    import threading
    def thread_cpu():  # CPU seconds per thread kind, from /proc (Linux)
        kinds = {t.native_id: t.name for t in threading.enumerate()}
        out = {"loop": 0.0, "db": 0.0}
        for tid in os.listdir("/proc/self/task"):
            f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            name = kinds.get(int(tid), "")
            kind = "loop" if name == "MainThread" else (
                "db" if name.startswith("receipt-log-") and "marker" not in name else "other")
            out[kind] = out.get(kind, 0.0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return out
    async def main():
        rl = ReceiptLog.open(Path(arg["dir"]), ed25519.Ed25519PrivateKey.generate(), ORIGIN)
        n, conc = arg["appends"], 256
        entries = [LogEntry("revocation", hashlib.sha256(i.to_bytes(8, "big")).digest())
                   for i in range(n)]
        async def one(k):
            for e in entries[k::conc]:
                await rl.append(e)
        await asyncio.gather(*(one(k) for k in range(conc)))  # warm-up round
        t0, c0, th0 = time.perf_counter(), time.process_time(), thread_cpu()
        await asyncio.gather(*(one(k) for k in range(conc)))
        out["append_us"] = (time.perf_counter() - t0) / n * 1e6
        out["append_cpu_us"] = (time.process_time() - c0) / n * 1e6
        th1 = thread_cpu()
        for kind in ("loop", "db"):
            out[f"{kind}_cpu_us"] = (th1[kind] - th0[kind]) / n * 1e6
        await rl.close()
    asyncio.run(main())
print(json.dumps(out))
"""


def worker(task: str, arg: dict[str, Any], old: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(old or ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, task, json.dumps(arg)],
        env=env,
        cwd=old or ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {task} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def fmt(v: object, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--old", type=Path, help="root of an older ztgate checkout to compare")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--proofs", type=int, default=2000)
    ap.add_argument("--bodies", type=int, default=1000)
    ap.add_argument("--appends", type=int, default=20_000)
    ap.add_argument("--append-rounds", type=int, default=3)
    args = ap.parse_args()

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.receipts.fill import fill

    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}"
    )
    base = args.dir or Path(tempfile.mkdtemp(prefix="log-scale-"))
    key = ed25519.Ed25519PrivateKey.generate()
    khex = key.private_bytes_raw().hex()
    old_name = "old (checkout)" if args.old else "old (rebuild)"
    rows: list[tuple[str, ...]] = []
    for n in args.sizes:
        d = base / f"n{n}"
        t0 = time.perf_counter()
        path = fill(d, n, key=key, bodies=args.bodies)
        fill_s = time.perf_counter() - t0
        # the bodies are the last entries written: export from their time (less a
        # millisecond: the datetime round trip must not cut the first batch off)
        db = sqlite3.connect(path / "log.db")
        since = float(db.execute("SELECT min(created) FROM bodies").fetchone()[0]) - 1e-3
        db.close()
        arg = {"dir": str(d), "log": str(path), "key": khex, "proofs": args.proofs}
        new = worker("open", arg) | worker("proofs", arg)
        new |= worker("export", {"dir": str(d), "out": str(base / f"b{n}-new"), "since": since})
        if args.old:
            old = worker("open", arg, args.old) | worker("proofs", arg, args.old)
            old |= worker(
                "export",
                {"dir": str(d), "out": str(base / f"b{n}-old"), "since": since},
                args.old,
            )
        else:
            old = worker("rebuild", arg)
        for name, r in (("new (disk)", new), (old_name, old)):
            rows.append(
                (
                    f"{n:,}",
                    name,
                    fmt(fill_s, 1) if name.startswith("new") else "",
                    fmt(r["open_s"], 3),
                    fmt(r["heap_mib"]),
                    fmt(r["heap_after_proofs_mib"]),
                    fmt(r.get("inclusion_us", float("nan")), 0),
                    fmt(r.get("consistency_us", float("nan")), 0),
                    fmt(r.get("export_s", float("nan")), 2),
                )
            )
    head = (
        "entries",
        "log",
        "fill s",
        "open s",
        "heap MiB",
        "heap MiB after proofs",
        "inclusion us",
        "consistency us",
        "export s",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    # the hot path, same machine, fresh logs, new and old alternating (load drifts)
    runs: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    for r in range(args.append_rounds):
        for name, tree in (("new", None), ("old", args.old)):
            if name == "old" and tree is None:
                continue
            arg = {"dir": str(base / f"append-{name}-{r}"), "appends": args.appends}
            runs[name].append(worker("append", arg, tree))
    for name, rs in runs.items():
        if rs:
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            print(
                f"append, {name}: {med['append_us']:.1f} us wall, {med['append_cpu_us']:.1f} us "
                f"CPU per append (event loop {med['loop_cpu_us']:.1f}, database thread "
                f"{med['db_cpu_us']:.1f}; median of {len(rs)} runs of {args.appends}, 256 "
                "concurrent tasks)"
            )
    print(f"# files under {base}")


if __name__ == "__main__":
    main()
