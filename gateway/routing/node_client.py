"""One gRPC channel per node, mutual TLS, the node pinned by its own certificate name.

The channel verifies the node's certificate against the node CA *and* its unique DNS SAN
(`grpc.ssl_target_name_override`), so a sibling node's valid certificate served at this
node's address is refused: residency and provider independence depend on knowing which
node answered. The pin is the only check: Python gRPC clients cannot read the peer's
certificate after the handshake. So the pinned name is the one the officer signed (the
runtime hands this client the node as `gateway.policy.live.signed_nodes` made it), never
one gateway.toml could re-point at another node's certificate. Channels stay open; a new
TLS connection per request costs ~7 ms here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor

from gateway.config import NodeConfig
from gateway.node.repository import SCORE_SUFFIX
from gateway.protocol.tensors import DATATYPES, Tensor, canonical_bytes

log = logging.getLogger(__name__)


def attempt_id() -> str:
    """A fresh random KServe `id` for one node attempt.

    Never the gateway's request id: that id is in the receipt and the client's answer, and
    if every attempt carried it, colluding nodes (the two copies of a redundant request
    above all) could recognise copies of one request and tie them to its receipt. The
    gateway's debug log pairs the two for an operator."""
    return secrets.token_hex(16)


class NodeError(Exception):
    """The node failed or lied; the request may be retried on another node."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class NodeCredentials:
    node_ca: Path
    client_cert: Path
    client_key: Path

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.node_ca.read_bytes(),
            private_key=self.client_key.read_bytes(),
            certificate_chain=self.client_cert.read_bytes(),
        )


class NodeClient:
    """Talks KServe v2 gRPC to one node; every call carries a timeout."""

    def __init__(
        self,
        node: NodeConfig,
        credentials: grpc.ChannelCredentials,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if not node.dns_name:
            # Without an override gRPC checks the certificate against the dialled host,
            # which a sibling's certificate with the same IP SAN would pass.
            raise ValueError(f"node {node.name}: no DNS name to pin its channel to")
        self.node = node
        self._credentials = credentials
        self._max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None
        self._grpc_stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None

    @property
    def _stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        # grpc.aio binds a channel to the running loop, so it is made on first use there.
        if self._grpc_stub is None:
            self._channel = grpc.aio.secure_channel(
                self.node.address,
                self._credentials,
                options=[
                    ("grpc.ssl_target_name_override", self.node.dns_name),
                    ("grpc.default_authority", self.node.dns_name),
                    ("grpc.max_receive_message_length", self._max_message_bytes),
                    ("grpc.max_send_message_length", self._max_message_bytes),
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.enable_retries", 0),
                ],
            )
            self._grpc_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._grpc_stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._channel = self._grpc_stub = None

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: tuple[Tensor, ...],
        output_names: tuple[str, ...],
        timeout_s: float,
        request_id: str = "",
    ) -> list[Tensor]:
        """`request_id` is the gateway's, for its own log only; the node sees a fresh
        random id per attempt (`attempt_id`)."""
        wire_id = attempt_id()
        log.debug("request %s: attempt %s on node %s", request_id, wire_id, self.node.name)
        req = service_pb2.ModelInferRequest(
            model_name=model, model_version=version or "", id=wire_id
        )
        for t in inputs:
            spec = req.inputs.add()
            spec.name = t.name
            spec.datatype = t.datatype
            spec.shape.extend(t.shape)
            req.raw_input_contents.append(canonical_bytes(t))
        for name in output_names:
            req.outputs.add().name = name
        try:
            resp = await self._stub.ModelInfer(req, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise NodeError(self.node.name, f"{exc.code().name}: {exc.details()}") from exc
        return self._decode(resp)

    def _decode(self, resp: service_pb2.ModelInferResponse) -> list[Tensor]:
        if len(resp.raw_output_contents) != len(resp.outputs):
            raise NodeError(self.node.name, "reply without raw output contents")
        out = []
        for spec, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
            shape = tuple(int(d) for d in spec.shape)
            if spec.datatype not in DATATYPES or any(d < 0 for d in shape):
                raise NodeError(self.node.name, f"bad output {spec.name}: {spec.datatype}{shape}")
            count = math.prod(shape)  # exact; np.prod costs ~3 us a call here
            try:
                if spec.datatype == "BYTES":
                    arr = deserialize_bytes_tensor(raw)
                else:
                    arr = np.frombuffer(raw, dtype=DATATYPES[spec.datatype].dtype)
                arr = arr.reshape(shape) if arr.size == count else None
            except (ValueError, TypeError):
                arr = None
            if arr is None:
                raise NodeError(self.node.name, f"output {spec.name} size does not match shape")
            out.append(Tensor(spec.name, spec.datatype, shape, arr))
        return out

    async def generate(
        self,
        model: str,
        version: str | None,
        request: GenerateRequest,
        *,
        timeout_s: float,
        request_id: str = "",
    ) -> TokenStream:
        """Open a `ModelStreamInfer` stream asking a decoupled model for tokens.

        `timeout_s` bounds the whole stream (its gRPC deadline); each read has its own
        timeout on top (`TokenStream.next`). The stream is never half-closed: Triton ends
        it with an empty final response, and `TokenStream.cancel` is what stops the model.
        """
        wire_id = attempt_id()
        log.debug("request %s: stream %s on node %s", request_id, wire_id, self.node.name)
        req = service_pb2.ModelInferRequest(
            model_name=model, model_version=version or "", id=wire_id
        )
        # Without it Triton sends no response carrying the final flag after the last token
        # (tritonclient's aio stream_infer drops it, so the request is built here).
        req.parameters["triton_enable_empty_final_response"].bool_param = True
        for name, datatype, values in request.tensors():
            spec = req.inputs.add()
            spec.name = name
            spec.datatype = datatype
            spec.shape.append(len(values))
            req.raw_input_contents.append(
                np.asarray(values, dtype=DATATYPES[datatype].dtype).tobytes()
            )
        req.outputs.add().name = GENERATED_OUTPUT
        call = self._stub.ModelStreamInfer(timeout=timeout_s)
        stream = TokenStream(self.node.name, call, request.max_tokens)
        try:
            await asyncio.wait_for(call.write(req), timeout=timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            stream.cancel()
            raise NodeError(self.node.name, f"stream not opened: {_rpc_reason(exc)}") from exc
        return stream

    async def score(
        self,
        model: str,
        version: str | None,
        ids: tuple[int, ...],
        answer_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        *,
        timeout_s: float,
        request_id: str = "",
    ) -> Scores:
        """Teacher-forced scores of the last `answer_tokens` of `ids` under `model`'s
        scoring model (``<model>-score``, gateway/node/score_model.py.tmpl): one unary call."""
        inputs = (
            Tensor("input_ids", "INT64", (len(ids),), np.asarray(ids, dtype=np.int64)),
            Tensor("answer_tokens", "INT64", (1,), np.asarray([answer_tokens], dtype=np.int64)),
            Tensor("temperature", "FP32", (1,), np.asarray([temperature], dtype=np.float32)),
            Tensor("top_p", "FP32", (1,), np.asarray([top_p], dtype=np.float32)),
        )
        out = await self.infer(
            model + SCORE_SUFFIX, version, inputs, SCORE_OUTPUTS, timeout_s, request_id
        )
        got = {t.name: t for t in out}
        want = dict(
            zip(SCORE_OUTPUTS, ("INT64", "FP32", "FP32", "FP32", "FP64", "FP64"), strict=True)
        )
        if any(
            name not in got or got[name].datatype != dt or got[name].shape != (answer_tokens,)
            for name, dt in want.items()
        ):
            raise NodeError(self.node.name, "scores are not one value per answer token")
        argmax = tuple(int(v) for v in got["argmax"].data)
        margin, gap, logprob, low, high = (
            tuple(float(v) for v in got[k].data)
            for k in ("margin", "gap", "logprob", "cdf_low", "cdf_high")
        )
        values = (*margin, *gap, *logprob, *low, *high)
        if not all(math.isfinite(v) for v in values) or min((*margin, *gap), default=0) < 0:
            raise NodeError(self.node.name, "scores out of range")
        return Scores(argmax, margin, gap, logprob, low, high)

    async def server_ready(self, timeout_s: float) -> bool:
        try:
            resp = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.ready)

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        """KServe ModelReady: whether the node serves `model` (e.g. a `<name>-zk` prover)
        at `version` now; a node that does not answer in time is not ready."""
        request = service_pb2.ModelReadyRequest(name=model, version=version)
        try:
            resp = await self._stub.ModelReady(request, timeout=timeout_s)
        except (grpc.aio.AioRpcError, OSError, ValueError):
            return False
        return bool(resp.ready)


# Empty non-final responses tolerated in a row (Triton sends none; a node that streams only
# those is broken or stalling).
_MAX_EMPTY_RESPONSES = 4
# The tensors of a generative model's decoupled Triton model (gateway/node/generate_model.py.tmpl
# reads the same names; the registry's generative entries list them).
GENERATED_OUTPUT = "token_id"
# The scoring model's outputs (gateway/node/repository.py builds it beside each generative one).
SCORE_OUTPUTS = ("argmax", "margin", "gap", "logprob", "cdf_low", "cdf_high")


@dataclasses.dataclass(frozen=True)
class Scores:
    """A node's teacher-forced view of each answer token (gateway/node/score_model.py.tmpl):
    its own most likely token, top-1 minus top-2 logit, top-1 minus the given token's logit,
    the given token's log-probability at the generation's temperature, and the interval
    of the sampling draw that picks it (sampled calls; 0 for greedy)."""

    argmax: tuple[int, ...]
    margin: tuple[float, ...]
    gap: tuple[float, ...]
    logprob: tuple[float, ...]
    cdf_low: tuple[float, ...] = ()
    cdf_high: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int

    def tensors(self) -> tuple[tuple[str, str, tuple[float | int, ...]], ...]:
        return (
            ("input_ids", "INT64", self.prompt_ids),
            ("max_tokens", "INT32", (self.max_tokens,)),
            ("temperature", "FP32", (self.temperature,)),
            ("top_p", "FP32", (self.top_p,)),
            ("seed", "UINT64", (self.seed,)),
        )


def _rpc_reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


class TokenStream:
    """One open `ModelStreamInfer` stream: token ids as the node sends them.

    Holds the node to the protocol: one INT64 token per response, ids inside `vocab`, no
    more than `max_tokens`; anything else is the node's fault (NodeError) and ends the
    stream."""

    def __init__(
        self, node: str, call: grpc.aio.StreamStreamCall[Any, Any], max_tokens: int
    ) -> None:
        self.node = node
        self._call = call
        self._max_tokens = max_tokens
        self.received = 0
        self.done = False

    async def next(self, timeout_s: float, vocab: int) -> int | None:
        """The next token id, or None once the node sent its final response."""
        if self.done:
            return None
        for _ in range(_MAX_EMPTY_RESPONSES):
            try:
                msg = await asyncio.wait_for(self._call.read(), timeout=timeout_s)
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError) as exc:
                self.cancel()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise NodeError(self.node, f"stream broke: {_rpc_reason(exc)}") from exc
            if msg is grpc.aio.EOF:
                self.cancel()
                raise NodeError(self.node, "stream ended without a final response")
            if msg.error_message:
                self.cancel()
                raise NodeError(self.node, f"model error: {msg.error_message[:200]}")
            token = self._token(msg.infer_response)
            final = msg.infer_response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                self.done = True
                self.cancel()  # the request is complete; this only tears the RPC down
                if token is not None:
                    self._count(token, vocab)
                    return token
                return None
            if token is None:
                continue  # an empty non-final response carries nothing
            self._count(token, vocab)
            return token
        self.cancel()
        raise NodeError(self.node, "a stream of empty responses")

    def _token(self, resp: service_pb2.ModelInferResponse) -> int | None:
        if not resp.outputs:
            return None
        spec = resp.outputs[0]
        if (
            len(resp.outputs) != 1
            or len(resp.raw_output_contents) != 1
            or spec.name != GENERATED_OUTPUT
            or spec.datatype != "INT64"
            or len(resp.raw_output_contents[0]) != 8
        ):
            self.cancel()
            raise NodeError(self.node, "a stream response is not one INT64 token")
        return int(np.frombuffer(resp.raw_output_contents[0], dtype="<i8")[0])

    def _count(self, token: int, vocab: int) -> None:
        self.received += 1
        if not 0 <= token < vocab:
            self.cancel()
            raise NodeError(self.node, f"token id {token} outside the vocabulary")
        if self.received > self._max_tokens:
            self.cancel()
            raise NodeError(self.node, f"more than max_tokens ({self._max_tokens}) tokens")

    def cancel(self) -> None:
        """Cancel the RPC: the node's model sees `is_cancelled()` and stops. Idempotent."""
        self.done = True
        self._call.cancel()
