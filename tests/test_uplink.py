"""An edge pulling from its core over a link that breaks: the CRL first, then the signed
bundle and model files, each download resumable and installed only once it hashes right.

The core is a witness serving a publish directory (uvicorn on loopback); between it and
the edge, the project's fault proxy. Each refusal has a positive control built the same
way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway import ports
from gateway.config import Uplink as UplinkConfig
from gateway.faultproxy import FaultProxy
from gateway.pki import PKI, client_crl
from gateway.receipts.witness import Witness, witness_app
from gateway.uplink import Uplink, UplinkError, fetch_resumable
from tests.gateway_harness import gateway_config


@dataclass
class Core:
    publish: Path
    url: str  # through the proxy
    direct: str
    proxy: FaultProxy


@pytest_asyncio.fixture(loop_scope="function")
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    publish = tmp_path / "publish"
    (publish / "models").mkdir(parents=True)
    witness = Witness(
        "core.example/w", ed25519.Ed25519PrivateKey.generate(), [], tmp_path / "state.json"
    )
    (tmp_path / "state.json").write_text('{"logs": {}}')  # a file beside, never served
    port = ports.free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            witness_app(witness, publish=publish),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    serving = asyncio.ensure_future(server.serve())
    for _ in range(3000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    proxy = FaultProxy(("127.0.0.1", port))
    await proxy.start()
    yield Core(
        publish,
        f"http://127.0.0.1:{proxy.port}/publish",
        f"http://127.0.0.1:{port}/publish",
        proxy,
    )
    await proxy.close()
    server.should_exit = True
    await serving


async def test_a_download_cut_mid_file_resumes_and_installs_only_matching_bytes(
    core: Core, tmp_path: Path
) -> None:
    data = os.urandom(3 << 20)
    (core.publish / "models" / "big.onnx").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "edge" / "big.onnx"
    url = f"{core.url}/models/big.onnx"
    core.proxy.drop_after(1 << 20)  # the link drops a third of the way in
    async with httpx.AsyncClient(timeout=30) as http:
        with pytest.raises((UplinkError, httpx.HTTPError)):
            await fetch_resumable(http, url, dest, digest, len(data))
        assert not dest.exists()
        part = dest.with_name(".big.onnx.part")
        assert 0 < part.stat().st_size < len(data)
        core.proxy.restore()
        before = core.proxy.stats.bytes_down
        assert await fetch_resumable(http, url, dest, digest, len(data))
        assert dest.read_bytes() == data and not part.exists()
        assert core.proxy.stats.bytes_down - before < len(data)  # resumed, not restarted
        assert not await fetch_resumable(http, url, dest, digest, len(data))  # up to date
        # Bytes that do not hash to the manifest's SHA-256 are never installed.
        other = tmp_path / "edge" / "other.onnx"
        with pytest.raises(UplinkError, match="do not hash"):
            await fetch_resumable(http, url, other, "00" * 32, len(data))
        assert not other.exists() and not other.with_name(".other.onnx.part").exists()


async def test_the_publish_route_serves_only_published_names(core: Core) -> None:
    (core.publish / "client.crl").write_bytes(b"crl")
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{core.direct}/client.crl")).status_code == 200  # control
        for name in ("../state.json", "%2e%2e/state.json", "notes.txt", "models/a/b.onnx"):
            r = await http.get(f"{core.direct}/{name}")
            assert r.status_code == 404, name
        manifest = (await http.get(f"{core.direct}/manifest.json")).json()
    assert [f["name"] for f in manifest["files"]] == ["client.crl"]


async def test_an_edge_pulls_the_crl_first_then_the_bundle_and_models(
    core: Core, pki: PKI, tmp_path: Path
) -> None:
    victim = pki.ensure("client", "uplink-victim")
    client_crl(pki, [victim.serial], core.publish / "client.crl")
    (core.publish / "policy-bundle.json").write_text('{"payloadType": "x"}')
    (core.publish / "models" / "m.onnx").write_bytes(b"model")
    edge = tmp_path / "edge"
    cfg = gateway_config(pki, tmp_path / "registry", edge / "data", [])
    cfg = dataclasses.replace(
        cfg,
        tls=dataclasses.replace(cfg.tls, crl=edge / "client.crl"),
        policy=dataclasses.replace(cfg.policy, bundle=edge / "policy-bundle.json"),
        uplink=UplinkConfig(core_url=core.url, interval_s=1.0, models_dir=edge / "models"),
    )
    uplink = Uplink(cfg)
    try:
        assert not uplink.revocations_current()
        core.proxy.cut()
        with pytest.raises((UplinkError, httpx.HTTPError)):
            await uplink.pull()
        assert not uplink.revocations_current()  # nothing pulled while cut off
        core.proxy.restore()
        installed = await uplink.pull()
        assert installed == ["client.crl", "policy-bundle.json", "models/m.onnx"]  # CRL first
        assert uplink.revocations_current()
        assert (edge / "client.crl").read_bytes() == (core.publish / "client.crl").read_bytes()
        assert (edge / "models" / "m.onnx").read_bytes() == b"model"
        assert await uplink.pull() == []  # nothing new
    finally:
        await uplink.aclose()


def test_an_edge_gateway_learns_a_revocation_from_its_core(
    core_sync: tuple[Path, str], pki: PKI, tmp_path: Path
) -> None:
    """The whole path in a running gateway: the core publishes a CRL naming a client, the
    edge's uplink pulls it, and that client is refused from then on; another client is
    not (the positive control, same gateway, same request)."""
    import time as _time

    from tests.gateway_harness import client_context, running_gateway

    publish, url = core_sync
    victim = pki.ensure("client", "uplink-revoked")
    edge = tmp_path / "edge"
    edge.mkdir()
    client_crl(pki, [], edge / "client.crl")  # what the edge started with: nobody revoked
    cfg = gateway_config(pki, tmp_path / "registry", edge / "data", [])
    cfg = dataclasses.replace(
        cfg,
        tls=dataclasses.replace(cfg.tls, crl=edge / "client.crl"),
        uplink=UplinkConfig(core_url=url, interval_s=0.2),
    )
    demo = pki.ensure("client", "demo")

    def status(issued: object) -> int | str:
        ctx = client_context(pki, issued.cert, issued.key)  # type: ignore[attr-defined]
        try:
            with httpx.Client(verify=ctx, timeout=5) as c:
                return c.get(f"https://127.0.0.1:{cfg.listen.port}/v2/models/iris").status_code
        except httpx.HTTPError as exc:  # refused at the handshake, once the CRL reloads
            return type(exc).__name__

    with running_gateway(cfg):
        before = status(victim)
        assert isinstance(before, int) and before != 401  # answered: nobody revoked yet
        assert status(demo) == before
        # A CRL the client CA did not sign is never installed, however often it is served.
        other = PKI.init(tmp_path / "other-pki", sites=["site-a"])
        started = (edge / "client.crl").read_bytes()
        client_crl(other, [victim.serial], publish / "client.crl")
        _time.sleep(1.5)  # several pull rounds
        assert (edge / "client.crl").read_bytes() == started
        assert status(victim) == before
        client_crl(pki, [victim.serial], publish / "client.crl")
        deadline = _time.monotonic() + 20
        while status(victim) not in (401, "ConnectError", "ReadError", "RemoteProtocolError"):
            assert _time.monotonic() < deadline, "the edge never learnt the revocation"
            _time.sleep(0.2)
        assert status(demo) == before  # the same request by another client: unchanged


@pytest.fixture
def core_sync(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The core's publish directory served from a thread (for a test that is not async)."""
    import threading

    publish = tmp_path / "core-publish"
    publish.mkdir()
    witness = Witness(
        "core.example/w", ed25519.Ed25519PrivateKey.generate(), [], tmp_path / "cstate.json"
    )
    port = ports.free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            witness_app(witness, publish=publish),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(3000):
        if server.started:
            break
        threading.Event().wait(0.01)
    yield publish, f"http://127.0.0.1:{port}/publish"
    server.should_exit = True
    thread.join(10)
