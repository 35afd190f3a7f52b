"""Lazy proofs (zk/lazy.py): answer in mode none at once, prove it later on another provider.

Real parts throughout: four tritonservers (a liar and an honest node answering `mlp`, a
prover serving `mlp-zk`, and a mute prover whose `mlp-zk` never answers in time), the
gateway `ztgate serve` builds (HTTPS, receipts, its zk mode and lazy proofs set up by
`runtime.add_proof_modes` from the registry), and a Cedar policy with `@proof("lazy")`.
The mute prover is a real node whose prover blocks (a sleep in its model), the one fault
here made by hand: a node that never delivers cannot be caused otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import Config
from gateway.node.repository import build_repository
from gateway.pki import PKI
from gateway.ports import free_port
from gateway.registry import Registry
from gateway.routing.reputation import Record, node_subject
from gateway.runtime import add_proof_modes, build_gateway
from tests.conftest import one_off_node
from tests.gateway_harness import client_context, gateway_config, running_gateway
from tests.test_grpc_front import tls_options, wait_listening
from tests.test_zk import as_node
from tests.test_zk_tuning import MLP_CAL, MLP_X, TOLERANCE, relu_mlp
from zk.lazy import LazyProofs
from zk.onboard import onboard
from zk.repository import add_onboarded, onboarded_dir

pytestmark = pytest.mark.slow

# A permit for public models in mode none that obliges a lazy proof, and no mode-none
# answers from the provers' providers (so the answer and its proof come from different
# providers, and the test knows which node answered).
LAZY_POLICY = """
@id("lazy-public-none")
@proof("{obligation}")
permit (principal, action == Ztgate::Action::"infer", resource)
when {{ resource.classification == "public" && context.mode == "none" }};

@id("zk-public")
permit (principal, action == Ztgate::Action::"infer", resource)
when {{ resource.classification == "public" && context.mode == "zk" }};

