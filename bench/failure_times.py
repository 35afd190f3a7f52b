"""How fast each failure surfaces: the durations the tests no longer assert.

Run: ``.venv/bin/python bench/failure_times.py [--repeat 5] [--only NAME ...]``

The tests check what happens on each failure (the exception and its reason, the 503, no
process left behind) without a wall clock; this script measures how long it takes, on
this machine, now. Everything lives in a temp dir and is stopped at the end.

- ``mpc-kill``: SIGKILL of a party mid-request until the gateway's ``MpcUnavailable``
  (tests/test_mpc.py::test_dead_or_silent_party_ends_the_session_and_leaves_nothing);
- ``mpc-stop``: SIGSTOP of a party mid-request until ``MpcUnavailable``, against the 2 s
  message deadline (same test);
- ``store-unreachable``: one call to a Redis on a closed port until ``StoreUnavailable``,
  timeout 0.2 s (tests/test_state.py::test_unreachable_redis_raises_store_unavailable);
- ``store-silent``: the same against a server that accepts and never answers
  (tests/test_state.py::test_silent_redis_times_out_instead_of_hanging);
- ``wire-deadline``: how far past its deadline ``read_frame`` on half a frame raises
  ``TimeoutError`` (tests/test_mpc.py::test_wire_frames_only_int64_tensors_and_bounded_json);
- ``node-deadline``: how far past an 8 s start deadline a node whose model never loads is
  killed and ``NodeStartError`` raised
  (tests/test_node.py::test_node_that_never_gets_ready_is_killed_at_the_deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.pki import PKI  # noqa: E402
from gateway.ports import free_port  # noqa: E402

SITE = "site-a"
NAMES = (
    "mpc-kill",
    "mpc-stop",
    "store-unreachable",
    "store-silent",
    "wire-deadline",
    "node-deadline",
)


def report(name: str, xs: list[float], note: str = "") -> None:
    if not xs:
        print(f"{name:<18} no measurement")
        return
    ms = [x * 1e3 for x in xs]
    print(
        f"{name:<18} n={len(xs):<3} median {statistics.median(ms):8.1f} ms"
        f"  min {min(ms):8.1f}  max {max(ms):8.1f}  {note}"
    )


# --------------------------------------------------------------------------- MPC


def start_party(pki: PKI, name: str, base: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    pki.ensure("node", name)
    cmd = [sys.executable, "-m", "mpc.party", "--name", name, "--pki", str(pki.root)]
    with (base / f"{name}.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "LISTENING" not in line:
        proc.kill()
        raise RuntimeError(f"party {name} did not start; see {base}")
    return proc, line.split()[-1]


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def mpc_failure(pki: PKI, base: Path, how: str, repeat: int) -> list[float]:
    """Kill (or stop) party n2 once the request is running on both parties."""
    from mpc.model import MpcModel
    from mpc.session import MpcSession, MpcSettings, MpcUnavailable, PartyEndpoint

    model = MpcModel.from_onnx(REPO / "gateway" / "examples" / "risk.onnx", "risk")
    message_timeout = 2.0
    settings = MpcSettings.from_pki(pki.root, SITE, message_timeout_s=message_timeout)
    big = np.random.default_rng(0).normal(size=(32768, model.input_dim))  # seconds of MPC
    times: list[float] = []
    for i in range(repeat):
        p1, a1 = start_party(pki, "n1", base)
        p2, a2 = start_party(pki, "n2", base)
        try:
            eps = [PartyEndpoint("n1", a1, "prov-a"), PartyEndpoint("n2", a2, "prov-b")]
            session = await MpcSession.start(model, eps, settings)
            task = asyncio.ensure_future(session.infer(big))
            await asyncio.sleep(0.5)  # into the request (this is a measurement, not a test)
            if task.done():
                print(f"  {how} run {i}: the request finished before the fault; skipped")
                continue
            if how == "kill":
                p2.kill()
            else:
                os.kill(p2.pid, signal.SIGSTOP)
            t0 = time.perf_counter()
            try:
                await task
            except MpcUnavailable:
                times.append(time.perf_counter() - t0)
            await session.close()
        finally:
            stop(p1)
            stop(p2)
    return times


# --------------------------------------------------------------------------- Redis


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def store_failure(silent: bool, repeat: int) -> list[float]:
    from gateway.state import StoreUnavailable
    from gateway.state.redis import RedisStore

    server = None
    if silent:

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(4096):
                pass
            writer.close()

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        port = closed_port()
    times: list[float] = []
    calls: list[Callable[[RedisStore], Awaitable[object]]] = [
        lambda s: s.record_failure("n"),
        lambda s: s.eject("n", 1.0, 2.0),
        lambda s: s.take_token("k", 1.0, 1),
        lambda s: s.revocations_since(0),
        lambda s: s.check_nonce("x", 1.0),
    ]
    try:
        for _ in range(repeat):
            store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
            try:
                for call in calls:
                    t0 = time.perf_counter()
                    try:
                        await call(store)
                    except StoreUnavailable:
                        times.append(time.perf_counter() - t0)
            finally:
                await store.close()
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
    return times


# --------------------------------------------------------------------------- wire


async def wire_deadline(repeat: int) -> list[float]:
    from mpc.wire import encode_tensor, read_frame

    frame = encode_tensor(np.arange(6, dtype=np.int64))
    late: list[float] = []
    for _ in range(repeat):
        reader = asyncio.StreamReader()
        reader.feed_data(frame[:5])
        deadline = time.monotonic() + 0.2
        try:
            await read_frame(reader, deadline)
        except TimeoutError:
            late.append(time.monotonic() - deadline)
    return late


# --------------------------------------------------------------------------- node

STUCK_MODEL = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)

    def execute(self, requests):
        return []
"""

