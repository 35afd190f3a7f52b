"""Scenario: a generative model through the production deployment.

The customer's application streams a chat completion from tinygpt (registered with
`ztgate model add --generative`, served by `ztgate node serve` as a decoupled Triton
model) through a replica with its client certificate, as an OpenAI client would. The
opening receipt arrives before any text and the closing receipt last; both carry the
replica's summary signature under its published receipt key, read back by id as their
owner, and pair up (the closing one names the opening one). The client's salt opens the
opening receipt's commitment to exactly the prompt's tokens; another salt does not (the
control for that check).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from gateway.llm.tokenizer import chat_prompt, encode
from gateway.receipts.canonical import canonical_json
from gateway.receipts.commit import commit_tensor
from gateway.receipts.model import SignedReceipt
from gateway.receipts.signing import verify_summary
from gateway.receipts.stream import OUTPUT, PROMPT, token_tensor
from tests.system.cluster import GENERATIVE, ProductionCluster, Replica

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]


def read_back(cluster: ProductionCluster, replica: Replica, rid: str) -> SignedReceipt:
    with cluster.client("shop", timeout=30) as c:
        r = c.get(f"{replica.base}/v2/receipts/{rid}")
    assert r.status_code == 200, r.text
    doc = r.json()
    return SignedReceipt.from_bytes(canonical_json({k: doc[k] for k in ("receipt", "sig")}))


def test_a_stream_opens_and_closes_with_receipts_that_verify(
    production_cluster: ProductionCluster,
) -> None:
    cluster = production_cluster
    replica = cluster.replicas[1]
    messages = [{"role": "user", "content": "def "}]
    body = {
        "model": GENERATIVE,
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    with (
        cluster.client("shop", timeout=120) as http,
        http.stream("POST", f"{replica.base}/v1/chat/completions", json=body) as s,
    ):
        assert s.status_code == 200, s.read().decode(errors="replace")
        lines = [x for x in s.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events: list[dict[str, Any]] = [json.loads(x[6:]) for x in lines[:-1]]
    first, last = events[0]["ztgate"], events[-1]["ztgate"]
    assert events[0]["choices"][0]["delta"].get("content", "") == ""  # receipt before text
    assert last["finish_reason"] in ("stop", "length")

    keys = replica.keyset()
    opening = read_back(cluster, replica, first["receipt"]["id"])
    closing = read_back(cluster, replica, last["receipt_id"])
    for signed, shown in ((opening, first["receipt"]), (closing, last["receipt"])):
        assert keys.verify(signed)
        assert verify_summary(shown["summary"], keys, signed.receipt), shown["summary"]
    op, cl = opening.receipt, closing.receipt
    assert (op.kind, cl.kind) == ("open", "close")
    assert op.model is not None and op.model.name == GENERATIVE
    assert cl.extensions["opening"] == op.receipt_id and cl.request_id == op.request_id
    assert op.nodes == cl.nodes and op.nodes[0] == first["node"]
    used = events[-1]["usage"]["completion_tokens"]
    assert cl.extensions["completion_tokens"] == used and cl.outputs[0].shape == (used,)
    assert cl.outputs[0].name == OUTPUT
    # The client's salt opens the commitment to exactly its prompt's tokens.
    salt = base64.b64decode(first["salt"])
    prompt = token_tensor(PROMPT, encode(chat_prompt(messages)))
    assert op.inputs[0].commitment == commit_tensor(prompt, salt)
    assert op.inputs[0].commitment != commit_tensor(prompt, bytes(len(salt)))
