"""Reading the body: bounded, decoded, held to the model's signature; then the nonce."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Mapping

from gateway.config import Config
from gateway.pipeline.admission import STATE_RETRY_AFTER_S
from gateway.pipeline.context import Asked, Caller, Incoming
from gateway.pipeline.offload import OFFLOAD_BYTES, DecodePool
from gateway.protocol.codec import decode_request
from gateway.protocol.problems import (
    BadRequest,
    InvalidTensor,
    PayloadTooLarge,
    Replayed,
    StateUnavailable,
    UnsupportedMediaType,
)
from gateway.protocol.tensors import InferRequest, Limits, RequestedOutput, Tensor
from gateway.registry import ModelEntry
from gateway.state import StateStore, StoreUnavailable

DEADLINE_HEADER = "ztgate-deadline-ms"
NONCE_HEADER = "ztgate-nonce"

_USE_BINARY = (
    "; send larger tensors in the binary tensor data extension "
    "(Inference-Header-Content-Length, raw tensor bytes after the JSON header)"
)
_HEADER_INT_MAX = 10**18


def header_int(raw: str) -> int | None:
    """A header's non-negative decimal integer (saturated at 10**18), or None if it is not one.

    `str.isdigit` alone admits "²" and other non-ASCII digits that `int` refuses, and `int`
    refuses more than 4300 digits: either would end as a 500 instead of a 400.
    """
    if not (raw.isascii() and raw.isdigit()):
        return None
    digits = raw.lstrip("0")
    return _HEADER_INT_MAX if len(digits) > 18 else int(digits or "0")


# Content-Encoding -> zlib's wbits: gzip (RFC 1952), and deflate, which in HTTP means the
# zlib format (RFC 1950; what tritonclient's `zlib.compress` sends). Raw deflate (RFC 1951,
# which some clients send as "deflate") is recognised by its missing zlib header.
CONTENT_ENCODINGS: dict[str, int] = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _Inflater:
    """Decompresses chunk by chunk and never holds more than `cap` inflated bytes: each
    call inflates at most what is left under the cap plus one byte, so a bomb (a few KiB
    that inflate to GiBs) is refused as soon as it passes the cap, not after."""

    def __init__(self, encoding: str, cap: int, hint: str) -> None:
        self.encoding = encoding
        self.cap = cap
        self.hint = hint
        self.size = 0
        self.started = False
        self.d = zlib.decompressobj(CONTENT_ENCODINGS[encoding])

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if not self.started and data:
            self.started = True
            zlib_header = len(data) < 2 or (
                data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            )
            if self.encoding == "deflate" and not zlib_header:
                self.d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate
        while data:
            if self.d.eof:
                # gzip allows several members one after another (RFC 1952 2.2); after the
                # end of a deflate stream nothing may follow.
                if self.encoding != "gzip":
                    raise BadRequest("data after the end of the deflate stream")
                self.d = zlib.decompressobj(CONTENT_ENCODINGS["gzip"])
            try:
                piece = self.d.decompress(data, self.cap - self.size + 1)
            except zlib.error as exc:
                raise BadRequest(f"body is not valid {self.encoding} data") from exc
            self.size += len(piece)
            if self.size > self.cap:
                raise PayloadTooLarge(
                    f"body exceeds the cap of {self.cap} bytes once decompressed{self.hint}"
                )
            out.append(piece)
            data = self.d.unconsumed_tail or self.d.unused_data
            if self.d.eof and not self.d.unused_data:
                break
        return out

    def finish(self) -> None:
        if not self.started or not self.d.eof:
            raise BadRequest(f"body ends before its {self.encoding} data does")


async def read_body(
    headers: Mapping[str, str], stream: AsyncIterator[bytes], cap: int, hint: str = ""
) -> bytes:
    """The whole body, refused with 413 as soon as it passes the cap (never buffered past it).

    A `Content-Encoding` of gzip or deflate is decompressed as it arrives, and the cap
    holds for the decompressed bytes (and for the bytes on the wire)."""
    declared = headers.get("content-length")
    if declared is not None:
        length = header_int(declared)
        if length is None:
            raise BadRequest("Content-Length must be a non-negative integer")
        if length > cap:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the cap of {cap}{hint}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    inflater: _Inflater | None = None
    if encoding in CONTENT_ENCODINGS:
        inflater = _Inflater(encoding, cap, hint)
    elif encoding != "identity":
        # Fixed text: the header is client text.
        raise UnsupportedMediaType(
            "Content-Encoding must be one of gzip, deflate or identity (a single coding)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"body exceeds the cap of {cap} bytes{hint}")
        if inflater is None:
            chunks.append(chunk)
        else:
            chunks.extend(inflater.feed(chunk))
    if inflater is not None and size:
        inflater.finish()
    return b"".join(chunks)


class DecodeStage:
    """The deadline, the body under its caps, the KServe v2 decoding, the signature check.

    JSON costs about 70 ms a MiB to decode (and `json.loads` holds the GIL, so a thread
    would not help): a body over `OFFLOAD_BYTES` is decoded in the `DecodePool`'s worker
    processes, and a JSON body (or the JSON header of a binary one) has its own, smaller
    cap all the same: big tensors come as raw bytes, which the codec takes without parsing.
    """

    def __init__(self, cfg: Config, pool: DecodePool | None = None) -> None:
        self.pool = pool  # large bodies are decoded there, off the event loop
        self.limits = cfg.limits
        self.routing = cfg.routing
        self.codec_limits = Limits(
            max_body_bytes=cfg.limits.max_body_bytes,
            max_tensor_elements=cfg.limits.max_tensor_elements,
            max_inputs=cfg.limits.max_inputs,
            max_json_depth=cfg.limits.max_json_depth,
        )

    def deadline(self, incoming: Incoming) -> tuple[float, bool]:
        budget = self.routing.deadline_s
        raw = incoming.headers.get(DEADLINE_HEADER)
        if raw is not None:
            ms = header_int(raw)
            if ms is None or ms <= 0:
                raise BadRequest(f"{DEADLINE_HEADER} must be a positive integer of milliseconds")
            # A client may shorten the deadline, never lengthen it past the cap.
            budget = min(ms / 1000, self.routing.max_deadline_s)
        return incoming.started + budget, raw is not None

    async def __call__(self, incoming: Incoming, caller: Caller, entry: ModelEntry) -> Asked:
        deadline, client_deadline = self.deadline(incoming)
        headers = incoming.headers
        raw_length = headers.get("inference-header-content-length")
        header_length = header_int(raw_length) if raw_length is not None else None
        if raw_length is not None and header_length is None:
            raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
        json_cap = self.limits.max_json_bytes
        if header_length is None:
            hint = f" for a JSON body{_USE_BINARY}"
            cap = min(json_cap, self.limits.max_body_bytes)
            body = await read_body(headers, incoming.body(), cap, hint)
        else:
            body = await read_body(headers, incoming.body(), self.limits.max_body_bytes)
            # After the read: a header length past the body is malformed (the codec's
            # 400), not too large. Raw tensor bytes cost no parsing, so reading them first
            # is cheap.
            if json_cap < header_length <= len(body):
                raise PayloadTooLarge(
                    f"JSON header of {header_length} bytes exceeds the cap of "
                    f"{json_cap}{_USE_BINARY}"
                )
        request = await self.parse(caller, entry, body, header_length)
        return Asked(incoming, caller, entry, request, len(body), deadline, client_deadline)

    async def parse(
        self, caller: Caller, entry: ModelEntry, body: bytes, header_length: int | None
    ) -> InferRequest:
        """A KServe v2 body (JSON, or binary after `header_length` bytes of JSON), decoded
        (in the pool above `OFFLOAD_BYTES`) and held to the model's signature: every front
        ends its decoding here."""
        if self.pool is not None and len(body) > OFFLOAD_BYTES:
            key = caller.identity.spiffe_id
            args = (body, header_length, entry.name, entry.version, self.codec_limits)
            request = await self.pool.decode(key, *args)
        else:
            request = decode_request(
                body, header_length, entry.name, entry.version, self.codec_limits
            )
        check_inputs(entry, request.inputs)
        check_outputs(entry, request.outputs)
        return request


def check_inputs(entry: ModelEntry, inputs: tuple[Tensor, ...]) -> None:
    """The request must match the registered signature before any node sees it."""
    specs = {s.name: s for s in entry.inputs}
    names = [t.name for t in inputs]
    if sorted(names) != sorted(specs):
        raise InvalidTensor(f"model {entry.name!r} takes inputs {sorted(specs)}, got {names}")
    batch = None
    for t in inputs:
        spec = specs[t.name]
        if t.datatype != spec.datatype:
            raise InvalidTensor(f"input {t.name!r} must be {spec.datatype}, got {t.datatype}")
        if len(t.shape) != len(spec.shape) or any(
            s >= 0 and d != s for d, s in zip(t.shape, spec.shape, strict=True)
        ):
            raise InvalidTensor(
                f"input {t.name!r} shape {list(t.shape)} does not fit {list(spec.shape)}"
            )
        if spec.shape and spec.shape[0] < 0:
            if batch is not None and t.shape[0] != batch:
                raise InvalidTensor("inputs disagree on the batch dimension")
            batch = t.shape[0]
        if t.shape and t.shape[0] == 0:
            raise InvalidTensor(f"input {t.name!r} has an empty batch")


def check_outputs(entry: ModelEntry, requested: tuple[RequestedOutput, ...]) -> None:
    """Only the model's own outputs may be asked for: a node refuses any other, and that
    refusal would be charged to the node (and retried on every other) as a failure."""
    known = {s.name for s in entry.outputs}
    unknown = [o.name for o in requested if o.name not in known]
    if unknown:
        raise InvalidTensor(f"model {entry.name!r} has outputs {sorted(known)}, not {unknown}")


class NonceStage:
    """An optional client nonce, refused if seen within the replay window. After decoding:
    a malformed request neither consumes a nonce nor hides behind one."""

    def __init__(self, store: StateStore, window_s: float) -> None:
        self.store = store
        self.window_s = window_s

    async def __call__(self, asked: Asked) -> None:
        await self.check(asked.incoming.headers, asked.caller)

    async def check(self, headers: Mapping[str, str], caller: Caller) -> None:
        """The same check for a front that decodes its own requests (gateway.generate)."""
        nonce = headers.get(NONCE_HEADER)
        if nonce is None:
            return
        if not (1 <= len(nonce) <= 128 and nonce.isascii() and nonce.isprintable()):
            raise BadRequest(f"{NONCE_HEADER} must be 1-128 printable ASCII characters")
        key = f"nonce:{caller.identity.spiffe_id}:{nonce}"
        try:
            fresh = await self.store.check_nonce(key, self.window_s)
        except StoreUnavailable as exc:
            # Fail closed: without the shared record a replayed request would pass. Fixed
            # detail: `exc` names the store's address, which is for the log only.
            raise StateUnavailable(
                "the replay check cannot run: shared state is unreachable",
                retry_after=STATE_RETRY_AFTER_S,
            ) from exc
        if not fresh:
            # Fixed text: the nonce is client text and this detail may be receipted.
            raise Replayed(f"{NONCE_HEADER} was already used within the replay window")
