"""Fairness under load (issue 14): concurrency caps before the body, a small JSON cap, and
header/idle timeouts on the TLS listener. Real gateway, real TLS, real tritonservers.

No timing assertions: each test proves a mechanism (a refusal while most of a body is
unsent, a server-side counter), with generous guards so a broken build fails, not hangs.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.pki import PKI
from gateway.server import connections_timed_out
from tests.conftest import TritonCluster
from tests.gateway_harness import RunningGateway, client_context, gateway_config, running_gateway
from tests.test_gateway import IRIS, infer_body, node_table

GUARD_S = 30.0  # hang guard only; nothing asserts how fast anything happens
INFER = "/v2/models/iris/infer"


@pytest.fixture(scope="module")
def gateway(
    pki: PKI,
    triton_cluster: TritonCluster,
    triton_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    cfg = gateway_config(
        pki,
        triton_repository.parent / "registry",
        tmp_path_factory.mktemp("gwdata"),
        node_table(triton_cluster),
        # Short timeouts so the tests see them fire; the caps are the defaults.
        limits={"header_timeout_s": 1.0, "idle_timeout_s": 1.0},
    )
    with running_gateway(cfg) as gw:
        yield gw


@pytest.fixture(scope="module")
def alice(pki: PKI) -> ssl.SSLContext:
    issued = pki.ensure("client", "alice")
    return client_context(pki, issued.cert, issued.key)


@pytest.fixture(scope="module")
def bob(pki: PKI) -> ssl.SSLContext:
    issued = pki.ensure("client", "bob")
    return client_context(pki, issued.cert, issued.key)


def raw_tls(gw: RunningGateway, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", gw.cfg.listen.port), timeout=GUARD_S)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def post_head(length: int, extra: str = "") -> bytes:
    return (
        f"POST {INFER} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def wait_for(check: Any, what: str) -> None:
    end = time.monotonic() + GUARD_S
    while not check():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def closed_by_server(sock: ssl.SSLSocket, trickle: bool = False) -> bool:
    """Wait (bounded by the guard) until the server closes `sock`; with `trickle`, send
    one more header byte between reads, so the connection is never idle."""
    sock.settimeout(0.2)
    end = time.monotonic() + GUARD_S
    while time.monotonic() < end:
        try:
            if trickle:
                sock.sendall(b"a")
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            return True
    return False


def test_per_identity_cap_refuses_before_the_body(
    gateway: RunningGateway, alice: ssl.SSLContext, bob: ssl.SSLContext
) -> None:
    cap = gateway.cfg.limits.max_concurrent_per_identity
    conc = gateway.gw.concurrency
    body = json.dumps(infer_body(IRIS)).encode()
    # `cap` requests hold their slots: headers sent, the body not yet, so each handler
    # is waiting in the body read.
    holders = [raw_tls(gateway, alice) for _ in range(cap)]
    try:
        for s in holders:
            s.sendall(post_head(len(body)) + body[:10])
        wait_for(lambda: conc.in_flight == cap, f"{cap} requests in flight")

        # The next one: a 256 KiB body of which 1 KiB is sent. Its answer arrives with
        # 255 KiB unsent, so nothing past the headers (and what TCP buffered) was needed.
        big = 256 * 1024
        with raw_tls(gateway, alice) as extra:
            extra.sendall(post_head(big) + b"{" + b" " * 1023)
            status, headers, payload = read_response(extra)
        assert status == 429
        assert headers["content-type"] == "application/problem+json"
        assert headers["retry-after"].isdigit()
        problem = json.loads(payload)
        assert problem["type"].endswith("/rate-limited")
        assert "concurrent" in problem["detail"]

        # Positive control: another identity is served meanwhile.
        with httpx.Client(verify=bob, timeout=GUARD_S) as c:
            assert c.post(gateway.base + INFER, json=infer_body(IRIS)).status_code == 200

        # The holders finish their bodies and are answered...
        for s in holders:
            s.sendall(body[10:])
        for s in holders:
            assert read_response(s)[0] == 200
    finally:
        for s in holders:
            s.close()
    # ...and the identity is served again once its slots are free.
    wait_for(lambda: conc.in_flight == 0, "the slots to be released")
    with httpx.Client(verify=alice, timeout=GUARD_S) as c:
        assert c.post(gateway.base + INFER, json=infer_body(IRIS)).status_code == 200


def test_json_over_the_cap_is_refused_naming_the_binary_format(
    gateway: RunningGateway, alice: ssl.SSLContext
) -> None:
    cap = gateway.cfg.limits.max_json_bytes
    url = gateway.base + "/v2/models/mnist/infer"
    # 64 MNIST images (a batch the policy allows) as JSON numbers: about 1 MiB.
    x = (np.arange(64 * 784, dtype=np.float32).reshape(64, 784) % 255) / np.float32(255)
    doc = json.dumps(infer_body(x)).encode()
    assert cap // 2 < len(doc) <= cap
    doc += b" " * (cap + 1 - len(doc))  # JSON whitespace: exactly one byte over the cap
    with httpx.Client(verify=alice, timeout=GUARD_S) as c:
        r = c.post(url, content=doc)
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/problem+json"
        assert "Inference-Header-Content-Length" in r.json()["detail"]
        assert "binary" in r.json()["detail"]

        # Positive control: the same tensor as raw bytes after a small JSON header.
        raw = x.astype("<f4").tobytes()
        tensor = {
            "name": "input",
            "datatype": "FP32",
            "shape": list(x.shape),
            "parameters": {"binary_data_size": len(raw)},
        }
        head = json.dumps({"inputs": [tensor]}).encode()
        r = c.post(
            url,
            content=head + raw,
            headers={
                "Inference-Header-Content-Length": str(len(head)),
                "Content-Type": "application/octet-stream",
            },
        )
        assert r.status_code == 200, r.text


def test_a_refusal_before_the_body_closes_the_connection(
    gateway: RunningGateway, alice: ssl.SSLContext
) -> None:
    """A body refused unread (413 on its declared length) is not received afterwards: the
    server answers `Connection: close` and hangs up, so a client cannot stream refused
    megabytes at it over one kept-alive connection."""
    cap = gateway.cfg.limits.max_json_bytes
    with raw_tls(gateway, alice) as sock:
        sock.sendall(post_head(cap + 1) + b"{")
        status, headers, _ = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert closed_by_server(sock)
    # Control, built the same way: a refusal after the whole body was read (a malformed
    # body, 400) keeps the connection, and the next request on it is answered.
    body = json.dumps(infer_body(IRIS)).encode()
    with raw_tls(gateway, alice) as sock:
        sock.sendall(post_head(3) + b"{x}")
        status, headers, _ = read_response(sock)
        assert status == 400 and headers.get("connection") != "close"
        sock.sendall(post_head(len(body)) + body)
        assert read_response(sock)[0] == 200


def test_trickled_headers_are_cut_off(gateway: RunningGateway, alice: ssl.SSLContext) -> None:
    before = connections_timed_out()["header"]
    with raw_tls(gateway, alice) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        # A byte every 0.2 s: never idle, so only the header timeout can close it.
        assert closed_by_server(s, trickle=True)
    assert connections_timed_out()["header"] > before


def test_idle_connections_are_closed(gateway: RunningGateway, alice: ssl.SSLContext) -> None:
    before = connections_timed_out()["idle"]
    # Idle from the start: a handshake and then nothing.
    with raw_tls(gateway, alice) as s:
        assert closed_by_server(s)
    # Idle between requests (keep-alive).
    with raw_tls(gateway, alice) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(s)[0] == 200
        assert closed_by_server(s)
    assert connections_timed_out()["idle"] >= before + 2
