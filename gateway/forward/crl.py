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

Only a CRL signed by a forwarder CA counts, and each CA's revocations only move forward:
a CA's CRL replaces the one held for it only when its CRL number (its thisUpdate, when it
has none) is not lower, so a validly signed older CRL that lists fewer certificates does
not un-revoke any. A CA is its name and its key (two CAs of one name, a key rotation,
keep each its own CRL and numbering), and of a CA's CRLs in one file the newest counts,
wherever it stands. A file that cannot be read, holds no CRL, none that verifies, or
makes the parser fail in any way keeps what was read before (an error is logged, as a
rejected TLS reload keeps the old context) and is tried again at the next look: a wrong
CA's CRL or a broken signature never empties the list.

What is held for a CA stays after its certificate leaves the CA file: harmless, as TLS
refuses the certificates it issued. Only a change of `forward.crl` triggers a re-read:
a change of the CA file alone does not (it is read again with the next CRL file).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

_CRL_END = b"-----END X509 CRL-----"
# How stale the per-request answer may be: the stat it saves is per request.
CHECK_INTERVAL_S = 1.0

_Stamp = tuple[int, int, int, int]  # inode, mtime_ns, ctime_ns, size
_Key = tuple[str, bytes]  # issuer, SHA-256 of the verifying CA's SubjectPublicKeyInfo


@dataclass(frozen=True)
class _Held:
    """One CA's CRL as read: how recent it is, and what it revokes."""

    number: int | None
    this_update: dt.datetime
    entries: frozenset[tuple[str, str]]

    def newer_than(self, other: _Held) -> bool:
        if self.number is not None and other.number is not None:
            return self.number >= other.number
        return self.this_update >= other.this_update


def _verified_crls(crl_pem: bytes, ca_pem: bytes) -> dict[_Key, _Held]:
    """(issuer, the verifying CA's key) -> the newest of its CRLs in the file, for each CRL
    signed by one of the CAs; others are logged and skipped. Keyed by the CA's key too, so
    that two CAs with one name (a key rotation) each keep their own CRL and numbering.
    ValueError when the file holds no CRL."""
    cas = x509.load_pem_x509_certificates(ca_pem)
    blocks = crl_pem.split(_CRL_END)[:-1]
    if not blocks:
        raise ValueError("no CRL in the file")
    out: dict[_Key, _Held] = {}
    for block in blocks:
        crl = x509.load_pem_x509_crl(block.strip() + b"\n" + _CRL_END + b"\n")
        issuer = crl.issuer.rfc4514_string()
        signer = next(
            (
                c
                for c in cas
                if c.subject == crl.issuer and crl.is_signature_valid(c.public_key())  # type: ignore[arg-type]
            ),
            None,
        )
        if signer is None:
            log.error("forward.crl: ignoring a CRL not signed by a forwarder CA (%s)", issuer)
            continue
        spki = signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        try:
            number: int | None = crl.extensions.get_extension_for_class(
                x509.CRLNumber
            ).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        entries = frozenset((issuer, format(r.serial_number, "x")) for r in crl)
        key = (issuer, hashlib.sha256(spki).digest())
        new, old = _Held(number, crl.last_update_utc, entries), out.get(key)
        if old is None or new.newer_than(old):  # `cat new.crl old.crl` keeps the new one
            out[key] = new
    return out


class ForwarderCRL:
    def __init__(self, crl: Path, ca: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = crl
        self.ca = ca
        self._clock = clock
        self._stamp: _Stamp | None = None
        self._held: dict[_Key, _Held] = {}
        self._entries: frozenset[tuple[str, str]] = frozenset()
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
            found = _verified_crls(self.path.read_bytes(), self.ca.read_bytes())
            if not found:
                raise ValueError("no CRL in it is signed by a forwarder CA")
        except Exception as exc:  # any fault (a parser surprise too) must not reach requests
            log.error("forward.crl unusable; keeping the revocations read before: %r", exc)
            return  # the stamp stays the old one: the next look reads the file again
        held = dict(self._held)
        for key, new in found.items():
            old = held.get(key)
            if old is None or new.newer_than(old):
                held[key] = new
            else:
                log.error(
                    "forward.crl: keeping %s's CRL (number %s, thisUpdate %s): the file's is "
                    "older (number %s, thisUpdate %s)",
                    key[0],
                    old.number,
                    old.this_update.isoformat(),
                    new.number,
                    new.this_update.isoformat(),
                )
        self._held = held
        self._entries = frozenset().union(*(h.entries for h in held.values()))
        self._stamp = stamp

    async def refresh(self) -> None:
        """Re-read the file if it changed since it was last read; looked at (a stat) at
        most once per `CHECK_INTERVAL_S` after the last look (or read) ended."""
        if self._reading is not None:
            await asyncio.shield(self._reading)  # a caller's cancellation spares the read
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
        await asyncio.shield(self._reading)

    async def _read(self, stamp: _Stamp) -> None:
        try:
            await asyncio.to_thread(self._load, stamp)
        finally:
            self._looked_at = self._clock()
            self._reading = None

    def revoked(self, cert: x509.Certificate) -> bool:
        return (cert.issuer.rfc4514_string(), format(cert.serial_number, "x")) in self._entries
