"""A C2SP tlog-witness: cosigns a log's checkpoints only if consistent with what it saw.

The witness is its own process with its own key (`ztgate witness serve`). A log pushes
``POST /add-checkpoint`` with the size the witness last cosigned for it, a consistency
proof from that size, and the new signed checkpoint. The witness:

- 404 if no trusted log key covers the origin; 403 if no trusted signature verifies (or
  a matching one fails);
- 400 if the body does not parse or the old size exceeds the checkpoint size;
- 409 (``text/x.tlog.size``, its latest size) if the old size is not its latest;
- 422 if the proof does not verify, if old size 0 comes with a proof, or if the same
  size comes with another root: a fork, a truncation or a reordering of the log;
- 200 with its cosignature line(s) otherwise, after persisting the new checkpoint.

Check and update happen under one lock and the state is fsynced before the answer, so
two racing requests cannot roll the witness back (tlog-witness, "atomically").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.files import atomic_write
from gateway.receipts.canonical import b64, unb64
from gateway.receipts.merkle import EMPTY_ROOT, HASH_SIZE, verify_consistency
from gateway.receipts.note import (
    Checkpoint,
    Cosigner,
    NoteError,
    NoteKey,
    SignedNote,
    WitnessKey,
)
from gateway.signer import Signer

__all__ = [
    "TrustedLog",
    "Witness",
    "WitnessRefused",
    "add_checkpoint_body",
    "witness_app",
]

log = logging.getLogger(__name__)
MAX_PROOF_LINES = 63
MAX_BODY = 64 << 10


class WitnessRefused(Exception):
    """The witness answered with a refusal (4xx): never cosigned."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body.strip()[:200]}")
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class TrustedLog:
    """A log key the witness accepts, for every origin starting with `origin_prefix`.

    Origins carry the log id (``<prefix>/<log id>``), and a replica starts a new log id
    when its log is restored, so witnesses trust a key for a prefix, not one origin."""

    origin_prefix: str
    public_key: ed25519.Ed25519PublicKey

    def key_for(self, origin: str) -> NoteKey | None:
        return NoteKey(origin, self.public_key) if origin.startswith(self.origin_prefix) else None


def add_checkpoint_body(old_size: int, proof: Sequence[bytes], note: SignedNote) -> bytes:
    head = f"old {old_size}\n" + "".join(f"{b64(h)}\n" for h in proof)
    return (head + "\n" + note.render()).encode()


def _parse_request(raw: bytes) -> tuple[int, list[bytes], SignedNote]:
    text = raw.decode("utf-8")
    head, sep, rest = text.partition("\n\n")
    if not sep:
        raise NoteError("no blank line after the consistency proof")
    lines = head.split("\n")
    if not lines[0].startswith("old "):
        raise NoteError("first line must be 'old <size>'")
    old_s = lines[0][4:]
    if not old_s.isdigit() or (old_s != "0" and old_s.startswith("0")):
        raise NoteError("bad old size")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise NoteError("too many proof lines")
    try:
        proof = [unb64(line, HASH_SIZE) for line in lines[1:]]
    except ValueError as exc:
        raise NoteError(f"bad proof line: {exc}") from None
    return int(old_s), proof, SignedNote.parse(rest)


class Witness:
    """The witness's logic and state (one JSON file, fsynced on every change)."""

    def __init__(
        self,
        name: str,
        key: Signer,
        trusted: Sequence[TrustedLog],
        state_file: Path,
        clock: Any = time.time,
    ) -> None:
        self.cosigner = Cosigner(name, key)
        self.trusted = list(trusted)
        self.state_file = state_file
        self.clock = clock
        self._lock = asyncio.Lock()
        self._state: dict[str, dict[str, Any]] = {}
        if state_file.is_file():
            self._state = json.loads(state_file.read_text()).get("logs", {})

    @property
    def key(self) -> WitnessKey:
        return self.cosigner.key

    def latest(self, origin: str) -> tuple[int, bytes]:
        s = self._state.get(origin)
        return (int(s["size"]), unb64(s["root"])) if s else (0, EMPTY_ROOT)

    def _save(self) -> None:
        state = json.dumps({"logs": self._state}, indent=1, sort_keys=True)
        atomic_write(self.state_file, state.encode(), mode=None)

    async def add_checkpoint(self, raw: bytes) -> tuple[int, str, str]:
        """(HTTP status, body, content type) for one add-checkpoint request."""
        try:
            old, proof, note = _parse_request(raw)
            cp = Checkpoint.parse_text(note.text)
        except (NoteError, UnicodeDecodeError, ValueError) as exc:
            return 400, f"malformed request: {exc}\n", "text/plain"
        keys = [k for t in self.trusted if (k := t.key_for(cp.origin)) is not None]
        if not keys:
            return 404, f"unknown log origin {cp.origin}\n", "text/plain"
        results = [k.verify(note) for k in keys]
        if False in results or True not in results:
            return 403, "no valid signature from a trusted log key\n", "text/plain"
        if old > cp.size:
            return 400, "old size is larger than the checkpoint size\n", "text/plain"
        async with self._lock:
            latest_size, latest_root = self.latest(cp.origin)
            if old != latest_size:
                return 409, f"{latest_size}\n", "text/x.tlog.size"
            if cp.size == 0 and cp.root != EMPTY_ROOT:
                return 422, "a checkpoint of size 0 must have the empty root\n", "text/plain"
            if old == 0 and proof:
                return 422, "old size 0 takes no consistency proof\n", "text/plain"
            if not verify_consistency(old, cp.size, latest_root, cp.root, proof):
                log.error(
                    "witness %s: log %s is inconsistent with its checkpoint of size %d",
                    self.key.name,
                    cp.origin,
                    old,
                )
                return 422, "consistency proof does not verify\n", "text/plain"
            self._state[cp.origin] = {"size": cp.size, "root": b64(cp.root)}
            await asyncio.to_thread(self._save)
            name, sig = self.cosigner.cosign(note.text, int(self.clock()))
        return 200, f"\u2014 {name} {b64(sig)}\n", "text/plain; charset=utf-8"


def witness_app(witness: Witness) -> Starlette:
    async def add_checkpoint(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return PlainTextResponse("request too large\n", status_code=413)
        status, body, ctype = await witness.add_checkpoint(raw)
        return Response(body, status_code=status, media_type=ctype)

    async def info(_request: Request) -> Response:
        return PlainTextResponse(witness.key.vkey() + "\n")

    return Starlette(
        routes=[
            Route("/add-checkpoint", add_checkpoint, methods=["POST"]),
            Route("/", info, methods=["GET"]),
        ]
    )
