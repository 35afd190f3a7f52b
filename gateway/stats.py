"""Per-model inference statistics from the gateway's own counters, in Triton's shape.

Triton's statistics extension (`GET /v2/models[/{name}[/versions/{v}]]/stats`, gRPC
`ModelStatistics`) reports, per model version, counts and cumulative durations. The
gateway reports the same members, measured from its own point of view: a request is
one inference of the model it named, from the moment the gateway accepted its
connection's request to the moment the answer was rendered.

- `success`: answered inferences, and their whole time in the gateway;
- `fail`: inferences of a registered model that ended in a problem after admission (a bad
  tensor, a policy denial, every node failing, ...), and their time;
- `compute_input`: reading, decompressing and decoding the body, the signature check and
  the replay check;
- `compute_infer`: the verification mode: every node call, retries and the verification;
- `compute_output`: the receipt (signed, logged, fsynced) and the rendered answer;
- `queue`: the rest of an answered request: identity, admission, policy, mode, rate, route;
- `inference_count`: rows answered (the batch dimension; 1 for a model without one);
- `execution_count`: answered requests (the gateway executes each once, however many
  nodes it took; `ztgate.attempts` in the answer counts node calls);
- `last_inference`: milliseconds since the epoch of the last inference, answered or not.

`success.ns == queue.ns + compute_input.ns + compute_infer.ns + compute_output.ns`, as in
Triton. Counters live in this process (per replica, like Triton's per server) and start
at zero; they hold one row per registered model version, so they are bounded by the
registry, never by what clients send.

Front-neutral: `Pipeline.infer` records through `InferenceStats.infer` and the stage
marks (`mark`), whichever front called it; `model_stats` renders the JSON both fronts
answer with (the gRPC front converts the same dict to its message).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.pipeline.catalog import Catalog
    from gateway.pipeline.context import Answer, Incoming
    from gateway.registry import ModelEntry

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
# Triton reports these too; the gateway has no response cache, so they stay zero.
ALWAYS_ZERO = ("cache_hit", "cache_miss")
MARKS = ("input", "infer", "output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """One model version's counters."""

    name: str
    version: str
    durations: dict[str, Duration] = field(
        default_factory=lambda: {k: Duration() for k in DURATIONS}
    )
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0  # ms since the epoch

    def to_json(self) -> dict[str, Any]:
        """Triton's JSON for one entry of `model_stats` (server 2.51's members)."""
        inference = {k: d.to_json() for k, d in self.durations.items()}
        inference.update({k: Duration().to_json() for k in ALWAYS_ZERO})
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": inference,
            "response_stats": {},
            "batch_stats": [],
            "memory_usage": [],
        }


@dataclass
class Timing:
    """One inference's clock (time.monotonic_ns), marked by the pipeline as it goes."""

    arrived: int  # when the front accepted the request
    admitted: int  # when the stages after admission began
    marks: dict[str, int] = field(default_factory=dict)
    answer: Answer | None = None  # set by the pipeline once the request is answered


@dataclass
class StreamTiming:
    """One generation's clock (time.monotonic_ns), from its arrival to its closing receipt."""

    arrived: int  # when the front accepted the request
    admitted: int  # when the stages after admission began
    decoded: int = 0  # the body read and tokenized
    node_asked: int = 0  # every check passed; a node is asked for its first token
    first_token: int = 0
    opened: int = 0  # the opening receipt logged
    last_token: int = 0  # the node's stream over (ended, cancelled or broken)


# A generation's finish reasons that count as answered (`success`); cancelled (the client
# left or stopped reading) and node-error count as `fail`, as a refusal after admission.
ANSWERED = frozenset({"stop", "length"})

_current: ContextVar[Timing | None] = ContextVar("ztgate_inference_timing", default=None)


def rows(entry: ModelEntry, answer: Answer) -> int:
    """The request's batch size when the model has a batch dimension, else 1."""
    inputs = answer.decided.asked.request.inputs
    batched = bool(entry.inputs) and bool(entry.inputs[0].shape) and entry.inputs[0].shape[0] < 0
    if batched and inputs and inputs[0].shape:
        return max(1, int(inputs[0].shape[0]))
    return 1


