"""KServe v2 HTTP/REST codec with Triton's binary tensor data extension.

Wire format (as Triton and ``tritonclient.http`` speak it): the body is a JSON
header, optionally followed by raw tensor bytes. When the
``Inference-Header-Content-Length`` header is present the JSON is the first that
many bytes; every tensor whose ``parameters.binary_data_size`` is set takes its
data, in tensor order, from the bytes that follow. Numeric tensors are raw
little-endian C-order arrays; BYTES elements are each a 4-byte little-endian
length followed by the bytes.

Decoding treats the body as hostile: every failure is a :class:`Problem`
(400 / 413), never a stray ``KeyError`` or ``ValueError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway import jsonstrict
from gateway.protocol.problems import BadRequest, InvalidTensor, PayloadTooLarge
from gateway.protocol.tensors import (
    DATATYPES,
    MAX_RANK,
    DataType,
    InferRequest,
    InferResponse,
    JsonScalar,
    Limits,
    RequestedOutput,
    Tensor,
    all_finite,
    canonical_bytes,
)

__all__ = [
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "OCTET_CONTENT_TYPE",
    "binary_outputs",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
OCTET_CONTENT_TYPE = "application/octet-stream"

_DEFAULT_LIMITS = Limits()
_SCALARS = (str, int, float, bool)
# JSON depth of a tensor's ``data`` list: body object > inputs list > tensor > data.
_DATA_DEPTH = 4
# Allowed Python types of JSON ``data`` elements, by numpy dtype kind.
_JSON_ELEMENT_TYPES = {
    "b": frozenset({bool}),
    "i": frozenset({int}),
    "u": frozenset({int}),
    "f": frozenset({int, float}),
    "O": frozenset({str}),
}
_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers", "O": "strings"}


# --------------------------------------------------------------------------- JSON


def _load_json(raw: bytes) -> dict[str, Any]:
    # Duplicate keys are a parser-differential hazard (we and the node could read different
    # values from the same bytes), and NaN/Infinity are not JSON to Triton: both refused.
    try:
        obj = jsonstrict.loads(raw, want_object=False)
    except jsonstrict.StrictJSONError as e:
        raise BadRequest(f"invalid JSON: {e.reason}") from None
    if not isinstance(obj, dict):
        raise BadRequest("invalid JSON: the body must be a JSON object")
    return obj


def _check_depth(value: Any, depth: int, limits: Limits, where: str) -> None:
    """Bound the nesting of members we do not otherwise walk.

    ``depth`` is the depth ``value`` sits at; the top-level object is depth 1.
    """
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return
    if depth > limits.max_json_depth:
        raise BadRequest(f"{where}: JSON nesting deeper than {limits.max_json_depth}")
    # Only containers can nest: skipping scalars without a call each keeps a long list of
    # numbers in an ignored member from costing a call per element (measured: 57 ms of
    # loop time for a 1 MiB body, bench/victim_under_load.py).
    values = value if isinstance(value, list) else list(value)
    kinds = set(map(type, values))  # C loops: no Python-level step per number
    if list in kinds or dict in kinds:
        for v in values:
            _check_depth(v, depth + 1, limits, where)


def _check_extra(obj: dict[str, Any], known: Iterable[str], depth: int, limits: Limits) -> None:
    """Depth-check the unknown members of ``obj`` (which sits at ``depth``).

    Unknown members are ignored, as Triton ignores them, but bounded so they
    cannot smuggle pathological nesting past the typed checks.
    """
    for key in obj.keys() - set(known):
        _check_depth(obj[key], depth + 1, limits, f"member '{key}'")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


# --------------------------------------------------------------------- field access


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return value


def _str(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required and key not in obj:
        return None
    if not isinstance(value, str) or (required and not value):
        what = "a non-empty string" if required else "a string"
        raise BadRequest(f"{where}: '{key}' must be {what}")
    try:
        value.encode("utf-8")  # lone surrogates would break re-encoding later
    except UnicodeEncodeError:
        raise BadRequest(f"{where}: '{key}' is not valid Unicode") from None
    return value


def _params(obj: dict[str, Any], where: str) -> dict[str, JsonScalar]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be a JSON object")
    for key, value in params.items():
        # 1e999 parses as inf; it could not be re-encoded as JSON.
        if not isinstance(value, _SCALARS) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise BadRequest(f"{where}: parameter '{key}' must be a string, number or boolean")
    return params


def _flag(params: Mapping[str, JsonScalar], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: parameter '{key}' must be a boolean")
    return value


def _size(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise BadRequest(f"{where}: 'binary_data_size' must be a non-negative integer")
    return value


# -------------------------------------------------------------------------- tensors


class _Binary:
    """Cursor over the binary section that follows the JSON header."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, size: int, where: str) -> memoryview:
        end = self.pos + size
        if end > len(self.buf):
            raise InvalidTensor(
                f"{where}: binary_data_size {size} but only {len(self.buf) - self.pos} "
                "binary bytes remain in the body"
            )
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk


def _datatype(obj: dict[str, Any], where: str) -> DataType:
    name = obj.get("datatype")
    dt = DATATYPES.get(name) if isinstance(name, str) else None
    if dt is None:
        hint = " (BF16 is not supported)" if name == "BF16" else ""
        raise InvalidTensor(
            f"{where}: unsupported datatype {name!r}{hint}; expected one of " + ", ".join(DATATYPES)
        )
    return dt


def _shape(obj: dict[str, Any], where: str, limits: Limits) -> tuple[tuple[int, ...], int]:
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise InvalidTensor(f"{where}: 'shape' must be a list of at most {MAX_RANK} integers")
    for d in shape:
        if type(d) is not int or d < 0:
            raise InvalidTensor(f"{where}: shape {shape} must contain non-negative integers")
        if d > limits.max_tensor_elements:
            raise PayloadTooLarge(
                f"{where}: dimension {d} exceeds the limit of {limits.max_tensor_elements}"
            )
    count = math.prod(shape)
    if count > limits.max_tensor_elements:
        raise PayloadTooLarge(
            f"{where}: {count} elements exceed the limit of {limits.max_tensor_elements}"
        )
    return tuple(shape), count


def _flatten(data: list[Any], where: str, limits: Limits) -> tuple[list[Any], set[type]]:
    """Row-major flatten of (possibly nested) JSON ``data``; also its element types."""
    depth = _DATA_DEPTH
    while True:
        types = set(map(type, data))
        if list not in types:
            return data, types
        if len(types) > 1:
            raise InvalidTensor(f"{where}: 'data' mixes nested lists and scalars")
        depth += 1
        if depth > limits.max_json_depth:
            raise BadRequest(f"{where}: 'data' nested deeper than {limits.max_json_depth}")
        data = list(chain.from_iterable(data))


def _from_json(data: Any, dt: DataType, count: int, where: str, limits: Limits) -> npt.NDArray[Any]:
    if not dt.json_ok:
        raise InvalidTensor(
            f"{where}: {dt.name} data cannot be sent as JSON; use the binary data format"
        )
    if not isinstance(data, list):
        raise InvalidTensor(f"{where}: 'data' must be a list")
    flat, types = _flatten(data, where, limits)
    if len(flat) != count:
        raise InvalidTensor(f"{where}: 'data' has {len(flat)} elements but shape needs {count}")
    kind = dt.dtype.kind
    if not types <= _JSON_ELEMENT_TYPES[kind]:
        got = ", ".join(sorted(t.__name__ for t in types))
        raise InvalidTensor(f"{where}: {dt.name} 'data' must hold {_KIND_WORDS[kind]}, got {got}")
    if kind == "O":
        try:
            return _bytes_array([s.encode("utf-8") for s in flat], where)
        except UnicodeEncodeError:  # a lone surrogate, from a JSON escape
            raise InvalidTensor(
                f"{where}: 'data' holds a string that is not valid Unicode"
            ) from None
    if kind in "iu" and flat:
        info = np.iinfo(dt.dtype)
        lo, hi = min(flat), max(flat)
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise InvalidTensor(f"{where}: value {bad} is out of range for {dt.name}")
    try:
        with np.errstate(over="ignore"):
            arr = np.array(flat, dtype=dt.dtype)
    except (OverflowError, ValueError, TypeError) as e:
        raise InvalidTensor(f"{where}: 'data' cannot be converted to {dt.name}: {e}") from None
    if kind == "f" and not all_finite(arr):
        # JSON has no NaN/Inf, so a non-finite value here means overflow.
        raise InvalidTensor(f"{where}: 'data' holds a value out of range for {dt.name}")
    return arr


