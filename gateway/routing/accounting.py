"""Wiring lie accounting into a built gateway: reputation, spot checks, their log and metrics.

`add_lie_accounting(cfg, gw)` is what `gateway.runtime.build_gateway` calls: the router
gets a `Reputation` (quarantine file `<data_dir>/quarantine.jsonl`), quarantine and
release events become typed log leaves (`node_quarantine`, `node_release`) with their
records, and mode `none` samples answers for spot checks whose verdicts are logged as
`late_evidence` about the receipt: at the configured rates with ``[reputation]
spot_checks = true``, and never below a permit's ``@spot_check`` whatever the config says
(the check queue is always built, so a config cannot switch a policy's checks off).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.receipts.canonical import canonical_json
from gateway.receipts.entry import LogEntry
from gateway.receipts.late import record_late_evidence
from gateway.routing.reputation import QuarantineEvent, Reputation, Sampling, Sprt
from gateway.verify.none import NoVerification
from gateway.verify.spotcheck import SpotCheckMetrics, SpotChecks
from gateway.verify.text_check import TextChecks, recorder

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config import Config
    from gateway.routing.router import Router

log = logging.getLogger(__name__)


class ReputationMetrics(Collector):
    """``ztgate_node_quarantines_total``, ``ztgate_node_releases_total`` (this replica's
    counts) and ``ztgate_nodes_quarantined`` (now)."""

    def __init__(self, reputation: Reputation) -> None:
        self.reputation = reputation

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        rep = self.reputation
        yield CounterMetricFamily(
            "ztgate_node_quarantines", "Nodes or providers quarantined", value=rep.quarantines
        )
        yield CounterMetricFamily(
            "ztgate_node_releases", "Quarantines released by an officer", value=rep.releases
        )
        yield GaugeMetricFamily(
            "ztgate_nodes_quarantined",
            "Nodes that receive no traffic until an officer releases them",
            value=sum(1 for n in rep.nodes.values() if rep.quarantined(n)),
        )


def add_lie_accounting(cfg: Config, gw: Gateway) -> Reputation:
    rc = cfg.reputation
    receipts = gw.receipts

    async def on_event(ev: QuarantineEvent) -> None:
        if receipts is None:
            return
        kind = "node_quarantine" if ev.state == "quarantined" else "node_release"
        record = canonical_json({"type": f"ztgate-{kind}/v1", **ev.__dict__})
        try:
            await receipts.record_document(LogEntry(kind, hashlib.sha256(record).digest()), record)
        except Exception:  # the event stands (file, store); losing its leaf is logged
            log.exception("could not log a %s event", kind)

    rep = Reputation(
        gw.store,
        (s.config for s in gw.router.nodes.values()),
        test=Sprt(rc.p0, rc.p1, rc.alpha),
        sampling=Sampling(
            rc.rate_suspect,
            rc.rate_established,
            rc.rate_trusted,
            rc.trusted_after,
            rc.long_trusted_after,
        ),
        path=cfg.data_dir / "quarantine.jsonl",
        on_event=on_event,
    )
    gw.router.reputation = rep
    gw.metrics.registry.register(ReputationMetrics(rep))

    async def record(receipt_id: str, verdict: str, nodes: tuple[str, ...], why: str) -> None:
        if receipts is not None:
            await record_late_evidence(
                receipts,
                receipt_id=receipt_id,
                verdict=verdict,
                kind="spot_check",
                nodes=nodes,
                reason=why,
            )

    spot = SpotChecks(
        gw.router,
        max_queue=rc.queue,
        workers=rc.workers,
        timeout_s=rc.check_timeout_s,
        max_output_bytes=cfg.limits.max_output_bytes,
        record=record,
        configured=rc.spot_checks,
    )
    none = gw.verifiers.get("none")
    if isinstance(none, NoVerification):
        none.spot = spot
    stage = gw.pipeline.receipt
    if stage is not None:
        stage.spot = spot
    gw.spot = spot  # type: ignore[attr-defined]
    gw.background.append(spot.run)
    gw.metrics.registry.register(SpotCheckMetrics(spot))
    add_text_checks(gw, spot)
    return rep


def add_text_checks(gw: Gateway, spot: SpotChecks) -> None:
    """Spot checks of generated text (gateway/generate/verified.py): sampled by `spot`'s
    rates, run by a `TextChecks` queue of the same bounds, verdicts logged as late
    evidence (kind ``text_spot_check``) about the closing receipt."""
    from gateway.generate.verified import TextSpot  # the generate routes import routing

    checks = TextChecks(
        gw.router,
        max_queue=spot.queue.maxsize,
        workers=spot.workers,
        timeout_s=spot.timeout_s,
        record=recorder(gw.receipts),
    )
    text_spot = TextSpot(gw.router, spot, checks)
    gw.text_spot = text_spot  # type: ignore[attr-defined]
    service = getattr(gw, "generate", None)
    if service is not None:  # routes built first: give them the checks too
        service.text_spot = text_spot
    gw.background.append(checks.run)


def node_listing(router: Router) -> list[dict[str, object]]:
    """What `ztgate nodes` shows: health, reputation, evidence and quarantine per node."""
    rep = router.reputation
    out: list[dict[str, object]] = []
    for name, st in sorted(router.nodes.items()):
        row: dict[str, object] = {
            "name": name,
            "provider": st.config.provider,
            "region": st.config.region,
            "health": {
                "ejected": name in router.ejected,
                "failures": st.failures,
                "attempts": st.attempts,
                "served": st.served,
                "failed": st.failed,
                "ejections": st.ejections,
                "disputed": st.disputed,
            },
        }
        if rep is not None:
            row.update(rep.describe(st.config))
        out.append(row)
    return out
