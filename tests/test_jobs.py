"""The jobs API end to end (gateway/jobs/, docs/jobs.md): a real gateway over mutual TLS,
real tritonservers, real certificates; a job runs through the sync route itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.faultproxy import ThreadedFaultProxy
from gateway.jobs.model import JobRow, NewJob
from gateway.jobs.redis import RedisJobStore
from gateway.jobs.runner import CRASH_ENV
from gateway.jobs.scope import job_seed
from gateway.jobs.seal import KeyFileError, load_key, seal
from gateway.jobs.store import JOBS_FILE, SyncJobStore
from gateway.node.triton import NodeSpec, TritonProcess
from gateway.pki import PKI, Issued
from gateway.ports import free_port, wait_ready
from gateway.protocol.tensors import Tensor
from gateway.receipts.issue import issue
from gateway.receipts.log import JobReceipted, ReceiptLog
from gateway.receipts.model import (
    ClientRef,
    ModelRef,
    PolicyRef,
    SignedReceipt,
    VerificationRef,
)
from gateway.receipts.service import ReceiptService
from gateway.receipts.signing import KeySet
from gateway.receipts.verify import TrustedLogKey, TrustPolicy
from tests import test_gateway
from tests.conftest import LLM_MODEL, SITE, TritonCluster, llm_entries
from tests.gateway_harness import (
    RunningGateway,
    client_context,
    dev_toml,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_gateway import IRIS, infer_body, node_table

registry_dir = test_gateway.registry_dir  # the fixture: the session's model registry
JOBS = {"max_open_per_identity": 3, "backoff_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 200}
# How long a test waits for a job before it gives up (a bound, not a timing assertion).
PATIENCE_S = 120.0


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    cfg = gateway_config(
        pki,
        registry_dir,
        tmp_path_factory.mktemp("jobsdata"),
        node_table(triton_cluster),
        jobs=JOBS,
    )
    with running_gateway(cfg) as gw:
        yield gw


def client(pki: PKI, who: Issued) -> httpx.Client:
    return httpx.Client(verify=client_context(pki, who.cert, who.key), timeout=30)


def submit(c: httpx.Client, base: str, key: str, body: Any = None) -> httpx.Response:
    return c.post(
        f"{base}/v2/models/iris/jobs",
        json=infer_body(IRIS) if body is None else body,
        headers={"idempotency-key": key},
    )


def wait_finished(c: httpx.Client, base: str, job_id: str) -> dict[str, Any]:
    end = time.monotonic() + PATIENCE_S
    while True:
        r = c.get(f"{base}/v2/jobs/{job_id}")
        assert r.status_code == 200, r.text
        view: dict[str, Any] = r.json()
        if view["status"] in ("done", "failed"):
            return view
        assert time.monotonic() < end, f"job never finished: {view}"
        time.sleep(0.1)


def outputs(answer: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: o["data"] for o in answer["outputs"]}


def stored(gw: RunningGateway, job_id: str) -> JobRow | None:
    """A job's row as the store holds it, read on a connection of the test's own."""
    store = SyncJobStore(gw.cfg.data_dir / JOBS_FILE, lock=False)
    try:
        return store.get(job_id)
    finally:
        store.close()


def stored_finished(gw: RunningGateway, job_id: str) -> JobRow | None:
    """The row once the job is done or failed, for a job its owner can no longer poll."""
    end = time.monotonic() + PATIENCE_S
    row = stored(gw, job_id)
    while row is not None and row.state not in ("done", "failed"):
        assert time.monotonic() < end, row
        time.sleep(0.1)
        row = stored(gw, job_id)
    return row


def hold(gw: RunningGateway, held: bool) -> None:
    """Keep due jobs queued (the runner's drain switch), or let them run."""
    assert gw.gw.jobs is not None and gw.gw.jobs.runner is not None
    gw.gw.jobs.runner.hold = held
    if not held:
        gw.gw.jobs.runner.wake.set()


def test_submit_then_poll_gives_the_answer_the_sync_call_gives(
    gateway: RunningGateway, pki: PKI
) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        sync = c.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert sync.status_code == 200
        r = submit(c, gateway.base, "same-as-sync-1")
        assert r.status_code == 202, r.text
        assert r.headers["location"] == f"/v2/jobs/{r.json()['id']}"
        view = wait_finished(c, gateway.base, r.json()["id"])
        assert view["status"] == "done" and view["http_status"] == 200
        assert outputs(view["response"]) == outputs(sync.json())
        params = view["response"]["parameters"]
        # The sync answer's receipt, for the job: signed, in the log, readable by its owner.
        assert view["receipt_id"] == params["ztgate.receipt_id"]
        assert view["receipt"] == params["ztgate.receipt"]
        assert view["node_executions"] == 1
        receipt = c.get(f"{gateway.base}/v2/receipts/{view['receipt_id']}")
        assert receipt.status_code == 200
        assert receipt.json()["receipt"]["client"]["spiffe_id"].endswith("/client/alice")
        # The raw answer, byte for byte as the sync route sent it, with its receipt header.
        raw = c.get(f"{gateway.base}{view['result']}")
        assert raw.status_code == 200 and raw.json() == view["response"]
        assert raw.headers["ztgate-receipt"] == view["receipt"]


def test_a_retried_submit_makes_no_second_job_and_another_body_is_refused(
    gateway: RunningGateway, pki: PKI
) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        first = submit(c, gateway.base, "retry-key-1")
        again = submit(c, gateway.base, "retry-key-1")
        assert first.status_code == 202 and again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        other = infer_body(IRIS[:1])
        conflict = submit(c, gateway.base, "retry-key-1", other)
        assert conflict.status_code == 409
        assert conflict.json()["type"].endswith("/idempotency-conflict")
        # Control: the same body under a new key is a new job.
        fresh = submit(c, gateway.base, "retry-key-2", other)
        assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
        view = wait_finished(c, gateway.base, first.json()["id"])
        assert view["status"] == "done" and view["node_executions"] == 1
        # Resubmitting a finished job's key still names it (a client whose 202 was lost).
        late = submit(c, gateway.base, "retry-key-1")
        assert late.status_code == 200 and late.json()["status"] == "done"
        wait_finished(c, gateway.base, fresh.json()["id"])


def test_a_submit_without_a_usable_idempotency_key_is_refused(
    gateway: RunningGateway, pki: PKI
) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        url = f"{gateway.base}/v2/models/iris/jobs"
        for headers in ({}, {"idempotency-key": "x" * 129}, {"idempotency-key": "a b"}):
            r = c.post(url, json=infer_body(IRIS), headers=headers)
            assert r.status_code == 400 and r.json()["type"].endswith("/bad-request")
        unknown = c.post(
            f"{gateway.base}/v2/models/nosuch/jobs",
            json=infer_body(IRIS),
            headers={"idempotency-key": "k"},
        )
        assert unknown.status_code == 404
        # A body the sync route would refuse is refused at submit, with the same type.
        bad = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
        }
        for route in ("infer", "jobs"):
            r = c.post(
                f"{gateway.base}/v2/models/iris/{route}", json=bad, headers={"idempotency-key": "b"}
            )
            assert r.status_code == 400 and r.json()["type"].endswith("/invalid-tensor"), r.text


