"""The gateway's side of an MPC session: `MpcSession`.

The gateway is the input owner and the only place an output is reconstructed, but not a
compute party. `MpcSession.start` runs the dealer (a local child process, the gateway's
dealer certificate), connects to each node's party worker over mutual TLS (the gateway's
node-client certificate; each node pinned to its SPIFFE ID), sends the plan, lets the
parties mesh, and secret-shares the weights into the session once. `infer` secret-shares
one request's input, sends each party its share, collects each party's output share and
sums them. Requests are serialised: one session runs one request at a time.

A session holds one of each party's few session slots (`ztgate mpc party --max-sessions`),
which other gateways (replicas of this one) need too, so it closes itself after
``idle_close_s`` without a request; the next request starts a new one. A party whose
slots are all taken refuses the plan at once: `MpcBusy`, which the gateway answers with
503 + Retry-After.

Every wait has a deadline. Any failure (a party killed or silent, a refusal, a malformed
frame, a deadline) ends the session for good: links closed, dealer stopped, and
`MpcUnavailable` raised, which the gateway maps to 503. Start a new session to recover.

Imports only numpy/onnx/cryptography: no torch or CrypTen in the gateway process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mpc.model import MpcModel, decode, encode, reconstruct, share
from mpc.plans import DealerPlan
from mpc.tls import (
    Credentials,
    IdentityError,
    TrustStore,
    cert_spiffe,
    client_context,
    node_spiffe,
    parse_address,
    peer_identity,
)
from mpc.wire import Frame, WireError, encode_json, encode_tensor, read_frame

log = logging.getLogger(__name__)

# (kind, name, shares by rank, encoded plaintext): a test/audit hook, never set by the gateway.
ShareHook = Callable[[str, str, Sequence[npt.NDArray[np.int64]], npt.NDArray[np.int64]], None]


class MpcError(Exception):
    """Base of MPC errors."""


class MpcUnavailable(MpcError):
    """The session cannot serve (a party died, went silent, refused); it is closed."""


class MpcBusy(MpcUnavailable):
    """A party refused the session because all its session slots are taken."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# How much longer than the gateway's own idle close a party waits before it ends an idle
# session itself (its backstop for a gateway that vanished): the gateway closes first.
PARTY_IDLE_GRACE_S = 30.0


@dataclass(frozen=True)
class PartyEndpoint:
    name: str
    address: str  # host:port of the node's `ztgate mpc party` listener
    provider: str = ""
    # The party's certificate identity as the officer signed it; empty: derived from the
    # trust domain and name (`spiffe://<td>/node/<name>`, the dev PKI's layout).
    spiffe_id: str = ""


@dataclass(frozen=True)
class MpcSettings:
    trust_domain: str
    node_ca: Path
    client_cert: Path  # the gateway's node-client certificate
    client_key: Path
    dealer_cert: Path
    dealer_key: Path
    dealer_listen: str = "127.0.0.1:0"
    dealer_advertise_host: str | None = None  # what parties dial; default: listen host
    message_timeout_s: float = 10.0
    setup_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    # Close a session after this long without a request, freeing its party slots for the
    # other gateways; restarting one costs ~1-2 s (dealer, mesh, weights).
    idle_close_s: float = 30.0
    python: str = sys.executable
    require_distinct_providers: bool = True
    # UNSAFE, tests only: let a node certificate act as the dealer (the TFP-like layout).
    allow_node_dealer: bool = False
    dealer_record_dir: Path | None = None

    @classmethod
    def from_pki(cls, pki_dir: Path, site: str = "site-a", **overrides: Any) -> MpcSettings:
        from gateway.pki import PKI

        pki = PKI.open(pki_dir)
        client_cert, client_key = pki.leaf_paths("gateway-node-client", site, site)
        dealer_cert, dealer_key = pki.leaf_paths("dealer", "dealer", site)
        return cls(
            trust_domain=pki.trust_domain,
            node_ca=pki.node_ca_bundle(),
            client_cert=client_cert,
            client_key=client_key,
            dealer_cert=dealer_cert,
            dealer_key=dealer_key,
            **overrides,
        )


