"""Scenario 1: a production deployment's audit trail, from client traffic to offline verdicts.

Ninety-odd seconds of bursts with idle gaps (longer than the checkpoint interval) in every
verification mode, with denials, against two replicas with a witness; then the operator's
`ztgate audit trust` and `ztgate audit export`, and the auditor's `ztgate verify --trust T
--require-witness W`: exit 0 on the bundle as exported, exit 1 with a named reason code on
each tampered copy. The untampered bundle, verified with the same trust file and flags, is
the positive control for every refusal.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.system.cluster import CHECKPOINT_INTERVAL_S, WITNESS_NAME, ProductionCluster
from tests.system.figures import say
from tests.system.traffic import (
    PURPOSE,
    STATUS,
    Call,
    Result,
    TrafficLog,
    run_traffic,
    send,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

TRAFFIC_S = 90.0
GAPS_S = (2.0, 4.0, 6.0)  # idle between bursts; each longer than the checkpoint interval
FINAL_DEADLINE_S = 90.0  # for the last receipts to be checkpointed and cosigned


def log_of(receipt_id: str) -> str:
    return receipt_id.rsplit(".", 2)[0]


@dataclass
class Audit:
    cluster: ProductionCluster
    traffic: TrafficLog
    log_dirs: list[Path]  # every replica's receipts dir
    trust: Path
    trust_doc: dict[str, Any]
    bundle: Path
    verify_rc: int
    report: dict[str, Any]
    work: Path
    witness_vkey: str  # `ztgate witness vkey`: the auditor's out-of-band copy
    times: dict[str, float] = field(default_factory=dict)

    def verify(self, bundle: Path) -> tuple[int, str]:
        args = ["verify", str(bundle), "--trust", str(self.trust)]
        r = self.cluster.cli(*args, "--require-witness", WITNESS_NAME)
        return r.returncode, r.stdout + r.stderr

    def answers(self, mode: str | None = None) -> list[Result]:
        return [
            r
            for r in self.traffic.results
            if r.status == 200 and (mode is None or r.call.mode == mode)
        ]

    def denials(self) -> list[Result]:
        return [r for r in self.traffic.results if r.status == 403]


def wait_until_cosigned(cluster: ProductionCluster, deadline_s: float) -> dict[str, int]:
    """Until every replica's log has a checkpoint at its current size that the witness
    cosigned, read through the replicas' own log endpoints (as the auditor, over mTLS).
    Returns each log's final size."""
    end = time.monotonic() + deadline_s
    with cluster.client("audra", timeout=10) as auditor:
        while True:
            sizes: dict[str, int] = {}
            done = True
            for replica in cluster.replicas:
                for desc in auditor.get(f"{replica.base}/log").json()["logs"]:
                    r = auditor.get(f"{replica.base}/log/{desc['log_id']}/checkpoint")
                    lines = r.text.splitlines() if r.status_code == 200 else []
                    size = int(lines[1]) if len(lines) > 1 else -1
                    cosigned = any(ln.startswith(f"— {WITNESS_NAME} ") for ln in lines)
                    sizes[desc["log_id"]] = int(desc["size"])
                    done = done and cosigned and size == int(desc["size"])
            if done:
                return sizes
            assert time.monotonic() < end, f"logs not all checkpointed and cosigned: {sizes}"
            time.sleep(0.5)


