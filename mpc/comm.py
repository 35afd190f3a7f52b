"""CrypTen's communicator and TTP client, ported onto mutually authenticated TLS links.

CrypTen's compute runs synchronously in one thread; the links live on an asyncio loop in
another. A `Link` hands whole received frames to the compute thread through a queue and
takes its sends as fire-and-forget writes on the loop, so a symmetric exchange (both
parties send, then both receive) cannot deadlock on socket buffers, and every receive
waits at most one per-message deadline. A link that closes (peer killed, TLS error) wakes
every waiter at once; `Mesh.abort` closes all of a session's links together.

The collectives are the ones CrypTen calls (`send`/`recv`, `isend`/`irecv`, `broadcast`,
`all_reduce`, `reduce`, `gather`, `all_gather`, `scatter`, `barrier`); the pickle-based
``*_obj`` calls are refused. ``reduce`` gathers every share at the destination and sums
there, so no party but the destination ever holds a partial sum (gloo's ring reduce left
half of the output in party 1's buffer).

A party runs each session's compute in its own thread, so the communicator and the dealer
client CrypTen asks for (``get()``) are the calling thread's (`TlsCommunicator.bind`,
`DealerClient.install`); the rest of CrypTen's per-session state is made per thread in
``mpc.crypten_shim`` (shim 4).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpc.crypten_shim import crypten
from mpc.wire import Frame, Recorder, encode_json, encode_tensor, read_frame

log = logging.getLogger(__name__)

ReduceOp = torch.distributed.ReduceOp


class MpcLinkError(Exception):
    """A peer closed, went silent past the deadline, or broke the protocol."""


@dataclass
class _Closed:
    reason: str


class FileRecorder:
    """Appends every received frame to ``received.bin`` and every opened value to
    ``opened.bin`` under one directory (the leak tests read them back)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._received = (directory / "received.bin").open("ab")
        self._opened = (directory / "opened.bin").open("ab")
        self._lock = threading.Lock()

    def received(self, label: str, raw: bytes) -> None:
        with self._lock:
            self._received.write(raw)

    def opened(self, values: np.ndarray[Any, Any]) -> None:
        with self._lock:
            self._opened.write(np.ascontiguousarray(values, dtype="<i8").tobytes())

    def close(self) -> None:
        with self._lock:
            self._received.close()
            self._opened.close()