class InferenceStats:
    """The counters of every registered model version, fed by the pipeline."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._stats: dict[tuple[str, str], ModelStats] = {}

    # ------------------------------------------------------------------ recording

    @contextlib.contextmanager
    def infer(self, incoming: Incoming) -> Iterator[Timing]:
        """Around the stages after admission: success if the block ends, failure if it
        raises. A request for a model the registry does not have is not counted."""
        now = time.monotonic_ns()
        timing = Timing(arrived=int(incoming.started * 1e9), admitted=now)
        token = _current.set(timing)
        try:
            yield timing
        except BaseException:
            self._record(incoming, timing, time.monotonic_ns(), ok=False)
            raise
        else:
            self._record(incoming, timing, time.monotonic_ns(), ok=timing.answer is not None)
        finally:
            _current.reset(token)

    @staticmethod
    def mark(point: str) -> None:
        """The pipeline passed `point` ("input": body decoded and checked; "infer": the
        verification mode starts; "output": it returned). No-op outside `infer`."""
        timing = _current.get()
        if timing is not None:
            timing.marks[point] = time.monotonic_ns()

    def _record(self, incoming: Incoming, timing: Timing, end: int, *, ok: bool) -> None:
        entry = self._entry(incoming.model, incoming.version)
        if entry is None:
            return
        stats = self.for_entry(entry)
        stats.last_inference = time.time_ns() // 1_000_000
        total = end - timing.arrived
        if not ok or timing.answer is None:
            stats.durations["fail"].add(total)
            return
        marks = timing.marks
        decoded = marks.get("input", timing.admitted)
        infer_start = marks.get("infer", decoded)
        infer_end = marks.get("output", infer_start)
        compute_input = decoded - timing.admitted
        compute_infer = infer_end - infer_start
        compute_output = end - infer_end
        d = stats.durations
        d["success"].add(total)
        d["compute_input"].add(compute_input)
        d["compute_infer"].add(compute_infer)
        d["compute_output"].add(compute_output)
        d["queue"].add(
            total - max(0, compute_input) - max(0, compute_infer) - max(0, compute_output)
        )
        stats.inference_count += rows(entry, timing.answer)
        stats.execution_count += 1

    def generated(self, entry: ModelEntry, t: StreamTiming, finish_reason: str | None) -> None:
        """One generation of `entry` ended: `finish_reason` None when it was refused
        before its stream opened. `compute_input` is the body's decoding, `compute_infer`
        the node's stream from the request for its first token to its last,
        `compute_output` the opening and closing receipts; one inference per stream."""
        end = time.monotonic_ns()
        stats = self.for_entry(entry)
        stats.last_inference = time.time_ns() // 1_000_000
        total = end - t.arrived
        if finish_reason not in ANSWERED:
            stats.durations["fail"].add(total)
            return
        compute_input = max(0, (t.decoded or t.admitted) - t.admitted)
        compute_infer = max(0, t.last_token - t.node_asked)
        compute_output = max(0, t.opened - t.first_token) + max(0, end - t.last_token)
        d = stats.durations
        d["success"].add(total)
        d["compute_input"].add(compute_input)
        d["compute_infer"].add(compute_infer)
        d["compute_output"].add(compute_output)
        d["queue"].add(total - compute_input - compute_infer - compute_output)
        stats.inference_count += 1
        stats.execution_count += 1

    def _entry(self, name: str | None, version: str | None) -> ModelEntry | None:
        if name is None or name not in self.catalog.models:
            return None
        versions = self.catalog.models[name]
        if version is None:
            return self.catalog.latest(name)
        return versions.get(version)

    def for_entry(self, entry: ModelEntry) -> ModelStats:
        key = (entry.name, entry.version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats(entry.name, entry.version)
        return stats

    # ------------------------------------------------------------------ reading

    def model_stats(self, entries: Iterable[ModelEntry]) -> dict[str, Any]:
        """`{"model_stats": [...]}` for these model versions, in the order given (zeros
        for a version nothing has asked yet, as Triton reports a ready model)."""
        out = []
        for entry in entries:
            stats = self._stats.get((entry.name, entry.version))
            out.append((stats or ModelStats(entry.name, entry.version)).to_json())
        return {"model_stats": out}
