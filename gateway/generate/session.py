"""One generation through the pipeline: the stages of `gateway.pipeline` that apply, then
a node's token stream between an opening and a closing receipt.

    (identity, admission: Pipeline.authenticated) -> pre-policy -> caps -> nonce -> policy
    (token counts and sampling parameters, never text) -> mode (none; redundant where the
    entry offers it: verified.py) -> @rate -> stream
    slot -> token reservation -> node (first token; meanwhile the opening receipt, durable
    before anything is sent: opening.py) -> tokens (stop sequences: stop.py) -> closing
    receipt, token settlement, slot release

The last three run whatever ends the stream (its end, the client leaving, the node
failing, a send timing out), shielded from cancellation, so a cut stream still gets the
closing receipt of what was sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import Generate
from gateway.generate import verified
from gateway.generate.ask import Ask
from gateway.generate.meter import Reservation, TokenMeter
from gateway.generate.opening import EarlyOpenings
from gateway.generate.stop import StopScan
from gateway.generate.verified import AgreedText, TextSpot
from gateway.llm.tokenizer import TOKENIZER_SPEC_SHA256, Detokenizer
from gateway.pipeline.admission import PrePolicyStage, take_token
from gateway.pipeline.context import Caller
from gateway.pipeline.decide import log_decision
from gateway.pipeline.decode import NonceStage
from gateway.pipeline.execute import client_ref, model_ref
from gateway.policy.engine import InferDecision
from gateway.policy.facts import InferContext
from gateway.policy.live import LivePolicy
from gateway.protocol.problems import (
    BadRequest,
    Forbidden,
    NoHealthyNode,
    Problem,
    RateLimited,
)
from gateway.receipts.commit import new_salt
from gateway.receipts.issue import Issued
from gateway.receipts.log import LogError, LogFrozen
from gateway.receipts.model import PolicyRef
from gateway.receipts.service import ReceiptService
from gateway.receipts.stream import StreamHeader, close_stream, open_stream
from gateway.registry import ModelEntry
from gateway.revocation import Revocations
from gateway.routing.router import Router
from gateway.routing.streaming import GenerateCall, Generation, open_generation
from gateway.state import StateStore
from gateway.stats import InferenceStats, StreamTiming
from gateway.telemetry import Telemetry, note

log = logging.getLogger(__name__)

# Why a mode other than none is refused for a generative model, per mode: the client can
# act on it (ask again without ztgate.verification, or with none).
NOT_FOR_TEXT = {
    "redundant": "this model's registry entry does not offer redundant text "
    "(its operator adds redundant to the entry's allowed modes: docs/clients.md)",
    "zk": "zk proves one fixed-shape tensor computation, not a token stream",
    "mpc": "mpc runs fixed-shape tensor models only, not token-by-token generation",
}

# Finalisations running after their request's task was cancelled: referenced here until
# done (bounded by the streams in flight, themselves capped per identity).
_FINISHING: set[asyncio.Task[None]] = set()


def is_generative(entry: ModelEntry) -> bool:
    return entry.generative is not None


class StreamSlots:
    """Open streams per client identity on this replica (429 past the cap): a stream
    gives back its admission slot at its first token, and holds one of these instead."""

    RETRY_AFTER_S = 1.0

    def __init__(self, per_identity: int) -> None:
        self.per_identity = per_identity
        self.held: dict[str, int] = {}

    def take(self, key: str) -> None:
        n = self.held.get(key, 0)
        if n >= self.per_identity:
            raise RateLimited(
                f"at most {self.per_identity} open streams per client",
                retry_after=self.RETRY_AFTER_S,
            )
        self.held[key] = n + 1

    def give(self, key: str) -> None:
        left = self.held.get(key, 0) - 1
        if left > 0:
            self.held[key] = left
        else:
            self.held.pop(key, None)


@dataclass(frozen=True)
class Opened:
    issued: Issued | None  # None only on a gateway configured without receipts
    node: str


@dataclass(frozen=True)
class Piece:
    text: str
    count: int  # tokens behind this text


@dataclass(frozen=True)
class Closed:
    issued: Issued | None
    finish_reason: str  # stop | length | cancelled | node-error
    prompt_tokens: int
    completion_tokens: int


Event = Opened | Piece | Closed


@dataclass
class Stream:
    """An opened generation: `events()` yields Opened, Pieces, then Closed (unless the
    consumer stops early; the closing receipt is written all the same)."""

    ask: Ask
    entry: ModelEntry
    caller: Caller
    decision: InferDecision
    request_id: str
    generation: Generation | AgreedText
    opened: Opened
    head: StreamHeader | None
    service: GenerateService
    reservation: Reservation
    sent: list[int]
    timing: StreamTiming | None = None
    closed: Closed | None = None
    _done: bool = False
    _finishing: asyncio.Future[None] | None = None
    mode: str = "none"  # none | redundant (gateway/generate/verified.py)
    call: GenerateCall | None = None
    stopped: bool = False  # a stop sequence ended it (gateway/generate/stop.py)
    read: int = 0  # tokens read from the node(s): `sent` and those held back or stopped
    job_id: str | None = None  # a job's run (gateway/jobs/scope.py): both receipts name it

    @property
    def salt(self) -> str | None:
        return base64.b64encode(self.head.salt).decode() if self.head is not None else None

    async def events(self) -> AsyncGenerator[Event, None]:
        detok = Detokenizer()
        scan = StopScan(self.ask.stop)
        tokens = self.generation.tokens()
        try:
            yield self.opened
            pending = 0
            async for token in tokens:
                self.read += 1
                out = scan.feed(token)
                self.sent.extend(out)
                pending += len(out)
                text = detok.feed(out)
                if text:
                    yield Piece(text, pending)
                    pending = 0
                if scan.matched:
                    self.stopped = True
                    await self._stop_node(tokens)
                    break
            out = scan.flush()
            self.sent.extend(out)
            pending += len(out)
            tail = detok.feed(out) + detok.flush()
            if tail or pending:
                yield Piece(tail, pending)
            yield await self.finish()
        finally:
            await self.finish()  # shielded: cancels at the node, writes the closing receipt
            await tokens.aclose()

    async def _stop_node(self, tokens: AsyncGenerator[int, None]) -> None:
        """A stop sequence matched: the node's generation is cancelled, as when a client
        leaves; a node that just sent its last token is read out instead (Generation.drain:
        a cancellation racing a request's completion can crash tritonserver)."""
        if isinstance(self.generation, Generation):
            await self.generation.drain(0)
        await tokens.aclose()  # a redundant stream's nodes: AgreedGeneration closes them

    async def finish(self) -> Closed:
        """Cancel at the node, close the receipt, settle tokens, free the slot; once."""
        if self.closed is not None:
            return self.closed
        # One task, shared: a second call while the first is still writing the closing
        # receipt (a client leaving then) waits for the same one.
        task = self._finishing
        if task is None:
            task = self._finishing = asyncio.ensure_future(self._finish())
            _FINISHING.add(task)
            task.add_done_callback(_FINISHING.discard)
        await asyncio.shield(task)
        assert self.closed is not None
        return self.closed

    async def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        svc = self.service
        try:
            await self.generation.aclose()
            if self.timing is not None:
                self.timing.last_token = time.monotonic_ns()
            reason = "stop" if self.stopped else self.generation.finish_reason or "cancelled"
            issued = None
            verification, ext = verified.closing(self, reason)
            if self.head is not None and svc.receipts is not None and self.opened.issued:
                try:
                    issued = await close_stream(
                        svc.receipts,
                        self.head,
                        self.opened.issued.receipt.receipt_id,
                        len(self.ask.prompt_ids),
                        self.sent,
                        reason,
                        verification,
                        ext if self.job_id is None else {**ext, "job_id": self.job_id},
                    )
                except (LogError, LogFrozen, OSError):
                    log.exception("closing receipt of request %s not logged", self.request_id)
            self.closed = Closed(issued, reason, len(self.ask.prompt_ids), len(self.sent))
            verified.after_close(self, issued, ext)
        finally:
            if self.closed is None:
                self.closed = Closed(None, "cancelled", len(self.ask.prompt_ids), len(self.sent))
            if self.timing is not None:
                svc.stats.generated(self.entry, self.timing, self.closed.finish_reason)
            # The node's work: tokens held back or cut at a stop sequence were generated.
            used = max(self.read, len(self.sent))
            await svc.meter.settle(self.reservation, len(self.ask.prompt_ids) + used)
            svc.slots.give(self.caller.identity.spiffe_id)


class GenerateService:
    def __init__(
        self,
        *,
        cfg: Generate,
        pre_policy: PrePolicyStage,
        nonce: NonceStage,
        policy: LivePolicy,
        router: Router,
        revocations: Revocations,
        store: StateStore,
        receipts: ReceiptService | None,
        stats: InferenceStats,
        telemetry: Telemetry,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.telemetry = telemetry
        self.pre_policy = pre_policy
        self.nonce = nonce
        self.policy = policy
        self.router = router
        self.revocations = revocations
        self.store = store
        self.receipts = receipts
        self.meter = TokenMeter(store)
        self.slots = StreamSlots(cfg.max_streams_per_identity)
        self.text_spot: TextSpot | None = None  # spot checks of text: add_lie_accounting

    def caps(self, ask: Ask, entry: ModelEntry) -> None:
        """The gateway's caps and the model's own, before policy (fixed text: numbers)."""
        spec = entry.generative
        assert spec is not None
        prompt = len(ask.prompt_ids)
        if prompt < 1:
            raise BadRequest("the prompt is empty")
        if prompt > self.cfg.max_prompt_tokens:
            raise BadRequest(
                f"prompt of {prompt} tokens exceeds the gateway's cap of "
                f"{self.cfg.max_prompt_tokens}"
            )
        cap = min(self.cfg.max_tokens, spec.max_tokens)
        if ask.max_tokens > cap:
            raise BadRequest(f"max_tokens must be at most {cap} for {entry.name!r}")
        if prompt + ask.max_tokens > spec.context_length:
            raise BadRequest(
                f"prompt ({prompt} tokens) and max_tokens ({ask.max_tokens}) exceed the "
                f"context length of {entry.name!r} ({spec.context_length} tokens)"
            )

    def decide(self, caller: Caller, entry: ModelEntry, ask: Ask) -> InferDecision:
        """Policy on counts and sampling parameters, then the mode: none, or redundant
        where the registry entry offers it (gateway/generate/verified.py)."""
        text_modes = [m for m in ("none", "redundant") if m in entry.allowed_modes] or ["none"]
        redundant = ask.mode == "redundant" and "redundant" in text_modes
        if ask.mode is not None and ask.mode != "none" and not redundant:
            raise Forbidden(
                f"verification mode {ask.mode!r} does not apply to generative models: "
                f"{NOT_FOR_TEXT[ask.mode]}; allowed modes: {', '.join(text_modes)}",
                extra={"allowed_modes": text_modes},
            )
        nodes = [s.config.name for s in self.router.nodes.values() if s.config.serves(entry.name)]
        if not nodes:
            raise NoHealthyNode(f"no node serves {entry.name!r}", retry_after=5)
        ctx = InferContext(
            batch_size=1,
            payload_bytes=len(ask.prompt_ids),
            purpose=ask.purpose,
            now=dt.datetime.now(dt.UTC),
            prompt_tokens=len(ask.prompt_ids),
            max_tokens=ask.max_tokens,
            temperature_milli=round(ask.temperature * 1000),
            top_p_milli=round(ask.top_p * 1000),
        )
        decision = self.policy.engine.decide_infer(
            caller.facts, entry.name, ctx, nodes, revocation_version=self.revocations.version
        )
        if not decision.allowed:
            log_decision(decision, caller.facts, entry.name, None)
            raise Forbidden(
                f"policy denies this request: {decision.reason}; no mode is allowed",
                extra={"allowed_modes": [], "decision_id": decision.id},
            )
        if redundant:  # verified text: gateway/generate/verified.py
            log_decision(decision, caller.facts, entry.name, "redundant")
            if "redundant" not in decision.modes:
                _, why = decision.for_mode("redundant")
                raise Forbidden(
                    f"verification mode 'redundant' is not allowed for this request: {why}",
                    extra={"allowed_modes": list(decision.modes), "decision_id": decision.id},
                )
            return decision
        log_decision(decision, caller.facts, entry.name, "none")
        if "none" not in decision.modes:
            _, why = decision.for_mode("none")
            raise Forbidden(
                f"verification mode 'none' is not allowed for this request: {why}; "
                "generative models offer only none",
                extra={"allowed_modes": [], "decision_id": decision.id},
            )
        return decision

    @contextlib.contextmanager
    def _slot(self, key: str) -> Iterator[None]:
        self.slots.take(key)
        try:
            yield
        except BaseException:
            self.slots.give(key)
            raise

    async def start(
        self,
        caller: Caller,
        entry: ModelEntry,
        ask: Ask,
        request_id: str,
        headers: Mapping[str, str] | None = None,
        timing: StreamTiming | None = None,
        job_id: str | None = None,
    ) -> Stream:
        """Every check, then the node's first token and the opening receipt; raises a
        Problem before anything is sent. The returned stream owns a stream slot and a
        token reservation until its `finish`."""
        stage = self.telemetry.stage
        with stage("pre_policy", model=entry.name):
            self.pre_policy(caller, entry)
        if not is_generative(entry):
            raise BadRequest(
                f"{entry.name!r} is not a generative model: use /v2/models/{entry.name}/infer"
            )
        note(model=entry.name, mode=ask.mode or "none")
        if timing is None:
            now = time.monotonic_ns()
            timing = StreamTiming(arrived=now, admitted=now)
        try:
            with stage("caps"):
                self.caps(ask, entry)
            with stage("nonce"):
                await self.nonce.check(headers or {}, caller)  # ztgate-nonce, as on /infer
            with stage("policy", model=entry.name) as s:
                decision = self.decide(caller, entry, ask)
                s.set(decision_id=decision.id)
            spiffe = caller.identity.spiffe_id
            rate = decision.rate
            if rate is not None:  # the same bucket as the tensor path's RateLimitStage
                key = f"rate:{spiffe}:{entry.name}:{rate.count}/{rate.per_seconds}"
                with stage("rate_limit"):
                    await take_token(self.store, key, rate)
            with self._slot(spiffe):
                need = len(ask.prompt_ids) + ask.max_tokens
                with stage("token_limit"):
                    reservation = await self.meter.reserve(spiffe, decision.token_budgets, need)
                try:
                    stream = await self._open(
                        caller, entry, ask, request_id, decision, reservation, timing, job_id
                    )
                except BaseException:
                    await self.meter.settle(reservation, 0)
                    raise
        except BaseException:
            self.stats.generated(entry, timing, None)
            raise
        stream.timing = timing
        return stream

    async def _open(
        self,
        caller: Caller,
        entry: ModelEntry,
        ask: Ask,
        request_id: str,
        decision: InferDecision,
        reservation: Reservation,
        timing: StreamTiming,
        job_id: str | None = None,
    ) -> Stream:
        seed = secrets.randbits(63)  # the gateway's, never the client's: receipted
        call = GenerateCall(
            model=entry.name,
            prompt_ids=ask.prompt_ids,
            max_tokens=ask.max_tokens,
            temperature=ask.temperature,
            top_p=ask.top_p,
            seed=seed,
            request_id=request_id,
            version=entry.version,
        )
        timing.node_asked = time.monotonic_ns()
        mode = "redundant" if ask.mode == "redundant" else "none"  # decide() allowed it
        parameters = _parameters(ask, seed)
        if job_id is not None:  # the opening receipt names the job whose answer this is
            parameters["job_id"] = job_id

        def head_for(node: str, peers: tuple[str, ...] = ()) -> StreamHeader:
            return StreamHeader(
                client_ref(caller.identity),
                model_ref(entry),
                PolicyRef(decision.policy_hash, decision.id),
                node,
                request_id,
                new_salt(),
                peers=peers,
                mode=mode,
            )

        # Mode none: the opening receipt is written while the first token is on its way
        # (gateway/generate/opening.py); redundant names all its nodes, known only after.
        early = None
        if self.receipts is not None and mode == "none":
            early = EarlyOpenings(self.receipts, head_for, ask.prompt_ids, parameters)
        with self.telemetry.stage("node_first_token", model=entry.name) as s:
            generation: Generation | AgreedText
            try:
                if mode == "redundant":
                    generation = await verified.open_redundant(
                        self.router, call, decision, self.cfg
                    )
                else:
                    generation = await open_generation(
                        self.router,
                        call,
                        only=lambda node: decision.node_allowed("none", node.name),
                        first_token_timeout_s=self.cfg.first_token_timeout_s,
                        token_timeout_s=self.cfg.token_timeout_s,
                        on_attempt=None if early is None else early.attempt,
                    )
            except BaseException as exc:
                if isinstance(exc, Problem):  # after policy allowed it (gateway/forward/)
                    exc.extra.setdefault("decision_id", decision.id)
                if early is not None:
                    cut = isinstance(exc, asyncio.CancelledError)
                    await early.abandon("cancelled" if cut else "node-error")
                raise
            s.set(node=generation.node)
        timing.first_token = time.monotonic_ns()
        head = None
        issued = None
        try:
            with self.telemetry.stage("receipt"):
                if early is not None:
                    head, issued = await early.chosen(generation.node)
                elif self.receipts is not None:
                    peers = generation.peers if isinstance(generation, AgreedText) else ()
                    head = head_for(generation.node, peers)
                    issued = await open_stream(self.receipts, head, ask.prompt_ids, parameters)
        except BaseException as exc:
            await generation.aclose()
            if early is not None:
                await early.abandon("cancelled")
            timing.last_token = time.monotonic_ns()
            if isinstance(exc, LogError | LogFrozen | OSError):
                log.error("receipt log refused an opening receipt: %s", exc)
                raise NoHealthyNode("the receipt log is unavailable", retry_after=5) from exc
            raise
        timing.opened = time.monotonic_ns()
        return Stream(
            ask=ask,
            entry=entry,
            caller=caller,
            decision=decision,
            request_id=request_id,
            generation=generation,
            opened=Opened(issued, generation.node),
            head=head,
            service=self,
            reservation=reservation,
            sent=[],
            mode=mode,
            call=call,
            job_id=job_id,
        )


def _parameters(ask: Ask, seed: int) -> dict[str, Any]:
    """Sampling parameters as receipt extensions (strings for floats: exact and canonical)."""
    return {
        "max_tokens": ask.max_tokens,
        "temperature": repr(ask.temperature),
        "top_p": repr(ask.top_p),
        "seed": str(seed),
        "tokenizer_sha256": TOKENIZER_SPEC_SHA256,
        # Their count only: the sequences are client text (gateway/generate/stop.py).
        **({"stop_sequences": len(ask.stop)} if ask.stop else {}),
    }
