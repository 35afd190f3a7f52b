"""Wire format: KServe v2 codec against the real tritonclient, problem+json."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.http as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.pki import PKI
from gateway.protocol import (
    DATATYPES,
    PROBLEM_TYPES,
    BadRequest,
    InferRequest,
    InferResponse,
    Internal,
    InvalidTensor,
    Limits,
    NoHealthyNode,
    PayloadTooLarge,
    Problem,
    RateLimited,
    RequestedOutput,
    Tensor,
    UnknownModel,
    binary_outputs,
    canonical_bytes,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    problem_response,
)
from gateway.protocol.codec import HEADER_LENGTH
from gateway.protocol.problems import PROBLEM_BASE, ProblemInfo
from tests.gateway_harness import RunningGateway, gateway_config, running_gateway

Client = th.InferenceServerClient
RNG = np.random.default_rng(0)
NUMERIC = [d for d in DATATYPES if d != "BYTES"]


def sample(datatype: str, shape: tuple[int, ...], *, utf8: bool = True) -> np.ndarray:
    """A deterministic array of ``datatype`` that exercises the dtype's range."""
    n = int(np.prod(shape))
    if datatype == "BYTES":
        items = [f"é{i}".encode() if utf8 else bytes([255, i % 256, 0]) for i in range(n)]
        arr = np.empty(n, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = DATATYPES[datatype].dtype
    if dt.kind == "b":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        flat = RNG.integers(info.min, info.max, size=n, dtype=dt, endpoint=True)
        flat[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
        return flat.reshape(shape)
    return (RNG.standard_normal(shape) * 1e3).astype(dt)


def triton_body(
    arrays: dict[str, np.ndarray], binary: bool, outputs: list[Any] | None = None
) -> tuple[bytes, int | None]:
    inputs = []
    for name, arr in arrays.items():
        datatype = "BYTES" if arr.dtype == object else th.np_to_triton_dtype(arr.dtype)
        inp = th.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    body, json_size = Client.generate_request_body(inputs, outputs=outputs, request_id="r-1")
    return body, json_size


def triton_parse(body: bytes, headers: dict[str, str]) -> Any:
    return Client.parse_response_body(
        body, verbose=False, header_length=headers.get(HEADER_LENGTH), content_encoding=None
    )


# ------------------------------------------------------------- tritonclient requests


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_decode_tritonclient_request(datatype: str, binary: bool) -> None:
    arr = sample(datatype, (2, 3))
    body, json_size = triton_body({"x": arr, "y": sample(datatype, (4,))}, binary)
    if datatype == "FP16" and not binary:
        with pytest.raises(InvalidTensor, match="binary data format"):
            decode_request(body, json_size, "m", None)
        return
    req = decode_request(body, json_size, "m", "1")
    assert (req.model, req.version, req.id) == ("m", "1", "r-1")
    x = req.inputs[0]
    assert (x.name, x.datatype, x.shape) == ("x", datatype, (2, 3))
    assert x.data.dtype == DATATYPES[datatype].dtype
    assert np.array_equal(x.data, arr)
    assert not x.data.flags.writeable
    # tritonclient asks for binary outputs when none are listed.
    assert req.outputs == () and binary_outputs(req) is True


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
def test_canonical_bytes_same_for_json_and_binary(datatype: str) -> None:
    arr = sample(datatype, (3, 5))
    decoded = [decode_request(*triton_body({"x": arr}, b), "m", None).inputs[0] for b in (1, 0)]
    assert canonical_bytes(decoded[0]) == canonical_bytes(decoded[1])
    assert decoded[0] == decoded[1]
    if datatype != "BYTES":
        assert canonical_bytes(decoded[0]) == arr.astype(DATATYPES[datatype].dtype).tobytes()


def test_canonical_bytes_layout() -> None:
    t = Tensor("b", "BYTES", (2,), np.array([b"ab", b""], dtype=object))
    assert canonical_bytes(t) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    t = Tensor("i", "INT32", (3, 2), big_endian.T)  # non-contiguous and big-endian
    assert canonical_bytes(t) == np.ascontiguousarray(big_endian.T, dtype="<i4").tobytes()


def test_requested_outputs_and_flags() -> None:
    outputs = [th.InferRequestedOutput("a", binary_data=True), th.InferRequestedOutput("b", False)]
    body, n = triton_body({"x": sample("FP32", (1,))}, True, outputs)
    req = decode_request(body, n, "m", None)
    assert req.outputs == (RequestedOutput("a", True), RequestedOutput("b", False))
    assert binary_outputs(req) == {"a"}
    doc = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}
    doc["parameters"] = {"binary_data_output": True, "priority": 2}
    doc["outputs"] = [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}]
    req = decode_request(json.dumps(doc).encode(), None, "m", None)
    assert binary_outputs(req) == {"a"}  # the request default, overridden per output
    assert req.parameters == {"binary_data_output": True, "priority": 2}


