"""A node's MPC party worker: one TLS listener, a bounded number of sessions, CrypTen inside.

The worker holds no model and no data of its own. A session starts when the gateway
(its node-client certificate, from the site gateway CA) connects and sends a plan: the
session id, this party's rank, every party's expected SPIFFE ID and address, the dealer's,
and the model's op list. Parties then connect to each other (lower rank dials higher) and
to the dealer; a connection is admitted only if its certificate's SPIFFE ID is the one the
plan gives for the rank it claims. The gateway then sends this party its additive shares
of the weights (once) and of each request's input; the party computes and returns its
share of the output to the gateway only. Nothing is ever revealed among the parties.

Any link that fails (a peer killed, a message late past its deadline, a malformed frame)
ends the whole session: every link is closed, the gateway gets an error frame if it can,
and the worker waits for the next session. There is no in-session recovery.

Several gateways (replicas of one site) share the same parties, and each keeps a session
open while it serves requests, so a worker runs up to ``max_sessions`` sessions at once,
each in its own compute thread with its own links, dealer and CrypTen state (per thread:
`mpc.comm`, shim 4 of `mpc.crypten_shim`). One more plan is refused at once with a
``busy`` rejection (the gateway answers 503 + Retry-After); nothing queues. A session also
ends after ``idle_timeout_s`` without a request (the plan's, at most ``max_idle_s``), so a
gateway that vanished without closing its connection does not hold a slot for ever.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mpc.comm import (
    DealerClient,
    FileRecorder,
    Link,
    MpcLinkError,
    TlsCommunicator,
    install,
    reset,
)
from mpc.crypten_shim import crypten
from mpc.model import SCALE, ModelError, Op
from mpc.tls import (
    IdentityError,
    client_context,
    parse_address,
    peer_identity,
    server_context,
)
from mpc.wire import Frame, WireError, encode_json, read_frame
from mpc.worker_args import PartyConfig

log = logging.getLogger("mpc.party")

SESSION_RE = re.compile(r"^[0-9a-f]{8,64}$")
HANDSHAKE_TIMEOUT_S = 5.0
# How long `stop` waits for the session threads to tell their gateways and end.
STOP_GRACE_S = 5.0
# What a busy refusal suggests to the gateway: sessions end when their gateway closes
# them (idle, ~30 s) or goes away; a second is the smallest useful Retry-After.
BUSY_RETRY_AFTER_S = 1.0


class PlanError(Exception):
    """A plan this party will not run."""


class PartyBusy(PlanError):
    """Every session slot is taken: refused now, never queued."""


@dataclass(frozen=True)
class Member:
    rank: int
    name: str
    address: str
    spiffe: str


@dataclass(frozen=True)
class Plan:
    session: str
    rank: int
    parties: tuple[Member, ...]
    dealer: Member
    program: tuple[Op, ...]
    weight_shapes: dict[str, tuple[int, ...]]
    input_dim: int
    output_dim: int
    message_timeout_s: float
    setup_timeout_s: float
    idle_timeout_s: float

    @property
    def world(self) -> int:
        return len(self.parties)

    @classmethod
    def parse(cls, raw: dict[str, Any], me: str, max_idle_s: float = 600.0) -> Plan:
        try:
            session = str(raw["session"])
            if not SESSION_RE.match(session):
                raise PlanError("bad session id")
            parties = tuple(
                Member(int(p["rank"]), str(p["name"]), str(p["address"]), str(p["spiffe"]))
                for p in raw["parties"]
            )
            if [p.rank for p in parties] != list(range(len(parties))) or len(parties) < 2:
                raise PlanError("parties must be ranks 0..k-1, k >= 2")
            if len({p.spiffe for p in parties}) != len(parties):
                raise PlanError("each party must be a distinct node")
            d = raw["dealer"]
            dealer = Member(len(parties), "dealer", str(d["address"]), str(d["spiffe"]))
            if dealer.spiffe in {p.spiffe for p in parties}:
                raise PlanError("the dealer must not be one of the parties")
            rank = int(raw["rank"])
            if not 0 <= rank < len(parties) or parties[rank].name != me:
                raise PlanError(f"rank {rank} is not this node ({me})")
            model = raw["model"]
            program = tuple(Op.from_json(o) for o in model["program"])
            shapes = {str(k): tuple(int(d) for d in v) for k, v in model["weights"].items()}
            for op in program:
                if op.weight is not None and op.weight not in shapes:
                    raise PlanError(f"op {op.op} names unknown weight {op.weight}")
            return cls(
                session=session,
                rank=rank,
                parties=parties,
                dealer=dealer,
                program=program,
                weight_shapes=shapes,
                input_dim=int(model["input_dim"]),
                output_dim=int(model["output_dim"]),
                message_timeout_s=min(max(float(raw["message_timeout_s"]), 0.1), 300.0),
                setup_timeout_s=min(max(float(raw["setup_timeout_s"]), 0.1), 300.0),
                # A gateway that names none (older) gets this party's own limit.
                idle_timeout_s=min(
                    max(float(raw.get("idle_timeout_s", max_idle_s)), 1.0), max_idle_s
                ),
            )
        except (KeyError, TypeError, ValueError, ModelError) as exc:
            raise PlanError(f"malformed plan: {exc!r}") from exc


@dataclass
class Session:
    """One session's links, shared by the loop thread (accepting) and the compute thread."""

    plan: Plan
    loop: asyncio.AbstractEventLoop
    control: Link | None = None
    peers: dict[int, Link] = field(default_factory=dict)
    dealer: Link | None = None
    recorder: FileRecorder | None = None
    aborted: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    all_peers: threading.Event = field(default_factory=threading.Event)

    def links(self) -> list[Link]:
        with self.lock:
            out = list(self.peers.values())
        if self.control is not None:
            out.append(self.control)
        if self.dealer is not None:
            out.append(self.dealer)
        return out

    def expects(self, rank: int, spiffe: str) -> str | None:
        """Why a peer claiming ``rank`` with ``spiffe`` is refused, or None."""
        if self.aborted is not None:
            return "session is over"
        if not 0 <= rank < self.plan.rank:
            return f"rank {rank} does not dial rank {self.plan.rank}"
        if self.plan.parties[rank].spiffe != spiffe:
            return f"{spiffe} is not rank {rank} of this session"
        with self.lock:
            if rank in self.peers:
                return f"rank {rank} is already connected"
        return None

    def attach(self, rank: int, link: Link) -> None:
        with self.lock:
            self.peers[rank] = link
            if len(self.peers) == self.plan.world - 1:
                self.all_peers.set()

    def abort(self, reason: str) -> None:
        if self.aborted is None:
            self.aborted = reason
            log.info("session %s ends: %s", self.plan.session, reason)
        self.all_peers.set()
        for link in self.links():
            link.close()


