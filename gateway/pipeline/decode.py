"""Reading the body: bounded, decoded, held to the model's signature; then the nonce."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from gateway.config import Config
from gateway.pipeline.admission import STATE_RETRY_AFTER_S
from gateway.pipeline.context import Asked, Caller, Incoming
from gateway.protocol.codec import decode_request
from gateway.protocol.problems import (
    BadRequest,
    InvalidTensor,
    PayloadTooLarge,
    Replayed,
    StateUnavailable,
    UnsupportedMediaType,
)
from gateway.protocol.tensors import Limits, RequestedOutput, Tensor
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


async def read_body(
    headers: Mapping[str, str], stream: AsyncIterator[bytes], cap: int, hint: str = ""
) -> bytes:
    """The whole body, refused with 413 as soon as it passes the cap (never buffered past it)."""
    declared = headers.get("content-length")
    if declared is not None:
        length = header_int(declared)
        if length is None:
            raise BadRequest("Content-Length must be a non-negative integer")
        if length > cap:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the cap of {cap}{hint}")
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"body exceeds the cap of {cap} bytes{hint}")
        chunks.append(chunk)
    return b"".join(chunks)


class DecodeStage:
    """The deadline, the body under its caps, the KServe v2 decoding, the signature check.

    JSON is decoded on the event loop (about 70 ms a MiB, and `json.loads` holds the GIL,
    so a thread would not help), so a JSON body (or the JSON header of a binary one) has
    its own, smaller cap: big tensors come as raw bytes, which the codec takes without
    parsing.
    """

    def __init__(self, cfg: Config) -> None:
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
        request = decode_request(body, header_length, entry.name, entry.version, self.codec_limits)
        check_inputs(entry, request.inputs)
        check_outputs(entry, request.outputs)
        return Asked(incoming, caller, entry, request, len(body), deadline, client_deadline)


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
        nonce = asked.incoming.headers.get(NONCE_HEADER)
        if nonce is None:
            return
        if not (1 <= len(nonce) <= 128 and nonce.isascii() and nonce.isprintable()):
            raise BadRequest(f"{NONCE_HEADER} must be 1-128 printable ASCII characters")
        key = f"nonce:{asked.caller.identity.spiffe_id}:{nonce}"
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