def test_open_jobs_per_identity_are_capped_under_a_burst(gateway: RunningGateway, pki: PKI) -> None:
    bursty = pki.issue("client", "jobburst", organization="Acme")
    control = pki.issue("client", "jobcalm", organization="Acme")
    hold(gateway, True)
    try:
        with client(pki, bursty) as c, client(pki, control) as calm:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: submit(c, gateway.base, f"burst-{i}"), range(8)))
            codes = sorted(r.status_code for r in answers)
            assert codes == [202] * 3 + [429] * 5, codes
            refused = next(r for r in answers if r.status_code == 429)
            assert refused.json()["type"].endswith("/rate-limited")
            assert "retry-after" in refused.headers
            # Another identity is not affected by this one's cap.
            assert submit(calm, gateway.base, "calm-1").status_code == 202
            accepted = [r.json()["id"] for r in answers if r.status_code == 202]
            hold(gateway, False)
            for job_id in accepted:
                assert wait_finished(c, gateway.base, job_id)["status"] == "done"
            # Once they are done, the cap has room again.
            assert submit(c, gateway.base, "burst-after").status_code == 202
    finally:
        hold(gateway, False)


def test_a_job_is_invisible_to_another_identity(gateway: RunningGateway, pki: PKI) -> None:
    alice = pki.ensure("client", "alice")
    bob = pki.issue("client", "jobpeeker", organization="Acme")
    with client(pki, alice) as owner, client(pki, bob) as other:
        job_id = submit(owner, gateway.base, "private-1").json()["id"]
        wait_finished(owner, gateway.base, job_id)
        for path in (f"/v2/jobs/{job_id}", f"/v2/jobs/{job_id}/result"):
            seen = other.get(f"{gateway.base}{path}")
            assert seen.status_code == 404
            # The same answer as for an id that never existed: no oracle.
            never = other.get(f"{gateway.base}/v2/jobs/{'0' * 32}")
            assert never.status_code == 404 and never.json()["type"] == seen.json()["type"]
            assert never.json()["detail"] == seen.json()["detail"]
            assert owner.get(f"{gateway.base}{path}").status_code == 200  # control
        # Nor can another identity's submit with the owner's key reach the owner's job.
        mine = submit(other, gateway.base, "private-1")
        assert mine.status_code == 202 and mine.json()["id"] != job_id
        wait_finished(other, gateway.base, mine.json()["id"])


def test_a_client_revoked_after_submit_has_its_job_failed_at_run_time(
    gateway: RunningGateway, pki: PKI
) -> None:
    revokee = pki.issue("client", "jobrevoked", organization="Acme")
    control = pki.issue("client", "jobkept", organization="Acme")
    olga = pki.ensure("client", "olga")
    hold(gateway, True)
    try:
        with client(pki, revokee) as bad, client(pki, control) as good:
            bad_id = submit(bad, gateway.base, "rev-1").json()["id"]
            good_id = submit(good, gateway.base, "rev-1").json()["id"]
            with client(pki, olga) as officer:
                r = officer.post(
                    f"{gateway.base}/admin/revoke",
                    json={"certificate": revokee.cert.read_text()},
                )
                assert r.status_code == 200, r.text
            hold(gateway, False)
            assert wait_finished(good, gateway.base, good_id)["status"] == "done"
        # The revoked client cannot poll any more; its job's record says why it failed.
        row = stored_finished(gateway, bad_id)
        assert row is not None and row.state == "failed" and row.status == 401
        assert row.result is not None and b"revoked" in row.result
        assert row.body is None and row.cert is None  # the request is not kept
    finally:
        hold(gateway, False)


# --- nodes that are not there yet, and a gateway killed mid-job --------------------------
def node_spec(pki: PKI, repository: Path, name: str, workdir: Path) -> NodeSpec:
    issued = pki.ensure("node", name)
    return NodeSpec(
        name=name,
        region="eu-west",
        provider="prov-j",
        grpc_port=free_port(),
        http_port=free_port(),
        repository=repository,
        cert=issued.cert,
        key=issued.key,
        client_ca=pki.gateway_ca_bundle(SITE),
        workdir=workdir,
    )


def node_row(pki: PKI, spec: NodeSpec) -> dict[str, str]:
    return {
        "name": spec.name,
        "address": spec.grpc_address,
        "dns_name": pki.node_dns_name(spec.name),
        "spiffe_id": pki.ensure("node", spec.name).spiffe_id,
        "region": spec.region,
        "provider": spec.provider,
    }


def wait_attempts(c: httpx.Client, base: str, job_id: str, at_least: int) -> dict[str, Any]:
    end = time.monotonic() + PATIENCE_S
    while True:
        view: dict[str, Any] = c.get(f"{base}/v2/jobs/{job_id}").json()
        if view["attempts"] >= at_least:
            return view
        assert time.monotonic() < end, view
        time.sleep(0.1)


