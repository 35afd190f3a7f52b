"""Above the log: sign checkpoints on a timer and have witnesses cosign each new one.

The log signs and stores checkpoints (`ReceiptLog.checkpoint`); this module is the only
place that talks to witnesses, and the witness server (`gateway.receipts.witness`) stands
apart from both, as in Tessera, where witnessing sits above the log.

Each witness is asked to cosign a checkpoint once per new tree size, never again for a
size it has already cosigned: an idle log makes no witness traffic. Its cosignature is
stored per (checkpoint size, witness) beside the checkpoint, never accumulated in the
note, so a note carries at most one cosignature per witness however long the log runs.
A witness that is unreachable or refuses is logged and counted, and asked again at the
next tick; it never stops the log from signing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from gateway.receipts.log import LogError, ReceiptLog
from gateway.receipts.note import Checkpoint, SignedNote, WitnessKey, parse_signature_lines
from gateway.receipts.vault import (
    EVIDENCE_NAMES,
    MAX_MATERIAL_FILE,
    MAX_UPLOAD_LEAVES,
    Upload,
    evidence_commitments,
    has_body,
)
from gateway.receipts.witness import WitnessRefused, add_checkpoint_body

__all__ = ["Checkpointer", "WitnessClient"]

log = logging.getLogger(__name__)

WITNESS_TIMEOUT_S = 10.0
UPLOAD_LEAVES = 512  # per request: small enough to finish between flaps of a poor link
MAX_UPLOAD_REQUESTS = 10_000  # per round: the loop ends even if the core keeps moving
_HEX64 = re.compile(r"[0-9a-f]{64}")  # a shared evidence file's name: its SHA-256


class WitnessClient:
    """Pushes checkpoints to one witness over C2SP tlog-witness ``add-checkpoint``."""

    def __init__(
        self,
        key: WitnessKey,
        url: str,
        http: httpx.AsyncClient | None = None,
        *,
        vault: bool = False,
    ) -> None:
        """`vault`: this witness is the core's and keeps the edge's evidence: upload the
        leaves and bodies it lacks before asking it to cosign (gateway.receipts.vault)."""
        self.key = key
        self.name = key.name
        self.url = url.rstrip("/")
        self.vault = vault
        # An edge pulling from its core (gateway/uplink.py): upload only once revocations
        # were pulled since the link came back (revocations first).
        self.ready: Callable[[], bool] | None = None
        self.uploaded_bytes = 0  # compressed request bodies, for the DDIL figures
        self._resend = False
        self._http = http or httpx.AsyncClient(timeout=WITNESS_TIMEOUT_S)

    async def reconcile(self, source: ReceiptLog, size: int) -> None:
        """Upload what the core's vault lacks of the first `size` leaves of `source`.

        Resumable: the core says how much it holds, and each request adds a batch. After
        the core found the pending leaves did not reproduce a root (a partial upload
        replaced by a re-signed head, say), everything above the cosigned size goes again."""
        if self.ready is not None and not self.ready():
            raise WitnessRefused(425, "waiting for revocations from the core first")
        r = await self._http.get(f"{self.url}/vault", params={"origin": source.origin})
        if r.status_code != 200:
            raise WitnessRefused(r.status_code, r.text)
        try:
            state = r.json()
            start = int(state["cosigned"] if self._resend else state["stored"])
        except (ValueError, KeyError, TypeError):
            raise WitnessRefused(r.status_code, "the core's vault answered garbage") from None
        self._resend = False
        for _ in range(MAX_UPLOAD_REQUESTS):
            if start >= size:
                await self._send_evidence(source)
                return
            end = min(size, start + UPLOAD_LEAVES, start + MAX_UPLOAD_LEAVES)
            upload = await asyncio.to_thread(_batch, source, start, end)
            r = await self._post(source, upload)
            if r.status_code == 409:
                if "rewritten" in r.text:
                    raise WitnessRefused(409, r.text)
                try:
                    held = int(r.json()["stored"])
                except (ValueError, KeyError, TypeError):
                    raise WitnessRefused(409, "the core's vault answered garbage") from None
                start = min(start, held)  # the core holds less: go back
                continue
            if r.status_code != 200:
                raise WitnessRefused(r.status_code, r.text)
            start = end
        raise WitnessRefused(409, "the upload did not converge")

    async def _post(self, source: ReceiptLog, upload: Upload) -> httpx.Response:
        body = await asyncio.to_thread(_compressed, upload)  # megabytes: off the loop
        r = await self._http.post(
            f"{self.url}/vault/upload",
            params={"origin": source.origin},
            content=body,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        self.uploaded_bytes += len(body)
        return r

    async def _send_evidence(self, source: ReceiptLog) -> None:
        """The evidence files the core's receipts name and it lacks, one per request. A
        file the edge no longer has (erased) or the core refuses is skipped, never retried
        in this round: evidence never holds up the log's cosignature."""
        after, sent = -1, set()
        for _ in range(MAX_UPLOAD_REQUESTS):
            r = await self._http.get(
                f"{self.url}/vault/missing", params={"origin": source.origin, "after": after}
            )
            if r.status_code != 200:
                raise WitnessRefused(r.status_code, r.text)
            try:
                page = [(int(i), str(n), str(d)) for i, n, d in r.json()["missing"]]
            except (ValueError, KeyError, TypeError):
                raise WitnessRefused(r.status_code, "the core's vault answered garbage") from None
            if not page:
                return
            after = page[-1][0]  # a page holds whole leaves: the next starts past this one
            for index, name, digest in page:
                if digest in sent:
                    continue
                sent.add(digest)
                upload = await asyncio.to_thread(_evidence_upload, source, index, name, digest)
                if upload is None:
                    continue
                answer = await self._post(source, upload)
                if answer.status_code == 400:
                    log.error("the core refused evidence of leaf %d: %s", index, answer.text)
                elif answer.status_code != 200:
                    raise WitnessRefused(answer.status_code, answer.text)

    async def add_checkpoint(
        self,
        note: SignedNote,
        old: int,
        consistency: Callable[[int, int], Sequence[bytes]],
    ) -> bytes:
        """Push `note` (log signatures only); returns this witness's verified cosignature.

        On 409 the witness says which size it holds; we retry once from there."""
        cp = Checkpoint.parse_text(note.text)
        for _attempt in range(2):
            if old > cp.size:
                raise WitnessRefused(409, f"witness holds size {old} > checkpoint {cp.size}")
            proof = consistency(old, cp.size) if old else []
            r = await self._http.post(
                f"{self.url}/add-checkpoint", content=add_checkpoint_body(old, proof, note)
            )
            if r.status_code == 409 and r.headers.get("content-type", "").startswith(
                "text/x.tlog.size"
            ):
                text = r.text.strip()
                if not text.isdigit():
                    raise WitnessRefused(409, r.text)
                old = int(text)
                continue
            if r.status_code == 412 and self.vault:
                # The core lacks leaves (an upload cut short): the next tick uploads them.
                raise WitnessRefused(412, f"the core's vault holds {r.text.strip()} leaves")
            if r.status_code == 422 and self.vault and "uploaded" in r.text:
                self._resend = True
            if r.status_code != 200:
                raise WitnessRefused(r.status_code, r.text)
            for name, sig in parse_signature_lines(r.text):
                if name != self.key.name:
                    continue
                status, _ts = self.key.verify(SignedNote(note.text, ((name, sig),)))
                if status == "valid":
                    return sig
            raise WitnessRefused(200, "the witness returned no valid cosignature")
        raise WitnessRefused(409, "witness size kept changing")

    async def aclose(self) -> None:
        await self._http.aclose()


