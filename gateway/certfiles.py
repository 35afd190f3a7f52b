"""An operator's own certificate files (not the dev PKI): read and checked once, the way
a TLS peer will check them, so a bad file is a usage error at start and not a handshake
failure later. What each server additionally needs (EKUs, SPIFFE path) its caller checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["CertFileError", "Leaf", "is_ca", "load_leaf"]


class CertFileError(ValueError):
    """A certificate or key file that cannot serve; the message names the flag."""


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    san: x509.SubjectAlternativeName
    eku: x509.ExtendedKeyUsage


def _spki(key: Any) -> bytes:
    out: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out


def load_leaf(cert_path: Path, key_path: Path) -> Leaf:
    """The chain's first certificate, checked to be the key's and to carry a SAN and an
    EKU. Raises `OSError`/`ValueError`/`TypeError` for unreadable files (the caller says
    which files), `CertFileError` for the rest."""
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise CertFileError(f"--key {key_path} is not the key of --cert {cert_path}")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertFileError(
            f"--cert {cert_path}: needs subjectAltName and extendedKeyUsage"
        ) from exc
    return Leaf(leaf, san, eku)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
