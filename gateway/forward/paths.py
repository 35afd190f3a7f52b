"""Which requests are forwarded, and where each names its model.

Triton's routes name the model in the path; OpenAI's in the body's `model`. For those the
edge binds, and the core checks, the model the generate route itself will read: the same
strict parser (no duplicate keys, which two parsers could read differently) and the same
member, so the statement's model and the routed model cannot differ.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.jsonstrict import StrictJSONError, loads

Surface = Literal["infer", "triton", "openai"]

_V2 = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"/(?P<verb>infer|generate|generate_stream)$"
)
_OPENAI = frozenset(("/v1/chat/completions", "/v1/completions"))
# Larger bodies are parsed in a thread: the event loop keeps serving meanwhile.
_PARSE_INLINE_MAX = 64 * 1024


@dataclass(frozen=True)
class Target:
    surface: Surface
    model: str | None  # from the path; None: the body's (OpenAI)
    version: str  # "" when the path names none (always, on OpenAI's routes)
    streams: bool = False  # the path alone says it streams (generate_stream)

    @property
    def generates(self) -> bool:
        return self.surface != "infer"


def target(path: str) -> Target | None:
    """The forwardable route `path` is, or None."""
    if path in _OPENAI:
        return Target("openai", None, "")
    m = _V2.fullmatch(path)
    if m is None:
        return None
    verb = m["verb"]
    surface: Surface = "infer" if verb == "infer" else "triton"
    return Target(surface, m["model"], m["version"] or "", verb == "generate_stream")


def _doc(body: bytes) -> dict[str, Any] | None:
    try:
        doc = loads(body, source="request body")
    except StrictJSONError:
        return None
    return doc if isinstance(doc, dict) else None


async def body_doc(t: Target, body: bytes) -> dict[str, Any] | None:
    """A generation's body as its route reads it (None: not one JSON object, which the
    route refuses too); a larger one parsed off the event loop. An inference's: None."""
    if not t.generates:
        return None
    if len(body) <= _PARSE_INLINE_MAX:
        return _doc(body)
    return await asyncio.to_thread(_doc, body)


def model_of(t: Target, doc: dict[str, Any] | None) -> str | None:
    """The model the route will serve: the path's, or the body's `model` on OpenAI's
    routes (read as `gateway.generate.ask` reads it)."""
    if t.model is not None:
        return t.model
    name = None if doc is None else doc.get("model")
    return name if isinstance(name, str) and name else None


def streams(t: Target, doc: dict[str, Any] | None) -> bool:
    """Whether the answer is a stream of events (as gateway/generate/routes.py decides):
    only the time the edge waits for the answer's head depends on it."""
    if t.streams or doc is None:
        return t.streams
    params = doc.get("parameters") if t.surface == "triton" else doc
    return isinstance(params, dict) and params.get("stream") is True
