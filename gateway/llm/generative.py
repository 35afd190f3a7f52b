"""The generative kind of registry entry: what it records and what its ONNX file must be.

A generative model is an ONNX next-token model (``input_ids`` INT64 [batch, sequence] ->
``logits`` FP32 [batch, vocab]) that a node serves token by token as a decoupled Triton
model. Its registry entry records the tokenizer's hash (so the gateway counts and decodes
tokens exactly as the model was trained), the context length, the end tokens, the sampling
parameters the node honours and the most tokens one request may ask for. The entry's
inputs and outputs are the streaming model's (`STREAM_INPUTS`, `STREAM_OUTPUTS`), which
is what Triton's config and the gateway's stream carry.

Only mode ``none``: redundant execution, zk and mpc are defined for one fixed-shape tensor
answer, not for a sampled token stream (issue 22; verifying text is the next issue's).
"""

from __future__ import annotations

import re
from typing import Any

from gateway.llm import tokenizer
from gateway.registry import GenerativeSpec, RegistryError, TensorSpec

MODES: tuple[str, ...] = ("none",)
SAMPLING: tuple[str, ...] = ("temperature", "top_p", "seed")
DEFAULT_CONTEXT = 128
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_CEILING = 1 << 16

STREAM_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("input_ids", "INT64", (-1,)),
    TensorSpec("max_tokens", "INT32", (1,)),
    TensorSpec("temperature", "FP32", (1,)),
    TensorSpec("top_p", "FP32", (1,)),
    TensorSpec("seed", "UINT64", (1,)),
)
STREAM_OUTPUTS: tuple[TensorSpec, ...] = (TensorSpec("token_id", "INT64", (1,)),)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def default_spec(
    context_length: int = DEFAULT_CONTEXT, max_tokens: int = DEFAULT_MAX_TOKENS
) -> GenerativeSpec:
    """The spec of a model trained on gateway/llm/tokenizer.py (the tiny GPT's)."""
    return GenerativeSpec(
        tokenizer_sha256=tokenizer.TOKENIZER_SPEC_SHA256,
        vocab=tokenizer.VOCAB,
        context_length=context_length,
        end_tokens=tokenizer.END_TOKENS,
        sampling=SAMPLING,
        max_tokens=max_tokens,
    )


def _int(raw: Any, what: str, low: int, high: int) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw <= high:
        raise RegistryError(f"generative {what} must be an integer in [{low}, {high}], got {raw!r}")
    return raw


def validate(spec: GenerativeSpec) -> GenerativeSpec:
    if not isinstance(spec.tokenizer_sha256, str) or not _SHA256.fullmatch(spec.tokenizer_sha256):
        raise RegistryError("generative tokenizer_sha256 must be 64 lowercase hex digits")
    _int(spec.vocab, "vocab", 2, 1 << 20)
    _int(spec.context_length, "context_length", 1, 1 << 20)
    _int(spec.max_tokens, "max_tokens", 1, MAX_TOKENS_CEILING)
    if not spec.end_tokens:
        raise RegistryError("a generative model needs at least one end token")
    for token in spec.end_tokens:
        _int(token, "end token", 0, spec.vocab - 1)
    unknown = sorted(set(spec.sampling) - set(SAMPLING))
    if unknown:
        raise RegistryError(f"unknown sampling parameter(s) {', '.join(unknown)}")
    return spec


def spec_from_json(raw: Any) -> GenerativeSpec:
    if not isinstance(raw, dict):
        raise RegistryError(f"generative spec must be an object, got {raw!r}")
    end_tokens, sampling = raw.get("end_tokens"), raw.get("sampling")
    if not isinstance(end_tokens, list) or not isinstance(sampling, list):
        raise RegistryError("generative spec needs end_tokens and sampling lists")
    return validate(
        GenerativeSpec(
            tokenizer_sha256=raw.get("tokenizer_sha256"),  # type: ignore[arg-type]
            vocab=raw.get("vocab"),  # type: ignore[arg-type]
            context_length=raw.get("context_length"),  # type: ignore[arg-type]
            end_tokens=tuple(end_tokens),
            sampling=tuple(str(s) for s in sampling),
            max_tokens=raw.get("max_tokens"),  # type: ignore[arg-type]
        )
    )


def check_model(
    signature: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
    spec: GenerativeSpec | None,
    origin: str,
) -> GenerativeSpec:
    """The spec to record for an ONNX file with `signature`; refuses a file that is not a
    next-token model over the spec's vocabulary."""
    spec = validate(spec if spec is not None else default_spec())
    inputs, outputs = signature
    if [(t.name, t.datatype, len(t.shape)) for t in inputs] != [("input_ids", "INT64", 2)]:
        raise RegistryError(f"{origin}: a generative model takes one input_ids INT64 [batch, seq]")
    if len(outputs) != 1 or outputs[0].datatype != "FP32" or len(outputs[0].shape) != 2:
        raise RegistryError(f"{origin}: a generative model gives one FP32 logits [batch, vocab]")
    if outputs[0].shape[1] != spec.vocab:
        raise RegistryError(
            f"{origin}: logits over {outputs[0].shape[1]} tokens, the tokenizer has {spec.vocab}"
        )
    return spec
