"""Framing for every MPC link: fixed binary frames, JSON or int64 tensors, never pickle.

A frame is an 8-byte header ``b"ZM" kind:u8 0:u8 length:u32 (little-endian)`` and
``length`` bytes of payload. ``kind`` is ``J`` (a UTF-8 JSON object, at most 1 MiB) or
``T`` (a tensor: ``ndim:u8`` then ``ndim`` little-endian u64 dimensions, then the
elements as little-endian int64). Shares, seeds and Beaver tuples are all ring elements,
so int64 is the only element type on the wire; anything else is refused.

The reader side enforces one deadline per message: the whole frame must arrive within it,
however the bytes are split across reads.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

MAGIC = b"ZM"
HEADER = struct.Struct("<2sBBI")
KIND_JSON = ord("J")
KIND_TENSOR = ord("T")
MAX_JSON = 1 << 20
MAX_FRAME = 1 << 30  # 1 GiB: far above any share this gateway sends
MAX_NDIM = 8
I64 = np.dtype("<i8")

Int64Array = npt.NDArray[np.int64]


class WireError(Exception):
    """A malformed or oversized frame: the link is closed."""


class Recorder(Protocol):
    """Sees every frame a process receives, as raw bytes (tests and audits)."""

    def received(self, label: str, raw: bytes) -> None: ...


@dataclass(frozen=True)
class Frame:
    kind: int
    payload: bytes

    @property
    def nbytes(self) -> int:
        return HEADER.size + len(self.payload)

    def json(self) -> dict[str, Any]:
        if self.kind != KIND_JSON:
            raise WireError("expected a JSON frame, got a tensor")
        return decode_json(self.payload)

    def tensor(self) -> Int64Array:
        if self.kind != KIND_TENSOR:
            raise WireError("expected a tensor frame, got JSON")
        return decode_tensor(self.payload)


def _frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise WireError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(MAGIC, kind, 0, len(payload)) + payload


def encode_json(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_JSON:
        raise WireError("JSON frame too large")
    return _frame(KIND_JSON, payload)


def decode_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JSON:
        raise WireError("JSON frame too large")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"malformed JSON frame: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError("a JSON frame must hold an object")
    return obj


def encode_tensor(arr: npt.NDArray[Any]) -> bytes:
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize != 8:
        raise WireError(f"only 64-bit integer tensors cross the wire, not {arr.dtype}")
    if arr.ndim > MAX_NDIM:
        raise WireError(f"tensor rank {arr.ndim} exceeds {MAX_NDIM}")
    data = np.ascontiguousarray(arr).astype(I64, copy=False).view(I64)
    head = struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape)
    return _frame(KIND_TENSOR, head + data.tobytes())


def decode_tensor(payload: bytes) -> Int64Array:
    if not payload:
        raise WireError("empty tensor frame")
    ndim = payload[0]
    if ndim > MAX_NDIM:
        raise WireError(f"tensor rank {ndim} exceeds {MAX_NDIM}")
    end = 1 + 8 * ndim
    if len(payload) < end:
        raise WireError("truncated tensor header")
    shape = struct.unpack(f"<{ndim}Q", payload[1:end])
    count = 1
    for d in shape:
        count *= d
    if len(payload) - end != 8 * count:
        raise WireError(f"tensor of shape {shape} does not match {len(payload) - end} bytes")
    # A writable copy: CrypTen updates shares in place.
    arr = np.frombuffer(bytearray(payload[end:]), dtype=I64).reshape(shape)
    return arr


async def read_frame(
    reader: asyncio.StreamReader,
    deadline: float | None = None,
    recorder: Recorder | None = None,
    label: str = "",
) -> Frame:
    """The next whole frame; ``deadline`` (time.monotonic) bounds the whole message.

    Without a deadline the wait for the first byte is unbounded (an idle link) but the
    rest of the frame must then follow within ``tail_timeout_s``.
    """
    if deadline is None:
        head = await reader.readexactly(1)
        deadline = time.monotonic() + TAIL_TIMEOUT_S
        rest = await _within(reader.readexactly(HEADER.size - 1), deadline)
        head += rest
    else:
        head = await _within(reader.readexactly(HEADER.size), deadline)
    magic, kind, _zero, length = HEADER.unpack(head)
    if magic != MAGIC or kind not in (KIND_JSON, KIND_TENSOR):
        raise WireError("bad frame header")
    if length > (MAX_JSON if kind == KIND_JSON else MAX_FRAME):
        raise WireError(f"frame of {length} bytes refused")
    payload = await _within(reader.readexactly(length), deadline) if length else b""
    if recorder is not None:
        recorder.received(label, head + payload)
    return Frame(kind, payload)


# How long the rest of a frame may take once its first byte arrived on an idle link.
TAIL_TIMEOUT_S = 30.0


async def _within(aw: Any, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        aw.close()
        raise TimeoutError("message deadline passed")
    data: bytes = await asyncio.wait_for(aw, remaining)
    return data


def split_frames(stream: bytes) -> list[Frame]:
    """Parse a recorded byte stream back into frames (tests and audits)."""
    out: list[Frame] = []
    pos = 0
    while pos < len(stream):
        magic, kind, _zero, length = HEADER.unpack_from(stream, pos)
        if magic != MAGIC:
            raise WireError(f"bad frame header at offset {pos}")
        start = pos + HEADER.size
        out.append(Frame(kind, stream[start : start + length]))
        pos = start + length
    return out
