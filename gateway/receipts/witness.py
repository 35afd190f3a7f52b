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

Beyond tlog-witness, for edge sites that reconcile with the core (DDIL):

- a checkpoint's `time` line must lie in [the last one this witness cosigned for the
  origin, now + `max_skew_s`] (422): a captured edge cannot backdate its history, nor
  post-date it to pre-empt a later revocation;
- a log key the core has revoked (`revoked` in the trust list) is refused (403) from
  then on, whatever it signs;
- with a vault (`gateway.receipts.vault`), a checkpoint is cosigned only once the vault
  holds its leaves and they reproduce its root (412 with the size held: upload the rest;
  422 if they do not), so what the core cosigned, it also holds.

Every refusal is logged at error level and counted (`ztgate_witness_refusals_total` by
reason, on `GET /metrics`): an edge whose witnessed history was truncated or rewritten
shows up there, for the officer's alerting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
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
from gateway.receipts.vault import Upload, Vault, VaultError
from gateway.signer import Signer
from gateway.uplink import Publisher

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
MAX_UPLOAD_BODY = 16 << 20  # after decompression
MAX_SKEW_S = 300.0


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
    revoked: bool = False  # a captured site's key: nothing it signs is cosigned again

    def key_for(self, origin: str) -> NoteKey | None:
        # Whole path segments only: a key for "site/edge1" is not one for "site/edge10/...".
        p = self.origin_prefix
        covers = origin.startswith(p if p.endswith("/") else p + "/")
        return NoteKey(origin, self.public_key) if covers else None


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
        *,
        vault: Vault | None = None,
        max_skew_s: float = MAX_SKEW_S,
    ) -> None:
        self.cosigner = Cosigner(name, key)
        self.trusted = list(trusted)
        self.state_file = state_file
        self.clock = clock
        self.vault = vault
        self.max_skew_s = max_skew_s
        self.refusals: Counter[str] = Counter()
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
        matching = [(t, k) for t in self.trusted if (k := t.key_for(cp.origin)) is not None]
        if not matching:
            return 404, f"unknown log origin {cp.origin}\n", "text/plain"
        results = [(t, k.verify(note)) for t, k in matching]
        if any(t.revoked and ok for t, ok in results):
            return self._refuse(403, "revoked", cp.origin, "the log key is revoked at the core")
        if any(ok is False for _, ok in results) or not any(ok for _, ok in results):
            return 403, "no valid signature from a trusted log key\n", "text/plain"
        if old > cp.size:
            return 400, "old size is larger than the checkpoint size\n", "text/plain"
        async with self._lock:
            latest_size, latest_root = self.latest(cp.origin)
            if cp.size < latest_size:
                # A ztgate log never shrinks: its head below what was cosigned is a
                # truncated (or restored-from-backup) log. Still tlog-witness's 409.
                self._refuse(409, "truncated", cp.origin, f"checkpoint below size {latest_size}")
                return 409, f"{latest_size}\n", "text/x.tlog.size"
            if old != latest_size:
                return 409, f"{latest_size}\n", "text/x.tlog.size"
            if cp.size == 0 and cp.root != EMPTY_ROOT:
                return 422, "a checkpoint of size 0 must have the empty root\n", "text/plain"
            if old == 0 and proof:
                return 422, "old size 0 takes no consistency proof\n", "text/plain"
            if not verify_consistency(old, cp.size, latest_root, cp.root, proof):
                return self._refuse(
                    422,
                    "inconsistent",
                    cp.origin,
                    f"consistency proof from size {old} does not verify: the log's "
                    "witnessed history was truncated, reordered or forked",
                )
            refused = self._check_time(cp)
            if refused is not None:
                return refused
            if self.vault is not None:
                refused = await self._check_vault(cp)
                if refused is not None:
                    return refused
            name, sig = self.cosigner.cosign(note.text, int(self.clock()))
            entry: dict[str, Any] = {"size": cp.size, "root": b64(cp.root)}
            if cp.time is not None:
                entry["time"] = cp.time
            self._state[cp.origin] = entry
            await asyncio.to_thread(self._save)
            if self.vault is not None:
                cosigned = SignedNote(note.text, (*note.signatures, (name, sig))).render()
                await asyncio.to_thread(self.vault.commit, cp.origin, cp.size, cosigned)
        return 200, f"\u2014 {name} {b64(sig)}\n", "text/plain; charset=utf-8"

    def _refuse(self, status: int, reason: str, origin: str, why: str) -> tuple[int, str, str]:
        self.refusals[reason] += 1
        log.error("witness %s refused log %s (%s): %s", self.key.name, origin, reason, why)
        return status, why + "\n", "text/plain"

    def _check_time(self, cp: Checkpoint) -> tuple[int, str, str] | None:
        last = self._state.get(cp.origin, {}).get("time")
        if cp.time is None:
            if self.vault is not None:  # edge logs carry time; a missing one is a forgery
                return self._refuse(422, "time", cp.origin, "the checkpoint carries no time")
            return None
        now = self.clock()
        if last is not None and cp.time < int(last):
            return self._refuse(
                422, "time", cp.origin, f"checkpoint time {cp.time} is before {last}"
            )
        if cp.time > now + self.max_skew_s:
            return self._refuse(
                422, "time", cp.origin, f"checkpoint time {cp.time} is ahead of the core's clock"
            )
        return None

    async def _check_vault(self, cp: Checkpoint) -> tuple[int, str, str] | None:
        assert self.vault is not None
        stored = await asyncio.to_thread(self.vault.stored, cp.origin)
        if stored < cp.size:
            return 412, f"{stored}\n", "text/x.ztgate.vault-size"
        tree = await asyncio.to_thread(self.vault.tree, cp.origin, cp.size)
        if tree.root() != cp.root:
            return self._refuse(
                422,
                "vault-mismatch",
                cp.origin,
                "the leaves uploaded do not reproduce the checkpoint's root",
            )
        return None

    async def upload(self, origin: str, upload: Upload) -> int:
        """Store uploaded leaves for a trusted, unrevoked origin; the stored size after."""
        if self.vault is None:
            raise VaultError("this witness keeps no vault")
        matching = [(t, k) for t in self.trusted if (k := t.key_for(origin)) is not None]
        if not matching:
            raise VaultError(f"no trusted log key for {origin}")
        try:
            note = SignedNote.parse(upload.note)
        except NoteError:
            raise VaultError("the upload is not signed by its log key") from None
        signers = [t for t, k in matching if k.verify(note) is True]
        if note.text != upload.note_text(origin) or not signers:
            raise VaultError("the upload is not signed by its log key")
        if all(t.revoked for t in signers):
            self._refuse(403, "revoked", origin, "upload under a revoked log key")
            raise VaultError(f"the log key for {origin} is revoked at the core")
        # The key, not the origin, owns what it brings: its quota covers every log id
        # under its prefix, which an edge holding it can start at will.
        owner = next(t for t in signers if not t.revoked).origin_prefix
        try:
            async with self._lock:  # never between a cosignature's root check and commit
                return await asyncio.to_thread(self.vault.append, origin, upload, owner)
        except VaultError as exc:
            if "rewritten" in str(exc):
                self._refuse(409, "rewritten", origin, str(exc))
            raise


