"""The forwarder certificates `forward.crl` revokes, as the file says now.

The TLS context checks the CRL at the handshake only, and an edge's kept-alive connection
keeps its handshake: so the listener also asks this, per request, about the certificate
the connection was opened with. The file is looked at (a stat, a syscall on the event
loop) at most once per `CHECK_INTERVAL_S` of the process's monotonic clock, whatever the
request rate, and re-read when it changed (the same signed-CRL reading as the client
CRL's, gateway/revocation.py), in a thread: a revocation reaches a connection already
open within that interval of the file's change. A file that cannot be read or holds no
CRL keeps what was read before, as a rejected TLS reload keeps the old context, and is
tried again at the next look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from gateway.revocation import signed_crl_entries

log = logging.getLogger(__name__)

_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
# How stale the per-request answer may be: the stat it saves is per request.
CHECK_INTERVAL_S = 1.0


class ForwarderCRL:
    def __init__(self, crl: Path, ca: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = crl
        self.ca = ca
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._entries: frozenset[tuple[str, str]] = frozenset()
        self._load(self._stat())
        self._looked_at = clock()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self, stamp: tuple[int, int] | None) -> None:
        try:
            data = self.path.read_bytes()
            if _CRL_BEGIN not in data:
                raise ValueError("no CRL in the file")
            entries = signed_crl_entries(data, self.ca.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("forward.crl unreadable; keeping the revocations read before: %s", exc)
            return  # the stamp stays the old one: the next look reads the file again
        self._entries = frozenset(entries)
        self._stamp = stamp

    async def refresh(self) -> None:
        """Re-read the file if it changed since it was last read; looked at (a stat) at
        most once per `CHECK_INTERVAL_S`."""
        now = self._clock()
        if now - self._looked_at < CHECK_INTERVAL_S:
            return
        self._looked_at = now
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            await asyncio.to_thread(self._load, stamp)

    def revoked(self, cert: x509.Certificate) -> bool:
        return (cert.issuer.rfc4514_string(), format(cert.serial_number, "x")) in self._entries
