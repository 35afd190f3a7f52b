"""The latency an edge adds by forwarding to its core, against calling the core directly
(issue 26; docs/ddil.md, "Forwarding to the core").

Run: ``.venv/bin/python bench/forwarding.py [--requests 300] [--concurrency 8] [--dir DIR]``

One run, two gateway processes (``python -m gateway serve``, as in production) and one real
tritonserver node, iris batch 1, receipts on at both gateways:

* the **core** (site-a) with its node and its forward listener (forwarder CA, CRL);
* an **edge** (site-b) whose only node is gone (nothing listens at its address), with
  ``[forward]`` pointing at the core: every request is refused by the edge's own router
  and sent on to the core with the site's signed statement, as in a failover.

Side by side, with the same client certificate and body: ``direct`` (client -> core
/infer) and ``forwarded`` (client -> edge -> core's forward listener), each sequential
and with C threads (each its own keep-alive mTLS client). Reported: p50/p99 of what the
client waits, and the core's and the edge's CPU per request (psutil, all threads).
"""

from __future__ import annotations

import contextlib
import json
import platform
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.gateway_overhead import _stop_gateway, gateway_process, variant_config  # noqa: E402
from bench.jobs import one_node_bench, pct, timed_calls  # noqa: E402
from gateway.cluster import LocalCluster  # noqa: E402
from gateway.pki import PKI, forwarder_crl  # noqa: E402
from gateway.ports import free_port, wait_ready  # noqa: E402

CORE, EDGE = "site-a", "site-b"
BODY = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}
# The shipped forward_for permit names the `apps` group, whose infer permit carries a
# rate the bench would hit; the bench's caller gets a permit of its own, as an officer
# would grant one (policies/README.md, "Forwarding").
FORWARD_POLICY = """
@id("bench-forwarded-by-site-b")
permit (principal in Ztgate::Group::"bench", action == Ztgate::Action::"forward_for", resource)
when { context.site == "site-b" && resource.classification == "public" };
"""


def run(base: str, ctx: ssl.SSLContext, n: int, c: int, forwarded: bool) -> list[float]:
    def check(r: httpx.Response) -> None:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: {r.status_code} {r.text}")
        # A forwarded answer says so; a local one would mean the bench measured something
        # else than it claims.
        if forwarded != (r.headers.get("ztgate-site-why") == "forwarded-to-core"):
            raise RuntimeError(f"{base}: unexpected route {dict(r.headers)}")

    return timed_calls(base, ctx, n, c, check)[0]


def core_config(cluster: LocalCluster, pki: PKI) -> Path:
    config = variant_config(cluster, "full", None)
    (cluster.root / "policies" / "16-bench-forwarding.cedar").write_text(FORWARD_POLICY)
    crl = forwarder_crl(pki, [], cluster.root / "forwarder.crl")
    with config.open("a") as f:
        f.write(
            f"\n[forward]\nport = {free_port()}\nca = {json.dumps(str(pki.forwarder_ca_bundle()))}"
            f"\ncrl = {json.dumps(str(crl))}\n"
            # The bench measures latency, not the per-site bounds: lift them.
            "site_rate_per_s = 100000\nsite_burst = 100000\nsite_concurrency = 1024\n"
        )
    return config


