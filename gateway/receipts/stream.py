"""Receipts around a stream from a generative model: one when it opens, one when it ends.

The opening receipt is signed and logged once a node is picked, while its first token is
on its way (gateway/generate/opening.py), and is durable before anything reaches the
client: the caller, the model, policy's decision, a salted commitment to the prompt's
token ids, the sampling parameters and the node. The closing receipt
commits, with the same salt, to every token id sent to the client, counts them, says why
the stream ended and names the opening receipt (ext "opening"), so a verifier can pair
them (gateway.receipts.verify). Token ids are committed as INT64 tensors with the
tensors' commitment (gateway.receipts.commit): a client holding the salt can show what it
sent and got, nobody else learns it. Text never enters a receipt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.protocol.tensors import Tensor
from gateway.receipts.issue import Issued, issue
from gateway.receipts.model import ClientRef, ExtValue, ModelRef, PolicyRef, VerificationRef
from gateway.receipts.service import ReceiptService

PROMPT = "prompt_ids"
OUTPUT = "output_ids"


def token_tensor(name: str, ids: Sequence[int]) -> Tensor:
    """Token ids as the tensor their commitment is computed over."""
    return Tensor(name, "INT64", (len(ids),), np.asarray(ids, dtype=np.int64).reshape(len(ids)))


@dataclass(frozen=True)
class StreamHeader:
    """What both receipts of one stream share."""

    client: ClientRef
    model: ModelRef
    policy: PolicyRef
    node: str
    request_id: str
    salt: bytes
    # Mode redundant (gateway/generate/verified.py): the other nodes that sent each token.
    peers: tuple[str, ...] = ()
    mode: str = "none"  # none | redundant

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.node, *self.peers)


async def open_stream(
    service: ReceiptService,
    head: StreamHeader,
    prompt_ids: Sequence[int],
    parameters: Mapping[str, ExtValue],
) -> Issued:
    """The opening receipt, durable when this returns."""
    return await issue(
        service.log,
        service.signer,
        kind="open",
        client=head.client,
        model=head.model,
        inputs=[token_tensor(PROMPT, prompt_ids)],
        policy=head.policy,
        verification=VerificationRef(head.mode, "unverified" if head.mode == "none" else "open"),
        nodes=head.nodes,
        request_id=head.request_id,
        salt=head.salt,
        extensions={"prompt_tokens": len(prompt_ids), **parameters},
    )


async def close_stream(
    service: ReceiptService,
    head: StreamHeader,
    opening: str,
    prompt_tokens: int,
    output_ids: Sequence[int],
    finish_reason: str,
    verification: VerificationRef | None = None,
    extensions: Mapping[str, ExtValue] | None = None,
) -> Issued:
    """The closing receipt of what was sent, durable when this returns; `verification`
    defaults to mode none's, `extensions` adds to the counts (a divergence, a check)."""
    return await issue(
        service.log,
        service.signer,
        kind="close",
        client=head.client,
        model=head.model,
        outputs=[token_tensor(OUTPUT, output_ids)],
        policy=head.policy,
        verification=verification or VerificationRef("none", "unverified"),
        nodes=head.nodes,
        request_id=head.request_id,
        salt=head.salt,
        extensions={
            **(extensions or {}),
            "opening": opening,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(output_ids),
        },
    )
