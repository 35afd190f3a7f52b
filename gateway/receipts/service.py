"""The gateway's receipt service: one log per replica, its signer, and denial coalescing.

What the pipeline's receipt stage and the error path call. An answer leaves only after
its receipt is durably in this replica's log; if the log cannot take it, the request
fails (503) rather than answer without a receipt.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.files import atomic_write
from gateway.forward.site import receipt_extensions as site_extensions
from gateway.protocol.tensors import Tensor
from gateway.receipts.checkpointer import Checkpointer, WitnessClient
from gateway.receipts.issue import DenialCoalescer, Issued, derive, issue, summary, tensor_refs
from gateway.receipts.log import JobReceipted, LogEntry, LogError, ReceiptLog
from gateway.receipts.model import (
    ClientRef,
    Denial,
    ExtValue,
    ModelRef,
    PolicyRef,
    SignedReceipt,
    VerificationRef,
    make_receipt_id,
)
from gateway.receipts.signing import KeySet, Signer
from gateway.signer import FileSigner
from gateway.signer import Signer as KeySigner

log = logging.getLogger(__name__)

_SUPERSEDES = ("supersedes", "supersedes_in")  # what a job's receipt names of earlier ones
_LOG_ID = re.compile(r"[a-z2-7]{16}")  # gateway/receipts/log.py `new_log_id`
_MAX_MARKS = 16  # other logs one job's receipt names (each is a replica that ran it)


async def _unset(**_: object) -> Issued:
    raise RuntimeError("receipt service not initialised")


@dataclass
class ReceiptService:
    log: ReceiptLog
    signer: Signer
    keyset: KeySet
    coalescer: DenialCoalescer
    checkpoint_interval_s: float = 1.0
    frozen: list[ReceiptLog] = field(default_factory=list)
    reopen: Callable[[], ReceiptLog] | None = None
    closed: bool = False
    witnesses: Sequence[WitnessClient] = ()
    # Called with "reused" or "superseded" when a job runs again (the jobs' metrics).
    on_job_rerun: Callable[[str], None] | None = None
    # Awaited with (job id, this log's id) before a job's answer receipt is appended: the
    # shared job record names the log first (gateway/jobs/runner.py `mark`); returns every
    # log the job was marked for. Replicas keep a log each: only that names the others.
    on_job_receipt: Callable[[str, str], Awaitable[Sequence[str]]] | None = None
    # The other workers' logs of this replica, read-only (gateway/supervisor.py).
    siblings: Callable[[], Sequence[ReceiptLog]] | None = None
    # The last answer receipt this log was given could not be appended (disk full, I/O
    # error, a frozen log); the next that can clears it. The jobs runner claims sparingly
    # meanwhile: each run would mark a job for a log that cannot take its receipt.
    append_failed: bool = False

    def __post_init__(self) -> None:
        self.checkpointer = Checkpointer(
            lambda: self.log, self.witnesses, self.checkpoint_interval_s
        )

    @classmethod
    def open(
        cls,
        directory: Path,
        signing_key: Path | KeySigner,
        log_key: Path | KeySigner,
        origin: str,
        checkpoint_interval_s: float = 1.0,
        witnesses: Sequence[WitnessClient] = (),
    ) -> ReceiptService:
        """`signing_key` and `log_key`: PEM files, or keys in a token (`gateway.signer`)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_signer = FileSigner(log_key) if isinstance(log_key, Path) else log_key
        receipt_log = ReceiptLog.open(directory, log_signer, origin)
        signer = Signer(FileSigner(signing_key) if isinstance(signing_key, Path) else signing_key)
        # The published key set: verifiers judge a key by the checkpoints in its window.
        keys_path = directory / "keys.json"
        keyset = KeySet.load(keys_path)
        if keyset.get(signer.key_id) is None:
            # Whole seconds: checkpoints carry whole-second times, and one in this same
            # second must count as inside the key's window.
            keyset.rotate(signer.public_key, dt.datetime.now(dt.UTC).replace(microsecond=0))
            keyset.save(keys_path)

        frozen = [
            ReceiptLog.open_readonly(p)
            for p in ReceiptLog.all_logs(directory)
            if p.name != receipt_log.log_id
        ]
        service = cls(
            receipt_log,
            signer,
            keyset,
            DenialCoalescer(_unset),
            checkpoint_interval_s,
            frozen,
            reopen=lambda: ReceiptLog.open(directory, log_signer, origin),
            witnesses=witnesses,
        )

        async def issue_denial(**fields: object) -> Issued:
            # service.log, not a captured log: the log is reopened after a restart.
            return await issue(service.log, signer, kind="denial", **fields)  # type: ignore[arg-type]

        service.coalescer = DenialCoalescer(issue_denial)
        return service

    def start(self) -> None:
        """Reopen after a close (an app whose lifespan is restarted in one process)."""
        if self.closed and self.reopen is not None:
            self.log = self.reopen()
            self.closed = False

    def logs(self) -> list[ReceiptLog]:
        """Every log this replica serves reads of: its own, then other workers'."""
        return [*self.own_logs(), *(self.siblings() if self.siblings else ())]

    def own_logs(self) -> list[ReceiptLog]:
        """The logs this process writes or owns (retention, closing)."""
        return [self.log, *self.frozen]

    async def answer(
        self,
        *,
        client: ClientRef,
        model: ModelRef,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        policy: PolicyRef,
        verification: VerificationRef,
        nodes: Sequence[str],
        request_id: str,
        extensions: Mapping[str, ExtValue] | None = None,
        seed: bytes | None = None,
        job_id: str | None = None,
    ) -> Issued:
        """The answer's receipt. For a job's run (`job_id`, with the job's seed), at most
        one per job unless the answers differ: see `_job_receipt`."""
        ext = dict(extensions or {})
        job: tuple[str, int | None] | None = None
        if job_id is not None and seed is not None:
            ext["job_id"] = job_id
            # Committed, not queued: a queued receipt's body cannot be compared yet.
            prior = await self.log.committed_job_receipt(job_id)
            holder = self.log
            if prior is None:  # its first run may have answered before this log began
                holder, prior = next(
                    ((rl, i) for rl in self.frozen if (i := rl.job_receipt(job_id)) is not None),
                    (self.log, None),
                )
            # Marked first, reruns too: a receipt that another log's run may have claimed
            # to replace is not given again as the job's answer.
            elsewhere = await self._mark_job(job_id)
            if prior is not None:
                reused = self._job_receipt(
                    holder, prior, seed, client, model, inputs, outputs, verification, ext
                )
                if isinstance(reused, Issued):
                    named = reused.receipt.extensions.get("supersedes_in", ())
                    if set(elsewhere) <= set(named if isinstance(named, tuple | list) else ()):
                        self._rerun("reused")
                        return reused
                    # Another log was marked since it was logged: a new receipt naming both.
                    reused = reused.receipt.receipt_id
                self._rerun("superseded")
                ext["supersedes"] = reused
            if elsewhere:  # adopted from a replica that may have logged it: say so
                ext["supersedes_in"] = elsewhere
            job = (job_id, prior if holder is self.log else None)
        try:
            issued = await issue(
                self.log,
                self.signer,
                client=client,
                model=model,
                inputs=inputs,
                outputs=outputs,
                policy=policy,
                verification=verification,
                nodes=nodes,
                request_id=request_id,
                extensions=ext,
                seed=seed,  # the request's own (pipeline.context), or drawn by `issue`
                job=job,
            )
        except JobReceipted:  # another run's receipt got there first: not the log's fault
            raise
        except LogError:
            self.append_failed = True
            raise
        self.append_failed = False
        return issued

    def _job_receipt(
        self,
        holder: ReceiptLog,
        index: int,
        seed: bytes,
        client: ClientRef,
        model: ModelRef,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        verification: VerificationRef,
        extensions: Mapping[str, ExtValue],
    ) -> Issued | str:
        """A job ran again after its receipt was logged (a crash before its result was
        recorded). The same seed gives the same salt, so the same tensors give the same
        commitments: then the logged receipt is the answer's (returned; `answer` gives it
        unless another log was marked for the job since), and no second one is logged.
        The verification and the receipted evidence must match too (a zk proof is
        randomised: a second proof is a second execution's evidence, which the first
        receipt does not commit to). Otherwise (a nondeterministic node, other evidence, or
        the first body erased) the id of the receipt a new one must supersede: a second,
        different execution, logged as one."""
        salt, nonce = derive(seed)
        body = holder.body_at(index)
        if body is not None:
            signed = SignedReceipt.from_bytes(body)
            r = signed.receipt
            if (
                # the same caller's certificate and the same model file: a rerun on another
                # model (or a key that changed) is another execution, whatever it answered
                r.client == client
                and r.model == model
                and r.inputs == tensor_refs(inputs, salt)
                and r.outputs == tensor_refs(outputs, salt)
                and r.verification == verification
                # as `issue` adds; what the logged one superseded does not make it another
                and {k: v for k, v in r.extensions.items() if k not in _SUPERSEDES}
                == {**site_extensions(), **extensions}
            ):
                return Issued(signed, salt, summary(signed), reused=True)
        log.warning("a job ran again and answered otherwise: a receipt that supersedes its first")
        # The stored body's id; recomputed only when the body is gone (erased).
        return r.receipt_id if body is not None else make_receipt_id(holder.log_id, index, nonce)

    async def _mark_job(self, job_id: str) -> tuple[str, ...]:
        """Name this log in the job's shared record before its receipt is appended; the
        other replicas' logs the job was marked for (its receipt may be in any of them)."""
        if self.on_job_receipt is None:
            return ()
        try:
            marked = await self.on_job_receipt(job_id, self.log.log_id)
        except Exception as exc:  # no mark, no receipt: the run fails as retryable
            raise LogError(f"the job's receipt could not be marked: {exc}") from exc
        # The store is not trusted with what goes into a signed receipt: log ids only, few.
        ids = {m for m in marked if _LOG_ID.fullmatch(m)}
        others = ids - set(self.job_logs())
        if len(others) > _MAX_MARKS:  # naming only some could leave a receipt unlinked
            raise LogError(f"job {job_id} is marked for more than {_MAX_MARKS} other logs")
        elsewhere = tuple(sorted(others))
        if len(ids) < len(set(marked)):
            log.error("job %s: marks in the job store that are no log ids", job_id)
        if elsewhere:
            log.warning(
                "job %s was marked for another replica's receipt log (%s): adopted, its "
                "receipt names that log",
                job_id,
                ", ".join(elsewhere),
            )
        return elsewhere

    def job_logs(self) -> list[str]:
        """The logs whose job index this process searches (its own, not other workers'):
        a job marked for any other is another process's to run again, or to adopt."""
        return [rl.log_id for rl in (self.log, *self.frozen)]

    def _rerun(self, what: str) -> None:
        if self.on_job_rerun is not None:
            self.on_job_rerun(what)

    def save_evidence(
        self, receipt_id: str, files: Mapping[str, bytes | Path | tuple[Path, str]]
    ) -> None:
        """Evidence beside the log, never in its leaves (so retention can remove it):
        `evidence/<receipt id>.<name>`; large shared material (keys, SRS) is stored once,
        by content hash, under `evidence/shared/`, and referenced by the receipt's file."""
        root = self.log.path / "evidence"
        shared = root / "shared"
        root.mkdir(mode=0o700, exist_ok=True)
        shared.mkdir(mode=0o700, exist_ok=True)
        refs: dict[str, str] = {}
        for name, content in files.items():
            if isinstance(content, tuple):
                # (path, sha256 known at load): read and checked only the first time, so an
                # answer does not re-hash megabytes of SRS on the event loop.
                path, digest = content
                target = shared / digest
                if not target.exists():
                    data = path.read_bytes()
                    if hashlib.sha256(data).hexdigest() != digest:
                        raise OSError(f"{path} is not the {name} that was loaded")
                    atomic_write(target, data)
                refs[name] = digest
            elif isinstance(content, Path):
                data = content.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                target = shared / digest
                if not target.exists():
                    atomic_write(target, data)
                refs[name] = digest
            else:
                atomic_write(root / f"{receipt_id}.{name}", content)
        if refs:
            atomic_write(
                root / f"{receipt_id}.shared.json", json.dumps(refs, sort_keys=True).encode()
            )

    async def record(self, kind: str, payload: bytes) -> int:
        """A typed event (policy_load, revocation, ...) as a hash-only leaf of the log."""
        return await self.log.append(LogEntry(kind, hashlib.sha256(payload).digest()))

    async def record_document(self, entry: LogEntry, record: bytes) -> int:
        """A typed leaf with its record kept beside it (late evidence, quarantine events)."""
        return await self.log.append_record(entry, record)

    def late_evidence(self, receipt_id: str) -> list[dict[str, object]]:
        """The verified late-evidence documents about a receipt, in log order, from every
        log of this replica (evidence may land in a successor of the receipt's log)."""
        from gateway.receipts.late import verify_late_evidence

        docs: list[dict[str, object]] = []
        for rl in self.logs():
            for _, raw in rl.late_evidence(receipt_id):
                try:
                    docs.append(verify_late_evidence(raw, self.keyset, receipt_id))
                except ValueError as exc:
                    log.error("late evidence about %s does not verify: %s", receipt_id, exc)
        return sorted(docs, key=lambda d: str(d.get("time", "")))

    async def deny(
        self,
        *,
        client: ClientRef,
        model: ModelRef | None,
        problem_type: str,
        reason: str,
        request_id: str,
    ) -> tuple[Issued, bool]:
        return await self.coalescer.deny(
            client=client,
            model=model,
            denial=Denial(problem_type, reason),
            request_id=request_id,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(
            self.checkpointer.run(stop),
            self.coalescer.run(stop),
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.coalescer.flush()
            await self.checkpointer.tick()
        except Exception:  # closing must not mask the shutdown; the log is durable anyway
            log.exception("final checkpoint failed")
        await self.log.close()
