"""`forward.crl` as the forward listener reads it (gateway/forward/crl.py): only a CRL the
forwarder CA signed counts, revocations only accumulate (no validly signed CRL, older,
of the same number, or a delta, un-revokes), the read is bounded (a regular file, a size
cap, a wait cap), a rewrite that keeps the size and the mtime is seen, and requests
arriving during a re-read wait for it.

Real parts: EC keys, a CA certificate and CRLs signed with `cryptography`, files on disk,
the real os.stat. The clock is the test's (the look interval is a second of it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import gateway.forward.crl as crl_mod
from gateway.forward.crl import CHECK_INTERVAL_S, ForwarderCRL

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test forwarder CA")])
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
A, B, C = 0xA1, 0xB2, 0xC3


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    pem: Path

    def crl(
        self,
        serials: Iterable[int],
        number: int | None = None,
        this_update: dt.datetime = T0,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(NAME)
            .last_update(this_update)
            .next_update(this_update + dt.timedelta(days=7))
        )
        if number is not None:
            b = b.add_extension(x509.CRLNumber(number), critical=False)
        for s in serials:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(T0).build()
            )
        signed = b.sign(key or self.key, hashes.SHA256())
        return signed.public_bytes(serialization.Encoding.PEM)


def _ca_cert(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A self-signed forwarder CA certificate named NAME for `key`."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0 - dt.timedelta(days=1))
        .not_valid_after(T0 + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "forwarder-ca.pem"
    pem.write_bytes(_ca_cert(key))
    return CA(key, pem)


class Reader:
    """A ForwarderCRL on the test's clock; `look` moves it past the interval and refreshes."""

    def __init__(self, path: Path, ca: CA) -> None:
        self.now = [0.0]
        self.crl = ForwarderCRL(path, ca.pem, clock=lambda: self.now[0])

    def look(self) -> None:
        self.now[0] += CHECK_INTERVAL_S
        asyncio.run(self.crl.refresh())

    def revoked(self, serial: int) -> bool:
        cert: Any = _Cert(serial)
        return self.crl.revoked(cert)


@dataclass
class _Cert:  # what `revoked` reads of a certificate: its issuer and serial
    serial_number: int
    issuer: x509.Name = NAME


def test_a_crl_not_signed_by_the_forwarder_ca_keeps_the_revocations(ca: CA, tmp_path: Path) -> None:
    """A file whose CRL is signed by another key (a wrong CA's CRL installed, a broken
    signature) keeps the revocations read before: it does not empty them. Control: a
    newer CRL the forwarder CA signed, adding one, is read."""
    path = tmp_path / "forward.crl"
    path.write_bytes(ca.crl([A], number=1))
    r = Reader(path, ca)
    assert r.revoked(A)
    assert not r.revoked(B)
    other = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(ca.crl([], number=2, key=other))
    r.look()
    assert r.revoked(A)  # refusal: the badly signed CRL un-revokes nobody
    path.write_bytes(ca.crl([A, B], number=2))
    r.look()
    assert r.revoked(A)  # control: a good newer CRL is read
    assert r.revoked(B)


@pytest.mark.parametrize("by", ["number", "this_update"])
def test_an_older_crl_does_not_unrevoke(ca: CA, tmp_path: Path, by: str) -> None:
    """A validly signed CRL older than the one held (a lower CRL number; without numbers,
    an earlier thisUpdate), or as recent, listing fewer certificates keeps the
    revocations: they only accumulate. Control: a newer CRL adding one is read."""

    def crl(serials: list[int], n: int) -> bytes:
        if by == "number":
            return ca.crl(serials, number=n)
        return ca.crl(serials, this_update=T0 + dt.timedelta(hours=n))

    path = tmp_path / "forward.crl"
    path.write_bytes(crl([A, B], 5))
    r = Reader(path, ca)
    assert r.revoked(A)
    assert r.revoked(B)
    path.write_bytes(crl([A], 4))
    r.look()
    assert r.revoked(B)  # refusal: replayed older CRL
    path.write_bytes(crl([A], 5))
    r.look()
    assert r.revoked(B)  # refusal: as recent, fewer entries
    assert not r.revoked(C)
    path.write_bytes(crl([A, C], 6))
    r.look()
    assert r.revoked(C)  # control: a newer CRL is read
    assert r.revoked(B)