def _bytes_array(items: list[bytes], where: str) -> npt.NDArray[Any]:
    for b in items:
        if len(b) >= 1 << 32:
            raise PayloadTooLarge(f"{where}: a BYTES element is longer than 4 GiB")
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _from_binary(chunk: memoryview, dt: DataType, count: int, where: str) -> npt.NDArray[Any]:
    if dt.itemsize == 0:
        return _unpack_bytes(chunk, count, where)
    if len(chunk) != count * dt.itemsize:
        raise InvalidTensor(
            f"{where}: binary_data_size is {len(chunk)} bytes but shape and "
            f"{dt.name} need {count * dt.itemsize}"
        )
    arr = np.frombuffer(chunk, dtype=dt.dtype, count=count)
    if dt.dtype.kind == "b" and count and arr.view(np.uint8).max() > 1:
        raise InvalidTensor(f"{where}: BOOL binary data must be bytes 0x00 or 0x01")
    return arr


def _unpack_bytes(chunk: memoryview, count: int, where: str) -> npt.NDArray[Any]:
    items: list[bytes] = []
    pos, end = 0, len(chunk)
    for _ in range(count):
        if pos + 4 > end:
            raise InvalidTensor(f"{where}: BYTES data ends after {len(items)} of {count} elements")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        pos += 4
        if pos + n > end:
            raise InvalidTensor(f"{where}: BYTES element {len(items)} runs past binary_data_size")
        items.append(bytes(chunk[pos : pos + n]))
        pos += n
    if pos != end:
        raise InvalidTensor(f"{where}: {end - pos} bytes left over after {count} BYTES elements")
    return _bytes_array(items, where)


def _tensor(raw: Any, kind: str, index: int, binary: _Binary, limits: Limits) -> Tensor:
    obj = _obj(raw, f"{kind}s[{index}]")
    name = _str(obj, "name", f"{kind}s[{index}]")
    where = f"{kind} '{name}'"
    dt = _datatype(obj, where)
    shape, count = _shape(obj, where, limits)
    params = _params(obj, where)
    if "shared_memory_region" in params:
        raise BadRequest(f"{where}: shared memory is not supported through the gateway")
    has_data, size = "data" in obj, params.get("binary_data_size")
    if has_data == (size is not None):
        raise InvalidTensor(f"{where}: set exactly one of 'data' or 'parameters.binary_data_size'")
    if size is None:
        arr = _from_json(obj["data"], dt, count, where, limits)
    else:
        arr = _from_binary(binary.take(_size(size, where), where), dt, count, where)
    _check_extra(obj, ("name", "datatype", "shape", "parameters", "data"), 3, limits)
    assert name is not None
    return Tensor(name, dt.name, shape, arr.reshape(shape))


def _tensors(raw: Any, kind: str, binary: _Binary, limits: Limits) -> tuple[Tensor, ...]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"'{kind}s' must be a non-empty list")
    if len(raw) > limits.max_inputs:
        raise PayloadTooLarge(f"{len(raw)} {kind}s exceed the limit of {limits.max_inputs}")
    out = tuple(_tensor(t, kind, i, binary, limits) for i, t in enumerate(raw))
    _unique([t.name for t in out], kind)
    if binary.pos != len(binary.buf):
        raise InvalidTensor(
            f"{len(binary.buf) - binary.pos} bytes of binary data were not claimed by any {kind}"
        )
    return out


def _unique(names: list[str], kind: str) -> None:
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidTensor(f"duplicate {kind} name '{dup}'")


def _split(
    body: bytes, header_length: int | None, limits: Limits
) -> tuple[dict[str, Any], _Binary]:
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds {limits.max_body_bytes}")
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    doc = _load_json(body[:header_length])
    return doc, _Binary(memoryview(body)[header_length:])


# -------------------------------------------------------------------------- decode


def decode_request(
    body: bytes,
    header_length: int | None,
    model: str,
    version: str | None,
    limits: Limits = _DEFAULT_LIMITS,
) -> InferRequest:
    """Parse and validate an inference request body.

    ``header_length`` is the value of the ``Inference-Header-Content-Length``
    header, or None when absent. Raises BadRequest/InvalidTensor (400) or
    PayloadTooLarge (413). Binary tensors are zero-copy, read-only views of
    ``body``.
    """
    doc, binary = _split(body, header_length, limits)
    _check_extra(doc, ("id", "parameters", "inputs", "outputs"), 1, limits)
    params = _params(doc, "request")
    default_binary = _flag(params, "binary_data_output", False, "request")
    inputs = _tensors(doc.get("inputs"), "input", binary, limits)
    outputs = _requested_outputs(doc.get("outputs", []), default_binary, limits)
    return InferRequest(
        model=model,
        version=version,
        id=_str(doc, "id", "request", required=False),
        inputs=inputs,
        outputs=outputs,
        parameters=params,
    )


