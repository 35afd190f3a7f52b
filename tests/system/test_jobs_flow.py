"""Jobs in the production deployment: submitted on one replica, run and polled anywhere.

The replicas share jobs through Redis and a jobs seal key the operator provisions for
both (`jobs.key_file`): a job one replica accepted may be run by the other, so a key each
replica made for itself would fail every such job's seal. Each job answers what the
synchronous call answers, with its receipt, and is visible to its
submitter only, from either replica.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.system.cluster import ProductionCluster
from tests.system.traffic import Call

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

JOBS = 6
DONE_DEADLINE_S = 120.0


def _wait_done(client: httpx.Client, base: str, job_id: str) -> dict[str, object]:
    end = time.monotonic() + DONE_DEADLINE_S
    while True:
        r = client.get(f"{base}/v2/jobs/{job_id}")
        assert r.status_code == 200, r.text
        view = dict(r.json())
        if view["status"] in ("done", "failed"):
            return view
        assert time.monotonic() < end, view  # a bound on the wait, not a timed assertion
        time.sleep(0.2)


def test_jobs_submitted_on_one_replica_are_run_and_read_on_either(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    body = Call("shop", "iris", "none", 0, 200).body()
    a, b = (r.base for r in cluster.replicas)
    with cluster.client("shop", timeout=60) as shop, cluster.client("audra", timeout=60) as audra:
        sync = shop.post(f"{a}/v2/models/iris/infer", json=body)
        assert sync.status_code == 200, sync.text
        ids = []
        for i in range(JOBS):
            submit_on, poll_on = (a, b) if i % 2 == 0 else (b, a)
            key = f"sys-{uuid.uuid4().hex}"
            r = shop.post(
                f"{submit_on}/v2/models/iris/jobs", json=body, headers={"Idempotency-Key": key}
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            # A retry of the submit on the other replica is the same job, not a second.
            again = shop.post(
                f"{poll_on}/v2/models/iris/jobs", json=body, headers={"Idempotency-Key": key}
            )
            assert again.status_code in (200, 202) and again.json()["id"] == job_id
            ids.append((job_id, poll_on))
        for job_id, poll_on in ids:
            view = _wait_done(shop, poll_on, job_id)
            assert view["status"] == "done" and view["http_status"] == 200, view
            answer = view["response"]
            assert isinstance(answer, dict)
            assert answer["outputs"] == sync.json()["outputs"]  # what the sync call answers
            assert answer["parameters"]["ztgate.receipt_id"] == view["receipt_id"]
            # Visible to its submitter only, on either replica: another identity gets the
            # 404 an unknown id gets (control: the submitter's own 200 above).
            for base in (a, b):
                hidden = audra.get(f"{base}/v2/jobs/{job_id}")
                assert hidden.status_code == 404, hidden.text
                assert audra.get(f"{base}/v2/jobs/{uuid.uuid4().hex}").status_code == 404