class PartyWorker:
    """Serves MPC sessions on one listener until stopped."""

    def __init__(self, config: PartyConfig) -> None:
        self.config = config
        self.trust = config.creds.trust
        self.server_ctx = server_context(config.creds)
        self.client_ctx = client_context(config.creds)
        self.loop = asyncio.new_event_loop()
        # Sessions by id, admitted (plan accepted) until their thread ends; at most
        # config.max_sessions. Written by the loop thread (admit) and the session threads
        # (end), hence the lock.
        self.active: dict[str, Session] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.port = 0
        self._stop = threading.Event()

    # --- loop thread --------------------------------------------------------------
    def start(self) -> int:
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._listen())
            started.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="mpc-io", daemon=True).start()
        if not started.wait(10):
            raise RuntimeError("party listener did not start")
        return self.port

    async def _listen(self) -> None:
        server = await asyncio.start_server(
            self._accept,
            self.config.host,
            self.config.port,
            ssl=self.server_ctx,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
        )
        self.port = server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._admit(reader, writer)
        except (
            IdentityError,
            WireError,
            PlanError,
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
        ) as exc:
            log.warning("refused a connection: %s", exc)
            extra = {"busy": True, "retry_after_s": BUSY_RETRY_AFTER_S}
            await _reject(writer, str(exc), extra if isinstance(exc, PartyBusy) else None)

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spiffe = peer_identity(
            writer.get_extra_info("ssl_object"),
            self.trust,
            self.config.trust_domain,
            as_server=True,
        )
        first = await read_frame(reader, time.monotonic() + HANDSHAKE_TIMEOUT_S)
        hello = first.json()
        kind = hello.get("type")
        if kind == "plan":
            if spiffe not in self.config.gateway_ids:
                raise IdentityError(f"{spiffe} may not start sessions here")
            if self._stop.is_set():
                raise PlanError("this party is stopping")
            plan = Plan.parse(hello, self.config.name, self.config.max_idle_s)
            session = Session(plan, self.loop)
            with self._lock:
                if plan.session in self.active:
                    raise PlanError(f"session {plan.session} is already running here")
                cap = self.config.max_sessions
                if len(self.active) >= cap:
                    raise PartyBusy(f"busy: {cap} of {cap} sessions running; retry later")
                self.active[plan.session] = session
            try:
                if self.config.record_dir is not None:
                    session.recorder = FileRecorder(self.config.record_dir / plan.session)
                    session.recorder.received("gateway", _raw(first))
                session.control = Link(
                    "gateway", self.loop, reader, writer, session.recorder, session.abort
                )
                session.control.start()
                thread = threading.Thread(
                    target=self._session_thread,
                    args=(session,),
                    name=f"mpc-session-{plan.session[:8]}",
                    daemon=True,
                )
                with self._lock:
                    self._threads[plan.session] = thread
                thread.start()
            except BaseException:
                self._forget(session)
                raise
        elif kind == "peer":
            with self._lock:
                current = self.active.get(str(hello.get("session")))
            if current is None:
                raise IdentityError(f"{spiffe}: no such session here")
            session = current
            rank = hello.get("rank")
            if not isinstance(rank, int):
                raise WireError("rank must be an integer")
            why = session.expects(rank, spiffe)
            if why is not None:
                raise IdentityError(why)
            if session.recorder is not None:
                session.recorder.received(f"party{rank}", _raw(first))
            writer.write(encode_json({"type": "welcome"}))
            link = Link(f"party{rank}", self.loop, reader, writer, session.recorder, session.abort)
            link.start()
            session.attach(rank, link)
        else:
            raise WireError(f"unexpected first message {kind!r}")

    async def _dial(self, session: Session, member: Member, hello: dict[str, Any]) -> Link:
        host, port = parse_address(member.address)
        deadline = time.monotonic() + session.plan.setup_timeout_s
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.client_ctx, server_hostname=host),
            session.plan.setup_timeout_s,
        )
        try:
            spiffe = peer_identity(
                writer.get_extra_info("ssl_object"),
                self.trust,
                self.config.trust_domain,
                as_server=False,
            )
            if spiffe != member.spiffe:
                raise IdentityError(f"{member.address} is {spiffe}, expected {member.spiffe}")
            writer.write(encode_json(hello))
            reply = (await read_frame(reader, deadline, session.recorder, member.name)).json()
            if reply.get("type") != "welcome":
                raise IdentityError(f"{member.name} refused us: {reply.get('reason')}")
        except BaseException:
            writer.close()
            raise
        link = Link(
            member.name if member.name == "dealer" else f"party{member.rank}",
            self.loop,
            reader,
            writer,
            session.recorder,
            session.abort,
        )
        link.start()
        return link

    async def _dial_all(self, session: Session) -> None:
        plan = session.plan
        hello = {"type": "peer", "session": plan.session, "rank": plan.rank}
        for member in plan.parties[plan.rank + 1 :]:
            session.attach(member.rank, await self._dial(session, member, hello))
        dealer_hello = {"type": "party", "session": plan.session, "rank": plan.rank}
        session.dealer = await self._dial(session, plan.dealer, dealer_hello)

    # --- session threads ------------------------------------------------------------
    def _session_thread(self, session: Session) -> None:
        try:
            self.run_session(session)
        finally:
            session.abort("session over")
            if session.recorder is not None:
                session.recorder.close()
            reset()  # this thread's communicator and dealer
            self._forget(session)

    def _forget(self, session: Session) -> None:
        with self._lock:
            if self.active.get(session.plan.session) is session:
                del self.active[session.plan.session]
            self._threads.pop(session.plan.session, None)

    def serve_forever(self) -> None:
        """Block until `stop`; then end every session and wait (bounded) for its thread."""
        self._stop.wait()
        with self._lock:
            sessions = list(self.active.values())
            threads = list(self._threads.values())
        for session in sessions:
            session.abort("worker stopping")
        deadline = time.monotonic() + STOP_GRACE_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """From a signal handler: only sets a flag, `serve_forever` does the rest."""
        self._stop.set()

    def run_session(self, session: Session) -> None:
        plan = session.plan
        control = session.control
        assert control is not None
        t_msg = plan.message_timeout_s
        try:
            control.send_json({"type": "ready"})
            _expect(control.recv(plan.setup_timeout_s), "connect")
            fut = asyncio.run_coroutine_threadsafe(self._dial_all(session), self.loop)
            fut.result(plan.setup_timeout_s)
            if (
                not session.all_peers.wait(plan.setup_timeout_s)
                or len(session.peers) != plan.world - 1
            ):
                raise MpcLinkError(session.aborted or "not every party connected in time")
            assert session.dealer is not None
            comm = TlsCommunicator(plan.rank, plan.world, session.peers, t_msg, session.recorder)
            TlsCommunicator.bind(comm)  # this thread's: CrypTen's communicator.get()
            crypten._setup_prng()
            DealerClient.install(session.dealer, plan.rank, t_msg)
            control.send_json({"type": "up"})
            weights: dict[str, Any] = {}
            while True:
                try:
                    frame = control.recv(plan.idle_timeout_s)
                except MpcLinkError:
                    if control.closed is not None:
                        raise
                    # Idle past the limit: the gateway closes idle sessions itself well
                    # before this, so its end (or its network) is gone; free the slot.
                    log.info(
                        "session %s idle for %.0fs: ending it", plan.session, plan.idle_timeout_s
                    )
                    control.send_json({"type": "error", "message": f"{self.config.name}: idle"})
                    return
                msg = frame.json()
                kind = msg.get("type")
                if kind == "weights":
                    weights = self.receive_weights(control, plan, t_msg)
                    control.send_json({"type": "ok"})
                elif kind == "infer":
                    self.infer(session, comm, weights, msg)
                elif kind == "close":
                    return
                else:
                    raise WireError(f"unexpected control message {kind!r}")
        except Exception as exc:  # one bad session must never take the worker down
            log.warning("session %s failed: %r", plan.session, exc)
            if control.closed is None:
                control.send_json({"type": "error", "message": f"{self.config.name}: {exc}"})

    def receive_weights(self, control: Link, plan: Plan, timeout: float) -> dict[str, Any]:
        weights: dict[str, Any] = {}
        for name, shape in plan.weight_shapes.items():
            arr = control.recv(timeout).tensor()
            if tuple(arr.shape) != shape:
                raise WireError(f"weight {name} share has shape {arr.shape}, expected {shape}")
            weights[name] = crypten.mpc.MPCTensor.from_shares(torch.from_numpy(arr), precision=16)
        return weights

    def infer(
        self, session: Session, comm: TlsCommunicator, weights: dict[str, Any], msg: dict[str, Any]
    ) -> None:
        plan = session.plan
        control = session.control
        assert control is not None
        if not weights:
            raise WireError("infer before weights")
        batch = int(msg["batch"])
        share = control.recv(plan.message_timeout_s).tensor()
        if share.shape != (batch, plan.input_dim):
            raise WireError(f"input share has shape {share.shape}")
        mesh = [*session.peers.values(), *([session.dealer] if session.dealer else [])]
        sent0, recv0 = sum(lk.sent for lk in mesh), sum(lk.received for lk in mesh)
        rounds0 = comm.comm_rounds
        t0 = time.perf_counter()
        x = crypten.mpc.MPCTensor.from_shares(torch.from_numpy(share), precision=16)
        y = run_program(x, weights, plan.program)
        out = self.output_share(y)
        stats = {
            "compute_s": time.perf_counter() - t0,
            "mesh_sent": sum(lk.sent for lk in mesh) - sent0,
            "mesh_received": sum(lk.received for lk in mesh) - recv0,
            "rounds": comm.comm_rounds - rounds0,
        }
        control.send_json({"type": "output", "id": msg.get("id"), "stats": stats})
        control.send_tensor(out)

    def output_share(self, y: Any) -> np.ndarray[Any, Any]:
        """This party's share of the output, for the gateway only (never opened here)."""
        if y.ptype != crypten.mpc.arithmetic:
            y = y.to(crypten.mpc.arithmetic)
        tensor = y._tensor
        if tensor.encoder.scale != SCALE:
            raise MpcLinkError("output is not at the session's fixed-point scale")
        out: np.ndarray[Any, Any] = tensor.share.detach().contiguous().numpy()
        return out


