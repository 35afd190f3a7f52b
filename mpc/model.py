"""What the gateway shares into a session: the model as a plain op list, and the sharing.

Only numpy and onnx here: the gateway process never imports torch or CrypTen.

Fixed point is CrypTen's: a real ``v`` is the ring element ``round(v * 2**16)`` in
Z/2**64 (int64 two's complement), split into ``k`` additive shares that sum to it mod
2**64; every share but one is uniform from the OS CSPRNG, so any ``k - 1`` of them are
independent of the value.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

PRECISION_BITS = 16
SCALE = 1 << PRECISION_BITS
# |v| * SCALE must stay far from 2**63 so products of two encodings (before CrypTen's
# truncation) do not wrap: CrypTen's own guidance keeps plaintexts well under 2**20.
MAX_ABS = float(1 << 20)

Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# op name -> (number of weight operands, has an axis)
OPS: dict[str, int] = {"matmul": 1, "add": 1, "relu": 0, "sigmoid": 0, "softmax": 0}

# (low, high) of every value an op can output, None where unbounded. The gateway holds an
# MPC answer to its model's range: a party that shifts its output share far enough lands
# outside it (the shift is otherwise undetectable under the semi-honest model).
Range = tuple[float | None, float | None]
OP_RANGES: dict[str, Range] = {"sigmoid": (0.0, 1.0), "softmax": (0.0, 1.0), "relu": (0.0, None)}


class ModelError(Exception):
    """The model cannot run under MPC (an op CrypTen cannot do here, a non-chain graph)."""


@dataclass(frozen=True)
class Op:
    op: str
    weight: str | None = None
    axis: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "weight": self.weight, "axis": self.axis}

    @classmethod
    def from_json(cls, raw: Any) -> Op:
        if not isinstance(raw, dict) or raw.get("op") not in OPS:
            raise ModelError(f"unknown op {raw!r}")
        weight, axis = raw.get("weight"), raw.get("axis")
        if (weight is None) != (OPS[raw["op"]] == 0):
            raise ModelError(f"op {raw['op']} weight operand mismatch")
        if weight is not None and not isinstance(weight, str):
            raise ModelError("weight must be a name")
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ModelError("axis must be an integer")
        return cls(str(raw["op"]), weight, axis)


@dataclass(frozen=True)
class MpcModel:
    """A single-input single-output chain of ops with its weights (float64, plaintext)."""

    name: str
    input_name: str
    output_name: str
    input_dim: int
    output_dim: int
    program: tuple[Op, ...]
    weights: dict[str, FloatArray]

    @classmethod
    def from_onnx(cls, path: Path, name: str | None = None) -> MpcModel:
        model = onnx.load(str(path))
        graph = model.graph
        inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelError("MPC mode serves single-input, single-output models only")
        current = inputs[0].name
        program: list[Op] = []
        weights: dict[str, FloatArray] = {}
        for node in graph.node:
            kind = node.op_type.lower()
            if kind not in OPS:
                raise ModelError(f"op {node.op_type} is not supported under MPC")
            if not node.input or node.input[0] != current or len(node.output) != 1:
                raise ModelError("MPC mode serves a plain chain of ops (input first)")
            others = list(node.input[1:])
            if len(others) != OPS[kind]:
                raise ModelError(f"{node.op_type} must have {OPS[kind]} weight operand(s)")
            weight = None
            if others:
                if others[0] not in inits:
                    raise ModelError(f"{node.op_type} operand {others[0]} is not a weight")
                weight = others[0]
                weights[weight] = inits[weight]
            axis = None
            if kind == "softmax":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                axis = int(attrs.get("axis", -1))
            program.append(Op(kind, weight, axis))
            current = node.output[0]
        if current != graph.output[0].name:
            raise ModelError("the chain does not end at the graph output")
        in_dims = inputs[0].type.tensor_type.shape.dim
        out_dims = graph.output[0].type.tensor_type.shape.dim
        if len(in_dims) != 2 or len(out_dims) != 2:
            raise ModelError("MPC mode serves [batch, features] models only")
        for w in weights.values():
            if not np.all(np.isfinite(w)) or np.max(np.abs(w), initial=0.0) > MAX_ABS:
                raise ModelError("weights must be finite and below 2**20 in magnitude")
        return cls(
            name=name or path.stem,
            input_name=inputs[0].name,
            output_name=graph.output[0].name,
            input_dim=int(in_dims[1].dim_value),
            output_dim=int(out_dims[1].dim_value),
            program=tuple(program),
            weights=weights,
        )

    def output_range(self) -> Range | None:
        """What the last op bounds the output to, or None (matmul/add: unbounded)."""
        return OP_RANGES.get(self.program[-1].op) if self.program else None

    def plan_json(self) -> dict[str, Any]:
        """What parties learn about the model: its ops and weight shapes, no values."""
        return {
            "program": [op.to_json() for op in self.program],
            "weights": {k: list(v.shape) for k, v in self.weights.items()},
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
        }


def encode(values: npt.NDArray[Any]) -> Int64Array:
    """CrypTen fixed point: round(v * 2**16) as int64."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.max(np.abs(v), initial=0.0) > MAX_ABS:
        raise ValueError("MPC inputs must be finite and below 2**20 in magnitude")
    out: Int64Array = np.rint(v * SCALE).astype(np.int64)
    return out


def decode(ring: Int64Array) -> FloatArray:
    return ring.astype(np.float64) / SCALE


def share(encoded: Int64Array, parties: int) -> list[Int64Array]:
    """Additive shares mod 2**64 of an encoded tensor, one per party."""
    if parties < 2:
        raise ValueError("secret sharing needs at least two parties")
    target = encoded.astype(np.int64).view(np.uint64)
    shares: list[npt.NDArray[np.uint64]] = []
    for _ in range(parties - 1):
        raw = secrets.token_bytes(8 * target.size)
        shares.append(np.frombuffer(raw, dtype=np.uint64).reshape(target.shape).copy())
    rest = target.copy()
    for s in shares:
        rest -= s  # uint64 arithmetic wraps mod 2**64
    shares.insert(0, rest)
    return [s.view(np.int64) for s in shares]


def reconstruct(shares: list[Int64Array]) -> Int64Array:
    total = np.zeros(shares[0].shape, dtype=np.uint64)
    for s in shares:
        total += s.astype(np.int64, copy=False).view(np.uint64)
    out: Int64Array = total.view(np.int64)
    return out