@id("provers-do-not-answer-none")
forbid (principal, action == Ztgate::Action::"infer", resource)
when {{ context.mode == "none" && ["prov-z", "prov-m"].contains(context.node.provider) }};
"""

LIE = "\n            results = [r + np.float32(0.5) for r in results]"
HONEST_RUN = "results = self.session.run(self.output_names, feed)"
MUTE = "    def execute(self, requests):\n        import time as _t\n        _t.sleep(20)\n"


@dataclasses.dataclass
class World:
    pki: PKI
    registry: Path
    nodes: dict[str, dict[str, str]]
    base: Path


@pytest.fixture(scope="module")
def world(pki: PKI, triton_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("lazy")
    model = relu_mlp(base / "mlp.onnx", seed=13)
    registry = Registry.open(base / "registry")
    registry.add(model, "mlp", classification="public")
    out = onboarded_dir(registry.root, "mlp", "1")
    onboard(model, "mlp", MLP_CAL, out, scales=(9,), tolerance=TOLERANCE)
    entry = registry.allow_mode("mlp", "1", "zk")

    def repo(name: str, prover: bool, edit: tuple[str, str, str] | None = None) -> Path:
        path = build_repository([entry], base / name)
        if prover:
            add_onboarded(path, registry.root, [entry])
        if edit is not None:
            model_py = path / edit[0] / "1" / "model.py"
            text = model_py.read_text()
            assert edit[1] in text
            model_py.write_text(text.replace(edit[1], edit[2], 1))
        return path

    repos = {
        "liar": (repo("liar-repo", False, ("mlp", HONEST_RUN, HONEST_RUN + LIE)), "prov-l"),
        "honest": (repo("honest-repo", False), "prov-h"),
        "prover": (repo("prover-repo", True), "prov-z"),
        "mute": (
            repo("mute-repo", True, ("mlp-zk", "    def execute(self, requests):\n", MUTE)),
            "prov-m",
        ),
    }
    nodes: dict[str, dict[str, str]] = {}
    with contextlib_exit() as stack:
        for name, (path, provider) in repos.items():
            nodes[name] = stack.enter_context(
                one_off_node(pki, triton_home, path, name, base / f"w-{name}", provider=provider)
            )
        yield World(pki, registry.root, nodes, base)


def contextlib_exit() -> Any:
    import contextlib

    return contextlib.ExitStack()


def config(w: World, name: str, nodes: list[str], obligation: str = "lazy", **zk: float) -> Config:
    """A gateway config with the lazy policy; `zk`: [zk] keys (the lazy bounds)."""
    cfg = gateway_config(
        w.pki,
        w.registry,
        w.base / name,
        [w.nodes[n] for n in nodes],
        zk={"lazy_deadline_s": 60.0, **zk},
        listen={"grpc_port": free_port()},
    )
    assert cfg.policy.dir is not None
    (cfg.policy.dir / "60-lazy.cedar").write_text(LAZY_POLICY.format(obligation=obligation))
    return cfg


def gateway(cfg: Config, workers: int | None = None) -> Any:
    gw = build_gateway(cfg)
    add_proof_modes(cfg, gw, [as_node(r) for r in _rows(cfg)])
    lazy = gw.pipeline.receipt.lazy if gw.pipeline.receipt is not None else None
    assert isinstance(lazy, LazyProofs)
    # The bounds come from the config's [zk] keys.
    z = cfg.zk
    assert (lazy.max_queue, lazy.per_identity, lazy.deadline_s) == (
        z.lazy_queue,
        z.lazy_per_identity,
        z.lazy_deadline_s,
    )
    if workers is not None:  # 0: nothing drains the queue (a config must have >= 1)
        lazy.workers = workers
    return gw


def _rows(cfg: Config) -> list[dict[str, str]]:
    return [
        {
            "name": n.name,
            "address": n.address,
            "region": n.region,
            "provider": n.provider,
            "dns_name": n.dns_name,
            "spiffe_id": n.spiffe_id,
        }
        for n in cfg.nodes
    ]


def client(pki: PKI, name: str = "alice") -> httpx.Client:
    issued = pki.ensure("client", name)
    return httpx.Client(verify=client_context(pki, issued.cert, issued.key), timeout=60)


def ask(c: httpx.Client, base: str) -> httpx.Response:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 6], "data": MLP_X[0].tolist()}],
        "parameters": {"ztgate.verification": "none"},
    }
    return c.post(f"{base}/v2/models/mlp/infer", json=body)


def ask_grpc(pki: PKI, cfg: Config) -> Any:
    """The same request over the gRPC front (tritonclient, as docs/clients.md shows);
    returns the reply's parameters."""
    import tritonclient.grpc as grpcclient

    assert cfg.listen.grpc_port is not None
    wait_listening(cfg.listen.grpc_port)
    leaf = pki.ensure("client", "alice")
    t = grpcclient.InferenceServerClient(
        f"127.0.0.1:{cfg.listen.grpc_port}", **tls_options(pki, leaf)
    )
    try:
        inp = grpcclient.InferInput("x", [1, 6], "FP32")
        inp.set_data_from_numpy(np.asarray(MLP_X[:1], np.float32))
        res = t.infer("mlp", [inp], parameters={"ztgate.verification": "none"})
        return res.get_response().parameters
    finally:
        t.close()


def final(c: httpx.Client, base: str, rid: str, bound_s: float = 120.0) -> dict[str, Any]:
    """The receipt as the API shows it once its status is final (a bound, not a claim)."""
    end = time.monotonic() + bound_s
    while True:
        doc: dict[str, Any] = c.get(f"{base}/v2/receipts/{rid}").json()
        if doc.get("final_status") != "pending" or time.monotonic() > end:
            return doc
        time.sleep(0.2)


