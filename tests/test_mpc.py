"""MPC mode: real party processes on loopback, two node parties, the gateway's dealer.

Sized for 2 cores: every party runs with OMP_NUM_THREADS=1, the model is the `risk`
example (6 -> 16 -> 1, ReLU, sigmoid), sessions are short. The leak tests record every
frame a node party receives (``--record``) and search it for what it must not learn
(`mpc.audit`); the same check is shown to trip on three broken layouts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import pytest

from gateway.pki import PKI
from mpc.audit import Secrets, View, find_leaks
from mpc.model import SCALE, ModelError, MpcModel, decode, encode, reconstruct, share
from mpc.session import (
    MpcBusy,
    MpcError,
    MpcSession,
    MpcSettings,
    MpcUnavailable,
    PartyEndpoint,
)
from mpc.tls import Credentials, TrustStore, client_context
from mpc.wire import WireError, decode_tensor, encode_json, encode_tensor, read_frame
from tests.conftest import SITE

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.pipeline import Answer, Asked

pytestmark = pytest.mark.timeout(120)
on_loop = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[1]
END_CERT = "-----END CERTIFICATE-----\n"
RISK = REPO / "gateway" / "examples" / "risk.onnx"
# CrypTen's sigmoid is a polynomial/Newton approximation on 16-bit fixed point; measured
# max abs error on the risk model over N(0, 1.5) inputs is ~2e-3.
TOLERANCE = 1e-2
Array = np.ndarray[Any, Any]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# =========================================================================== processes


@dataclass
class Party:
    name: str
    proc: subprocess.Popen[str]
    address: str
    record: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def own_pki_flags(pki: PKI, name: str) -> list[str]:
    """The node's identity file by file, as on a customer PKI (no --pki directory)."""
    issued = pki.ensure("node", name)
    return [
        "--cert", str(issued.cert), "--key", str(issued.key),
        "--node-ca", str(pki.node_ca_bundle()), "--gateway-ca", str(pki.gateway_ca_bundle(SITE)),
        "--site", SITE,
    ]  # fmt: skip


def start_parties(
    pki: PKI,
    names: Sequence[str],
    base: Path,
    code: str | None = None,
    *,
    flags: Sequence[str] = (),
    own_pki: bool = False,
) -> list[Party]:
    """Start party workers in parallel; ``code`` replaces ``-m mpc.party`` (leaky variants);
    ``own_pki``: the node's files given one by one instead of ``--pki``."""
    base.mkdir(parents=True, exist_ok=True)
    pending = []
    for name in names:
        pki.ensure("node", name)
        record, log = base / "record" / name, base / f"{name}.log"
        head = [sys.executable, "-m", "mpc.party"] if code is None else [sys.executable, "-c", code]
        identity = own_pki_flags(pki, name) if own_pki else ["--pki", str(pki.root)]
        cmd = [*head, "--name", name, *identity, "--record", str(record), *flags]
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        pending.append((name, proc, record, log))
    parties = []
    for name, proc, record, log in pending:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "LISTENING" not in line:
            proc.kill()
            raise RuntimeError(f"party {name} did not start: {log.read_text()[-2000:]}")
        parties.append(Party(name, proc, line.split()[-1], record, log))
    return parties


def endpoints(parties: Sequence[Party]) -> list[PartyEndpoint]:
    return [PartyEndpoint(p.name, p.address, f"prov-{p.name}") for p in parties]


@pytest.fixture(scope="module")
def parties(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Party]]:
    ps = start_parties(pki, ["n1", "n2"], tmp_path_factory.mktemp("mpc-parties"))
    yield ps
    for p in ps:
        p.stop()


@pytest.fixture(scope="module")
def settings(pki: PKI) -> MpcSettings:
    # Deadlines, not claims: protocol messages follow each other within milliseconds, and
    # 30 s leaves a loaded machine room (the deadline tests set their own).
    return MpcSettings.from_pki(pki.root, SITE, message_timeout_s=30.0, setup_timeout_s=60.0)


@pytest.fixture(scope="module")
def model() -> MpcModel:
    return MpcModel.from_onnx(RISK, "risk")