def raw_b64(pem: Path) -> str:
    key = serialization.load_pem_public_key(pem.read_bytes())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def audit(
    production_cluster: ProductionCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Audit]:
    cluster = production_cluster
    work = tmp_path_factory.mktemp("audit")
    clients = {n: cluster.client(n) for n in ("shop", "ana", "cleo", "mallory")}
    try:
        traffic = run_traffic(cluster, clients, TRAFFIC_S, GAPS_S)
    finally:
        for c in clients.values():
            c.close()
    times: dict[str, float] = {}
    t0 = time.monotonic()
    wait_until_cosigned(cluster, FINAL_DEADLINE_S)
    times["wait_cosigned_s"] = time.monotonic() - t0

    # The operator publishes a trust-file template; the auditor checks every key in it
    # against copies obtained out of band (here: the key files and the witness itself).
    # Each replica's receipts dir, read in place (as an operator mounts each replica's
    # volume read-only on an audit host): one trust file and one bundle cover them all.
    log_dirs = [r.receipts_dir for r in cluster.replicas]
    dir_args = [a for d in log_dirs for a in ("--log-dir", str(d))]
    r = cluster.cli("audit", "trust", *dir_args)
    assert r.returncode == 0, r.stderr
    trust_doc = json.loads(r.stdout)
    trust = work / "trust.json"
    trust.write_text(json.dumps(trust_doc, indent=2))
    vkey = cluster.cli("witness", "vkey", "--dir", str(cluster.witness_dir)).stdout.strip()

    # Export and verify; a receipt still waiting for its checkpoint makes verify say
    # "pending" (exit 3): export again until the bundle is final.
    t0 = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        bundle = work / f"bundle-{attempt}"
        exported = cluster.cli("audit", "export", *dir_args, str(bundle))
        assert exported.returncode == 0, exported.stdout + exported.stderr
        t1 = time.monotonic()
        args = ["verify", str(bundle), "--trust", str(trust), "--json"]
        v = cluster.cli(*args, "--require-witness", WITNESS_NAME)
        times["verify_s"] = time.monotonic() - t1
        if v.returncode != 3 or time.monotonic() - t0 > FINAL_DEADLINE_S:
            break
        time.sleep(1.0)
    times["export_and_verify_s"] = time.monotonic() - t0
    try:
        report = json.loads(v.stdout)
    except ValueError:
        report = {"raw": v.stdout + v.stderr}  # a usage error (exit 2): shown by the test
    yield Audit(
        cluster,
        traffic,
        log_dirs,
        trust,
        trust_doc,
        bundle,
        v.returncode,
        report,
        work,
        vkey,
        {**times, "export_attempts": attempt},
    )


def bundle_figures(bundle: Path) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    logs = {}
    kinds: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    for entry in manifest["logs"]:
        base = bundle / "logs" / entry["log_id"]
        sizes = sorted(int(p.stem) for p in (base / "checkpoints").glob("*.checkpoint"))
        cosigned = sorted(
            int(p.stem)
            for p in (base / "checkpoints").glob("*.checkpoint")
            if f"— {WITNESS_NAME} " in p.read_text()
        )
        for f in (base / "receipts").glob("*.json"):
            body = json.loads(f.read_text())["receipt"]
            kinds[body["kind"]] += 1
            if body["kind"] == "answer":
                modes[body["verification"]["mode"]] += 1
        logs[entry["log_id"]] = {
            "origin": entry["origin"],
            "receipts": len(entry["receipts"]),
            "checkpoint_sizes": sizes,
            "cosigned_sizes": cosigned,
        }
    return {"format": manifest["format"], "logs": logs, "kinds": kinds, "modes": modes}


def test_every_mode_is_answered_receipted_cosigned_and_verifies(audit: Audit) -> None:
    t = audit.traffic
    figures = bundle_figures(audit.bundle)
    say(f"\n[scenario 1] traffic {t.seconds:.1f}s in {t.bursts} bursts, busy {t.busy_s:.1f}s")
    say(f"  idle gaps {t.idle_gaps_s} s (checkpoint interval {CHECKPOINT_INTERVAL_S}s)")
    for mode, counts in sorted(t.by_mode().items()):
        lat = [r.seconds for r in t.results if r.call.mode == mode and r.status == 200]
        mean = f"{sum(lat) / len(lat):.2f}s" if lat else "-"
        say(f"  mode {mode:9}: {dict(counts)}  mean answer latency {mean}")
    say(f"  bundle {figures['format']}: receipts by kind {dict(figures['kinds'])}")
    say(f"  answers by mode in the bundle {dict(figures['modes'])}")
    for f in figures["logs"].values():
        say(f"  log {f['origin']}: {f['receipts']} receipts")
        say(f"    checkpoint sizes {f['checkpoint_sizes']}")
        say(f"    cosigned sizes   {f['cosigned_sizes']}")
    say(f"  times {audit.times}")
    say(f"  verify exit {audit.verify_rc}: {audit.report.get('counts', audit.report)}")

    assert t.seconds >= TRAFFIC_S and t.bursts >= 3
    assert all(g > CHECKPOINT_INTERVAL_S for g in t.idle_gaps_s) and t.idle_gaps_s
    wrong = [(r.call, r.status, r.detail) for r in t.results if r.status != r.call.expect]
    assert not wrong, wrong
    for mode, accepted in STATUS.items():
        answers = audit.answers(mode)
        assert answers, f"no {mode} answer"
        for r in answers:
            assert r.params["ztgate.verification"] == mode
            assert r.params["ztgate.verification_status"] in accepted, r.params
            assert r.receipt_id is not None
            nodes = r.params["ztgate.nodes"].split(",")
            if mode == "redundant":
                assert len(set(nodes)) == 2, nodes
            if mode == "zk":
                assert nodes[0] in ("n1", "n2"), nodes  # only they serve the prover
    denials = audit.denials()
    assert denials and all(r.receipt_id for r in denials), "every denial is receipted"
    # Both replicas answered, each into its own log(s): one per worker process (gw-b's).
    answered_by = [
        {log_of(r.receipt_id) for r in audit.answers() if r.receipt_id and r.call.replica == i}
        for i in range(len(audit.cluster.replicas))
    ]
    assert all(answered_by) and not set.intersection(*answered_by), answered_by
    assert figures["modes"].keys() >= set(STATUS)

    # The trust file the operator published names every log, and its keys are the ones
    # obtained out of band.
    log_pub = raw_b64(audit.cluster.pki.signing_key("log-checkpoint").with_suffix(".pub"))
    assert [k["public_key"] for k in audit.trust_doc["log_keys"]] == [log_pub]
    assert audit.witness_vkey == audit.cluster.witness_vkey  # what `witness init` printed
    assert audit.trust_doc["witnesses"] == [{"vkey": audit.witness_vkey}]

    assert audit.verify_rc == 0, json.dumps(audit.report, indent=1)[-6000:]
    valid = {
        f["subject"].removeprefix("receipt ")
        for f in audit.report["findings"]
        if f["status"] == "valid" and f["subject"].startswith("receipt ")
    }
    ours = {r.receipt_id for r in t.results if r.receipt_id}
    assert ours <= valid, sorted(ours - valid)[:5]
    zk = [
        f
        for f in audit.report["findings"]
        if f["subject"].removeprefix("receipt ") in {r.receipt_id for r in audit.answers("zk")}
    ]
    assert zk and all(f["details"].get("proof_reverified") is True for f in zk)
    for f in figures["logs"].values():
        assert f["cosigned_sizes"], "every log has a cosigned checkpoint in the bundle"