@dataclass
class Link:
    """One authenticated connection, read on the loop, used from the compute thread."""

    label: str
    loop: asyncio.AbstractEventLoop
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    recorder: Recorder | None = None
    on_close: Callable[[str], None] | None = None
    sent: int = 0
    received: int = 0
    closed: str | None = None
    _q: queue.SimpleQueue[Frame | _Closed] = field(default_factory=queue.SimpleQueue)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading (call on the loop thread)."""
        self._task = self.loop.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        reason = "closed"
        try:
            while True:
                frame = await read_frame(self.reader, None, self.recorder, self.label)
                self.received += frame.nbytes
                self._q.put(frame)
        except asyncio.IncompleteReadError:
            reason = f"{self.label} closed the connection"
        except asyncio.CancelledError:
            reason = f"link to {self.label} closed"
        except Exception as exc:  # TLS errors, malformed frames, deadlines: all end the link
            reason = f"link to {self.label} failed: {exc!r}"
        self.closed = reason
        self._q.put(_Closed(reason))
        self.writer.close()
        if self.on_close is not None:
            self.on_close(reason)

    # --- compute-thread side -------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        if self.closed is not None:
            raise MpcLinkError(self.closed)
        self.sent += len(data)
        self.loop.call_soon_threadsafe(self._write, data)

    def _write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_raw(encode_json(obj))

    def send_tensor(self, arr: np.ndarray[Any, Any]) -> None:
        self.send_raw(encode_tensor(arr))

    def recv(self, timeout: float | None) -> Frame:
        """The next frame; ``timeout`` bounds this one message (None: wait for ever)."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            raise MpcLinkError(f"no message from {self.label} within {timeout:.1f}s") from None
        if isinstance(item, _Closed):
            self._q.put(item)  # every later receive fails the same way
            raise MpcLinkError(item.reason)
        return item

    def close(self) -> None:
        """Close from any thread; idempotent."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.writer.close()


def to_numpy(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    if tensor.dtype != torch.long:
        raise MpcLinkError(f"only int64 ring tensors are sent, not {tensor.dtype}")
    return tensor.detach().contiguous().numpy()


def to_torch(frame: Frame, like: Sequence[int] | None = None) -> torch.Tensor:
    arr = frame.tensor()
    if like is not None:
        want = tuple(int(d) for d in like)
        if tuple(arr.shape) != want:
            # CrypTen's seed exchange sends a 0-d tensor into a 1-element buffer.
            if int(np.prod(want)) != arr.size:
                raise MpcLinkError(f"expected a tensor of shape {want}, got {arr.shape}")
            arr = arr.reshape(want)
    return torch.from_numpy(arr)


class _Done:
    """What isend/irecv return: the work already happened."""

    def __init__(self, fn: Callable[[], None] | None = None) -> None:
        self._fn = fn

    def wait(self) -> None:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()

    def is_completed(self) -> bool:
        return self._fn is None


_current = threading.local()  # this thread's session: .comm and .dealer


class TlsCommunicator:
    """CrypTen's Communicator interface over `Link`s; rank ``world_size`` is the dealer."""

    BYTES_PER_ELEMENT = 8

    def __init__(
        self,
        rank: int,
        world_size: int,
        peers: dict[int, Link],
        timeout_s: float,
        recorder: FileRecorder | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.peers = peers
        self.timeout_s = timeout_s
        self.recorder = recorder
        self._name = f"rank{rank}"
        self.reset_communication_stats()

    # --- CrypTen's class-level hooks ----------------------------------------------
    @classmethod
    def bind(cls, comm: TlsCommunicator | None) -> None:
        """Make ``comm`` what CrypTen's ``communicator.get()`` returns in this thread."""
        _current.comm = comm

    @classmethod
    def is_initialized(cls) -> bool:
        return cls.get() is not None

    @classmethod
    def get(cls) -> TlsCommunicator | None:
        comm: TlsCommunicator | None = getattr(_current, "comm", None)
        return comm

    @classmethod
    def initialize(cls, rank: int, world_size: int, init_ttp: bool = False) -> None:
        raise RuntimeError("crypten.init() is not used: mpc.party sets up the TLS mesh")

    @classmethod
    def shutdown(cls) -> None:
        cls.bind(None)

    # --- bookkeeping ----------------------------------------------------------------
    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.world_size

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name

    def reset_communication_stats(self) -> None:
        self.comm_rounds = 0
        self.comm_bytes = 0
        self.comm_time = 0.0

    def get_communication_stats(self) -> dict[str, Any]:
        return {"rounds": self.comm_rounds, "bytes": self.comm_bytes, "time": self.comm_time}

    def print_communication_stats(self) -> None:
        log.info("communication: %s", self.get_communication_stats())

    def _others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def _send(self, dst: int, tensor: torch.Tensor) -> None:
        self.peers[dst].send_tensor(to_numpy(tensor))
        self.comm_bytes += tensor.numel() * 8

    def _recv(self, src: int, like: Sequence[int] | None = None) -> torch.Tensor:
        return to_torch(self.peers[src].recv(self.timeout_s), like)

    def _round(self) -> None:
        self.comm_rounds += 1

    # --- point to point -------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._round()
        self._send(dst, tensor)

    def recv(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        if src is None:
            raise MpcLinkError("recv needs an explicit source")
        self._round()
        return self._recv(src, tensor.size())

    def isend(self, tensor: torch.Tensor, dst: int) -> _Done:
        self.send(tensor, dst)
        return _Done()

    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> _Done:
        def fill() -> None:
            tensor.copy_(self.recv(tensor, src).reshape(tensor.size()))

        return _Done(fill)

    # --- collectives ----------------------------------------------------------------
    def broadcast(self, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        self._round()
        items = input if batched else [input]
        for t in items:
            if self.rank == src:
                for r in self._others():
                    self._send(r, t)
            else:
                t.copy_(self._recv(src, t.size()))
        return input

    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        self._round()
        items = [x.clone() for x in input] if batched else [input.clone()]
        for t in items:
            for r in self._others():
                self._send(r, t)
        for t in items:
            for r in self._others():
                _combine(t, self._recv(r, t.size()), op)
        if self.recorder is not None:
            for t in items:
                self.recorder.opened(t.numpy())
        return items if batched else items[0]

    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        """Gather to ``dst`` and combine there: no other party holds a partial result."""
        self._round()
        items = [x.clone() for x in input] if batched else [input.clone()]
        if self.rank != dst:
            for t in items:
                self._send(dst, t)
            return None
        for t in items:
            for r in self._others():
                _combine(t, self._recv(r, t.size()), op)
        return items if batched else items[0]

    def gather(self, tensor: torch.Tensor, dst: int) -> list[torch.Tensor | None]:
        self._round()
        if self.rank != dst:
            self._send(dst, tensor)
            return [None]
        out: list[torch.Tensor | None] = []
        for r in range(self.world_size):
            out.append(tensor.clone() if r == self.rank else self._recv(r, tensor.size()))
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._round()
        for r in self._others():
            self._send(r, tensor)
        return [
            tensor.clone() if r == self.rank else self._recv(r, tensor.size())
            for r in range(self.world_size)
        ]

    def scatter(
        self,
        scatter_list: list[torch.Tensor],
        src: int,
        size: Any = None,
        device: Any = None,
    ) -> torch.Tensor:
        self._round()
        if self.rank == src:
            for r in self._others():
                self._send(r, scatter_list[r])
            return scatter_list[self.rank]
        return self._recv(src, size)

    def barrier(self) -> None:
        self._round()
        empty = torch.zeros(0, dtype=torch.long)
        for r in self._others():
            self._send(r, empty)
        for r in self._others():
            self._recv(r, (0,))

    def send_obj(self, obj: Any, dst: int, group: Any = None) -> None:
        raise MpcLinkError("send_obj (pickle) is refused on ztgate's MPC links")

    def recv_obj(self, src: int, group: Any = None) -> Any:
        raise MpcLinkError("recv_obj (pickle) is refused on ztgate's MPC links")

    def broadcast_obj(self, obj: Any, src: int, group: Any = None) -> Any:
        raise MpcLinkError("broadcast_obj (pickle) is refused on ztgate's MPC links")


def _combine(acc: torch.Tensor, other: torch.Tensor, op: Any) -> None:
    if op == ReduceOp.SUM:
        acc.add_(other)
    elif op == ReduceOp.BXOR:
        acc.bitwise_xor_(other)
    else:
        raise MpcLinkError(f"unsupported reduce op {op}")


# --- the dealer (TTP) client ------------------------------------------------------
TTP_FUNCTIONS = ("additive", "square", "binary", "wraps", "B2A")
BEAVER_OPS = ("mul", "matmul")


def encode_request(
    func_name: str, device: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A dealer request as plain JSON: function, sizes, op; nothing else is allowed."""
    if func_name not in TTP_FUNCTIONS:
        raise MpcLinkError(f"unknown dealer function {func_name}")
    if device is not None and str(device) != "cpu":
        raise MpcLinkError("only CPU tensors are supported")
    if kwargs:
        raise MpcLinkError(f"dealer requests take no keyword arguments, got {sorted(kwargs)}")
    req: dict[str, Any] = {"type": "tuple", "f": func_name}
    if func_name == "additive":
        size0, size1, op, *rest = args
        if op not in BEAVER_OPS or rest:
            raise MpcLinkError(f"unsupported Beaver op {op}")
        req.update(size0=[int(d) for d in size0], size1=[int(d) for d in size1], op=op)
    elif func_name == "binary":
        size0, size1 = args
        req.update(size0=[int(d) for d in size0], size1=[int(d) for d in size1])
    else:
        (size,) = args
        req.update(size=[int(d) for d in size])
    return req


class DealerClient:
    """Stands in for CrypTen's TTPClient: a seed from the dealer, requests over TLS."""

    def __init__(self, link: Link, rank: int, timeout_s: float) -> None:
        self.link = link
        self.rank = rank
        self.timeout_s = timeout_s
        seed = link.recv(timeout_s).tensor()
        if seed.shape != ():
            raise MpcLinkError("dealer seed must be a scalar")
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed) & ((1 << 63) - 1))

    @classmethod
    def install(cls, link: Link, rank: int, timeout_s: float) -> None:
        """This thread's session's dealer (what CrypTen's ``TTPClient.get()`` returns)."""
        _current.dealer = cls(link, rank, timeout_s)

    @staticmethod
    def _init() -> None:
        if getattr(_current, "dealer", None) is None:
            raise RuntimeError("the dealer link is set up by mpc.party, not crypten.init()")

    @staticmethod
    def uninit() -> None:
        _current.dealer = None

    @staticmethod
    def get() -> DealerClient:
        dealer: DealerClient | None = getattr(_current, "dealer", None)
        if dealer is None:
            raise RuntimeError("no dealer for this session")
        return dealer

    def get_generator(self, device: Any = None) -> torch.Generator:
        if device is not None and torch.device(device).type != "cpu":
            raise MpcLinkError("only CPU tensors are supported")
        return self.generator

    def ttp_request(self, func_name: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.rank != 0:
            raise MpcLinkError("only party 0 asks the dealer")
        self.link.send_json(encode_request(func_name, device, args, kwargs))
        return to_torch(self.link.recv(self.timeout_s))


def install() -> None:
    """Route CrypTen's communicator and TTP client through this module."""
    from mpc.crypten_shim import configure, install_communicator, install_ttp_client

    configure()
    install_communicator(TlsCommunicator)
    install_ttp_client(DealerClient)
    torch.set_num_threads(1)


def reset() -> None:
    """Forget this thread's session (its communicator and dealer)."""
    TlsCommunicator.bind(None)
    DealerClient.uninit()


__all__ = [
    "DealerClient",
    "FileRecorder",
    "Link",
    "MpcLinkError",
    "TlsCommunicator",
    "crypten",
    "install",
    "reset",
]
