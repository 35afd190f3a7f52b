"""The forward listener's counts on the gateway's registry, read at scrape time (nothing
on the request path): ``ztgate_forward_accepted_total`` and
``ztgate_forward_refusals_total{reason}``, `reason` being the refusal's stable slug
(docs/ddil.md, "Forwarding to the core"). A rise in `forward-for-denied`,
`statement-signature` or `replayed` is a site trying what it may not: worth an alert."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.forward.listener import ForwardListener

__all__ = ["ForwardMetrics"]


class ForwardMetrics(Collector):
    def __init__(self, listener: ForwardListener) -> None:
        self.listener = listener

    def collect(self) -> Iterator[CounterMetricFamily]:
        accepted = CounterMetricFamily(
            "ztgate_forward_accepted",
            "Forwarded requests whose statement and forward_for held (then served as the client)",
        )
        accepted.add_metric([], self.listener.accepted)
        yield accepted
        refusals = CounterMetricFamily(
            "ztgate_forward_refusals",
            "Forwarded requests the forward listener refused, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(self.listener.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
