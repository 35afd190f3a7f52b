"""Wire format of the gateway: KServe v2 / Open Inference Protocol messages.

- :mod:`.tensors`: validated tensor and request/response value types, the
  datatype table and canonical tensor bytes (what commitments hash).
- :mod:`.codec`: JSON + Triton binary-tensor-extension encode/decode, byte-for-
  byte compatible with ``tritonclient.http``.
- :mod:`.problems`: RFC 9457 problem+json errors.

No I/O and no policy here: bytes in, values out (and back).
"""

from gateway.protocol.codec import (
    HEADER_LENGTH,
    binary_outputs,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from gateway.protocol.problems import (
    PROBLEM_TYPES,
    BadRequest,
    DeadlineExceeded,
    Forbidden,
    Internal,
    InvalidTensor,
    MethodNotAllowed,
    NoHealthyNode,
    NotFound,
    PayloadTooLarge,
    Problem,
    RateLimited,
    Unauthenticated,
    UnknownModel,
    UnknownVersion,
    UnsupportedMediaType,
    UpstreamFailed,
    problem_response,
)
from gateway.protocol.tensors import (
    DATATYPES,
    InferRequest,
    InferResponse,
    Limits,
    RequestedOutput,
    Tensor,
    canonical_bytes,
)

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "PROBLEM_TYPES",
    "BadRequest",
    "DeadlineExceeded",
    "Forbidden",
    "InferRequest",
    "InferResponse",
    "Internal",
    "InvalidTensor",
    "Limits",
    "MethodNotAllowed",
    "NoHealthyNode",
    "NotFound",
    "PayloadTooLarge",
    "Problem",
    "RateLimited",
    "RequestedOutput",
    "Tensor",
    "Unauthenticated",
    "UnknownModel",
    "UnknownVersion",
    "UnsupportedMediaType",
    "UpstreamFailed",
    "binary_outputs",
    "canonical_bytes",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "problem_response",
]