def test_a_job_waits_out_a_node_outage_and_is_done_when_it_returns(
    pki: PKI,
    triton_home: Path,
    triton_repository: Path,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    spec = node_spec(pki, triton_repository, "jobnode1", tmp_path / "node")
    cfg = gateway_config(pki, registry_dir, tmp_path / "data", [node_row(pki, spec)], jobs=JOBS)
    alice = pki.ensure("client", "alice")
    with running_gateway(cfg) as gw, client(pki, alice) as c:
        # No node yet: the sync call is refused, and a job keeps trying.
        sync = c.post(f"{gw.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert sync.status_code in (502, 503)
        job_id = submit(c, gw.base, "outage-1").json()["id"]
        view = wait_attempts(c, gw.base, job_id, 2)
        assert view["status"] in ("queued", "running")
        with TritonProcess(spec, triton_home) as node:
            node.start(90.0)
            done = wait_finished(c, gw.base, job_id)
            assert done["status"] == "done", done
            assert done["response"]["parameters"]["ztgate.nodes"] == "jobnode1"
            assert np.asarray(outputs(done["response"])["probabilities"]).size > 0


def receipts_in(log_dir: Path, kind: str) -> list[SignedReceipt]:
    found = []
    for path in ReceiptLog.all_logs(log_dir):
        rl = ReceiptLog.open_readonly(path)
        try:
            for stored in rl.bodies():
                signed = SignedReceipt.from_bytes(stored.body)
                if signed.receipt.kind == kind:
                    found.append(signed)
        finally:
            rl.close_sync()
    return found


def test_a_job_survives_a_gateway_sigkill_with_one_result_and_one_receipt(
    pki: PKI,
    triton_home: Path,
    triton_repository: Path,
    registry_dir: Path,
    tmp_path: Path,
) -> None:
    spec = node_spec(pki, triton_repository, "jobnode2", tmp_path / "node")
    data = tmp_path / "data"
    row = node_row(pki, spec)
    toml = dev_toml(pki, registry_dir, data, policy_dir(tmp_path / "policies"))
    toml += f"""
[receipts]
signing_key = "{pki.key_path("receipt-signing")}"
log_key = "{pki.key_path("log-checkpoint")}"
checkpoint_interval_s = 0.2
[jobs]
backoff_s = 0.2
backoff_max_s = 1.0
max_attempts = 1000
[[nodes]]
{chr(10).join(f'{k} = "{v}"' for k, v in row.items())}
"""
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    port = int(toml.split("[listen]\nport = ")[1].split("\n")[0])
    admin = int(toml.split("admin_port = ")[1].split("\n")[0])
    base = f"https://127.0.0.1:{port}"

    def serve() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Ready needs a node; live is enough to take a job.
        assert wait_ready(f"http://127.0.0.1:{admin}/v2/health/live", 60, proc)
        return proc

    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    alice = pki.ensure("client", "alice")
    first = serve()
    try:
        with client(pki, alice) as c:
            r = submit(c, base, "crash-1")
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_attempts(c, base, job_id, 2)  # no node: queued, retried
        os.killpg(first.pid, signal.SIGKILL)  # no shutdown: the job is only on disk
        first.wait(timeout=10)
    finally:
        kill(first)
    with TritonProcess(spec, triton_home) as node:
        node.start(90.0)
        second = serve()
        try:
            with client(pki, alice) as c:
                view = wait_finished(c, base, job_id)
                assert view["status"] == "done", view
                # The key still names the one job across the restart.
                assert submit(c, base, "crash-1").json()["id"] == job_id
                assert view["node_executions"] >= 1
                receipt_id = view["receipt_id"]
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=20)
            finally:
                kill(second)
    inferences = receipts_in(data / "receipts", "answer")
    assert [s.receipt.receipt_id for s in inferences] == [receipt_id]


def test_a_job_over_a_flapping_link_is_one_job_with_one_result_and_one_receipt(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """The link between client and gateway (the fault proxy, a real TCP proxy) fails while
    the client submits and polls, the client retrying with the same Idempotency-Key.

    First the case a retry exists for: the submit reaches the gateway, which makes the
    job, and the link goes down while the 202 is on its way back (the link is slowed, and
    cut once the job is in the store). Then the link flaps while the client retries and
    polls. One job, one result, one receipt in the log. A gateway of its own, so that its
    log and its store hold this test's jobs only; the control (another key is another
    job) shows the counts would see a second one."""
    cfg = gateway_config(
        pki, registry_dir, tmp_path / "data", node_table(triton_cluster), jobs=JOBS
    )
    alice = pki.ensure("client", "alice")

    def jobs_stored() -> int:
        with contextlib.closing(sqlite3.connect(cfg.data_dir / JOBS_FILE)) as db:
            return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])

    with contextlib.ExitStack() as stack:
        gw = stack.enter_context(running_gateway(cfg))
        proxy = ThreadedFaultProxy(("127.0.0.1", cfg.listen.port))
        stack.callback(proxy.close)
        link = f"https://127.0.0.1:{proxy.port}"
        c = stack.enter_context(client(pki, alice))

        # The lost 202: a kept-alive connection, then every chunk held a second on the link.
        assert c.get(f"{link}/v2/jobs/{'0' * 32}").status_code == 404
        proxy.delay(1.0)
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        first = pool.submit(submit, c, link, "flap-1")
        end = time.monotonic() + PATIENCE_S
        while jobs_stored() == 0:
            assert time.monotonic() < end and not first.done(), "the submit never landed"
            time.sleep(0.01)
        proxy.cut()  # the job is made; its 202 is still on the link
        with pytest.raises(httpx.TransportError):
            first.result(timeout=PATIENCE_S)
        proxy.restore()

        def over_the_link(call: Callable[[], httpx.Response]) -> httpx.Response:
            end = time.monotonic() + PATIENCE_S
            while True:
                try:
                    return call()
                except httpx.TransportError:
                    assert time.monotonic() < end, "the link never let a call through"
                    time.sleep(0.05)

        proxy.flap(0.25, 0.25)
        answers = [over_the_link(lambda: submit(c, link, "flap-1")) for _ in range(8)]
        # Every retry names the job whose 202 was lost: none of them makes one.
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
        job_id = answers[0].json()["id"]
        assert {r.json()["id"] for r in answers} == {job_id}
        views = []
        while not views or views[-1]["status"] not in ("done", "failed"):
            r = over_the_link(lambda: c.get(f"{link}/v2/jobs/{job_id}"))
            assert r.status_code == 200, r.text
            views.append(r.json())
            time.sleep(0.05)
        for _ in range(4):  # and once done, every poll gives the one answer
            views.append(over_the_link(lambda: c.get(f"{link}/v2/jobs/{job_id}")).json())
        proxy.restore()
        done = views[-1]
        assert done["status"] == "done" and done["node_executions"] == 1, done
        assert all(v == done for v in views if v["status"] == "done")
        assert jobs_stored() == 1
        # Control, on the link restored: another key is another job, and the count sees it.
        fresh = submit(c, gw.base, "flap-2")
        assert fresh.status_code == 202 and fresh.json()["id"] != job_id
        assert jobs_stored() == 2
        second = wait_finished(c, gw.base, fresh.json()["id"])
    answered = receipts_in(cfg.data_dir / "receipts", "answer")
    assert sorted(s.receipt.receipt_id for s in answered) == sorted(
        [done["receipt_id"], second["receipt_id"]]
    )


