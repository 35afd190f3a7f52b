"""The node call alone: CPU per call of the ways to call a Triton node from an asyncio process.

Run: ``.venv/bin/python bench/nodecall.py [--calls 2000] [--concurrency 8] [--rounds 2]``

One Triton node (iris, batch 1, FP32 [1,4]), started as ``bench/gateway_overhead.py`` starts
it. Each variant runs in a process of its own on uvloop (as the gateway runs), with the
gateway's node mTLS material and a prebuilt ``ModelInferRequest``; it calls the node N times
one after another, then N times from C tasks at once, and reports its own CPU time (user +
system, all threads, psutil) per call: the calling side of the gateway's node call, alone;
``loop seq/c`` is the part of it on the loop's (main) thread, the rest is gRPC's own threads.

* ``aio``            the gateway's own `gateway.routing.node_client.NodeClient`: its grpc.aio
  channel, its stub's cached multicallable, ``timeout=`` per call (the only per-call option
  the gateway passes: no metadata, no compression). The baseline.
* ``aio-percall``    the same channel, the multicallable built per call (``unary_unary``).
* ``aio-nodeadline`` the baseline without the per-call timeout (not an option for the gateway:
  it shows what the deadline costs).
* ``aio+OPTION``     the baseline with one more channel option (``--aio-options``) or one
  environment variable set in the calling process (``aio-env:NAME=VALUE``).
* ``sync-future``    a sync ``grpc.secure_channel`` with the very options NodeClient gives its
  channel; ``ModelInfer.future(req, timeout=)`` whose done-callback hands the result to the
  loop with ``call_soon_threadsafe`` (the channel's one polling thread runs the callbacks: no
  thread per call); a cancelled awaiter cancels the RPC.
* ``sync-thread``    the blocking sync call in a thread pool (``run_in_executor``): for
  reference only, a cancelled awaiter does not cancel the RPC.
* ``h2-min``         a minimal pure-Python gRPC client (`H2Client`: the ``h2`` package on an
  asyncio TLS stream, the node's name checked by ``ssl``, ``grpc-timeout`` and a local
  deadline, RST_STREAM on cancel): a lower bound for grpclib, which is built on ``h2`` and
  does more per call. Only when ``h2`` imports (it is not a project dependency).

Before measuring, ``sync-future`` proves it keeps the gateway's behaviour on the real node:
a tiny deadline ends in DEADLINE_EXCEEDED, a cancelled awaiter cancels the RPC, a wrong pinned
name is refused, and the receive limit holds. Rounds run every variant once, the order
reversed every other round (a process's CPU is its own, but the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway_overhead import MODEL, X, cluster_env

# name -> (kind, extra aio channel options, extra environment)
Variant = tuple[str, list[tuple[str, Any]], dict[str, str]]
VARIANTS: dict[str, Variant] = {
    "aio": ("aio", [], {}),
    "aio-percall": ("aio-percall", [], {}),
    "aio-nodeadline": ("aio-nodeadline", [], {}),
    "aio+local_subchannel_pool": ("aio", [("grpc.use_local_subchannel_pool", 1)], {}),
    "aio+target=latency": ("aio", [("grpc.optimization_target", "latency")], {}),
    "aio+target=throughput": ("aio", [("grpc.optimization_target", "throughput")], {}),
    "aio+channelz=0": ("aio", [("grpc.enable_channelz", 0)], {}),
    "aio+max_concurrent_streams": ("aio", [("grpc.max_concurrent_streams", 100)], {}),
    "aio+poll=poll": ("aio", [], {"GRPC_POLL_STRATEGY": "poll"}),
    "aio+fork_support=0": ("aio", [], {"GRPC_ENABLE_FORK_SUPPORT": "0"}),
    "sync-future": ("sync-future", [], {}),
    "sync-thread": ("sync-thread", [], {}),
    "h2-min": ("h2-min", [], {}),
}
TIMEOUT_S = 10.0
Call = Callable[[], Awaitable[bytes]]


# --- one variant, in its own process (`nodecall.py --worker NAME ...`) --------------------
def _request() -> Any:
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=MODEL, id="nodecall")
    spec = req.inputs.add()
    spec.name, spec.datatype = "input", "FP32"
    spec.shape.extend(X.shape)
    req.raw_input_contents.append(X.tobytes())
    req.outputs.add().name = "probabilities"
    return req


def _output(resp: Any) -> bytes:
    if len(resp.raw_output_contents) != 1:
        raise RuntimeError("node answered without raw output contents")
    return bytes(resp.raw_output_contents[0])


def _node_client(config: Path, extra: list[tuple[str, Any]], seen: list[Any]) -> Any:
    """The gateway's NodeClient; its channel gets `extra` options appended, and the options
    it was built with land in `seen` (so the sync variants use the very same)."""
    import grpc

    from gateway.config import load_config
    from gateway.routing.node_client import NodeClient, NodeCredentials

    made = grpc.aio.secure_channel

    def secure_channel(target: str, creds: Any, options: Any = None, **kw: Any) -> Any:
        options = list(options or []) + extra
        seen[:] = [target, creds, options]
        return made(target, creds, options=options, **kw)

    grpc.aio.secure_channel = secure_channel
    cfg = load_config(config)
    t = cfg.tls
    creds = NodeCredentials(t.node_ca, t.node_client_cert, t.node_client_key)
    return NodeClient(cfg.nodes[0], creds.channel_credentials(), cfg.limits.max_output_bytes)


def future_call(multicallable: Any, req: Any, timeout: float) -> Awaitable[Any]:
    """A sync channel's call as an awaitable: the RPC's done-callback (on the channel's
    polling thread) settles a loop future through `call_soon_threadsafe`; cancelling the
    awaiter cancels the RPC."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()
    rpc = multicallable.future(req, timeout=timeout)

    def settle(_: Any) -> None:
        if waiter.done():
            return
        exc = rpc.exception() if not rpc.cancelled() else asyncio.CancelledError()
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(rpc.result())

    rpc.add_done_callback(lambda _f: loop.call_soon_threadsafe(settle, None))

    async def wait() -> Any:
        try:
            return await waiter
        except asyncio.CancelledError:
            rpc.cancel()
            raise

    return wait()