def test_nested_json_data_is_flattened_row_major() -> None:
    doc = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3.5, 4]]}]
    }
    (x,) = decode_request(json.dumps(doc).encode(), None, "m", None).inputs
    assert x.data.tolist() == [[1, 2], [3.5, 4]]


# ------------------------------------------------------------ tritonclient responses


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_parses_our_response(datatype: str, binary: bool) -> None:
    a, b = sample(datatype, (2, 3)), sample(datatype, (0, 2))
    resp = InferResponse(
        "m", "1", "r-1", (Tensor("a", datatype, a.shape, a), Tensor("b", datatype, b.shape, b))
    )
    body, headers = encode_response(resp, binary)
    # FP16 cannot be JSON, so it always travels binary (Triton refuses it as JSON).
    assert (HEADER_LENGTH in headers) == (binary or datatype == "FP16")
    assert headers["Content-Type"] == (
        "application/octet-stream" if HEADER_LENGTH in headers else "application/json"
    )
    result = triton_parse(body, headers)
    assert result.get_response()["model_name"] == "m"
    assert result.get_response()["id"] == "r-1"
    for name, expected in (("a", a), ("b", b)):
        got = result.as_numpy(name)
        assert got.shape == expected.shape
        if datatype == "BYTES" and not binary:  # tritonclient yields str from JSON
            expected = np.vectorize(lambda v: v.decode(), otypes=[object])(expected)
        assert np.array_equal(got, expected)
    assert decode_response(body, _hl(headers)) == resp


def _hl(headers: dict[str, str]) -> int | None:
    return int(headers[HEADER_LENGTH]) if HEADER_LENGTH in headers else None