def witness_app(witness: Witness, publish: Path | None = None) -> Starlette:
    """`publish`: a directory the core serves to its edge sites under /publish (the
    client CA's CRL, the signed policy bundle, model files: gateway/uplink.py)."""

    async def add_checkpoint(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return PlainTextResponse("request too large\n", status_code=413)
        status, body, ctype = await witness.add_checkpoint(raw)
        return Response(body, status_code=status, media_type=ctype)

    async def info(_request: Request) -> Response:
        return PlainTextResponse(witness.key.vkey() + "\n")

    async def vault_state(request: Request) -> Response:
        """One origin's sizes (`?origin=`), or every origin's: what an operator watches."""
        vault = witness.vault
        if vault is None:
            return PlainTextResponse("this witness keeps no vault\n", status_code=404)
        origin = request.query_params.get("origin")
        if origin is None:
            origins = await asyncio.to_thread(vault.origins)
            sizes = [(o, await asyncio.to_thread(vault.stored, o)) for o in origins]
            return JSONResponse(
                {o: {"stored": n, "cosigned": witness.latest(o)[0]} for o, n in sizes}
            )
        stored = await asyncio.to_thread(vault.stored, origin)
        return JSONResponse({"stored": stored, "cosigned": witness.latest(origin)[0]})

    async def vault_missing(request: Request) -> Response:
        """Evidence files an origin's receipts name that the vault lacks (`?after=` pages)."""
        vault = witness.vault
        if vault is None:
            return PlainTextResponse("this witness keeps no vault\n", status_code=404)
        origin = request.query_params.get("origin", "")
        after = request.query_params.get("after", "-1")
        if re.fullmatch(r"-1|\d{1,18}", after) is None:
            return JSONResponse({"error": "after: a leaf index"}, status_code=400)
        rows = await asyncio.to_thread(vault.missing, origin, int(after))
        return JSONResponse({"missing": [list(r) for r in rows]})

    async def vault_upload(request: Request) -> Response:
        origin = request.query_params.get("origin", "")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_UPLOAD_BODY:
                return PlainTextResponse("upload too large\n", status_code=413)
        try:
            data = await asyncio.to_thread(_inflate, bytes(raw), request.headers)
            upload = Upload.from_json(json.loads(data))
            stored = await witness.upload(origin, upload)
        except VaultError as exc:
            status = 400 if exc.stored is None else 409
            return JSONResponse({"error": str(exc), "stored": exc.stored}, status_code=status)
        except (ValueError, zlib.error, EOFError, OSError, RecursionError):
            return JSONResponse({"error": "malformed upload"}, status_code=400)
        return JSONResponse({"stored": stored})

    async def metrics(_request: Request) -> Response:
        lines = [
            "# HELP ztgate_witness_refusals_total Checkpoints and uploads this witness refused.",
            "# TYPE ztgate_witness_refusals_total counter",
        ]
        lines += [
            f'ztgate_witness_refusals_total{{reason="{r}"}} {n}'
            for r, n in sorted(witness.refusals.items())
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    publisher = Publisher(publish) if publish is not None else None

    async def published_manifest(_request: Request) -> Response:
        if publisher is None:
            return PlainTextResponse("nothing published here\n", status_code=404)
        return JSONResponse(await asyncio.to_thread(publisher.manifest))

    async def published_file(request: Request) -> Response:
        path = None if publisher is None else publisher.path(request.path_params["name"])
        if path is None:
            return PlainTextResponse("no such published file\n", status_code=404)
        return FileResponse(path)  # answers Range requests: downloads resume

    return Starlette(
        routes=[
            Route("/publish/manifest.json", published_manifest, methods=["GET"]),
            Route("/publish/{name:path}", published_file, methods=["GET"]),
            Route("/add-checkpoint", add_checkpoint, methods=["POST"]),
            Route("/vault", vault_state, methods=["GET"]),
            Route("/vault/upload", vault_upload, methods=["POST"]),
            Route("/vault/missing", vault_missing, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/", info, methods=["GET"]),
        ]
    )


def _inflate(raw: bytes, headers: Any) -> bytes:
    """gzip uploads are inflated with a cap: a small bomb cannot fill the core's memory."""
    if headers.get("content-encoding", "identity") == "identity":
        return raw
    if headers.get("content-encoding") != "gzip":
        raise ValueError("unsupported content encoding")
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(raw, MAX_UPLOAD_BODY + 1)
    if len(out) > MAX_UPLOAD_BODY or d.unconsumed_tail:
        raise ValueError("upload too large once inflated")
    return out