def run_program(x: Any, weights: dict[str, Any], program: Sequence[Op]) -> Any:
    for op in program:
        if op.op == "matmul":
            x = x.matmul(weights[str(op.weight)])
        elif op.op == "add":
            x = x + weights[str(op.weight)]
        elif op.op == "relu":
            x = x.relu()
        elif op.op == "sigmoid":
            x = x.sigmoid()
        elif op.op == "softmax":
            x = x.softmax(-1 if op.axis is None else op.axis)
        else:
            raise ModelError(f"unsupported op {op.op}")
    return x


def _expect(frame: Frame, kind: str) -> dict[str, Any]:
    msg = frame.json()
    if msg.get("type") != kind:
        raise WireError(f"expected {kind!r}, got {msg.get('type')!r}")
    return msg


def _raw(frame: Frame) -> bytes:
    from mpc.wire import HEADER, MAGIC

    return HEADER.pack(MAGIC, frame.kind, 0, len(frame.payload)) + frame.payload


async def _reject(
    writer: asyncio.StreamWriter, reason: str, extra: dict[str, Any] | None = None
) -> None:
    try:
        writer.write(encode_json({"type": "rejected", "reason": reason[:200], **(extra or {})}))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (OSError, TimeoutError, WireError):
        pass
    writer.close()


# --- command line ---------------------------------------------------------------------
def run_worker(config: PartyConfig, worker_cls: type[PartyWorker] = PartyWorker) -> int:
    install()
    # The compute thread holds the GIL between torch calls; a short switch interval lets
    # the I/O thread hand over a received frame promptly (each protocol round waits on it).
    sys.setswitchinterval(0.0005)
    worker = worker_cls(config)

    def stop(_sig: int, _frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    port = worker.start()
    # The one line on stdout: where this party listens (tests and supervisors read it).
    print(f"MPC-PARTY {config.name} LISTENING {config.host}:{port}", flush=True)
    worker.serve_forever()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from mpc.worker_args import PartyArgsError, build_parser, config_from_args

    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except PartyArgsError as exc:
        parser.error(str(exc))  # exit 2, as `ztgate mpc party` does
    return run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