async def _sync_checks(channel_for: Callable[[str, int], Any], req: Any) -> list[str]:
    """`sync-future` on the real node: deadline, cancellation, pinning, receive limit."""
    import grpc

    done = []
    stub = channel_for("", 0)
    try:
        await future_call(stub.ModelInfer, req, 1e-6)
        raise AssertionError("a 1 us deadline did not expire")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.code()
    done.append("deadline")
    rpcs: list[Any] = []
    orig = stub.ModelInfer.future

    class Spy:
        def future(self, r: Any, timeout: float) -> Any:
            rpcs.append(orig(r, timeout=timeout))
            return rpcs[-1]

    task = asyncio.ensure_future(future_call(Spy(), req, TIMEOUT_S))
    await asyncio.sleep(0)  # the call is on the wire (or about to be)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert rpcs and (rpcs[0].cancelled() or rpcs[0].done()), "the RPC was left running"
    done.append("cancel" if rpcs[0].cancelled() else "cancel(raced: call had finished)")
    try:
        await future_call(channel_for("n9.wrong.name", 0).ModelInfer, req, 5.0)
        raise AssertionError("a wrongly pinned name was not refused")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.code()
    done.append("pin")
    try:
        await future_call(channel_for("", 8).ModelInfer, req, 5.0)
        raise AssertionError("an answer over the receive limit got through")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.code()
    done.append("max-receive")
    return done