@dataclass
class _Party:
    rank: int
    endpoint: PartyEndpoint
    spiffe: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0
    received: int = 0

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.writer.write(data)

    async def recv(self, deadline: float) -> Frame:
        frame = await read_frame(self.reader, deadline)
        self.received += frame.nbytes
        return frame

    async def expect(self, kind: str, deadline: float) -> dict[str, Any]:
        msg = (await self.recv(deadline)).json()
        if msg.get("type") == kind:
            return msg
        if msg.get("type") in ("error", "rejected"):
            why = msg.get("message") or msg.get("reason")
            if msg.get("busy") is True:
                hint = msg.get("retry_after_s")
                after = float(hint) if isinstance(hint, int | float) else 1.0
                raise MpcBusy(f"party {self.endpoint.name}: {why}", min(max(after, 1.0), 60.0))
            raise MpcUnavailable(f"party {self.endpoint.name}: {why}")
        raise MpcUnavailable(f"party {self.endpoint.name} sent {msg.get('type')!r}, not {kind!r}")


@dataclass(frozen=True)
class MpcResult:
    outputs: npt.NDArray[np.float32]
    session_id: str
    parties: tuple[str, ...]
    dealer: str
    bytes_per_party: dict[str, dict[str, int]]
    rounds: int
    elapsed_s: float
    party_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # as each reported