STUCK_CONFIG = """
name: "stuck"
backend: "python"
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""


def node_deadline(pki: PKI, base: Path, repeat: int, deadline_s: float = 8.0) -> list[float]:
    from gateway.node.triton import NodeSpec, NodeStartError, TritonProcess, triton_home

    home = triton_home(base / "triton-home")
    repo = base / "stuck-repo"
    (repo / "stuck" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "stuck" / "config.pbtxt").write_text(STUCK_CONFIG)
    (repo / "stuck" / "1" / "model.py").write_text(STUCK_MODEL)
    issued = pki.ensure("node", "n9")
    past: list[float] = []
    for i in range(repeat):
        spec = NodeSpec(
            name="n9",
            region="bench",
            provider="bench",
            grpc_port=free_port(),
            http_port=free_port(),
            repository=repo,
            cert=issued.cert,
            key=issued.key,
            client_ca=pki.gateway_ca_bundle(SITE),
            workdir=base / f"node-{i}",
        )
        proc = TritonProcess(spec, home)
        t0 = time.monotonic()
        try:
            proc.start(deadline_s=deadline_s)
        except NodeStartError:
            past.append(time.monotonic() - t0 - deadline_s)
        finally:
            proc.stop()
    return past


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", action="append", choices=NAMES)
    args = ap.parse_args()
    only = set(args.only or NAMES)
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 shared cores read noisy)")
    with tempfile.TemporaryDirectory(prefix="ztgate-failure-bench-") as tmp:
        base = Path(tmp)
        pki = PKI.init(base / "pki", sites=[SITE])
        if "mpc-kill" in only:
            report("mpc-kill", asyncio.run(mpc_failure(pki, base, "kill", args.repeat)))
        if "mpc-stop" in only:
            times = asyncio.run(mpc_failure(pki, base, "stop", args.repeat))
            report("mpc-stop", times, "(message deadline 2.0 s)")
        if "store-unreachable" in only:
            report("store-unreachable", asyncio.run(store_failure(False, args.repeat)))
        if "store-silent" in only:
            report("store-silent", asyncio.run(store_failure(True, args.repeat)), "(timeout 0.2 s)")
        if "wire-deadline" in only:
            report("wire-deadline", asyncio.run(wire_deadline(args.repeat)), "(past the deadline)")
        if "node-deadline" in only:
            past = node_deadline(pki, base, args.repeat)
            report("node-deadline", past, "(past the 8 s deadline, stop() included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
