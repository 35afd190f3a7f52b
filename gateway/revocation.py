"""Revoked client certificates: checked on every request, grow-only, shared by replicas.

TLS alone does not do this: a kept-alive connection keeps its handshake, so the set is
consulted per request, keyed by (issuer, serial). Each replica keeps its own grow-only
copy on disk and pulls new entries from the shared store, so a wiped or compromised Redis
cannot un-revoke anyone. If the store cannot be reached the last-known set keeps serving
for the staleness budget; past it the gateway fails closed. Staleness is measured on a
clock that neither a restart nor a clock set back resets (gateway.clock).

Revocations also arrive signed, as CRLs of the client CA (`tls.crl`): every entry of a CRL
whose signature verifies is learnt into the same grow-only set, so a later CRL that
leaves an entry out (or an older file copied back) un-revokes nobody. A CRL not signed
by a client CA is ignored, loudly. This is the channel for an edge cut off from the core:
no store entry, only what the CA signed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

from cryptography import x509

from gateway.clock import PersistedClock
from gateway.state import StateStore, StoreUnavailable
from gateway.state.durable import FileRevocations

log = logging.getLogger(__name__)


class Revocations:
    def __init__(
        self,
        store: StateStore,
        local: Path | None,
        staleness_budget_s: float = 300.0,
        clock: PersistedClock | None = None,
        *,
        crl: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self.store = store
        self._crl = crl if crl is not None and client_ca is not None else None
        self._client_ca = client_ca
        self._crl_stamp: tuple[int, int] | None = None
        self.clock = clock or PersistedClock(None)
        # A first start gets the budget from now; a clock record deleted beside a
        # revocation file that holds entries is not a first start: stale until a sync.
        # (The embedded store creates the file empty before this runs.)
        history = local is not None and local.is_file() and local.stat().st_size > 0
        if self.clock.first_start and not history:
            self.clock.synced()
        # False at an edge whose revocations come from its core (gateway/uplink.py): the
        # local store answering says nothing about how fresh they are; a CRL pull does.
        self.fresh_from_store = True
        self._local = FileRevocations(local) if local is not None else None
        self._entries: set[tuple[str, str]] = (
            set(self._local.since(0)[1]) if self._local is not None else set()
        )
        self._store_version = 0
        self.staleness_budget_s = staleness_budget_s
        self.sync_failures = 0
        self.learn_crl()

    @property
    def version(self) -> int:
        """Grows with every entry this replica learns: it keys the policy decision cache."""
        return len(self._entries)

    def revoked(self, issuer: str, serial: str) -> bool:
        return (issuer, serial.lower()) in self._entries

    def stale_for(self) -> float:
        last = self.clock.last_sync
        return math.inf if last is None else max(0.0, self.clock.now() - last)

    def stale(self) -> bool:
        return self.stale_for() > self.staleness_budget_s

    def _learn(self, issuer: str, serial: str) -> bool:
        entry = (issuer, serial.lower())
        if entry in self._entries:
            return False
        if self._local is not None:
            self._local.add(*entry)  # fsynced before it counts
        self._entries.add(entry)
        return True

    def learn_crl(self) -> int:
        """Learn the entries of `tls.crl` if the file changed; the number new."""
        if self._crl is None or self._client_ca is None:
            return 0
        try:
            st = self._crl.stat()
            if (st.st_mtime_ns, st.st_size) == self._crl_stamp:
                return 0
            entries = signed_crl_entries(self._crl.read_bytes(), self._client_ca.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("tls.crl unreadable; revocations learnt before are kept: %s", exc)
            return 0
        self._crl_stamp = (st.st_mtime_ns, st.st_size)
        return sum(self._learn(issuer, serial) for issuer, serial in sorted(entries))

    async def revoke(self, issuer: str, serial: str) -> bool:
        """Revoke locally (durably) and publish to the other replicas; True if new."""
        new = self._learn(issuer, serial)
        await self.store.add_revocation(issuer, serial.lower())
        log.warning("revoked certificate serial %s of %s", serial, issuer)
        return new

    async def sync(self) -> int:
        """Pull entries other replicas published; the number learnt, or -1 if unreachable."""
        try:
            return await asyncio.wait_for(self._sync(), timeout=5.0)
        except (StoreUnavailable, TimeoutError) as exc:
            self.sync_failures += 1
            log.error("revocation source unreachable (stale %.0fs): %s", self.stale_for(), exc)
            return -1

    async def _sync(self) -> int:
        version, entries = await self.store.revocations_since(self._store_version)
        reset = version < self._store_version
        if reset:
            # The store was reset (or replaced): pull everything again; nothing is forgotten
            # here, since the local copy only grows.
            log.error("revocation store went backwards (%d < %d)", version, self._store_version)
            version, entries = await self.store.revocations_since(0)
        if reset or self._store_version == 0:
            # ... and give it back what it lost, so a replica that never saw an entry (or
            # starts after the reset) still learns it from the store.
            for issuer, serial in sorted(self._entries - set(entries)):
                version = await self.store.add_revocation(issuer, serial)
        learnt = sum(self._learn(i, s) for i, s in entries)
        self._store_version = version
        if self.fresh_from_store:
            self.clock.synced()
        return learnt

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.learn_crl)
            await self.sync()
            try:
                await asyncio.to_thread(self.clock.persist)
            except OSError as exc:  # a full disk must not stop revocation syncs
                log.error("clock record not written: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass

    def close(self) -> None:
        if self._local is not None:
            self._local.close()


def signed_crl_entries(crl_pem: bytes, client_ca_pem: bytes) -> set[tuple[str, str]]:
    """(issuer, serial as lowercase hex) of each certificate revoked by a PEM CRL in
    `crl_pem` signed by one of the CAs in `client_ca_pem`; other CRLs are logged, skipped."""
    cas = {c.subject.rfc4514_string(): c for c in x509.load_pem_x509_certificates(client_ca_pem)}
    out: set[tuple[str, str]] = set()
    end = b"-----END X509 CRL-----"
    for block in crl_pem.split(end)[:-1]:
        crl = x509.load_pem_x509_crl(block.strip() + b"\n" + end + b"\n")
        issuer = crl.issuer.rfc4514_string()
        ca = cas.get(issuer)
        if ca is None or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            log.error("ignoring a CRL not signed by a client CA (%s)", issuer)
            continue
        out |= {(issuer, format(r.serial_number, "x")) for r in crl}
    return out


def crl_signed_by(crl: Path, client_ca: Path) -> bool:
    """Whether every CRL in the file is signed by one of the client CAs (what an edge
    checks before installing a CRL its core sent)."""
    try:
        cas = {
            c.subject.rfc4514_string(): c
            for c in x509.load_pem_x509_certificates(client_ca.read_bytes())
        }
        end = b"-----END X509 CRL-----"
        blocks = crl.read_bytes().split(end)[:-1]
        for block in blocks:
            one = x509.load_pem_x509_crl(block.strip() + b"\n" + end + b"\n")
            ca = cas.get(one.issuer.rfc4514_string())
            if ca is None or not one.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return False
        return bool(blocks)
    except (OSError, ValueError):
        return False