def test_mpc_is_served_by_every_replica(audit: Audit) -> None:
    """Both replicas answer mpc with the same parties, at the same time: each keeps its
    own session (a party serves several, up to --max-sessions). The traffic of the test
    above sends mpc to the replicas in turn; here both ask at once."""
    with audit.cluster.client("cleo") as cleo:
        calls = [Call("cleo", "risk", "mpc", i, 200, PURPOSE) for i in (0, 1)]
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            results = list(pool.map(lambda c: send(audit.cluster, {"cleo": cleo}, c), calls))
    for r in results:
        say(f"\n[scenario 1] mpc on replica {r.call.replica}: {r.status} {r.detail}")
    assert [r.status for r in results] == [200, 200], [(r.status, r.detail) for r in results]
    for r in results:
        assert r.params["ztgate.verification_status"] == "semi-honest-mpc", r.params
        assert r.receipt_id is not None
    assert len({log_of(r.receipt_id or "") for r in results}) == 2, "each replica's own log"


# --------------------------------------------------------------------------- tampering


def edit_lists(doc: Any, match: Callable[[Any], bool], op: str) -> int:
    """Drop (`op` "drop") or duplicate ("dup") every list item `match` picks, anywhere in
    `doc` (the manifest's receipt list, an inventory, a key list); returns how many."""
    changed = 0
    if isinstance(doc, dict):
        for v in doc.values():
            changed += edit_lists(v, match, op)
    elif isinstance(doc, list):
        out = []
        for item in doc:
            if match(item):
                changed += 1
                if op == "dup":
                    out += [item, json.loads(json.dumps(item))]
            else:
                changed += edit_lists(item, match, op)
                out.append(item)
        doc[:] = out
    return changed


def edit_manifest(bundle: Path, match: Callable[[Any], bool], op: str) -> int:
    changed = 0
    for path in [bundle / "manifest.json", *sorted((bundle / "keys").glob("*.json"))]:
        doc = json.loads(path.read_text())
        n = edit_lists(doc, match, op)
        if n:
            path.write_text(json.dumps(doc, indent=1))
        changed += n
    return changed


def names_receipt(rid: str) -> Callable[[Any], bool]:
    return lambda item: item == rid or (isinstance(item, dict) and item.get("id") == rid)


def drop_receipt(bundle: Path, rid: str) -> str:
    """Leave one receipt out cleanly: its files, its evidence and its manifest entries."""
    base = bundle / "logs" / log_of(rid)
    files = [*(base / "receipts").glob(f"{rid}.*"), *(base / "evidence").glob(f"{rid}.*")]
    for f in files:
        f.unlink()
    listed = edit_manifest(bundle, names_receipt(rid), "drop")
    assert files and listed, "the tamper must change the bundle"
    return f"dropped {rid}: {len(files)} file(s), {listed} manifest item(s)"


def tamper_dropped_answer(audit: Audit, bundle: Path) -> str:
    r = next(r for r in audit.answers("none") if r.receipt_id)
    assert r.receipt_id is not None
    return drop_receipt(bundle, r.receipt_id)


def tamper_dropped_denial(audit: Audit, bundle: Path) -> str:
    r = next(r for r in audit.denials() if r.receipt_id and not r.coalesced)
    assert r.receipt_id is not None
    return drop_receipt(bundle, r.receipt_id)


def tamper_duplicated_entry(audit: Audit, bundle: Path) -> str:
    r = next(r for r in audit.answers("redundant") if r.receipt_id)
    assert r.receipt_id is not None
    n = edit_manifest(bundle, names_receipt(r.receipt_id), "dup")
    assert n, "the tamper must change the bundle"
    return f"listed {r.receipt_id} twice ({n} manifest item(s))"


def tamper_bad_cosignature(audit: Audit, bundle: Path) -> str:
    """Flip the last byte of the trusted witness's signature in every checkpoint and
    tlog-proof (still well-formed base64: the cosignature parses and fails to verify)."""
    changed = 0
    mark = f"— {WITNESS_NAME} "
    files = [*bundle.glob("logs/*/checkpoints/*"), *bundle.glob("logs/*/receipts/*.tlog-proof")]
    for f in files:
        lines = f.read_text().split("\n")
        for i, line in enumerate(lines):
            if line.startswith(mark):
                sig = bytearray(base64.b64decode(line[len(mark) :]))
                sig[-1] ^= 0x01
                lines[i] = mark + base64.b64encode(bytes(sig)).decode()
                changed += 1
        f.write_text("\n".join(lines))
    assert changed, "the tamper must change the bundle"
    return f"corrupted {changed} cosignature(s) by {WITNESS_NAME}"


def tamper_missing_log(audit: Audit, bundle: Path) -> str:
    """Leave a log of the second replica (one of its workers') out of the bundle."""
    rid = next(r.receipt_id for r in audit.answers() if r.call.replica == 1 and r.receipt_id)
    assert rid is not None
    log_id = log_of(rid)
    manifest = json.loads((bundle / "manifest.json").read_text())
    origin = next(e["origin"] for e in manifest["logs"] if e["log_id"] == log_id)
    shutil.rmtree(bundle / "logs" / log_id)
    n = edit_manifest(
        bundle,
        lambda item: (
            isinstance(item, dict)
            and (item.get("log_id") == log_id or item.get("origin") == origin)
        ),
        "drop",
    )
    assert n, "the tamper must change the bundle"
    return f"left out log {origin} ({n} manifest/key item(s))"


TAMPERS: dict[str, tuple[Callable[[Audit, Path], str], str]] = {
    "dropped-answer-receipt": (tamper_dropped_answer, "missing-entry"),
    "dropped-denial-receipt": (tamper_dropped_denial, "missing-entry"),
    "duplicated-entry": (tamper_duplicated_entry, "duplicate-entry"),
    "bad-witness-cosignature": (tamper_bad_cosignature, "bad-cosignature"),
    "missing-log": (tamper_missing_log, "missing-log"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_bundle_fails_with_a_named_reason(audit: Audit, case: str) -> None:
    tamper, code = TAMPERS[case]
    # Positive control: the same bundle, trust file and flags, untampered, verify (exit 0).
    assert audit.verify_rc == 0, "the untampered bundle must verify first"
    if case == "missing-log":
        # The trust file must say which logs exist, or a left-out log goes unnoticed.
        origins = sorted(o for k in audit.trust_doc["log_keys"] for o in k.get("origins", []))
        logs = sum(r.workers for r in audit.cluster.replicas)  # a log per worker process
        assert len(origins) == logs, f"ztgate audit trust lists no origins: {audit.trust_doc}"
    copy = audit.work / f"tampered-{case}"
    shutil.copytree(audit.bundle, copy)
    what = tamper(audit, copy)
    t0 = time.monotonic()
    rc, out = audit.verify(copy)
    say(f"\n[scenario 1] {case}: {what}; verify exit {rc} in {time.monotonic() - t0:.1f}s")
    shown = [ln for ln in out.splitlines() if ln.startswith("status:")]
    shown += [ln.strip() for ln in out.splitlines() if f"[{code}]" in ln][:2]
    say("  " + "\n  ".join(shown))
    assert rc == 1, out[-3000:]
    assert code in out, out[-3000:]
