"""The floor under the gateway: what its parts alone cost per request, with no gateway logic.

Run: ``.venv/bin/python bench/floor.py [--requests 2000] [--concurrency 8] [--rounds 1]``

One Triton node (iris, batch 1, FP32 [1,4]), started as ``bench/gateway_overhead.py`` starts
it, and the same raw keep-alive mTLS client as its ``gw-raw`` (the same body), sequentially
and with C threads, against each of these, side by side in one run:

* ``direct``       tritonclient.grpc straight to the node (the node's own pace).
* ``bare``         uvicorn (uvloop, httptools) with the gateway's own TLS listener: the same
  server context (`gateway.server.ReloadingContext`) and protocol class
  (`gateway.server.tls_protocol`), serving a raw ASGI app (no Starlette) that reads the
  body, sends one prebuilt ``ModelInferRequest`` over the gateway's own grpc.aio mTLS
  channel (a `gateway.routing.node_client.NodeClient`'s), and answers a fixed head with
  the node's output bytes.
* ``bare-asyncio`` the same on asyncio's own loop instead of uvloop.
* ``bare-nogrpc``  the same on uvloop with the node call left out (the answer is fixed):
  HTTP and TLS alone.
* ``bare+receipt`` ``bare`` plus, per request, one Ed25519 signature and one row in SQLite
  (WAL, ``synchronous=FULL``) committed on a database thread before the answer, batches
  group-committed as the receipt log does (the writer takes everything queued): the
  fsync-before-answer rule's floor.
* ``gateway``      ``python -m gateway serve`` with ``gateway_overhead --gateway-config full``.

Each server is a process of its own; its CPU time (user + system, all threads, psutil)
over a run, divided by the requests it served in it (warm-up included on both sides),
is the figure that counts: the clients share the machine's cores, so latency and req/s
move with everything else running. The bare servers answer the same bytes the gateway's
client expects (``Inference-Header-Content-Length`` + binary output), so one client
function serves all. Rounds (``--rounds``) run every variant once per round, in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway_overhead import (
    MODEL,
    Factory,
    Setup,
    X,
    _sigterm,
    cluster_env,
    concurrent,
    cpu_seconds,
    direct_client,
    gateway_env,
    gateway_raw,
    pct,
    sequential,
)

BARE_KINDS = ("bare", "bare-asyncio", "bare-nogrpc", "bare+receipt")
VARIANTS = ("direct", *BARE_KINDS, "gateway")
# About a receipt's size in the log (leaf data): what one row writes.
LEAF_BYTES = 600
TICKS = os.sysconf("SC_CLK_TCK")  # psutil reads /proc in these

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# --- the bare servers (each its own process: `floor.py --serve KIND ...`) -------------------
class GroupCommit:
    """One row per request, committed before the caller goes on: the writer task takes
    everything queued, writes it in one transaction (one fsync) on its own thread, then
    releases every waiter, as `gateway.receipts.log.ReceiptLog` batches its appends."""

    def __init__(self, path: Path) -> None:
        from gateway.sqlitedb import open_durable

        self.db = open_durable(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS leaves(idx INTEGER PRIMARY KEY, data BLOB)")
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="floor-db")
        self.pending: list[tuple[int, bytes, asyncio.Future[None]]] = []
        self.next = 0
        self.wake: asyncio.Event | None = None
        self.writer: asyncio.Task[None] | None = None

    async def append(self, data: bytes) -> None:
        if self.wake is None:
            self.wake = asyncio.Event()
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((self.next, data, fut))
        self.next += 1
        self.wake.set()
        await fut

    async def _write_loop(self) -> None:
        assert self.wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    await loop.run_in_executor(self.thread, self._write, batch)
                except Exception as exc:  # the waiters fail (a 500), not hang
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    def _write(self, batch: list[tuple[int, bytes, asyncio.Future[None]]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO leaves VALUES (?, ?)", [(i, d) for i, d, _ in batch])
        self.db.execute("COMMIT")


def bare_app(kind: str, config: Path, db_path: Path) -> Callable[..., Awaitable[None]]:
    """The raw ASGI app of one bare kind (module doc), built from the gateway's config."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from tritonclient.grpc import service_pb2

    from gateway.config import load_config
    from gateway.routing.node_client import NodeClient, NodeCredentials

    cfg = load_config(config)
    t = cfg.tls
    creds = NodeCredentials(t.node_ca, t.node_client_cert, t.node_client_key)
    node = NodeClient(cfg.nodes[0], creds.channel_credentials(), cfg.limits.max_output_bytes)
    req = service_pb2.ModelInferRequest(model_name=MODEL, id="floor")
    spec = req.inputs.add()
    spec.name, spec.datatype = "input", "FP32"
    spec.shape.extend(X.shape)
    req.raw_input_contents.append(X.tobytes())
    req.outputs.add().name = "probabilities"
    key = ed25519.Ed25519PrivateKey.generate()
    commit = GroupCommit(db_path) if kind == "bare+receipt" else None
    leaf = bytes(LEAF_BYTES)
    answer: dict[str, bytes] = {}

    async def node_call() -> bytes:
        # The gateway's own channel (options, credentials, pinning), not a copy of it.
        resp = await node._stub.ModelInfer(req, timeout=10.0)
        if len(resp.raw_output_contents) != 1:
            raise RuntimeError("node answered without raw output contents")
        return bytes(resp.raw_output_contents[0])

    async def startup() -> None:
        # One node call now, whatever the kind: its output fixes the answer's head, and
        # `bare-nogrpc` then answers with these bytes without calling again.
        out = await node_call()
        head = json.dumps(
            {
                "model_name": MODEL,
                "outputs": [
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": [1, len(out) // 4],
                        "parameters": {"binary_data_size": len(out)},
                    }
                ],
            },
            separators=(",", ":"),
        ).encode()
        answer["head"], answer["out"] = head, out
        answer["head_len"] = str(len(head)).encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await startup()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await node.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        out = answer["out"] if kind == "bare-nogrpc" else await node_call()
        if commit is not None:
            digest = hashlib.sha256(body + out).digest()
            await commit.append(leaf + key.sign(digest))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"inference-header-content-length", answer["head_len"]),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer["head"] + out})

    return app


