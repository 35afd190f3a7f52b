"""Mode `none`: one node's answer, checked against the model's signature only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.verify import Outcome

if TYPE_CHECKING:
    from gateway.pipeline import Exchange
    from gateway.routing.router import Router


class NoVerification:
    mode = "none"

    def __init__(self, max_output_bytes: int) -> None:
        self.max_output_bytes = max_output_bytes

    async def run(self, x: Exchange, router: Router) -> Outcome:
        assert x.entry is not None and x.request is not None and x.decision is not None
        routed = await router.infer(
            x.entry,
            x.request.inputs,
            tuple(o.name for o in x.request.outputs),
            x.deadline,
            allowed=x.node_allowed,
            request_id=x.request_id,
            max_output_bytes=self.max_output_bytes,
        )
        return Outcome(
            outputs=tuple(routed.outputs),
            nodes=(routed.node.name,),
            mode=self.mode,
            status="unverified",
            attempts=routed.attempts,
            nonfinite=routed.nonfinite,
        )
