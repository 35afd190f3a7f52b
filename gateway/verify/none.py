"""Mode `none`: one node's answer, checked against the model's signature only.

With spot checks (`gateway.verify.spotcheck`), a sample of answers, at the rate the
answering node's reputation sets (never below the policy's `@spot_check`), is marked
``spot_check = "scheduled"`` in its receipt and re-run later on a node of another provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.job import Job, Outcome

if TYPE_CHECKING:
    from gateway.routing.router import Router
    from gateway.verify.spotcheck import SpotChecks


class NoVerification:
    mode = "none"

    def __init__(self, max_output_bytes: int, spot: SpotChecks | None = None) -> None:
        self.max_output_bytes = max_output_bytes
        self.spot = spot

    async def run(self, job: Job, router: Router) -> Outcome:
        routed = await router.infer(job, max_output_bytes=self.max_output_bytes)
        return Outcome(
            outputs=tuple(routed.outputs),
            nodes=(routed.node.name,),
            mode=self.mode,
            status="unverified",
            attempts=routed.attempts,
            nonfinite=routed.nonfinite,
            evidence=(
                {"spot_check": "scheduled"}
                if self.spot is not None and self.spot.sample(routed.node, job.spot_check)
                else {}
            ),
        )