def plaintext(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    sess = ort.InferenceSession(str(RISK), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = sess.run(None, {"input": x.astype(np.float32)})[0]
    return out


def inputs(batch: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).normal(0.0, 1.5, size=(batch, 6)).astype(np.float32)


class ShareLog:
    """The gateway's side of every secret: plaintext, encoding, shares by rank."""

    def __init__(self, model: MpcModel) -> None:
        self.model = model
        self.secrets = Secrets()

    def __call__(
        self,
        kind: str,
        name: str,
        shares: Sequence[np.ndarray[Any, Any]],
        enc: np.ndarray[Any, Any],
    ) -> None:
        plain = self.model.weights[name] if kind == "weight" else decode(enc)
        self.secrets.add(plain, enc, shares)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# =========================================================================== shims


def test_shim_onnx_registration_alias_is_needed_and_in_effect() -> None:
    bare = subprocess.run(
        [sys.executable, "-c", "import crypten"], capture_output=True, text=True, env=ENV
    )
    assert bare.returncode != 0 and "torch.onnx._internal.registration" in bare.stderr
    from mpc import crypten_shim

    assert crypten_shim.REGISTRATION_ALIASED
    assert (
        sys.modules["torch.onnx._internal.registration"]
        is sys.modules["torch.onnx._internal.torchscript_exporter.registration"]
    )
    assert crypten_shim.crypten.__version__ == "0.4.1"


def test_shim_guards_crypten_direct_torch_distributed() -> None:
    from mpc import crypten_shim

    # Still needed: CrypTen's own TTP code calls torch.distributed directly.
    src = inspect.getsource(crypten_shim.crypten_ttp)
    assert "dist.irecv" in src and "dist.barrier" in src and "dist.isend" in src
    assert crypten_shim.crypten_ttp.dist is crypten_shim.GUARD
    assert crypten_shim.crypten_dist_comm.dist is crypten_shim.GUARD
    with pytest.raises(RuntimeError, match=r"torch\.distributed"):
        crypten_shim.crypten_ttp.dist.irecv(None)
    import torch

    assert not torch.distributed.is_initialized()


def test_shim_routes_communicator_and_ttp_client_through_tls() -> None:
    from mpc import comm, crypten_shim

    crypten = crypten_shim.crypten
    # Needed: the names CrypTen looks up at call time are its gloo/pickle classes.
    assert crypten_shim.ORIGINAL_COMMUNICATOR.__name__ == "DistributedCommunicator"
    assert hasattr(crypten_shim.ORIGINAL_TTP_CLIENT, "get")
    comm.install()
    assert crypten.communicator.DistributedCommunicator is comm.TlsCommunicator
    assert crypten.mpc.provider.ttp_provider.TTPClient is comm.DealerClient
    assert crypten.cfg.mpc.provider == "TTP"
    fake = comm.TlsCommunicator(0, 2, {}, 1.0)
    comm.TlsCommunicator.bind(fake)
    try:
        assert crypten.communicator.get() is fake
        with pytest.raises(comm.MpcLinkError, match="pickle"):
            fake.broadcast_obj({"x": 1}, 0)
    finally:
        comm.reset()
    # crypten.init() would build gloo groups; with the shim it refuses instead.
    with pytest.raises(RuntimeError, match=r"crypten\.init"):
        crypten.init()


def test_shim_makes_crypten_session_state_per_thread() -> None:
    """Shim 4: what one session's thread sets, another's does not see."""
    import threading

    from crypten.config.config import CrypTenConfig

    from mpc import crypten_shim

    crypten = crypten_shim.crypten
    seen: dict[str, Any] = {}
    inside, checked = threading.Event(), threading.Event()

    def run(cfg: Any) -> dict[str, Any]:
        """One thread holds an override open while another reads the same setting."""
        seen.clear()
        inside.clear()
        checked.clear()

        def holder() -> None:
            with cfg.temp_override({"functions.reciprocal_all_pos": True}):
                seen["holder"] = cfg.functions.reciprocal_all_pos
                inside.set()
                checked.wait(HANG_BOUND_S)

        t = threading.Thread(target=holder)
        t.start()
        assert inside.wait(HANG_BOUND_S)
        seen["other"] = cfg.functions.reciprocal_all_pos
        checked.set()
        t.join(HANG_BOUND_S)
        seen["after"] = cfg.functions.reciprocal_all_pos
        return dict(seen)

    # Needed: CrypTen's own config overrides for every thread of the process at once, and
    # its PRG seeds live in one module-level dict that _setup_prng fills.
    assert run(CrypTenConfig()) == {"holder": True, "other": True, "after": False}
    assert "global generators" in inspect.getsource(crypten._sync_seeds)
    # In effect: the process's config is per thread while overridden...
    assert isinstance(crypten.cfg, crypten_shim.PerThreadConfig)
    assert run(crypten.cfg) == {"holder": True, "other": False, "after": False}
    # ...and each thread has its own generators.
    assert all(isinstance(g, crypten_shim.PerThreadMap) for g in crypten.generators.values())
    mine = crypten.generators["prev"]
    mine["cpu"] = "main thread's"
    theirs: list[Any] = []
    t = threading.Thread(target=lambda: theirs.append(dict(mine)))
    t.start()
    t.join(HANG_BOUND_S)
    assert theirs == [{}] and mine["cpu"] == "main thread's"
    del mine["cpu"]


# =========================================================================== units


def test_fixed_point_sharing_round_trips_and_hides() -> None:
    v = np.array([[0.5, -1.25, 3.0], [1e-3, -7.0, 0.0]])
    enc = encode(v)
    assert enc[0, 0] == SCALE // 2 and enc[1, 1] == -7 * SCALE
    shares = share(enc, 3)
    assert all(s.dtype == np.int64 for s in shares)
    assert np.array_equal(reconstruct(shares), enc)
    assert np.allclose(decode(reconstruct(shares)), v, atol=1 / SCALE)
    # Any k-1 shares look uniform: none is the encoding itself.
    assert not any(np.array_equal(s, enc) for s in shares)
    with pytest.raises(ValueError, match="must be finite"):
        encode(np.array([np.nan]))


def test_model_extraction(tmp_path: Path) -> None:
    m = MpcModel.from_onnx(RISK)
    assert [o.op for o in m.program] == ["matmul", "add", "relu", "matmul", "add", "sigmoid"]
    assert (m.input_dim, m.output_dim) == (6, 1)
    assert "values" not in str(m.plan_json()) and m.plan_json()["weights"]["w1"] == [6, 16]
    import onnx

    bad = onnx.load(str(RISK))
    bad.graph.node[2].op_type = "Tanh"
    onnx.save(bad, tmp_path / "bad.onnx")
    with pytest.raises(ModelError, match="Tanh"):
        MpcModel.from_onnx(tmp_path / "bad.onnx")


HANG_BOUND_S = 60.0


async def _settled(task: asyncio.Task[Any], what: str) -> None:
    """Wait for ``task`` to end, however it ends. The bound is no claim about speed (that
    is bench/failure_times.py): it turns a hang into a failure, apart from the task's own
    TimeoutError."""
    done, _ = await asyncio.wait({task}, timeout=HANG_BOUND_S)
    if not done:
        task.cancel()
        pytest.fail(f"still waiting after {HANG_BOUND_S}s: {what}")


@on_loop
async def test_wire_frames_only_int64_tensors_and_bounded_json() -> None:
    with pytest.raises(WireError, match="only 64-bit integer tensors"):
        encode_tensor(np.zeros(3, dtype=np.float32))
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    frame = encode_tensor(arr)
    assert np.array_equal(decode_tensor(frame[8:]), arr)
    # Control: the whole frame, same reader set-up, is read back (from the buffer, under a
    # deadline it cannot miss).
    reader = asyncio.StreamReader()
    reader.feed_data(frame)
    got = await read_frame(reader, time.monotonic() + HANG_BOUND_S)
    assert np.array_equal(got.tensor(), arr)
    # Cut short in the header or in the payload: the message's one deadline ends the wait,
    # with TimeoutError, instead of waiting for bytes that never come.
    for cut in (5, len(frame) - 1):
        reader = asyncio.StreamReader()
        reader.feed_data(frame[:cut])
        task = asyncio.ensure_future(read_frame(reader, time.monotonic() + 0.2))
        await _settled(task, f"a frame cut at byte {cut}")
        with pytest.raises(TimeoutError):
            task.result()
    reader = asyncio.StreamReader()
    reader.feed_data(b"ZMJ\x00" + (2**21).to_bytes(4, "little"))
    with pytest.raises(WireError, match="refused"):
        await read_frame(reader, time.monotonic() + HANG_BOUND_S)


# =========================================================================== sessions


@on_loop
async def test_mpc_matches_plaintext(
    parties: list[Party], settings: MpcSettings, model: MpcModel
) -> None:
    x_all = inputs(64, seed=1)
    async with await MpcSession.start(model, endpoints(parties), settings) as session:
        worst = 0.0
        for batch in (x_all[:1], x_all[1:2], x_all[:16], x_all):
            result = await session.infer(batch)
            assert result.outputs.shape == (len(batch), 1)
            worst = max(worst, float(np.max(np.abs(result.outputs - plaintext(batch)))))
        assert worst < TOLERANCE, worst
        assert result.parties == ("n1", "n2")
        assert result.dealer == f"spiffe://{settings.trust_domain}/gateway/dealer"
        assert set(result.bytes_per_party) == {"n1", "n2"}
        assert all(
            b["mesh_sent"] > 0 and b["to_gateway"] > 0 for b in result.bytes_per_party.values()
        )
        dealer = session.dealer_proc
        assert dealer is not None
    assert not session.alive and dealer.returncode is not None


def leaks_of(parties: Sequence[Party], sid: str, log: ShareLog) -> dict[str, list[str]]:
    return {
        p.name: find_leaks(rank, View.load(p.record / sid), log.secrets)
        for rank, p in enumerate(parties)
    }


@on_loop
async def test_no_node_receives_inputs_weights_or_outputs(
    parties: list[Party], settings: MpcSettings, model: MpcModel
) -> None:
    log = ShareLog(model)
    session = await MpcSession.start(model, endpoints(parties), settings, share_hook=log)
    for seed in (2, 3):
        await session.infer(inputs(4, seed))
    await session.close()
    sid = session.session_id
    views = {p.name: View.load(p.record / sid) for p in parties}
    # The recording really is the session: inputs shares and the Beaver openings.
    assert all(len(v.received) > 10_000 and v.opened.size > 100 for v in views.values())
    assert len(log.secrets.encoded) == 4 + 2 * 2  # 4 weights, 2 inputs, 2 outputs
    assert leaks_of(parties, sid, log) == {"n1": [], "n2": []}


LEAKY_PARTY = r"""
import os, sys, torch
from mpc import party
from mpc.comm import TlsCommunicator
from mpc.worker_args import build_parser, config_from_args

def ring_reduce(self, input, dst, op=None, batched=False):
    # gloo's ring: reduce-scatter (each party sums one chunk), then the chunks go to dst.
    t = input.clone().reshape(-1)
    half = t.numel() // 2
    chunks = [t[:half].contiguous(), t[half:].contiguous()]
    other = 1 - self.rank
    self._send(other, chunks[other])
    mine = chunks[self.rank] + self._recv(other, chunks[self.rank].size())
    if self.rank != dst:
        self._send(dst, mine)
        return None
    theirs = self._recv(other, chunks[other].size())
    return torch.cat([mine, theirs] if self.rank == 0 else [theirs, mine]).reshape(input.size())

class Leaky(party.PartyWorker):
    def output_share(self, y):
        if open(os.environ["LEAK_MODE"]).read().strip() == "ring":
            TlsCommunicator.reduce = ring_reduce
        y.get_plain_text(dst=0)  # CrypTen's usual way to hand the result to party 0
        return super().output_share(y)

sys.exit(party.run_worker(config_from_args(build_parser().parse_args()), Leaky))
"""


@on_loop
async def test_leak_check_trips_when_the_output_is_revealed_to_a_party(
    pki: PKI, settings: MpcSettings, model: MpcModel, tmp_path: Path
) -> None:
    mode = tmp_path / "mode"
    mode.write_text("gather")
    ENV["LEAK_MODE"] = str(mode)
    leaky = start_parties(pki, ["n1", "n2"], tmp_path, code=LEAKY_PARTY)
    try:
        found = {}
        for how in ("gather", "ring"):
            mode.write_text(how)
            log = ShareLog(model)
            async with await MpcSession.start(
                model, endpoints(leaky), settings, share_hook=log
            ) as session:
                result = await session.infer(inputs(8, seed=4))
                assert np.max(np.abs(result.outputs - plaintext(inputs(8, seed=4)))) < TOLERANCE
            found[how] = leaks_of(leaky, session.session_id, log)
        # Gather-then-sum at party 0: it received party 1's output share.
        assert any(x.startswith("share") for x in found["gather"]["n1"]), found
        # gloo-style ring reduce: reduced (plaintext) output chunks crossed the wire.
        assert any(x.startswith("plaintext") for x in found["ring"]["n1"]), found
    finally:
        for p in leaky:
            p.stop()


@on_loop
async def test_leak_check_trips_when_a_node_is_the_dealer(
    pki: PKI, parties: list[Party], settings: MpcSettings, model: MpcModel, tmp_path: Path
) -> None:
    """The TFP-like layout: the dealer runs on a node (n3, operated by n1's provider).

    Parties refuse a plan whose dealer is one of them, and the gateway refuses a node
    dealer unless told it is a test; here it is told, and the dealer records its masks.
    Any party's view plus those masks opens every Beaver-masked input and weight.
    """
    n3 = pki.ensure("node", "n3")
    unsafe = replace(settings, dealer_cert=n3.cert, dealer_key=n3.key, dealer_record_dir=tmp_path)
    with pytest.raises(MpcError, match="must not be a node"):
        await MpcSession.start(model, endpoints(parties), unsafe)
    tfp = replace(unsafe, allow_node_dealer=True)
    log = ShareLog(model)
    async with await MpcSession.start(model, endpoints(parties), tfp, share_hook=log) as session:
        await session.infer(inputs(4, seed=5))
    sid, masks = session.session_id, tmp_path / "dealer-masks.bin"
    assert masks.stat().st_size > 0
    assert leaks_of(parties, sid, log) == {"n1": [], "n2": []}
    for p in parties:  # the node that also holds the dealer's masks
        leaks = find_leaks(0, View.load(p.record / sid, masks), log.secrets)
        assert any(x.startswith("unmasked") for x in leaks), leaks


async def _until(cond: Callable[[], bool], what: str) -> None:
    """Wait on this loop until ``cond`` holds; the bound only turns a hang into a failure.
    Polls: the counters it reads (MpcSession's per-party bytes) come with no event."""
    try:
        async with asyncio.timeout(HANG_BOUND_S):
            while not cond():  # noqa: ASYNC110 - no event to wait on, see above
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


# How a party's end reaches the gateway: EOF ("... closed ...") or, when the killed party
# left bytes unread, a TCP reset. Both say the link ended, never that a deadline passed.
LINK_ENDED = r"closed|reset by peer"


@on_loop
async def test_dead_or_silent_party_ends_the_session_and_leaves_nothing(
    pki: PKI, settings: MpcSettings, model: MpcModel, tmp_path: Path
) -> None:
    """How fast each failure surfaces is measured in bench/failure_times.py; this test
    checks what happens: MpcUnavailable for the right reason, the session closed, the
    dealer gone, no process left behind, and a new session serving again."""
    # Patient: no party-side deadline can end the first request, only the kill can.
    patient = replace(settings, message_timeout_s=60.0)
    fast = replace(settings, message_timeout_s=2.0)
    ps = start_parties(pki, ["n1", "n2"], tmp_path)
    try:
        # Killed mid-request. n2 is frozen first, so the request cannot finish before the
        # kill, however fast or slow this machine is.
        session = await MpcSession.start(model, endpoints(ps), patient)
        dealer = session.dealer_proc
        assert dealer is not None
        os.kill(ps[1].proc.pid, signal.SIGSTOP)
        sent = [p.sent for p in session.parties]
        task = asyncio.ensure_future(session.infer(inputs(4, seed=6)))
        await _until(
            lambda: all(p.sent > s for p, s in zip(session.parties, sent, strict=True)),
            "the request went out to both parties",
        )
        assert not task.done()
        ps[1].proc.kill()
        await _settled(task, "the request after n2 was killed")
        with pytest.raises(MpcUnavailable, match=LINK_ENDED) as err:
            task.result()
        assert "deadline" not in str(err.value), err.value
        assert not session.alive and dealer.returncode is not None and not alive(dealer.pid)
        assert ps[1].proc.wait(10) == -signal.SIGKILL
        assert alive(ps[0].proc.pid)  # the peer's session ended, its worker did not
        with pytest.raises(MpcUnavailable, match="is closed"):
            await session.infer(inputs(1, seed=7))
        # Recovery is a new session: restart the party, re-init, re-share.
        ps[1] = start_parties(pki, ["n2"], tmp_path / "again")[0]
        session = await MpcSession.start(model, endpoints(ps), fast)
        dealer = session.dealer_proc
        assert dealer is not None
        # Control for what follows: this session, this request, answers.
        x = inputs(2, seed=8)
        assert np.max(np.abs((await session.infer(x)).outputs - plaintext(x))) < TOLERANCE
        # Stopped (SIGSTOP): silent, not gone. n1 waits for n2's next message only until
        # its message deadline, then ends the session; nobody hangs.
        os.kill(ps[1].proc.pid, signal.SIGSTOP)
        task = asyncio.ensure_future(session.infer(x))
        await _settled(task, "the request to a silent party")
        with pytest.raises(MpcUnavailable, match=r"no message from party1 within 2\.0s"):
            task.result()
        assert not session.alive and dealer.returncode is not None and not alive(dealer.pid)
        await session.close()  # what the gateway does at shutdown: a no-op, no error
    finally:
        for p in ps:
            p.stop()
    assert not any(alive(p.proc.pid) for p in ps)


def _tls_try(address: str, creds: Credentials, hello: dict[str, Any]) -> dict[str, Any] | str:
    """Connect, say hello, return the first reply or why there was none."""
    host, port = address.rsplit(":", 1)
    ctx = client_context(creds)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(encode_json(hello))
                head = tls.recv(8)
                if len(head) < 8:
                    return "closed"
                n = int.from_bytes(head[4:8], "little")
                body = b""
                while len(body) < n:
                    chunk = tls.recv(n - len(body))
                    if not chunk:
                        return "closed"
                    body += chunk
                import json

                reply: dict[str, Any] = json.loads(body)
                return reply
    except (ssl.SSLError, OSError) as exc:
        return f"tls: {exc}"


@on_loop
async def test_only_this_sessions_identities_can_join(
    pki: PKI, parties: list[Party], settings: MpcSettings, model: MpcModel
) -> None:
    n3 = pki.ensure("node", "n3")  # valid node certificate, same CA, not in the session
    mallory = pki.ensure("client", "mallory")
    node_trust = TrustStore(pki.node_ca_bundle(), pki.gateway_ca_bundle(SITE))
    as_n3 = Credentials(n3.cert, n3.key, node_trust)
    as_client = Credentials(mallory.cert, mallory.key, node_trust)
    # Gateway-side pinning: n2's listener presented as n1's is refused before any plan.
    swapped = [
        PartyEndpoint("n1", parties[1].address, "a"),
        PartyEndpoint("n2", parties[0].address, "b"),
    ]
    with pytest.raises(MpcUnavailable, match=r"is spiffe://ztgate.local/node/n\d, expected"):
        await MpcSession.start(model, swapped, settings)
    # The identity expected is the officer-signed one when the facts give it: a party
    # presenting n1's certificate where the signed facts say another ID is refused; the
    # signed ID that matches is the control (the session below).
    signed_other = [
        dataclasses.replace(endpoints(parties)[0], spiffe_id="spiffe://ztgate.local/node/n9"),
        endpoints(parties)[1],
    ]
    with pytest.raises(MpcUnavailable, match=r"is spiffe://ztgate.local/node/n1, expected .*n9"):
        await MpcSession.start(model, signed_other, settings)
    signed = [
        dataclasses.replace(ep, spiffe_id=f"spiffe://ztgate.local/node/{ep.name}")
        for ep in endpoints(parties)
    ]
    async with await MpcSession.start(model, signed, settings) as session:
        assert session.alive
    async with await MpcSession.start(model, endpoints(parties), settings) as session:
        sid = session.session_id
        dealer_address = session.dealer_address
        loop = asyncio.get_running_loop()

        async def attempt(addr: str, creds: Credentials, hello: dict[str, Any]) -> Any:
            return await loop.run_in_executor(None, _tls_try, addr, creds, hello)

        # n3 claims rank 0 towards party n2, and towards the dealer.
        r = await attempt(parties[1].address, as_n3, {"type": "peer", "session": sid, "rank": 0})
        assert isinstance(r, dict) and r["type"] == "rejected" and "not rank 0" in r["reason"], r
        r = await attempt(dealer_address, as_n3, {"type": "party", "session": sid, "rank": 0})
        assert isinstance(r, dict) and r["type"] == "rejected" and "not rank 0" in r["reason"], r
        # A node certificate cannot act as the gateway.
        r = await attempt(parties[0].address, as_n3, {"type": "plan", "session": sid})
        assert isinstance(r, dict) and r["type"] == "rejected", r
        assert "may not start sessions" in r["reason"], r
        # A client certificate fails the TLS handshake everywhere. In TLS 1.3 the server
        # checks it after the client's side of the handshake is done, so the refusal shows
        # as the server's alert or as the connection closing before any reply.
        for addr in (parties[0].address, dealer_address):
            r = await attempt(addr, as_client, {"type": "peer", "session": sid, "rank": 0})
            assert isinstance(r, str) and (r.startswith("tls") or r == "closed"), r
        # ...and the session is untouched.
        x = inputs(2, seed=9)
        result = await session.infer(x)
        assert np.max(np.abs(result.outputs - plaintext(x))) < TOLERANCE


# =========================================================================== several gateways


async def _when_a_slot_is_free(start: Callable[[], Any], what: str) -> Any:
    """``start()`` again while a party still says busy: a closed session's slot is freed
    when the party's session thread ends, just after the gateway's close returns. The
    bound only turns a hang into a failure."""
    from gateway.protocol.problems import NoHealthyNode

    async with asyncio.timeout(HANG_BOUND_S):
        while True:
            try:
                return await start()
            except (MpcBusy, NoHealthyNode) as exc:
                if "busy" not in str(exc):
                    raise
                await asyncio.sleep(0.1)
    pytest.fail(f"never started: {what}")  # pragma: no cover - timeout raises first


@on_loop
async def test_parties_serve_several_sessions_at_once_up_to_their_cap(
    pki: PKI, settings: MpcSettings, model: MpcModel, tmp_path: Path
) -> None:
    """Two sessions (two gateway replicas: one gateway identity, a dealer each) on the
    same two parties answer at the same time, interleaved; a third is refused at once as
    busy (the cap, --max-sessions 2), and starts once a slot is free. The parties run on
    the node's files given one by one (--cert/--key/--node-ca/--gateway-ca), not --pki."""
    ps = start_parties(pki, ["n1", "n2"], tmp_path, flags=["--max-sessions", "2"], own_pki=True)
    sessions: list[MpcSession] = []
    try:
        a = await MpcSession.start(model, endpoints(ps), settings)
        sessions.append(a)
        x = inputs(4, seed=12)
        # Control: one session on these parties answers.
        assert np.max(np.abs((await a.infer(x)).outputs - plaintext(x))) < TOLERANCE
        b = await MpcSession.start(model, endpoints(ps), settings)
        sessions.append(b)
        # Both at once: each party computes the two sessions in two threads, each with its
        # own links, dealer and CrypTen state; any mix-up would garble both answers.
        xs = [inputs(3, seed=seed) for seed in range(13, 19)]
        results = await asyncio.gather(*(s.infer(xi) for s, xi in zip([a, b] * 3, xs, strict=True)))
        for xi, r in zip(xs, results, strict=True):
            assert np.max(np.abs(r.outputs - plaintext(xi))) < TOLERANCE
        assert {r.session_id for r in results} == {a.session_id, b.session_id}
        assert a.dealer_proc is not None and b.dealer_proc is not None
        assert a.dealer_proc.pid != b.dealer_proc.pid
        # A third: refused at once by the cap, nothing queued; the two sessions go on.
        with pytest.raises(MpcBusy, match="busy: 2 of 2 sessions running") as busy:
            await MpcSession.start(model, endpoints(ps), settings)
        assert busy.value.retry_after_s >= 1
        assert a.alive and b.alive
        await a.close()
        c = await _when_a_slot_is_free(
            lambda: MpcSession.start(model, endpoints(ps), settings), "a third session"
        )
        sessions.append(c)
        for s in (b, c):
            assert np.max(np.abs((await s.infer(x)).outputs - plaintext(x))) < TOLERANCE
    finally:
        for s in sessions:
            await s.close()
        for p in ps:
            p.stop()


# =========================================================================== the verifier


def _mpc_gateway(
    pki: PKI, parties: Sequence[Party], providers: Sequence[str], tmp: Path
) -> Gateway:
    """A gateway as `ztgate serve` builds it (real Router, Cedar policy engine, MPC verifier
    from config), not listening: the request goes through its own pipeline stages.

    The nodes' inference addresses have no tritonserver behind them: mode mpc never calls
    a node's inference endpoint, only its party listener (``mpc_address``, real here).
    A third node (n3), of another provider, serves no party.
    """
    from gateway.ports import free_port
    from gateway.registry import Registry, seed_examples
    from gateway.runtime import build_gateway
    from tests.gateway_harness import gateway_config

    registry = Registry.open(tmp / "registry")
    seed_examples(registry)
    party_address = {p.name: p.address for p in parties}
    nodes = []
    for name, provider in zip(("n1", "n2", "n3"), providers, strict=True):
        node = {
            "name": name,
            "address": f"127.0.0.1:{free_port()}",
            "dns_name": pki.node_dns_name(name),
            "spiffe_id": f"spiffe://{pki.trust_domain}/node/{name}",
            "region": "eu-west",
            "provider": provider,
        }
        if name in party_address:
            node["mpc_address"] = party_address[name]
        nodes.append(node)
    dealer_cert, dealer_key = pki.leaf_paths("dealer", "dealer", SITE)
    cfg = gateway_config(
        pki,
        registry.root,
        tmp / "data",
        nodes,
        mpc={"dealer_cert": str(dealer_cert), "dealer_key": str(dealer_key)},
        receipts={"signing_key": None, "log_key": None},
    )
    return build_gateway(cfg)


def _mpc_exchange(gw: Gateway, pki: PKI, x: np.ndarray[Any, Any]) -> Asked:
    """carol (cleared, identities.json) asks for risk under mpc, as the app would."""
    from gateway.pipeline import Asked, Caller, Incoming, body_of
    from gateway.protocol.tensors import InferRequest, Tensor

    carol = pki.ensure("client", "carol")
    scope = {"extensions": {"tls": {"client_cert_chain": [carol.cert.read_text()]}}}
    request = InferRequest(
        "risk",
        None,
        None,
        (Tensor("input", "FP32", tuple(x.shape), x),),
        parameters={"ztgate.verification": "mpc", "ztgate.purpose": "test"},
    )
    came = Incoming(scope=scope, headers={}, body=body_of(b""))
    caller = Caller.of(gw.resolver.resolve(scope))
    # A request deadline with room for a loaded machine, not a claim about speed.
    deadline = time.monotonic() + 120
    return Asked(came, caller, gw.latest("risk"), request, x.nbytes, deadline, True)


@on_loop
async def test_verifier_outcome(pki: PKI, parties: list[Party], tmp_path: Path) -> None:
    from gateway.protocol.problems import NoHealthyNode

    x_in = inputs(3, seed=10)
    # Two providers among the party nodes: the request is served under MPC.
    gw = _mpc_gateway(pki, parties, ("prov-a", "prov-b", "prov-c"), tmp_path / "ok")
    exchange = _mpc_exchange(gw, pki, x_in)
    try:
        answer = await gw.pipeline.answer(exchange)
    finally:
        await gw.verifiers["mpc"].close()
        await gw.router.close()
        await gw.store.close()
    decided = answer.decided
    assert decided.mode == "mpc" and decided.decision.node_allowed("mpc", "n2")
    outcome = answer.outcome
    assert outcome.status == "semi-honest-mpc" and outcome.nodes == ("n1", "n2")
    assert outcome.outputs[0].name == "score" and outcome.outputs[0].shape == (3, 1)
    assert np.max(np.abs(outcome.outputs[0].data - plaintext(x_in))) < TOLERANCE
    ev = outcome.evidence
    assert ev["parties"] == ["n1", "n2"] and ev["dealer"].endswith("/gateway/dealer")
    assert ev["session"] and set(ev["bytes_per_party"]) == {"n1", "n2"}
    # Built the same way, but both party nodes belong to one provider. Policy allows the
    # request (n3 makes two providers among the nodes), the verifier refuses to pick two
    # parties that could collude, before any session starts.
    gw = _mpc_gateway(pki, parties, ("prov-a", "prov-a", "prov-c"), tmp_path / "same")
    exchange = _mpc_exchange(gw, pki, x_in)
    verifier = gw.verifiers["mpc"]
    try:
        decided = gw.pipeline.mode(exchange, gw.pipeline.policy(exchange))
        assert decided.decision.node_allowed("mpc", "n2") and decided.mode == "mpc"
        with pytest.raises(NoHealthyNode, match="distinct providers"):
            await gw.pipeline.answer(exchange)
        assert verifier._sessions == {}
    finally:
        await verifier.close()
        await gw.router.close()
        await gw.store.close()


@on_loop
async def test_two_gateways_serve_mpc_with_the_same_parties(
    pki: PKI, parties: list[Party], tmp_path: Path
) -> None:
    """Two gateway replicas (same configuration, each its own verifier and sessions) on
    the same parties both answer mpc, at the same time. Before parties served several
    sessions, the second got 503 "busy" for as long as the first kept its session."""
    x_in = inputs(2, seed=20)
    providers = ("prov-a", "prov-b", "prov-c")
    gws = [_mpc_gateway(pki, parties, providers, tmp_path / n) for n in ("gw-a", "gw-b")]
    try:
        # Control: the first replica alone answers.
        first = await gws[0].pipeline.answer(_mpc_exchange(gws[0], pki, x_in))
        assert first.outcome.status == "semi-honest-mpc"
        asks = [_mpc_exchange(gw, pki, x_in) for gw in gws]
        both = await asyncio.gather(
            *(gw.pipeline.answer(x) for gw, x in zip(gws, asks, strict=True))
        )
        for answer in both:
            assert answer.decided.mode == "mpc" and answer.outcome.status == "semi-honest-mpc"
            y = answer.outcome.outputs[0].data
            assert np.max(np.abs(y - plaintext(x_in))) < TOLERANCE
        ids = [x.outcome.evidence["session"] for x in (first, *both)]
        assert ids[0] == ids[1] != ids[2]  # each replica keeps its own session
    finally:
        for gw in gws:
            await gw.verifiers["mpc"].close()
            await gw.router.close()
            await gw.store.close()


@on_loop
async def test_a_full_party_is_a_503_with_retry_after_until_a_slot_is_free(
    pki: PKI, tmp_path: Path
) -> None:
    """Parties with one slot each (--max-sessions 1) and two replicas: the second replica
    gets a 503 problem with Retry-After at once, not a queue. A slot frees when the
    holder closes its session (replica a stops) or when its session goes idle (replica b,
    whose sessions close after 0.5 s without a request); each time the other is served."""
    from gateway.protocol.problems import NoHealthyNode, problem_response
    from gateway.verify.mpc import MpcVerification

    x_in = inputs(2, seed=21)
    ps = start_parties(pki, ["n1", "n2"], tmp_path / "parties", flags=["--max-sessions", "1"])
    providers = ("prov-a", "prov-b", "prov-c")
    gws = [_mpc_gateway(pki, ps, providers, tmp_path / n) for n in ("gw-a", "gw-b")]
    verifiers = [gw.verifiers["mpc"] for gw in gws]
    assert all(isinstance(v, MpcVerification) for v in verifiers)
    # a keeps its session for the default 30 s, b closes its own after 0.5 s idle.
    verifiers[1].settings = replace(verifiers[1].settings, idle_close_s=0.5)  # type: ignore[attr-defined]

    async def ask(i: int) -> Answer:
        answer = await gws[i].pipeline.answer(_mpc_exchange(gws[i], pki, x_in))  # a new one
        assert answer.outcome.status == "semi-honest-mpc"
        assert np.max(np.abs(answer.outcome.outputs[0].data - plaintext(x_in))) < TOLERANCE
        return answer

    try:
        await ask(0)  # control: replica a takes the parties' one slot and answers
        with pytest.raises(NoHealthyNode, match="session limit") as refused:
            await ask(1)
        assert "busy: 1 of 1 sessions running" in refused.value.detail
        response = problem_response(refused.value)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        (session_a,) = verifiers[0]._sessions.values()  # type: ignore[attr-defined]
        assert session_a.alive  # the refusal did not touch replica a's session
        await verifiers[0].close()  # replica a stops: its session ends, the slot frees
        await _when_a_slot_is_free(lambda: ask(1), "replica b after a stopped")
        (session_b,) = verifiers[1]._sessions.values()  # type: ignore[attr-defined]
        # Closed first, then its links and dealer are shut (seconds under load): wait for both.
        await _until(
            lambda: not session_b.alive and session_b.dealer_proc is None,
            "replica b's idle session closed itself and stopped its dealer",
        )
        assert session_b.closed == "idle for 0.5s"
        await _when_a_slot_is_free(lambda: ask(0), "replica a after b's session idled out")
    finally:
        for gw in gws:
            await gw.verifiers["mpc"].close()
            await gw.router.close()
            await gw.store.close()
        for p in ps:
            p.stop()


# A real party that lies: it runs the protocol honestly, then adds SHIFT to its share of
# the output before sending it to the gateway. Test-only, through `run_worker`'s worker
# class (the same hook the leaky layouts use); only the node named in LIAR lies.
LYING_PARTY = r"""
import os, sys
from mpc import party
from mpc.model import SCALE
from mpc.worker_args import build_parser, config_from_args

class Lying(party.PartyWorker):
    def output_share(self, y):
        out = super().output_share(y)
        if self.config.name == os.environ["LIAR"]:
            out = out + round(float(os.environ["SHIFT"]) * SCALE)
        return out

sys.exit(party.run_worker(config_from_args(build_parser().parse_args()), Lying))
"""


def _unresolved(gw: Gateway) -> dict[str, float]:
    """ztgate_unresolved_disagreements_total as Prometheus would scrape it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.routing.router import DisagreementMetrics

    registry = CollectorRegistry()
    registry.register(DisagreementMetrics(gw.router))
    text = generate_latest(registry).decode()
    return {
        sample.labels["mode"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ztgate_unresolved_disagreements_total"
    }


@on_loop
async def test_an_out_of_range_mpc_answer_is_refused_and_charges_nobody(
    pki: PKI, tmp_path: Path
) -> None:
    """n1 (a real node certificate, a real party process) adds +5.0 to its output share.

    risk ends in a sigmoid, so its registry entry carries the derived range [0, 1]; the
    shifted answer (~5.5) is refused with a problem, not clamped and not passed on. The
    shares cannot say which party lied, so neither is charged: the alert counts it.
    """
    from gateway.protocol.problems import PROBLEM_BASE, UpstreamFailed, problem_response

    x_in = inputs(3, seed=11)
    # Positive control, same lying code with the shift at 0: an honest, in-range answer.
    ENV.update(LIAR="n1", SHIFT="0.0")
    honest = start_parties(pki, ["n1", "n2"], tmp_path / "honest", code=LYING_PARTY)
    try:
        gw = _mpc_gateway(pki, honest, ("prov-a", "prov-b", "prov-c"), tmp_path / "ok")
        assert gw.latest("risk").outputs[0].value_range == (0.0, 1.0)
        try:
            answer = await gw.pipeline.answer(_mpc_exchange(gw, pki, x_in))
        finally:
            await gw.verifiers["mpc"].close()
            await gw.router.close()
            await gw.store.close()
        y = answer.outcome.outputs[0].data
        assert answer.outcome.status == "semi-honest-mpc"
        assert np.max(np.abs(y - plaintext(x_in))) < TOLERANCE
        assert _unresolved(gw) == {}
    finally:
        for p in honest:
            p.stop()
    ENV.update(SHIFT="5.0")
    lying = start_parties(pki, ["n1", "n2"], tmp_path / "lying", code=LYING_PARTY)
    try:
        gw = _mpc_gateway(pki, lying, ("prov-a", "prov-b", "prov-c"), tmp_path / "lie")
        try:
            for _ in range(2):
                exchange = _mpc_exchange(gw, pki, x_in)
                # Nothing comes back, not even a clamped answer: the answer is never made.
                with pytest.raises(UpstreamFailed, match="outside model risk's output range") as e:
                    await gw.pipeline.answer(exchange)
            # The session itself is sound (the lie is in the arithmetic, not the protocol).
            sessions = gw.verifiers["mpc"]._sessions  # type: ignore[attr-defined]
            assert [s.alive for s in sessions.values()] == [True]
        finally:
            await gw.verifiers["mpc"].close()
            await gw.router.close()
            await gw.store.close()
        # A stable problem type through the app's renderer, never a 500.
        response = problem_response(e.value)
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/problem+json"
        assert e.value.type == PROBLEM_BASE + "upstream-failed"
        assert "5." not in e.value.detail  # the client's (shifted) values are not echoed
        # The two-party rule: neither party is charged, each is marked disputed, alert x2.
        for name in ("n1", "n2"):
            state = gw.router.nodes[name]
            assert (state.failed, state.charges, state.ejections, state.disputed) == (0, 0, 0, 2)
        assert _unresolved(gw) == {"mpc": 2.0}
    finally:
        for p in lying:
            p.stop()
        ENV.pop("LIAR", None)
        ENV.pop("SHIFT", None)


def test_mpc_output_range_is_required(settings: MpcSettings, tmp_path: Path) -> None:
    """A model whose last op bounds nothing, with no declared range, is not served in mpc."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from gateway.protocol.problems import Forbidden
    from gateway.registry import Registry, RegistryError
    from gateway.verify.mpc import MpcVerification

    w = numpy_helper.from_array(np.ones((6, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["score"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=[w],
    )
    path = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert MpcModel.from_onnx(path).output_range() is None
    assert MpcModel.from_onnx(RISK).output_range() == (0.0, 1.0)
    registry = Registry.open(tmp_path / "reg")
    with pytest.raises(RegistryError, match="needs the value range of output 'score'"):
        registry.add(path, "linear", allowed_modes=("mpc",))
    declared = registry.add(
        path, "linear", allowed_modes=("mpc",), output_ranges={"score": [-6, 6]}
    )
    assert declared.outputs[0].value_range == (-6.0, 6.0)
    # An entry without a range (as an index written before ranges were recorded) is
    # refused before any party is involved.
    verifier = MpcVerification(settings, {})
    bare = replace(declared, outputs=(replace(declared.outputs[0], value_range=None),))
    with pytest.raises(Forbidden, match="output range is neither declared"):
        verifier.output_range(bare)
    assert verifier.output_range(declared) == (-6.0, 6.0)


def test_cli_registers_party_and_dealer() -> None:
    import argparse

    from gateway.cli import mpc as cli_mpc

    parser = argparse.ArgumentParser()
    cli_mpc.register(parser.add_subparsers(dest="noun"))
    args = parser.parse_args(
        ["mpc", "party", "--name", "n1", "--pki", "/x", "--listen", "0.0.0.0:7000"]
    )
    assert args.name == "n1" and args.listen == "0.0.0.0:7000" and callable(args.func)


# --- `ztgate mpc party` on the operator's own PKI -----------------------------------------
# The positive control is test_parties_serve_several_sessions_at_once_up_to_their_cap:
# parties started with exactly these flags (own_pki_flags) serve sessions. Here, what is
# refused, with its reason, before anything listens (and before torch is loaded).


@pytest.mark.parametrize(
    "case",
    [
        "pki-and-cert",
        "no-node-ca",
        "nothing",
        "wrong-key",
        "other-node",
        "client-cert",
        "gateway-ca-as-node-ca",
        "leaf-as-gateway-ca",
        "no-slots",
    ],
)
def test_party_refuses_unusable_own_pki_files(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    from gateway.cli import main

    n1, n2 = pki.ensure("node", "n1"), pki.ensure("node", "n2")
    mallory = pki.ensure("client", "mallory")
    good = own_pki_flags(pki, "n1")
    node_ca, gateway_ca = str(pki.node_ca_bundle()), str(pki.gateway_ca_bundle(SITE))
    cas = ["--node-ca", node_ca, "--gateway-ca", gateway_ca]
    pair = ["--cert", str(n1.cert), "--key", str(n1.key)]
    leaf_only = tmp_path / "leaf-only.crt"  # n2's certificate without its issuing CA
    leaf_only.write_text(n2.cert.read_text().split("-----END CERTIFICATE-----")[0] + END_CERT)
    argv, expected = {
        "pki-and-cert": ([*good, "--pki", str(pki.root)], "exclude each other"),
        "no-node-ca": (
            ["--cert", str(n1.cert), "--key", str(n1.key), "--gateway-ca", gateway_ca],
            "missing --node-ca",
        ),
        "nothing": ([], "give --pki, or --cert, --key, --node-ca and --gateway-ca"),
        "wrong-key": (["--cert", str(n1.cert), "--key", str(n2.key), *cas], "is not the key"),
        "other-node": (
            ["--cert", str(n2.cert), "--key", str(n2.key), *cas],
            "is not spiffe://<trust domain>/node/n1",
        ),
        "client-cert": (
            ["--cert", str(mallory.cert), "--key", str(mallory.key), *cas],
            "lacks the serverAuth",
        ),
        "gateway-ca-as-node-ca": (
            [*pair, "--node-ca", gateway_ca, "--gateway-ca", gateway_ca],
            "did not issue --cert",
        ),
        "leaf-as-gateway-ca": (
            [*pair, "--node-ca", node_ca, "--gateway-ca", str(leaf_only)],
            "first certificate is not a CA",
        ),
        "no-slots": ([*good, "--max-sessions", "0"], "--max-sessions must be at least 1"),
    }[case]
    assert main(["mpc", "party", "--name", "n1", "--listen", "127.0.0.1:0", *argv]) == 2
    out, err = capsys.readouterr()
    assert expected in err, err
    assert "LISTENING" not in out  # refused before any listener
    # Control: the good flags pass every check and name what the worker will use (that
    # such a worker serves is the test named above).
    from mpc.worker_args import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--name", "n1", *good]))
    assert config.trust_domain == pki.trust_domain and config.creds.cert == n1.cert.absolute()
    assert config.gateway_ids == {f"spiffe://{pki.trust_domain}/gateway/{SITE}"}
