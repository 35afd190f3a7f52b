"""The two values a verification mode trades in: a `Job` in, an `Outcome` out.

A mode never sees the request context, the HTTP request or the router's internals: only
what it must compute on, by when, and on which nodes policy allows. That keeps the modes
interchangeable and testable with a hand-made `Job`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config import NodeConfig
from gateway.protocol.tensors import RequestedOutput, Tensor
from gateway.registry import ModelEntry

if TYPE_CHECKING:
    from gateway.policy.facts import SpotCheckRate

NodeFilter = Callable[[NodeConfig], bool]


@dataclass(frozen=True)
class Job:
    """What to run, by when, and where policy allows it: everything a mode may use."""

    entry: ModelEntry
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...]  # empty: all of the model's outputs
    deadline: float  # time.monotonic()
    allowed: NodeFilter  # policy's verdict per node, for the mode chosen
    request_id: str  # the gateway's own; never sent to a node
    # Policy's least spot-check rate for a mode-`none` answer (@spot_check); None: none set.
    spot_check: SpotCheckRate | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)


@dataclass(frozen=True)
class Outcome:
    outputs: tuple[Tensor, ...]
    nodes: tuple[str, ...]
    mode: str
    status: str  # "unverified" for none, "verified" / "agreed" for the others
    attempts: int = 1
    nonfinite: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)
