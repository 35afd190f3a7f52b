"""Ed25519 signing keys behind one interface: a PEM file, or a key in a PKCS#11 token.

Whatever signs (receipts, log checkpoints, witness cosignatures) takes a `Signer`: it
asks for the public key and for signatures, never for the private key, so a key that
lives in a hardware token (or SoftHSM) works wherever a file key does, and what it signs
verifies with the same public-key code (`cryptography`'s Ed25519 verify; the offline
verifier sees only public keys). An `Ed25519PrivateKey` is itself a `Signer`.

A token key is used by its label; the token is named by its label or its slot id, and
the user PIN is read from a file (never from the gateway's TOML). Keys made or imported
here are non-extractable and sensitive: the token will sign with them, never give them
out (`generate`, `import_key`). Signing is CKM_EDDSA (PKCS#11 3.0; SoftHSM >= 2.6).
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "ED25519_OID",
    "FileSigner",
    "Pkcs11Signer",
    "Signer",
    "SignerError",
    "Token",
    "raw_public",
    "read_pin",
]

ED25519_OID = "1.3.101.112"  # id-Ed25519 (RFC 8410), the EC_PARAMS of an Ed25519 key


class SignerError(Exception):
    """A key cannot be used: a missing file, token or label, a wrong PIN, a bad key."""


@runtime_checkable
class Signer(Protocol):
    """An Ed25519 key that can sign without handing out its private half."""

    def public_key(self) -> ed25519.Ed25519PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


class FileSigner:
    """An Ed25519 private key in a PEM (PKCS#8) file."""

    def __init__(self, path: Path) -> None:
        from gateway.pki import PKIError, load_signing_key

        self.path = path
        try:
            self._key = load_signing_key(path)
        except (OSError, ValueError, PKIError) as exc:
            raise SignerError(f"{path}: {exc}") from exc

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"FileSigner({str(self.path)!r})"


def read_pin(path: Path) -> str:
    """The PIN in `path` (one line). Refused if every user of the host may read it."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise SignerError(f"PIN file {path}: {exc.strerror or exc}") from exc
    if st.st_mode & stat.S_IROTH:
        raise SignerError(f"PIN file {path} is readable by every user; chmod o-r it")
    pin = text.strip("\r\n")
    if not pin:
        raise SignerError(f"PIN file {path} is empty")
    return pin


@dataclass(frozen=True)
class Token:
    """Where a PKCS#11 token is: its module (the vendor's library), its token label or
    slot id, and the file holding the user PIN."""

    module: Path
    pin_file: Path
    label: str | None = None
    slot: int | None = None

    def describe(self) -> str:
        where = f"token {self.label!r}" if self.label is not None else f"slot {self.slot}"
        return f"{where} ({self.module})"


# One logged-in session per token (module and slot) and process. Login state is per
# application in PKCS#11 (a second login to the same token fails), and a session must not
# run two operations at once: every use takes its lock.
_sessions: dict[tuple[str, int], tuple[Any, threading.Lock]] = {}
_named: dict[Token, tuple[str, int]] = {}
_sessions_lock = threading.Lock()


def _library(module: Path) -> Any:
    import pkcs11

    if not module.is_file():
        raise SignerError(f"PKCS#11 module {module} does not exist")
    try:
        return pkcs11.lib(os.path.realpath(module))  # one path per library and process
    except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
        raise SignerError(f"PKCS#11 module {module}: {exc!r}") from exc


def session(token: Token) -> tuple[Any, threading.Lock]:
    """This process's logged-in read-write session on `token` (opened once)."""
    import pkcs11
    from pkcs11 import exceptions as px

    with _sessions_lock:
        known = _named.get(token)
        if known is not None and known in _sessions:
            return _sessions[known]
        if (token.label is None) == (token.slot is None):
            raise SignerError("name the PKCS#11 token by its label or by its slot, one of them")
        lib = _library(token.module)
        try:
            if token.label is not None:
                tok = lib.get_token(token_label=token.label)
            else:
                slots = [s for s in lib.get_slots(token_present=True) if s.slot_id == token.slot]
                if not slots:
                    raise px.NoSuchToken
                tok = slots[0].get_token()
            where = (os.path.realpath(token.module), int(tok.slot.slot_id))
            if where not in _sessions:
                s = tok.open(user_pin=read_pin(token.pin_file), rw=True)
                _sessions[where] = (s, threading.Lock())
        except px.NoSuchToken:
            raise SignerError(f"no {token.describe()}") from None
        except px.PinIncorrect:
            raise SignerError(f"{token.describe()}: the PIN in {token.pin_file} is wrong") from None
        except (px.PinLocked, px.PinExpired) as exc:
            raise SignerError(f"{token.describe()}: PIN {type(exc).__name__}") from None
        except pkcs11.PKCS11Error as exc:
            raise SignerError(f"{token.describe()}: {type(exc).__name__} {exc}") from None
        _named[token] = where
        return _sessions[where]


def close_sessions() -> None:
    """Log out of every token this process opened (tests; a process exit does it too)."""
    with _sessions_lock:
        for s, lock in _sessions.values():
            with lock:
                s.close()
        _sessions.clear()
        _named.clear()


def _ec_point_raw(point: bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 CKA_EC_POINT: a DER OCTET STRING, or raw (some
    tokens, against the standard, store it bare)."""
    if len(point) == 34 and point[:2] == b"\x04\x20":
        return point[2:]
    if len(point) == 32:
        return point
    raise SignerError(f"not an Ed25519 public point ({len(point)} bytes)")


def _find(s: Any, label: str, cls: Any) -> Any:
    from pkcs11 import Attribute, KeyType
    from pkcs11 import exceptions as px

    found = list(
        s.get_objects(
            {Attribute.CLASS: cls, Attribute.LABEL: label, Attribute.KEY_TYPE: KeyType.EC_EDWARDS}
        )
    )
    if len(found) > 1:
        raise SignerError(
            f"{len(found)} Ed25519 keys are labelled {label!r}; labels must be unique"
        )
    if not found:
        raise px.NoSuchKey
    return found[0]


class Pkcs11Signer:
    """An Ed25519 key in a PKCS#11 token, found by its label; signs with CKM_EDDSA."""

    def __init__(self, token: Token, label: str) -> None:
        from pkcs11 import Attribute, ObjectClass
        from pkcs11 import exceptions as px

        self.token = token
        self.label = label
        self._session, self._lock = session(token)
        with self._lock:
            try:
                self._private = _find(self._session, label, ObjectClass.PRIVATE_KEY)
                public = _find(self._session, label, ObjectClass.PUBLIC_KEY)
                raw = _ec_point_raw(bytes(public[Attribute.EC_POINT]))
            except px.NoSuchKey:
                raise SignerError(
                    f"{token.describe()} has no Ed25519 key pair labelled {label!r} "
                    "(ztgate token keygen / import)"
                ) from None
            self.extractable = bool(self._private[Attribute.EXTRACTABLE])
        self._public = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        # A token whose public half does not belong to its private half would sign with a
        # key nobody trusts: one signature checked now says it before anything is signed.
        probe = b"ztgate-signer-probe/v1\n" + os.urandom(16)
        try:
            self._public.verify(self.sign(probe), probe)
        except Exception as exc:
            raise SignerError(
                f"{token.describe()}: key {label!r}: the public key does not verify the "
                f"private key's signature ({type(exc).__name__})"
            ) from None

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism, PKCS11Error

        with self._lock:
            try:
                return bytes(self._private.sign(data, mechanism=Mechanism.EDDSA))
            except PKCS11Error as exc:
                raise SignerError(f"{self.token.describe()}: signing failed: {exc!r}") from exc

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.token.describe()}, {self.label!r})"


