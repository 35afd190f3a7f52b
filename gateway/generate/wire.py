"""How a generation looks on each surface: OpenAI's chat/completions objects and chunks,
Triton's generate responses; and how a refusal looks on the OpenAI routes.

Receipts ride inside ordinary events, so unmodified clients read them as extra fields:
the first event carries the opening receipt (before any text), the last one the closing
receipt (`ztgate` on OpenAI objects, `ztgate` beside `text_output` on Triton's).
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.generate import verified
from gateway.generate.session import Closed, Opened, Piece, Stream
from gateway.protocol.problems import Problem
from gateway.receipts.issue import Issued

# OpenAI's finish reasons are stop and length; a stream the node broke is reported in
# `ztgate.finish_reason` and followed by an error event (see `error_event`).
_OPENAI_FINISH = {"stop": "stop", "length": "length"}


def receipt_view(issued: Issued | None, stream: Stream) -> dict[str, Any] | None:
    if issued is None:
        return None
    return {
        "id": issued.receipt.receipt_id,
        "kind": issued.receipt.kind,
        "summary": issued.summary,
        "signed": issued.signed.to_dict(),
    }


def ztgate_open(stream: Stream, opened: Opened) -> dict[str, Any]:
    return {
        "request_id": stream.request_id,
        "decision_id": stream.decision.id,
        "policy_hash": stream.decision.policy_hash,
        "node": opened.node,
        **verified.view(stream),  # mode, status (and a redundant stream's nodes)
        "salt": stream.salt,
        "receipt": receipt_view(opened.issued, stream),
    }


def ztgate_close(stream: Stream, closed: Closed) -> dict[str, Any]:
    opening = stream.opened.issued
    return {
        "request_id": stream.request_id,
        "finish_reason": closed.finish_reason,
        "opening_receipt_id": opening.receipt.receipt_id if opening else None,
        "receipt_id": closed.issued.receipt.receipt_id if closed.issued else None,
        "receipt": receipt_view(closed.issued, stream),
        **verified.close_view(stream, closed.finish_reason),
    }


def whole_view(stream: Stream, opened: Opened, closed: Closed) -> dict[str, Any]:
    """A whole answer's `ztgate`: both receipts, the closing one as `receipt`."""
    out = ztgate_open(stream, opened)
    out["opening_receipt"] = out.pop("receipt")
    out.update(ztgate_close(stream, closed))
    return out


def usage(closed: Closed) -> dict[str, int]:
    return {
        "prompt_tokens": closed.prompt_tokens,
        "completion_tokens": closed.completion_tokens,
        "total_tokens": closed.prompt_tokens + closed.completion_tokens,
    }


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class OpenAIWire:
    """Chat completions (`chat`) or completions (`completion`)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.chat = stream.ask.surface == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + stream.request_id
        self.created = int(time.time())

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def _base(self, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._object(chunk),
            "created": self.created,
            "model": self.stream.entry.name,
        }

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    def event(self, ev: Opened | Piece | Closed) -> bytes:
        if isinstance(ev, Opened):
            out = self._base(True)
            out["choices"] = [self._choice("", None, first=True)]
            out["ztgate"] = ztgate_open(self.stream, ev)
            return sse(out)
        if isinstance(ev, Piece):
            out = self._base(True)
            out["choices"] = [self._choice(ev.text, None)]
            return sse(out)
        out = self._base(True)
        out["choices"] = [self._choice(None, _OPENAI_FINISH.get(ev.finish_reason, "stop"))]
        if not self.stream.ask.include_usage:
            out["usage"] = usage(ev)
            out["ztgate"] = ztgate_close(self.stream, ev)
            return sse(out)
        # stream_options.include_usage: OpenAI's own last chunk, no choices and the usage;
        # the closing receipt rides on the chunk before it, with the finish reason.
        out["usage"] = None
        out["ztgate"] = ztgate_close(self.stream, ev)
        tail = self._base(True)
        tail["choices"] = []
        tail["usage"] = usage(ev)
        return sse(out) + sse(tail)

    def whole(self, text: str, opened: Opened, closed: Closed) -> dict[str, Any]:
        out = self._base(False)
        finish = _OPENAI_FINISH.get(closed.finish_reason, "stop")
        if self.chat:
            message = {"role": "assistant", "content": text}
            out["choices"] = [{"index": 0, "message": message, "finish_reason": finish}]
        else:
            out["choices"] = [{"index": 0, "text": text, "finish_reason": finish}]
        out["usage"] = usage(closed)
        out["ztgate"] = whole_view(self.stream, opened, closed)
        return out


class TritonWire:
    """Triton's generate extension: one JSON object, or one per event."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def _base(self, text: str) -> dict[str, Any]:
        e = self.stream.entry
        return {"model_name": e.name, "model_version": e.version, "text_output": text}

    def event(self, ev: Opened | Piece | Closed) -> bytes:
        if isinstance(ev, Opened):
            out = self._base("")
            out["ztgate"] = ztgate_open(self.stream, ev)
        elif isinstance(ev, Piece):
            out = self._base(ev.text)
        else:
            out = self._base("")
            out["finish_reason"] = ev.finish_reason
            out["usage"] = usage(ev)
            out["ztgate"] = ztgate_close(self.stream, ev)
        return sse(out)

    def whole(self, text: str, opened: Opened, closed: Closed) -> dict[str, Any]:
        out = self._base(text)
        out["finish_reason"] = closed.finish_reason
        out["usage"] = usage(closed)
        out["ztgate"] = whole_view(self.stream, opened, closed)
        return out


def openai_error(p: Problem) -> dict[str, Any]:
    """A problem in the shape OpenAI clients parse; the problem's stable type URI kept."""
    slug = p.type.rsplit("/", 1)[-1]
    body: dict[str, Any] = {
        "message": p.detail or p.title,
        "type": p.type,
        "code": slug,
        "param": None,
    }
    for key in ("request_id", "decision_id", "allowed_modes", "token_limit"):
        if key in p.extra:
            body[key] = p.extra[key]
    return {"error": body}
