"""Serving past the revocation staleness budget is what the signed policy says (@stale).

A cut-off edge cannot refresh its revocation list; past the budget the last-known set
may be missing a revocation. A permit's @stale says what it still grants then: "serve"
(every mode), "verified" (all but `none`); a permit without it grants nothing (deny by
default). The answer's receipt and the decision log record how stale the data was.

Staleness is reached for real: the revocation sync interval is an hour and the budget is
one second (what a bundle's `staleness_budget_s = 1` sets), so the data ages past it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.pki import PKI
from gateway.policy.source import PolicyError, load_policy_dir
from tests.conftest import TritonCluster
from tests.gateway_harness import (
    RunningGateway,
    client_context,
    gateway_config,
    policy_dir,
    running_gateway,
)
from tests.test_gateway import IRIS, infer_body, node_table


@pytest.fixture(scope="module")
def registry_dir(triton_repository: Path) -> Path:
    return triton_repository.parent / "registry"


@contextmanager
def _gateway(
    pki: PKI, cluster: TritonCluster, registry: Path, data: Path, policies: Path
) -> Iterator[RunningGateway]:
    cfg = gateway_config(
        pki,
        registry,
        data,
        node_table(cluster),
        policy={"dir": str(policies)},
        state={"revocation_sync_s": 3600.0},
    )
    with running_gateway(cfg) as gw:
        yield gw


def _infer(c: httpx.Client, gw: RunningGateway, mode: str) -> httpx.Response:
    body = infer_body(IRIS)
    body["parameters"] = {"ztgate.verification": mode}
    return c.post(f"{gw.base}/v2/models/iris/infer", json=body)


def _go_stale(gw: RunningGateway) -> None:
    gw.gw.revocations.staleness_budget_s = 1.0
    deadline = time.monotonic() + 10
    while not gw.gw.revocations.stale():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _client(pki: PKI, name: str) -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=20)


def test_stale_verified_keeps_only_verified_modes_and_the_receipt_says_how_stale(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    policies = policy_dir(tmp_path / "policies")  # as shipped: apps carry @stale("verified")
    with _gateway(pki, triton_cluster, registry_dir, tmp_path / "data", policies) as gw:
        with _client(pki, "demo") as demo:
            assert _infer(demo, gw, "none").status_code == 200  # fresh: positive control
            _go_stale(gw)
            refused = _infer(demo, gw, "none")
            assert refused.status_code == 403, refused.text  # none is not kept
            served = _infer(demo, gw, "redundant")
            assert served.status_code == 200, served.text
            rid = served.json()["parameters"]["ztgate.receipt_id"]
            # Read the receipt once fresh again (reads fail closed while stale).
            gw.gw.revocations.staleness_budget_s = 3600.0
            receipt = demo.get(f"{gw.base}/v2/receipts/{rid}")
            assert receipt.status_code == 200, receipt.text
            ext = receipt.json()["receipt"].get("ext", {})
            assert ext["revocation_stale_s"] >= 1


def test_without_stale_a_permit_grants_nothing_past_the_budget(
    pki: PKI, triton_cluster: TritonCluster, registry_dir: Path, tmp_path: Path
) -> None:
    policies = policy_dir(tmp_path / "policies")
    callers = policies / "10-callers.cedar"
    callers.write_text(callers.read_text().replace('@stale("verified")\n', ""))
    with _gateway(pki, triton_cluster, registry_dir, tmp_path / "data", policies) as gw:
        with _client(pki, "demo") as demo:
            assert _infer(demo, gw, "redundant").status_code == 200  # fresh
            _go_stale(gw)
            refused = _infer(demo, gw, "redundant")
            assert refused.status_code == 503, refused.text
            assert "staleness" in refused.json()["detail"]


def test_stale_serve_keeps_every_mode_and_bad_annotations_never_load(tmp_path: Path) -> None:
    policies = policy_dir(tmp_path / "ok")
    callers = policies / "10-callers.cedar"
    callers.write_text(callers.read_text().replace('@stale("verified")', '@stale("serve")'))
    source = load_policy_dir(policies)
    assert {p.id: p.stale for p in source.policies}["apps-call-public-internal"] == "serve"
    forbid = (
        '\n@id("x-forbid")\n@stale("serve")\n'
        'forbid (principal, action == Ztgate::Action::"infer", resource) when { false };\n'
    )
    for name, edit, why in (
        ("value", lambda t: t.replace('@stale("verified")', '@stale("always")'), "one of serve"),
        ("forbid", lambda t: t + forbid, "belongs on a permit"),
    ):
        broken = policy_dir(tmp_path / f"bad-{name}")
        f = broken / "10-callers.cedar"
        f.write_text(edit(f.read_text()))
        with pytest.raises(PolicyError) as err:
            load_policy_dir(broken)
        assert why in str(err.value), str(err.value)