@dataclass
class MpcSession:
    model: MpcModel
    settings: MpcSettings
    session_id: str
    parties: list[_Party]
    dealer_spiffe: str
    dealer_proc: asyncio.subprocess.Process | None
    share_hook: ShareHook | None = None
    dealer_address: str = ""
    closed: str | None = None
    requests: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _links_closed: bool = False
    _last_used: float = field(default_factory=time.monotonic)
    _idle_task: asyncio.Task[None] | None = None

    # --- start -------------------------------------------------------------------------
    @classmethod
    async def start(
        cls,
        model: MpcModel,
        endpoints: Sequence[PartyEndpoint],
        settings: MpcSettings,
        *,
        share_hook: ShareHook | None = None,
        session_id: str | None = None,
    ) -> MpcSession:
        _check_endpoints(endpoints, settings)
        sid = session_id or secrets.token_hex(16)
        dealer_spiffe = cert_spiffe(settings.dealer_cert)
        spiffes = [e.spiffe_id or node_spiffe(settings.trust_domain, e.name) for e in endpoints]
        if dealer_spiffe in spiffes or (
            "/node/" in dealer_spiffe and not settings.allow_node_dealer
        ):
            raise MpcError(f"the dealer ({dealer_spiffe}) must not be a node")
        session = cls(model, settings, sid, [], dealer_spiffe, None, share_hook)
        try:
            await asyncio.wait_for(session._start(endpoints, spiffes), settings.setup_timeout_s)
        except BaseException as exc:
            await session._shutdown(f"start failed: {exc!r}")
            if isinstance(exc, MpcError):
                raise
            if isinstance(
                exc,
                (
                    OSError,
                    TimeoutError,
                    WireError,
                    IdentityError,
                    asyncio.IncompleteReadError,
                    ValueError,
                ),
            ):
                raise MpcUnavailable(f"session start failed: {_describe(exc)}") from exc
            raise
        session._last_used = time.monotonic()
        session._idle_task = asyncio.get_running_loop().create_task(session._close_when_idle())
        return session

    async def _close_when_idle(self) -> None:
        """Close the session once no request has come for ``idle_close_s``."""
        idle = self.settings.idle_close_s
        while self.closed is None:
            left = self._last_used + idle - time.monotonic()
            if left > 0 or self._lock.locked():  # a request in flight renews _last_used
                await asyncio.sleep(max(left, 0.05))
                continue
            # No await between this check and `closed` being set: a request that arrives
            # now finds the session closed and starts a new one instead of failing.
            await self._shutdown(f"idle for {idle:g}s", polite=True)

    async def _start(self, endpoints: Sequence[PartyEndpoint], spiffes: list[str]) -> None:
        s = self.settings
        deadline = time.monotonic() + s.setup_timeout_s
        dealer_address = await self._spawn_dealer(spiffes)
        ctx = client_context(Credentials(s.client_cert, s.client_key, TrustStore(s.node_ca)))
        trust = TrustStore(s.node_ca)

        async def connect(rank: int, ep: PartyEndpoint) -> _Party:
            host, port = parse_address(ep.address)
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=host
            )
            party = _Party(rank, ep, spiffes[rank], reader, writer)
            self.parties.append(party)
            got = peer_identity(
                writer.get_extra_info("ssl_object"), trust, s.trust_domain, as_server=False
            )
            if got != spiffes[rank]:
                raise IdentityError(f"{ep.address} is {got}, expected {spiffes[rank]}")
            return party

        parties = await asyncio.gather(*(connect(i, e) for i, e in enumerate(endpoints)))
        self.parties = list(parties)
        members = [
            {
                "rank": p.rank,
                "name": p.endpoint.name,
                "address": p.endpoint.address,
                "spiffe": p.spiffe,
            }
            for p in self.parties
        ]
        for p in self.parties:
            p.send(
                encode_json(
                    {
                        "type": "plan",
                        "session": self.session_id,
                        "rank": p.rank,
                        "parties": members,
                        "dealer": {"address": dealer_address, "spiffe": self.dealer_spiffe},
                        "model": self.model.plan_json(),
                        "message_timeout_s": s.message_timeout_s,
                        "setup_timeout_s": s.setup_timeout_s,
                        "idle_timeout_s": s.idle_close_s + PARTY_IDLE_GRACE_S,
                    }
                )
            )
        await self._all("ready", deadline)
        for p in self.parties:
            p.send(encode_json({"type": "connect"}))
        await self._all("up", deadline)
        # The weights, shared once for the session's lifetime.
        names = list(self.model.weights)
        per_party: list[list[bytes]] = [[] for _ in self.parties]
        for name in names:
            enc = encode(self.model.weights[name])
            shares = share(enc, len(self.parties))
            if self.share_hook is not None:
                self.share_hook("weight", name, shares, enc)
            for i, sh in enumerate(shares):
                per_party[i].append(encode_tensor(sh))
        for p in self.parties:
            p.send(encode_json({"type": "weights", "names": names}))
            for frame in per_party[p.rank]:
                p.send(frame)
        await self._all("ok", deadline)

    async def _spawn_dealer(self, spiffes: list[str]) -> str:
        s = self.settings
        host, port = parse_address(s.dealer_listen)
        plan = DealerPlan(
            session=self.session_id,
            trust_domain=s.trust_domain,
            parties=tuple(spiffes),
            cert=s.dealer_cert,
            key=s.dealer_key,
            node_ca=s.node_ca,
            host=host,
            port=port,
            message_timeout_s=s.message_timeout_s,
            setup_timeout_s=s.setup_timeout_s,
            record_dir=s.dealer_record_dir,
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.dealer_proc = await asyncio.create_subprocess_exec(
            s.python,
            "-m",
            "mpc.dealer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.dealer_proc.stdin is not None and self.dealer_proc.stdout is not None
        self.dealer_proc.stdin.write(json.dumps(plan.to_json()).encode() + b"\n")
        await self.dealer_proc.stdin.drain()
        line = await self.dealer_proc.stdout.readline()
        if not line:
            raise MpcUnavailable("the dealer exited before listening")
        dealer_port = int(json.loads(line)["port"])
        self.dealer_address = f"{s.dealer_advertise_host or host}:{dealer_port}"
        return self.dealer_address

    async def _all(self, kind: str, deadline: float) -> list[dict[str, Any]]:
        tasks = [asyncio.ensure_future(p.expect(kind, deadline)) for p in self.parties]
        try:
            done, pending = await asyncio.wait(
                tasks,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if pending:
                late = [
                    p.endpoint.name
                    for p, t in zip(self.parties, tasks, strict=True)
                    if t in pending
                ]
                raise MpcUnavailable(f"no {kind!r} from {', '.join(late)} before the deadline")
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # mark it retrieved: only the first failure is raised

    # --- inference ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.closed is None

    @property
    def party_names(self) -> tuple[str, ...]:
        return tuple(p.endpoint.name for p in self.parties)

    async def infer(self, x: npt.NDArray[Any], *, budget_s: float | None = None) -> MpcResult:
        """Run one request; ``budget_s`` bounds it (default: settings.request_timeout_s)."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.model.input_dim or arr.shape[0] < 1:
            raise ValueError(f"input must be [batch, {self.model.input_dim}], got {arr.shape}")
        enc = encode(arr)  # ValueError for non-finite or huge inputs: the caller's fault
        limit = self.settings.request_timeout_s if budget_s is None else budget_s
        async with self._lock:
            if self.closed is not None:
                raise MpcUnavailable(f"session {self.session_id} is closed: {self.closed}")
            t0 = time.monotonic()
            self._last_used = t0
            try:
                return await asyncio.wait_for(self._infer(enc, t0 + limit), limit)
            except MpcError as exc:
                await self._shutdown(str(exc))
                raise MpcUnavailable(str(exc)) from exc
            except (OSError, TimeoutError, WireError, asyncio.IncompleteReadError) as exc:
                reason = _describe(exc)
                await self._shutdown(reason)
                raise MpcUnavailable(f"session {self.session_id} failed: {reason}") from exc
            except asyncio.CancelledError:
                await self._shutdown("request cancelled mid-flight")
                raise
            finally:
                self._last_used = time.monotonic()

    async def _infer(self, enc: npt.NDArray[np.int64], deadline: float) -> MpcResult:
        t0 = time.monotonic()
        self.requests += 1
        rid = self.requests
        shares = share(enc, len(self.parties))
        before = {p.endpoint.name: (p.sent, p.received) for p in self.parties}
        for p, sh in zip(self.parties, shares, strict=True):
            p.send(encode_json({"type": "infer", "id": rid, "batch": int(enc.shape[0])}))
            p.send(encode_tensor(sh))

        async def collect(p: _Party) -> tuple[dict[str, Any], npt.NDArray[np.int64]]:
            head = await p.expect("output", deadline)
            out = (await p.recv(deadline)).tensor()
            if out.shape != (enc.shape[0], self.model.output_dim) or head.get("id") != rid:
                raise MpcUnavailable(f"party {p.endpoint.name} answered the wrong request")
            return head, out

        tasks = [asyncio.ensure_future(collect(p)) for p in self.parties]
        try:
            done, pending = await asyncio.wait(
                tasks,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if pending:
                late = [
                    p.endpoint.name
                    for p, t in zip(self.parties, tasks, strict=True)
                    if t in pending
                ]
                raise MpcUnavailable(f"no output from {', '.join(late)} before the deadline")
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # mark it retrieved: only the first failure is raised
        results = [t.result() for t in tasks]
        out_shares = [r[1] for r in results]
        y_enc = reconstruct(out_shares)
        if self.share_hook is not None:
            self.share_hook("input", "input", shares, enc)
            self.share_hook("output", "output", out_shares, y_enc)
        bytes_per_party = {}
        party_stats: dict[str, dict[str, Any]] = {}
        rounds = 0
        for p, (head, _) in zip(self.parties, results, strict=True):
            sent0, recv0 = before[p.endpoint.name]
            stats = head.get("stats") or {}
            party_stats[p.endpoint.name] = dict(stats)
            rounds = max(rounds, int(stats.get("rounds", 0)))
            bytes_per_party[p.endpoint.name] = {
                "from_gateway": p.sent - sent0,
                "to_gateway": p.received - recv0,
                "mesh_sent": int(stats.get("mesh_sent", 0)),
                "mesh_received": int(stats.get("mesh_received", 0)),
            }
        return MpcResult(
            outputs=decode(y_enc).astype(np.float32),
            session_id=self.session_id,
            parties=self.party_names,
            dealer=self.dealer_spiffe,
            bytes_per_party=bytes_per_party,
            rounds=rounds,
            elapsed_s=time.monotonic() - t0,
            party_stats=party_stats,
        )

    # --- shutdown ------------------------------------------------------------------------
    async def close(self) -> None:
        async with self._lock:
            await self._shutdown("closed by the gateway", polite=True)

    async def _shutdown(self, reason: str, polite: bool = False) -> None:
        if self.closed is None:
            self.closed = reason
            log.info("MPC session %s ends: %s", self.session_id, reason)
        idle_task, self._idle_task = self._idle_task, None
        if idle_task is not None and idle_task is not asyncio.current_task():
            idle_task.cancel()
        # Once only: a wait_closed that timed out cancelled the stream's close waiter, and
        # awaiting it again (close() after a failure) would raise CancelledError.
        if not self._links_closed:
            self._links_closed = True
            for p in self.parties:
                with contextlib.suppress(Exception):
                    if polite:
                        p.writer.write(encode_json({"type": "close"}))
                    p.writer.close()
            for p in self.parties:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.writer.wait_closed(), 1.0)
        proc, self.dealer_proc = self.dealer_proc, None
        if proc is not None:
            await _stop_process(proc)

    async def __aenter__(self) -> MpcSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _stop_process(proc: asyncio.subprocess.Process, grace_s: float = 2.0) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(Exception):
            proc.stdin.close()  # the dealer exits on stdin EOF
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
        return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _check_endpoints(endpoints: Sequence[PartyEndpoint], settings: MpcSettings) -> None:
    if len(endpoints) < 2:
        raise MpcError("an MPC session needs at least two node parties")
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise MpcError("each party must be a different node")
    if settings.require_distinct_providers:
        providers = [e.provider for e in endpoints]
        if "" in providers or len(set(providers)) != len(providers):
            raise MpcError("parties must come from distinct, named providers (non-collusion)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "a party closed its connection"
    if isinstance(exc, TimeoutError):
        return "a party did not answer before the deadline"
    return f"{type(exc).__name__}: {exc}"
