"""The forwarder certificates `forward.crl` revokes, as the file says now.

The TLS context checks the CRL at the handshake only, and an edge's kept-alive connection
keeps its handshake: so the listener also asks this, per request, about the certificate
the connection was opened with. The file is re-read when it changes (the same signed-CRL
reading as the client CRL's, gateway/revocation.py), in a thread; one that cannot be read
or holds no CRL keeps what was read before, as a rejected TLS reload keeps the old
context.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cryptography import x509

from gateway.revocation import signed_crl_entries

log = logging.getLogger(__name__)

_CRL_BEGIN = b"-----BEGIN X509 CRL-----"


class ForwarderCRL:
    def __init__(self, crl: Path, ca: Path) -> None:
        self.path = crl
        self.ca = ca
        self._stamp: tuple[int, int] | None = None
        self._entries: frozenset[tuple[str, str]] = frozenset()
        self._load(self._stat())

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
            return
        self._entries = frozenset(entries)
        self._stamp = stamp

    async def refresh(self) -> None:
        """Re-read the file if it changed since it was last read (a stat per call)."""
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            await asyncio.to_thread(self._load, stamp)

    def revoked(self, cert: x509.Certificate) -> bool:
        return (cert.issuer.rfc4514_string(), format(cert.serial_number, "x")) in self._entries
