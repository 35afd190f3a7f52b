"""The demo's edge scene (DDIL): an edge gateway answering with its link to the core cut,
then reconciling its log with the core once the link returns.

The core is a witness with a vault (`ztgate witness serve --vault`); the edge is a second
gateway on the demo's nodes, whose receipt log names the core in `reconcile_with`; the
link between them is the project's fault proxy (gateway/faultproxy.py), cut and restored
for real. What is printed is what an operator would check: the edge answered while cut
off, and afterwards the core holds the edge's leaves and has cosigned its checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from gateway.faultproxy import ThreadedFaultProxy
from gateway.ports import free_port, wait_ready

IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (loopback URL)
        return json.loads(r.read())


def _core_witness(root: Path, trust_domain: str, port: int) -> tuple[subprocess.Popen[bytes], str]:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.pki import load_signing_key
    from gateway.receipts.canonical import b64
    from gateway.receipts.signing import raw_public

    wdir = root / "core-witness"
    if not (wdir / "witness.json").exists():
        key = load_signing_key(root / "pki" / "keys" / "log-checkpoint.key")
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        pub = b64(raw_public(key.public_key()))
        subprocess.run(
            [sys.executable, "-m", "gateway", "witness", "init", "--dir", str(wdir),
             "--name", "core.demo/witness", "--trust-log", f"{trust_domain}/={pub}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    vkey = subprocess.run(
        [sys.executable, "-m", "gateway", "witness", "vkey", "--dir", str(wdir)],
        check=True, capture_output=True, timeout=60, text=True,
    ).stdout.strip()  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "witness", "serve", "--dir", str(wdir),
         "--port", str(port), "--vault"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, vkey


def _edge_config(config: Path, port: int, admin_port: int, vkey: str, url: str) -> Path:
    text = config.read_text()
    text = re.sub(r"(?m)^port = \d+$", f"port = {port}", text)
    text = re.sub(r"(?m)^admin_port = \d+$", f"admin_port = {admin_port}", text)
    text = re.sub(r'(?m)^data_dir = ".*"$', 'data_dir = "edge-data"', text)
    text = re.sub(
        r'(?m)^(log_key = ".*")$',
        lambda m: (
            f"{m.group(1)}\nwitnesses = [[{json.dumps(vkey)}, {json.dumps(url)}]]\n"
            f"reconcile_with = [{json.dumps(url)}]"
        ),
        text,
    )
    out = config.with_name("edge.toml")
    out.write_text("# The demo's edge site: the demo gateway's config, its log reconciled "
                   "with the core witness.\n" + text)  # fmt: skip
    return out


def _infer(port: int, pki: Path, caller: str) -> dict[str, Any]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{port}",
        ssl=True,
        ssl_options={
            "ca_certs": str(pki / "root" / "ca.crt"),
            "certfile": str(pki / "clients" / caller / "client.crt"),
            "keyfile": str(pki / "clients" / caller / "client.key"),
        },
        network_timeout=60.0,
    )
    try:
        inp = httpclient.InferInput("input", list(IRIS.shape), "FP32")
        inp.set_data_from_numpy(IRIS, binary_data=True)
        result = client.infer("iris", [inp], parameters={"ztgate.verification": "none"})
        return dict(result.get_response().get("parameters", {}))
    finally:
        client.close()


def edge_scene(root: Path, config: Path, trust_domain: str) -> int:
    """Run the scene; 0 when the edge answered cut off and the core then cosigned."""
    core_port, edge_port, edge_admin = free_port(), free_port(), free_port()
    core, vkey = _core_witness(root, trust_domain, core_port)
    link: ThreadedFaultProxy | None = None
    edge: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(100):
            try:
                _get_json(f"http://127.0.0.1:{core_port}/vault")
                break
            except OSError:
                time.sleep(0.1)
        link = ThreadedFaultProxy(("127.0.0.1", core_port))
        url = f"http://127.0.0.1:{link.port}"
        edge_toml = _edge_config(config, edge_port, edge_admin, vkey, url)
        print("\n--- edge scene (DDIL) ---")
        print(f"core witness with vault on :{core_port}; edge gateway on :{edge_port};")
        print(f"the link between them: a fault proxy on :{link.port}")
        link.cut()
        print("link CUT")
        with (root / "edge-gateway.log").open("w") as sink:
            edge = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(edge_toml)],
                start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if not wait_ready(f"http://127.0.0.1:{edge_admin}/v2/health/ready", 60, edge):
            print("ztgate: the edge gateway did not become ready", file=sys.stderr)
            return 1
        p = _infer(edge_port, root / "pki", "demo")
        receipt_id = str(p.get("ztgate.receipt_id"))
        index = int(receipt_id.split(".")[1])
        print(f"[edge, cut off] demo/iris answered; receipt {receipt_id}")
        time.sleep(2.5)  # a few checkpoint ticks: each fails to reach the core
        held = _get_json(f"http://127.0.0.1:{core_port}/vault")
        print(f"core holds meanwhile: {held or 'nothing of the edge'}")
        link.restore()
        restored = time.monotonic()
        print("link RESTORED")
        for _ in range(300):
            state = _get_json(f"http://127.0.0.1:{core_port}/vault")
            done = [o for o, s in state.items() if s["cosigned"] > index]
            if done:
                s = state[done[0]]
                print(
                    f"core cosigned the edge's checkpoint of size {s['cosigned']} "
                    f"{time.monotonic() - restored:.1f}s after the link returned, and holds "
                    f"{s['stored']} leaves with their receipt bodies ({done[0]})"
                )
                return 0
            time.sleep(0.1)
        print("ztgate: the core did not cosign the edge's checkpoint in 30 s", file=sys.stderr)
        return 1
    finally:
        for proc in (edge, core):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if link is not None:
            link.close()
