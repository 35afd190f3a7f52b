"""Scenario 2: a replica SIGKILLed right after it answered keeps that answer's receipt.

The gateway returns an answer only once its receipt is fsynced into the replica's log, so
a replica killed (its whole process group, as when a pod dies) the moment after a 200
must, once restarted, checkpoint that receipt and have the witness cosign it; the auditor
then verifies it offline from an export of that replica's log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.system.cluster import WITNESS_NAME, ProductionCluster
from tests.system.figures import say
from tests.system.processes import group_alive
from tests.system.traffic import IRIS_PAIR

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

COSIGN_DEADLINE_S = 60.0


def infer_body() -> dict[str, object]:
    flat = [v for row in IRIS_PAIR for v in row]
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": flat}],
        "parameters": {"ztgate.verification": "none"},
    }


def test_a_replica_killed_right_after_a_200_keeps_the_receipt_and_it_is_cosigned(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    cluster = production_cluster
    victim, other = cluster.replicas
    with cluster.client("shop", timeout=30) as shop, cluster.client("audra", timeout=30) as audra:
        r = shop.post(f"{victim.base}/v2/models/iris/infer", json=infer_body())
        victim.service.kill()  # SIGKILL to the whole group, the moment the 200 is read
        t_kill = time.time()
        assert r.status_code == 200, r.text
        rid = r.json()["parameters"]["ztgate.receipt_id"]
        log_id, index = rid.rsplit(".", 2)[0], int(rid.rsplit(".", 2)[1])
        old_pgid = victim.service.groups[-1]
        assert not victim.service.running() and not group_alive(old_pgid)

        # Control: the deployment still answers, on the other replica.
        assert shop.post(f"{other.base}/v2/models/iris/infer", json=infer_body()).status_code == 200

        t0 = time.monotonic()
        ready_s = victim.start()
        restart_s = time.monotonic() - t0

        # Same log, not frozen, not restarted as a new one: the crash lost nothing.
        logs = {d["log_id"]: d for d in audra.get(f"{victim.base}/log").json()["logs"]}
        assert log_id in logs and logs[log_id]["frozen"] is None, logs
        assert int(logs[log_id]["size"]) > index

        # The replica's log endpoints: its latest checkpoint grows past the receipt and the
        # witness cosigns it; the receipt's inclusion proof is then served (not 202).
        t0 = time.monotonic()
        while True:
            note = audra.get(f"{victim.base}/log/{log_id}/checkpoint").text.splitlines()
            size = int(note[1]) if len(note) > 1 and note[1].isdigit() else -1
            if size > index and any(ln.startswith(f"— {WITNESS_NAME} ") for ln in note):
                break
            assert time.monotonic() - t0 < COSIGN_DEADLINE_S, f"never cosigned: {note}"
            time.sleep(0.25)
        cosigned_s = time.monotonic() - t0
        when = next(int(ln.split()[1]) for ln in note if ln.startswith("time "))
        proof = audra.get(f"{victim.base}/log/{log_id}/inclusion", params={"receipt": rid})
        assert proof.status_code == 200, proof.text
        earliest_cosigned = f"— {WITNESS_NAME} " in proof.text

    # Offline, the auditor's way: this replica's log exported and verified with the witness
    # required, the receipt among the valid ones.
    trust_out = cluster.cli("audit", "trust", "--log-dir", str(victim.receipts_dir))
    assert trust_out.returncode == 0, trust_out.stderr
    trust = tmp_path / "trust.json"
    trust.write_text(trust_out.stdout)
    bundle = tmp_path / "bundle"
    exported = cluster.cli("audit", "export", "--log-dir", str(victim.receipts_dir), str(bundle))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    t0 = time.monotonic()
    args = ["verify", str(bundle), "--trust", str(trust), "--json"]
    v = cluster.cli(*args, "--require-witness", WITNESS_NAME)
    verify_s = time.monotonic() - t0
    report = json.loads(v.stdout)
    mine = [f for f in report["findings"] if f["subject"] == f"receipt {rid}"]
    say(
        f"\n[scenario 2] receipt {rid} (index {index}) answered, replica {victim.name} "
        f"SIGKILLed; restarted and ready in {ready_s:.1f}s ({restart_s:.1f}s incl. start);"
        f"\n  cosigned checkpoint size {size} (log time {when - t_kill:+.1f}s after the kill) "
        f"{cosigned_s:.1f}s after the restart; the earliest checkpoint including it "
        f"{'is' if earliest_cosigned else 'is NOT'} cosigned;"
        f"\n  offline verify of {victim.name}'s log: exit {v.returncode} in {verify_s:.1f}s, "
        f"{report['counts']}"
    )
    assert v.returncode == 0, json.dumps(report, indent=1)[-4000:]
    assert [f["status"] for f in mine] == ["valid"], mine
