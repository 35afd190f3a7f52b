"""Revocations that arrive signed (CRLs of the client CA) join the grow-only set.

The channel an edge cut off from the core has: no store entry, only what the CA signed.
A later CRL that leaves an entry out un-revokes nobody; a CRL signed by another CA is
ignored, while the same CRL signed by the client CA is learnt (the positive control).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from gateway.pki import PKI, client_crl
from gateway.revocation import Revocations
from gateway.state.memory import MemoryStore


def _issuer(pki: PKI) -> str:
    return x509.load_pem_x509_certificate(
        pki.ca_cert("client").read_bytes()
    ).subject.rfc4514_string()


def test_a_signed_crl_is_learnt_and_a_later_one_cannot_undo_it(pki: PKI, tmp_path: Path) -> None:
    alice = pki.ensure("client", "crl-alice")
    bob = pki.ensure("client", "crl-bob")
    crl = client_crl(pki, [alice.serial], tmp_path / "client.crl")
    revs = Revocations(
        MemoryStore(), tmp_path / "revoked.jsonl", crl=crl, client_ca=pki.client_ca_bundle()
    )
    issuer = _issuer(pki)
    assert revs.revoked(issuer, format(alice.serial, "x"))
    assert not revs.revoked(issuer, format(bob.serial, "x"))  # only what the CRL names
    # The CA issues a newer CRL that names bob only (alice's entry dropped).
    client_crl(pki, [bob.serial], crl)
    os.utime(crl, ns=(1, 1))  # a distinct stamp even within one mtime tick
    assert revs.learn_crl() == 1
    assert revs.revoked(issuer, format(bob.serial, "x"))
    assert revs.revoked(issuer, format(alice.serial, "x"))  # still: grow-only
    revs.close()
    # And after a restart, from the durable copy, with no CRL at all.
    again = Revocations(MemoryStore(), tmp_path / "revoked.jsonl")
    assert again.revoked(issuer, format(alice.serial, "x"))
    again.close()


def test_a_crl_not_signed_by_the_client_ca_is_ignored(pki: PKI, tmp_path: Path) -> None:
    other = PKI.init(tmp_path / "other-pki", sites=["site-a"])
    victim = pki.ensure("client", "crl-victim")
    # Signed by another CA with the same subject name: its signature does not verify.
    forged = client_crl(other, [victim.serial], tmp_path / "forged.crl")
    revs = Revocations(MemoryStore(), None, crl=forged, client_ca=pki.client_ca_bundle())
    assert not revs.revoked(_issuer(pki), format(victim.serial, "x"))
    # Positive control: the same serial in a CRL the client CA signed.
    real = client_crl(pki, [victim.serial], tmp_path / "real.crl")
    revs = Revocations(MemoryStore(), None, crl=real, client_ca=pki.client_ca_bundle())
    assert revs.revoked(_issuer(pki), format(victim.serial, "x"))
