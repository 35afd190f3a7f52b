"""Which server could carry the gRPC front: grpc.aio against grpclib, with Starlette for scale.

Run: ``.venv/bin/python bench/grpc_servers.py [--requests 2000] [--rounds 3] [--check]``
(grpclib is not a ztgate dependency: put it on ``PYTHONPATH``, e.g. ``pip install
--target /tmp/grpclib grpclib==0.4.9``.)

Issue 18's profile (bench/README.md) put the gRPC front's extra CPU at c=8 on grpc.aio's
completion-queue thread hand-offs. This measures whether a server whose HTTP/2 runs on
the event loop itself is cheaper, before any of the front moves: three servers, each its
own process on uvloop, over mTLS with client certificates required, serving the same
trivial unary ``ModelInfer`` (the inputs echoed back as outputs, raw tensors, the peer
certificate read per request as the front does):

* ``grpc-aio``  grpc.aio, one generic handler (as gateway/grpc_front.py registers it);
* ``grpclib``   grpclib (pure-Python HTTP/2 on asyncio), a ``__mapping__`` of
  tritonclient's own message classes;
* ``http``      Starlette on uvicorn (httptools), Triton's binary-tensor body, the HTTP
  front's stack without the pipeline.

Clients: tritonclient.grpc (tritonclient.http for ``http``), C threads in this process,
one client (one connection) each. The servers take turns, round after round, so drifting
load on a shared machine spreads over all three. ``CPU ms/req`` is the server process's
CPU time (all threads, /proc) over the requests it served in that run.

``--check`` instead runs what the front needs against each gRPC server: the verified peer
certificate per RPC, a request without a client certificate, a status with trailing
metadata, tritonclient's ``compression_algorithm="gzip"``, the bidirectional stream of
``start_stream``, and a 32 MiB message (the receive cap).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import queue
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.grpc import service_pb2

SERVICE = "inference.GRPCInferenceService"
KINDS = ("grpc-aio", "grpclib", "http")
X = np.arange(4, dtype=np.float32).reshape(1, 4)
FAIL = "fail"  # the model name a server refuses with a status and trailing metadata
SINK = "sink"  # the model name whose inputs are not echoed (the receive-cap check)
CAP = 16 << 20  # the receive cap, where the server offers one
TICK = os.sysconf("SC_CLK_TCK")


# --- certificates -------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    cn: str, key: ec.EllipticCurvePrivateKey, ca: tuple[x509.Certificate, Any] | None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer, signer = (ca[0].subject, ca[1]) if ca else (_name(cn), key)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if cn == "server":
        import ipaddress

        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(signer, hashes.SHA256())


def make_pki(root: Path) -> None:
    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (root / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (root / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("bench-ca", ca_key, None)
    write("ca", ca, ca_key)
    for cn in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(cn, _issue(cn, key, (ca, ca_key)), key)


# --- the servers --------------------------------------------------------------------------
class Load:
    """A stand-in for the pipeline around a node call (`--work`, `--wait-ms`): Python work on
    the loop, then a wait on it, so each server's I/O competes with a busy loop for the GIL
    and several requests are in flight at once, as in the gateway."""

    iterations = 0
    wait_s = 0.0


async def stand_in() -> None:
    for _ in range(Load.iterations):
        pass
    if Load.wait_s:
        await asyncio.sleep(Load.wait_s)


def echo(request: Any, peer_der: bytes | None) -> Any:
    """The inputs back as outputs (raw), and the peer certificate's CN as a parameter so
    `--check` can see the server had it."""
    resp = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for t in request.inputs:
        out = resp.outputs.add()
        out.name, out.datatype = t.name, t.datatype
        out.shape.extend(t.shape)
    if request.model_name != SINK:
        resp.raw_output_contents.extend(request.raw_input_contents)
    if peer_der is not None:
        cert = x509.load_der_x509_certificate(peer_der) if request.id == "peer" else None
        cn = cert.subject.rfc4514_string() if cert else "seen"
        resp.parameters["peer"].string_param = cn
    return resp


def serve_grpc_aio(root: Path, port: int) -> None:
    import grpc

    async def infer(request: Any, context: Any) -> Any:
        pem = context.auth_context().get("x509_pem_cert") or []
        der = ssl.PEM_cert_to_DER_cert(pem[0].decode()) if pem else None
        if request.model_name == FAIL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "refused",
                trailing_metadata=(("ztgate-problem-type", "urn:test"),),
            )
        await stand_in()
        return echo(request, der)

    async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield service_pb2.ModelStreamInferResponse(infer_response=echo(request, None))

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            infer,
            request_deserializer=service_pb2.ModelInferRequest.FromString,
            response_serializer=service_pb2.ModelInferResponse.SerializeToString,
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=service_pb2.ModelInferRequest.FromString,
            response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
        ),
    }

    async def main() -> None:
        server = grpc.aio.server(options=(("grpc.max_receive_message_length", CAP),))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        creds = grpc.ssl_server_credentials(
            [((root / "server.key").read_bytes(), (root / "server.crt").read_bytes())],
            root_certificates=(root / "ca.crt").read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    _run(main)


def _server_ssl(root: Path, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(root / "ca.crt"))
    ctx.load_cert_chain(str(root / "server.crt"), str(root / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(alpn)
    return ctx


def serve_grpclib(root: Path, port: int) -> None:
    from grpclib.const import Cardinality, Handler, Status
    from grpclib.server import Server, Stream

    def peer_der(stream: Stream[Any, Any]) -> bytes | None:
        # `Peer.cert()` gives only `getpeercert()`'s dict; the DER (what the front parses)
        # needs the transport's ssl object, which grpclib keeps private.
        obj = stream.peer._transport.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True) if obj is not None else None

    class Echo:
        async def infer(self, stream: Stream[Any, Any]) -> None:
            request = await stream.recv_message()
            assert request is not None
            if request.model_name == FAIL:
                await stream.send_trailing_metadata(
                    status=Status.INVALID_ARGUMENT,
                    status_message="refused",
                    metadata={"ztgate-problem-type": "urn:test"},
                )
                return
            await stand_in()
            await stream.send_message(echo(request, peer_der(stream)))

        async def stream(self, stream: Stream[Any, Any]) -> None:
            async for request in stream:
                reply = echo(request, None)
                await stream.send_message(
                    service_pb2.ModelStreamInferResponse(infer_response=reply)
                )

        def __mapping__(self) -> dict[str, Handler]:
            return {
                f"/{SERVICE}/ModelInfer": Handler(
                    self.infer,
                    Cardinality.UNARY_UNARY,
                    service_pb2.ModelInferRequest,
                    service_pb2.ModelInferResponse,
                ),
                f"/{SERVICE}/ModelStreamInfer": Handler(
                    self.stream,
                    Cardinality.STREAM_STREAM,
                    service_pb2.ModelInferRequest,
                    service_pb2.ModelStreamInferResponse,
                ),
            }

    async def main() -> None:
        server = Server([Echo()])
        await server.start("127.0.0.1", port, ssl=_server_ssl(root, ["h2"]))
        print("ready", flush=True)
        await server.wait_closed()

    _run(main)


def serve_http(root: Path, port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        body = await request.body()
        await stand_in()
        length = int(request.headers["inference-header-content-length"])
        doc = json.loads(body[:length])
        outputs, offset = [], length
        for t in doc["inputs"]:
            size = t["parameters"]["binary_data_size"]
            outputs.append(
                {
                    "name": t["name"],
                    "datatype": t["datatype"],
                    "shape": t["shape"],
                    "parameters": {"binary_data_size": size},
                }
            )
            offset += size
        head = json.dumps({"model_name": request.path_params["name"], "outputs": outputs})
        return Response(
            head.encode() + body[length:],
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        ssl_certfile=str(root / "server.crt"),
        ssl_keyfile=str(root / "server.key"),
        ssl_ca_certs=str(root / "ca.crt"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await task

    _run(main)


def _run(main: Callable[[], Any]) -> None:
    import uvloop

    uvloop.run(main())


SERVE = {"grpc-aio": serve_grpc_aio, "grpclib": serve_grpclib, "http": serve_http}


# --- clients ------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grpc_client(root: Path, port: int, cert: bool = True) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(
        f"127.0.0.1:{port}",
        ssl=True,
        root_certificates=str(root / "ca.crt"),
        private_key=str(root / "client.key") if cert else None,
        certificate_chain=str(root / "client.crt") if cert else None,
        channel_args=[("grpc.use_local_subchannel_pool", 1)],  # a connection per client
    )


def client_call(kind: str, root: Path, port: int) -> tuple[Callable[[], None], Callable[[], None]]:
    if kind == "http":
        import tritonclient.http as httpclient

        hc = httpclient.InferenceServerClient(
            f"127.0.0.1:{port}",
            ssl=True,
            ssl_options={
                "ca_certs": str(root / "ca.crt"),
                "certfile": str(root / "client.crt"),
                "keyfile": str(root / "client.key"),
            },
            network_timeout=10.0,
        )
        hin = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        hin.set_data_from_numpy(X, binary_data=True)
        hout = httpclient.InferRequestedOutput("INPUT0", binary_data=True)

        def hcall() -> None:
            hc.infer("echo", [hin], outputs=[hout]).as_numpy("INPUT0")

        return hcall, hc.close
    import tritonclient.grpc as grpcclient

    gc = grpc_client(root, port)
    gin = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    gin.set_data_from_numpy(X)

    def gcall() -> None:
        got = gc.infer("echo", [gin], client_timeout=10).as_numpy("INPUT0")
        assert got is not None and np.array_equal(got, X)

    return gcall, gc.close


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: all threads


def run(
    kind: str, root: Path, port: int, pid: int, requests: int, warmup: int, c: int
) -> dict[str, float]:
    clients = [client_call(kind, root, port) for _ in range(c)]
    try:
        for call, _ in clients:  # each connection open and warm before the clock
            for _ in range(max(1, warmup // c)):
                call()
        work: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(requests):
            work.put(i)
        latencies: list[float] = []
        errors: list[BaseException] = []

        def worker(call: Callable[[], None]) -> None:
            while True:
                try:
                    work.get_nowait()
                except queue.Empty:
                    return
                t = time.perf_counter()
                try:
                    call()
                except BaseException as exc:
                    errors.append(exc)
                    return
                latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=worker, args=(call,)) for call, _ in clients]
        cpu0, t0 = cpu_s(pid), time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall, cpu = time.perf_counter() - t0, cpu_s(pid) - cpu0
    finally:
        for _, close in clients:
            close()
    if errors:
        raise RuntimeError(f"{kind}: {errors[0]!r}")
    latencies.sort()
    return {
        "cpu_ms": 1000 * cpu / requests,
        "rps": requests / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
    }


# --- capability checks --------------------------------------------------------------------
def check(kind: str, root: Path, port: int) -> dict[str, str]:
    import grpc
    import tritonclient.grpc as grpcclient

    out: dict[str, str] = {}
    client = grpc_client(root, port)
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(X)

    def attempt(what: str, fn: Callable[[], str]) -> None:
        try:
            out[what] = fn()
        except Exception as exc:
            out[what] = f"FAILS: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    def peer() -> str:
        r = client.infer("echo", [inp], request_id="peer").get_response()
        return f"ok ({r.parameters['peer'].string_param})"

    def gzip() -> str:
        # gRPC sends a message uncompressed when gzip would not shrink it: zeros do.
        zeros = np.zeros((1, 4096), dtype=np.float32)
        z = grpcclient.InferInput("INPUT0", list(zeros.shape), "FP32")
        z.set_data_from_numpy(zeros)
        r = client.infer("echo", [z], compression_algorithm="gzip")
        assert np.array_equal(r.as_numpy("INPUT0"), zeros)
        return "ok"

    def stream() -> str:
        got: queue.SimpleQueue[Any] = queue.SimpleQueue()
        client.start_stream(callback=lambda result, error: got.put(error or result))
        try:
            for i in range(3):
                client.async_stream_infer("echo", [inp], request_id=str(i))
            ids = [got.get(timeout=10) for _ in range(3)]
        finally:
            client.stop_stream()
        bad = [r for r in ids if not hasattr(r, "get_response")]
        assert not bad, bad
        return f"ok ({[r.get_response().id for r in ids]})"

    def status() -> str:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(
                (root / "ca.crt").read_bytes(),
                (root / "client.key").read_bytes(),
                (root / "client.crt").read_bytes(),
            ),
        )
        call = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        try:
            call(service_pb2.ModelInferRequest(model_name=FAIL), timeout=10)
        except grpc.RpcError as exc:
            md = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
            return f"ok ({exc.code().name}, {exc.details()!r}, {md.get('ztgate-problem-type')})"  # type: ignore[attr-defined]
        finally:
            channel.close()
        return "FAILS: no error"

    def no_cert() -> str:
        anon = grpc_client(root, port, cert=False)
        try:
            anon.is_server_live(client_timeout=10)
        except Exception as exc:
            return f"refused ({str(exc).splitlines()[0][:100]})"
        finally:
            anon.close()
        return "FAILS: served without a certificate"

    def big() -> str:
        blob = np.zeros((1, 8 << 20), dtype=np.float32)  # 32 MiB
        b = grpcclient.InferInput("INPUT0", list(blob.shape), "FP32")
        b.set_data_from_numpy(blob)
        try:
            client.infer(SINK, [b], client_timeout=30)
        except Exception as exc:
            return f"refused ({str(exc).splitlines()[0][:100]})"
        return f"accepted whole (the cap would be {CAP >> 20} MiB)"

    for what, fn in (
        ("peer certificate per RPC", peer),
        ("no client certificate", no_cert),
        ("status + trailing metadata", status),
        ('compression_algorithm="gzip"', gzip),
        ("ModelStreamInfer (start_stream)", stream),
        ("32 MiB message", big),
    ):
        attempt(what, fn)
    client.close()
    return out


# --- main ---------------------------------------------------------------------------------
def start(kind: str, root: Path, load: str) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "serve", kind, str(port), str(root), load],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{kind} server did not start")
    return proc, port


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        iterations, wait_ms = sys.argv[5].split(",")
        Load.iterations, Load.wait_s = int(iterations), float(wait_ms) / 1000
        SERVE[sys.argv[2]](Path(sys.argv[4]), int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    ap.add_argument("--concurrency", type=int, default=8, help="threads, one client each")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each server, alternating")
    ap.add_argument("--kind", action="append", choices=KINDS, help="servers (default all)")
    ap.add_argument("--check", action="store_true", help="capabilities, not figures")
    ap.add_argument("--work", type=int, default=0, help="empty-loop iterations per request")
    ap.add_argument("--wait-ms", type=float, default=0.0, help="a wait per request, on the loop")
    args = ap.parse_args()
    kinds = args.kind or list(KINDS)
    with tempfile.TemporaryDirectory(prefix="ztgate-grpc-servers-") as tmp:
        root = Path(tmp)
        make_pki(root)
        servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
        try:
            for k in kinds:
                servers[k] = start(k, root, f"{args.work},{args.wait_ms}")
            if args.check:
                for kind in kinds:
                    if kind != "http":
                        print(f"\n{kind}")
                        for what, got in check(kind, root, servers[kind][1]).items():
                            print(f"  {what:34} {got}")
                return 0
            print(f"load average before: {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
            t = time.process_time()
            for _ in range(200):
                for _ in range(args.work):
                    pass
            work_ms = (time.process_time() - t) / 200 * 1000
            print(
                f"stand-in: --work {args.work} is ~{work_ms:.3f} ms of CPU, "
                f"--wait-ms {args.wait_ms}"
            )
            results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
            for r in range(args.rounds):
                for kind in kinds:
                    proc, port = servers[kind]
                    got = run(
                        kind, root, port, proc.pid, args.requests, args.warmup, args.concurrency
                    )
                    results[kind].append(got)
                    print(
                        f"round {r + 1} {kind:9} CPU {got['cpu_ms']:.3f} ms/req  "
                        f"{got['rps']:7.0f} req/s  p50 {got['p50_ms']:.2f} ms",
                        flush=True,
                    )
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            print(
                f"\nc={args.concurrency}, {args.requests} requests per run\n"
                "| server | CPU ms/req, each run | median | req/s (median) |\n|---|---|---:|---:|"
            )
            for kind, runs in results.items():
                cpus = ", ".join(f"{x['cpu_ms']:.3f}" for x in runs)
                med = statistics.median(x["cpu_ms"] for x in runs)
                rps = statistics.median(x["rps"] for x in runs)
                print(f"| {kind} | {cpus} | {med:.3f} | {rps:.0f} |")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
