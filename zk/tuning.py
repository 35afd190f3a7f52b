"""Choosing ezkl circuit settings: the cheapest sound circuit within the model's tolerance.

ezkl's defaults (``decomp_base`` 16384, ``decomp_legs`` 2) need a 16384-row range table, so
even a 750-row circuit is forced to logrows 15, and a softmax head needs an ``exp`` lookup
table over its whole calibrated range (iris: logrows 17). Proving cost grows with 2^logrows,
so onboarding searches (docs/zk.md, "Tuned circuits"):

* the fixed-point **scale** (smallest accurate one wins within a group, as before);
* the **decomposition** ``(base, legs)``: a smaller base needs a smaller table;
* the **head**: a model whose one output is a last-axis ``Softmax`` may be proven up to its
  logits, the gateway applying the softmax to the verified outputs (``postprocess`` in the
  record; zk/verifier.py applies it, so the gateway and every auditor recompute it).

The **lookup range** is never narrowed by hand: ezkl's calibration sets it to cover the
calibrated inputs of every lookup, and a narrower one would reject honest inputs or, worse,
leave values unchecked.

Soundness is not traded for cost. Every candidate keeps ``check_mode`` SAFE and the
visibility the gateway checks, never sets ``ignore_range_check_inputs_outputs``
(zk/record.py:check_settings refuses such settings), covers at least what ezkl's default
decomposition covers (base^legs >= 2^28) **and** the calibrated range of every intermediate
value at the circuit's largest scale with :data:`HEADROOM`, and uses only logrows for which
the SRS exists (a pinned SRS of size k serves logrows <= k).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx

from zk.record import ZkError

Head = Literal["as-is", "logits"]

DEFAULT_DECOMPOSITION = (16384, 2)  # ezkl 23.0.5's own default
BASES: tuple[int, ...] = (128, 1024, 16384)
MIN_COVERAGE = 2**28  # what ezkl's default decomposition covers: the search never covers less
HEADROOM = 16  # inputs up to 16x the calibrated magnitude still decompose
MAX_CANDIDATES = 12
CI_MAX_CANDIDATES = 3
SEARCH_BUDGET_S = 90.0  # of the 2-minute onboarding bound; setup and hashing need the rest


@dataclass(frozen=True)
class Candidate:
    scale: int
    decomp_base: int
    decomp_legs: int
    head: Head = "as-is"

    @property
    def label(self) -> str:
        return f"scale {self.scale}, base {self.decomp_base}^{self.decomp_legs}, {self.head}"


@dataclass(frozen=True)
class Tried:
    """One candidate's outcome. ``logrows``/``num_rows`` are 0 when it could not be built."""

    scale: int
    logrows: int
    max_abs_error: float
    decomp_base: int = DEFAULT_DECOMPOSITION[0]
    decomp_legs: int = DEFAULT_DECOMPOSITION[1]
    head: Head = "as-is"
    num_rows: int = 0
    note: str = ""

    @property
    def cost(self) -> tuple[int, int]:
        """Proving cost grows with the circuit's rows: 2^logrows first, then rows used."""
        return (self.logrows, self.num_rows)

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        if not math.isfinite(self.max_abs_error):
            raw["max_abs_error"] = None  # could not be built: see note
        return raw


def max_candidates() -> int:
    return CI_MAX_CANDIDATES if os.environ.get("CI", "").lower() == "true" else MAX_CANDIDATES


def needed_coverage(max_abs: float, max_scale: int) -> int:
    """base^legs must cover this: the largest calibrated value at the largest scale a
    product takes before rebasing (input scale + param scale), with headroom, both signs."""
    quantised = max(max_abs, 1.0) * 2.0 ** (2 * max_scale)
    return max(MIN_COVERAGE, math.ceil(2 * HEADROOM * quantised))


def decompositions(need: int) -> list[tuple[int, int]]:
    """For each base, the fewest legs covering ``need``; smallest base (smallest table) first."""
    out = []
    for base in BASES:
        legs = 1
        while base**legs < need:
            legs += 1
        out.append((base, legs))
    return out


def softmax_logits(model: onnx.ModelProto) -> str | None:
    """The logits tensor when the model's one output is a softmax over its last axis."""
    if len(model.graph.output) != 1:
        return None
    out = model.graph.output[0]
    producers = [n for n in model.graph.node if out.name in n.output]
    if len(producers) != 1 or producers[0].op_type != "Softmax":
        return None
    node = producers[0]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    dims = out.type.tensor_type.shape.dim
    if axis not in (-1, len(dims) - 1):
        return None
    # The search compares the flattened outputs: one row only (batch dims symbolic or 1).
    if any(d.HasField("dim_value") and d.dim_value != 1 for d in dims[:-1]):
        return None
    if any(out.name in n.input for n in model.graph.node):
        return None
    return str(node.input[0])


def strip_softmax(model_path: Path, dest: Path) -> Path:
    """A copy of the model whose output is the softmax's input (same weights, same name)."""
    model = onnx.load(str(model_path))
    logits = softmax_logits(model)
    if logits is None:
        raise ZkError(f"{model_path}: the output is not a last-axis softmax")
    out = model.graph.output[0]
    keep = [n for n in model.graph.node if out.name not in n.output]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    out.name = logits
    onnx.save(model, str(dest))
    return dest


def softmax(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


def intermediate_max_abs(model_path: Path, rows: npt.NDArray[Any], input_name: str) -> float:
    """Largest |value| any node produces on the calibration rows (onnxruntime)."""
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                have.add(name)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    worst = float(np.max(np.abs(rows))) if rows.size else 0.0
    for row in rows:
        for value in session.run(None, {input_name: row.reshape(1, *row.shape)}):
            arr = np.asarray(value, dtype=np.float64)
            if arr.size:
                worst = max(worst, float(np.max(np.abs(arr))))
    return worst


def srs_logrows(path: Path) -> int:
    """k of a KZG SRS file (halo2's format starts with k as a little-endian u32)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if len(head) != 4:
        raise ZkError(f"{path} is not a KZG SRS file")
    k = int.from_bytes(head, "little")
    if not 1 <= k <= 28:
        raise ZkError(f"{path} is not a KZG SRS file (k = {k})")
    return k


def best(tried: Sequence[Tried], tolerance: float, max_logrows: int | None) -> Tried | None:
    ok = [
        t
        for t in tried
        if t.logrows
        and t.max_abs_error <= tolerance
        and (max_logrows is None or t.logrows <= max_logrows)
    ]
    # Ties go to the earlier (smaller-scale) candidate: min keeps the first minimum.
    return min(ok, key=lambda t: t.cost) if ok else None


def reason(chosen: Tried, tried: Sequence[Tried], tolerance: float) -> str:
    others = [t for t in tried if t is not chosen and t.logrows]
    accurate = [t for t in others if t.max_abs_error <= tolerance]
    text = (
        f"smallest circuit (logrows {chosen.logrows}, {chosen.num_rows} rows) among "
        f"{len(accurate) + 1} candidate(s) within tolerance {tolerance:g} "
        f"(max |error| {chosen.max_abs_error:.3g})"
    )
    if chosen.head == "logits":
        text += "; the softmax is applied by the gateway to the proven logits"
    return text
