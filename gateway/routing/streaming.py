"""Streams from generative models: pick a node, open a token stream, fail over before the
first token only.

The attempt loop of `Router.infer`, for streams: nodes are the model's candidates that
policy's filter (`only`) allows, picked the same way; a node that fails or stays silent
before its first token is charged and the next one tried, with a fresh wire id each time.
Once a token has gone towards the client the answer belongs to that node: a failure then
ends the stream with `finish_reason` "node-error" rather than splicing another node's
continuation into it.

Two verified variants for text (issue 23; docs/reputation.md, "Text"):

* `open_agreed_generation` -- mode redundant: the same greedy (or gateway-seeded) call on
  k nodes of distinct signed providers, read in lockstep; a token goes on only once all k
  sent it, and the first divergence ends the stream with `finish_reason` "diverged".
* `score_answer` -- one teacher-forced pass over prompt + answer on a node's scoring model
  (``<model>-score``), which gateway/verify/text_check.py runs after the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from gateway.job import NodeFilter
from gateway.llm.tokenizer import END_TOKENS, VOCAB
from gateway.protocol.problems import NoHealthyNode, UpstreamFailed
from gateway.routing.node_client import GenerateRequest, NodeError, Scores, TokenStream
from gateway.routing.router import NodeState, Router
from gateway.telemetry import span

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "node-error", "diverged")


@dataclass(frozen=True)
class GenerateCall:
    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float  # 0.0 = greedy
    top_p: float  # 1.0 = off
    seed: int  # chosen by the gateway, never by the client
    request_id: str  # the gateway's, for its own log only (the node sees a fresh attempt id)
    version: str = ""  # "" = the node's latest


class Generation:
    """One open stream on one node.

    `tokens()` yields the generated token ids, the end token excluded (it sets
    `finish_reason` "stop" instead). The caller must `aclose()` when done, above all when
    its client went away: only that cancels generation at the node.
    """

    def __init__(
        self,
        router: Router,
        state: NodeState,
        stream: TokenStream,
        first: int | None,
        call: GenerateCall,
        token_timeout_s: float,
    ) -> None:
        self.node: str = state.config.name
        self.finish_reason: str | None = None
        self._router = router
        self._state = state
        self._stream = stream
        self._first = first
        self._call = call
        self._token_timeout_s = token_timeout_s
        self._released = False
        self.emitted = 0  # token ids yielded so far

    async def tokens(self) -> AsyncGenerator[int, None]:
        if self.finish_reason is not None:
            return
        try:
            token = self._first
            self._first = None
            while True:
                if token is None:  # the node's final response
                    self.finish_reason = (
                        "length" if self.emitted >= self._call.max_tokens else "stop"
                    )
                    if self.finish_reason == "stop":
                        # Final before max_tokens without an end token: the node cut it short.
                        raise NodeError(self.node, "stream ended early without an end token")
                    break
                if token in END_TOKENS:
                    self.finish_reason = "stop"
                    break
                self.emitted += 1
                yield token
                if self.emitted >= self._call.max_tokens:
                    self.finish_reason = "length"
                    await self._read_final()
                    break
                token = await self._stream.next(self._token_timeout_s, VOCAB)
        except NodeError as exc:
            log.warning("stream on %s failed after its first token: %s", self.node, exc.reason)
            self.finish_reason = "node-error"
            await self._release(failed=True)
            return
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            self._stream.cancel()
            await self._release(failed=False)

    async def _read_final(self) -> None:
        """Read the node's final response after the last token instead of cancelling a
        request that is finishing: tritonserver before 24.12 can crash (SIGSEGV) when a
        cancellation races a request's completion (triton-inference-server/server#7840)."""
        try:
            await self._stream.next(self._token_timeout_s, VOCAB)
        except NodeError as exc:  # the answer is whole; a bad end is only logged
            log.warning("stream on %s ended badly after its last token: %s", self.node, exc.reason)

    async def drain(self, limit: int) -> None:
        """Stop reading: read out (and drop) what the node still sends when that is at
        most `limit` tokens, so its request finishes rather than being cancelled
        (`_read_final`); cancel it otherwise."""
        if self.finish_reason is None and self._call.max_tokens - self.emitted <= limit:
            try:
                while await self._stream.next(self._token_timeout_s, VOCAB) is not None:
                    pass
            except NodeError:
                pass
        await self.aclose()

    async def aclose(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self._stream.cancel()
        await self._release(failed=False)

    async def _release(self, *, failed: bool) -> None:
        if self._released:
            return
        self._released = True
        self._state.pending -= 1
        if failed:
            await self._router._failed(self._state)
        elif self._state.failures:
            self._state.failures = 0
            await self._router._quiet(self._router.store.record_success(self.node))


async def open_generation(
    router: Router,
    call: GenerateCall,
    *,
    only: NodeFilter | None,
    first_token_timeout_s: float,
    token_timeout_s: float,
    on_attempt: Callable[[str], None] | None = None,
) -> Generation:
    """Open a stream on a node that may serve `call.model`; returns once its first token
    (or its end) arrived. Raises NoHealthyNode when no node may serve it, UpstreamFailed
    when every node tried failed before its first token. `on_attempt` is told each node
    as it is picked, before the stream opens: work that names the node (the opening
    receipt) can then overlap the wait for the first token."""
    if call.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    request = GenerateRequest(
        call.prompt_ids, call.max_tokens, call.temperature, call.top_p, call.seed
    )
    # The whole stream's gRPC deadline: a stream that emits on time ends well before it.
    stream_deadline_s = first_token_timeout_s + call.max_tokens * token_timeout_s
    tried: list[str] = []
    reasons: list[str] = []
    for attempt in range(1, router.cfg.max_attempts + 1):
        cands = [s for s in router.candidates(call.model, only) if s.config.name not in tried]
        if not cands:
            if tried:
                break
            raise NoHealthyNode(
                f"no healthy node may serve model {call.model!r} now", retry_after=1
            )
        state = router._pick(cands)
        name = state.config.name
        tried.append(name)
        state.attempts += 1
        if attempt > 1:
            router.retries += 1
        if on_attempt is not None:
            on_attempt(name)
        state.pending += 1
        start = time.monotonic()
        with span("node_stream_open", node=name, attempt=attempt, model=call.model) as sp:
            stream: TokenStream | None = None
            try:
                stream = await state.client.generate(
                    call.model,
                    call.version,
                    request,
                    timeout_s=stream_deadline_s,
                    request_id=call.request_id,
                )
                first = await stream.next(first_token_timeout_s, VOCAB)
                if first is None:
                    raise NodeError(name, "stream ended before its first token")
            except NodeError as exc:
                sp.set(outcome="failed")
                if stream is not None:
                    stream.cancel()
                state.pending -= 1
                reasons.append(f"{name}: {exc.reason}")
                log.warning("stream attempt %d failed on %s: %s", attempt, name, exc.reason)
                await router._failed(state)
                continue
            except BaseException:
                if stream is not None:
                    stream.cancel()
                state.pending -= 1
                raise
            sp.set(outcome="ok")
        # Time to first token, so plain requests and streams share the balancing signal.
        state.learn(time.monotonic() - start, router.cfg.ewma_alpha)
        state.served += 1
        return Generation(router, state, stream, first, call, token_timeout_s)
    raise UpstreamFailed(f"every node tried failed ({', '.join(tried)}): {'; '.join(reasons)}")


# ------------------------------------------------------------------ redundant text

# After a divergence, a node stream with at most this many tokens left is read out rather
# than cancelled (Generation.drain): cheaper than a node restart after Triton's race.
DRAIN_TOKENS = 16


class AgreedGeneration:
    """k open streams of one call on k distinct providers, read in lockstep.

    `tokens()` yields a token only once every node sent it. It ends with the nodes'
    common `finish_reason`, or "diverged" at the first position where they differ (a
    different token, or one ending while another goes on; `divergence` is that position,
    `proposals` what each node sent there, None for an end), or "node-error" if a node
    broke. Whatever ends it, every node stream is cancelled; `aclose()` does the same
    when the consumer stops early.
    """

    def __init__(self, router: Router, gens: Sequence[Generation]) -> None:
        self.nodes: tuple[str, ...] = tuple(g.node for g in gens)
        self.finish_reason: str | None = None
        self.divergence: int | None = None
        self.proposals: tuple[int | None, ...] = ()
        self.emitted = 0
        self._router = router
        self._gens = tuple(gens)
        self._iters = [g.tokens() for g in gens]

    async def tokens(self) -> AsyncGenerator[int, None]:
        if self.finish_reason is not None:
            return
        try:
            while True:
                step = await asyncio.gather(*(anext(it, None) for it in self._iters))
                if len(set(step)) == 1 and step[0] is not None:
                    self.emitted += 1
                    yield step[0]
                    continue
                reasons = {g.finish_reason for g in self._gens}
                if "node-error" in reasons:
                    self.finish_reason = "node-error"
                elif len(set(step)) == 1 and len(reasons) == 1:  # all ended alike
                    self.finish_reason = reasons.pop()
                else:
                    self._diverged(step)
                return
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            await self._close_all()

    def _diverged(self, step: Sequence[int | None]) -> None:
        self.finish_reason = "diverged"
        self.divergence = self.emitted
        self.proposals = tuple(step)
        # Either side may be the liar: nobody is charged here (the two-party rule); a
        # third provider's teacher-forced pass can settle it (text_check.settle_divergence).
        self._router.unresolved(
            "redundant-text", self.nodes, f"token streams diverged at position {self.emitted}"
        )

    async def aclose(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        await self._close_all()

    async def _close_all(self) -> None:
        # Streams behind by a few tokens are read out, not cancelled (Generation.drain).
        for gen, it in zip(self._gens, self._iters, strict=True):
            await gen.drain(DRAIN_TOKENS if self.finish_reason == "diverged" else 0)
            await it.aclose()


async def open_agreed_generation(
    router: Router,
    call: GenerateCall,
    k: int,
    only: NodeFilter | None,
    *,
    first_token_timeout_s: float,
    token_timeout_s: float,
) -> AgreedGeneration:
    """Open `call` on `k` nodes of `k` distinct signed providers (`NodeConfig.provider`,
    from the officer-signed facts) that `only` allows; returns once each sent its first
    token. Raises NoHealthyNode when fewer than `k` providers may serve it now, and
    UpstreamFailed when a provider's nodes all failed before a first token (the streams
    already open are then cancelled). `call` must be greedy or carry the gateway's seed:
    honest nodes then send the same tokens."""
    if k < 2:
        raise ValueError("redundant generation needs k >= 2")
    cands = router.candidates(call.model, only)
    providers: list[str] = []
    while len(providers) < k:
        left = [s for s in cands if s.config.provider not in providers]
        if not left:
            raise NoHealthyNode(
                f"model {call.model!r}: fewer than {k} providers may serve it now",
                retry_after=1,
            )
        providers.append(router._pick(left).config.provider)

    def of(provider: str) -> NodeFilter:
        return lambda n: n.provider == provider and (only is None or only(n))

    opened = await asyncio.gather(
        *(
            open_generation(
                router,
                call,
                only=of(p),
                first_token_timeout_s=first_token_timeout_s,
                token_timeout_s=token_timeout_s,
            )
            for p in providers
        ),
        return_exceptions=True,
    )
    gens = [g for g in opened if isinstance(g, Generation)]
    failed = [e for e in opened if not isinstance(e, Generation)]
    if failed:
        for gen in gens:
            await gen.aclose()
        raise failed[0]
    return AgreedGeneration(router, gens)


# ------------------------------------------------------------------ teacher-forced scores


async def score_answer(
    router: Router,
    model: str,
    ids: tuple[int, ...],
    answer_tokens: int,
    temperature: float,
    *,
    only: NodeFilter | None,
    timeout_s: float,
    top_p: float = 1.0,
    version: str = "",
    request_id: str = "",
) -> tuple[str, Scores]:
    """(node, scores): one teacher-forced pass over `ids` (prompt then the answer's last
    `answer_tokens` ids) on a node serving `model` that `only` allows. Fails over like a
    plain request; raises NoHealthyNode or UpstreamFailed."""
    tried: list[str] = []
    reasons: list[str] = []
    for _ in range(router.cfg.max_attempts):
        cands = [s for s in router.candidates(model, only) if s.config.name not in tried]
        if not cands:
            if tried:
                break
            raise NoHealthyNode(f"no healthy node may score model {model!r} now", retry_after=1)
        state = router._pick(cands)
        name = state.config.name
        tried.append(name)
        state.pending += 1
        try:
            with span("node_score", node=name, model=model):
                scores = await state.client.score(
                    model,
                    version,
                    ids,
                    answer_tokens,
                    temperature,
                    top_p,
                    timeout_s=timeout_s,
                    request_id=request_id,
                )
        except NodeError as exc:
            reasons.append(f"{name}: {exc.reason}")
            await router._failed(state)
            continue
        finally:
            state.pending -= 1
        return name, scores
    raise UpstreamFailed(f"every node tried failed ({', '.join(tried)}): {'; '.join(reasons)}")