# --- putting keys into a token ----------------------------------------------------------
def _private_template(label: str, key_id: bytes) -> dict[Any, Any]:
    from pkcs11 import Attribute

    return {
        Attribute.LABEL: label,
        Attribute.ID: key_id,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,  # the token signs with it and never gives it out
        Attribute.SIGN: True,
    }


def _refuse_existing(s: Any, token: Token, label: str) -> None:
    from pkcs11 import Attribute

    if list(s.get_objects({Attribute.LABEL: label})):
        raise SignerError(f"{token.describe()} already holds objects labelled {label!r}")


def generate(token: Token, label: str) -> ed25519.Ed25519PublicKey:
    """A new non-extractable Ed25519 key pair in the token; returns its public key."""
    from pkcs11 import Attribute, KeyType, Mechanism, PKCS11Error
    from pkcs11.util.ec import encode_named_curve_parameters

    s, lock = session(token)
    key_id = os.urandom(8)
    with lock:
        _refuse_existing(s, token, label)
        try:
            s.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                store=True,
                label=label,
                id=key_id,
                public_template={
                    Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID),
                    Attribute.VERIFY: True,
                },
                private_template=_private_template(label, key_id),
            )
        except PKCS11Error as exc:
            raise SignerError(f"{token.describe()}: key generation failed: {exc!r}") from exc
    return Pkcs11Signer(token, label).public_key()


def raw_public(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def import_key(token: Token, label: str, key: ed25519.Ed25519PrivateKey) -> None:
    """Put an existing Ed25519 key into the token as non-extractable (then destroy the
    file: the token cannot make the copy outside it unusable)."""
    from pkcs11 import Attribute, KeyType, ObjectClass, PKCS11Error
    from pkcs11.util.ec import encode_named_curve_parameters

    params = encode_named_curve_parameters(ED25519_OID)
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    s, lock = session(token)
    key_id = os.urandom(8)
    with lock:
        _refuse_existing(s, token, label)
        try:
            s.create_object(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                    Attribute.EC_PARAMS: params,
                    Attribute.VALUE: private,
                    **_private_template(label, key_id),
                }
            )
            s.create_object(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                    Attribute.EC_PARAMS: params,
                    Attribute.EC_POINT: b"\x04\x20" + raw_public(key.public_key()),
                    Attribute.LABEL: label,
                    Attribute.ID: key_id,
                    Attribute.TOKEN: True,
                    Attribute.VERIFY: True,
                }
            )
        except PKCS11Error as exc:
            raise SignerError(f"{token.describe()}: import failed: {exc!r}") from exc


def list_keys(token: Token) -> list[tuple[str, ed25519.Ed25519PublicKey, bool]]:
    """(label, public key, extractable) of each Ed25519 key pair in the token."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    s, lock = session(token)
    with lock:
        labels = sorted(
            {
                str(o[Attribute.LABEL])
                for o in s.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                        Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                    }
                )
            }
        )
    out = []
    for label in labels:
        signer = Pkcs11Signer(token, label)
        out.append((label, signer.public_key(), signer.extractable))
    return out
