"""TLS for the mTLS listener, and the uvicorn shim that hands the peer certificate to the app.

uvicorn 0.54 puts no `extensions["tls"]` into the HTTP scope (for httptools or h11), so
the protocol classes below add the ASGI TLS extension themselves: the handshake is done
by `connection_made`, so the peer certificate is read once per connection and every
request scope on that connection gets it. Delete this module's shim once uvicorn ships
the extension (tests/test_server.py checks each enabled protocol class).

A refused handshake ends with the TLS alert that says why (TLS 1.3:
`certificate_required` when the client sent no certificate, `unknown_ca`, `bad_certificate`,
`certificate_expired`, ...). The event loop's TLS transport (asyncio's and uvloop's alike)
closes on a handshake error without flushing what OpenSSL wrote, alert included, so the
failing `do_handshake` first reports "want read": the transport sends the alert and waits,
and the next call (the client's next bytes, or its close) raises the stored error. The
reason is also logged, and counted by reason in `handshake_failures()`.

Certificate rotation without a restart: the listening context never changes (uvicorn
holds it), but its SNI callback, which OpenSSL calls on every handshake, with or without
SNI, switches the connection to the newest context built from the files. A bad file
keeps the previous context and logs an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]
_connection_ids = itertools.count(1)
_last_connection_id = 0
_handshake_failures: Counter[str] = Counter()
_timeouts: Counter[str] = Counter()


def connections_opened() -> int:
    """TLS connections this process has accepted (tests count connections with it)."""
    return _last_connection_id


def handshake_failures() -> Counter[str]:
    """TLS handshakes this process refused, by reason ("certificate has expired", ...)."""
    return Counter(_handshake_failures)


def connections_timed_out() -> Counter[str]:
    """Connections this process closed for a timeout, by kind ("header", "idle")."""
    return Counter(_timeouts)


class _RecordingSSLObject(ssl.SSLObject):
    """Records why a handshake failed, and lets the alert reach the peer (module doc)."""

    _refused: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._refused is not None:
            raise self._refused
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            verify = getattr(exc, "verify_message", None)
            reason = str(verify or exc.reason or type(exc).__name__)
            _handshake_failures[reason] += 1
            log.info("TLS handshake refused: %s", reason)
            # "Want read" makes the transport write out the alert OpenSSL queued; the
            # connection then fails on the next call, and the handshake timeout bounds
            # a peer that neither sends nor closes (as for any unfinished handshake).
            self._refused = exc
            raise ssl.SSLWantReadError("handshake refused; alert queued") from exc


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # chain: leaf first
    key: Path
    client_ca: Path  # the client CA only: the gateway's whole client-auth trust store
    crl: Path | None = None  # PEM CRL(s) of the client CA, checked at every handshake


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """TLS 1.3 only, client certificate required, no session tickets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # The trust store is the issuing client CA, not the root: without PARTIAL_CHAIN
    # OpenSSL insists on reaching a self-signed root.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    # With tickets, a revoked client could resume a pre-revocation session.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=files.client_ca)
    if files.crl is not None:
        ctx.load_verify_locations(cafile=files.crl)
        # Only with a CRL loaded: without one for the issuer, every handshake would fail.
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


class ReloadingContext:
    """The listening context; each handshake uses the newest good context from the files."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._stamp = self._stat()
        self.current = server_context(files)
        self.reloads = 0
        self.failed_reloads = 0
        self.listening = server_context(files)
        self.listening.sni_callback = self._on_handshake
        self.listening.sslobject_class = _RecordingSSLObject

    def _stat(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for p in (self.files.cert, self.files.key, self.files.client_ca, self.files.crl):
            if p is None:
                continue
            try:
                st = os.stat(p)
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((-1, -1))
        return tuple(stamps)

    def _on_handshake(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: object) -> None:
        sslobj.context = self.current

    def check(self) -> bool:
        """Rebuild the context if the files changed; True when a new one took effect."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            ctx = server_context(self.files)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failed_reloads += 1
            log.error(
                "TLS reload REJECTED, keeping the previous certificates: %s (%s)",
                exc,
                ", ".join(str(p) for p in (self.files.cert, self.files.key, self.files.client_ca)),
            )
            return False
        self.current = ctx
        self.reloads += 1
        log.warning("TLS certificates reloaded from %s", self.files.cert)
        return True

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.check()
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for one connection (spec fields, PEM leaf only)."""
    sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    version = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}.get(sslobj.version() or "")
    cipher = sslobj.cipher()
    global _last_connection_id
    _last_connection_id = next(_connection_ids)
    return {
        "server_cert": None,
        # Python 3.11 exposes only the leaf, not the chain the client sent.
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None if der else "no client certificate",
        "tls_version": version,
        "cipher_suite": cipher[0] if cipher else None,
        "connection_id": _last_connection_id,
    }


class _TLSScopeMixin:
    """Wraps the app per connection so every request scope carries `extensions["tls"]`."""

    app: ASGIApp

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        ext = tls_extension(transport)
        inner = self.app

        async def app(
            scope: MutableMapping[str, Any],
            receive: Callable[[], Awaitable[Any]],
            send: Callable[[Any], Awaitable[None]],
        ) -> None:
            extensions = scope.setdefault("extensions", {})
            extensions["tls"] = ext
            await inner(scope, receive, send)

        self.app = app


class HttpToolsTLSProtocol(_TLSScopeMixin, HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol with the ASGI TLS extension."""


class _TimedHttpToolsTLSProtocol(HttpToolsTLSProtocol):
    """Closes connections that hold a slot without sending a request (see `tls_protocol`).

    uvicorn arms its keep-alive timer only after a response, so a connection that never
    sends a request stays open for good, and it has no header timeout at all: a peer
    trickling a byte a second keeps a connection (a socket, a TLS context) forever. The
    TLS handshake is already done when `connection_made` runs (asyncio's own handshake
    timeout bounds that part).
    """

    header_timeout_s: float
    idle_timeout_s: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's keep-alive timer is the idle timer: it is cancelled by any byte
        # (`data_received`) and re-armed after each response, which is what idle means.
        # (uvicorn annotates it int; it only goes to `call_later`, which takes a float.)
        self.timeout_keep_alive = self.idle_timeout_s  # type: ignore[assignment]
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Idle before the first request too, not only between requests.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            _timeouts["idle"] += 1
        super().timeout_keep_alive_handler()

    def on_message_begin(self) -> None:
        # From the request's first byte: the idle timer stopped at that byte, so this one
        # bounds a peer that keeps the connection alive by trickling headers.
        super().on_message_begin()
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            _timeouts["header"] += 1
            log.info("closing a connection whose request headers took too long")
            # No 408: the peer is not reading a response it has not finished asking for.
            self.transport.close()


def tls_protocol(header_timeout_s: float, idle_timeout_s: float) -> type[HttpToolsTLSProtocol]:
    """The API listener's protocol class, with `limits.header_timeout_s`/`idle_timeout_s`.

    A class per configuration (uvicorn takes a class, not an instance), so gateways with
    different limits can share a process (the tests run several)."""
    return type(
        "TimedHttpToolsTLSProtocol",
        (_TimedHttpToolsTLSProtocol,),
        {"header_timeout_s": header_timeout_s, "idle_timeout_s": idle_timeout_s},
    )


class H11TLSProtocol(_TLSScopeMixin, H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol with the ASGI TLS extension."""