def test_a_job_written_into_the_store_without_the_key_runs_as_nobody(
    gateway: RunningGateway, pki: PKI
) -> None:
    alice = pki.ensure("client", "alice")
    victim = pki.issue("client", "jobvictim", organization="Acme")
    hold(gateway, True)
    try:
        with client(pki, alice) as c:
            control = submit(c, gateway.base, "sealed-1").json()["id"]
            # Whoever can write the store (here the file; with Redis, Redis) and holds a
            # client's certificate, which is public, writes a job for that client. Nothing
            # in the gateway would make such a row: this is the store written by hand.
            store = SyncJobStore(gateway.cfg.data_dir / JOBS_FILE, lock=False)
            try:
                forged_job = NewJob(
                    id="f" * 32,
                    owner="spiffe://ztgate.local/client/jobvictim",
                    key="forged-1",
                    digest="0" * 64,
                    route="/v2/models/iris/infer",
                    model="iris",
                    created=time.time(),
                    cert=victim.cert.read_text(),
                    headers={"content-type": "application/json"},
                    body=json.dumps(infer_body(IRIS)).encode(),
                    mac="0" * 64,
                )
                forged = store.submit(forged_job, per_identity=100, total=100000).id
            finally:
                store.close()
            hold(gateway, False)
            assert wait_finished(c, gateway.base, control)["status"] == "done"
        row = stored_finished(gateway, forged)
        assert row is not None and row.state == "failed" and row.status == 500
        assert row.executions == 1 and row.result is not None
        assert json.loads(row.result)["type"].endswith("/internal")  # the log says why
        assert b"outputs" not in row.result
    finally:
        hold(gateway, False)


def test_erasing_a_receipt_erases_the_job_that_holds_it(gateway: RunningGateway, pki: PKI) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        job_id = submit(c, gateway.base, "erase-1").json()["id"]
        view = wait_finished(c, gateway.base, job_id)
        kept = submit(c, gateway.base, "erase-2").json()["id"]
        wait_finished(c, gateway.base, kept)
        data = gateway.cfg.data_dir
        where = ["--log-dir", str(data / "receipts"), "--data-dir", str(data)]
        erased = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "audit",
                "erase",
                "--json",
                *where,
                view["receipt_id"],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(erased.stdout) == {"erased": 1, "jobs": 1}
        assert c.get(f"{gateway.base}/v2/receipts/{view['receipt_id']}").status_code == 404
        assert c.get(f"{gateway.base}/v2/jobs/{job_id}").status_code == 404
        assert c.get(f"{gateway.base}/v2/jobs/{kept}").status_code == 200  # control


def test_a_job_row_keeps_no_client_input_once_done(gateway: RunningGateway, pki: PKI) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        job_id = submit(c, gateway.base, "drop-1").json()["id"]
        wait_finished(c, gateway.base, job_id)
    row = stored(gateway, job_id)
    assert row is not None and row.body is None and row.cert is None and not row.headers
    assert json.loads(row.result or b"{}")["outputs"]


def test_a_generation_job_gives_the_whole_answer_the_sync_generate_gives(
    pki: PKI, llm_cluster: TritonCluster, tmp_path: Path
) -> None:
    llm_entries(tmp_path)
    nodes = [{**n, "models": [LLM_MODEL]} for n in node_table(llm_cluster)]
    cfg = gateway_config(pki, tmp_path / "registry", tmp_path / "g", nodes, jobs=JOBS)
    body = {"text_input": "def ", "parameters": {"max_tokens": 6, "temperature": 0}}
    demo = pki.ensure("client", "demo")
    with running_gateway(cfg) as gw, client(pki, demo) as c:
        sync = c.post(f"{gw.base}/v2/models/{LLM_MODEL}/generate", json=body)
        assert sync.status_code == 200, sync.text
        url = f"{gw.base}/v2/models/{LLM_MODEL}/generate/jobs"
        r = c.post(url, json=body, headers={"idempotency-key": "gen-1"})
        assert r.status_code == 202, r.text
        view = wait_finished(c, gw.base, r.json()["id"])
        assert view["status"] == "done", view
        answer = view["response"]
        assert answer["text_output"] == sync.json()["text_output"]  # temperature 0
        assert view["receipt_id"] == answer["ztgate"]["receipt_id"]
        # Both stream receipts name the job; the sync generate's (the control) name none.
        closing = receipt_doc(c, gw.base, view["receipt_id"])
        opening = receipt_doc(c, gw.base, closing["ext"]["opening"])
        assert closing["kind"] == "close" and opening["kind"] == "open"
        assert closing["ext"]["job_id"] == opening["ext"]["job_id"] == r.json()["id"]
        sync_closing = receipt_doc(c, gw.base, sync.json()["ztgate"]["receipt_id"])
        sync_opening = receipt_doc(c, gw.base, sync_closing["ext"]["opening"])
        assert sync_closing["kind"] == "close" and sync_opening["kind"] == "open"
        assert "job_id" not in sync_closing["ext"] and "job_id" not in sync_opening["ext"]
        # A job's answer is whole: a streamed one is refused at submit; so is a tensor model.
        streamed = {**body, "parameters": {**body["parameters"], "stream": True}}
        refused = c.post(url, json=streamed, headers={"idempotency-key": "gen-2"})
        assert refused.status_code == 400
        iris = c.post(
            f"{gw.base}/v2/models/iris/generate/jobs", json=body, headers={"idempotency-key": "g3"}
        )
        assert iris.status_code in (400, 404)


# --- replicas sharing Redis -----------------------------------------------------------------
async def erase_in_redis(url: str, receipt_id: str) -> int:
    store = RedisJobStore(url, timeout_s=5.0)
    try:
        return await store.erase_receipts([receipt_id])
    finally:
        await store.close()


def test_replicas_sharing_redis_share_their_jobs(
    pki: PKI,
    triton_cluster: TritonCluster,
    registry_dir: Path,
    redis_server: str,
    tmp_path: Path,
) -> None:
    nodes = node_table(triton_cluster)
    shared = {"redis_url": redis_server, "timeout_s": 3.0}
    # Replicas sharing a Redis share the key that seals jobs (gateway/jobs/seal.py).
    jobs = {**JOBS, "key_file": str(tmp_path / "jobs.key")}
    a_cfg = gateway_config(pki, registry_dir, tmp_path / "a", nodes, jobs=jobs, state=shared)
    b_cfg = gateway_config(pki, registry_dir, tmp_path / "b", nodes, jobs=jobs, state=shared)
    who = pki.issue("client", "jobshared", organization="Acme")
    other = pki.issue("client", "jobsharedpeer", organization="Acme")
    with running_gateway(a_cfg) as a, running_gateway(b_cfg) as b:
        hold(a, True)  # only b runs jobs: what a took, b must find
        with client(pki, who) as c, client(pki, other) as peer:
            r = submit(c, a.base, "shared-1")
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            # The key is shared too: a retry that lands on the other replica is the same job.
            again = submit(c, b.base, "shared-1")
            assert again.status_code == 200 and again.json()["id"] == job_id
            assert submit(c, b.base, "shared-1", infer_body(IRIS[:1])).status_code == 409
            view = wait_finished(c, a.base, job_id)  # polled where it was submitted
            assert view["status"] == "done" and view["node_executions"] == 1
            assert wait_finished(c, b.base, job_id) == view
            assert peer.get(f"{a.base}/v2/jobs/{job_id}").status_code == 404
            # An erasure of its receipt takes the job with it (`ztgate audit erase --config`).
            assert asyncio.run(erase_in_redis(redis_server, view["receipt_id"])) == 1
            assert c.get(f"{b.base}/v2/jobs/{job_id}").status_code == 404
            # The per-identity cap holds across replicas (both held: nothing finishes).
            hold(b, True)
            codes = [submit(c, (a, b)[i % 2].base, f"shared-cap-{i}").status_code for i in range(5)]
            assert codes == [202] * 3 + [429] * 2, codes
            assert submit(peer, a.base, "shared-cap-0").status_code == 202  # control
            hold(b, False)
            hold(a, False)
            for i in range(3):
                got = submit(c, a.base, f"shared-cap-{i}").json()["id"]
                assert wait_finished(c, a.base, got)["status"] == "done"


