"""Stop sequences: the gateway ends a stream before the first text that matches one.

The client's `stop` strings (OpenAI's `stop`; on Triton's generate routes
`parameters.stop`, as the vLLM backend takes it) never go to a node: the gateway matches
them on the tokens it is about to deliver, so every node behaves alike and the closing
receipt commits to exactly what the client got. The tokenizer is byte-level (a token is
one UTF-8 byte, gateway/llm/tokenizer.py), so a match is a run of token ids and always
starts at a token boundary: the text before it is a whole number of tokens. A UTF-8 stop
string can only match at a character boundary of valid text, so matching bytes is
matching text.

Only tokens that may still be the start of a stop sequence are held back, at most the
longest sequence's length less one; the rest are released at once.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScan:
    def __init__(self, stops: Sequence[bytes]) -> None:
        if any(not s for s in stops):
            raise ValueError("an empty stop sequence would match before any text")
        self.stops = tuple(stops)
        self.matched = False
        self._held: list[int] = []

    def feed(self, token: int) -> list[int]:
        """The tokens now safe to deliver, `token` last or held back; after a match
        (`matched`), the tokens before it, and nothing is delivered after."""
        if self.matched:
            return []
        if not self.stops:
            return [token]
        self._held.append(token)
        data = bytes(t for t in self._held if 0 <= t < 256)
        if len(data) != len(self._held):  # not a byte: no stop can span it
            out, self._held = self._held, []
            return out
        # What was held matched nothing, so a match ends at this token; the earliest
        # start wins, which keeps every stop string out of the delivered text.
        found = [at for s in self.stops if (at := data.find(s)) >= 0]
        if found:
            self.matched = True
            out = self._held[: min(found)]
            self._held = []
            return out
        keep = self._open_prefix(data)
        out = self._held[: len(data) - keep]
        self._held = self._held[len(data) - keep :]
        return out

    def _open_prefix(self, data: bytes) -> int:
        """The length of the longest tail of `data` that begins some stop sequence."""
        for k in range(min(len(data), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = data[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> list[int]:
        """At the stream's own end: what was held back is text after all."""
        out, self._held = self._held, []
        return [] if self.matched else out
