"""`ztgate demo`: start a local cluster and gateway, send one request per mode and one
generative stream, print it all."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.cli.up import cluster_dir_option
from gateway.ports import wait_ready as _wait_ready

IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)
RISK = np.array([[0.3, 1.2, -0.5, 0.8, 0.0, 1.5]], np.float32)
SPECIES = ("setosa", "versicolor", "virginica")
# One request per mode, each by a caller the shipped policies allow it for
# (policies/identities.json): apps may use none/redundant on public models, analysts any
# mode, and only cleared staff may call the restricted risk model, under mpc, with a purpose.
DEMO_REQUESTS: tuple[tuple[str, str, str, npt.NDArray[np.float32], dict[str, str]], ...] = (
    ("none", "demo", "iris", IRIS, {}),
    ("redundant", "demo", "iris", IRIS, {}),
    ("zk", "alice", "iris", IRIS[:1], {}),
    ("mpc", "carol", "risk", RISK, {"ztgate.purpose": "credit-decision"}),
)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="local cluster + gateway; one request in every mode")
    cluster_dir_option(p)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument(
        "--no-edge", action="store_true", help="skip the edge scene (a cut link, then reconciled)"
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from gateway.cluster import LocalCluster
    from gateway.pki import PKI
    from gateway.ports import free_port

    cluster = LocalCluster(args.dir, args.nodes, gateway_port=free_port(), admin_port=free_port())
    print(f"starting {args.nodes} Triton nodes under {cluster.root} ...")
    t0 = time.monotonic()
    table = cluster.start()
    print(f"nodes ready in {time.monotonic() - t0:.1f}s:")
    for n in table:
        print(f"  {n['name']}  {n['address']}  {n['region']}/{n['provider']}")
    gateway_log = cluster.root / "gateway.log"
    print(f"gateway log (decisions, warnings): {gateway_log}")
    with gateway_log.open("w") as sink:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cluster.config_path)],
            start_new_session=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        admin = f"http://127.0.0.1:{cluster.admin_port}/v2/health/ready"
        if not _wait_ready(admin, 30, gateway):
            print("ztgate: the gateway did not become ready", file=sys.stderr)
            return 1
        print(f"gateway ready on https://127.0.0.1:{cluster.gateway_port} (mTLS)\n")
        pki = cluster.root / "pki"
        failures = 0
        for mode, caller, model, x, params in DEMO_REQUESTS:
            pki_obj = PKI.open(pki)
            pki_obj.ensure("client", caller)
            client = httpclient.InferenceServerClient(
                f"127.0.0.1:{cluster.gateway_port}",
                ssl=True,
                ssl_options={
                    "ca_certs": str(pki / "root" / "ca.crt"),
                    "certfile": str(pki / "clients" / caller / "client.crt"),
                    "keyfile": str(pki / "clients" / caller / "client.key"),
                },
                network_timeout=180.0,
            )
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            start = time.monotonic()
            try:
                result = client.infer(
                    model, [inp], parameters={"ztgate.verification": mode, **params}
                )
            except InferenceServerException as exc:
                print(f"[{mode:9}] {caller}/{model}: not served: {exc.message()}")
                failures += 1
                continue
            finally:
                client.close()
            ms = (time.monotonic() - start) * 1000
            out = result.get_response()["outputs"][0]["name"]
            y = result.as_numpy(out)
            p = result.get_response().get("parameters", {})
            shown = [SPECIES[i] for i in y.argmax(axis=1)] if model == "iris" else y.ravel()
            print(
                f"[{mode:9}] {caller}/{model} -> {shown}  nodes={p.get('ztgate.nodes')}  "
                f"{p.get('ztgate.verification_status')}  {ms:.0f} ms"
            )
            print(f"            receipt {p.get('ztgate.receipt_id')}")
            print(f"            {p.get('ztgate.receipt')}")
        from gateway.cli.demo_generate import generative_scene

        failures += generative_scene(pki, cluster.gateway_port)
        if not args.no_edge:
            from gateway.cli.demo_edge import edge_scene

            failures += edge_scene(cluster.root, cluster.config_path, PKI.open(pki).trust_domain)
        return 1 if failures else 0
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        try:
            gateway.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait(timeout=5)
        cluster.stop()
        print("\ncluster stopped")