class H2Client:
    """Unary gRPC over one HTTP/2 connection with the `h2` package: just enough to call
    ModelInfer (no flow-control waits: the messages are far below the windows)."""

    def __init__(self, address: str, authority: str, ctx: Any) -> None:
        self.host, _, port = address.rpartition(":")
        self.port, self.authority, self.ctx = int(port), authority, ctx
        self.streams: dict[int, tuple[bytearray, dict[bytes, bytes], asyncio.Future[None]]] = {}

    async def connect(self) -> None:
        import h2.config  # type: ignore[import-not-found, unused-ignore]
        import h2.connection  # type: ignore[import-not-found, unused-ignore]

        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ctx, server_hostname=self.authority
        )
        assert self.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        from h2 import events as ev  # type: ignore[import-not-found, unused-ignore]

        try:
            while data := await self.reader.read(65536):
                for e in self.conn.receive_data(data):
                    st = self.streams.get(getattr(e, "stream_id", 0) or 0)
                    if st is None:
                        continue
                    if isinstance(e, ev.DataReceived):
                        st[0].extend(e.data)
                        self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, ev.ResponseReceived | ev.TrailersReceived):
                        st[1].update(e.headers)
                    elif isinstance(e, ev.StreamEnded) and not st[2].done():
                        st[2].set_result(None)
                    elif isinstance(e, ev.StreamReset) and not st[2].done():
                        st[2].set_exception(RuntimeError(f"stream reset {e.error_code}"))
                if out := self.conn.data_to_send():
                    self.writer.write(out)
        finally:
            for _, _, fut in self.streams.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))

    async def unary(self, path: bytes, msg: bytes, deadline_s: float) -> bytes:
        sid = self.conn.get_next_available_stream_id()
        buf, headers = bytearray(), dict[bytes, bytes]()
        fut = asyncio.get_running_loop().create_future()
        self.streams[sid] = (buf, headers, fut)
        self.conn.send_headers(
            sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":path", path),
                (b":authority", self.authority.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-timeout", b"%dm" % int(deadline_s * 1000)),
            ],
        )
        self.conn.send_data(sid, b"\0" + len(msg).to_bytes(4, "big") + msg, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        try:
            async with asyncio.timeout(deadline_s):
                await fut
        except BaseException:
            if not fut.done():  # cancelled or late: the node stops the stream
                self.conn.reset_stream(sid, 8)  # CANCEL
                self.writer.write(self.conn.data_to_send())
            raise
        finally:
            del self.streams[sid]
        if headers.get(b"grpc-status") != b"0":
            raise RuntimeError(f"grpc-status {headers.get(b'grpc-status')!r}")
        if len(buf) < 5 or buf[0] != 0 or int.from_bytes(buf[1:5], "big") != len(buf) - 5:
            raise RuntimeError("not one uncompressed gRPC message")
        return bytes(buf[5:])

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()


async def _h2_setup(config: Path) -> tuple[Call, Callable[[], Awaitable[None]], list[str]]:
    import ssl

    from tritonclient.grpc import service_pb2

    from gateway.config import load_config

    cfg = load_config(config)
    node = cfg.nodes[0]
    ctx = ssl.create_default_context(cafile=str(cfg.tls.node_ca))
    ctx.load_cert_chain(str(cfg.tls.node_client_cert), str(cfg.tls.node_client_key))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the node CA is the anchor, as for gRPC
    ctx.set_alpn_protocols(["h2"])
    client = H2Client(node.address, node.dns_name, ctx)
    await client.connect()
    req = _request()
    path = b"/inference.GRPCInferenceService/ModelInfer"

    async def call() -> bytes:
        raw = await client.unary(path, req.SerializeToString(), TIMEOUT_S)
        return _output(service_pb2.ModelInferResponse.FromString(raw))

    return call, client.close, []


async def _setup(name: str, config: Path) -> tuple[Call, Callable[[], Awaitable[None]], list[str]]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    kind, extra, _env = VARIANTS[name]
    if kind == "h2-min":
        return await _h2_setup(config)
    req = _request()
    seen: list[Any] = []
    node = _node_client(config, extra, seen)
    stub = node._stub  # builds the gateway's channel (and records its options)
    checks: list[str] = []
    if kind.startswith("aio"):
        mc = stub.ModelInfer
        channel = node._channel
        path = "/inference.GRPCInferenceService/ModelInfer"

        async def aio() -> bytes:
            return _output(await mc(req, timeout=TIMEOUT_S))

        async def percall() -> bytes:
            fresh = channel.unary_unary(
                path,
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            return _output(await fresh(req, timeout=TIMEOUT_S))

        async def nodeadline() -> bytes:
            return _output(await mc(req))

        call = {"aio": aio, "aio-percall": percall, "aio-nodeadline": nodeadline}[kind]
        return call, node.close, checks

    await node.close()
    target, creds, options = seen
    channels: list[Any] = []

    def channel_for(pin: str, max_receive: int) -> Any:
        opts = dict(options)
        if pin:
            opts["grpc.ssl_target_name_override"] = opts["grpc.default_authority"] = pin
        if max_receive:
            opts["grpc.max_receive_message_length"] = max_receive
        channels.append(grpc.secure_channel(target, creds, options=list(opts.items())))
        return service_pb2_grpc.GRPCInferenceServiceStub(channels[-1])

    sync_stub = channel_for("", 0)
    mc = sync_stub.ModelInfer

    async def close() -> None:
        for ch in channels:
            ch.close()

    if kind == "sync-future":
        checks = await _sync_checks(channel_for, req)

        async def fut() -> bytes:
            return _output(await future_call(mc, req, TIMEOUT_S))

        return fut, close, checks
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(16, thread_name_prefix="nodecall")
    loop = asyncio.get_running_loop()

    async def thread() -> bytes:
        return _output(await loop.run_in_executor(pool, lambda: mc(req, timeout=TIMEOUT_S)))

    async def close_all() -> None:
        await close()
        pool.shutdown()

    return thread, close_all, checks


async def _measure(name: str, config: Path, calls: int, conc: int, warmup: int) -> dict[str, Any]:
    import psutil

    me = psutil.Process()

    def main_cpu() -> float:  # the loop's thread (the main thread's id is the pid)
        return next((t.user_time + t.system_time for t in me.threads() if t.id == me.pid), 0.0)

    call, close, checks = await _setup(name, config)
    want = await call()
    out: dict[str, Any] = {"variant": name, "checks": checks, "threads": 0}
    try:
        for _ in range(warmup):
            assert await call() == want
        m0, c0, t0 = main_cpu(), me.cpu_times(), time.perf_counter()
        for _ in range(calls):
            await call()
        m1, c1, t1 = main_cpu(), me.cpu_times(), time.perf_counter()
        out["seq_cpu_us"] = (c1.user + c1.system - c0.user - c0.system) / calls * 1e6
        out["seq_loop_us"] = (m1 - m0) / calls * 1e6
        out["seq_wall_us"] = (t1 - t0) / calls * 1e6

        async def worker(n: int) -> None:
            for _ in range(n):
                await call()

        await asyncio.gather(*(worker(max(1, warmup // conc)) for _ in range(conc)))
        per = calls // conc
        m0, c0, t0 = main_cpu(), me.cpu_times(), time.perf_counter()
        await asyncio.gather(*(worker(per) for _ in range(conc)))
        m1, c1, t1 = main_cpu(), me.cpu_times(), time.perf_counter()
        out["conc_cpu_us"] = (c1.user + c1.system - c0.user - c0.system) / (per * conc) * 1e6
        out["conc_loop_us"] = (m1 - m0) / (per * conc) * 1e6
        out["conc_wall_us"] = (t1 - t0) / (per * conc) * 1e6
        out["threads"] = me.num_threads()
    finally:
        await close()
    return out


def worker_main(name: str, config: Path, calls: int, conc: int, warmup: int) -> None:
    import uvloop

    result = uvloop.run(_measure(name, config, calls, conc, warmup))
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ----------------------------------------------------------------------------
def run_variant(name: str, config: Path, args: Any) -> dict[str, Any]:
    env = os.environ | VARIANTS[name][2]
    cmd = [sys.executable, __file__, "--worker", name, "--config", str(config)]
    cmd += ["--calls", str(args.calls), "--concurrency", str(args.concurrency)]
    cmd += ["--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def report(rows: list[dict[str, Any]], names: list[str], conc: int) -> None:
    base = {k: statistics.median(r[k] for r in rows if r["variant"] == "aio") for k in
            ("seq_cpu_us", "conc_cpu_us")}  # fmt: skip
    print(
        f"\n{'variant':<28}{'seq CPU us':>11}{'vs aio':>8}{f'c={conc} CPU us':>14}{'vs aio':>8}"
        f"{'seq wall us':>12}{'threads':>8}{'loop seq/c':>12}   per round: seq / c CPU us"
    )
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        s = statistics.median(r["seq_cpu_us"] for r in mine)
        c = statistics.median(r["conc_cpu_us"] for r in mine)
        w = statistics.median(r["seq_wall_us"] for r in mine)
        ls = statistics.median(r["seq_loop_us"] for r in mine)
        lc = statistics.median(r["conc_loop_us"] for r in mine)
        per = ", ".join(f"{r['seq_cpu_us']:.0f}/{r['conc_cpu_us']:.0f}" for r in mine)
        print(
            f"{name:<28}{s:>11.0f}{s / base['seq_cpu_us']:>8.2f}{c:>14.0f}"
            f"{c / base['conc_cpu_us']:>8.2f}{w:>12.0f}{mine[-1]['threads']:>8}"
            f"{f'{ls:.0f}/{lc:.0f}':>12}   {per}"
        )
    checks = {r["variant"]: r["checks"] for r in rows if r["checks"]}
    for name, done in checks.items():
        print(f"{name} checks on the real node: {', '.join(done)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="measured calls per mode")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured calls first")
    ap.add_argument("--concurrency", type=int, default=8, help="tasks calling at once")
    ap.add_argument("--rounds", type=int, default=2, help="every variant once per round")
    ap.add_argument("--only", choices=VARIANTS, action="append", help="repeatable")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the rows as JSON")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker, args.config, args.calls, args.concurrency, args.warmup)
        return 0
    names = [n for n in VARIANTS if not args.only or n in args.only]
    if importlib.util.find_spec("h2") is None and "h2-min" in names:
        names.remove("h2-min")
    if "aio" not in names:
        names.insert(0, "aio")  # the baseline every ratio is against
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ztgate-nodecall-") as tmp:
        with cluster_env(Path(tmp), 1) as cluster:
            for rnd in range(args.rounds):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    print(f"  round {rnd + 1} {name} ...", flush=True)
                    rows.append(run_variant(name, cluster.config_path, args) | {"round": rnd})
    import grpc

    print(
        f"\nmachine: {os.cpu_count()} cores ({platform.machine()}), Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, load average before the run "
        f"{load[0]:.2f}; {args.calls} calls per mode after {args.warmup} warm-up, uvloop"
    )
    report(rows, names, args.concurrency)
    if args.json:
        args.json.write_text(json.dumps({"load": load, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
