"""One replica served by several processes, in the production deployment.

gw-b runs with `listen.workers = 2` in its TOML (tests/system/cluster.py,
`REPLICA_WORKERS`): a supervisor holding the listeners and the admin port, and two worker
processes, each with its own receipt log under `<receipts dir>/w<i>/`
(gateway/supervisor.py, docs/sizing.md). Here: requests land on both workers and a
revocation made through one holds on both (Redis); the admin port answers for the replica;
a worker SIGKILLed for real is restarted while the replica keeps answering, and the
replica's export (every worker's log) verifies with the witness required; and the
operator's stops: SIGTERM to the supervisor drains every worker, `serve --check` passes on
that TOML, and a SIGKILLed supervisor's workers exit on their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.receipts.log import ReceiptLog
from tests.system.cluster import WITNESS_NAME, ProductionCluster, Replica
from tests.system.customer_pki import Leaf
from tests.system.figures import say
from tests.system.processes import group_alive
from tests.system.traffic import Call

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

GUARD_S = 120.0  # hang guards, not speed assertions: a loaded machine may take this long
TRIES = 64  # fresh connections to see both workers: all on one has odds 2**-63
UNAUTHENTICATED = "unauthenticated"  # ztgate_infer_requests_total's outcome for a 401


def infer_body() -> dict[str, Any]:
    return Call("shop", "iris", "none", 1, 200).body()


def gw_b(cluster: ProductionCluster) -> Replica:
    replica = cluster.replicas[1]
    assert replica.workers == 2, "cluster.py runs gw-b with listen.workers = 2"
    return replica


def context(cluster: ProductionCluster, leaf: Leaf) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cluster.pki.root_ca))
    ctx.load_cert_chain(leaf.cert, leaf.key)
    return ctx


def infer_fresh(ctx: ssl.SSLContext, replica: Replica) -> httpx.Response:
    """One iris answer on a new connection: the kernel picks the worker for each new
    connection (SO_REUSEPORT hashes its addresses), so new ones reach every worker."""
    with httpx.Client(verify=ctx, timeout=GUARD_S) as c:
        return c.post(f"{replica.base}/v2/models/iris/infer", json=infer_body())


def log_of(receipt_id: str) -> str:
    return receipt_id.rsplit(".", 2)[0]


def worker_logs(replica: Replica) -> dict[str, int]:
    """Log id -> the worker writing it, from the replica's receipts dir on disk."""
    return {
        path.name: i
        for i in range(replica.workers)
        for path in ReceiptLog.all_logs(replica.receipts_dir / f"w{i}")
    }


def worker_of(replica: Replica, r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return worker_logs(replica)[log_of(r.json()["parameters"]["ztgate.receipt_id"])]


def scrape(replica: Replica) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"http://127.0.0.1:{replica.admin_port}/metrics", timeout=30).text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def by_worker(replica: Replica, name: str, **match: str) -> dict[str, float]:
    """`name`'s samples summed per `worker` label ("" for the supervisor's own)."""
    out: dict[str, float] = {}
    for sample, labels, value in scrape(replica):
        if sample == name and all(labels.get(k) == v for k, v in match.items()):
            w = labels.get("worker", "")
            out[w] = out.get(w, 0.0) + value
    return out


def status(replica: Replica, path: str) -> int:
    return httpx.get(f"http://127.0.0.1:{replica.admin_port}{path}", timeout=30).status_code


def wait_for(check: Callable[[], bool], what: str) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < GUARD_S, f"gave up after {GUARD_S:.0f}s waiting for {what}"
        time.sleep(0.2)
    return time.monotonic() - t0


def workers_of(supervisor: int) -> list[int]:
    """The live processes the supervisor forked (its children that run its command)."""
    mine = Path(f"/proc/{supervisor}/cmdline").read_bytes()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == supervisor and stat[0] not in ("Z", "X") and cmdline == mine:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_cosigned(cluster: ProductionCluster, replica: Replica) -> float:
    """Until each log the replica serves (every worker's) has a checkpoint at its current
    size that the witness cosigned, read from its log endpoints as the auditor."""

    def cosigned(auditor: httpx.Client) -> bool:
        for desc in auditor.get(f"{replica.base}/log").json()["logs"]:
            r = auditor.get(f"{replica.base}/log/{desc['log_id']}/checkpoint")
            lines = r.text.splitlines() if r.status_code == 200 else []
            size = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else -1
            if size != int(desc["size"]) or not any(
                ln.startswith(f"— {WITNESS_NAME} ") for ln in lines
            ):
                return False
        return True

    with cluster.client("audra", timeout=30) as auditor:
        return wait_for(lambda: cosigned(auditor), f"{replica.name}'s logs to be cosigned")


