"""Issuing receipts: what the gateway's receipt stage calls for every answer and denial.

`issue` commits to the tensors with a fresh salt, reserves the next log index, builds and
signs the receipt with that index, and returns only once the receipt is durably in the
log (group commit). The caller returns the answer after that, never before.

`summary` is the compact line that rides on the response (a header or a response
parameter): ``ztgate-receipt/v1 <receipt id> <b64 SHA-256 of the receipt> <key id>
<b64 signature>``. It carries the receipt's own signature (which signs the id and the
digest), so a client can check it offline against the published key set
(`verify_summary`) and later match it with the full receipt. It is built once, at issue,
from the digest the signer computed: a receipt is canonicalised (RFC 8785) exactly once
on the request path, and that one encoding is signed, stored and summarised.

Randomness: one fresh 16-byte value per receipt (`seed`) gives both the commitment salt
and the receipt id's nonce by domain-separated SHA-256, so each stays unpredictable
(SHA-256 of a secret 128-bit value) while the gateway asks the kernel once, not twice.

`DenialCoalescer` folds repeated identical denials (same caller, model, problem) into
one receipt with a count, so a client hammering a forbidden model cannot flood the log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from gateway.forward.site import receipt_extensions as site_extensions
from gateway.protocol.tensors import Tensor
from gateway.receipts.canonical import b64
from gateway.receipts.commit import SALT_SIZE, commit_tensor
from gateway.receipts.log import LogEntry, ReceiptLog
from gateway.receipts.model import (
    ClientRef,
    Denial,
    ExtValue,
    Kind,
    ModelRef,
    PolicyRef,
    Receipt,
    SignedReceipt,
    TensorRef,
    VerificationRef,
    make_receipt_id,
)
from gateway.receipts.signing import (
    SUMMARY_PREFIX,
    Signer,
    format_time,
    verify_summary,
)

__all__ = [
    "SUMMARY_PREFIX",
    "DenialCoalescer",
    "Issued",
    "issue",
    "summary",
    "tensor_refs",
    "verify_summary",
]


@dataclass(frozen=True, slots=True)
class Issued:
    signed: SignedReceipt
    salt: bytes | None  # for the client only; never stored by the gateway
    summary: str  # the response's line, computed once (fronts read it more than once)
    # A job's re-run answered under the receipt its first run logged: that receipt's
    # evidence, lazy proof and spot check are the first run's, not to be filed again.
    reused: bool = False

    @property
    def receipt(self) -> Receipt:
        return self.signed.receipt


SEED_SIZE = 16
_SALT = b"ztgate/receipt-salt/v1\n"
_NONCE = b"ztgate/receipt-nonce/v1\n"


def derive(seed: bytes) -> tuple[bytes, str]:
    """(commitment salt, receipt-id nonce) from one secret seed, domain-separated: neither
    can be computed from the other, and the nonce (public, in the receipt id) says nothing
    about the salt (which only the client gets)."""
    if len(seed) < SEED_SIZE:
        raise ValueError(f"a receipt seed is at least {SEED_SIZE} random bytes")
    salt = hashlib.sha256(_SALT + seed).digest()[:SALT_SIZE]
    nonce = hashlib.sha256(_NONCE + seed).digest()[:8].hex()
    return salt, nonce


def tensor_refs(tensors: Sequence[Tensor], salt: bytes) -> tuple[TensorRef, ...]:
    return tuple(TensorRef(t.name, t.datatype, t.shape, commit_tensor(t, salt)) for t in tensors)


async def issue(
    receipt_log: ReceiptLog,
    signer: Signer,
    *,
    kind: Kind = "answer",
    client: ClientRef | None = None,
    model: ModelRef | None = None,
    inputs: Sequence[Tensor] = (),
    outputs: Sequence[Tensor] = (),
    policy: PolicyRef | None = None,
    verification: VerificationRef | None = None,
    nodes: Sequence[str] = (),
    denial: Denial | None = None,
    request_id: str | None = None,
    salt: bytes | None = None,
    seed: bytes | None = None,
    now: dt.datetime | None = None,
    extensions: Mapping[str, ExtValue] | None = None,
    job: tuple[str, int | None] | None = None,
) -> Issued:
    """Sign and durably log one receipt; returns it with the client's salt.

    `extensions` carries mode-specific evidence (zk artefact hashes, the mpc dealer); a
    request an edge site forwarded also records that site, its hops, and which site
    answered and why (gateway/forward/site.py). `seed` (fresh, secret, at least 16 bytes;
    default: drawn here) yields the salt and the receipt id's nonce (`derive`). `job`:
    (job id, the index of the receipt this one supersedes or None), the log's job index
    (`ReceiptLog.append_built`)."""
    extensions = {**site_extensions(), **(extensions or {})}
    derived_salt, nonce = derive(seed if seed is not None else os.urandom(SEED_SIZE))
    if salt is None and (inputs or outputs):
        salt = derived_salt
    ins = tensor_refs(inputs, salt) if salt is not None else ()
    outs = tensor_refs(outputs, salt) if salt is not None else ()
    stamp = format_time(now or dt.datetime.now(dt.UTC))
    out: list[tuple[SignedReceipt, bytes]] = []

    def build(index: int) -> tuple[LogEntry, tuple[str, bytes]]:
        rid = make_receipt_id(receipt_log.log_id, index, nonce)
        receipt = Receipt(
            receipt_id=rid,
            log_id=receipt_log.log_id,
            index=index,
            time=stamp,
            kind=kind,
            key_id=signer.key_id,
            client=client,
            model=model,
            inputs=ins,
            outputs=outs,
            policy=policy,
            verification=verification,
            nodes=tuple(nodes),
            denial=denial,
            request_id=request_id,
            extensions=dict(extensions or {}),
        )
        signed, digest = signer.sign_with_digest(receipt)
        body = signed.to_bytes()  # the signer's canonical bytes, not a second encoding
        out.append((signed, digest))
        return LogEntry("receipt", _sha256(body)), (rid, body)

    await receipt_log.append_built(build, job=job)
    signed, digest = out[0]
    return Issued(signed, salt, summary(signed, digest))


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def summary(signed: SignedReceipt, digest: bytes | None = None) -> str:
    """The summary line; `digest` is the one the signer returned (else computed here from
    the canonical bytes the signed receipt carries, or a fresh encoding)."""
    if digest is None:
        canonical = signed.canonical or signed.receipt.to_canonical()
        digest = hashlib.sha256(canonical).digest()
    r = signed.receipt
    return " ".join((SUMMARY_PREFIX, r.receipt_id, b64(digest), r.key_id, b64(signed.signature)))


# --- coalescing identical denials --------------------------------------------------------
DenialKey = tuple[str, ...]


@dataclass
class _Run:
    first: Issued
    count: int  # denials folded in after the first
    first_time: float  # monotonic
    first_wall: float
    last_wall: float
    template: dict[str, object]


class DenialCoalescer:
    """Folds identical denials within `window_s` into one receipt with a count.

    The first denial of a run gets its own receipt at once. Identical ones that follow
    within the window are counted and answered with the first one's receipt (the caller
    says so in its response); when the window closes (`flush`, or the next denial after
    it) one receipt with ``denial.count`` = N and ``denial.follows`` = the first receipt's
    id records them. At most `max_runs` runs are open; the oldest is flushed beyond that.

    Indexed: a denial costs O(1) plus the runs that have expired, never a scan of the open
    ones (a client hammering the gateway would otherwise make every denial walk up to
    `max_runs` runs). `_runs` is both the index (keyed by `key`) and the expiry order:
    runs are inserted in the order they open and every window has the same length, so the
    expired runs are always a prefix of it.
    """

    def __init__(
        self,
        issue_fn: Callable[..., Awaitable[Issued]],
        window_s: float = 10.0,
        max_runs: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issue = issue_fn
        self.window_s = window_s
        self.max_runs = max_runs
        self._clock = clock
        self._runs: OrderedDict[DenialKey, _Run] = OrderedDict()
        self._lock = asyncio.Lock()
        # Runs looked at by expiry checks, in total: what shows the scan is gone (it grows
        # by one per denial plus the runs that expired, whatever the number open).
        self.examined = 0

    @staticmethod
    def key(client: ClientRef | None, model: ModelRef | None, denial: Denial) -> DenialKey:
        return (
            client.spiffe_id if client else "",
            client.serial if client else "",
            f"{model.name}/{model.version}" if model else "",
            # Not `denial.reason`: it is fixed per problem type anyway, and a key that took
            # any client-influenced text would let a client open one run (one receipt)
            # per distinct string it sends.
            denial.problem_type,
        )

    @property
    def open_runs(self) -> int:
        return len(self._runs)

    async def deny(self, **fields: object) -> tuple[Issued, bool]:
        """(receipt, coalesced?) for one denial; `fields` are `issue`'s keyword arguments."""
        denial = fields["denial"]
        assert isinstance(denial, Denial)
        client, model = fields.get("client"), fields.get("model")
        assert client is None or isinstance(client, ClientRef)
        assert model is None or isinstance(model, ModelRef)
        key = self.key(client, model, denial)
        async with self._lock:
            await self._close_expired(self._clock())
            run = self._runs.get(key)
            if run is not None:
                run.count += 1
                run.last_wall = time.time()
                return run.first, True
        issued = await self._issue(**fields)
        async with self._lock:
            if key in self._runs:
                # An identical denial opened a run while this one's receipt was being
                # logged. Keep that run (denials may already be counted in it); this
                # receipt stands on its own, in the log like any other.
                return issued, False
            # The window opens when the run does, read under the lock: insertion order is
            # then opening order, which `_close_expired` relies on.
            wall = time.time()
            self._runs[key] = _Run(issued, 0, self._clock(), wall, wall, dict(fields))
            # Bounded: at most one run over `max_runs` was just added.
            while len(self._runs) > self.max_runs:
                _, oldest = self._runs.popitem(last=False)
                await self._record(oldest)
        return issued, False

    async def _close_expired(self, now: float) -> None:
        """Record the runs whose window has closed: a prefix of `_runs` (see the class
        docstring), so this stops at the first open run. Bounded by `max_runs`."""
        while self._runs:
            key, run = next(iter(self._runs.items()))
            self.examined += 1
            if now - run.first_time < self.window_s:
                return
            del self._runs[key]
            await self._record(run)

    async def _record(self, run: _Run) -> None:
        if run.count == 0:
            return
        fields = dict(run.template)
        denial = fields["denial"]
        assert isinstance(denial, Denial)
        fields["denial"] = replace(
            denial,
            count=run.count,
            first_time=format_time(dt.datetime.fromtimestamp(run.first_wall, dt.UTC)),
            last_time=format_time(dt.datetime.fromtimestamp(run.last_wall, dt.UTC)),
            follows=run.first.receipt.receipt_id,
        )
        fields.pop("now", None)
        await self._issue(**fields)

    async def flush(self) -> None:
        """Record every open run (call at the window's end and at shutdown)."""
        async with self._lock:
            runs = list(self._runs.values())
            self._runs.clear()
            for run in runs:
                await self._record(run)

    async def run(self, stop: asyncio.Event) -> None:
        """Background task for `Gateway.background`: closes runs as windows end."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.window_s / 2)
            except TimeoutError:
                pass
            async with self._lock:
                await self._close_expired(self._clock())
        await self.flush()