# --- issue 26: the store's writer cannot replay, forge or swap; dropped data leaves disk ----
def marked_body(value: float) -> tuple[dict[str, Any], bytes]:
    """An iris request carrying `value`, and the bytes it appears as in the request: a
    marker to look for in the store's files (no answer carries its input)."""
    x = np.array([[value, 3.5, 1.4, 0.2]], dtype=np.float32)
    body = infer_body(x)
    return body, json.dumps(body["inputs"][0]["data"][0]).encode()


def on_disk(gw: RunningGateway, marker: bytes) -> bool:
    """Whether `marker` is anywhere in the job store's files (free pages and WAL too).

    Read by another process: closing a descriptor of the database in this one (which runs
    the gateway) would drop the gateway's POSIX locks on it, and SQLite's with them."""
    files = [gw.cfg.data_dir / JOBS_FILE, gw.cfg.data_dir / f"{JOBS_FILE}-wal"]
    found = subprocess.run(
        ["grep", "-q", "-a", "-F", "-e", marker.decode(), *[str(f) for f in files if f.exists()]],
        timeout=60,
    )
    assert found.returncode in (0, 1), found
    return found.returncode == 0


def stored_raw(gw: RunningGateway, job_id: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(gw.cfg.data_dir / JOBS_FILE)) as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def write_row(gw: RunningGateway, row: dict[str, Any]) -> None:
    """The store written by hand, as whoever can write the data dir could."""
    with contextlib.closing(sqlite3.connect(gw.cfg.data_dir / JOBS_FILE, timeout=30)) as db:
        db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
        cols = ", ".join(row)
        db.execute(
            f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values())
        )
        db.commit()


def test_a_sealed_job_copied_back_into_the_store_does_not_run_again(
    gateway: RunningGateway, pki: PKI
) -> None:
    """A writer of the store copies a queued job, waits for it to finish, and writes the
    copy back as queued: with a fresh `created` its seal fails; with the sealed one, once
    older than jobs.max_age_s, it is refused as expired. Control: the original runs."""
    alice = pki.ensure("client", "alice")
    hold(gateway, True)
    try:
        with client(pki, alice) as c:
            job_id = submit(c, gateway.base, "replay-1").json()["id"]
            copy = stored_raw(gateway, job_id)
            assert copy["state"] == "queued" and copy["body"] and copy["mac"]
            hold(gateway, False)
            original = wait_finished(c, gateway.base, job_id)
            assert original["status"] == "done" and original["node_executions"] == 1  # control
            now = time.time()
            fresh = {**copy, "created": now, "updated": now, "not_before": now}
            write_row(gateway, fresh)
            replayed = wait_finished(c, gateway.base, job_id)
            assert replayed["status"] == "failed" and replayed["http_status"] == 500
            assert replayed["response"]["type"].endswith("/internal")
            assert "outputs" not in replayed["response"]
            # The sealed time kept, but older than any job may run (the store's clock
            # and index are the writer's; the seal bounds the age).
            # Sealed here with the gateway's key, to test the age bound alone.
            old = now - gateway.cfg.jobs.max_age_s - 60
            key = load_key(gateway.cfg.jobs.key_file or gateway.cfg.data_dir / "jobs.key")
            stale = {**copy, "created": old, "updated": now, "not_before": now}
            stale["mac"] = seal(
                key,
                job_id=job_id,
                owner=copy["owner"],
                route=copy["route"],
                model=copy["model"],
                created=old,
                cert=copy["cert"],
                headers=json.loads(copy["headers"]),
                body=copy["body"],
            )
            write_row(gateway, stale)
            expired = wait_finished(c, gateway.base, job_id)
            assert expired["status"] == "failed" and expired["http_status"] == 504, expired
            assert expired["response"]["type"].endswith("/deadline-exceeded")
    finally:
        hold(gateway, False)


