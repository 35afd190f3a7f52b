"""The decision log's cost per record, on the request's thread and in the whole process.

Run: ``.venv/bin/python bench/decision_log.py [--records 5000] [--rounds 10]``

Side by side in one process, each record written to a real rotating file
(`[logging] decisions = "file:..."`, in a temp dir) inside a request's log scope:

* ``inline``  what a request did before: build the record, ``json.dumps`` it and log it,
  on the calling thread (the event loop's, in the gateway).
* ``queued``  ``log_decision`` now: the calling thread only queues; the writer thread
  formats and writes. Its figure includes the final ``flush_decisions()``.

``thread us`` is the calling thread's CPU per record (``time.thread_time``), what the
event loop pays; ``process us`` is the whole process's (``time.process_time``), the
writer thread included. Best of the rounds, since the machine is shared. A round queues
its records faster than any gateway decides (one every few us): more records per round
than the queue holds (`decision_log.CAPACITY`) are dropped, and counted here.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.config import Logging
from gateway.pipeline.decide import flush_decisions, log_decision
from gateway.pipeline.decision_log import decisions
from gateway.policy.engine import InferDecision, decision_record
from gateway.policy.facts import IdentityFacts
from gateway.runtime import configure_decision_log
from gateway.telemetry import PROCESS_METRICS, Telemetry

WHO = IdentityFacts("spiffe://ztgate.test/client/demo", "demo", "", "", "CN=client CA", "1f")
DECISION = InferDecision(
    "d" * 32,
    True,
    ("none",),
    {"none": ("n1", "n2")},
    None,
    ("apps-call-iris",),
    (),
    "h" * 64,
    "allowed by apps-call-iris",
    {},
)


def inline() -> None:
    if decisions.isEnabledFor(logging.INFO):
        decisions.info(json.dumps(decision_record(DECISION, WHO, "iris", "none")))


def queued() -> None:
    log_decision(DECISION, WHO, "iris", "none")


def measure(write: Callable[[], None], records: int) -> tuple[float, float]:
    telemetry = Telemetry()
    p0, t0 = time.process_time(), time.thread_time()
    for _ in range(records):
        with telemetry.request("r" * 32, "infer", {}):
            write()
    t1 = time.thread_time()
    flush_decisions()
    p1 = time.process_time()
    return (t1 - t0) / records * 1e6, (p1 - p0) / records * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decisions.jsonl"
        configure_decision_log(Logging(f"file:{path}", 64 << 20, 2))
        try:
            best: dict[str, tuple[float, float]] = {}
            for _ in range(args.rounds):
                for name, write in (("inline", inline), ("queued", queued)):
                    got = measure(write, args.records)
                    old = best.get(name)
                    best[name] = got if old is None else (min(old[0], got[0]), min(old[1], got[1]))
            lines = sum(1 for f in path.parent.iterdir() for _ in f.open())
        finally:
            configure_decision_log(Logging())
    print(f"{args.records} records x {args.rounds} rounds per variant, best round")
    print(f"{'variant':8} {'thread us':>10} {'process us':>11}")
    for name, (thread_us, process_us) in best.items():
        print(f"{name:8} {thread_us:10.1f} {process_us:11.1f}")
    dropped = int(
        PROCESS_METRICS.registry.get_sample_value("ztgate_decision_log_dropped_total") or 0
    )
    print(f"{lines} lines in the file, {dropped} records dropped (queue full)")
    assert lines + dropped == 2 * args.records * args.rounds  # each one written or counted
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
