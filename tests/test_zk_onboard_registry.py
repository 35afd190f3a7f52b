"""zk for any registered model in one step (docs/zk.md, "Your own model for zk").

The walkthrough is followed step by step with the real CLI, real ezkl and two real
tritonservers: `prover`, built from the registry after onboarding (it serves `mlp-zk`
without anyone listing it), and `plain`, which serves `mlp` but no prover and has no
`models` list (so it claims every model). The gateway is the one `ztgate serve` builds,
with its zk mode set up by `runtime.add_proof_modes` from the registry alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.app import Gateway
from gateway.config import NodeConfig
from gateway.job import Job
from gateway.node.repository import build_repository
from gateway.pipeline import Asked, Caller, Decided, Incoming, body_of
from gateway.pki import PKI
from gateway.protocol.problems import NoHealthyNode
from gateway.protocol.tensors import InferRequest, Tensor
from gateway.registry import Registry
from gateway.runtime import add_proof_modes, build_gateway
from gateway.verify.zk import ZkVerification
from tests.conftest import one_off_node
from tests.gateway_harness import gateway_config
from tests.test_zk import NODE_ROW, as_node, node_inferences
from tests.test_zk_tuning import MLP_CAL, MLP_X, TOLERANCE, ort_run, relu_mlp

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class World:
    registry: Path
    model: Path
    prover: NodeConfig
    plain: NodeConfig
    base: Path


@pytest.fixture(scope="module")
def world(pki: PKI, triton_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from gateway.cli import main

    base = tmp_path_factory.mktemp("zk-walkthrough")
    model = relu_mlp(base / "mlp.onnx", seed=11)
    reg = base / "registry"
    # 1. Register the model as usual (mode none only).
    add = ["model", "add", str(model), "--name", "mlp", "--registry", str(reg)]
    assert main([*add, "--classification", "public"]) == 0
    assert Registry.open(reg).get("mlp").allowed_modes == ("none",)
    # 2. One step: onboard it by its registered name.
    cal = base / "cal.npy"
    np.save(cal, MLP_CAL)
    onboard = ["zk", "onboard", "mlp", "--registry", str(reg), "--calibration", str(cal)]
    assert main([*onboard, "--scales", "9", "--json"]) == 0
    # 3. Nodes built from the registry serve the prover beside the model.
    repo = base / "repo"
    build = ["node", "repository", "--registry", str(reg), "--out", str(repo)]
    assert main([*build, "--flavour", "python", "--json"]) == 0
    plain_repo = build_repository([Registry.open(reg).get("mlp")], base / "plain-repo")
    with (
        one_off_node(pki, triton_home, repo, "prover", base / "w1", provider="prov-z") as p,
        one_off_node(pki, triton_home, plain_repo, "plain", base / "w2", provider="prov-y") as q,
    ):
        yield World(reg, model, as_node(p), as_node(q), base)


@contextlib.asynccontextmanager
async def gateway(pki: PKI, w: World, name: str) -> AsyncIterator[Gateway]:
    """4. The gateway: nothing about zk in its config; it finds the onboarded model."""
    rows = [
        {f.name: getattr(n, f.name) for f in dataclasses.fields(n) if f.name in NODE_ROW}
        for n in (w.prover, w.plain)
    ]
    cfg = gateway_config(
        pki, w.registry, w.base / name, rows, receipts={"signing_key": None, "log_key": None}
    )
    assert not cfg.zk.artefacts
    gw = build_gateway(cfg)
    add_proof_modes(cfg, gw, [w.prover, w.plain])
    try:
        yield gw
    finally:
        zk = gw.verifiers.get("zk")
        if isinstance(zk, ZkVerification):
            zk.pool.close()
        await gw.router.close()
        await gw.store.close()


def job_for(pki: PKI, gw: Gateway, mode: str) -> Job:
    """alice asks for mlp in `mode`; the gateway's own policy stage decides."""
    alice = pki.ensure("client", "alice")
    scope = {"extensions": {"tls": {"client_cert_chain": [alice.cert.read_text()]}}}
    request = InferRequest(
        model="mlp",
        version=None,
        id=None,
        inputs=(Tensor("x", "FP32", tuple(MLP_X.shape), MLP_X),),
        parameters={"ztgate.verification": mode},
    )
    came = Incoming(scope=scope, headers={}, body=body_of(b""))
    caller = Caller.of(gw.resolver.resolve(scope))
    deadline = time.monotonic() + 120.0
    asked = Asked(came, caller, gw.latest("mlp"), request, MLP_X.nbytes, deadline, True)
    decision = gw.pipeline.policy(asked)
    assert mode in decision.modes
    return Decided(asked, decision, mode, deadline).job()


def test_onboarding_by_name_marks_the_entry_and_the_nodes_serve_the_prover(world: World) -> None:
    entry = Registry.open(world.registry).get("mlp")
    assert "zk" in entry.allowed_modes  # marked only once its artefacts exist
    record = json.loads((world.registry / "zk" / "mlp" / "1" / "zk.json").read_text())
    assert record["model_sha256"] == entry.sha256 and record["tuning"]["chosen"]
    assert (world.base / "repo" / "mlp-zk" / "1" / "pk.key").is_file()
    assert not (world.base / "plain-repo" / "mlp-zk").exists()


