"""A real gateway (uvicorn, TLS, the shim) in a thread of the test process, and mTLS clients.

In-process so tests can read app-side counters (did a refused caller ever reach the app?)
while every byte still crosses a real TLS connection on loopback.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from gateway.app import Gateway
from gateway.config import Config, parse_config
from gateway.pki import PKI
from gateway.ports import free_port
from gateway.runtime import build_gateway, servers
from tests.redis_fixture import redis_executable

SHIPPED_POLICIES = Path(__file__).resolve().parent.parent / "policies"
TEST_CALLERS = ("bob", "short", "schemathesis", "bench")


def policy_dir(dest: Path, extra_apps: tuple[str, ...] = TEST_CALLERS) -> Path:
    """The shipped policies, with a few more test callers in the `apps` group."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED_POLICIES.iterdir():
        if f.is_file() and f.suffix in (".cedar", ".cedarschema", ".json"):
            shutil.copy(f, dest / f.name)
    mapping = json.loads((dest / "identities.json").read_text())
    for name in extra_apps:
        mapping["clients"][f"spiffe://ztgate.local/client/{name}"] = {"groups": ["apps"]}
    (dest / "identities.json").write_text(json.dumps(mapping, indent=2))
    return dest


def gateway_config(
    pki: PKI,
    registry: Path,
    data_dir: Path,
    nodes: list[dict[str, Any]],
    site: str = "site-a",
    **overrides: Any,
) -> Config:
    gw_dir = pki.root / "gateway" / site
    raw: dict[str, Any] = {
        "mode": "dev",
        "trust_domain": pki.trust_domain,
        "site": site,
        "registry": str(registry),
        "data_dir": str(data_dir),
        "listen": {"port": free_port(), "admin_port": free_port(), "graceful_shutdown_s": 1},
        "tls": {
            "cert": str(gw_dir / "server.crt"),
            "key": str(gw_dir / "server.key"),
            "client_ca": str(pki.client_ca_bundle()),
            "node_ca": str(pki.node_ca_bundle()),
            "node_client_cert": str(gw_dir / "node-client.crt"),
            "node_client_key": str(gw_dir / "node-client.key"),
            "reload_interval_s": 0.2,
            "dev_pki": True,
        },
        "routing": {
            "per_try_timeout_s": 2.0,
            "health_interval_s": 0.3,
            "eject_base_s": 0.5,
            "eject_max_s": 5.0,
        },
        # Generous admission: tests that are about the admission limit set their own.
        "policy": {
            "dir": str(policy_dir(data_dir / "policies")),
            "pre_policy_rate": "100000/minute",
        },
        # Loaded test machines (2 cores, several servers) need more than production's 0.5 s.
        "state": {"timeout_s": 3.0},
        "receipts": {
            "signing_key": str(pki.key_path("receipt-signing")),
            "log_key": str(pki.key_path("log-checkpoint")),
            "checkpoint_interval_s": 0.2,
        },
        "nodes": nodes,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            merged = {**raw[key], **value}
            raw[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            raw[key] = value
    return parse_config(raw, Path("/"))


@dataclass
class RunningGateway:
    cfg: Config
    gw: Gateway
    api: uvicorn.Server
    admin: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.cfg.listen.port}"

    @property
    def base(self) -> str:
        return f"https://{self.url}"

    @property
    def admin_base(self) -> str:
        return f"http://127.0.0.1:{self.cfg.listen.admin_port}"


@contextmanager
def running_gateway(cfg: Config, gw: Gateway | None = None) -> Iterator[RunningGateway]:
    gw = gw or build_gateway(cfg)
    api, admin = servers(cfg, gw)

    async def main() -> None:
        admin_task = asyncio.create_task(admin.serve())
        try:
            await api.serve()
        finally:
            admin.should_exit = True
            await asyncio.wait([admin_task], timeout=5)

    thread = threading.Thread(target=uvloop.run, args=(main(),), daemon=True)
    thread.start()
    end = time.monotonic() + 15
    while not (api.started and admin.started):
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield RunningGateway(cfg, gw, api, admin, thread)
    finally:
        api.should_exit = True
        thread.join(timeout=15)


def client_context(pki: PKI, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """What a client uses: the root CA, and its own certificate (httpx needs it this way)."""
    ctx = ssl.create_default_context(cafile=str(pki.root_ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@contextmanager
def tls_redis(pki: PKI, workdir: Path) -> Iterator[str]:
    """A redis-server that speaks only TLS and knows one ACL user (what production asks for).

    Yields its `rediss://user:password@...` URL, trusting the PKI's root for the server.
    """
    exe = redis_executable()
    workdir.mkdir(parents=True, exist_ok=True)
    # A server certificate for 127.0.0.1 from the PKI (the gateway-server role has that SAN).
    issued = pki.issue("gateway-server", "redis", out=(workdir / "tls.crt", workdir / "tls.key"))
    password = secrets.token_hex(16)
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [
                exe,
                "--port", "0",
                "--tls-port", str(port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", str(issued.cert),
                "--tls-key-file", str(issued.key),
                "--tls-auth-clients", "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--user", "default", "off",
                "--user", "ztgate", "on", f">{password}", "~*", "&*", "+@all",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        ctx = ssl.create_default_context(cafile=str(pki.root_ca))
        end = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(f"AUTH ztgate {password}\r\n".encode())
                        if tls.recv(64).startswith(b"+OK"):
                            break
            except OSError:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(
                    f"TLS redis-server did not start: {(workdir / 'redis.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        yield f"rediss://ztgate:{password}@127.0.0.1:{port}/0?ssl_ca_certs={pki.root_ca}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dev_toml(pki: PKI, registry: Path, data_dir: Path, policies: Path) -> str:
    """A dev gateway.toml with no nodes, up to its [policy] table: callers add the rest
    (their [receipts] keys, a [pkcs11] table)."""
    gw_dir = pki.root / "gateway" / "site-a"
    return f"""
mode = "dev"
registry = "{registry}"
data_dir = "{data_dir}"
[listen]
port = {free_port()}
admin_port = {free_port()}
[tls]
cert = "{gw_dir / "server.crt"}"
key = "{gw_dir / "server.key"}"
client_ca = "{pki.client_ca_bundle()}"
node_ca = "{pki.node_ca_bundle()}"
node_client_cert = "{gw_dir / "node-client.crt"}"
node_client_key = "{gw_dir / "node-client.key"}"
dev_pki = true
[policy]
dir = "{policies}"
"""
