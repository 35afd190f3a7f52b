"""The KServe v2 gRPC front: Triton's `GRPCInferenceService`, over mutual TLS, on the pipeline.

`tritonclient.grpc` and `tritonclient.grpc.aio` work unchanged (raw tensors, gzip/deflate
request compression, the bidirectional `ModelStreamInfer` of `start_stream`). Messages are
`tritonclient`'s own generated stubs; nothing here defines a message.

Every RPC runs the HTTP front's `Pipeline` object (`Gateway.pipeline`), not a copy:
identity from the verified peer certificate in the gRPC auth context (never metadata),
expiry and revocation on every RPC and on every message of a stream, admission,
pre-policy, then for inferences the protobuf decoded under the HTTP codec's limits and the
model's signature (`GrpcDecode`), nonce, policy, mode, rate, route, verify, receipt.

A `Problem` leaves as the status code Triton uses for that kind of error (`STATUS`), with
the problem's detail as the message and its `type`, the gateway's request id and the
rest in trailing metadata (`trailers`). On a stream, a refused message is answered in
the stream (Triton's `error_message`; the stream stays open) except an identity failure,
which ends the stream with UNAUTHENTICATED.

Size caps: `grpc.max_receive_message_length` is `limits.max_body_bytes`, and gRPC applies
it to the decompressed message, so a gzip bomb is refused by gRPC itself with
RESOURCE_EXHAUSTED before any of it reaches Python.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from cryptography import x509
from google.protobuf import json_format  # type: ignore[import-untyped]
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway import __version__
from gateway.app import EXTENSIONS, SERVER_NAME, Gateway
from gateway.config import Config
from gateway.forward.client import SITE_HEADER, SITE_WHY_HEADER, CoreForwarder, ask_core, eligible
from gateway.forward.site import FORWARDED_TO_CORE, one_request
from gateway.pipeline import Answer, Asked, Caller, DecodeStage, Incoming, body_of
from gateway.protocol.codec import (
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    OCTET_CONTENT_TYPE,
    decode_response,
)
from gateway.protocol.problems import (
    BadRequest,
    Internal,
    InvalidTensor,
    PayloadTooLarge,
    Problem,
    Unauthenticated,
    UnsupportedExtension,
)
from gateway.protocol.tensors import JsonScalar, Limits, Tensor, canonical_bytes, pack_bytes
from gateway.registry import ModelEntry
from gateway.server import ReloadingContext

log = logging.getLogger(__name__)

M = TypeVar("M")
Message = Any  # a generated protobuf message (tritonclient ships no type stubs)

# Triton's mapping of its error kinds to gRPC status codes, by the problem's HTTP status.
# 413: what gRPC itself answers for a message over the receive cap (RESOURCE_EXHAUSTED),
# so a client sees one code for "too large" whichever layer refused it.
STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,  # retryable, like Triton's UNAVAILABLE
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
NO_NODE = "no healthy node serves this model"  # the HTTP index's reason
PROBLEM_TYPE_KEY = "ztgate-problem-type"
REQUEST_ID_KEY = "ztgate-request-id"

# Extension RPCs the gateway does not offer, and why: the HTTP front's
# `unsupported-extension` problem, which leaves as UNIMPLEMENTED (as Triton answers for an
# extension it was built without).
_SHM = "{} shared memory: send tensors in raw_input_contents"
_CONTROL = "model control: the registry and the signed policy decide what is served"
NOT_OFFERED: dict[str, str] = {
    "ModelConfig": "model configuration: ModelMetadata gives the signature",
    "RepositoryModelLoad": _CONTROL,
    "RepositoryModelUnload": _CONTROL,
    "SystemSharedMemoryStatus": _SHM.format("system"),
    "SystemSharedMemoryRegister": _SHM.format("system"),
    "SystemSharedMemoryUnregister": _SHM.format("system"),
    "CudaSharedMemoryStatus": _SHM.format("CUDA"),
    "CudaSharedMemoryRegister": _SHM.format("CUDA"),
    "CudaSharedMemoryUnregister": _SHM.format("CUDA"),
    "TraceSetting": "trace settings (the operator's)",
    "LogSettings": "logging settings (the operator's)",
}

# The typed `contents` member that carries each datatype (KServe v2 gRPC); BYTES is packed
# into the raw form, FP16/BF16 have none.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# --- problems as gRPC statuses -----------------------------------------------------------
def status_of(problem: Problem) -> grpc.StatusCode:
    return STATUS.get(problem.status, grpc.StatusCode.INTERNAL)


def _ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


def trailers(problem: Problem) -> tuple[tuple[str, str], ...]:
    """The problem's type and ids as trailing metadata (ASCII values only), with its
    headers (Retry-After, a denial receipt's `ztgate-receipt`) lowercased."""
    md = [(PROBLEM_TYPE_KEY, problem.type)]
    for key in ("request_id", "decision_id"):
        value = problem.extra.get(key)
        if isinstance(value, str) and _ascii(value):
            md.append((f"ztgate-{key.replace('_', '-')}", value))
    modes = problem.extra.get("allowed_modes")
    if isinstance(modes, list):
        md.append(("ztgate-allowed-modes", ",".join(str(m) for m in modes)))
    md += [(k.lower(), v) for k, v in problem.headers.items() if _ascii(k) and _ascii(v)]
    return tuple(md)


# --- protobuf <-> the codec's values -------------------------------------------------------
def _params(params: Any) -> dict[str, JsonScalar]:
    """A `map<string, InferParameter>` as the codec's JSON parameters."""
    out: dict[str, JsonScalar] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is None:
            raise BadRequest(f"parameter '{key}' has no value")
        out[key] = getattr(p, which)
    return out


def set_parameter(param: Any, value: JsonScalar) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def codec_body(request: Message, max_json_bytes: int) -> tuple[bytes, int]:
    """A `ModelInferRequest` in the HTTP codec's binary form (JSON header, raw tensors), so
    it is decoded by the same code under the same limits as an HTTP request.

    Raw tensors are not parsed (one copy); typed `contents` become the header's JSON
    `data`, and are held to the JSON cap as an HTTP JSON body is."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidTensor(
            f"expected {len(request.inputs)} raw_input_contents (one per input), got {len(raw)}"
        )
    chunks: list[bytes] = []
    inputs = []
    for i, t in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = _params(t.parameters)
        if raw or t.datatype == "BYTES":
            if raw and t.HasField("contents"):
                raise InvalidTensor(
                    f"input '{t.name}': contents must be empty when raw_input_contents is used"
                )
            data = raw[i] if raw else pack_bytes(t.contents.bytes_contents)
            params["binary_data_size"] = len(data)
            chunks.append(data)
        else:
            member = _CONTENTS.get(t.datatype)
            entry["data"] = list(getattr(t.contents, member)) if member else []
        entry["parameters"] = params
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs, "parameters": _params(request.parameters)}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [
            {"name": o.name, "parameters": _params(o.parameters)} for o in request.outputs
        ]
    try:
        head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise InvalidTensor(
            "typed contents cannot hold NaN or Inf: use raw_input_contents"
        ) from None
    if len(head) > max_json_bytes:
        raise PayloadTooLarge(
            f"request header and typed contents of {len(head)} bytes exceed the cap of "
            f"{max_json_bytes}; send tensors in raw_input_contents"
        )
    return b"".join([head, *chunks]), len(head)


class GrpcDecode:
    """The decode stage for a `ModelInferRequest` gRPC has already parsed: the deadline
    (`ztgate-deadline-ms` metadata, and the RPC's own deadline, capped as the header is),
    the HTTP codec's limits, the model's signature."""

    def __init__(self, stage: DecodeStage, request: Message, remaining: float | None) -> None:
        self.stage = stage
        self.request = request
        self.remaining = remaining

    async def __call__(self, incoming: Incoming, caller: Caller, entry: ModelEntry) -> Asked:
        deadline, client_deadline = self.stage.deadline(incoming)
        if self.remaining is not None:
            rpc = incoming.started + min(self.remaining, self.stage.routing.max_deadline_s)
            deadline = min(deadline, rpc) if client_deadline else rpc
            client_deadline = True
        size = self.request.ByteSize()
        cap = self.stage.limits.max_body_bytes
        if size > cap:  # gRPC's receive cap already holds it; a smaller config must too
            raise PayloadTooLarge(f"request of {size} bytes exceeds the cap of {cap}")
        body, header_length = codec_body(self.request, self.stage.limits.max_json_bytes)
        request = await self.stage.parse(caller, entry, body, header_length)
        return Asked(incoming, caller, entry, request, size, deadline, client_deadline)


def infer_response(answer: Answer) -> Message:
    """The answer as a `ModelInferResponse`: raw output contents, and the same `ztgate.*`
    parameters as the HTTP answer (receipt id and summary, salt, verification)."""
    asked = answer.decided.asked
    return _response(
        asked.entry.name,
        asked.entry.version,
        asked.request.id or "",
        answer.parameters(),
        answer.outcome.outputs,
    )


def _response(
    name: str,
    version: str,
    request_id: str,
    parameters: Mapping[str, JsonScalar],
    outputs: Sequence[Tensor],
) -> Message:
    resp = service_pb2.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for key, value in parameters.items():
        set_parameter(resp.parameters[key], value)
    for t in outputs:
        out = resp.outputs.add()
        out.name, out.datatype = t.name, t.datatype
        out.shape.extend(t.shape)
        resp.raw_output_contents.append(canonical_bytes(t))
    return resp


# --- failing over to the core (an edge with `forward.core_url`) -------------------------------
SITE_WHY_PARAMETER = "ztgate.site_why"
SITE_PARAMETER = "ztgate.site"
_MAX_CORE_DETAIL = 1024
# A body this large is decoded off the event loop.
_OFFLOAD_ANSWER_BYTES = 256 * 1024


@dataclass(frozen=True)
class CoreRefusal:
    """The core's problem for a request the edge forwarded: a gRPC status and its
    trailing metadata, as the edge's own problems leave (`trailers`)."""

    code: grpc.StatusCode
    detail: str
    trailers: tuple[tuple[str, str], ...]
    problem_type: str
    request_id: str | None


def _site_metadata(core_site: str) -> tuple[tuple[str, str], ...]:
    return ((SITE_WHY_HEADER, FORWARDED_TO_CORE), (SITE_HEADER, core_site))


def _infer_path(name: str, version: str) -> str:
    quoted = urllib.parse.quote(name, safe="")
    if version:
        return f"/v2/models/{quoted}/versions/{urllib.parse.quote(version, safe='')}/infer"
    return f"/v2/models/{quoted}/infer"


_MAX_REFUSAL_BYTES = 64 * 1024


def core_refusal(status: int, body: bytes, core_site: str) -> CoreRefusal:
    """The core's problem+json as a gRPC status (the HTTP status decides the code, as
    for the edge's own problems); only its type, detail and ids are kept."""
    try:
        # A problem document is small; a larger body is no problem document (and is not
        # parsed on the event loop).
        doc = json.loads(body) if len(body) <= _MAX_REFUSAL_BYTES else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    ptype = doc.get("type")
    ptype = ptype if isinstance(ptype, str) and _ascii(ptype) else Internal.type
    detail = doc.get("detail")
    detail = detail[:_MAX_CORE_DETAIL] if isinstance(detail, str) else "the core refused"
    md = [(PROBLEM_TYPE_KEY, ptype)]
    request_id = doc.get("request_id")
    request_id = request_id if isinstance(request_id, str) and _ascii(request_id) else None
    if request_id is not None:
        md.append((REQUEST_ID_KEY, request_id))
    md += _site_metadata(core_site)
    return CoreRefusal(
        STATUS.get(status, grpc.StatusCode.INTERNAL),
        detail,
        tuple(md),
        ptype,
        request_id,
    )


async def core_response(body: bytes, headers: Mapping[str, str], core_site: str) -> Message:
    """The core's 200 inference answer (the HTTP codec's JSON or binary form) as a
    `ModelInferResponse`, read by the same codec under the answer cap, with the site's
    parameters added (a stream's message has no metadata of its own). Raises the codec's
    `Problem` when it does not parse."""
    raw_length = headers.get(HEADER_LENGTH.lower())
    length = int(raw_length) if raw_length is not None and raw_length.isdigit() else None
    limits = Limits(max_body_bytes=len(body) + 1)
    if len(body) > _OFFLOAD_ANSWER_BYTES:
        resp = await asyncio.to_thread(decode_response, body, length, limits)
    else:
        resp = decode_response(body, length, limits)
    params = {**resp.parameters, SITE_WHY_PARAMETER: FORWARDED_TO_CORE, SITE_PARAMETER: core_site}
    return _response(resp.model_name, resp.model_version or "", resp.id or "", params, resp.outputs)


# --- the client-CA CRL, per RPC --------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _issuer_serial(pem: str) -> tuple[str, int] | None:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None  # the identity stage refuses it, with its reason
    return cert.issuer.rfc4514_string(), cert.serial_number


class CrlCheck:
    """`tls.crl` on the gRPC front. Python gRPC takes no CRL at the handshake, so the
    certificates the CRL(s) revoke are refused on every RPC and stream message instead,
    before identity; the file is re-read when it changes (as the HTTP listener's context
    is). Only CRLs signed by a client CA count; a file that cannot be read keeps the last
    good set and logs loudly."""

    def __init__(self, crl: Path | None, client_ca: Path) -> None:
        self.path = crl
        self.client_ca = client_ca
        self._stamp: tuple[int, int] | None = None
        self._revoked: frozenset[tuple[str, int]] = frozenset()
        if crl is not None:
            self._load()  # a bad file at start is the operator's to fix now

    def revoked(self, scope: Mapping[str, Any]) -> bool:
        if self.path is None:
            return False
        chain = scope["extensions"]["tls"]["client_cert_chain"]
        key = _issuer_serial(chain[0]) if chain else None
        try:
            self._load()
        except (OSError, ValueError) as exc:
            log.error("gRPC front: tls.crl unreadable, keeping the previous one: %s", exc)
        return key in self._revoked

    def _load(self) -> None:
        assert self.path is not None
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        cas = {
            c.subject.rfc4514_string(): c
            for c in x509.load_pem_x509_certificates(self.client_ca.read_bytes())
        }
        revoked: set[tuple[str, int]] = set()
        end = b"-----END X509 CRL-----"
        for block in self.path.read_bytes().split(end)[:-1]:
            crl = x509.load_pem_x509_crl(block.strip() + b"\n" + end + b"\n")
            issuer = crl.issuer.rfc4514_string()
            ca = cas.get(issuer)
            if ca is None or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                log.error("gRPC front: ignoring a CRL not signed by a client CA (%s)", issuer)
                continue
            revoked |= {(issuer, r.serial_number) for r in crl}
        self._revoked = frozenset(revoked)
        self._stamp = stamp


# --- the service ---------------------------------------------------------------------------
def peer_scope(context: Any) -> dict[str, Any]:
    """An ASGI-like scope carrying the certificate gRPC verified in the handshake, where
    `IdentityResolver.resolve` reads it. Only the auth context: metadata never names a caller."""
    pem = context.auth_context().get("x509_pem_cert") or []
    chain = [pem[0].decode("ascii", "replace")] if pem else []
    return {"type": "grpc", "extensions": {"tls": {"client_cert_chain": chain}}}


def _metadata(context: Any) -> dict[str, str]:
    """Invocation metadata as the pipeline reads headers (lowercase keys; the first value)."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str) and not key.endswith("-bin"):
            out.setdefault(key.lower(), value)
    return out


async def _abort(context: Any, problem: Problem) -> NoReturn:
    await context.abort(status_of(problem), problem.detail, trailing_metadata=trailers(problem))
    raise AssertionError("abort returned")  # grpc.aio's abort always raises


def _not_offered(name: str, what: str) -> Callable[[Any, Message, Any], Awaitable[Message]]:
    async def rpc(self: GrpcFront, _request: Message, context: Any) -> Message:
        async def refuse(_: Caller) -> NoReturn:
            raise UnsupportedExtension(f"this gateway does not offer {what}")

        return await self.call(context, name, refuse)

    rpc.__name__ = name
    return rpc


class GrpcFront(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, gw: Gateway, crl: CrlCheck | None = None) -> None:
        self.gw = gw
        self.crl = crl or CrlCheck(None, gw.cfg.tls.client_ca)

    def incoming(self, context: Any, model: str | None = None, version: str = "") -> Incoming:
        scope = peer_scope(context)
        if self.crl.revoked(scope):
            # Where the HTTP listener refuses the handshake: before identity, no caller.
            raise Unauthenticated("client certificate has been revoked (tls.crl)")
        return Incoming(
            scope=scope,
            headers=_metadata(context),
            body=body_of(b""),  # already parsed: GrpcDecode reads the message
            model=model,
            version=version or None,
        )

    def _count(self, rpc: str, code: grpc.StatusCode) -> None:
        self.gw.metrics.requests.labels(f"grpc:{rpc}", code.name).inc()

    async def call(
        self,
        context: Any,
        rpc: str,
        handler: Callable[[Caller], Awaitable[M]],
        model: str | None = None,
        version: str = "",
    ) -> M:
        """Identity and admission, then `handler`; a problem leaves as a gRPC status."""
        self.gw.metrics.app_calls += 1
        try:
            came = self.incoming(context, model, version)
            result = await self.gw.pipeline.authenticated(came, handler)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, self.problem(rpc, exc))
        self._count(rpc, grpc.StatusCode.OK)
        return result

    def problem(self, rpc: str, exc: Exception) -> Problem:
        """What an exception leaves as, counted: itself if a `Problem`, else a bug (logged
        here, `internal` to the client)."""
        if not isinstance(exc, Problem):
            log.error("bug in gRPC %s", rpc, exc_info=exc)
            exc = Internal()
        self._count(rpc, status_of(exc))
        return exc

    # -- health and metadata --------------------------------------------------------
    async def ServerLive(self, request: Message, context: Any) -> Message:
        async def live(_: Caller) -> Message:
            return service_pb2.ServerLiveResponse(live=True)

        return await self.call(context, "ServerLive", live)

    async def ServerReady(self, request: Message, context: Any) -> Message:
        async def ready(_: Caller) -> Message:
            return service_pb2.ServerReadyResponse(ready=self.gw.ready())

        return await self.call(context, "ServerReady", ready)

    async def ModelReady(self, request: Message, context: Any) -> Message:
        async def ready(caller: Caller) -> Message:
            # Triton answers ready=false for a model it does not have; a model the caller
            # may not view (Cedar `view`, as on the HTTP front) is one it does not have.
            versions = self.gw.models.get(request.name, {})
            known = request.version in versions if request.version else bool(versions)
            ok = known and self.gw.visible(caller, request.name)
            return service_pb2.ModelReadyResponse(
                ready=ok and bool(self.gw.router.candidates(request.name))
            )

        return await self.call(context, "ModelReady", ready, request.name, request.version)

    async def ServerMetadata(self, request: Message, context: Any) -> Message:
        async def meta(_: Caller) -> Message:
            return service_pb2.ServerMetadataResponse(
                name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
            )

        return await self.call(context, "ServerMetadata", meta)

    async def ModelMetadata(self, request: Message, context: Any) -> Message:
        async def meta(caller: Caller) -> Message:
            entry = self.gw.seen(caller, request.name, request.version or None)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=entry.name,
                versions=sorted(self.gw.models[entry.name], key=int),
                platform="ztgate",
                inputs=[
                    tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in entry.inputs
                ],
                outputs=[
                    tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in entry.outputs
                ],
            )

        return await self.call(context, "ModelMetadata", meta, request.name, request.version)

    async def ModelStatistics(self, request: Message, context: Any) -> Message:
        async def stats(caller: Caller) -> Message:
            # As the HTTP front's /stats: every version of a named model, or one.
            name, version = request.name, request.version
            if not name:
                entries = self.gw.visible_entries(caller)
            elif version:
                entries = [self.gw.seen(caller, name, version)]
            else:
                self.gw.seen(caller, name)
                entries = [self.gw.models[name][v] for v in sorted(self.gw.models[name], key=int)]
            doc = self.gw.stats.model_stats(entries)
            return json_format.ParseDict(
                doc, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True
            )

        return await self.call(context, "ModelStatistics", stats, request.name or None)

    async def RepositoryIndex(self, request: Message, context: Any) -> Message:
        async def index(caller: Caller) -> Message:
            index = service_pb2.RepositoryIndexResponse.ModelIndex
            out = []
            for e in self.gw.visible_entries(caller):
                up = bool(self.gw.router.candidates(e.name))
                if request.ready and not up:
                    continue
                state, reason = ("READY", "") if up else ("UNAVAILABLE", NO_NODE)
                out.append(index(name=e.name, version=e.version, state=state, reason=reason))
            return service_pb2.RepositoryIndexResponse(models=out)

        return await self.call(context, "RepositoryIndex", index)

    # -- inference ------------------------------------------------------------------
    async def _infer(self, request: Message, context: Any) -> Message:
        """One inference through the whole pipeline; raises the `Problem`."""
        self.gw.metrics.app_calls += 1
        came = self.incoming(context, request.model_name, request.model_version)
        decode = GrpcDecode(self.gw.pipeline.decode, request, context.time_remaining())

        def respond(answer: Answer) -> Message:
            resp = infer_response(answer)
            asked = answer.decided.asked
            self.gw.metrics.latency.labels(asked.entry.name, answer.outcome.mode).observe(
                time.monotonic() - asked.incoming.started
            )
            return resp

        with one_request():  # a stream's messages share a task (gateway/forward/site.py)
            return await self.gw.pipeline.infer(came, respond, decode)

    async def _from_core(
        self, request: Message, context: Any, exc: Exception
    ) -> tuple[Message | CoreRefusal, str] | None:
        """At an edge, the core's answer (or refusal) to an inference the edge's own nodes
        could not serve, and the core's site; None: the edge's own problem stands. The
        rule is the HTTP front's (gateway/forward/client.py): only after the edge's policy
        allowed it (the problem names its decision). The body forwarded is the one the
        edge decoded and decided on (`codec_body`), so gRPC's own compression is no bar;
        the statement binds the client's certificate from the gRPC auth context."""
        forwarder = getattr(self.gw, "forwarder", None)
        if not isinstance(forwarder, CoreForwarder) or not isinstance(exc, Problem):
            return None
        chain = peer_scope(context)["extensions"]["tls"]["client_cert_chain"]
        if not chain or not eligible(exc.to_dict()):
            return None
        try:
            body, header_length = codec_body(request, self.gw.cfg.limits.max_json_bytes)
        except Problem:
            return None
        binary = header_length < len(body)
        answer = await ask_core(
            forwarder,
            client_cert=chain[0],
            path=_infer_path(request.model_name, request.model_version),
            model=request.model_name,
            version=request.model_version,
            body=body,
            content_type=OCTET_CONTENT_TYPE if binary else JSON_CONTENT_TYPE,
            extra={HEADER_LENGTH.lower(): str(header_length)} if binary else None,
            within_s=context.time_remaining(),
        )
        if answer is None:
            return None
        site = forwarder.core_site
        if answer.status != 200:
            return core_refusal(answer.status, answer.body, site), site
        try:
            return await core_response(answer.body, answer.headers, site), site
        except Exception as bad:  # a Problem or any other: the core's answer is unusable
            log.warning("gRPC: the core's answer did not parse: %s", type(bad).__name__)
            return None

    async def ModelInfer(self, request: Message, context: Any) -> Message:
        forwarded: tuple[tuple[str, str], ...] = ()
        try:
            resp = await self._infer(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            core = await self._from_core(request, context, exc)
            if core is None:
                await _abort(context, self.problem("ModelInfer", exc))
            resp, site = core
            if isinstance(resp, CoreRefusal):
                self._count("ModelInfer", resp.code)
                await context.abort(resp.code, resp.detail, trailing_metadata=resp.trailers)
            forwarded = _site_metadata(site)
        self._count("ModelInfer", grpc.StatusCode.OK)
        context.set_trailing_metadata(
            ((REQUEST_ID_KEY, resp.parameters["ztgate.request_id"].string_param), *forwarded)
        )
        return resp

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Message], context: Any
    ) -> AsyncIterator[Message]:
        """Each message through the whole pipeline (identity, expiry and revocation
        included), in order, one at a time. A refused message is answered in the stream
        with Triton's `error_message` (and the problem's type and request id as response
        parameters); an identity failure ends the stream with UNAUTHENTICATED."""
        async for request in request_iterator:
            try:
                resp = await self._infer(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                core = await self._from_core(request, context, exc)
                if core is not None:  # per message, as a unary call (site as parameters)
                    resp, site = core
                    if isinstance(resp, CoreRefusal):
                        self._count("ModelStreamInfer", resp.code)
                        yield core_stream_error(request, resp, site)
                        continue
                else:
                    problem = self.problem("ModelStreamInfer", exc)
                    if isinstance(problem, Unauthenticated):
                        await _abort(context, problem)
                    yield stream_error(request, problem)
                    continue
            self._count("ModelStreamInfer", grpc.StatusCode.OK)
            yield service_pb2.ModelStreamInferResponse(infer_response=resp)


for _name, _why in NOT_OFFERED.items():
    setattr(GrpcFront, _name, _not_offered(_name, _why))


def stream_error(request: Message, problem: Problem) -> Message:
    resp = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    set_parameter(resp.parameters["ztgate.problem_type"], problem.type)
    request_id = problem.extra.get("request_id")
    if isinstance(request_id, str):
        set_parameter(resp.parameters["ztgate.request_id"], request_id)
    return service_pb2.ModelStreamInferResponse(error_message=problem.detail, infer_response=resp)


def core_stream_error(request: Message, refusal: CoreRefusal, core_site: str) -> Message:
    """The core's refusal of a stream message, answered in the stream as `stream_error`
    answers the edge's own, with the site's parameters."""
    resp = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    params: dict[str, JsonScalar] = {
        "ztgate.problem_type": refusal.problem_type,
        SITE_WHY_PARAMETER: FORWARDED_TO_CORE,
        SITE_PARAMETER: core_site,
    }
    if refusal.request_id is not None:
        params["ztgate.request_id"] = refusal.request_id
    for key, value in params.items():
        set_parameter(resp.parameters[key], value)
    return service_pb2.ModelStreamInferResponse(error_message=refusal.detail, infer_response=resp)


# --- the server ----------------------------------------------------------------------------
def server_credentials(tls: ReloadingContext) -> grpc.ServerCredentials:
    """The API listener's certificate and client CA, client certificates required. New
    handshakes pick up the files whenever the HTTP listener's context reloaded them (the
    same watch, the same validation); open channels keep theirs.

    Python gRPC offers neither TLS 1.3 only nor turning session tickets off, so a client
    may resume a session made before it was revoked: identity, expiry and revocation are
    checked on every RPC and every stream message instead (SECURITY.md). Nor does it take
    a CRL: `tls.crl` is honoured at the HTTP handshake only."""
    files = tls.files

    def configuration() -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(files.key.read_bytes(), files.cert.read_bytes())],
            root_certificates=files.client_ca.read_bytes(),
        )

    seen = [tls.reloads]

    def fetch() -> Any:
        if tls.reloads == seen[0]:
            return None
        seen[0] = tls.reloads
        try:
            return configuration()
        except OSError as exc:
            log.error("gRPC front keeps its previous certificates: %s", exc)
            return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=True
    )


