"""`ztgate up`: a local cluster (dev PKI, N Triton nodes) with the gateway in front."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from gateway.cli import Progress, UsageError, path_option

if TYPE_CHECKING:
    from gateway.cluster import LocalCluster

log = logging.getLogger(__name__)


def cluster_dir_option(p: Any) -> None:
    """`--cluster-dir` (old name `--dir`) of `up` and `demo`."""
    path_option(
        p, "--cluster-dir", "--dir", dest="dir", type=Path, default=Path(".ztgate"),
        metavar="DIR", help="cluster directory: its PKI, registry, nodes and gateway.toml",
    )  # fmt: skip


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local cluster: dev PKI, Triton nodes, gateway")
    cluster_dir_option(p)
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (1-5)")
    p.add_argument("--port", type=int, default=8443, help="gateway mTLS port")
    p.add_argument("--admin-port", type=int, default=8081, help="gateway admin port")
    p.add_argument("--no-gateway", action="store_true", help="start only the nodes")
    p.set_defaults(func=_up)


def _stop_on_signals(cluster: LocalCluster) -> None:
    """SIGTERM and SIGHUP stop `up` in order, as Ctrl-C (KeyboardInterrupt) does.

    Python's default for either is to die on the spot, without the `finally` that stops the
    nodes and parties. While the gateway serves, uvicorn holds SIGINT and SIGTERM itself:
    it drains, runs the lifespan shutdown (verifier pool, MPC sessions), puts these
    handlers back and raises the signal again, which lands here.
    """

    def on_term(signum: int, _frame: FrameType | None) -> None:
        cluster.halt()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        # As SIGTERM, through whoever holds SIGTERM now, so that the gateway drains too.
        signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    # SIGINT keeps Python's own handler: asyncio.Runner (under uvloop.run) looks for it.


def _up(args: argparse.Namespace) -> int:
    from gateway.cluster import LocalCluster
    from gateway.config import ConfigError, load_config
    from gateway.node.triton import NodeStartError

    try:
        cluster = LocalCluster(
            args.dir,
            args.nodes,
            gateway_port=args.port,
            admin_port=args.admin_port,
            progress=Progress,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    # Before the first child exists: a signal from here on ends in cluster.stop().
    _stop_on_signals(cluster)
    try:
        try:
            table = cluster.start()
        except NodeStartError as exc:
            print(f"ztgate: a node failed to start: {exc}", file=sys.stderr)
            return 1
        root = cluster.root
        print("nodes (gRPC, mutual TLS; callers must hold the site's gateway certificate):")
        for n in table:
            print(
                f"  {n['name']:4} {n['address']:22} {n['region']:11} {n['provider']:7} "
                f"pin {n['dns_name']}"
            )
        print(f"gateway config: {cluster.config_path}")
        # The copy made at the cluster's first start: edits to ./policies do not reach it.
        print(f"policy: {root / 'policies'} (watched: edit it there; dev mode, unsigned)")
        if args.no_gateway:
            import threading

            print("nodes are up; Ctrl-C stops them", flush=True)
            threading.Event().wait()
            return 0
        demo = root / "pki" / "clients" / "demo"
        print(f"gateway: https://127.0.0.1:{args.port}  (admin http://127.0.0.1:{args.admin_port})")
        print(
            f"  curl --cacert {root}/pki/root/ca.crt --cert {demo}/client.crt "
            f"--key {demo}/client.key https://127.0.0.1:{args.port}/v2/models/iris",
            flush=True,
        )
        from gateway import runtime

        try:
            runtime.run(load_config(cluster.config_path))
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
    except KeyboardInterrupt as exc:
        log.info("%s: stopping the cluster", exc.args[0] if exc.args else "SIGINT")
    finally:
        # A second signal must not cut the stop short (that would orphan what is left);
        # SIGKILL still ends us, and then PR_SET_PDEATHSIG ends the children.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()
    return 0
