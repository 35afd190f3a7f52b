"""zk mode cost: raw ezkl vs the same proof through a Triton node and the gateway.

Run: ``.venv/bin/python bench/zk.py [--runs 3] [--artefacts DIR] [--dir DIR]``
Tuned circuits: ``.venv/bin/python bench/zk.py --tuning`` onboards iris and a fresh 6-16-4
ReLU MLP of the bench's own twice each, at ezkl's default decomposition (scales searched
only) and tuned (zk/tuning.py), and reports logrows, key sizes, prove and verify times.

Same model (iris), same artefacts and SRS for every row:

* ``raw``      in a fresh spawned process: ezkl gen_witness + prove, then ezkl.verify, the
               files on local disk; peak RSS of that process.
* ``node+gw``  the client's request over mTLS to an in-process gateway (zk verifier wired by
               hand, as tests/test_zk.py does), gRPC mTLS to a real tritonserver whose
               ``iris-zk`` python-backend model proves; the gateway checks the proof in its
               verifier pool and answers from the proof's instances.
* ``none``     the same request in mode ``none`` to the plain ``iris`` model on the same node.

The aim is that the gateway adds < 5% to the raw prove time. Artefacts are onboarded (dev
SRS) into a temp dir unless ``--artefacts`` names an onboarding output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import queue
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

X = np.array([[5.9, 3.0, 4.2, 1.5]], np.float32)
IRIS = ROOT / "gateway" / "examples" / "iris.onnx"


def _raw_child(artefacts: str, runs: int, out: Any, x: Any = None) -> None:
    os.environ["EZKL_REPO_PATH"] = str(Path(artefacts) / ".bench-ezkl")
    import ezkl

    from zk.record import VerifierArtefacts, load_record

    ez: Any = ezkl
    record = load_record(Path(artefacts))
    v = VerifierArtefacts.from_dir(Path(artefacts))
    node = Path(artefacts) / "node"
    prove_s, verify_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data, wit, proof = Path(tmp) / "in.json", Path(tmp) / "w.json", Path(tmp) / "p.json"
        row = X if x is None else np.asarray(x, np.float32)
        data.write_text(json.dumps({"input_data": [row.reshape(-1).tolist()]}))
        for _ in range(runs):
            t = time.perf_counter()
            ez.gen_witness(str(data), str(node / "network.ezkl"), str(wit), None, None)
            ez.prove(
                str(wit),
                str(node / "network.ezkl"),
                str(node / "pk.key"),
                str(proof),
                str(node / record.srs_file),
            )
            prove_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert ez.verify(str(proof), str(v.settings), str(v.vk), str(v.srs))
            verify_s.append(time.perf_counter() - t)
        proof_bytes = proof.stat().st_size
    out.put(
        {
            "prove_s": prove_s,
            "verify_s": verify_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "proof_bytes": proof_bytes,
        }
    )


def raw(artefacts: Path, runs: int, x: Any = None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_raw_child, args=(str(artefacts), runs, q, x))
    p.start()
    while True:
        try:
            got: dict[str, Any] = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"raw prove process exited with {p.exitcode}") from None
    p.join()
    return got


def through_gateway(artefacts: Path, root: Path, runs: int) -> dict[str, Any]:
    import httpx

    from gateway.app import Gateway
    from gateway.node.repository import build_repository
    from gateway.node.triton import NodeSpec, TritonProcess, children
    from gateway.pki import PKI
    from gateway.ports import free_port
    from gateway.registry import Registry, seed_examples
    from gateway.runtime import build_gateway
    from gateway.verify.zk import ZkVerification
    from tests.gateway_harness import client_context, gateway_config, running_gateway
    from zk.record import VerifierArtefacts
    from zk.repository import add_zk_model
    from zk.verifier import ZkVerifierPool

    pki = PKI.init(root / "pki", sites=["site-a"])
    registry = Registry.open(root / "registry")
    seed_examples(registry)
    iris = registry.get("iris")
    repo = build_repository([iris], root / "repository")
    add_zk_model(repo, "iris", artefacts, entry=iris)
    issued = pki.ensure("node", "n1")
    spec = NodeSpec(
        "n1",
        "eu-west",
        "prov-a",
        free_port(),
        free_port(),
        repo,
        issued.cert,
        issued.key,
        pki.gateway_ca_bundle("site-a"),
        root / "node",
    )
    verifier = VerifierArtefacts.from_dir(artefacts)
    result: dict[str, Any] = {}
    with TritonProcess(spec) as proc:
        proc.start(deadline_s=120)
        node = {
            "name": "n1",
            "address": spec.grpc_address,
            "dns_name": pki.node_dns_name("n1"),
            "spiffe_id": issued.spiffe_id,
            "region": "eu-west",
            "provider": "prov-a",
        }
        cfg = gateway_config(
            pki,
            registry.root,
            root / "gw",
            [node],
            routing={"deadline_s": 300.0, "max_deadline_s": 300.0, "per_try_timeout_s": 5.0},
        )
        base = build_gateway(cfg)
        pool = ZkVerifierPool(workers=1)
        zk = ZkVerification({verifier.record.model_sha256: verifier}, pool)
        gw = dataclasses.replace(base, verifiers={**Gateway.default_verifiers(cfg), "zk": zk})
        alice = pki.ensure("client", "alice")
        ctx = client_context(pki, alice.cert, alice.key)

        def body(mode: str) -> dict[str, Any]:
            return {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": X[0]}],
                "parameters": {"ztgate.verification": mode},
            }

        try:
            with running_gateway(cfg, gw) as g, httpx.Client(verify=ctx, timeout=600) as c:
                url = f"{g.base}/v2/models/iris/infer"

                def call(mode: str) -> float:
                    payload = body(mode)
                    payload["inputs"][0]["data"] = X[0].tolist()
                    t = time.perf_counter()
                    r = c.post(url, json=payload)
                    elapsed = time.perf_counter() - t
                    assert r.status_code == 200, r.text
                    return elapsed

                for _ in range(5):
                    call("none")  # warm both paths
                none_s = [call("none") for _ in range(max(runs, 20))]
                zk_s = [call("zk") for _ in range(runs)]
                # The gateway's verification alone, in its worker pool, on a fresh proof.
                pool_s = _pool_verify_s(pool, artefacts, verifier)
                stubs = children(proc.pid or 0, "iris-zk")
                hwm = 0.0
                for pid in stubs:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm, int(line.split()[1]) / 1024)
                # Triton's own count of time spent in iris-zk's execute (the prove): what is
                # left of the end-to-end time is the gateway, the transport and verification.
                with httpx.Client(timeout=10) as h:
                    stats = h.get(f"{proc.http_base}/v2/models/iris-zk/stats").json()
                infer = stats["model_stats"][0]["inference_stats"]
                count = infer["success"]["count"]
                node_s = {
                    k: infer[k]["ns"] / count / 1e9
                    for k in ("queue", "compute_input", "compute_infer", "compute_output")
                }
                result = {
                    "none_s": none_s,
                    "zk_s": zk_s,
                    "node_peak_rss_mb": hwm,
                    "node_mean_s": node_s,
                    "verify_in_pool_s": pool_s,
                }
        finally:
            pool.close()
    return result


def _pool_verify_s(pool: Any, artefacts: Path, verifier: Any) -> list[float]:
    import asyncio

    from zk.prover import Prover

    prover = Prover(artefacts / "node", workdir=artefacts.parent / "bench-prove")
    _, proof = prover.prove(X)

    async def go() -> list[float]:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            result = await pool.verify(proof, X, verifier)
            times.append(time.perf_counter() - t)
            assert result.success, result.detail
        return times

    return asyncio.run(go())


def relu_mlp(path: Path) -> Path:
    """The bench's own model: a fresh 6->16->4 ReLU MLP (random weights, fixed seed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2026)
    weights = {
        "W1": rng.normal(size=(6, 16)).astype(np.float32) * 0.5,
        "b1": rng.normal(size=16).astype(np.float32) * 0.1,
        "W2": rng.normal(size=(16, 4)).astype(np.float32) * 0.5,
        "b2": rng.normal(size=4).astype(np.float32) * 0.1,
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "W2", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tuned_vs_default(work: Path, runs: int) -> list[dict[str, Any]]:
    """Per model: onboarding at ezkl's defaults (scales only) and tuned (zk/tuning.py)."""
    from sklearn.datasets import load_iris

    from zk.onboard import onboard

    rng = np.random.default_rng(0)
    models = [
        ("iris (shipped)", IRIS, load_iris().data.astype(np.float32)[::5], X),
        (
            "relu-mlp 6-16-4 (bench's own)",
            relu_mlp(work / "mlp.onnx"),
            rng.normal(size=(32, 6)).astype(np.float32),
            rng.normal(size=(1, 6)).astype(np.float32),
        ),
    ]
    rows = []
    for label, model, cal, x in models:
        for tune in (False, True):
            out = work / f"{model.stem}-{'tuned' if tune else 'default'}"
            t = time.perf_counter()
            result = onboard(model, model.stem, cal, out, tune=tune)
            onboard_s = time.perf_counter() - t
            r = raw(out.absolute(), runs, x)
            rows.append(
                {
                    "model": label,
                    "settings": "tuned" if tune else "default",
                    "logrows": result.record.logrows,
                    "chosen": result.record.tuning.get("chosen", {}),
                    "candidates": len(result.tried),
                    "onboard_s": onboard_s,
                    "pk_bytes": result.files["node/pk.key"],
                    "vk_bytes": result.files["verifier/vk.key"],
                    "prove_s": statistics.median(r["prove_s"]),
                    "verify_s": statistics.median(r["verify_s"]),
                    "max_abs_error": result.record.quantisation["max_abs_error"],
                }
            )
    return rows


def print_tuning(rows: list[dict[str, Any]]) -> None:
    print(
        "| model | settings | logrows | base^legs, head | onboard | pk | vk | prove | verify "
        "| max err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["chosen"]
        how = f"{c['decomp_base']}^{c['decomp_legs']}, {c['head']}" if c else "16384^2, as-is"
        print(
            f"| {r['model']} | {r['settings']} | {r['logrows']} | {how} | {r['onboard_s']:.1f} s "
            f"| {r['pk_bytes'] / 1e6:.1f} MB | {r['vk_bytes'] / 1e3:.1f} KB "
            f"| {r['prove_s']:.3f} s | {r['verify_s'] * 1000:.0f} ms | {r['max_abs_error']:.4f} |"
        )
    by = {(r["model"], r["settings"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        d, t = by[(model, "default")], by[(model, "tuned")]
        print(f"{model}: tuned prove / default prove = {t['prove_s'] / d['prove_s']:.3f}")


LAZY_POLICY = """
@id("lazy-public-none")
@proof("lazy")
permit (principal, action == Ztgate::Action::"infer", resource)
when {
  principal.name == "demo" && resource.classification == "public" && context.mode == "none"
};
"""


def lazy_vs_none(root: Path, runs: int) -> dict[str, list[float]]:
    """Answer latency of iris (tuned circuit) in none, lazy (@proof("lazy"): none answer,
    proof in the background by the other provider's node) and eager zk, side by side:
    one gateway, two real nodes (prov-a, prov-b) that both serve iris and iris-zk."""
    import contextlib

    import httpx
    from sklearn.datasets import load_iris

    from gateway.node.repository import build_repository
    from gateway.node.triton import NodeSpec, TritonProcess
    from gateway.pki import PKI
    from gateway.ports import free_port
    from gateway.registry import Registry, seed_examples
    from gateway.runtime import add_proof_modes, build_gateway
    from tests.gateway_harness import client_context, gateway_config, running_gateway
    from zk.onboard import onboard
    from zk.repository import add_onboarded, onboarded_dir

    pki = PKI.init(root / "pki", sites=["site-a"])
    registry = Registry.open(root / "registry")
    seed_examples(registry)
    iris = registry.get("iris")
    onboard(
        IRIS, "iris", load_iris().data.astype(np.float32)[::5],
        onboarded_dir(registry.root, "iris", iris.version), version=iris.version,
    )  # fmt: skip
    repo = build_repository([iris], root / "repository")
    add_onboarded(repo, registry.root, [iris])
    rows = []
    with contextlib.ExitStack() as stack:
        for name, provider in (("n1", "prov-a"), ("n2", "prov-b")):
            issued = pki.ensure("node", name)
            spec = NodeSpec(
                name, "eu-west", provider, free_port(), free_port(), repo, issued.cert,
                issued.key, pki.gateway_ca_bundle("site-a"), root / name,
            )  # fmt: skip
            proc = stack.enter_context(TritonProcess(spec))
            proc.start(deadline_s=120)
            rows.append(
                {
                    "name": name, "address": spec.grpc_address, "region": "eu-west",
                    "provider": provider, "dns_name": pki.node_dns_name(name),
                    "spiffe_id": issued.spiffe_id,
                }
            )  # fmt: skip
        routing = {"deadline_s": 300.0, "max_deadline_s": 300.0}
        cfg = gateway_config(pki, registry.root, root / "gw", rows, routing=routing)
        assert cfg.policy.dir is not None
        (cfg.policy.dir / "60-lazy.cedar").write_text(LAZY_POLICY)
        gw = build_gateway(cfg)
        add_proof_modes(cfg, gw, list(cfg.nodes))
        alice = pki.ensure("client", "alice")
        demo = pki.ensure("client", "demo")
        out: dict[str, list[float]] = {"none": [], "lazy": [], "zk": []}
        with (
            running_gateway(cfg, gw) as g,
            httpx.Client(verify=client_context(pki, alice.cert, alice.key), timeout=600) as a,
            httpx.Client(verify=client_context(pki, demo.cert, demo.key), timeout=600) as d,
        ):

            def call(c: httpx.Client, mode: str) -> tuple[float, str]:
                body = {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "FP32",
                            "shape": [1, 4],
                            "data": X[0].tolist(),
                        }
                    ],
                    "parameters": {"ztgate.verification": mode},
                }
                t = time.perf_counter()
                r = c.post(f"{g.base}/v2/models/iris/infer", json=body)
                elapsed = time.perf_counter() - t
                assert r.status_code == 200, r.text
                return elapsed, str(r.json()["parameters"]["ztgate.receipt_id"])

            def settled(c: httpx.Client, rid: str) -> None:
                end = time.monotonic() + 120
                while time.monotonic() < end:
                    doc = c.get(f"{g.base}/v2/receipts/{rid}").json()
                    if doc.get("final_status") not in ("pending",):
                        return
                    time.sleep(0.05)

            # The obligation binds demo's answers only: alice's `none` is the plain path.
            # Paired: each lazy answer is measured right after a plain one, both after the
            # previous proof has its verdict and the same pause, so neither runs beside a
            # proof and both see the same machine.
            for i in range(3 + max(runs, 10)):
                time.sleep(0.2)
                plain = call(a, "none")[0]
                time.sleep(0.2)
                elapsed, rid = call(d, "none")
                if i >= 3:  # the first ones warm both clients' decisions and the stores
                    out["none"].append(plain)
                    out["lazy"].append(elapsed)
                settled(d, rid)
            out["zk"] = [call(a, "zk")[0] for _ in range(runs)]
        zk = gw.verifiers.get("zk")
        if zk is not None:
            with contextlib.suppress(Exception):
                zk.pool.close()  # type: ignore[attr-defined]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--artefacts", type=Path, default=None)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--tuning", action="store_true", help="only the tuned-vs-default circuit table"
    )
    parser.add_argument(
        "--lazy", action="store_true", help="only lazy vs none vs eager zk answer latency"
    )
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="ztgate-zk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.lazy:
        lat = lazy_vs_none(work, args.runs)
        med = {k: statistics.median(v) for k, v in lat.items()}
        print("| mode | answer latency, median | runs |\n|---|---|---|")
        for k in ("none", "lazy", "zk"):
            print(f"| {k} | {med[k] * 1000:.1f} ms | {len(lat[k])} |")
        print(f"lazy / none = {med['lazy'] / med['none']:.2f} (aim <= 1.2)")
        if args.json:
            args.json.write_text(json.dumps(lat, indent=2))
        return 0
    if args.tuning:
        table = tuned_vs_default(work, args.runs)
        print_tuning(table)
        if args.json:
            args.json.write_text(json.dumps(table, indent=2))
        return 0
    onboard_s = None
    artefacts = args.artefacts
    if artefacts is None:
        from sklearn.datasets import load_iris  # the train extra; iris ships with it

        from zk.onboard import onboard

        cal = load_iris().data.astype(np.float32)[::5]
        t = time.perf_counter()
        onboard(IRIS, "iris", cal, work / "artefacts")
        onboard_s = time.perf_counter() - t
        artefacts = work / "artefacts"
    artefacts = artefacts.absolute()

    r = raw(artefacts, args.runs)
    print(f"raw: prove {r['prove_s']} s, verify {r['verify_s']} s, peak {r['peak_rss_mb']:.0f} MB")
    g = through_gateway(artefacts, work, args.runs)
    prove = statistics.median(r["prove_s"])
    verify = statistics.median(r["verify_s"])
    zk = statistics.median(g["zk_s"])
    node = g["node_mean_s"]
    added = statistics.mean(g["zk_s"]) - sum(node.values())
    node_rest = node["queue"] + node["compute_input"] + node["compute_output"]
    pool_verify = statistics.median(g["verify_in_pool_s"])
    none = statistics.median(g["none_s"])
    sizes = {
        p.relative_to(artefacts).as_posix(): p.stat().st_size
        for p in sorted(artefacts.rglob("*"))
        if p.is_file() and ".bench-ezkl" not in p.parts and not p.name.startswith(".")
    }
    print(f"# zk bench: iris, {platform.machine()}, {os.cpu_count()} cores, runs={args.runs}")
    if onboard_s is not None:
        print(f"onboarding (calibrate, compile, dev SRS, setup): {onboard_s:8.2f} s")
    rows = [
        ("raw prove (witness + prove), median", f"{prove:.3f} s"),
        ("raw verify, median", f"{verify * 1000:.1f} ms"),
        ("raw peak RSS (prove process)", f"{r['peak_rss_mb']:.0f} MB"),
        ("node iris-zk stub peak RSS", f"{g['node_peak_rss_mb']:.0f} MB"),
        ("end-to-end zk via node+gateway, median", f"{zk:.3f} s"),
        ("end-to-end none, median", f"{none * 1000:.1f} ms"),
        ("node: Triton compute_infer (the prove), mean", f"{node['compute_infer']:.3f} s"),
        ("node: queue + input + output, mean", f"{node_rest * 1000:.1f} ms"),
        ("gateway verify in pool, median", f"{pool_verify * 1000:.1f} ms"),
        ("zk e2e / raw prove (medians, noisy)", f"{zk / prove:.3f}"),
        ("e2e minus node time: gateway+transport", f"{added * 1000:.0f} ms"),
        ("  ... as a share of raw prove", f"{added / prove:+.2%}"),
        ("proof size", f"{r['proof_bytes']:,} B"),
    ]
    rows += [(f"artefact {name}", f"{size:,} B") for name, size in sizes.items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>16}")
    print(
        f"raw prove runs: {[round(s, 2) for s in r['prove_s']]}; zk e2e runs: "
        f"{[round(s, 2) for s in g['zk_s']]}"
    )
    if args.json:
        args.json.write_text(json.dumps({"raw": r, "gateway": g, "sizes": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
