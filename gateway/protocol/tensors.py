"""Tensor and inference message types of the KServe v2 / Open Inference Protocol.

Plain frozen values: everything here has already been validated by the codec,
so the rest of the gateway can trust shapes, dtypes and sizes without rechecking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATATYPES",
    "MAX_RANK",
    "DataType",
    "InferRequest",
    "InferResponse",
    "JsonScalar",
    "Limits",
    "RequestedOutput",
    "Tensor",
    "all_finite",
    "canonical_bytes",
    "pack_bytes",
]

JsonScalar = str | int | float | bool

# numpy 1.x arrays cannot have more dimensions than this.
MAX_RANK = 32

# Up to this many elements `all_finite` checks in Python: numpy's fixed cost per call
# (~1.2 us) is then most of the check, and a batch-1 answer is a handful of floats.
_FINITE_IN_PYTHON_MAX = 64


def all_finite(arr: npt.NDArray[Any]) -> bool:
    """No NaN and no infinity in a float array: `np.isfinite(arr).all()`, cheaper when small."""
    if arr.size <= _FINITE_IN_PYTHON_MAX:
        return all(map(math.isfinite, arr.ravel().tolist()))
    return bool(np.isfinite(arr).all())


@dataclass(frozen=True, slots=True)
class DataType:
    """One row of the datatype table."""

    name: str
    # Explicitly little-endian: the wire format and canonical bytes are LE.
    dtype: np.dtype[Any]
    # Bytes per element; 0 for BYTES, whose elements are variable-length.
    itemsize: int
    # FP16/BF16 cannot travel as JSON (Triton refuses them too).
    json_ok: bool = True


def _dt(name: str, np_name: str, *, json_ok: bool = True) -> DataType:
    dtype = np.dtype(np_name)
    return DataType(name, dtype, 0 if dtype.kind == "O" else dtype.itemsize, json_ok)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", "|b1"),
        _dt("UINT8", "|u1"),
        _dt("UINT16", "<u2"),
        _dt("UINT32", "<u4"),
        _dt("UINT64", "<u8"),
        _dt("INT8", "|i1"),
        _dt("INT16", "<i2"),
        _dt("INT32", "<i4"),
        _dt("INT64", "<i8"),
        _dt("FP16", "<f2", json_ok=False),
        _dt("FP32", "<f4"),
        _dt("FP64", "<f8"),
        _dt("BYTES", "O"),
    )
}


@dataclass(frozen=True, eq=False, slots=True)
class Tensor:
    """A named, typed, shaped tensor.

    ``data`` has exactly ``shape`` and the datatype's numpy dtype; BYTES data is
    an object array of ``bytes``. The array is made read-only on construction
    so a tensor cannot change after it has been committed to.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]

    def __post_init__(self) -> None:
        dt = DATATYPES.get(self.datatype)
        if dt is None:
            raise ValueError(f"unknown datatype {self.datatype!r}")
        if self.data.shape != self.shape:
            raise ValueError(f"data shape {self.data.shape} != {self.shape}")
        if self.data.dtype.kind != dt.dtype.kind or self.data.itemsize != dt.dtype.itemsize:
            raise ValueError(f"data dtype {self.data.dtype} does not match {self.datatype}")
        self.data.flags.writeable = False

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (
            self.name == other.name
            and self.datatype == other.datatype
            and self.shape == other.shape
            and canonical_bytes(self) == canonical_bytes(other)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An entry of the request's ``outputs``; ``binary_data`` is already resolved
    against the request-level ``binary_data_output`` default."""

    name: str
    binary_data: bool = False


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str | None
    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: dict[str, JsonScalar] = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str | None
    id: str | None
    outputs: tuple[Tensor, ...]
    parameters: dict[str, JsonScalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps applied while decoding untrusted bodies."""

    max_body_bytes: int = 64 << 20
    max_tensor_elements: int = 1 << 24
    max_inputs: int = 64
    # Enough for a rank-MAX_RANK tensor as nested JSON lists.
    max_json_depth: int = MAX_RANK + 8


def pack_bytes(items: Any) -> bytes:
    """Triton's BYTES wire form: each element as 4-byte LE length + bytes."""
    return b"".join(chain.from_iterable((len(b).to_bytes(4, "little"), b) for b in items))


def canonical_bytes(t: Tensor) -> bytes:
    """The tensor's data as little-endian, C-order bytes (BYTES length-prefixed).

    Independent of how the tensor travelled (JSON or binary), so it is what
    commitments and hashes are computed over. Name, datatype and shape are not
    included: callers bind those separately.
    """
    if t.datatype == "BYTES":
        return pack_bytes(t.data.reshape(-1).tolist())
    dt = DATATYPES[t.datatype].dtype
    if dt.kind == "b":
        # A bool byte other than 0/1 would give two encodings of one value.
        return np.minimum(np.ascontiguousarray(t.data).view(np.uint8), 1).tobytes()
    return np.ascontiguousarray(t.data, dtype=dt).tobytes()
