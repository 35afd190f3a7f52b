"""`ztgate serve --workers N`: one replica served by several processes (gateway/supervisor.py).

The local store the workers share without Redis is held to the `StateStore` contract (the
contract tests of tests/test_state.py, run again here against it), and shown shared between
separate connections as between processes; then a real 2-worker gateway (real TLS, real
Triton nodes, separate processes) keeps one rate limit and one revocation set across its
workers, serves every worker's receipts from any worker, and exports and verifies them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.pki import PKI
from gateway.ports import free_port, wait_ready
from gateway.receipts.model import parse_receipt_id
from gateway.state import StateStore, StoreUnavailable
from gateway.state.factory import open_store
from gateway.state.sqlite import SqliteStore
from gateway.supervisor import Worker
from tests.conftest import TritonCluster
from tests.gateway_harness import client_context, policy_dir
from tests.test_client_text import client
from tests.test_gateway import IRIS, infer_body, node_table, registry_dir
from tests.test_gateway_policy import LIMITED
from tests.test_state import (
    FakeClock,
    clock,
    test_eject_grows_and_caps,
    test_eject_is_idempotent_while_ejected,
    test_eject_rejects_bad_args,
    test_ejection_history_decays,
    test_failure_counting,
    test_nonce_replay,
    test_readmit_ends_ejection_but_keeps_backoff,
    test_revocations_grow_only_and_versioned,
    test_satisfies_protocol,
    test_token_bucket_clock_stepping_back,
    test_token_bucket_refill_and_retry_after,
    test_token_bucket_rejects_bad_args,
)

# The contract tests of tests/test_state.py, collected here against `store` below.
__all__ = [
    "clock",
    "registry_dir",
    "test_eject_grows_and_caps",
    "test_eject_is_idempotent_while_ejected",
    "test_eject_rejects_bad_args",
    "test_ejection_history_decays",
    "test_failure_counting",
    "test_nonce_replay",
    "test_readmit_ends_ejection_but_keeps_backoff",
    "test_revocations_grow_only_and_versioned",
    "test_satisfies_protocol",
    "test_token_bucket_clock_stepping_back",
    "test_token_bucket_refill_and_retry_after",
    "test_token_bucket_rejects_bad_args",
]


@pytest_asyncio.fixture(loop_scope="function")
async def store(clock: FakeClock, tmp_path: Path) -> AsyncIterator[StateStore]:
    s = SqliteStore(tmp_path / "state.db", clock=clock)
    try:
        yield s
    finally:
        await s.close()


# -- the shared local store ---------------------------------------------------------------


async def test_open_store_shares_one_file_between_workers_only(tmp_path: Path) -> None:
    shared = open_store(None, tmp_path, processes=2)
    alone = open_store(None, tmp_path / "one")
    try:
        assert isinstance(shared, SqliteStore)
        assert not isinstance(alone, SqliteStore)  # control: one process keeps memory
    finally:
        await shared.close()
        await alone.close()


async def test_two_connections_share_buckets_nonces_ejections_revocations(
    tmp_path: Path, clock: FakeClock
) -> None:
    # Two stores on one file: what two worker processes hold (one connection pair each).
    a = SqliteStore(tmp_path / "state.db", clock=clock)
    b = SqliteStore(tmp_path / "state.db", clock=clock)
    try:
        got = await asyncio.gather(*((a, b)[i % 2].take_token("k", 1.0, 5) for i in range(12)))
        assert sum(ok for ok, _ in got) == 5  # one bucket of 5, not one per worker
        assert (await b.take_token("other", 1.0, 5))[0]  # control: another key is full
        assert await a.check_nonce("n", 60.0)
        assert not await b.check_nonce("n", 60.0)  # a replay through the other worker
        assert await b.check_nonce("m", 60.0)  # control: a fresh nonce passes
        await a.eject("node-1", 5.0, 60.0)
        assert set(await b.ejected_until(["node-1", "node-2"])) == {"node-1"}
        assert await a.add_revocation("ca", "01") == 1
        assert await b.revocations_since(0) == (1, {("ca", "01")})
    finally:
        await a.close()
        await b.close()


async def test_revocations_survive_reopen_and_tables_are_bounded(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "state.db"
    s = SqliteStore(path, clock=clock, max_keys=3)
    await s.add_revocation("ca", "01")
    for i in range(300):  # past one sweep interval
        await s.take_token(f"k{i}", 1.0, 1)
    with pytest.raises(StoreUnavailable):
        for i in range(300):
            await s.check_nonce(f"x{i}", 10.0)
    clock.advance(10.0)
    assert await s.check_nonce("after", 10.0)  # control: expired nonces make room
    await s.close()
    again = SqliteStore(path, clock=clock)
    try:
        assert await again.revocations_since(0) == (1, {("ca", "01")})
        n = again._soft.execute("SELECT count(*) FROM buckets").fetchone()[0]
        assert n < 300  # evicted down to the bound at a sweep
    finally:
        await again.close()


async def test_a_call_that_finds_the_file_locked_waits_off_the_loop(
    tmp_path: Path, clock: FakeClock
) -> None:
    import sqlite3

    store = SqliteStore(tmp_path / "state.db", clock=clock)
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        assert (await store.take_token("k", 1.0, 2))[0]  # control: the fast path
        other.execute("BEGIN IMMEDIATE")  # another worker holds the write lock
        waiting = asyncio.ensure_future(store.take_token("k", 1.0, 2))
        await asyncio.sleep(0.1)  # the loop runs meanwhile: the call waits on the thread
        assert not waiting.done()
        other.execute("COMMIT")
        assert (await waiting)[0]
        assert not (await store.take_token("k", 1.0, 2))[0]  # one bucket: 2 taken, empty
    finally:
        other.close()
        await store.close()


# Processes opening one NEW state file at the same moment (workers of a replica whose data
# dir is fresh, a `ztgate` command beside them): each must start.
_OPEN = """
import asyncio, sys, time
from pathlib import Path
from gateway.state.sqlite import SqliteStore

go = Path(sys.argv[2])
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit(2)

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    print(int((await store.take_token("k", 1.0, 10))[0]))
    await store.close()

asyncio.run(main())
"""


def test_processes_opening_one_new_state_file_together_all_start(tmp_path: Path) -> None:
    """Switching a new file to WAL takes a lock SQLite does not wait for; the store retries
    it (bounded), so six processes released together on ten fresh files all start and
    take. Control: the file each round made is one shared store (six takes, one bucket)."""
    for round_ in range(10):
        path, go = tmp_path / f"state{round_}.db", tmp_path / f"go{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN, str(path), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        try:
            time.sleep(0.3)
            go.touch()
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        assert codes == [0] * 6, [err[-300:] for _, err in outs]
        assert sum(int(out) for out, _ in outs) == 6


# Two worker processes taking from one bucket, each as fast as it can: the one-statement
# bucket (gateway/state/sqlite.py `_TAKE`) must stay atomic across processes.
_HAMMER = """
import asyncio, sys, time
from pathlib import Path
from gateway.state.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    go = Path(sys.argv[2])
    deadline = time.monotonic() + 60  # a parent that never says go: exit, not spin on
    while not go.exists():  # both processes start taking together (a spin: no skew)
        if time.monotonic() > deadline:
            sys.exit(2)
    took = 0
    for _ in range(int(sys.argv[3])):
        took += (await store.take_token("shared", float(sys.argv[4]), int(sys.argv[5])))[0]
    await store.close()
    print(took)

asyncio.run(main())
"""


def test_two_processes_hammering_one_bucket_never_take_more_than_it_holds(
    tmp_path: Path,
) -> None:
    path, go = tmp_path / "state.db", tmp_path / "go"
    # Refills one token in ~11 days: none in the test. Each process alone could take 2,000
    # of the 2,500: both take for tens of milliseconds, side by side.
    rate, burst, calls = 1e-6, 2500, 2000
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, str(path), str(go), str(calls), str(rate), str(burst)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        time.sleep(0.5)  # let both open the store (correctness does not depend on it)
        go.touch()
        took = [int(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:  # no child outlives a failed wait
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert sum(took) == burst  # 4,000 calls, one bucket: exactly what it held, no more
    # Control: the same bucket refills with time. A clock 10 tokens later grants 10 more.
    later = SqliteStore(path, clock=lambda: time.time() + 10 / rate)

    async def take() -> int:
        try:
            return sum([(await later.take_token("shared", rate, burst))[0] for _ in range(30)])
        finally:
            await later.close()

    assert asyncio.run(take()) == 10


async def test_a_state_file_from_before_the_one_statement_bucket_is_upgraded(
    tmp_path: Path, clock: FakeClock
) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute(
        "CREATE TABLE buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL)"
    )
    old.execute("INSERT INTO buckets VALUES ('k', 1.0, ?)", (clock(),))  # one token left
    old.close()
    store = SqliteStore(path, clock=clock)
    try:
        assert (await store.take_token("k", 1e-3, 5))[0]  # the old row kept its one token
        assert not (await store.take_token("k", 1e-3, 5))[0]
        assert (await store.take_token("new", 1e-3, 5))[0]  # control: a new bucket is full
    finally:
        await store.close()


def test_what_several_workers_cannot_serve_is_refused(pki: PKI, tmp_path: Path) -> None:
    from dataclasses import replace

    from gateway.supervisor import refusals
    from tests.gateway_harness import gateway_config

    cfg = gateway_config(pki, tmp_path / "registry", tmp_path / "data", [])
    assert refusals(cfg) == []  # control
    edge = replace(cfg, uplink=replace(cfg.uplink, core_url="https://core:8090/publish"))
    assert any(r.startswith("uplink.core_url") for r in refusals(edge))
    dealer = replace(cfg, mpc=replace(cfg.mpc, dealer_listen="127.0.0.1:7000"))
    assert any(r.startswith("mpc.dealer_listen") for r in refusals(dealer))


def test_a_worker_knows_its_files() -> None:
    w = Worker(1, 3)
    assert w.receipts_dir(Path("/r")) == Path("/r/w1")
    assert w.siblings(Path("/r")) == [Path("/r"), Path("/r/w0"), Path("/r/w2")]
    assert w.revocations_file == "revoked-w1.jsonl" and not w.runs_jobs
    assert Worker(0, 3).revocations_file == "revoked.jsonl" and Worker(0, 3).runs_jobs


# -- a real 2-worker gateway --------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a TOML basic string


def _toml(raw: dict[str, Any]) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict | list)]
    out = "\n".join(top) + "\n"
    for k, v in raw.items():
        if isinstance(v, dict):
            out += f"\n[{k}]\n" + "".join(f"{a} = {_toml_value(b)}\n" for a, b in v.items())
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out += f"\n[[{k}]]\n" + "".join(
                    f"{a} = {_toml_value(b)}\n" for a, b in item.items()
                )
    return out


def write_config(
    pki: PKI,
    registry: Path,
    root: Path,
    nodes: list[dict[str, Any]],
    workers: int,
    policy: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A dev gateway.toml like tests/gateway_harness.py's, with `listen.workers`, and a
    policy that limits lena to 20 inferences an hour (a refill takes 180 s)."""
    gw_dir = pki.root / "gateway" / "site-a"
    pol = policy_dir(root / "policies")
    (pol / "15-limited.cedar").write_text(LIMITED)
    ids = json.loads((pol / "identities.json").read_text())
    ids["clients"]["spiffe://ztgate.local/client/lena"] = {"groups": ["limited"]}
    (pol / "identities.json").write_text(json.dumps(ids))
    raw: dict[str, Any] = {
        "mode": "dev",
        "trust_domain": pki.trust_domain,
        "site": "site-a",
        "registry": str(registry),
        "data_dir": str(root / "data"),
        "listen": {
            "port": free_port(),
            "admin_port": free_port(),
            "graceful_shutdown_s": 1,
            "workers": workers,
        },
        "tls": {
            "cert": str(gw_dir / "server.crt"),
            "key": str(gw_dir / "server.key"),
            "client_ca": str(pki.client_ca_bundle()),
            "node_ca": str(pki.node_ca_bundle()),
            "node_client_cert": str(gw_dir / "node-client.crt"),
            "node_client_key": str(gw_dir / "node-client.key"),
            "dev_pki": True,
        },
        "policy": policy or {"dir": str(pol), "pre_policy_rate": "100000/minute"},
        "state": {"timeout_s": 3.0, "revocation_sync_s": 0.2},
        "receipts": {
            "signing_key": str(pki.key_path("receipt-signing")),
            "log_key": str(pki.key_path("log-checkpoint")),
            "checkpoint_interval_s": 0.2,
        },
        "nodes": nodes,
    }
    path = root / "gateway.toml"
    path.write_text(_toml(raw))
    return path, raw


@contextmanager
def serving(config: Path, raw: dict[str, Any], *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    log = open(config.parent / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ready = f"http://127.0.0.1:{raw['listen']['admin_port']}/v2/health/ready"
        if not wait_ready(ready, 120, proc):
            raise AssertionError((config.parent / "serve.log").read_text()[-4000:])
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _infer_fresh(pki: PKI, name: str, base: str) -> httpx.Response:
    """One request on a connection of its own: each new connection is hashed to a worker."""
    with client(pki, name) as c:
        return c.post(f"{base}/v2/models/iris/infer", json=infer_body(IRIS))


def _log_of(r: httpx.Response) -> str:
    return parse_receipt_id(r.json()["parameters"]["ztgate.receipt_id"])[0]


def test_two_workers_share_one_rate_limit_and_one_revocation_set(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    carl = pki.issue("client", "carl", organization="Acme")
    with serving(config, raw):
        # Positive control: fresh connections land on both workers (two logs answer).
        answered = [_infer_fresh(pki, "bob", base) for _ in range(12)]
        assert {r.status_code for r in answered} == {200}
        both = {_log_of(r) for r in answered}
        assert len(both) == 2, both
        # One bucket of 20 for lena across the workers, not 20 per worker.
        statuses, logs = [], set()
        for _ in range(30):
            r = _infer_fresh(pki, "lena", base)
            statuses.append(r.status_code)
            if r.status_code == 200:
                logs.add(_log_of(r))
        assert statuses == [200] * 20 + [429] * 10, statuses
        assert logs == both  # the admitted ones came from both workers
        # A revocation made through one worker applies on every worker.
        ctx = client_context(pki, carl.cert, carl.key)

        def carl_infers() -> httpx.Response:
            with httpx.Client(verify=ctx, timeout=30) as c:
                return c.post(f"{base}/v2/models/iris/infer", json=infer_body(IRIS))

        before = [carl_infers() for _ in range(12)]
        assert {r.status_code for r in before} == {200}  # control: carl served by both
        assert {_log_of(r) for r in before} == both
        from tests.test_gateway_policy import _issuer

        with client(pki, "olga") as officer:
            r = officer.post(
                f"{base}/admin/revoke",
                json={"issuer": _issuer(pki), "serial": format(carl.serial, "x")},
            )
            assert r.status_code == 200, r.text
        # Every worker learns it within a few syncs of 0.2 s; 30 s only bounds the wait.
        end = time.monotonic() + 30
        while any(carl_infers().status_code != 401 for _ in range(16)):
            assert time.monotonic() < end, "a worker still serves a revoked client"
            time.sleep(0.2)
        after = [carl_infers() for _ in range(16)]
        assert {r.status_code for r in after} == {401}
        assert {r.json()["detail"] for r in after} == {"client certificate has been revoked"}


def test_any_worker_serves_every_workers_receipts_and_export_covers_all_logs(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.cli import main

    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    with serving(config, raw) as proc:
        answered = [_infer_fresh(pki, "bob", base) for _ in range(12)]
        ids = [r.json()["parameters"]["ztgate.receipt_id"] for r in answered]
        logs = {parse_receipt_id(rid)[0] for rid in ids}
        assert len(logs) == 2, logs  # control: both workers answered
        # Every receipt, read through fresh connections (so through both workers), is
        # found, with its inclusion proof once a checkpoint covers it (0.2 s here).
        proofs: dict[str, str] = {}
        end = time.monotonic() + 30
        while len(proofs) < len(ids):
            assert time.monotonic() < end, f"proofs for {len(proofs)} of {len(ids)}"
            for rid in ids:
                with client(pki, "bob") as c:
                    r = c.get(f"{base}/v2/receipts/{rid}")
                assert r.status_code == 200, r.text
                assert r.json()["receipt"]["id"] == rid
                if r.json()["inclusion_proof"] is not None:
                    proofs[rid] = r.json()["inclusion_proof"]
        # The log index names both workers' logs, whichever worker answers.
        for _ in range(4):
            with client(pki, "bob") as c:
                listed = {entry["log_id"] for entry in c.get(f"{base}/log").json()["logs"]}
            assert logs <= listed
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # a drained replica exits 0
    receipts = tmp_path / "data" / "receipts"
    assert sorted(p.name for p in receipts.iterdir() if p.is_dir()) == ["w0", "w1"]
    # One export of the replica's receipts dir holds both workers' logs ...
    out = tmp_path / "bundle"
    capsys.readouterr()
    assert main(["audit", "export", "--log-dir", str(receipts), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logs"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    exported = {r["id"] for entry in manifest["logs"] for r in entry["receipts"]}
    assert set(ids) <= exported
    # ... and verifies against a trust file naming both.
    assert main(["audit", "trust", "--log-dir", str(receipts)]) == 0
    trust = tmp_path / "trust.json"
    trust.write_text(capsys.readouterr().out)
    assert main(["verify", str(out), "--trust", str(trust), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "valid"
    found = {f["subject"] for f in report["findings"] if f["subject"].startswith("receipt ")}
    assert all(any(rid in s for s in found) for rid in ids)
    [entry] = json.loads(trust.read_text())["log_keys"]  # one key, both workers' origins
    assert len(entry["origins"]) == 2
    # Control: a bundle of one worker's log is not the replica's: a log is missing.
    one = tmp_path / "one-worker"
    assert main(["audit", "export", "--log-dir", str(receipts / "w0"), str(one)]) == 0
    capsys.readouterr()
    assert main(["verify", str(one), "--trust", str(trust), "--json"]) != 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] != "valid"
    assert "missing-log" in {f["code"] for f in report["findings"]}


def _workers_of(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_a_dead_worker_is_restarted_and_sighup_reaches_every_worker(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    with serving(config, raw) as proc:
        logs = {_log_of(_infer_fresh(pki, "bob", base)) for _ in range(12)}
        assert len(logs) == 2
        first = _workers_of(proc.pid)
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        end = time.monotonic() + 60
        while len(now := _workers_of(proc.pid)) < 2 or victim in now:
            assert time.monotonic() < end and proc.poll() is None, "worker not restarted"
            time.sleep(0.1)
        # The replacement serves, on its old log (same log ids), beside the survivor.
        served: set[str] = set()
        while served != logs:
            assert time.monotonic() < end, served
            r = _infer_fresh(pki, "bob", base)
            if r.status_code == 200:
                served.add(_log_of(r))
        # The admin port counts the restart and sees both workers again.
        metrics = _samples(_admin(raw, "/metrics").text)
        assert metrics["ztgate_worker_restarts_total"] == [({}, 1.0)]
        assert metrics["ztgate_workers_alive"] == [({}, 2.0)]
        end = time.monotonic() + 30
        while _admin(raw, "/readyz").status_code != 200:
            assert time.monotonic() < end, "the replica is not ready after the restart"
            time.sleep(0.2)
        # SIGHUP: every worker reloads its policy and keeps serving (uvicorn would die
        # of an unhandled SIGHUP).
        workers = _workers_of(proc.pid)
        os.kill(proc.pid, signal.SIGHUP)
        for _ in range(8):
            assert _infer_fresh(pki, "bob", base).status_code == 200
        assert _workers_of(proc.pid) == workers and proc.poll() is None


def test_a_replica_whose_workers_cannot_start_exits_non_zero(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    # A policy that does not parse passes the preflight (a readable dir) and fails in
    # the workers, as they build the gateway.
    broken = policy_dir(tmp_path / "broken")
    (broken / "50-broken.cedar").write_text("permit (principal, action, resource) when {")
    text = config.read_text().replace(str(tmp_path / "policies"), str(broken))
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert b"could not start" in run.stderr and b"policy" in run.stderr
    # Control: the same config with the registry serves (and --workers overrides it).
    with serving(config, raw, "--workers", "2") as proc:
        assert len(_workers_of(proc.pid)) == 2


def test_serve_check_and_grpc_front_with_several_workers(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    import tritonclient.grpc as grpcclient

    from gateway.cli import main

    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    grpc_port = free_port()
    text = config.read_text().replace("[listen]\n", f"[listen]\ngrpc_port = {grpc_port}\n")
    config.write_text(text)
    # The workers bind the gRPC port together (SO_REUSEPORT): one another process holds
    # must be refused, not shared.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", grpc_port))
        holder.listen()
        assert main(["serve", "--config", str(config), "--check"]) == 2
        assert "listen.grpc_port" in capsys.readouterr().err
        # One process does not share it: its own start fails on the port (not --check's).
    assert main(["serve", "--config", str(config), "--check"]) == 0  # control: port free
    assert main(["serve", "--config", str(config), "--check", "--workers", "0"]) == 2
    assert "listen.workers" in capsys.readouterr().err
    # Both workers serve the gRPC front: fresh channels reach both logs.
    issued = pki.ensure("client", "bob")
    logs = set()
    with serving(config, raw):
        # The front is a background task of each worker: wait until both listen.
        end = time.monotonic() + 30
        while (config.parent / "serve.log").read_text().count("gRPC front listening") < 2:
            assert time.monotonic() < end, "the workers' gRPC fronts did not start"
            time.sleep(0.1)
        for _ in range(12):
            c = grpcclient.InferenceServerClient(
                f"127.0.0.1:{grpc_port}",
                ssl=True,
                root_certificates=str(pki.root_ca),
                private_key=str(issued.key),
                certificate_chain=str(issued.cert),
                channel_args=[("grpc.use_local_subchannel_pool", 1)],  # a connection each
            )
            try:
                inp = grpcclient.InferInput("input", list(IRIS.shape), "FP32")
                inp.set_data_from_numpy(IRIS)
                got = c.infer("iris", [inp]).get_response()
            finally:
                c.close()
            rid = got.parameters["ztgate.receipt_id"].string_param
            logs.add(parse_receipt_id(rid)[0])
    assert len(logs) == 2, logs


def test_without_redis_jobs_are_shared_and_run_by_one_worker(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    with serving(config, raw):
        # Control: fresh connections reach both workers.
        assert len({_log_of(_infer_fresh(pki, "bob", base)) for _ in range(12)}) == 2
        ids = []
        for i in range(8):  # each submit on its own connection: both workers take some
            with client(pki, "bob") as c:
                r = c.post(
                    f"{base}/v2/models/iris/jobs",
                    json=infer_body(IRIS),
                    headers={"idempotency-key": f"workers-{i}"},
                )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        receipts = set()
        end = time.monotonic() + 60
        for job_id in ids:
            while True:  # polled through fresh connections: any worker answers
                with client(pki, "bob") as c:
                    view = c.get(f"{base}/v2/jobs/{job_id}").json()
                if view["status"] in ("done", "failed"):
                    break
                assert time.monotonic() < end, view
                time.sleep(0.1)
            assert view["status"] == "done" and view["http_status"] == 200, view
            assert view["node_executions"] == 1  # run once, not once per worker
            receipts.add(parse_receipt_id(view["receipt_id"])[0])
        assert len(receipts) == 1  # one worker runs the replica's jobs


def test_a_bundle_pushed_to_one_worker_reaches_every_worker(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    import datetime as dt

    from gateway.pki import load_signing_key
    from gateway.policy.bundle import build_bundle, facts_from, sign_bundle
    from gateway.registry import Registry
    from tests.gateway_harness import gateway_config

    nodes = node_table(triton_cluster)
    signed_nodes = gateway_config(pki, registry_dir, tmp_path / "facts", nodes).nodes
    facts = facts_from(
        Registry.open(registry_dir).entries(), signed_nodes, {}, default_residency=("*",)
    )
    key = load_signing_key(pki.key_path("officer-policy"))
    policies = policy_dir(tmp_path / "signed-policies")

    def bundle(version: int) -> bytes:
        b = build_bundle(policies, facts, version, dt.timedelta(days=1), "0.1.0", 300)
        return sign_bundle(b, key)

    path = tmp_path / "bundle.json"
    path.write_bytes(bundle(5))
    policy = {
        "bundle": str(path),
        "officer_keys": [str(pki.key_path("officer-policy").with_suffix(".pub"))],
        "watch_interval_s": 0.2,
        "pre_policy_rate": "100000/minute",
    }
    config, raw = write_config(pki, registry_dir, tmp_path, nodes, 2, policy)
    base = f"https://127.0.0.1:{raw['listen']['port']}"

    def versions() -> list[int]:
        out = []
        for _ in range(12):  # fresh connections: both workers answer some
            with client(pki, "olga") as officer:
                out.append(officer.get(f"{base}/admin/policy").json()["version"])
        return out

    with serving(config, raw):
        assert set(versions()) == {5}  # control: every worker starts on the file's v5
        with client(pki, "olga") as officer:
            r = officer.post(f"{base}/admin/reload", content=bundle(6))
            assert r.status_code == 200, r.text
        end = time.monotonic() + 30
        while set(seen := versions()) != {6}:
            assert time.monotonic() < end, f"a worker still serves the older policy: {seen}"
            time.sleep(0.2)
        assert _infer_fresh(pki, "bob", base).status_code == 200


def test_a_replica_moved_to_workers_still_serves_and_exports_its_old_log(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.cli import main

    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    with serving(config, raw, "--workers", "1"):  # one process: its log in receipts/
        old = _infer_fresh(pki, "bob", base).json()["parameters"]["ztgate.receipt_id"]
    with serving(config, raw):
        new = {_log_of(_infer_fresh(pki, "bob", base)) for _ in range(12)}
        assert len(new) == 2 and parse_receipt_id(old)[0] not in new
        for _ in range(8):  # through fresh connections: every worker finds the old one
            with client(pki, "bob") as c:
                r = c.get(f"{base}/v2/receipts/{old}")
            assert r.status_code == 200, r.text
    receipts = tmp_path / "data" / "receipts"
    assert main(["audit", "export", "--log-dir", str(receipts), str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logs"] == 3  # the old log and both workers'


# -- the admin port answers for the whole replica -------------------------------------------


def _admin(raw: dict[str, Any], path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{raw['listen']['admin_port']}{path}", timeout=30)


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _listening_socket(port: int) -> str:
    """The kernel's name of the socket listening on 127.0.0.1:`port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":  # 0A: LISTEN
            return f"socket:[{f[9]}]"
    raise AssertionError(f"nothing listens on port {port}")


def _holds(pid: int, name: str) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == name:
                return True
        except FileNotFoundError:  # closed meanwhile
            continue
    return False


def _served(text: str) -> dict[str, float]:
    """Inferences answered, by worker label, from a merged exposition."""
    out: dict[str, float] = {}
    for labels, value in _samples(text).get("ztgate_infer_requests_total", []):
        if labels["outcome"] == "ok":
            out[labels["worker"]] = out.get(labels["worker"], 0.0) + value
    return out


def test_merged_metrics_keep_each_family_once_with_a_worker_label() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.admin_relay import _Exposition, merge

    parsed = []
    for worker, n in ((0, 2), (1, 5)):
        reg = CollectorRegistry()
        c = Counter("ztgate_requests", "API requests", ["route"], registry=reg)
        h = Histogram("ztgate_infer_seconds", "latency", registry=reg, buckets=(0.1, 1.0))
        c.labels('a "quoted" route').inc(n)
        h.observe(0.5)
        text = generate_latest(reg).decode()
        parsed.append((worker, list(text_string_to_metric_families(text))))
    out = generate_latest(_Exposition(merge(parsed))).decode()
    assert out.count("# TYPE ztgate_requests_total counter") == 1
    assert out.count("# HELP ztgate_infer_seconds ") == 1
    got = _samples(out)
    assert sorted((lab["worker"], v) for lab, v in got["ztgate_requests_total"]) == [
        ("0", 2.0),
        ("1", 5.0),
    ]
    assert {lab["route"] for lab, _ in got["ztgate_requests_total"]} == {'a "quoted" route'}
    buckets = [(lab["worker"], lab["le"]) for lab, _ in got["ztgate_infer_seconds_bucket"]]
    assert sorted(buckets) == sorted((w, le) for w in "01" for le in ("0.1", "1.0", "+Inf"))


async def test_the_relay_leaves_out_a_worker_that_answers_badly_or_not_at_all(
    tmp_path: Path,
) -> None:
    """Stand-in workers on real unix sockets: a worker's exposition that does not parse or
    is over the cap cannot be caused for real; a silent one is a stopped worker's socket."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from gateway.admin_relay import MAX_RESPONSE_BYTES, AdminRelay, RunDir

    reg = CollectorRegistry()
    Counter("ztgate_requests", "API requests", registry=reg).inc(3)
    ok = b"HTTP/1.0 200 OK\r\n\r\n"
    answers = [
        ok + generate_latest(reg),
        ok + b"ztgate_requests_total{ 3\n",
        ok + b"#" * (MAX_RESPONSE_BYTES + 1),
    ]
    # Longer than a unix socket address may be: reached through the directory's descriptor.
    run = RunDir(tmp_path / ("a-long-data-dir-" * 8))
    sockets = [run.bind(i) for i in range(4)]  # w3 is bound and never answers
    servers = []
    for sock, answer in zip(sockets, answers, strict=False):

        async def answer_with(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = answer
        ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        servers.append(await asyncio.start_unix_server(answer_with, sock=sock))
    relay = AdminRelay([run.address(i) for i in range(4)], lambda: 4, lambda _: True)
    transport = httpx.ASGITransport(app=relay.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://relay") as c:
            got = _samples((await c.get("/metrics")).text)
            assert got["ztgate_requests_total"] == [({"worker": "0"}, 3.0)]  # control
            failed = {lab["worker"]: v for lab, v in got["ztgate_metrics_scrape_failures_total"]}
            assert failed == {"1": 1.0, "2": 1.0, "3": 1.0}
            r = await c.get("/readyz")  # w0 and w1 answer 200; w2 over the cap; w3 silent
            assert r.status_code == 503 and r.json() == {"workers": 4, "ready": 2}
            assert (await c.get("/healthz")).status_code == 200
    finally:
        for server in servers:
            server.close()
        for sock in sockets:
            sock.close()
        run.close()


def test_the_admin_port_answers_for_the_whole_replica(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    config, raw = write_config(pki, registry_dir, tmp_path, node_table(triton_cluster), 2)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    run_dir = tmp_path / "data" / "run"
    with serving(config, raw) as proc:
        assert run_dir.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in run_dir.iterdir()) == ["w0.sock", "w1.sock"]
        answered = [_infer_fresh(pki, "bob", base) for _ in range(12)]
        assert {r.status_code for r in answered} == {200}
        assert len({_log_of(r) for r in answered}) == 2  # control: both workers served
        text = _admin(raw, "/metrics").text
        served = _served(text)
        assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
        assert sum(served.values()) == 12
        assert text.count("# TYPE ztgate_infer_requests_total counter") == 1
        # Positive control: the sum follows the requests sent, it is no constant.
        assert _infer_fresh(pki, "bob", base).status_code == 200
        assert sum(_served(_admin(raw, "/metrics").text).values()) == 13
        own = _samples(_admin(raw, "/metrics").text)
        assert own["ztgate_workers_alive"] == [({}, 2.0)]
        assert own["ztgate_worker_restarts_total"] == [({}, 0.0)]
        assert "ztgate_metrics_scrape_failures_total" not in own  # none failed yet
        for path in ("/v2/health/live", "/healthz", "/v2/health/ready", "/readyz"):
            assert _admin(raw, path).status_code == 200, path
        # The supervisor forks restarts while it serves the admin port: one thread only,
        # and the workers do not hold the admin port (the supervisor does: the control).
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "Threads:\t1\n" in status
        port = _listening_socket(raw["listen"]["admin_port"])
        assert _holds(proc.pid, port)
        assert not any(_holds(pid, port) for pid in _workers_of(proc.pid))
        # A stopped worker (a real fault: it holds its socket and answers nothing) makes
        # the replica unready, not dead; the other worker's metrics still come.
        victim = min(_workers_of(proc.pid))
        os.kill(victim, signal.SIGSTOP)
        try:
            for path in ("/v2/health/ready", "/readyz"):
                r = _admin(raw, path)
                assert r.status_code == 503 and r.json() == {"workers": 2, "ready": 1}, r.text
            for path in ("/v2/health/live", "/healthz"):
                assert _admin(raw, path).status_code == 200, path
            got = _samples(_admin(raw, "/metrics").text)
            [(failed, count)] = got["ztgate_metrics_scrape_failures_total"]
            assert count == 1.0
            workers = {lab["worker"] for lab, _ in got["ztgate_infer_requests_total"]}
            assert workers == {"0", "1"} - {failed["worker"]}
        finally:
            os.kill(victim, signal.SIGCONT)
        end = time.monotonic() + 30  # bounds the wait; the worker answers at once
        while (r := _admin(raw, "/readyz")).status_code != 200:
            assert time.monotonic() < end, r.text
            time.sleep(0.2)
        assert set(_served(_admin(raw, "/metrics").text)) == {"0", "1"}


# -- what the review of `serve --workers N` found (each with its control) ------------------


def _fake_nodes(pki: PKI) -> list[dict[str, Any]]:
    """A node table whose node nobody serves: enough for a gateway that is built, not asked."""
    issued = pki.ensure("node", "n1")
    return [
        {
            "name": "n1",
            "address": f"127.0.0.1:{free_port()}",
            "dns_name": pki.node_dns_name("n1"),
            "spiffe_id": issued.spiffe_id,
            "region": "eu-west",
            "provider": "p1",
        }
    ]


def _signed_bundles(pki: PKI, registry: Path, root: Path, nodes: list[dict[str, Any]]) -> Any:
    """bundle(version): a signed policy bundle for `registry` and `nodes`, as the officer
    makes one."""
    import datetime as dt

    from gateway.pki import load_signing_key
    from gateway.policy.bundle import build_bundle, facts_from, sign_bundle
    from gateway.registry import Registry
    from tests.gateway_harness import gateway_config

    signed_nodes = gateway_config(pki, registry, root / "facts", nodes).nodes
    facts = facts_from(
        Registry.open(registry).entries(), signed_nodes, {}, default_residency=("*",)
    )
    key = load_signing_key(pki.key_path("officer-policy"))
    policies = policy_dir(root / "signed-policies")

    def bundle(version: int) -> bytes:
        b = build_bundle(policies, facts, version, dt.timedelta(days=1), "0.1.0", 300)
        return sign_bundle(b, key)

    return bundle


def test_sighup_while_workers_start_neither_stops_the_replica_nor_is_lost(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """A SIGHUP (reload now) that reaches a worker still building its gateway used to kill
    it (SIGHUP's default), and the supervisor then stopped the replica; and one a starting
    worker ignores must not be lost: its policy watch's first pass loads the newest."""
    nodes = node_table(triton_cluster)
    bundle = _signed_bundles(pki, registry_dir, tmp_path, nodes)
    path = tmp_path / "bundle.json"
    path.write_bytes(bundle(5))
    policy = {
        "bundle": str(path),
        "officer_keys": [str(pki.key_path("officer-policy").with_suffix(".pub"))],
        "watch_interval_s": 0.2,
        "pre_policy_rate": "100000/minute",
    }
    config, raw = write_config(pki, registry_dir, tmp_path, nodes, 2, policy)
    base = f"https://127.0.0.1:{raw['listen']['port']}"
    log_path = tmp_path / "serve.log"
    out = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ready = f"http://127.0.0.1:{raw['listen']['admin_port']}/v2/health/ready"
    try:
        # Both workers have loaded v5 and are still starting: the officer's file moves to
        # v6, and SIGHUPs reach the supervisor and every worker until the replica serves.
        end = time.monotonic() + 120
        while log_path.read_text().count("policy loaded: bundle:") < 2:
            assert time.monotonic() < end and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.005)
        path.write_bytes(bundle(6))
        first = _workers_of(proc.pid)
        hups = 0
        while True:
            for pid in [proc.pid, *_workers_of(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
                    hups += 1
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready, timeout=1).status_code == 200:
                    break
            assert time.monotonic() < end and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.005)
        assert hups > 2  # the signals came while the workers started
        assert _workers_of(proc.pid) == first  # neither worker died of one
        assert _samples(_admin(raw, "/metrics").text)["ztgate_worker_restarts_total"] == [({}, 0.0)]

        def versions() -> set[int]:
            got = set()
            for _ in range(12):  # fresh connections: both workers answer some
                with client(pki, "olga") as officer:
                    got.add(officer.get(f"{base}/admin/policy").json()["version"])
            return got

        # Not lost: every worker serves v6 with no further signal (30 s bounds the wait).
        while (seen := versions()) != {6}:
            assert time.monotonic() < end + 30, f"a worker still serves the older policy: {seen}"
            time.sleep(0.2)
        # Control: a SIGHUP to a serving replica still reloads every worker, and kills none.
        path.write_bytes(bundle(7))
        os.kill(proc.pid, signal.SIGHUP)
        while (seen := versions()) != {7}:
            assert time.monotonic() < end + 60, f"a worker did not reload on SIGHUP: {seen}"
            time.sleep(0.2)
        assert _workers_of(proc.pid) == first and proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        out.close()


def test_every_revocation_file_reaches_every_process_at_start(
    pki: PKI, registry_dir: Path, tmp_path: Path
) -> None:
    """An offline `ztgate pki revoke --data-dir` writes revoked.jsonl (worker 0's file): a
    worker other than 0 must refuse the certificate from its start; a revocation a worker
    took lives in revoked-w<i>.jsonl: one process, after a move back, must still know it."""
    from gateway.runtime import build_gateway, close_unserved
    from gateway.state.durable import FileRevocations
    from tests.gateway_harness import gateway_config

    data = tmp_path / "data"
    cfg = gateway_config(pki, registry_dir, data, _fake_nodes(pki))
    data.mkdir(parents=True, exist_ok=True)
    offline = FileRevocations(data / "revoked.jsonl")  # what `pki revoke --data-dir` does
    offline.add("CN=client CA", "abc123")
    offline.close()
    taken = FileRevocations(data / "revoked-w1.jsonl")  # worker 1's, from an earlier run
    taken.add("CN=client CA", "def456")
    taken.close()

    def known(worker: Worker | None) -> tuple[bool, bool, bool]:
        gw = build_gateway(cfg, worker)
        try:
            r = gw.revocations
            return (
                r.revoked("CN=client CA", "abc123"),
                r.revoked("CN=client CA", "def456"),
                r.revoked("CN=client CA", "0badc0de"),
            )
        finally:
            close_unserved(gw)

    # Worker 1 of 2, before worker 0 ever synced; worker 2 of 3, which never ran.
    assert known(Worker(1, 2)) == (True, True, False)  # control: an unrevoked serial
    assert known(Worker(2, 3)) == (True, True, False)
    # One process again: worker 1's revocation is known, and kept in its own file now.
    assert known(None) == (True, True, False)
    kept = FileRevocations(data / "revoked.jsonl")
    try:
        assert ("CN=client CA", "def456") in kept
    finally:
        kept.close()


def test_an_older_bundle_never_replaces_the_one_the_replica_keeps(
    pki: PKI, registry_dir: Path, tmp_path: Path
) -> None:
    """Two workers on one data dir, each judging a push by its own running version: the
    one still on v5 must not write v6 over the v7 the other accepted (a restart would
    load v6: a rollback)."""
    from dataclasses import replace

    from gateway.policy.bundle import verify_bundle
    from gateway.policy.live import ACCEPTED_BUNDLE, LivePolicy, bundle_loader
    from gateway.runtime import load_models
    from tests.gateway_harness import gateway_config

    nodes = _fake_nodes(pki)
    bundle = _signed_bundles(pki, registry_dir, tmp_path, nodes)
    path = tmp_path / "bundle.json"
    path.write_bytes(bundle(5))
    cfg = gateway_config(pki, registry_dir, tmp_path / "data", nodes)
    cfg = replace(
        cfg,
        policy=replace(
            cfg.policy,
            bundle=path,
            dir=None,
            officer_keys=(str(pki.key_path("officer-policy").with_suffix(".pub")),),
        ),
    )
    latest = {n: v[max(v, key=int)] for n, v in load_models(cfg).items()}
    first, second = (LivePolicy(bundle_loader(cfg, latest)) for _ in range(2))
    assert first.current.version == second.current.version == 5
    kept = tmp_path / "data" / ACCEPTED_BUNDLE

    def on_disk() -> int:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        from gateway.pki import signing_key_id

        pub = load_pem_public_key(pki.key_path("officer-policy").with_suffix(".pub").read_bytes())
        import datetime as dt

        from gateway import __version__

        got = verify_bundle(
            kept.read_bytes(),
            {signing_key_id(pub): pub},  # type: ignore[arg-type]
            now=dt.datetime.now(dt.UTC),
            running_version=__version__,
        )
        assert got.bundle is not None, got
        return got.bundle.version

    assert first.reload(bundle(7)), first.last_error
    assert on_disk() == 7
    assert not second.reload(bundle(6))  # older than the replica's: refused, not written
    assert second.last_rejection == "rollback" and on_disk() == 7
    assert second.current.version == 5
    assert second.reload(bundle(8)), second.last_error  # control: a newer one is kept
    assert on_disk() == 8
    # And the worker that missed the pushes loads the kept one as a restart would.
    assert first.reload() and first.current.version == 8


async def _log_with_receipts(root: Path, into: Path, n: int) -> list[str]:
    """A receipt log holding `n` receipts, moved to `into` (a receipts dir or a worker's)."""
    from tests.test_receipts import make_world

    world = await make_world(root, witness_http=False)
    ids = [(await world.receipt(request_id=f"r{i}")).receipt.receipt_id for i in range(n)]
    await world.log.close()
    world.log_dir.rename(into)  # the same files (the log's birth inode is kept)
    return ids


async def test_logs_no_process_writes_stay_under_retention_and_erasure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prometheus_client import CollectorRegistry

    from gateway.cli import main
    from gateway.config import Retention
    from gateway.receipts.retention import RetentionJob
    from gateway.receipts.siblings import UnownedLogs, unowned_dirs

    receipts = tmp_path / "receipts"
    before = await _log_with_receipts(tmp_path / "a", receipts, 2)  # one process, before
    w1 = await _log_with_receipts(tmp_path / "b", receipts / "w1", 2)  # a running worker's
    w2 = await _log_with_receipts(tmp_path / "c", receipts / "w2", 2)  # a third worker, gone
    assert unowned_dirs(receipts, 2) == [receipts, receipts / "w2"]
    assert unowned_dirs(receipts, 1) == [receipts / "w1", receipts / "w2"]

    def bodies(ids: list[str]) -> int:
        from gateway.receipts.log import ReceiptLog
        from gateway.receipts.model import parse_receipt_id

        n = 0
        for rid in ids:
            log_id = parse_receipt_id(rid)[0]
            [path] = [p for p in receipts.rglob(log_id) if (p / "log.db").is_file()]
            rl = ReceiptLog.open_readonly(path, strict=True)
            try:
                n += rl.body(rid) is not None
            finally:
                rl.close_sync()
        return n

    # Erasure: the replica's receipts dir finds a worker's log (it used to look only at
    # <dir>/<log id>); control: a log that is nowhere is still refused.
    assert main(["audit", "erase", "--log-dir", str(receipts), w1[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["erased"] == 1
    assert bodies(w1) == 1
    unknown = w1[1].replace(w1[1].split(".")[0], "a" * 16, 1)
    assert main(["audit", "erase", "--log-dir", str(receipts), unknown]) == 2

    # Retention, 31 days on, of worker 0 of 2: the old process's log and the gone worker's.
    settings = Retention(body_days=30.0)
    later = time.time() + 31 * 86400.0
    logs = UnownedLogs(unowned_dirs(receipts, 2))
    job = RetentionJob(logs, settings, CollectorRegistry(), clock=lambda: later)
    try:
        assert (await job.run_pass()).expired == 4
    finally:
        logs.close()
    assert bodies(before) == bodies(w2) == 0
    assert bodies(w1) == 1  # control: a running worker's log is its own to erase from
    # Back to one process: every worker's log is now the process's to keep under retention.
    logs = UnownedLogs(unowned_dirs(receipts, 1))
    job = RetentionJob(logs, settings, CollectorRegistry(), clock=lambda: later)
    try:
        assert (await job.run_pass()).expired == 1
    finally:
        logs.close()
    assert bodies(w1) == 0


async def test_sibling_logs_are_read_strictly_read_only_and_reopened_at_most_so_often(
    tmp_path: Path,
) -> None:
    import sqlite3

    from gateway.receipts.log import ReceiptLog
    from gateway.receipts.siblings import SiblingLogs
    from tests.test_receipts import make_world

    world = await make_world(tmp_path, witness_http=False)
    try:
        await world.receipt(request_id="first")
        [path] = ReceiptLog.all_logs(world.log_dir)
        strict = ReceiptLog.open_readonly(path, strict=True)
        loose = ReceiptLog.open_readonly(path)  # a frozen log of its own, erasable
        try:
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                strict._db.execute("INSERT INTO meta VALUES ('probe', '1')")
            loose._db.execute("INSERT INTO meta VALUES ('probe', '1')")  # control
            assert strict.size == loose.size == world.log.size
        finally:
            strict.close_sync()
            loose.close_sync()
        siblings = SiblingLogs([world.log_dir])
        try:
            siblings.reopen_every_s = 3600.0  # no second look within the hour
            [held] = siblings()
            size = held.size
            await world.receipt(request_id="second")  # the writer grows its log
            [again] = siblings()
            assert again is held and again.size == size
            siblings.reopen_every_s = 0.0  # control: looked at again, the growth is seen
            [fresh] = siblings()
            assert fresh is not held and fresh.size == size + 1
        finally:
            siblings.close()
    finally:
        await world.log.close()


def _wal_bytes(store: SqliteStore) -> int:
    return os.path.getsize(f"{store.path}-wal")


async def test_the_shared_store_bounds_its_queue_and_its_wal(
    tmp_path: Path, clock: FakeClock
) -> None:
    import sqlite3

    from gateway.state.sqlite import JOURNAL_SIZE_LIMIT

    store = SqliteStore(tmp_path / "state.db", clock=clock)
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        limit = store._soft.execute("PRAGMA journal_size_limit").fetchone()[0]
        assert limit == JOURNAL_SIZE_LIMIT
        store.max_queued = 2
        other.execute("BEGIN IMMEDIATE")  # another worker holds the lock: calls queue
        waiting = [asyncio.ensure_future(store.take_token(f"k{i}", 1.0, 2)) for i in range(2)]
        await asyncio.sleep(0)  # both reach the store's thread's queue
        with pytest.raises(StoreUnavailable, match="queued"):
            await store.take_token("k9", 1.0, 2)  # past the bound: fails closed
        other.execute("COMMIT")
        assert [ok for ok, _ in await asyncio.gather(*waiting)] == [True, True]
        assert (await store.take_token("k9", 1.0, 2))[0]  # control: the queue drained
        # A WAL past its bound is emptied at the next checkpoint, not only copied back.
        for i in range(200):
            await store.add_revocation("ca", f"{i:x}")
        assert _wal_bytes(store) > 0
        store.wal_truncate_bytes = 0
        store._checkpoint()
        assert _wal_bytes(store) == 0
    finally:
        other.close()
        await store.close()
