"""The forwarder certificates `forward.crl` revokes, as the file says now.

The TLS context checks the CRL at the handshake only, and an edge's kept-alive connection
keeps its handshake: so the listener also asks this, per request, about the certificate
the connection was opened with. The file is looked at (a stat, a syscall on the event
loop) at most once per `CHECK_INTERVAL_S` of the process's monotonic clock, whatever the
request rate, and re-read when it changed, in a thread; requests arriving during that
read wait for it (one read, shared), so none is checked against the list it replaces.
A revocation reaches a connection already open within that interval of the file's
change. The file's stamp holds its inode and ctime besides mtime and size: a copy that
keeps the size and the mtime (cp -p, rsync -t) still changes the ctime.

Revocations only accumulate while the process runs: every certificate a CRL signed by a
forwarder CA lists (any CA certificate of its issuer's name whose key verifies it) is
added to what is held, and nothing read later removes one. So no validly signed CRL can
un-revoke a forwarder — an older one replayed, one of the same number, a delta CRL (it
adds what it lists), a file that drops a CA's CRL — nor can a CRL the forwarder CA did
not sign, a broken file, or a parser fault (logged; the next look reads the file again).
Only a restart starts from the file alone: an officer's revocation must stay in the file
(SECURITY.md, forwarding). The read is bounded: a regular file only (a FIFO or device in
its place would block the read for ever), at most `MAX_BYTES`, and a request waits for a
read at most `READ_WAIT_S`, then is checked against what is held (logged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

log = logging.getLogger(__name__)

_CRL_END = b"-----END X509 CRL-----"
# How stale the per-request answer may be: the stat it saves is per request.
CHECK_INTERVAL_S = 1.0

_Stamp = tuple[int, int, int, int]  # inode, mtime_ns, ctime_ns, size
_Entry = tuple[str, str]  # issuer, serial as lowercase hex
MAX_BYTES = 8 << 20  # a CRL of ~200k entries; a bigger file is refused (kept: what is held)
READ_WAIT_S = 2.0


def _read_regular(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_BYTES (O_NONBLOCK: opening a
    FIFO put in its place must not wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES} bytes")
    return data


def _verified_entries(crl_pem: bytes, ca_pem: bytes) -> set[_Entry]:
    """What each CRL in the file signed by a forwarder CA revokes; others are logged and
    skipped. ValueError when no CRL in the file verifies."""
    cas = x509.load_pem_x509_certificates(ca_pem)
    out: set[_Entry] = set()
    verified = 0
    for block in crl_pem.split(_CRL_END)[:-1]:
        crl = x509.load_pem_x509_crl(block.strip() + b"\n" + _CRL_END + b"\n")
        issuer = crl.issuer.rfc4514_string()
        if not any(
            c.subject == crl.issuer and crl.is_signature_valid(c.public_key())  # type: ignore[arg-type]
            for c in cas
        ):
            log.error("forward.crl: ignoring a CRL not signed by a forwarder CA (%s)", issuer)
            continue
        verified += 1
        out |= {(issuer, format(r.serial_number, "x")) for r in crl}
    if not verified:
        raise ValueError("no CRL in it is signed by a forwarder CA")
    return out


class ForwarderCRL:
    def __init__(self, crl: Path, ca: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = crl
        self.ca = ca
        self._clock = clock
        self._stamp: _Stamp | None = None
        self._entries: frozenset[_Entry] = frozenset()
        self._reading: asyncio.Task[None] | None = None
        self._load(self._stat())
        self._looked_at = clock()

    def _stat(self) -> _Stamp | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _load(self, stamp: _Stamp | None) -> None:
        try:
            found = _verified_entries(_read_regular(self.path), self.ca.read_bytes())
        except Exception as exc:  # any fault (a parser surprise too) must not reach requests
            log.error("forward.crl unusable; keeping the revocations read before: %r", exc)
            return  # the stamp stays the old one: the next look reads the file again
        self._entries = self._entries | found
        self._stamp = stamp

    async def refresh(self) -> None:
        """Re-read the file if it changed since it was last read; looked at (a stat) at
        most once per `CHECK_INTERVAL_S` after the last look (or read) ended."""
        if self._reading is not None:
            await self._wait()  # a caller's cancellation spares the read (shielded)
            return
        now = self._clock()
        if now - self._looked_at < CHECK_INTERVAL_S:
            return
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            self._looked_at = now
            return
        self._reading = asyncio.ensure_future(self._read(stamp))
        # Retrieved even when every waiter was cancelled: no "never retrieved" warning.
        self._reading.add_done_callback(lambda t: t.cancelled() or t.exception())
        await self._wait()

    async def _wait(self) -> None:
        """Wait for the read in progress, at most READ_WAIT_S (a hung file system must not
        hang every forwarded request): then answer from what is held."""
        assert self._reading is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), READ_WAIT_S)
        except TimeoutError:
            log.error(
                "forward.crl: a read is taking over %ss; checking against what is held", READ_WAIT_S
            )

    async def _read(self, stamp: _Stamp) -> None:
        try:
            await asyncio.to_thread(self._load, stamp)
        finally:
            self._looked_at = self._clock()
            self._reading = None

    def revoked(self, cert: x509.Certificate) -> bool:
        return (cert.issuer.rfc4514_string(), format(cert.serial_number, "x")) in self._entries