def server_options(cfg: Config) -> Sequence[tuple[str, int]]:
    limits = cfg.limits
    return (
        # Applied by gRPC to the decompressed message: a gzip bomb stops at the cap.
        ("grpc.max_receive_message_length", limits.max_body_bytes),
        ("grpc.max_send_message_length", limits.max_output_bytes + 1024 * 1024),
        # The HTTP listener's timeouts: a handshake, and a connection with nothing to do.
        ("grpc.server_handshake_timeout_ms", int(limits.header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
        # Off for one process, so a port another process holds fails the start; on for a
        # replica's workers (gateway/supervisor.py), which bind one port together.
        ("grpc.so_reuseport", 1 if cfg.listen.workers > 1 else 0),
    )


class _GenericOnly:
    """What `add_GRPCInferenceServiceServicer_to_server` needs of a server, taking its
    generic handler only (see `add_service`)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers([_Undecodable(h) for h in handlers])

    def add_registered_method_handlers(self, _service: str, _handlers: Any) -> None:
        pass  # the generic handler serves the same methods


_UNPARSED = object()  # a unary request whose bytes are not the method's message


class _Undecodable(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Unary methods refuse a message that does not parse as INVALID_ARGUMENT (a
    bad-request problem in the trailers), like any other bad request. Without this,
    grpc.aio answers a deserializer's DecodeError with UNKNOWN, the gRPC 500. Handlers
    are wrapped once per method (the service's fixed set), not per call."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        done = self._wrapped.get(method)
        if done is not None:
            return done
        h = self.inner.service(details)
        if h is None or h.request_streaming or h.response_streaming or h.unary_unary is None:
            return h
        behavior, parse = h.unary_unary, h.request_deserializer

        def lenient(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception:  # protobuf's DecodeError (and nothing this code raises)
                return _UNPARSED

        async def call(request: Any, context: Any) -> Any:
            if request is _UNPARSED:
                await _abort(
                    context, BadRequest("the request is not a valid message for this method")
                )
            return await behavior(request, context)

        wrapped = grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=lenient, response_serializer=h.response_serializer
        )
        self._wrapped[method] = wrapped
        return wrapped


def add_service(front: GrpcFront, server: grpc.aio.Server) -> None:
    """The service on `server` through its generic handler only.

    The generated `add_..._to_server` also registers each of the service's 20 methods,
    and grpc.aio then keeps one pending accept per registered method: its accept loop
    awaits `asyncio.wait` over all 21 on every incoming RPC (callbacks added to and
    removed from each), on the event loop that runs the pipeline. With the generic
    handler alone it waits on one; the same handlers serve the same methods (an unknown
    one is still UNIMPLEMENTED)."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(front, _GenericOnly(server))


class GrpcServer:
    """The gRPC front as a background job of the gateway: it starts with the API's
    lifespan and stops (draining in-flight RPCs for `listen.graceful_shutdown_s`) before
    the pipeline's resources close."""

    def __init__(self, cfg: Config, gw: Gateway, tls: ReloadingContext) -> None:
        self.cfg = cfg
        self.gw = gw
        self.tls = tls
        self.port: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        listen = self.cfg.listen
        assert listen.grpc_port is not None
        server = grpc.aio.server(options=server_options(self.cfg))
        front = GrpcFront(self.gw, CrlCheck(self.cfg.tls.crl, self.cfg.tls.client_ca))
        add_service(front, server)
        host = f"[{listen.host}]" if ":" in listen.host else listen.host
        self.port = server.add_secure_port(
            f"{host}:{listen.grpc_port}", server_credentials(self.tls)
        )
        await server.start()
        log.info("gRPC front listening on %s:%s", listen.host, self.port)
        try:
            await stop.wait()
        finally:
            await server.stop(listen.graceful_shutdown_s)
