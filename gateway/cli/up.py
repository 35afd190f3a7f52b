"""`ztgate up`: a local cluster (dev PKI, N Triton nodes) with the gateway in front."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from gateway.cli import UsageError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local cluster: dev PKI, Triton nodes, gateway")
    p.add_argument("--dir", type=Path, default=Path(".ztgate"), help="cluster directory")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (1-5)")
    p.add_argument("--port", type=int, default=8443, help="gateway mTLS port")
    p.add_argument("--admin-port", type=int, default=8081, help="gateway admin port")
    p.add_argument("--no-gateway", action="store_true", help="start only the nodes")
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from gateway.cluster import LocalCluster
    from gateway.config import ConfigError, load_config
    from gateway.node.triton import NodeStartError

    try:
        cluster = LocalCluster(
            args.dir, args.nodes, gateway_port=args.port, admin_port=args.admin_port
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        table = cluster.start()
    except NodeStartError as exc:
        print(f"ztgate: a node failed to start: {exc}")
        return 1
    try:
        root = cluster.root
        print("nodes (gRPC, mutual TLS; callers must hold the site's gateway certificate):")
        for n in table:
            print(
                f"  {n['name']:4} {n['address']:22} {n['region']:11} {n['provider']:7} "
                f"pin {n['dns_name']}"
            )
        print(f"gateway config: {cluster.config_path}")
        if args.no_gateway:
            import threading

            print("nodes are up; Ctrl-C stops them")
            threading.Event().wait()
            return 0
        demo = root / "pki" / "clients" / "demo"
        print(f"gateway: https://127.0.0.1:{args.port}  (admin http://127.0.0.1:{args.admin_port})")
        print(
            f"  curl --cacert {root}/pki/root/ca.crt --cert {demo}/client.crt "
            f"--key {demo}/client.key https://127.0.0.1:{args.port}/v2/models/iris"
        )
        from gateway import runtime

        try:
            runtime.run(load_config(cluster.config_path))
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0