async def test_walkthrough_zk_answer_comes_from_the_node_that_can_prove(
    pki: PKI, world: World
) -> None:
    before = node_inferences(pki, world.prover, "mlp-zk")
    async with gateway(pki, world, "gw-zk") as gw:
        zk = gw.verifiers["zk"]
        assert isinstance(zk, ZkVerification)
        job = job_for(pki, gw, "zk")
        outcome = await zk.run(job, gw.router)
        assert outcome.status == "verified" and outcome.nodes == ("prover",)
        (out,) = outcome.outputs
        assert np.allclose(out.data, ort_run(world.model, MLP_X), atol=TOLERANCE)
        # The capability came from the nodes: `plain` (no `models` list: it claims every
        # model) was asked and said no; nobody listed `mlp-zk` anywhere.
        ready = await zk.capability.ready(gw.router.nodes.values(), "mlp-zk", "1", job.allowed)
        assert ready == {"prover"}
    assert node_inferences(pki, world.prover, "mlp-zk") == before + 1


async def test_prover_capability_only_narrows_what_policy_allows(pki: PKI, world: World) -> None:
    async with gateway(pki, world, "gw-narrow") as gw:
        zk = gw.verifiers["zk"]
        assert isinstance(zk, ZkVerification)
        allowed = job_for(pki, gw, "zk")
        # The decision excludes the only node that can prove: its capability does not
        # bring it back, and it is not even asked.
        excluded = dataclasses.replace(
            allowed, allowed=lambda n: allowed.allowed(n) and n.name != "prover"
        )
        asked = zk.capability.asked
        zk.capability.forget("prover")
        before = node_inferences(pki, world.prover, "mlp-zk")
        with pytest.raises(NoHealthyNode):
            await zk.run(excluded, gw.router)
        assert node_inferences(pki, world.prover, "mlp-zk") == before
        assert zk.capability.asked == asked + 1  # `plain` only
        # Control, built the same way: with the decision as made, the prover answers.
        outcome = await zk.run(allowed, gw.router)
        assert outcome.nodes == ("prover",)
        # Mode none: the prover capability plays no part; the decision alone picks.
        plain = job_for(pki, gw, "none")
        only_plain = dataclasses.replace(plain, allowed=lambda n: n.name == "plain")
        only_prover = dataclasses.replace(plain, allowed=lambda n: n.name == "prover")
        none = gw.verifiers["none"]
        assert (await none.run(only_plain, gw.router)).nodes == ("plain",)
        assert (await none.run(only_prover, gw.router)).nodes == ("prover",)


async def test_verifier_artefacts_are_a_private_read_only_copy_hashed_once(
    pki: PKI, world: World
) -> None:
    onboarded = world.registry / "zk" / "mlp" / "1"
    async with gateway(pki, world, "gw-sealed") as gw:
        zk = gw.verifiers["zk"]
        assert isinstance(zk, ZkVerification)
        (artefacts,) = zk.artefacts.values()
        assert artefacts.sealed and onboarded not in artefacts.vk.parents
        sealed_dir = artefacts.vk.parent
        assert stat.S_IMODE(sealed_dir.stat().st_mode) == 0o500
        for path in (artefacts.vk, artefacts.settings, artefacts.srs, artefacts.record_file):
            assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o400
        # What an answer carries for the receipt's evidence: paths and hashes known at load.
        material = artefacts.material()
        assert material["vk"] == (str(artefacts.vk), artefacts.record.vk_sha256)
        # Replacing the onboarded vk after load changes nothing the gateway uses ...
        original = (onboarded / "verifier" / "vk.key").read_bytes()
        (onboarded / "verifier" / "vk.key").write_bytes(b"not a vk")
        try:
            outcome = await zk.run(job_for(pki, gw, "zk"), gw.router)
            assert outcome.status == "verified"
            # ... while loading the tampered originals is refused (the positive control of
            # the hash check the copy passed).
            from zk.record import VerifierArtefacts, ZkError

            with pytest.raises(ZkError, match="vk"):
                VerifierArtefacts.from_dir(onboarded)
        finally:
            (onboarded / "verifier" / "vk.key").write_bytes(original)
    assert os.access(sealed_dir, os.R_OK)


def test_up_serves_onboarded_models_without_iris_and_keeps_an_edited_config(
    world: World, tmp_path: Path
) -> None:
    from gateway.cluster import LocalCluster

    # A cluster whose registry has no iris (`ztgate model add` without `model examples`).
    cluster = LocalCluster(world.base, 1)
    entries = Registry.open(world.registry).entries()
    repo = build_repository(entries, tmp_path / "repo")
    dirs = cluster.prepare_zk(repo, entries)
    assert dirs == [str(world.registry / "zk" / "mlp" / "1")]
    assert (repo / "mlp-zk" / "1" / "zk.json").is_file()
    # gateway.toml: rewritten while untouched, kept once the operator edits it.
    cluster = LocalCluster(tmp_path / "c", 1)
    cluster.root.mkdir()
    cluster.write_owned_config("first\n")
    cluster.write_owned_config("second\n")
    assert cluster.config_path.read_text() == "second\n"
    cluster.config_path.write_text("second\n# the operator's edit\n")
    cluster.write_owned_config("third\n")
    assert cluster.config_path.read_text() == "second\n# the operator's edit\n"
    assert (cluster.root / "gateway.up.toml").read_text() == "third\n"
    port = cluster.stable_port("n1.grpc")
    assert cluster.stable_port("n1.grpc") == port  # the same port across starts