def final_status_in_bundle(
    cfg: Config, rid: str, tmp: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    """`ztgate verify` on an audit bundle of the gateway's log: the receipt's final-status
    finding (the auditor's view: derived only from signed late evidence in the bundle)."""
    from gateway.cli import main

    log_dir = cfg.receipts.dir or cfg.data_dir / "receipts"
    capsys.readouterr()
    assert main(["audit", "trust", "--log-dir", str(log_dir)]) == 0
    trust = tmp / "trust.json"
    trust.write_text(capsys.readouterr().out)
    bundle = tmp / "bundle.tar"
    assert main(["audit", "export", "--log-dir", str(log_dir), str(bundle)]) == 0
    capsys.readouterr()
    main(["verify", str(bundle), "--trust", str(trust), "--json"])
    report = json.loads(capsys.readouterr().out)
    (found,) = [
        f for f in report["findings"] if f["code"] == "final-status" and rid in f["subject"]
    ]
    return dict(found)


def test_wrong_answer_in_none_is_caught_by_the_later_proof_and_charged(world: World) -> None:
    cfg = config(world, "gw-liar", ["liar", "prover"])
    gw = gateway(cfg)
    with running_gateway(cfg, gw) as g, client(world.pki) as c:
        rids = []
        for _ in range(3):
            r = ask(c, g.base)
            assert r.status_code == 200, r.text
            rids.append(r.json()["parameters"]["ztgate.receipt_id"])
        for rid in rids:
            doc = final(c, g.base, rid)
            assert doc["receipt"]["nodes"] == ["liar"]
            assert doc["receipt"]["verification"]["result"] == "unverified-pending"
            assert doc["final_status"] == "contradicted", doc
            (late,) = doc["late_evidence"]
            assert late["kind"] == "lazy_proof" and late["nodes"] == ["liar", "prover"]
            assert len(late["proof_sha256"]) == 64
        liar = gw.router.nodes["liar"]
        assert liar.failed >= 3 or liar.ejections >= 1  # charged every time
        assert gw.router.nodes["prover"].failed == 0


def test_honest_answer_moves_from_pending_to_verified(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The positive control of the test above, built the same way with an honest node.
    cfg = config(world, "gw-honest", ["honest", "prover"])
    gw = gateway(cfg)
    with running_gateway(cfg, gw) as g, client(world.pki) as c:
        r = ask(c, g.base)
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        rid = params["ztgate.receipt_id"]
        receipt = c.get(f"{g.base}/v2/receipts/{rid}").json()["receipt"]
        assert receipt["ext"]["lazy_proof"] == "pending"
        assert receipt["ext"]["lazy_proof_deadline"].endswith("Z")
        # The client's reply says what the receipt says: pending, and until when.
        assert params["ztgate.verification_status"] == "unverified-pending"
        assert params["ztgate.lazy_proof"] == "pending"
        assert params["ztgate.lazy_proof_deadline"] == receipt["ext"]["lazy_proof_deadline"]
        # The gRPC front's reply carries the same parameters.
        grpc_params = ask_grpc(world.pki, cfg)
        assert grpc_params["ztgate.verification_status"].string_param == "unverified-pending"
        assert grpc_params["ztgate.lazy_proof"].string_param == "pending"
        assert grpc_params["ztgate.lazy_proof_deadline"].string_param.endswith("Z")
        assert final(c, g.base, grpc_params["ztgate.receipt_id"].string_param)["final_status"] == (
            "verified"
        )
        doc = final(c, g.base, rid)
        assert doc["final_status"] == "verified", doc
        (late,) = doc["late_evidence"]
        assert late["verdict"] == "verified" and late["nodes"] == ["honest", "prover"]
        assert gw.router.nodes["honest"].failed == 0
        # The prover delivered: counted for it, and it offsets misses (the control of the
        # `missed` evidence in the never-delivering prover's test).
        prover = gw.router.reputation.records[node_subject(gw.router.nodes["prover"].config)]
        assert prover.get("delivered") == 2 and prover.get("missed") == 0
        assert prover.statistic == 0.0
        # No tensor value in the late evidence: hashes only.
        assert str(MLP_X[0, 0])[:6] not in json.dumps(late)
    # The auditor: `ztgate verify` finds it valid with its late evidence.
    found = final_status_in_bundle(cfg, rid, tmp_path, capsys)
    assert found["status"] == "valid" and found["details"]["final_status"] == "verified"


def test_a_prover_that_never_delivers_is_charged_at_its_deadline(world: World) -> None:
    cfg = config(world, "gw-mute", ["honest", "mute"], lazy_deadline_s=3.0)
    gw = gateway(cfg)
    with running_gateway(cfg, gw) as g, client(world.pki) as c:
        r = ask(c, g.base)
        assert r.status_code == 200, r.text
        doc = final(c, g.base, r.json()["parameters"]["ztgate.receipt_id"])
        assert doc["final_status"] == "check-missing", doc
        assert doc["late_evidence"][0]["nodes"] == ["mute"]
        assert gw.router.nodes["mute"].failed == 1  # the prover is charged ...
        honest = gw.router.nodes["honest"]
        assert honest.failed == 0 and honest.charges == 0  # ... not the answering node
        # ... and its reputation record counts the miss, weighed so that one miss never
        # quarantines an honest but slow prover (docs/reputation.md).
        rep = gw.router.reputation
        mute = rep.records[node_subject(gw.router.nodes["mute"].config)]
        assert mute.get("missed") == 1 and mute.get("checked") == 0
        assert mute.statistic == pytest.approx(rep.test.step("missed"))
        assert 0 < mute.statistic < rep.test.threshold
        assert not rep.quarantined(gw.router.nodes["mute"].config)
        assert rep.records.get(node_subject(honest.config), Record()).get("missed") == 0


@pytest.mark.parametrize("obligation", ["lazy", "lazy-or-eager", "lazy-or-unverified"])
def test_the_queue_bound_holds_under_a_burst(
    world: World, obligation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No worker drains the queue here, so what is reserved stays reserved: the bounds
    # (3 in all, 2 per client identity) are what decides, not how fast proofs are.
    cfg = config(
        world,
        f"gw-burst-{obligation}",
        ["honest", "prover"],
        obligation,
        lazy_queue=3,
        lazy_per_identity=2,
    )
    gw = gateway(cfg, workers=0)
    lazy = gw.pipeline.receipt.lazy
    with (
        running_gateway(cfg, gw) as g,
        client(world.pki) as alice,
        client(world.pki, "demo") as demo,
    ):
        got: dict[str, list[str | int]] = {"alice": [], "demo": []}
        first_rid = ""
        for name, c in (("alice", alice), ("demo", demo)):
            for _ in range(3):
                r = ask(c, g.base)
                if r.status_code != 200:
                    got[name].append(r.status_code)
                    continue
                params = r.json()["parameters"]
                rid = params["ztgate.receipt_id"]
                first_rid = first_rid or rid
                receipt = c.get(f"{g.base}/v2/receipts/{rid}").json()["receipt"]
                # What the receipt records, and the reply says the same.
                lazy_ext = receipt["ext"].get("lazy_proof")
                assert params.get("ztgate.lazy_proof") == lazy_ext
                assert params["ztgate.verification_status"] == receipt["verification"]["result"]
                if lazy_ext is None:  # proven before answering: mode zk's answer and receipt
                    assert receipt["verification"]["mode"] == "zk" == params["ztgate.verification"]
                    assert receipt["nodes"] == ["prover"] and len(receipt["ext"]["vk_sha256"]) == 64
                    got[name].append(f"zk:{receipt['verification']['result']}")
                    continue
                got[name].append(str(lazy_ext))
        assert lazy.reserved == 3 and dict(lazy.by_identity) == {
            "spiffe://ztgate.local/client/alice": 2,
            "spiffe://ztgate.local/client/demo": 1,
        }
        # alice's third: over her share; demo's second and third: the queue is full.
        over = {"lazy": 503, "lazy-or-eager": "zk:verified", "lazy-or-unverified": "unscheduled"}[
            obligation
        ]
        assert got == {
            "alice": ["pending", "pending", over],
            "demo": ["pending", over, over],
        }
        first = first_rid
    # Before its proof arrives, `ztgate verify` says pending, not valid.
    found = final_status_in_bundle(cfg, first, tmp_path, capsys)
    assert found["status"] == "pending" and found["details"]["final_status"] == "pending"


@pytest.mark.parametrize("annotation", ['@proof("eager")', '@proof("")', "FORBID"])
def test_bad_proof_obligations_are_refused(annotation: str, tmp_path: Path) -> None:
    from gateway.policy import PolicyError, load_policy_dir
    from tests import test_policy

    rule = '@id("r")\n{}\n{} (principal, action == Ztgate::Action::"infer", resource);\n'
    effect = "permit"
    if annotation == "FORBID":
        annotation, effect = '@proof("lazy")', "forbid"
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(
            test_policy.policy_dir(
                tmp_path / "bad", {"50-r.cedar": rule.format(annotation, effect)}
            )
        )
    assert [f.policy_id for f in exc.value.findings] == ["r"] and "@proof" in str(exc.value)
    # Positive control, built the same way: each obligation loads on a permit.
    for obligation in ("lazy", "lazy-or-eager", "lazy-or-unverified"):
        good = load_policy_dir(
            test_policy.policy_dir(
                tmp_path / obligation,
                {"50-r.cedar": rule.format(f'@proof("{obligation}")', "permit")},
            )
        )
        assert good.policy("r").proof == obligation  # type: ignore[union-attr]
