"""The byte-level tokenizer shared by the gateway and the tiny GPT on the nodes.

A token is a UTF-8 byte (ids 0-255) or the end token (`EOS`, 256). Nothing is learned, so
the gateway counts a prompt's tokens exactly as the node will, and `TOKENIZER_SPEC_SHA256`
(recorded in a generative model's registry entry) pins this definition: a node model
trained on another tokenizer is refused at registration, not discovered by garbled text.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

VOCAB = 257  # 256 byte values and the end token
EOS = 256
END_TOKENS: tuple[int, ...] = (EOS,)

# The chat template: a fixed plain-text frame, one line per message, then the
# assistant's turn left open for the model to complete.
_ROLES = ("system", "user", "assistant")
_TURN = "<|{role}|>\n{content}\n"
_OPEN = "<|assistant|>\n"

TOKENIZER_SPEC: dict[str, object] = {
    "kind": "bytes",
    "encoding": "utf-8",
    "vocab": VOCAB,
    "end_tokens": list(END_TOKENS),
    "chat": {"roles": list(_ROLES), "turn": _TURN, "open": _OPEN},
}
TOKENIZER_SPEC_SHA256 = hashlib.sha256(
    json.dumps(TOKENIZER_SPEC, sort_keys=True, separators=(",", ":")).encode()
).hexdigest()


def encode(text: str) -> tuple[int, ...]:
    """Token ids of `text` (its UTF-8 bytes); never adds the end token."""
    return tuple(text.encode("utf-8"))


class Detokenizer:
    """Turns a stream of token ids back into text, one complete character at a time.

    A character split across tokens is held back until its last byte arrives, so every
    piece handed on is valid UTF-8 text; bytes that can never form one decode to U+FFFD.
    The end token (and any id outside the vocabulary) yields no text.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """The text of any incomplete trailing character (as U+FFFD), then resets."""
        return self._decoder.decode(b"", final=True)


def chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text for chat `messages` ({"role", "content"} each).

    Raises ValueError on an unknown role or a non-string content; the caller maps it to a
    bad-request problem.
    """
    parts = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"unknown chat role {role!r}: expected one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise ValueError("chat message content must be a string")
        parts.append(_TURN.format(role=role, content=content))
    return "".join(parts) + _OPEN
