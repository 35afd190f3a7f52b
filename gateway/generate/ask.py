"""What a client asks a generative model, from each surface's request body.

Only counts and sampling parameters leave this module's checks for policy; the prompt's
text is tokenized here and never kept. Every refusal is a fixed-text `BadRequest` that
names the field, never its value (client text stays out of problems and logs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.jsonstrict import StrictJSONError, loads
from gateway.llm.tokenizer import chat_prompt, encode
from gateway.pipeline.decide import BAD_PURPOSE, UNKNOWN_MODE, valid_purpose
from gateway.protocol.problems import BadRequest
from gateway.verify import MODES

Surface = Literal["chat", "completion", "triton"]
MAX_MESSAGES = 256
MAX_TEMPERATURE = 2.0
# Stop sequences (gateway/generate/stop.py): OpenAI's count; the length bounds what a
# stream holds back while a stop may still be starting.
MAX_STOPS = 4
MAX_STOP_BYTES = 64


@dataclass(frozen=True)
class Ask:
    surface: Surface
    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    mode: str | None  # ztgate.verification, when the client names one
    purpose: str
    include_usage: bool = False  # OpenAI stream_options.include_usage
    # UTF-8 stop sequences (gateway/generate/stop.py): client text, kept out of reprs.
    stop: tuple[bytes, ...] = field(default=(), repr=False)


def parse(surface: Surface, body: bytes, *, model: str | None, default_max_tokens: int) -> Ask:
    """The request of `surface`; `model` from the path (Triton) or None (OpenAI: body)."""
    try:
        doc = loads(body, source="request body")
    except StrictJSONError as exc:
        # Fixed text: the parser's message may quote a key, which is client text.
        raise BadRequest("request body must be one JSON object (UTF-8, no duplicate keys)") from exc
    if surface == "triton":
        return _triton(doc, model or "", default_max_tokens)
    return _openai(surface, doc, default_max_tokens)


def _openai(surface: Surface, doc: Mapping[str, Any], default_max: int) -> Ask:
    name = doc.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("model must be a non-empty string")
    if surface == "chat":
        messages = doc.get("messages")
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
            raise BadRequest(f"messages must be a list of 1 to {MAX_MESSAGES} messages")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("each message must be an object with role and content")
        try:
            text = chat_prompt(messages)
        except ValueError as exc:  # fixed text from the tokenizer: roles, never content
            raise BadRequest(_first_line(exc)) from exc
    else:
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (or a list of one string)")
        text = prompt
    n = doc.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise BadRequest("n must be 1: one choice per request")
    for key in ("tools", "functions", "logprobs", "echo", "suffix"):
        if doc.get(key) not in (None, False):
            raise BadRequest(f"{key} is not supported by this gateway")
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    options = doc.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    return Ask(
        surface=surface,
        model=name,
        prompt_ids=encode(text),
        max_tokens=_max_tokens(max_tokens, default_max),
        temperature=_float(doc.get("temperature"), "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_top_p(doc.get("top_p")),
        stream=_bool(doc.get("stream"), "stream"),
        mode=_mode(doc.get("ztgate.verification")),
        purpose=_purpose(doc.get("ztgate.purpose")),
        include_usage=usage,
        stop=_stop(doc.get("stop")),
    )


def _triton(doc: Mapping[str, Any], model: str, default_max: int) -> Ask:
    text = doc.get("text_input")
    if not isinstance(text, str):
        raise BadRequest("text_input must be a string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object")
    extra = set(doc) - {"text_input", "parameters", "id"}
    if extra:
        # Names only, sorted and bounded: they are client text.
        raise BadRequest("unknown inputs; this model takes text_input and parameters")
    return Ask(
        surface="triton",
        model=model,
        prompt_ids=encode(text),
        max_tokens=_max_tokens(params.get("max_tokens"), default_max),
        temperature=_float(params.get("temperature"), "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_top_p(params.get("top_p")),
        stream=_bool(params.get("stream"), "stream"),
        mode=_mode(params.get("ztgate.verification")),
        purpose=_purpose(params.get("ztgate.purpose")),
        stop=_stop(params.get("stop")),
    )


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]


def _max_tokens(raw: Any, default: int) -> int:
    if raw is None:
        return default
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return raw


def _float(raw: Any, name: str, default: float, low: float, high: float) -> float:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise BadRequest(f"{name} must be a number")
    value = float(raw)
    if not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}")
    return value


def _top_p(raw: Any) -> float:
    value = _float(raw, "top_p", 1.0, 0.0, 1.0)
    if value <= 0.0:
        raise BadRequest("top_p must be above 0 and at most 1")
    return value


def _stop(raw: Any) -> tuple[bytes, ...]:
    """A string or a list of up to MAX_STOPS non-empty strings ("" alone, [] or null:
    none), each at most MAX_STOP_BYTES of UTF-8."""
    if raw is None or raw == "":
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    if len(items) > MAX_STOPS:
        raise BadRequest(f"stop takes at most {MAX_STOPS} sequences")
    try:
        out = tuple(s.encode("utf-8") for s in items)
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON escape
        raise BadRequest("stop sequences must be valid Unicode text") from exc
    if any(len(s) > MAX_STOP_BYTES for s in out):
        raise BadRequest(f"each stop sequence must be at most {MAX_STOP_BYTES} bytes of UTF-8")
    return out


def _bool(raw: Any, name: str) -> bool:
    if raw is None:
        return False
    if not isinstance(raw, bool):
        raise BadRequest(f"{name} must be true or false")
    return raw


def _mode(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or raw not in MODES:
        raise BadRequest(UNKNOWN_MODE)
    return raw


def _purpose(raw: Any) -> str:
    if raw is None:
        return ""
    if not valid_purpose(raw):
        raise BadRequest(BAD_PURPOSE)
    assert isinstance(raw, str)
    return raw