def _requested_outputs(
    raw: Any, default_binary: bool, limits: Limits
) -> tuple[RequestedOutput, ...]:
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    if len(raw) > limits.max_inputs:
        raise PayloadTooLarge(f"{len(raw)} outputs exceed the limit of {limits.max_inputs}")
    out = []
    for i, item in enumerate(raw):
        obj = _obj(item, f"outputs[{i}]")
        name = _str(obj, "name", f"outputs[{i}]")
        where = f"output '{name}'"
        params = _params(obj, where)
        for unsupported in ("shared_memory_region", "classification"):
            if unsupported in params:
                raise BadRequest(f"{where}: '{unsupported}' is not supported through the gateway")
        _check_extra(obj, ("name", "parameters"), 3, limits)
        assert name is not None
        out.append(RequestedOutput(name, _flag(params, "binary_data", default_binary, where)))
    _unique([o.name for o in out], "output")
    return tuple(out)


def decode_response(
    body: bytes, header_length: int | None, limits: Limits = _DEFAULT_LIMITS
) -> InferResponse:
    """Parse and validate a node's inference response (same rules as requests)."""
    doc, binary = _split(body, header_length, limits)
    _check_extra(doc, ("model_name", "model_version", "id", "parameters", "outputs"), 1, limits)
    outputs = _tensors(doc.get("outputs"), "output", binary, limits)
    version = doc.get("model_version")
    if version is not None and not isinstance(version, str):
        raise BadRequest("response: 'model_version' must be a string")
    name = _str(doc, "model_name", "response")
    assert name is not None
    return InferResponse(
        model_name=name,
        model_version=version,
        id=_str(doc, "id", "response", required=False),
        outputs=outputs,
        parameters=_params(doc, "response"),
    )


def binary_outputs(req: InferRequest) -> set[str] | bool:
    """Which outputs the client wants in binary, as :func:`encode_response` takes it."""
    if req.outputs:
        return {o.name for o in req.outputs if o.binary_data}
    return req.parameters.get("binary_data_output", False) is True


# -------------------------------------------------------------------------- encode


def _json_data(t: Tensor) -> list[Any] | None:
    """Flat JSON ``data`` for ``t``, or None when JSON cannot carry it exactly."""
    if not DATATYPES[t.datatype].json_ok:
        return None
    flat = t.data.reshape(-1)
    if t.datatype == "BYTES":
        try:
            return [b.decode("utf-8") for b in flat.tolist()]
        except UnicodeDecodeError:
            return None
    if flat.dtype.kind == "f" and not all_finite(flat):
        return None
    return flat.tolist()  # type: ignore[no-any-return]


def _encode(
    header: dict[str, Any], key: str, tensors: Iterable[Tensor], binary: set[str] | bool
) -> tuple[bytes, list[bytes]]:
    chunks: list[bytes] = []
    entries = []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        want_binary = binary if isinstance(binary, bool) else t.name in binary
        # FP16, non-UTF-8 BYTES and NaN/Inf cannot be JSON: they go binary.
        data = None if want_binary else _json_data(t)
        if data is None:
            raw = canonical_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        entries.append(entry)
    header[key] = entries
    return _dumps(header), chunks


def encode_response(
    resp: InferResponse, binary_outputs: set[str] | bool = False
) -> tuple[bytes, dict[str, str]]:
    """Serialise ``resp`` as Triton does; returns ``(body, headers)``.

    With any binary output, the headers carry ``Inference-Header-Content-Length``.
    """
    header: dict[str, Any] = {"model_name": resp.model_name}
    if resp.model_version is not None:
        header["model_version"] = resp.model_version
    if resp.id is not None:
        header["id"] = resp.id
    if resp.parameters:
        header["parameters"] = resp.parameters
    head, chunks = _encode(header, "outputs", resp.outputs, binary_outputs)
    return _frame(head, chunks)


def encode_request(
    req: InferRequest, binary_inputs: set[str] | bool = True
) -> tuple[bytes, dict[str, str]]:
    """Serialise ``req`` like ``tritonclient.http``; returns ``(body, headers)``.

    ``binary_inputs`` mirrors ``InferInput.set_data_from_numpy(binary_data=...)``.
    """
    header: dict[str, Any] = {}
    if req.id is not None:
        header["id"] = req.id
    if req.parameters:
        header["parameters"] = req.parameters
    if req.outputs:
        header["outputs"] = [
            {"name": o.name, "parameters": {"binary_data": o.binary_data}} for o in req.outputs
        ]
    head, chunks = _encode(header, "inputs", req.inputs, binary_inputs)
    return _frame(head, chunks)


def _frame(head: bytes, chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    if not chunks:
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": OCTET_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers
