"""The cheaper forms of per-request work (issue 19, bench/README.md "Lean per request,
second pass") do what the forms they replaced did."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.app import Gateway
from gateway.pipeline import Caller, Incoming, body_of
from gateway.pki import PKI
from gateway.protocol.problems import Problem
from gateway.protocol.tensors import all_finite
from gateway.telemetry import Children
from tests.test_pipeline import gw, json_body, scope_of  # noqa: F401 (gw: the fixture)

IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 3, 64, 65, 1000])
def test_all_finite_agrees_with_numpy_small_and_large(dtype: Any, size: int) -> None:
    arr = np.linspace(-3, 3, size).astype(dtype).reshape(1, size)
    assert all_finite(arr) and np.isfinite(arr).all()  # the positive control
    for bad in (np.nan, np.inf, -np.inf):
        for at in {0, size // 2, size - 1}:
            spoilt = arr.copy()
            spoilt[0, at] = bad
            assert not all_finite(spoilt) and not np.isfinite(spoilt).all()


def test_a_cached_child_counts_into_the_same_series_as_labels() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["route", "status"], registry=registry)
    children = Children(counter)
    children("infer", "200").inc()
    children("infer", "200").inc()
    counter.labels("infer", "200").inc()
    children("infer", "403").inc()
    assert children("infer", "200") is counter.labels("infer", "200")
    assert registry.get_sample_value("c_total", {"route": "infer", "status": "200"}) == 3
    assert registry.get_sample_value("c_total", {"route": "infer", "status": "403"}) == 1


def test_past_its_cap_a_child_is_looked_up_not_remembered() -> None:
    class Small(Children):
        MAX = 2

    counter = Counter("d", "d", ["k"], registry=CollectorRegistry())
    children = Small(counter)
    for k in "abc":
        children(k).inc()
    assert len(children._children) == 2 and children("c") is counter.labels("c")


@pytest.mark.asyncio(loop_scope="module")
async def test_the_callers_slot_comes_back_when_the_handler_fails(gw: Gateway, pki: PKI) -> None:  # noqa: F811
    concurrency = gw.pipeline.admission.concurrency
    seen: list[int] = []

    async def fails(_: Caller) -> Any:
        seen.append(concurrency.in_flight)
        raise RuntimeError("the handler failed")

    async def answers(_: Caller) -> str:
        seen.append(concurrency.in_flight)
        return "answered"

    def came() -> Incoming:
        return Incoming(scope=scope_of(pki, "demo"), headers={}, body=body_of(json_body(IRIS)))

    assert await gw.pipeline.authenticated(came(), answers) == "answered"  # the control
    with pytest.raises(RuntimeError, match="the handler failed"):
        await gw.pipeline.authenticated(came(), fails)
    # A whole inference that fails at the node (none listens): a problem, slot given back.
    with pytest.raises(Problem):
        await gw.pipeline.infer(
            Incoming(
                scope=scope_of(pki, "demo"),
                headers={},
                body=body_of(json_body(IRIS)),
                model="iris",
            ),
            lambda answer: answer,
        )
    assert seen == [1, 1]  # each handler ran holding its slot
    assert concurrency.in_flight == 0 and concurrency.by_identity == {}