def test_response_json_format_matches_triton() -> None:
    t = Tensor("y", "INT32", (2, 2), np.arange(4, dtype=np.int32).reshape(2, 2))
    body, headers = encode_response(InferResponse("m", "1", None, (t,)), False)
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "outputs": [{"name": "y", "datatype": "INT32", "shape": [2, 2], "data": [0, 1, 2, 3]}],
    }
    body, headers = encode_response(InferResponse("m", "1", None, (t,)), {"y"})
    n = int(headers[HEADER_LENGTH])
    assert json.loads(body[:n])["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert body[n:] == t.data.tobytes()


def test_unrepresentable_json_outputs_fall_back_to_binary() -> None:
    raw = np.array([b"\xff\xfe", b"ok"], dtype=object)
    nan = np.array([np.nan, 1.0], dtype=np.float32)
    resp = InferResponse(
        "m", None, None, (Tensor("s", "BYTES", (2,), raw), Tensor("f", "FP32", (2,), nan))
    )
    body, headers = encode_response(resp, False)
    result = triton_parse(body, headers)
    assert result.as_numpy("s").tolist() == [b"\xff\xfe", b"ok"]
    assert np.array_equal(result.as_numpy("f"), nan, equal_nan=True)


def test_encode_request_is_tritonclient_compatible() -> None:
    for binary in (True, False):
        # tritonclient would send FP16 as JSON, which Triton (and we) refuse.
        arrays = {d.lower(): sample(d, (2, 2)) for d in DATATYPES if binary or d != "FP16"}
        theirs = decode_request(*triton_body(arrays, binary), "m", None)
        req = InferRequest("m", None, "r-1", theirs.inputs, (), {"binary_data_output": True})
        body, headers = encode_request(req, binary)
        assert decode_request(body, _hl(headers), "m", None) == theirs


# --------------------------------------------------------------------- rejections


def _doc(**tensor: Any) -> dict[str, Any]:
    base = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    base.update(tensor)
    return {"inputs": [{k: v for k, v in base.items() if v is not ...}]}


BAD: list[tuple[str, Any, type[Problem], str]] = [
    ("not json", b"{", BadRequest, "invalid JSON"),
    ("not utf-8", b'{"a":"\xff"}', BadRequest, "UTF-8"),
    ("array body", b"[]", BadRequest, "JSON object"),
    (
        "NaN",
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[NaN]}]}',
        BadRequest,
        "NaN",
    ),
    ("dup key", b'{"inputs":[],"inputs":[]}', BadRequest, "duplicate key"),
    ("deep", b'{"x":' + b"[" * 100 + b"]" * 100 + b"}", BadRequest, "nesting"),
    ("very deep", b"[" * 100_000 + b"]" * 100_000, BadRequest, "nesting"),
    ("no inputs", {}, BadRequest, "'inputs'"),
    ("empty inputs", {"inputs": []}, BadRequest, "'inputs'"),
    ("input not obj", {"inputs": [1]}, BadRequest, r"inputs\[0\]"),
    ("no name", _doc(name=...), BadRequest, "'name'"),
    ("dup inputs", {"inputs": _doc()["inputs"] * 2}, InvalidTensor, "duplicate input"),
    ("bf16", _doc(datatype="BF16"), InvalidTensor, "BF16 is not supported"),
    ("bad dtype", _doc(datatype="FLOAT"), InvalidTensor, "unsupported datatype"),
    ("neg dim", _doc(shape=[-1]), InvalidTensor, "non-negative"),
    ("float dim", _doc(shape=[2.0]), InvalidTensor, "non-negative integers"),
    ("bool dim", _doc(shape=[True, 2]), InvalidTensor, "non-negative integers"),
    ("count", _doc(shape=[3]), InvalidTensor, "2 elements but shape needs 3"),
    ("ragged", _doc(data=[[1.0], 2.0]), InvalidTensor, "mixes"),
    ("str in fp32", _doc(data=["1", 2]), InvalidTensor, "numbers, got int, str"),
    ("float in int", _doc(datatype="INT32", data=[1, 2.5]), InvalidTensor, "integers"),
    ("bool in int", _doc(datatype="INT8", data=[1, True]), InvalidTensor, "integers, got bool"),
    ("int in bool", _doc(datatype="BOOL", data=[1, 0]), InvalidTensor, "booleans"),
    ("int range", _doc(datatype="UINT8", data=[1, 256]), InvalidTensor, "256 is out of range"),
    ("neg uint", _doc(datatype="UINT64", data=[-1, 0]), InvalidTensor, "out of range"),
    ("int64 range", _doc(datatype="INT64", data=[2**63, 0]), InvalidTensor, "out of range"),
    ("fp32 overflow", _doc(data=[1e39, 0]), InvalidTensor, "out of range"),
    ("huge int", _doc(data=[10**400, 0]), InvalidTensor, "cannot be converted"),
    ("bytes not str", _doc(datatype="BYTES", data=[1, 2]), InvalidTensor, "strings"),
    (
        "surrogate",
        b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}',
        InvalidTensor,
        "Unicode",
    ),
    ("fp16 json", _doc(datatype="FP16"), InvalidTensor, "binary data format"),
    ("no data", _doc(data=...), InvalidTensor, "exactly one"),
    ("data+binary", _doc(parameters={"binary_data_size": 8}), InvalidTensor, "exactly one"),
    (
        "bad size",
        _doc(data=..., parameters={"binary_data_size": -1}),
        BadRequest,
        "binary_data_size",
    ),
    ("no binary", _doc(data=..., parameters={"binary_data_size": 8}), InvalidTensor, "only 0"),
    ("shm", _doc(data=..., parameters={"shared_memory_region": "r"}), BadRequest, "shared memory"),
    ("nested param", {"parameters": {"a": [1]}, **_doc()}, BadRequest, "parameter 'a'"),
    ("inf param", b'{"parameters":{"a":1e999},"inputs":[]}', BadRequest, "parameter 'a'"),
    ("bad flag", {"parameters": {"binary_data_output": 1}, **_doc()}, BadRequest, "boolean"),
    ("bad id", {"id": 5, **_doc()}, BadRequest, "'id'"),
    (
        "classification",
        {"outputs": [{"name": "y", "parameters": {"classification": 3}}], **_doc()},
        BadRequest,
        "classification",
    ),
    (
        "dup outputs",
        {"outputs": [{"name": "y"}, {"name": "y"}], **_doc()},
        InvalidTensor,
        "duplicate output",
    ),
    ("too many elems", _doc(shape=[1 << 30]), PayloadTooLarge, "limit"),
    ("big zero dim", _doc(shape=[0, 1 << 60], data=[]), PayloadTooLarge, "limit"),
    ("rank", _doc(shape=[1] * 40, data=[1]), InvalidTensor, "at most 32"),
    (
        "too many inputs",
        {"inputs": [_doc(name=f"i{i}")["inputs"][0] for i in range(65)]},
        PayloadTooLarge,
        "65 inputs",
    ),
]


