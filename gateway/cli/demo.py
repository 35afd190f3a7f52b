"""`ztgate demo`: start a local cluster and gateway, send one request per mode, print it all."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)
SPECIES = ("setosa", "versicolor", "virginica")


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="local cluster + gateway; one request in every mode")
    p.add_argument("--dir", type=Path, default=Path(".ztgate"), help="cluster directory")
    p.add_argument("--nodes", type=int, default=3)
    p.set_defaults(func=_demo)


def _wait_ready(url: str, deadline_s: float, proc: subprocess.Popen[bytes]) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 (loopback URL)
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _demo(args: argparse.Namespace) -> int:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from gateway.cluster import LocalCluster, free_port
    from gateway.verify import MODES

    cluster = LocalCluster(args.dir, args.nodes, gateway_port=free_port(), admin_port=free_port())
    print(f"starting {args.nodes} Triton nodes under {cluster.root} ...")
    t0 = time.monotonic()
    table = cluster.start()
    print(f"nodes ready in {time.monotonic() - t0:.1f}s:")
    for n in table:
        print(f"  {n['name']}  {n['address']}  {n['region']}/{n['provider']}")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cluster.config_path)],
        start_new_session=True,
    )
    try:
        admin = f"http://127.0.0.1:{cluster.admin_port}/v2/health/ready"
        if not _wait_ready(admin, 30, gateway):
            print("ztgate: the gateway did not become ready", file=sys.stderr)
            return 1
        print(f"gateway ready on https://127.0.0.1:{cluster.gateway_port} (mTLS)\n")
        pki = cluster.root / "pki"
        client = httpclient.InferenceServerClient(
            f"127.0.0.1:{cluster.gateway_port}",
            ssl=True,
            ssl_options={
                "ca_certs": str(pki / "root" / "ca.crt"),
                "certfile": str(pki / "clients" / "demo" / "client.crt"),
                "keyfile": str(pki / "clients" / "demo" / "client.key"),
            },
            network_timeout=30.0,
        )
        failures = 0
        for mode in MODES:
            inp = httpclient.InferInput("input", list(IRIS.shape), "FP32")
            inp.set_data_from_numpy(IRIS, binary_data=True)
            start = time.monotonic()
            try:
                result = client.infer("iris", [inp], parameters={"ztgate.verification": mode})
            except InferenceServerException as exc:
                print(f"[{mode:9}] not served: {exc.message()}")
                failures += mode == "none"
                continue
            ms = (time.monotonic() - start) * 1000
            probs = result.as_numpy("probabilities")
            params = result.get_response().get("parameters", {})
            names = [SPECIES[i] for i in probs.argmax(axis=1)]
            print(
                f"[{mode:9}] {names}  node={params.get('ztgate.nodes')}  "
                f"status={params.get('ztgate.verification_status')}  {ms:.1f} ms"
            )
            print(f"            probabilities={np.round(probs, 4).tolist()}")
            print(f"            parameters={json.dumps(params, sort_keys=True)}")
        client.close()
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