def test_a_finished_or_erased_job_leaves_no_request_bytes_in_the_store_files(
    gateway: RunningGateway, pki: PKI
) -> None:
    alice = pki.ensure("client", "alice")
    subject = pki.issue("client", "joberased", organization="Acme")
    done_body, done_marker = marked_body(4.718281828459045)
    erased_body, erased_marker = marked_body(6.626070150001)
    hold(gateway, True)
    try:
        with client(pki, alice) as c, client(pki, subject) as s:
            job_id = submit(c, gateway.base, "scrub-1", done_body).json()["id"]
            queued = submit(s, gateway.base, "scrub-2", erased_body).json()["id"]
            # Controls: while the jobs may run, their requests are on disk.
            assert on_disk(gateway, done_marker) and on_disk(gateway, erased_marker)
            # A queued job has no receipt: an erasure by subject reaches it.
            data = gateway.cfg.data_dir
            spiffe = stored_raw(gateway, queued)["owner"]
            where = ["--log-dir", str(data / "receipts"), "--data-dir", str(data)]
            where += ["--subject", spiffe]
            erased = subprocess.run(
                [sys.executable, "-m", "gateway", "audit", "erase", "--json", *where],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert json.loads(erased.stdout) == {"erased": 0, "jobs": 1}
            assert s.get(f"{gateway.base}/v2/jobs/{queued}").status_code == 404
            assert not on_disk(gateway, erased_marker)
            assert on_disk(gateway, done_marker)  # control: another client's job is kept
            hold(gateway, False)
            assert wait_finished(c, gateway.base, job_id)["status"] == "done"
        assert not on_disk(gateway, done_marker)
    finally:
        hold(gateway, False)


def test_a_swapped_or_falsified_answer_is_not_shown(gateway: RunningGateway, pki: PKI) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        first = submit(c, gateway.base, "swap-1").json()["id"]
        second = submit(c, gateway.base, "swap-2", infer_body(IRIS[:1])).json()["id"]
        wait_finished(c, gateway.base, first)
        wait_finished(c, gateway.base, second)
        assert c.get(f"{gateway.base}/v2/jobs/{first}/result").status_code == 200  # control
        theirs = stored_raw(gateway, second)
        mine = stored_raw(gateway, first)
        swapped = {**mine}
        for k in ("result", "result_headers", "receipt_id", "status", "mac"):
            swapped[k] = theirs[k]
        problem = {"type": "https://ztgate.dev/problems/forbidden", "status": 403}
        falsified = {
            **mine,
            "state": "failed",
            "status": 403,
            "result": json.dumps(problem).encode(),
            "result_headers": json.dumps({"content-type": "application/problem+json"}),
            "receipt_id": None,
        }
        for forged in (swapped, falsified):
            write_row(gateway, forged)
            for path in (f"/v2/jobs/{first}", f"/v2/jobs/{first}/result"):
                r = c.get(f"{gateway.base}{path}")
                assert r.status_code == 500 and r.json()["type"].endswith("/internal"), r.text
            assert c.get(f"{gateway.base}/v2/jobs/{second}").status_code == 200  # control
        write_row(gateway, mine)  # control: the recorded answer verifies again
        assert c.get(f"{gateway.base}/v2/jobs/{first}").json()["status"] == "done"


def test_the_job_key_is_refused_unless_a_private_regular_file_of_the_gateway(
    tmp_path: Path,
) -> None:
    made = tmp_path / "jobs.key"
    key = load_key(made)  # control: made 0600, this process's, and read back
    assert load_key(made) == key and (made.stat().st_mode & 0o777) == 0o600
    link = tmp_path / "link.key"
    link.symlink_to(made)
    with pytest.raises(KeyFileError, match="symlink"):
        load_key(link)
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o640)
    with pytest.raises(KeyFileError, match="0600"):
        load_key(loose)
    loose.chmod(0o600)
    assert load_key(loose)  # control: the same file, private
    # Another user's file takes root to make: under CI the test runs as root.
    assert os.geteuid() == 0 or not os.environ.get("CI")
    if os.geteuid() == 0:
        os.chown(loose, 65534, 65534)
        with pytest.raises(KeyFileError, match="uid"):
            load_key(loose)


async def redis_store_roundtrip(url: str) -> None:
    from gateway.jobs.model import Outcome

    store = RedisJobStore(url, timeout_s=5.0, prefix=f"ztgate:jobs-test:{os.getpid()}:")
    try:

        def new(owner: str, n: int) -> NewJob:
            return NewJob(
                id=f"{n:032x}",
                owner=owner,
                key=f"k{n}",
                digest=str(n),
                route="/v2/models/iris/infer",
                model="iris",
                created=1234.5 + n,
                cert="pem",
                headers={},
                body=b"secret",
                mac="m",
            )

        for n, owner in enumerate(["spiffe://x/a", "spiffe://x/a", "spiffe://x/b"]):
            assert (await store.submit(new(owner, n), 10, 100)).created
        row = await store.get(f"{0:032x}")
        assert row is not None and row.created == 1234.5  # the sealed time, not the server's
        [claimed] = await store.claim(1)
        out = Outcome("done", 200, {}, b"answer", "rid", "result-mac")
        assert await store.finish(claimed.id, out)
        done = await store.get(claimed.id)
        assert done is not None and done.mac == "result-mac" and done.body is None
        expired, _ = await store.expire(-1.0, 1e9, b"problem", lambda i: "expired-" + i)
        assert expired == 2
        late = await store.get(f"{2:032x}")
        assert late is not None and late.state == "failed" and late.mac == f"expired-{2:032x}"
        assert await store.erase_owner("spiffe://x/a") == 2
        assert await store.get(f"{0:032x}") is None and await store.get(f"{1:032x}") is None
        assert await store.get(f"{2:032x}") is not None  # control: another owner's job
    finally:
        await store.close()


def test_the_redis_store_keeps_the_sealed_time_and_seals_and_erases_by_subject(
    redis_server: str,
) -> None:
    asyncio.run(redis_store_roundtrip(redis_server))


# ----------------------------------------------------------- one receipt per job, keyed