@pytest.mark.parametrize(("case", "body", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_rejections(case: str, body: Any, exc: type[Problem], match: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(exc, match=match) as info:
        decode_request(raw, None, "m", None)
    assert type(info.value) is exc  # not a more generic or more specific class


def _binary(arr: np.ndarray, size: int | None = None, extra: bytes = b"") -> tuple[bytes, int]:
    """A one-input binary request body, optionally with a forged binary_data_size."""
    datatype = "BYTES" if arr.dtype == object else th.np_to_triton_dtype(arr.dtype)
    req = InferRequest("m", None, None, (Tensor("x", datatype, arr.shape, arr),))
    raw, headers = encode_request(req)
    n = int(headers[HEADER_LENGTH])
    head = json.loads(raw[:n])
    if size is not None:
        head["inputs"][0]["parameters"]["binary_data_size"] = size
    js = json.dumps(head).encode()
    return js + raw[n:] + extra, len(js)


@pytest.mark.parametrize(
    ("body", "exc", "match"),
    [
        (_binary(np.zeros(3, np.float32), size=8), InvalidTensor, "need 12"),
        (_binary(np.zeros(3, np.float32), extra=b"x"), InvalidTensor, "1 bytes of binary data"),
        (_binary(np.zeros(3, np.float32), size=16), InvalidTensor, "only 12"),
        (_binary(np.array([b"ab"], dtype=object), size=5), InvalidTensor, "runs past"),
        (_binary(np.array([b"ab"], dtype=object), size=2), InvalidTensor, "ends after 0 of 1"),
        (
            _binary(np.array([b"ab", b"c"], dtype=object), size=15, extra=b"\0" * 4),
            InvalidTensor,
            "4 bytes left over after 2 BYTES elements",
        ),
    ],
)
def test_binary_rejections(body: tuple[bytes, int], exc: type[Problem], match: str) -> None:
    with pytest.raises(exc, match=match):
        decode_request(body[0], body[1], "m", None)


def test_bool_binary_must_be_0_or_1() -> None:
    raw, n = _binary(np.array([True, False]))
    with pytest.raises(InvalidTensor, match="0x00 or 0x01"):
        decode_request(raw[:n] + b"\x02\x00", n, "m", None)


def test_header_length_and_body_limits() -> None:
    body = json.dumps(_doc()).encode()
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        decode_request(body, len(body) + 1, "m", None)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        decode_request(body, -1, "m", None)
    with pytest.raises(PayloadTooLarge):
        decode_request(body, None, "m", None, Limits(max_body_bytes=10))
    with pytest.raises(BadRequest, match="nested deeper"):
        deep = _doc(shape=[1, 1, 1, 1], data=[[[[1.0]]]])
        decode_request(json.dumps(deep).encode(), None, "m", None, Limits(max_json_depth=6))
    decode_request(
        json.dumps(_doc(shape=[1, 1], data=[[1.0]])).encode(),
        None,
        "m",
        None,
        Limits(max_json_depth=6),
    )


def test_unknown_members_are_ignored_but_depth_bounded() -> None:
    doc = {"extension": {"a": [1, {"b": 2}]}, **_doc()}
    assert decode_request(json.dumps(doc).encode(), None, "m", None).inputs[0].name == "x"
    doc = {"extension": [[[[[[[[[[]]]]]]]]]], **_doc()}
    with pytest.raises(BadRequest, match="nesting deeper"):
        decode_request(json.dumps(doc).encode(), None, "m", None, Limits(max_json_depth=8))


# ------------------------------------------------------------------- properties


@st.composite
def tensors(draw: st.DrawFn, name: str) -> Tensor:
    datatype = draw(st.sampled_from(sorted(DATATYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        items = draw(
            st.lists(
                st.binary(max_size=8), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
            )
        )
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        arr = arr.reshape(shape)
    else:
        arr = draw(hnp.arrays(DATATYPES[datatype].dtype, shape))
    return Tensor(name, datatype, tuple(shape), arr)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 1), min_size=1, max_size=3).flatmap(
        lambda bits: st.tuples(
            st.tuples(*[tensors(f"t{i}") for i in range(len(bits))]), st.just(bits)
        )
    )
)
def test_roundtrip_property(case: tuple[tuple[Tensor, ...], list[int]]) -> None:
    inputs, bits = case
    binary = {t.name for t, b in zip(inputs, bits, strict=True) if b}
    req = InferRequest("m", "2", "id", inputs, (RequestedOutput("o", True),), {"k": 1})
    body, headers = encode_request(req, binary)
    assert decode_request(body, _hl(headers), "m", "2") == req
    resp = InferResponse("m", "2", "id", inputs)
    body, headers = encode_response(resp, binary)
    assert decode_response(body, _hl(headers)) == resp
    result = triton_parse(body, headers)
    for t in inputs:
        got = result.as_numpy(t.name)
        assert got.shape == t.shape
        if t.datatype != "BYTES":
            assert got.tobytes() == t.data.tobytes()
        else:  # tritonclient returns str for JSON BYTES, bytes for binary
            assert [v.encode() if isinstance(v, str) else v for v in got.flat] == list(t.data.flat)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


def _mutate(doc: Any, path: list[int], value: Any) -> Any:
    """Replace the node reached by following ``path`` (indices mod size) with ``value``."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    doc[key] = _mutate(doc[key], path[1:], value)
    return doc


# What decoding may refuse with: client errors of stable, documented types, never a crash.
DECODE_PROBLEMS = {BadRequest: 400, InvalidTensor: 400, PayloadTooLarge: 413}
T = TypeVar("T")


def decoded_or_refused(decode: Callable[[], T]) -> T | None:
    """``decode()``'s result, or None when it refused with one of DECODE_PROBLEMS.

    Anything else (another exception, another Problem, a Problem that cannot be rendered)
    fails the test.
    """
    try:
        return decode()
    except Problem as exc:
        assert type(exc) in DECODE_PROBLEMS, repr(exc)
        assert exc.status == DECODE_PROBLEMS[type(exc)]
        assert PROBLEM_TYPES[exc.type] == ProblemInfo(exc.status, exc.title, False)
        assert exc.detail and exc.detail != exc.title, repr(exc)  # says what was wrong
        body = json.loads(bytes(problem_response(exc).body))
        assert (body["type"], body["status"], body["detail"]) == (
            exc.type,
            exc.status,
            exc.detail,
        )
        return None


def assert_reencodes(req: InferRequest) -> None:
    """An accepted request is a well-formed one: it survives our own encoder, both ways."""
    for binary in (True, False):
        if not binary and any(t.datatype == "FP16" for t in req.inputs):
            continue  # FP16 has no JSON form (test_decode_tritonclient_request)
        try:
            body, headers = encode_request(req, binary)
        except Problem as exc:  # BYTES that are not UTF-8 cannot be JSON; binary always works
            assert not binary and isinstance(exc, InvalidTensor), repr(exc)
            continue
        assert decode_request(body, _hl(headers), req.model, req.version) == req


MUTATED_ARRAYS = {
    "a": sample("FP32", (2, 2)),
    "b": sample("BYTES", (3,)),
    "c": sample("INT64", (1,)),
}


@pytest.mark.parametrize("binary", [True, False])
def test_the_unmutated_request_decodes(binary: bool) -> None:
    """Positive control of the mutation test below: the body it mutates is accepted."""
    body, n = triton_body(MUTATED_ARRAYS, binary, [th.InferRequestedOutput("o")])
    req = decode_request(body, n, "m", None)
    assert [(t.name, t.shape) for t in req.inputs] == [("a", (2, 2)), ("b", (3,)), ("c", (1,))]
    for t in req.inputs:
        assert np.array_equal(t.data, MUTATED_ARRAYS[t.name])
    assert req.outputs == (RequestedOutput("o", True),)  # tritonclient: binary by default
    assert_reencodes(req)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 100), max_size=6),
    json_values,
    st.booleans(),
    st.one_of(st.none(), st.integers(-3, 3)),
)
def test_mutated_requests_only_raise_problems(
    path: list[int], value: Any, binary: bool, hl_shift: int | None
) -> None:
    body, n = triton_body(MUTATED_ARRAYS, binary, [th.InferRequestedOutput("o")])
    doc = _mutate(json.loads(body[:n] if n else body), path, value)
    js = json.dumps(doc).encode()  # may emit NaN/Infinity: also must be refused cleanly
    hl = len(js) if n else None
    if hl_shift is not None:
        hl = len(js) + hl_shift
    req = decoded_or_refused(lambda: decode_request(js + body[n or len(body) :], hl, "m", None))
    if req is not None:
        assert_reencodes(req)


def test_garbage_positive_control() -> None:
    """The decoders that the garbage test feeds do accept a well-formed body."""
    good = InferRequest("m", None, None, (Tensor("x", "INT8", (2,), np.array([1, -2], "i1")),))
    for binary in (True, False):
        body, headers = encode_request(good, binary)
        assert decode_request(body, _hl(headers), "m", None) == good
        resp = InferResponse("m", None, None, good.inputs)
        body, headers = encode_response(resp, binary)
        assert decode_response(body, _hl(headers)) == resp


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-2, 300)))
def test_garbage_only_raises_problems(body: bytes, hl: int | None) -> None:
    req = decoded_or_refused(lambda: decode_request(body, hl, "m", None))
    if req is not None:
        assert_reencodes(req)
    resp = decoded_or_refused(lambda: decode_response(body, hl))
    if resp is not None:
        for binary in (True, False):
            again, headers = encode_response(resp, binary)
            assert decode_response(again, _hl(headers)) == resp


CORRUPTED = {"a": sample("BYTES", (3,)), "b": sample("BOOL", (4,))}


def test_uncorrupted_binary_section_decodes() -> None:
    """Positive control of the corruption test below."""
    body, n = triton_body(CORRUPTED, True)
    req = decode_request(body, n, "m", None)
    assert [t.data.tolist() for t in req.inputs] == [v.tolist() for v in CORRUPTED.values()]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 200))
def test_corrupted_binary_section_only_raises_problems(noise: bytes, at: int) -> None:
    body, n = triton_body(CORRUPTED, True)
    assert n is not None
    at = n + at % (len(body) - n + 1)
    corrupted = body[:at] + noise + body[at + len(noise) // 2 :]
    req = decoded_or_refused(lambda: decode_request(corrupted, n, "m", None))
    if req is not None:  # the JSON header is untouched: only the data may differ
        assert [(t.name, t.datatype, t.shape) for t in req.inputs] == [
            ("a", "BYTES", (3,)),
            ("b", "BOOL", (4,)),
        ]
        assert_reencodes(req)


# ---------------------------------------------------------------------- problems


def test_tensor_checks_its_data() -> None:
    with pytest.raises(ValueError, match="shape"):
        Tensor("x", "FP32", (3,), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        Tensor("x", "FP32", (2,), np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="datatype"):
        Tensor("x", "BF16", (2,), np.zeros(2, np.float32))


def test_problem_to_dict_and_response() -> None:
    p = UnknownModel("model 'x' is not served", extra={"model": "x", "status": 1})
    d = p.to_dict()
    assert d == {
        "type": "https://ztgate.dev/problems/unknown-model",
        "title": "Unknown model",
        "status": 404,
        "detail": "model 'x' is not served",
        "error": "model 'x' is not served",
        "model": "x",
    }
    r = problem_response(p)
    assert r.status_code == 404
    assert r.media_type == "application/problem+json"
    assert r.headers["content-type"] == "application/problem+json"
    assert json.loads(bytes(r.body)) == d


def test_retry_after_and_internal() -> None:
    p = RateLimited("slow down", retry_after=2.2)
    assert p.headers == {"Retry-After": "3"} and p.retryable and p.status == 429
    assert problem_response(p).headers["retry-after"] == "3"
    assert NoHealthyNode().headers["Retry-After"] == "1"
    assert NoHealthyNode().detail == NoHealthyNode.title
    internal = Internal("KeyError: 'secret'")
    assert "secret" not in json.dumps(internal.to_dict())
    assert internal.log_detail == "KeyError: 'secret'"


@pytest.fixture(scope="module")
def gateway(
    pki: PKI, triton_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A real gateway (TLS, the example registry, no nodes): enough to answer a 404."""
    cfg = gateway_config(
        pki, triton_repository.parent / "registry", tmp_path_factory.mktemp("gw"), []
    )
    with running_gateway(cfg) as gw:
        yield gw


def test_tritonclient_reads_problem_error(gateway: RunningGateway, pki: PKI) -> None:
    """tritonclient's own error handling, over a real connection, reports the problem's
    detail and status; positive control: the same client reads a model that exists."""
    from tritonclient.utils import InferenceServerException

    bob = pki.ensure("client", "bob")
    client = th.InferenceServerClient(
        gateway.url,
        ssl=True,
        ssl_options={
            "ca_certs": str(pki.root_ca),
            "certfile": str(bob.cert),
            "keyfile": str(bob.key),
        },
        network_timeout=30.0,
        connection_timeout=30.0,
    )
    try:
        assert client.get_model_metadata("iris")["name"] == "iris"
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("q")
    finally:
        client.close()
    assert err.value.message() == "Request for unknown model: 'q' is not found"
    assert err.value.status() == "404"


def test_problem_types_table() -> None:
    """Every problem type the gateway can send, with its status and retryability: exactly."""
    expected = {
        "bad-request": (400, False),
        "invalid-tensor": (400, False),
        "unauthenticated": (401, False),
        "forbidden": (403, False),
        "not-found": (404, False),
        "unknown-model": (404, False),
        "unknown-version": (404, False),
        "method-not-allowed": (405, False),
        "replayed-request": (409, False),
        "idempotency-conflict": (409, False),
        "policy-rollback": (409, False),
        "payload-too-large": (413, False),
        "unsupported-media-type": (415, False),
        "rate-limited": (429, True),
        "internal": (500, False),
        "unsupported-extension": (501, False),
        "upstream-failed": (502, True),
        "no-healthy-node": (503, True),
        "state-unavailable": (503, True),
        "log-unavailable": (503, True),
        "overloaded": (503, True),
        "deadline-exceeded": (504, True),
    }
    got = {t: (info.status, info.retryable) for t, info in PROBLEM_TYPES.items()}
    assert got == {PROBLEM_BASE + k: v for k, v in expected.items()}
    assert all(info.title for info in PROBLEM_TYPES.values())