def _compressed(upload: Upload) -> bytes:
    return gzip.compress(json.dumps(upload.to_json()).encode(), compresslevel=6)


def _batch(source: ReceiptLog, start: int, end: int) -> Upload:
    leaves, blobs, evidence = [], {}, {}
    for i, entry in source.entries(start, end):
        leaves.append(entry.leaf_data())
        if has_body(entry):
            body = source.body_at(i) if entry.type == "receipt" else source.record(i)
            if body is not None:  # an erased body: its erasure leaf accounts for it
                blobs[i] = body
                refs = {n: d for n, (d, _) in _evidence_files(source.path, body).items()}
                if refs:
                    evidence[i] = refs
    return _signed(source, Upload(start, tuple(leaves), blobs, evidence=evidence))


def _signed(source: ReceiptLog, unsigned: Upload) -> Upload:
    note = source.sign_note(unsigned.note_text(source.origin))
    return Upload(
        unsigned.start,
        unsigned.leaves,
        unsigned.blobs,
        note.render(),
        unsigned.evidence,
        unsigned.material,
    )


def _evidence_files(log_dir: Path, body: bytes) -> dict[str, tuple[str, Path]]:
    """A zk receipt's evidence files beside the log (`ReceiptService.save_evidence`):
    name -> (SHA-256, path), only those that are what the receipt commits to, so that a
    damaged file at the edge leaves its receipt without evidence at the core rather than
    having the core refuse the log's upload."""
    committed = evidence_commitments(body)
    if not committed:
        return {}
    rid = str(json.loads(body)["receipt"]["id"])
    root = log_dir / "evidence"
    found: dict[str, tuple[str, Path]] = {}
    with contextlib.suppress(OSError, ValueError):
        shared = json.loads((root / f"{rid}.shared.json").read_bytes())
        for name, digest in shared.items() if isinstance(shared, dict) else ():
            if name in EVIDENCE_NAMES and isinstance(digest, str):
                found[name] = (digest, root / "shared" / digest)
    for name in EVIDENCE_NAMES:
        path = root / f"{rid}.{name}"
        with contextlib.suppress(OSError):
            found[name] = (hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return {
        n: (d, p)
        for n, (d, p) in found.items()
        if n in committed and committed[n] in (None, d) and _HEX64.fullmatch(d)
    }


def _evidence_upload(source: ReceiptLog, index: int, name: str, digest: str) -> Upload | None:
    """One evidence file the core asked for, if the edge still has it as it was named."""
    body = source.body_at(index)
    if body is None:
        return None
    want = _evidence_files(source.path, body).get(name)
    if want is None or want[0] != digest:
        return None
    try:
        if want[1].stat().st_size > MAX_MATERIAL_FILE:
            log.warning("evidence %s of leaf %d is too large for the core's vault", name, index)
            return None
        data = want[1].read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        return None
    return _signed(source, Upload(0, (), {}, material={digest: data}))


class Checkpointer:
    """Signs the log's head every `interval` seconds and gets it cosigned by witnesses.

    `current` returns the log to checkpoint (a receipt service reopens its log after a
    restart of the app's lifespan, so the log is looked up each tick, not captured)."""

    def __init__(
        self,
        current: Callable[[], ReceiptLog],
        witnesses: Sequence[WitnessClient] = (),
        interval_s: float = 1.0,
    ) -> None:
        self.current = current
        self.witnesses = list(witnesses)
        self.interval_s = interval_s
        self.push_failures: dict[str, int] = {w.name: 0 for w in self.witnesses}
        self.last_checkpoint_at: float | None = None  # time.time() of the last signed head

    async def tick(self) -> SignedNote:
        """One round: sign the head if it grew, then ask each witness that has not yet
        cosigned this size. Returns the checkpoint with every cosignature it has."""
        receipt_log = self.current()
        note = await receipt_log.checkpoint()
        self.last_checkpoint_at = time.time()
        size = Checkpoint.parse_text(note.text).size
        if size == 0:
            return note
        log_only = receipt_log.log_signed(note)
        for w in self.witnesses:
            if receipt_log.has_cosignature(size, w.name):
                continue
            try:
                if w.vault:
                    await w.reconcile(receipt_log, size)
                old = receipt_log.witness_size(w.name)
                sig = await w.add_checkpoint(log_only, old, receipt_log.consistency)
            except WitnessRefused as exc:
                self.push_failures[w.name] += 1
                log.error("receipt log %s: witness %s refused: %s", receipt_log.log_id, w.name, exc)
                continue
            except (httpx.HTTPError, OSError) as exc:  # DDIL: asked again next tick
                self.push_failures[w.name] += 1
                log.warning(
                    "receipt log %s: witness %s unreachable: %s",
                    receipt_log.log_id,
                    w.name,
                    type(exc).__name__,
                )
                continue
            await receipt_log.add_cosignature(size, w.name, sig, w.key.vkey())
        return receipt_log.checkpoint_at(size) or note

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop`; errors of the log itself propagate to the supervisor."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
            if self.current().frozen_reason is not None:
                return
            try:
                await self.tick()
            except LogError as exc:
                if self.current().frozen_reason is not None:
                    log.error("receipt log frozen: %s", exc)
                    return
                raise

    async def aclose(self) -> None:
        for w in self.witnesses:
            await w.aclose()