def receipt_doc(c: httpx.Client, base: str, receipt_id: str) -> dict[str, Any]:
    r = c.get(f"{base}/v2/receipts/{receipt_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()["receipt"]
    return doc


def test_a_jobs_receipt_names_the_job_and_a_sync_answers_names_none(
    gateway: RunningGateway, pki: PKI
) -> None:
    alice = pki.ensure("client", "alice")
    with client(pki, alice) as c:
        job_id = submit(c, gateway.base, "named-1").json()["id"]
        view = wait_finished(c, gateway.base, job_id)
        assert view["status"] == "done", view
        ext = receipt_doc(c, gateway.base, view["receipt_id"])["ext"]
        assert ext["job_id"] == job_id and "supersedes" not in ext
        # Control, the same request made synchronously: its receipt names no job.
        sync = c.post(f"{gateway.base}/v2/models/iris/infer", json=infer_body(IRIS))
        assert sync.status_code == 200, sync.text
        rid = sync.json()["parameters"]["ztgate.receipt_id"]
        assert "job_id" not in receipt_doc(c, gateway.base, rid).get("ext", {})


def test_a_job_killed_after_its_receipt_is_logged_runs_again_under_that_one_receipt(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    """The crash exactly once must survive: the node answered and the receipt is fsynced in
    the log, but the job has not recorded its result. Placed deterministically: the first
    gateway runs with `CRASH_ENV` set, so its runner exits the process (`os._exit`, no
    shutdown, what a SIGKILL at that point leaves) right there. The restarted gateway runs
    the job again (a second node execution, counted), commits to the same outputs under
    the job's salt, and gives the receipt already logged: one answer receipt in the log,
    naming the job, and an export of the log still verifies."""
    data = tmp_path / "data"
    toml = dev_toml(pki, registry_dir, data, policy_dir(tmp_path / "policies"))
    toml += f"""
[receipts]
signing_key = "{pki.key_path("receipt-signing")}"
log_key = "{pki.key_path("log-checkpoint")}"
checkpoint_interval_s = 0.2
[jobs]
backoff_s = 0.2
backoff_max_s = 1.0
max_attempts = 1000
"""
    for row in node_table(triton_cluster):
        toml += "[[nodes]]\n" + "".join(f'{k} = "{v}"\n' for k, v in row.items())
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    port = int(toml.split("[listen]\nport = ")[1].split("\n")[0])
    admin = int(toml.split("admin_port = ")[1].split("\n")[0])
    base = f"https://127.0.0.1:{port}"
    plain_env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}

    def serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        assert wait_ready(f"http://127.0.0.1:{admin}/v2/health/live", 60, proc)
        return proc

    def kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    alice = pki.ensure("client", "alice")
    first = serve({**plain_env, CRASH_ENV: "1"})
    try:
        with client(pki, alice) as c:
            r = submit(c, base, "killed-1")
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
        assert first.wait(timeout=PATIENCE_S) == 137  # it died where the test put the crash
    finally:
        kill(first)
    logged = receipts_in(data / "receipts", "answer")
    assert [s.receipt.extensions.get("job_id") for s in logged] == [job_id]
    store = SyncJobStore(data / JOBS_FILE, lock=False)
    try:
        row = store.get(job_id)
    finally:
        store.close()
    assert row is not None and row.state == "running" and row.receipt_id is None  # unrecorded
    assert row.executions == 1

    second = serve(plain_env)
    try:
        with client(pki, alice) as c:
            view = wait_finished(c, base, job_id)
            assert view["status"] == "done", view
            assert view["node_executions"] == 2  # the node computed it twice: counted
            assert view["receipt_id"] == logged[0].receipt.receipt_id
            assert view["response"]["parameters"]["ztgate.receipt_id"] == view["receipt_id"]
            metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
            assert 'ztgate_job_reruns_total{receipt="reused"} 1.0' in metrics
            # Control: a job that ran once is no rerun, and gets a receipt of its own.
            other = wait_finished(c, base, submit(c, base, "killed-2").json()["id"])
            assert other["node_executions"] == 1
            assert other["receipt_id"] != view["receipt_id"]
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=20)
        finally:
            kill(second)
    answered = receipts_in(data / "receipts", "answer")
    assert sorted(s.receipt.receipt_id for s in answered) == sorted(
        [view["receipt_id"], other["receipt_id"]]
    )
    assert sorted(str(s.receipt.extensions["job_id"]) for s in answered) == sorted(
        [job_id, other["id"]]
    )

    # `ztgate verify` on an export: the receipts gained an ext field, nothing else.
    logs = ReceiptLog.all_logs(data / "receipts")
    rl = ReceiptLog.open_readonly(logs[0])
    try:
        origin = rl.origin
    finally:
        rl.close_sync()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    log_key = load_pem_private_key(pki.key_path("log-checkpoint").read_bytes(), None)
    trust = TrustPolicy(
        KeySet.load(data / "receipts" / "keys.json"),
        [TrustedLogKey(origin, log_key.public_key())],  # type: ignore[arg-type]
        {},
    )
    (tmp_path / "trust.json").write_text(json.dumps(trust.to_dict()))
    bundle = tmp_path / "bundle"
    gateway_cli = [sys.executable, "-m", "gateway"]
    subprocess.run(
        [*gateway_cli, "audit", "export", "--log-dir", str(data / "receipts"), str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    verified = subprocess.run(
        [*gateway_cli, "verify", str(bundle), "--trust", str(tmp_path / "trust.json"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["status"] == "valid", report
    found = {f["subject"] for f in report["findings"] if f["status"] == "valid"}
    assert {f"receipt {s.receipt.receipt_id}" for s in answered} <= found


JOB_KEY = b"k" * 32
RECEIPT_ORIGIN = "ztgate.local/site-a/receipts"


def answer_fields(label: int) -> dict[str, Any]:
    """`ReceiptService.answer`'s fields for one iris answer whose label is `label`."""
    return {
        "client": ClientRef("spiffe://ztgate.local/client/alice", "1f", "CN=client CA"),
        "model": ModelRef("iris", "1", "ab" * 32),
        "inputs": [Tensor("input", "FP32", (1, 4), np.array([[5.1, 3.5, 1.4, 0.2]], "<f4"))],
        "outputs": [Tensor("label", "INT64", (1,), np.array([label], "<i8"))],
        "policy": PolicyRef("sha256:" + "00" * 32, "decision-1"),
        "verification": VerificationRef("none", "unverified"),
        "nodes": ["n1"],
        "request_id": "r1",
    }


async def test_a_job_run_again_gets_its_logged_receipt_unless_it_answered_otherwise(
    pki: PKI, tmp_path: Path
) -> None:
    """The receipt service and the log's job index, in process, on a real log: the second
    run's answer is given to the service directly (a different one stands for a
    nondeterministic node, which no test model here is)."""
    service = ReceiptService.open(
        tmp_path / "receipts",
        pki.key_path("receipt-signing"),
        pki.key_path("log-checkpoint"),
        RECEIPT_ORIGIN,
    )
    key = JOB_KEY
    fields = answer_fields(0)
    reruns: list[str] = []
    service.on_job_rerun = reruns.append
    try:
        first = await service.answer(**fields, seed=job_seed(key, "job-1"), job_id="job-1")
        assert first.receipt.extensions["job_id"] == "job-1"
        size = service.log.size
        again = await service.answer(**fields, seed=job_seed(key, "job-1"), job_id="job-1")
        assert (again.receipt, again.salt, again.summary) == (
            first.receipt,
            first.salt,
            first.summary,
        )
        assert service.log.size == size and reruns == ["reused"]  # no second receipt
        assert again.reused and not first.reused  # its evidence is not filed again

        # The same outputs with other evidence (a zk proof is randomised): a second
        # execution the first receipt does not commit to, so one that supersedes it.
        proved = {**fields, "verification": VerificationRef("zk", "verified", None, "cd" * 32)}
        zk_job = await service.answer(**fields, seed=job_seed(key, "job-z"), job_id="job-z")
        zk_again = await service.answer(**proved, seed=job_seed(key, "job-z"), job_id="job-z")
        assert not zk_again.reused
        assert zk_again.receipt.extensions["supersedes"] == zk_job.receipt.receipt_id

        # The same tensors from another model file, or for another certificate: another
        # execution too, never handed the first receipt (it names the first model and key).
        for other in (
            {"model": ModelRef("iris", "1", "cd" * 32)},
            {"client": ClientRef("spiffe://ztgate.local/client/alice", "20", "CN=other CA")},
        ):
            seed = job_seed(key, "job-m")
            base = await service.answer(**fields, seed=seed, job_id="job-m")
            moved = await service.answer(**{**fields, **other}, seed=seed, job_id="job-m")
            assert not moved.reused
            assert moved.receipt.extensions["supersedes"] == base.receipt.receipt_id
        size, reruns[:] = service.log.size, ["reused"]

        # The log itself refuses a second receipt for the job that supersedes nothing.
        with pytest.raises(JobReceipted):
            await issue(service.log, service.signer, **fields, job=("job-1", None))
        assert service.log.size == size

        otherwise = answer_fields(2)
        second = await service.answer(**otherwise, seed=job_seed(key, "job-1"), job_id="job-1")
        ext = second.receipt.extensions
        assert ext["job_id"] == "job-1" and ext["supersedes"] == first.receipt.receipt_id
        assert service.log.size == size + 1 and reruns == ["reused", "superseded"]
        assert service.log.job_receipt("job-1") == second.receipt.index

        # Control: another job, the same request, is a receipt of its own.
        other = await service.answer(**fields, seed=job_seed(key, "job-2"), job_id="job-2")
        assert other.receipt.receipt_id != first.receipt.receipt_id
        assert other.salt != first.salt and "supersedes" not in other.receipt.extensions
        # And a request that is no job is never looked up or indexed.
        plain = await service.answer(**fields, seed=job_seed(key, "job-1"))
        assert "job_id" not in plain.receipt.extensions
        assert service.log.job_receipt("job-1") == second.receipt.index
    finally:
        await service.close()


async def test_a_job_run_again_while_its_receipt_is_queued_waits_for_it_to_commit(
    pki: PKI, tmp_path: Path
) -> None:
    """A second run answering while the first run's receipt is queued, not yet committed:
    the service waits for the commit and compares, rather than take the body it cannot
    read yet for "answered otherwise". The log's database thread is held on an event (a
    slow disk, which no test can cause on cue) so the receipt stays queued; it is the
    log's own single writer thread, so its write lines up behind the hold."""
    service = ReceiptService.open(
        tmp_path / "receipts",
        pki.key_path("receipt-signing"),
        pki.key_path("log-checkpoint"),
        RECEIPT_ORIGIN,
    )
    loop = asyncio.get_running_loop()

    async def held_run_twice(job: str, again: dict[str, Any]) -> tuple[Any, Any]:
        hold = threading.Event()
        held = loop.run_in_executor(service.log._db_thread, hold.wait, 60.0)
        seed = job_seed(JOB_KEY, job)
        first = asyncio.create_task(service.answer(**answer_fields(0), seed=seed, job_id=job))
        for _ in range(1000):  # the first run's task queues its receipt
            if service.log.job_receipt(job) is not None:
                break
            await asyncio.sleep(0)
        assert service.log.body_at(service.log.job_receipt(job) or 0) is None  # queued
        second = asyncio.create_task(service.answer(**again, seed=seed, job_id=job))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second.done()  # waiting for the first receipt's commit
        hold.set()
        await held
        return await first, await second

    try:
        size = service.log.size
        first, again = await held_run_twice("job-q", answer_fields(0))
        assert again.reused and again.receipt == first.receipt
        assert service.log.size == size + 1
        # Control, held the same way: a different answer still supersedes the first.
        first, other = await held_run_twice("job-r", answer_fields(1))
        assert other.receipt.extensions["supersedes"] == first.receipt.receipt_id
        assert service.log.size == size + 3
    finally:
        await service.close()


async def test_erasing_a_jobs_receipt_drops_its_job_index_row(pki: PKI, tmp_path: Path) -> None:
    """Retention or erasure of a receipt's body deletes its `job_receipts` row in the same
    transaction; another job's row stays."""
    service = ReceiptService.open(
        tmp_path / "receipts",
        pki.key_path("receipt-signing"),
        pki.key_path("log-checkpoint"),
        RECEIPT_ORIGIN,
    )
    try:
        gone = await service.answer(
            **answer_fields(0), seed=job_seed(JOB_KEY, "job-e"), job_id="job-e"
        )
        kept = await service.answer(
            **answer_fields(0), seed=job_seed(JOB_KEY, "job-k"), job_id="job-k"
        )
        assert service.log.job_receipt("job-e") == gone.receipt.index
        assert await service.log.erase([gone.receipt.receipt_id], "erasure-request") == 1
        assert service.log.job_receipt("job-e") is None
        assert service.log.job_receipt("job-k") == kept.receipt.index  # control
        # Its next run is the job's first receipt here again, superseding nothing.
        size = service.log.size
        fresh = await service.answer(
            **answer_fields(0), seed=job_seed(JOB_KEY, "job-e"), job_id="job-e"
        )
        assert "supersedes" not in fresh.receipt.extensions and service.log.size == size + 1
        # Retention's path (`expire`) drops the rows of what it expires too.
        assert await service.log.expire(-1.0) >= 2
        assert service.log.job_receipt("job-e") is None is service.log.job_receipt("job-k")
    finally:
        await service.close()


async def test_a_job_whose_receipt_is_in_a_frozen_log_is_not_receipted_twice(
    pki: PKI, tmp_path: Path
) -> None:
    """A replica's log frozen (after a restore) and a new one begun between a job's runs:
    the frozen log is searched too. The frozen log is the one the first run wrote, handed
    to the new service as `ReceiptService.open` hands over a directory's frozen logs."""
    keys = (pki.key_path("receipt-signing"), pki.key_path("log-checkpoint"))
    seed = job_seed(JOB_KEY, "job-f")
    before = ReceiptService.open(tmp_path / "before", *keys, RECEIPT_ORIGIN)
    try:
        first = await before.answer(**answer_fields(0), seed=seed, job_id="job-f")
    finally:
        await before.close()
    (old,) = ReceiptLog.all_logs(tmp_path / "before")
    service = ReceiptService.open(tmp_path / "after", *keys, RECEIPT_ORIGIN)
    service.frozen = [ReceiptLog.open_readonly(old)]
    try:
        size = service.log.size
        again = await service.answer(**answer_fields(0), seed=seed, job_id="job-f")
        assert again.receipt == first.receipt and service.log.size == size
        otherwise = await service.answer(**answer_fields(1), seed=seed, job_id="job-f")
        assert otherwise.receipt.extensions["supersedes"] == first.receipt.receipt_id
        assert otherwise.receipt.log_id == service.log.log_id != first.receipt.log_id
        assert service.log.job_receipt("job-f") == otherwise.receipt.index
        # Control: a job no log has seen gets a receipt of its own in the active log.
        fresh = await service.answer(
            **answer_fields(0), seed=job_seed(JOB_KEY, "job-g"), job_id="job-g"
        )
        assert "supersedes" not in fresh.receipt.extensions and service.log.size == size + 2
    finally:
        await service.close()
        for rl in service.frozen:
            rl.close_sync()
