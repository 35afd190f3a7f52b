"""A local cluster on loopback: dev PKI, model registry, N real Triton nodes, gateway config.

What `ztgate up` and `make demo` run. Everything lives under one directory (default
`.ztgate/`), made on first use and reused after: the PKI is not re-issued, the registry
keeps its models, and each node's repository is rebuilt from the registry.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gateway.node.repository import build_repository
from gateway.node.triton import (
    NodeSpec,
    NodeSupervisor,
    TritonProcess,
    spawn_tied,
    triton_home,
)
from gateway.pki import DEFAULT_SITE, PKI
from gateway.ports import free_port
from gateway.registry import ModelEntry, Registry, seed_examples, seed_generative_examples

if TYPE_CHECKING:
    from gateway.cli import Progress

log = logging.getLogger(__name__)

# The policies shipped with the source tree, copied into a new cluster's directory.
SHIPPED_POLICIES = Path(__file__).resolve().parent.parent / "policies"

# Calibration ranges of the shipped examples `ztgate up` onboards for zk by itself
# (per input feature: low, high; iris's from its dataset).
SHIPPED_CALIBRATION: dict[str, tuple[list[float], list[float]]] = {
    "iris": ([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5]),
}

LAYOUT: tuple[tuple[str, str, str], ...] = (
    ("n1", "eu-west", "prov-a"),
    ("n2", "eu-central", "prov-b"),
    ("n3", "us-east", "prov-c"),
    ("n4", "eu-west", "prov-d"),
    ("n5", "us-west", "prov-e"),
)


def _free(port: int) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


@dataclass
class LocalCluster:
    root: Path
    nodes: int = 3
    site: str = DEFAULT_SITE
    gateway_port: int = 8443
    admin_port: int = 8081
    supervisors: list[NodeSupervisor] = field(default_factory=list)
    parties: list[subprocess.Popen[str]] = field(default_factory=list)
    with_zk: bool = True
    with_mpc: bool = True
    # `ztgate up`: progress lines of each long step (`gateway.cli.Progress`), by step name.
    progress: Callable[[str], Progress] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= len(LAYOUT):
            raise ValueError(f"nodes must be between 1 and {len(LAYOUT)}")
        self.root = self.root.resolve()

    @property
    def config_path(self) -> Path:
        return self.root / "gateway.toml"

    def prepare(self) -> PKI:
        pki = PKI.init(self.root / "pki", sites=[self.site])
        policies = self.root / "policies"
        if not policies.is_dir():
            if not SHIPPED_POLICIES.is_dir():
                raise FileNotFoundError(f"shipped policies not found at {SHIPPED_POLICIES}")
            shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
        registry = Registry.open(self.root / "registry")
        if not registry.entries():
            seed_examples(registry)
        # The generative example (tinygpt), also into clusters made before it shipped.
        seed_generative_examples(registry)
        pki.ensure("client", "demo")
        return pki

    def start(self) -> list[dict[str, str]]:
        """Start the nodes (in parallel) and write the gateway config; returns the node table."""
        pki = self.prepare()
        entries = Registry.open(self.root / "registry").entries()
        repo = build_repository(entries, self.root / "nodes" / "repository")
        zk_dirs = self.prepare_zk(repo, entries) if self.with_zk else []
        home = triton_home(self.root / "triton-home")
        table = []
        for name, region, provider in LAYOUT[: self.nodes]:
            issued = pki.ensure("node", name)
            spec = NodeSpec(
                name=name,
                region=region,
                provider=provider,
                grpc_port=self.stable_port(f"{name}.grpc"),
                http_port=self.stable_port(f"{name}.http"),
                repository=repo,
                cert=issued.cert,
                key=issued.key,
                client_ca=pki.gateway_ca_bundle(self.site),
                workdir=self.root / "nodes" / name,
                labels={"region": region, "provider": provider},
            )
            self.supervisors.append(NodeSupervisor(TritonProcess(spec, home)))
            table.append(
                {
                    "name": name,
                    "address": spec.grpc_address,
                    "dns_name": pki.node_dns_name(name),
                    "spiffe_id": issued.spiffe_id,
                    "region": region,
                    "provider": provider,
                }
            )
        errors: list[BaseException] = []

        def start(sup: NodeSupervisor) -> None:
            shown = None if self.progress is None else self.progress(f"node {sup.name}")
            sup.process.progress = shown
            try:
                took = sup.start()  # logs "ready in" itself when nobody shows progress
                if shown is not None:
                    shown.done("ready", took)
            except Exception as exc:  # reported below, after every start has been tried
                errors.append(exc)
            finally:
                sup.process.progress = None  # restarts are the supervisor's, logged

        threads = [threading.Thread(target=start, args=(s,)) for s in self.supervisors]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        if errors:
            self.stop()
            raise errors[0]
        if self.with_mpc:
            try:
                for node in table:
                    node["mpc_address"] = self.start_party(node["name"])
            except RuntimeError:
                self.stop()
                raise
        self.write_config(pki, table, zk_dirs)
        return table

    def prepare_zk(self, repo: Path, entries: list[ModelEntry]) -> list[str]:
        """Serve `<name>-zk` for every registered model onboarded for zk (`ztgate zk onboard
        NAME` puts its artefacts beside the registry); returns their directories.

        A shipped example that allows zk and has a shipped calibration range (iris) is
        onboarded here once, so the demo has a zk model; any other model that allows zk
        but has no artefacts is only reported (onboarding needs its calibration data).
        """
        from zk.onboard import onboard
        from zk.repository import add_onboarded, onboarded, onboarded_dir

        registry_root = self.root / "registry"
        have = {e.name for e, _ in onboarded(registry_root, entries)}
        for entry in entries:
            if "zk" not in entry.allowed_modes or entry.name in have:
                continue
            bounds = SHIPPED_CALIBRATION.get(entry.name)
            if bounds is None or entry.generative is not None:
                log.warning(
                    "model %s allows zk but is not onboarded; run `ztgate zk onboard %s "
                    "--calibration DATA` to serve its prover",
                    entry.name,
                    entry.name,
                )
                continue
            out = onboarded_dir(registry_root, entry.name, entry.version)
            if out.exists():
                shutil.rmtree(out)  # a half-written onboarding, or one for other bytes
            log.info("onboarding %s for zk proofs (one time)", entry.name)
            rng = np.random.default_rng(0)
            low, high = (np.asarray(b, np.float32) for b in bounds)
            calibration = low + rng.random((32, low.size), dtype=np.float32) * (high - low)
            shown = None if self.progress is None else self.progress(f"zk onboard {entry.name}")
            try:
                onboard(
                    entry.path, entry.name, calibration.astype(np.float32), out,
                    version=entry.version, mode="dev", progress=shown,
                )  # fmt: skip
            except Exception as exc:  # zk is optional for the cluster: say so, serve the rest
                log.warning("could not onboard %s for zk: %s", entry.name, exc)
                continue
            if shown is not None:
                shown.done()
        add_onboarded(repo, registry_root, entries)
        return [str(d) for _, d in onboarded(registry_root, entries)]

    def start_party(self, name: str, deadline_s: float = 60.0) -> str:
        """This node's MPC party worker (same node identity); returns its address."""
        log_path = self.root / "nodes" / name / "mpc-party.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mpc.party", "--name", name, "--pki", str(self.root / "pki"),
            "--site", self.site, "--listen", f"127.0.0.1:{self.stable_port(f'{name}.mpc')}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log_path.open("w") as err:
            # Tied to us: in our process group, and killed if we die without stopping it.
            proc = spawn_tied(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.parties.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], deadline_s)
        line = proc.stdout.readline() if ready else ""
        if "LISTENING" not in line:
            proc.kill()
            raise RuntimeError(f"MPC party {name} did not start: {log_path.read_text()[-800:]}")
        return line.split()[-1]

    def write_config(self, pki: PKI, table: list[dict[str, str]], zk_dirs: list[str]) -> None:
        gw = f"pki/gateway/{self.site}"
        lines = [
            "# Written by `ztgate up`: a dev-mode gateway in front of the local nodes.",
            'mode = "dev"',
            f'trust_domain = "{pki.trust_domain}"',
            f'site = "{self.site}"',
            'registry = "registry"',
            'data_dir = "data"',
            "",
            "[listen]",
            'host = "127.0.0.1"',
            f"port = {self.gateway_port}",
            'admin_host = "127.0.0.1"',
            f"admin_port = {self.admin_port}",
            "",
            "[tls]",
            f'cert = "{gw}/server.crt"',
            f'key = "{gw}/server.key"',
            'client_ca = "pki/ca/client/ca.crt"',
            'node_ca = "pki/ca/node/ca.crt"',
            f'node_client_cert = "{gw}/node-client.crt"',
            f'node_client_key = "{gw}/node-client.key"',
            "dev_pki = true",
            "",
            "[policy]",
            'dir = "policies"   # unsigned: dev only; production loads a signed bundle',
            "",
            "[receipts]",
            'signing_key = "pki/keys/receipt-signing.key"',
            'log_key = "pki/keys/log-checkpoint.key"',
        ]
        if zk_dirs:
            lines += ["", "[zk]", f"artefacts = {json.dumps(zk_dirs)}"]
        if any("mpc_address" in n for n in table):
            lines += [
                "",
                "[mpc]",
                f'dealer_cert = "{gw}/dealer.crt"',
                f'dealer_key = "{gw}/dealer.key"',
            ]
        for node in table:
            lines += ["", "[[nodes]]"] + [f"{k} = {json.dumps(v)}" for k, v in node.items()]
        self.write_owned_config("\n".join(lines) + "\n")

    def stable_port(self, key: str) -> int:
        """The port `key` had at the last start when it is still free, else a new one: a
        gateway.toml the operator edited keeps pointing at the right nodes across restarts."""
        path = self.root / "nodes" / "ports.json"
        try:
            ports = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            ports = {}
        port = ports.get(key)
        if not (isinstance(port, int) and _free(port)):
            port = free_port()
            ports[key] = port
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ports, indent=1, sort_keys=True) + "\n")
        return int(port)

    def write_owned_config(self, text: str) -> None:
        """Write gateway.toml unless the operator has edited what `up` wrote last time.

        `up` keeps the SHA-256 of what it wrote beside it; a file that no longer matches was
        edited by hand and is left alone (the fresh one goes to gateway.up.toml to compare
        with, and the gateway starts on the operator's file)."""
        import hashlib

        stamp = self.root / ".gateway.toml.sha256"
        path = self.config_path
        if path.is_file():
            current = hashlib.sha256(path.read_bytes()).hexdigest()
            # No stamp: written by an older `up`, which rewrote it every start anyway.
            written = stamp.read_text().strip() if stamp.is_file() else None
            if written is not None and current != written:
                (self.root / "gateway.up.toml").write_text(text)
                log.warning(
                    "%s was edited since `ztgate up` wrote it: kept as is (what up would "
                    "write now is in gateway.up.toml)",
                    path,
                )
                return
        path.write_text(text)
        stamp.write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")

    def halt(self) -> None:
        """Stop supervising the nodes (no restarts) ahead of :meth:`stop`; signal-safe.

        A signal to the whole process group (Ctrl-C, systemd) reaches the nodes too: a node
        that exits then is shutting down, not crashing. (While the gateway drains, uvicorn
        holds the signals, so this comes after the drain; a node restarted during it is
        stopped by :meth:`stop` like the others.)
        """
        for sup in list(self.supervisors):
            sup.halt()

    def stop(self) -> None:
        """Stop the parties and the nodes, all at once; returns when none of them is left."""
        self.halt()
        for proc in self.parties:
            proc.terminate()
        threads = [threading.Thread(target=s.stop) for s in self.supervisors]
        for t in threads:
            t.start()
        for proc in self.parties:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.parties.clear()
        for t in threads:
            t.join(timeout=30)
        self.supervisors.clear()