def test_a_delta_crl_adds_and_unrevokes_nobody(ca: CA, tmp_path: Path) -> None:
    """A delta CRL (a higher number, only the new revocations; signed by the CA, often
    public) in place of the base, or after it in one file, un-revokes nobody the base
    listed. Control: what the delta lists is revoked."""
    base = ca.crl([A, B], number=10)
    delta = ca.crl([C], number=11)
    path = tmp_path / "forward.crl"
    path.write_bytes(base)
    r = Reader(path, ca)
    path.write_bytes(delta)
    r.look()
    assert r.revoked(A)  # refusal: the delta replaced the file
    assert r.revoked(C)  # control
    both = tmp_path / "both.crl"
    both.write_bytes(base + delta)
    fresh = Reader(both, ca)
    assert fresh.revoked(A)
    assert fresh.revoked(C)


def test_a_fifo_or_an_oversized_file_in_its_place_keeps_the_revocations(
    ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO in the CRL's place (its read would block for ever) and a file over the size
    cap are refused without blocking; what was held stays. Control: a regular file of
    the right size in the same place is read."""
    path = tmp_path / "forward.crl"
    path.write_bytes(ca.crl([A], number=1))
    r = Reader(path, ca)
    path.unlink()
    os.mkfifo(path)
    r.look()  # returns: O_NONBLOCK and the regular-file check
    assert r.revoked(A)
    path.unlink()
    monkeypatch.setattr(crl_mod, "MAX_BYTES", 64)
    path.write_bytes(ca.crl([A, B], number=2))
    r.look()
    assert not r.revoked(B)  # refusal: over the cap, not read
    monkeypatch.setattr(crl_mod, "MAX_BYTES", 8 << 20)
    path.write_bytes(ca.crl([A, B], number=3))
    r.look()
    assert r.revoked(B)  # control


async def test_a_read_that_does_not_end_holds_requests_back_at_most_the_wait_cap(
    ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read stuck in its thread (a hung file system: held on an event here, since no
    hang can be caused on demand) holds a request back at most READ_WAIT_S; it is then
    checked against what is held. Control: once the read ends, its CRL counts."""
    monkeypatch.setattr(crl_mod, "READ_WAIT_S", 0.2)
    path = tmp_path / "forward.crl"
    path.write_bytes(ca.crl([A], number=1))
    r = Reader(path, ca)
    release = threading.Event()
    real = crl_mod._verified_entries

    def stuck(data: bytes, ca_pem: bytes) -> Any:
        release.wait(60)
        return real(data, ca_pem)

    monkeypatch.setattr(crl_mod, "_verified_entries", stuck)
    try:
        path.write_bytes(ca.crl([A, B], number=2))
        r.now[0] += CHECK_INTERVAL_S
        await asyncio.wait_for(r.crl.refresh(), 30)  # returns after the wait cap
        assert not r.revoked(B)  # checked against what is held meanwhile
        await asyncio.wait_for(r.crl.refresh(), 30)  # a later request: the same cap
        release.set()
        for _ in range(300):
            if r.revoked(B):
                break
            await asyncio.sleep(0.05)
        assert r.revoked(B)  # control: the read, once done, counts
    finally:
        release.set()


def test_a_rewrite_keeping_size_and_mtime_is_seen(
    ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRL rewritten in place with the same size and its mtime put back (what cp -p,
    rsync -t, touch -r do) is re-read: the ctime, which no copy can keep, is in the stamp.
    Control: an untouched file is looked at and not re-read (reads counted around the
    real parser)."""
    a, b = ca.crl([A], number=1), ca.crl([A, B], number=2)
    size = max(len(a), len(b))  # the same size: padded (bytes after the last CRL are ignored)
    a, b = a.ljust(size, b"\n"), b.ljust(size, b"\n")
    path = tmp_path / "forward.crl"
    path.write_bytes(a)
    r = Reader(path, ca)
    reads: list[bytes] = []
    real = crl_mod._verified_entries

    def counting(data: bytes, ca_pem: bytes) -> Any:
        reads.append(data)
        return real(data, ca_pem)

    monkeypatch.setattr(crl_mod, "_verified_entries", counting)
    r.look()
    assert not reads  # control: unchanged, not re-read
    st = path.stat()
    with path.open("r+b") as f:  # in place: the same inode
        f.write(b)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    r.look()
    assert len(reads) == 1
    assert r.revoked(B)


async def test_requests_during_a_read_wait_for_it(
    ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that arrive while one re-reads a changed CRL wait for that read (there is
    one) and are checked against the new list, not the old. The read is held in its
    thread on an event the test sets (a stand-in for a large CRL's parse: no slow read
    can be caused on demand). Control: before the change, the certificate is served."""
    path = tmp_path / "forward.crl"
    path.write_bytes(ca.crl([A], number=1))
    r = Reader(path, ca)
    assert not r.revoked(B)  # control
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = crl_mod._verified_entries

    def held(data: bytes, ca_pem: bytes) -> Any:
        calls.append(1)
        entered.set()
        release.wait(60)
        return real(data, ca_pem)

    monkeypatch.setattr(crl_mod, "_verified_entries", held)
    try:
        path.write_bytes(ca.crl([A, B], number=2))
        r.now[0] += CHECK_INTERVAL_S
        first = asyncio.ensure_future(r.crl.refresh())
        await asyncio.to_thread(entered.wait, 60)
        others = [asyncio.ensure_future(r.crl.refresh()) for _ in range(5)]
        await asyncio.sleep(0)
        assert not any(t.done() for t in others)  # they wait for the read in flight
        release.set()
        await asyncio.gather(first, *others)
        assert r.revoked(B)
        assert len(calls) == 1
    finally:
        release.set()  # a failed assertion must not leave the read's thread waiting


def test_a_file_with_a_newer_and_an_older_crl_of_one_ca_keeps_the_newer(
    ca: CA, tmp_path: Path
) -> None:
    """`cat new.crl old.crl`: every CRL of the file counts, so the older one after the
    newer drops nothing. Control: the same two CRLs the other way round, and the older
    one alone (which does not revoke B)."""
    new, old = ca.crl([A, B], number=2), ca.crl([A], number=1)
    newer_first, older_first, alone = (
        tmp_path / "newer-first.crl",
        tmp_path / "older-first.crl",
        tmp_path / "alone.crl",
    )
    newer_first.write_bytes(new + old)
    older_first.write_bytes(old + new)
    alone.write_bytes(old)
    assert Reader(newer_first, ca).revoked(B)  # the fix: the older CRL after it is not kept
    assert Reader(older_first, ca).revoked(B)  # control
    only_old = Reader(alone, ca)
    assert only_old.revoked(A)  # control: the older CRL is read...
    assert not only_old.revoked(B)  # ...and does not revoke B


def test_two_forwarder_cas_of_one_name_keep_each_its_crl(ca: CA, tmp_path: Path) -> None:
    """Two forwarder CAs with one subject (a key rotation: both in the CA file for a
    while): a CRL counts when either key verifies it. The old CA's CRL number 50 neither
    hides the new CA's number 1 (A stays revoked, C is) nor keeps the new CA's later CRLs
    out; the old CA's older CRL un-revokes nobody. Control: with the old CA's CRL alone,
    C is not revoked."""
    rotated = ec.generate_private_key(ec.SECP256R1())
    ca.pem.write_bytes(ca.pem.read_bytes() + _ca_cert(rotated))
    path = tmp_path / "forward.crl"
    path.write_bytes(ca.crl([A], number=50))
    r = Reader(path, ca)
    assert r.revoked(A)
    assert not r.revoked(C)  # control
    path.write_bytes(ca.crl([A], number=50) + ca.crl([C], number=1, key=rotated))
    r.look()
    assert r.revoked(A)
    assert r.revoked(C)
    path.write_bytes(ca.crl([], number=49) + ca.crl([C, B], number=2, key=rotated))
    r.look()
    assert r.revoked(A)  # refusal: the old CA's older CRL un-revokes nobody
    assert r.revoked(B)  # the new CA's next CRL is read
    assert r.revoked(C)


def test_an_unexpected_parse_fault_keeps_the_revocations(
    ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault the CRL parser raises other than ValueError (a TypeError from
    `is_signature_valid` for a CA key type it does not take, a DuplicateExtension) keeps
    what was held, and the refresh every request awaits returns (the listener answers as
    before: served, or 403 for a revoked certificate; never 500). The parser is made to
    raise TypeError: with the EC and RSA CAs ztgate issues no real CRL file causes it.
    Control: once the parser works again, the same file is read."""
    path = tmp_path / "forward.crl"
    path.write_bytes(ca.crl([A], number=1))
    r = Reader(path, ca)
    real = crl_mod._verified_entries

    def broken(data: bytes, ca_pem: bytes) -> Any:
        raise TypeError("unsupported key type")

    monkeypatch.setattr(crl_mod, "_verified_entries", broken)
    path.write_bytes(ca.crl([A, B], number=2))
    r.look()  # does not raise
    assert r.revoked(A)  # refusal: kept
    assert not r.revoked(B)
    monkeypatch.setattr(crl_mod, "_verified_entries", real)
    r.look()
    assert r.revoked(B)  # control: the file is tried again at the next look