def edge_config(cluster: LocalCluster, pki: PKI, core: Path) -> tuple[Path, int, int]:
    """The core's config made the edge's: its own site, ports, data and a node that is gone."""
    import tomllib

    doc = tomllib.loads(core.read_text())
    port, admin = free_port(), free_port()
    gw = f"pki/gateway/{EDGE}"
    fwd = pki.ensure("forwarder", EDGE, site=EDGE)
    node = dict(doc["nodes"][0], name="edge1", address=f"127.0.0.1:{free_port()}")
    text = core.read_text().split("\n[[nodes]]", 1)[0]
    text = text.split("\n[forward]", 1)[0]
    for old, new in (
        (f'site = "{CORE}"', f'site = "{EDGE}"'),
        ('data_dir = "data"', 'data_dir = "data-edge"'),
        (f"port = {cluster.gateway_port}", f"port = {port}"),
        (f"admin_port = {cluster.admin_port}", f"admin_port = {admin}"),
        (f"pki/gateway/{CORE}/server.", f"{gw}/server."),
        (f"pki/gateway/{CORE}/node-client.", f"{gw}/node-client."),
    ):
        assert old in text, old
        text = text.replace(old, new)
    text += "\n[[nodes]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in node.items())
    text += (
        f'\n[forward]\ncore_url = "https://127.0.0.1:{doc["forward"]["port"]}"\n'
        f'core_site = "{CORE}"\ncore_ca = {json.dumps(str(pki.root_ca))}\n'
        f"cert = {json.dumps(str(fwd.cert))}\nkey = {json.dumps(str(fwd.key))}\n"
    )
    out = cluster.root / "gateway-edge.toml"
    out.write_text(text)
    return out, port, admin


@contextlib.contextmanager
def edge_process(config: Path, admin: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The edge is never *ready* (its one node is gone): it is up once it is live."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if not wait_ready(f"http://127.0.0.1:{admin}/v2/health/live", 60, proc):
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the edge did not come up; its log:\n{tail}")
        yield proc
    finally:
        _stop_gateway(proc)


def main() -> int:
    args, cluster = one_node_bench(__doc__, "forwarding", 300)
    root = cluster.root
    n, c = args.requests, args.concurrency
    results: dict[str, dict[str, float]] = {}
    try:
        pki = PKI.init(root / "pki", sites=[CORE, EDGE])
        core_cfg = core_config(cluster, pki)
        edge_cfg, edge_port, edge_admin = edge_config(cluster, pki, core_cfg)
        with contextlib.ExitStack() as stack:
            core = stack.enter_context(gateway_process(cluster, core_cfg, root / "core.log"))
            edge = stack.enter_context(edge_process(edge_cfg, edge_admin, root / "edge.log"))
            ctx = ssl.create_default_context(cafile=str(pki.root_ca))
            ctx.load_cert_chain(
                pki.root / "clients/bench/client.crt", pki.root / "clients/bench/client.key"
            )
            bases = {
                "direct": (f"https://127.0.0.1:{cluster.gateway_port}", False),
                "forwarded": (f"https://127.0.0.1:{edge_port}", True),
            }
            procs = {"core": psutil.Process(core.pid), "edge": psutil.Process(edge.pid)}
            # Warm-up: connections, caches, the node, the edge's node marked down.
            for base, fwd in bases.values():
                run(base, ctx, 4 * c, c, fwd)
            for conc in (1, c):
                for name, (base, fwd) in bases.items():
                    cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
                    waits = run(base, ctx, n, conc, fwd)
                    cpu = {k: sum(p.cpu_times()[:2]) - cpu0[k] for k, p in procs.items()}
                    results[f"{name} c={conc}"] = {
                        "p50_ms": pct(waits, 0.5),
                        "p99_ms": pct(waits, 0.99),
                        "core_cpu_ms": cpu["core"] / len(waits) * 1000,
                        "edge_cpu_ms": cpu["edge"] / len(waits) * 1000,
                    }
    finally:
        cluster.stop()
    print(f"iris batch 1, {n} per row, 1 core node, receipts on; {platform.platform()}")
    print(f"{'variant':14} {'p50 ms':>8} {'p99 ms':>8} {'core CPU ms':>12} {'edge CPU ms':>12}")
    for name, r in results.items():
        print(
            f"{name:14} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['core_cpu_ms']:12.2f}"
            f" {r['edge_cpu_ms']:12.2f}"
        )
    for conc in (1, c):
        added = results[f"forwarded c={conc}"]["p50_ms"] - results[f"direct c={conc}"]["p50_ms"]
        print(f"added by forwarding, c={conc}: p50 {added:+.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
