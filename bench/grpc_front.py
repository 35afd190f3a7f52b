"""The gRPC front against direct Triton gRPC and against the HTTP front, side by side.

Run: ``.venv/bin/python bench/grpc_front.py [--requests 2000] [--concurrency 8]``

One run, one gateway process (``python -m gateway serve``, configuration ``full`` of
``bench/gateway_overhead.py`` plus ``listen.grpc_port``), one node, iris batch 1:

* ``direct``    tritonclient.grpc to the node over mTLS: the baseline.
* ``gw-http``   tritonclient.http to the gateway's HTTP front (binary tensors, keep-alive).
* ``gw-grpc``   tritonclient.grpc to the gateway's gRPC front (raw tensors, channel kept).

Each sequentially and with C threads, one client (one connection) each. ``gw CPU ms`` is
the gateway process's CPU time (all threads) per request served, the figure the issue's
aim ("the gRPC front adds no more than the HTTP front") is about; latency is measured by
the clients, which share this machine's cores with the gateway and the node.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gateway_overhead import (
    MODEL,
    Call,
    Factory,
    Run,
    Setup,
    X,
    _sigterm,
    answers,
    cluster_env,
    direct_client,
    gateway_process,
    gateway_tritonclient,
    measure,
    report,
    variant_config,
)

from gateway.ports import free_port


def _grpc_client(s: Setup, port: int) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(
        f"127.0.0.1:{port}",
        ssl=True,
        root_certificates=str(s.client_ca),
        private_key=str(s.client_key),
        certificate_chain=str(s.client_cert),
        channel_args=[("grpc.use_local_subchannel_pool", 1)],  # a connection per client
    )


def _grpc_input() -> Any:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return inp


def gateway_grpc(s: Setup, port: int) -> tuple[Call, Call]:
    import tritonclient.grpc as grpcclient

    client, inp = _grpc_client(s, port), _grpc_input()
    out = grpcclient.InferRequestedOutput("probabilities")

    def call() -> None:
        client.infer(MODEL, [inp], outputs=[out], client_timeout=10).as_numpy("probabilities")

    return call, client.close


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    ap.add_argument("--concurrency", type=int, default=8, help="threads, one client each")
    ap.add_argument("--dir", type=Path, help="cluster directory (default: a temp dir)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load = os.getloadavg()
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ztgate-bench-"))
        )
        try:
            cluster = stack.enter_context(cluster_env(root, 1))
            grpc_port = free_port()
            full = variant_config(cluster, "full", None).read_text()
            config = cluster.root / "gateway-grpc.toml"
            config.write_text(
                full.replace("\n[listen]\n", f"\n[listen]\ngrpc_port = {grpc_port}\n")
            )
            log_path = cluster.root / "gateway-grpc.log"
            gateway = stack.enter_context(gateway_process(cluster, config, log_path))
            setup = _setup(cluster, gateway.pid)
            variants: dict[str, Factory] = {
                "direct": functools.partial(direct_client, setup),
                "gw-http": functools.partial(gateway_tritonclient, setup),
                "gw-grpc": functools.partial(gateway_grpc, setup, grpc_port),
            }
            _agree(setup, grpc_port)  # the three answer alike before anything is timed
            for mode in ("seq", f"c={args.concurrency}"):
                for name, factory in variants.items():
                    runs.append(measure(name, mode, factory, setup, args))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the gateway and nodes", file=sys.stderr)
            return 130
    cores = os.cpu_count() or 0
    print(
        f"\nmachine: {cores} cores ({platform.machine()}), Python {platform.python_version()}; "
        f"load average before the run: {load[0]:.2f}"
    )
    print(
        f"model:   {MODEL}, batch 1, FP32 [1,4], mode none, receipts on; {args.requests} "
        f"requests per run after {args.warmup} warm-up"
    )
    report([r.summary() for r in runs], args.concurrency)
    return 0


def _agree(setup: Setup, grpc_port: int) -> None:
    got = answers(setup)  # direct and the HTTP front
    client = _grpc_client(setup, grpc_port)
    try:
        via_grpc = client.infer(MODEL, [_grpc_input()]).as_numpy("probabilities").ravel()
    finally:
        client.close()
    for name, values in got.items():
        if not np.allclose(values, via_grpc, atol=1e-6):
            raise RuntimeError(f"the gRPC front and {name} disagree: {via_grpc} vs {values}")


def _setup(cluster: object, pid: int) -> Setup:
    import tomllib

    root: Path = cluster.root  # type: ignore[attr-defined]
    cfg = tomllib.loads((root / "gateway-grpc.toml").read_text())
    node, pki = cfg["nodes"][0], root / "pki"
    return Setup(
        root=root,
        gateway_port=cluster.gateway_port,  # type: ignore[attr-defined]
        admin_port=cluster.admin_port,  # type: ignore[attr-defined]
        node_address=node["address"],
        node_dns_name=node["dns_name"],
        node_ca=root / cfg["tls"]["node_ca"],
        node_client_cert=root / cfg["tls"]["node_client_cert"],
        node_client_key=root / cfg["tls"]["node_client_key"],
        client_ca=pki / "root" / "ca.crt",
        client_cert=pki / "clients" / "bench" / "client.crt",
        client_key=pki / "clients" / "bench" / "client.key",
        gateway_pid=pid,
    )


if __name__ == "__main__":
    sys.exit(main())