def export_and_verify(
    cluster: ProductionCluster, replica: Replica, work: Path
) -> tuple[int, dict[str, Any], Path]:
    """The operator's trust file and export of the replica's receipts dir (every worker's
    log), and the auditor's verify with the witness required; again while a receipt still
    waits for its cosigned checkpoint (exit 3, pending)."""
    trust = cluster.cli("audit", "trust", "--log-dir", str(replica.receipts_dir))
    assert trust.returncode == 0, trust.stderr
    (work / "trust.json").write_text(trust.stdout)
    t0 = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        bundle = work / f"bundle-{attempt}"
        exported = cluster.cli(
            "audit", "export", "--log-dir", str(replica.receipts_dir), str(bundle)
        )
        assert exported.returncode == 0, exported.stdout + exported.stderr
        args = ["verify", str(bundle), "--trust", str(work / "trust.json"), "--json"]
        v = cluster.cli(*args, "--require-witness", WITNESS_NAME)
        if v.returncode != 3 or time.monotonic() - t0 > GUARD_S:
            break
        time.sleep(1.0)
    try:
        report = json.loads(v.stdout)
    except ValueError:
        report = {"raw": v.stdout + v.stderr}
    return v.returncode, report, bundle


def test_requests_land_on_both_workers_and_a_revocation_holds_on_both(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    replica = gw_b(cluster)
    # A spare certificate of `shop` (the officer's mapping, rule apps-call-public-internal),
    # so revoking it leaves the suite's own `shop` certificate alone.
    spare = cluster.pki.spare_client("shop", "workers-flow")
    ctx = context(cluster, spare)

    # Positive control: the certificate is answered, by both workers, each into its log.
    seen: Counter[int] = Counter()
    for _ in range(TRIES):
        seen[worker_of(replica, infer_fresh(ctx, replica))] += 1
        if len(seen) == replica.workers:
            break
    assert sorted(seen) == [0, 1], f"fresh connections all reached one worker: {seen}"
    assert len(worker_logs(replica)) == replica.workers  # one log per worker, no more

    # Revoked through the replica's API (one worker takes it), as the officer does.
    before = by_worker(replica, "ztgate_infer_requests_total", outcome=UNAUTHENTICATED)
    olga = cluster.pki.client("olga")
    revoke = [
        "pki", "revoke", str(spare.cert), "--gateway", f"127.0.0.1:{replica.port}",
        "--cert", str(olga.cert), "--key", str(olga.key), "--ca", str(cluster.pki.root_ca),
    ]  # fmt: skip
    done = cluster.cli(*revoke)
    assert done.returncode == 0, done.stdout + done.stderr

    # The other worker learns it from Redis (state.revocation_sync_s): until both refused
    # once, a request may still be answered by the one that has not synced yet.
    def refused_by_both() -> bool:
        r = infer_fresh(ctx, replica)
        assert r.status_code in (200, 401), r.text
        now = by_worker(replica, "ztgate_infer_requests_total", outcome=UNAUTHENTICATED)
        return all(now.get(str(i), 0) > before.get(str(i), 0) for i in range(replica.workers))

    waited = wait_for(refused_by_both, "both workers to refuse the revoked certificate")
    # From then on every worker refuses it (the set only grows), and so does gw-a.
    for _ in range(8):
        r = infer_fresh(ctx, replica)
        assert r.status_code == 401, r.text
        assert r.json()["type"].endswith("/unauthenticated"), r.text
    # gw-a, another replica, learns it from Redis at its own sync (state.revocation_sync_s).
    wait_for(
        lambda: infer_fresh(ctx, cluster.replicas[0]).status_code == 401,
        "gw-a to refuse the revoked certificate",
    )
    # ... and the suite's own `shop` certificate is still answered.
    assert infer_fresh(context(cluster, cluster.pki.client("shop")), replica).status_code == 200
    say(
        f"\n[workers] gw-b: answers by worker {dict(seen)}; revocation held on both workers "
        f"{waited:.1f}s after `pki revoke`"
    )


def test_the_admin_port_answers_for_both_workers(production_cluster: ProductionCluster) -> None:
    cluster = production_cluster
    replica = gw_b(cluster)
    assert status(replica, "/readyz") == 200
    assert status(replica, "/v2/health/ready") == 200
    assert status(replica, "/healthz") == 200
    samples = scrape(replica)
    answered = {
        labels.get("worker")
        for name, labels, _ in samples
        if name == "ztgate_infer_requests_total" and labels.get("outcome") == "ok"
    }
    assert answered == {"0", "1"}, answered  # both workers' samples, each labelled
    alive_now = [v for name, _, v in samples if name == "ztgate_workers_alive"]
    assert alive_now == [2.0], alive_now
    # Control: the single-process replica's samples carry no worker label.
    plain = {
        "worker" in labels
        for name, labels, _ in scrape(cluster.replicas[0])
        if name == "ztgate_infer_requests_total"
    }
    assert plain == {False}, plain


def test_a_sigkilled_worker_is_restarted_while_the_replica_answers_and_its_log_verifies(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    cluster = production_cluster
    replica = gw_b(cluster)
    supervisor = replica.service.pid
    workers = workers_of(supervisor)
    assert len(workers) == replica.workers, workers
    logs = worker_logs(replica)
    restarts = by_worker(replica, "ztgate_worker_restarts_total").get("", 0.0)
    ctx = context(cluster, cluster.pki.client("shop"))

    victim = workers[0]
    os.kill(victim, signal.SIGKILL)  # that worker alone, for real
    t_kill = time.monotonic()
    # Meanwhile the replica answers: the other worker serves its connections, and those
    # hashed to the dead one wait in the backlog the supervisor holds until it is back.
    answers = [infer_fresh(ctx, replica) for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    served_s = time.monotonic() - t_kill

    def restarted() -> bool:
        now = workers_of(supervisor)
        return (
            len(now) == replica.workers
            and victim not in now
            and by_worker(replica, "ztgate_worker_restarts_total").get("") == restarts + 1
            and status(replica, "/readyz") == 200
        )

    ready_s = wait_for(restarted, "the supervisor to restart the killed worker")
    assert replica.service.pid == supervisor and replica.service.running()
    assert worker_logs(replica) == logs, "the restarted worker reopened its own log"
    after = [infer_fresh(ctx, replica) for _ in range(4)]
    assert [r.status_code for r in after] == [200] * 4, [r.text for r in after]

    rids = {r.json()["parameters"]["ztgate.receipt_id"] for r in [*answers, *after]}
    cosigned_s = wait_cosigned(cluster, replica)
    rc, report, bundle = export_and_verify(cluster, replica, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {e["log_id"] for e in manifest["logs"]} == set(logs), manifest["logs"]
    valid = {
        f["subject"].removeprefix("receipt ")
        for f in report.get("findings", [])
        if f["status"] == "valid" and f["subject"].startswith("receipt ")
    }
    say(
        f"\n[workers] gw-b worker pid {victim} SIGKILLed: 8 answers meanwhile in "
        f"{served_s:.1f}s, restarted and ready {ready_s:.1f}s after, logs cosigned "
        f"{cosigned_s:.1f}s after that; export of "
        f"{len(manifest['logs'])} worker logs: verify exit {rc}, {report.get('counts')}"
    )
    bad = [f for f in report.get("findings", []) if f["status"] not in ("valid", "pending")]
    assert rc == 0, json.dumps(bad or report, indent=1)[:6000]
    assert rids <= valid, sorted(rids - valid)


def test_sigterm_drains_every_worker_and_serve_check_passes_on_the_toml(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    replica = gw_b(cluster)
    proc, pgid = replica.service.proc, replica.service.pid
    assert proc is not None
    workers = workers_of(pgid)
    assert len(workers) == replica.workers, workers  # the positive control: they ran

    os.kill(pgid, signal.SIGTERM)  # the supervisor alone, as a service manager does
    assert proc.wait(timeout=GUARD_S) == 0, replica.service.tail()
    wait_for(lambda: not group_alive(pgid), "every process of gw-b to exit")
    # Each worker drained: its server finished its shutdown (uvicorn then re-raises the
    # SIGTERM it caught, so a worker's own status is -15), none was killed past the drain.
    text = replica.service.text_since_start()
    for pid in workers:
        assert f"Finished server process [{pid}]" in text, text[-3000:]
    for i in range(replica.workers):  # past the drain the supervisor SIGKILLs: -9
        assert re.search(rf"worker {i} exited \((0|-15)\)", text), text[-3000:]

    # The operator's check of that TOML (listen.workers = 2): its ports are free now.
    checked = cluster.cli("serve", "--config", str(replica.config), "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK (production mode, 3 nodes)" in checked.stdout

    ready_s = replica.start()
    assert status(replica, "/readyz") == 200
    say(f"\n[workers] gw-b drained on SIGTERM; restarted and ready in {ready_s:.1f}s")


def test_a_sigkilled_supervisors_workers_exit(production_cluster: ProductionCluster) -> None:
    """No code of the supervisor runs: each worker's own watch on its parent ends it."""
    cluster = production_cluster
    replica = gw_b(cluster)
    proc, supervisor = replica.service.proc, replica.service.pid
    assert proc is not None
    workers = workers_of(supervisor)
    assert len(workers) == replica.workers, workers  # the positive control: they ran

    os.kill(supervisor, signal.SIGKILL)  # the supervisor alone, not its process group
    assert proc.wait(timeout=GUARD_S) == -signal.SIGKILL
    t0 = time.monotonic()
    gone_s = wait_for(
        lambda: not any(alive(pid) for pid in workers), "the orphaned workers to exit"
    )
    wait_for(lambda: not group_alive(supervisor), "every process of gw-b to exit")
    group_s = time.monotonic() - t0

    ready_s = replica.start()
    ctx = context(cluster, cluster.pki.client("shop"))
    assert infer_fresh(ctx, replica).status_code == 200
    say(
        f"\n[workers] gw-b supervisor SIGKILLed: its workers exited {gone_s:.1f}s after, "
        f"group empty {group_s:.1f}s after; restarted and ready in {ready_s:.1f}s"
    )
