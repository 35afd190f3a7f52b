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

import dataclasses
import logging
import math
import secrets
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor

from gateway.config import NodeConfig
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

    async def server_ready(self, timeout_s: float) -> bool:
        try:
            resp = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.ready)
