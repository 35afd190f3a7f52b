"""Mode `none`: one node's answer, checked against the model's signature only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.job import Job, Outcome

if TYPE_CHECKING:
    from gateway.routing.router import Router


class NoVerification:
    mode = "none"

    def __init__(self, max_output_bytes: int) -> None:
        self.max_output_bytes = max_output_bytes

    async def run(self, job: Job, router: Router) -> Outcome:
        routed = await router.infer(job, max_output_bytes=self.max_output_bytes)
        return Outcome(
            outputs=tuple(routed.outputs),
            nodes=(routed.node.name,),
            mode=self.mode,
            status="unverified",
            attempts=routed.attempts,
            nonfinite=routed.nonfinite,
        )