def serve(kind: str, config: Path, port: int, db_path: Path) -> None:
    """One bare server in this process until SIGTERM: the gateway's listener settings."""
    import uvicorn

    from gateway.config import load_config
    from gateway.server import ReloadingContext, TLSFiles, tls_protocol

    cfg = load_config(config)
    tls = ReloadingContext(TLSFiles(cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca, cfg.tls.crl))
    loop = "asyncio" if kind == "bare-asyncio" else "uvloop"
    server = uvicorn.Server(
        uvicorn.Config(
            bare_app(kind, config, db_path),
            host="127.0.0.1",
            port=port,
            loop=loop,
            http=tls_protocol(cfg.limits.header_timeout_s, cfg.limits.idle_timeout_s),
            ssl_context_factory=lambda _cfg, _default: tls.listening,
            ssl_certfile=str(cfg.tls.cert),
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="on",
            log_level="warning",
        )
    )
    if loop == "uvloop":
        import uvloop

        uvloop.run(server.serve())  # as gateway.runtime.run does
    else:
        asyncio.run(server.serve())


# --- the driver ----------------------------------------------------------------------------
def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def bare_server(kind: str, gw: Setup, config: Path) -> Iterator[Setup]:
    """A bare server process, up and answering, as a `Setup` the gw-raw client can use."""
    from gateway.ports import free_port

    port = free_port()
    log_path = gw.root / f"floor-{kind}.log"
    db_path = gw.root / f"floor-{kind}.db"
    cmd = [sys.executable, __file__, "--serve", kind, "--config", str(config)]
    cmd += ["--port", str(port), "--db", str(db_path)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while True:  # uvicorn binds after the lifespan startup (the first node call)
            if proc.poll() is not None or time.monotonic() > end:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"bare server {kind} did not start; its log:\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.1)
        print(f"  {kind} ready (pid {proc.pid})", flush=True)
        yield dataclasses.replace(gw, gateway_port=port, gateway_pid=proc.pid)
    finally:
        _stop(proc)


@dataclasses.dataclass
class Row:
    variant: str
    mode: str
    round: int
    p50_ms: float
    p99_ms: float
    rps: float
    cpu_ms: float | None  # server process CPU per request served; None for direct


def run_one(variant: str, mode: str, rnd: int, setup: Setup, args: Any) -> Row:
    factory: Factory = functools.partial(
        direct_client if variant == "direct" else gateway_raw, setup
    )
    print(f"  round {rnd} {variant:<14} {mode} ...", flush=True)
    cpu0 = cpu_seconds(setup.gateway_pid)
    if mode == "seq":
        lat, wall = sequential(factory, args.requests, args.warmup)
        served = args.requests + args.warmup
    else:
        warm = max(1, args.warmup // args.concurrency)
        lat, wall = concurrent(factory, args.requests, args.concurrency, warm)
        served = args.requests + warm * args.concurrency
    cpu = cpu_seconds(setup.gateway_pid) - cpu0
    return Row(
        variant,
        mode,
        rnd,
        pct(lat, 0.5) * 1e3,
        pct(lat, 0.99) * 1e3,
        len(lat) / wall,
        None if variant == "direct" else cpu / served * 1e3,
    )


def check_answers(setups: dict[str, Setup]) -> None:
    """Every server answers the iris request: 200, a head that parses, outputs of its shape."""
    got = {}
    for name, s in setups.items():
        if name == "direct":
            continue
        call, close = gateway_raw(s)
        try:
            call()  # raises on a non-200
        finally:
            close()
        got[name] = True
    print(f"  every server answered: {', '.join(got)}", flush=True)


def report(rows: list[Row], concurrency: int, served: int) -> None:
    modes = ("seq", f"c={concurrency}")
    print(
        f"\n{'variant':<14}{'mode':<6}{'CPU ms/req':>11}{'of gw':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'req/s':>7}   per round: CPU ms/req"
    )
    med: dict[tuple[str, str], float] = {}
    for mode in modes:
        for v in VARIANTS:
            mine = [r for r in rows if r.variant == v and r.mode == mode]
            if not mine:
                continue
            cpu = [r.cpu_ms for r in mine if r.cpu_ms is not None]
            if cpu:
                med[(v, mode)] = statistics.median(cpu)
        for v in VARIANTS:
            mine = [r for r in rows if r.variant == v and r.mode == mode]
            if not mine:
                continue
            gw = med.get(("gateway", mode))
            c = med.get((v, mode))
            cpu_s = f"{c:.3f}" if c is not None else "-"
            frac = f"{c / gw:.2f}" if c is not None and gw else "-"
            rounds = " / ".join(f"{r.cpu_ms:.3f}" for r in mine if r.cpu_ms is not None)
            print(
                f"{v:<14}{mode:<6}{cpu_s:>11}{frac:>7}"
                f"{statistics.median(r.p50_ms for r in mine):>8.2f}"
                f"{statistics.median(r.p99_ms for r in mine):>8.2f}"
                f"{statistics.median(r.rps for r in mine):>7.0f}   {rounds}"
            )
    for mode in modes:
        gw, floor = med.get(("gateway", mode)), med.get(("bare+receipt", mode))
        if gw is not None and floor is not None:
            print(
                f"{mode}: the gateway's own logic (gateway - bare+receipt) {gw - floor:.3f} ms/req"
            )
    print(
        "\nCPU ms/req: the serving process's CPU (user+system, all threads) per request "
        "served, median over rounds; of gw: that as a fraction of the gateway's.\n"
        f"psutil's CPU times come in 1/{TICKS} s ticks: each figure is good to about "
        f"+-{2e3 / TICKS / served:.3f} ms/req at {served} requests a run"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    ap.add_argument("--concurrency", type=int, default=8, help="threads, one client each")
    ap.add_argument("--rounds", type=int, default=1, help="every variant once per round")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the rows as JSON")
    ap.add_argument("--only", choices=VARIANTS, action="append", help="repeatable")
    ap.add_argument("--serve", choices=BARE_KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:  # a bare server's own process
        serve(args.serve, args.config, args.port, args.db)
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chosen = [v for v in VARIANTS if not args.only or v in args.only]
    load = os.getloadavg()
    machine = (
        f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
        f"load average before the run {load[0]:.2f}"
    )
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ztgate-floor-")))
        try:
            cluster = stack.enter_context(cluster_env(root, 1))
            gw = stack.enter_context(gateway_env(cluster, "full", []))
            config = cluster.root / "gateway-full.toml"  # written by gateway_env
            setups: dict[str, Setup] = {"direct": gw, "gateway": gw}
            for kind in BARE_KINDS:
                if kind in chosen:
                    setups[kind] = stack.enter_context(bare_server(kind, gw, config))
            check_answers({v: setups[v] for v in chosen})
            for rnd in range(1, args.rounds + 1):
                for mode in ("seq", f"c={args.concurrency}"):
                    for v in chosen:
                        rows.append(run_one(v, mode, rnd, setups[v], args))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the servers and the node", file=sys.stderr)
            return 130
    print(f"\nmachine: {machine}")
    print(
        f"model:   {MODEL}, batch 1, FP32 [1,4]; {args.requests} requests per run after "
        f"{args.warmup} warm-up; c={args.concurrency}: threads in this process, one "
        "keep-alive mTLS client each; every process shares the same cores"
    )
    report(rows, args.concurrency, args.requests + args.warmup)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"json": str(args.json)},
                 "rows": [dataclasses.asdict(r) for r in rows]},
                indent=1, default=str,
            )
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
