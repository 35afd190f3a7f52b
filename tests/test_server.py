"""The uvicorn TLS shim (per protocol class) and certificate rotation without a restart."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.pki import PKI
from gateway.server import (
    H11TLSProtocol,
    HttpToolsTLSProtocol,
    ReloadingContext,
    TLSFiles,
    handshake_failures,
    server_context,
)
from tests.gateway_harness import client_context, free_port


async def echo(request: Request) -> JSONResponse:
    tls = request.scope.get("extensions", {}).get("tls")
    return JSONResponse(tls)


@dataclass
class FixedContext:
    """A listening context that never reloads (for controls built apart from the gateway's)."""

    files: TLSFiles
    listening: ssl.SSLContext


@contextmanager
def serve(protocol: Any, tls: ReloadingContext | FixedContext) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=[Route("/", echo)]),
        host="127.0.0.1",
        port=port,
        http=protocol,
        loop="uvloop" if protocol is HttpToolsTLSProtocol else "asyncio",
        ssl_context_factory=lambda _c, _d: tls.listening,
        ssl_certfile=str(tls.files.cert),
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    runner = uvloop.run if protocol is HttpToolsTLSProtocol else asyncio.run
    thread = threading.Thread(target=runner, args=(server.serve(),), daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def files(pki: PKI, tmp_path: Path) -> TLSFiles:
    cert, key = pki.leaf_paths("gateway-server", "site-a", "site-a")
    shutil.copy(cert, tmp_path / "server.crt")
    shutil.copy(key, tmp_path / "server.key")
    shutil.copy(pki.client_ca_bundle(), tmp_path / "client-ca.crt")
    return TLSFiles(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "client-ca.crt")


@pytest.mark.parametrize("protocol", [HttpToolsTLSProtocol, H11TLSProtocol])
def test_shim_puts_the_peer_certificate_in_every_scope(
    protocol: Any, pki: PKI, files: TLSFiles
) -> None:
    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    with serve(protocol, ReloadingContext(files)) as port:
        with httpx.Client(verify=ctx, timeout=5) as c:
            first = c.get(f"https://127.0.0.1:{port}/").json()
            second = c.get(f"https://127.0.0.1:{port}/").json()
    leaf = x509.load_pem_x509_certificate(first["client_cert_chain"][0].encode())
    assert leaf.serial_number == alice.serial
    assert first["tls_version"] == 0x0304
    # Two requests, one kept-alive connection: the same connection id in both scopes.
    assert first["connection_id"] == second["connection_id"]


def test_tls13_only_and_no_tickets(pki: PKI, files: TLSFiles) -> None:
    alice = pki.ensure("client", "alice")
    with serve(HttpToolsTLSProtocol, ReloadingContext(files)) as port:
        old = client_context(pki, alice.cert, alice.key)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        before = handshake_failures()
        # The server refuses with the protocol_version alert, and records why.
        with pytest.raises(ssl.SSLError) as refused:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                old.wrap_socket(raw, server_hostname="localhost")
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
        assert handshake_failures() - before == Counter({"UNSUPPORTED_PROTOCOL": 1})
        # Positive control: the same code with TLS 1.3 allowed gets an answer.
        ctx = client_context(pki, alice.cert, alice.key)
        data, session, reused = _get_with_session(port, ctx)
        assert data.startswith(b"HTTP/1.1 200")
        assert not reused
        # Resumption is attempted with whatever session the first connection left: the
        # server issued no ticket, so the second connection is a full handshake.
        assert not session.has_ticket
        data, again, reused = _get_with_session(port, ctx, session)
        assert data.startswith(b"HTTP/1.1 200")
        assert reused is False and not again.has_ticket
    # Positive control for the observation: the same context with tickets allowed, the
    # same client code, and resumption does show.
    tickets = server_context(files)
    tickets.num_tickets = 2
    tickets.options &= ~ssl.OP_NO_TICKET
    with serve(HttpToolsTLSProtocol, FixedContext(files, tickets)) as port:
        ctx = client_context(pki, alice.cert, alice.key)
        data, session, reused = _get_with_session(port, ctx)
        assert data.startswith(b"HTTP/1.1 200") and not reused
        assert session.has_ticket
        data, _, reused = _get_with_session(port, ctx, session)
        assert data.startswith(b"HTTP/1.1 200")
        assert reused is True


def _get_with_session(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession, bool]:
    """One GET read to the end (so any session ticket has arrived): (reply, session, reused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert tls.session is not None
            return data, tls.session, tls.session_reused


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificates_rotate_without_restart_and_bad_files_keep_the_old(
    pki: PKI, files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    alice = pki.ensure("client", "alice")
    ctx = client_context(pki, alice.cert, alice.key)
    tls = ReloadingContext(files)
    with serve(HttpToolsTLSProtocol, tls) as port:
        before = _served_serial(port, ctx)
        fresh = pki.issue("gateway-server", "rotated", out=(files.cert, files.key))
        assert tls.check()
        after = _served_serial(port, ctx)
        assert after == fresh.serial != before
        files.cert.write_text("not a certificate")
        assert not tls.check()
        assert tls.failed_reloads == 1
        assert "REJECTED" in caplog.text
        assert _served_serial(port, ctx) == fresh.serial


def test_a_crl_loaded_at_start_is_honoured_at_the_handshake(
    pki: PKI, files: TLSFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    revoked = pki.issue("client", "crl-victim")
    kept = pki.issue("client", "crl-kept")
    crl = tmp_path / "client.crl"
    args = ["pki", "crl", str(revoked.cert), "--dir", str(pki.root), "--out", str(crl)]
    assert main(args) == 0
    with_crl = TLSFiles(files.cert, files.key, files.client_ca, crl)
    with serve(HttpToolsTLSProtocol, ReloadingContext(with_crl)) as port:
        # TLS 1.3: the client's handshake ends before the server has checked its
        # certificate; the server then hangs up without an alert, and records why.
        before = handshake_failures()
        assert _get(port, client_context(pki, revoked.cert, revoked.key)) == b""
        assert handshake_failures() - before == Counter({"certificate revoked": 1})
        # Positive control: same server, same code path, a certificate not on the CRL.
        before = handshake_failures()
        assert _get(port, client_context(pki, kept.cert, kept.key)).startswith(b"HTTP/1.1 200")
        assert handshake_failures() == before
    capsys.readouterr()
    assert main(["pki", "crl", str(files.key), "--dir", str(pki.root), "--out", str(crl)]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err


def _get(port: int, ctx: ssl.SSLContext) -> bytes:
    """The raw response to one GET, or b"" when the server refuses the connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return data
    except (ssl.SSLError, ConnectionResetError):
        return b""
