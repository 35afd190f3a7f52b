"""The link to the core cut for real (DDIL), in the production deployment.

The replicas reach the core's witness through the project's fault proxy; the witness
keeps a vault of their logs. With the link cut the replicas keep answering and their
checkpoints go uncosigned; once it returns, the core holds every leaf and receipt body
and has cosigned, and the core's own export verifies with the auditor's trust file,
the receipts issued while cut off included.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.system.cluster import WITNESS_NAME, ProductionCluster
from tests.system.figures import say
from tests.system.traffic import Call, send

CUT_REQUESTS = 6


def _vault(cluster: ProductionCluster) -> dict[str, dict[str, int]]:
    r = httpx.get(f"http://127.0.0.1:{cluster.witness_port}/vault", timeout=5)
    r.raise_for_status()
    return dict(r.json())


def test_a_cut_link_to_the_core_keeps_answering_and_reconciles_when_restored(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    cluster = production_cluster
    clients = {"shop": cluster.client("shop", timeout=60)}
    try:
        before = _vault(cluster)
        cluster.link.cut()
        try:
            results = [
                send(cluster, clients, Call("shop", "iris", "none", i % 2, 200))
                for i in range(CUT_REQUESTS)
            ]
            assert [r.status for r in results] == [200] * CUT_REQUESTS  # served, cut off
            held = {r.receipt_id for r in results}
            assert None not in held
            time.sleep(3)  # several checkpoint ticks, each failing to reach the core
            during = _vault(cluster)
            assert {o: s["cosigned"] for o, s in during.items()} == {
                o: s["cosigned"] for o, s in before.items()
            }  # the core learnt nothing while cut off
        finally:
            cluster.link.restore()
        restored = time.monotonic()
        # Positive control: once restored, every replica log the core holds catches up.
        logs_after = None
        while time.monotonic() - restored < 60:
            state = _vault(cluster)
            was = {o: s["cosigned"] for o, s in before.items()}
            grown = [o for o, s in state.items() if s["cosigned"] > was.get(o, 0)]
            if len(grown) >= 2:  # both replicas answered while cut off
                logs_after = state
                break
            time.sleep(0.5)
        assert logs_after is not None, _vault(cluster)
        say(f"  edge link: cosigned {time.monotonic() - restored:.1f}s after restoring")
    finally:
        for c in clients.values():
            c.close()
    # The auditor's view from the core alone: the vault's export verifies.
    trust = tmp_path / "trust.json"
    log_dirs = [a for r in cluster.replicas for a in ("--log-dir", str(r.receipts_dir))]
    r = cluster.cli("audit", "trust", *log_dirs)
    assert r.returncode == 0, r.stderr
    trust.write_text(r.stdout)
    bundle = tmp_path / "from-core"
    exported = cluster.cli("witness", "export", "--dir", str(cluster.witness_dir),
                           "--out", str(bundle), "--json")  # fmt: skip
    assert exported.returncode == 0, exported.stdout + exported.stderr
    v = cluster.cli("verify", str(bundle), "--trust", str(trust), "--json",
                    "--require-witness", WITNESS_NAME)  # fmt: skip
    report = json.loads(v.stdout)
    bad = [f for f in report.get("findings", []) if f.get("status") != "valid"]
    # A zk receipt's proof files follow its leaves in later uploads, so one may still be
    # in flight when this exports (test_edge_reconcile.py shows the vault's evidence path,
    # test_an_edge_zk_receipt_verifies_its_proof_from_the_cores_vault); nothing else fails.
    assert {f["code"] for f in bad} <= {"zk-evidence-missing"}, json.dumps(bad, indent=1)[:4000]
    assert held <= set(report["receipts"])  # the answers given while cut off are there
    valid = {f["subject"].split()[-1] for f in report["findings"] if f["status"] == "valid"}
    assert held <= valid


def test_the_cores_export_with_an_altered_body_does_not_verify(
    production_cluster: ProductionCluster, tmp_path: Path
) -> None:
    """Negative control for the export above, built the same way."""
    cluster = production_cluster
    trust = tmp_path / "trust.json"
    log_dirs = [a for r in cluster.replicas for a in ("--log-dir", str(r.receipts_dir))]
    trust.write_text(cluster.cli("audit", "trust", *log_dirs).stdout)
    bundle = tmp_path / "from-core"
    assert cluster.cli("witness", "export", "--dir", str(cluster.witness_dir),
                       "--out", str(bundle)).returncode == 0  # fmt: skip
    receipt = next(p for p in bundle.glob("logs/*/receipts/*.json") if b'"iris"' in p.read_bytes())
    receipt.write_bytes(receipt.read_bytes().replace(b'"iris"', b'"irid"', 1))
    v = cluster.cli("verify", str(bundle), "--trust", str(trust),
                    "--require-witness", WITNESS_NAME)  # fmt: skip
    assert v.returncode == 1, v.stdout[-2000:]
