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
import json
import logging
import time
from collections.abc import Callable, Sequence

import httpx

from gateway.receipts.log import LogError, ReceiptLog
from gateway.receipts.note import Checkpoint, SignedNote, WitnessKey, parse_signature_lines
from gateway.receipts.vault import MAX_UPLOAD_LEAVES, Upload, has_body
from gateway.receipts.witness import WitnessRefused, add_checkpoint_body

__all__ = ["Checkpointer", "WitnessClient"]

log = logging.getLogger(__name__)

WITNESS_TIMEOUT_S = 10.0
UPLOAD_LEAVES = 512  # per request: small enough to finish between flaps of a poor link
MAX_UPLOAD_REQUESTS = 10_000  # per round: the loop ends even if the core keeps moving


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
                return
            end = min(size, start + UPLOAD_LEAVES, start + MAX_UPLOAD_LEAVES)
            upload = await asyncio.to_thread(_batch, source, start, end)
            body = gzip.compress(json.dumps(upload.to_json()).encode(), compresslevel=6)
            r = await self._http.post(
                f"{self.url}/vault/upload",
                params={"origin": source.origin},
                content=body,
                headers={"content-type": "application/json", "content-encoding": "gzip"},
            )
            self.uploaded_bytes += len(body)
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


def _batch(source: ReceiptLog, start: int, end: int) -> Upload:
    leaves, blobs = [], {}
    for i, entry in source.entries(start, end):
        leaves.append(entry.leaf_data())
        if has_body(entry):
            body = source.body_at(i) if entry.type == "receipt" else source.record(i)
            if body is not None:  # an erased body: its erasure leaf accounts for it
                blobs[i] = body
    unsigned = Upload(start, tuple(leaves), blobs)
    note = source.sign_note(unsigned.note_text(source.origin))
    return Upload(start, tuple(leaves), blobs, note.render())


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
