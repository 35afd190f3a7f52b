"""C2SP signed notes, checkpoints and cosignatures (Ed25519 only).

- signed-note (c2sp.org/signed-note): text ending in a newline, a blank line, then lines
  ``— <key name> base64(key id (4 bytes, BE) || signature)``;
  key id = SHA-256(name || 0x0A || type || public key)[:4], type 0x01 for Ed25519.
- tlog-checkpoint (c2sp.org/tlog-checkpoint): the note text is ``origin``, tree size,
  base64 root hash, then extension lines. ztgate adds one extension line,
  ``time <POSIX seconds>``, the log's signed claim of when it produced the checkpoint
  (receipt key windows are judged by it, and by witness timestamps when required).
- tlog-cosignature (c2sp.org/tlog-cosignature), Ed25519 type 0x04: signature over
  ``cosignature/v1\\ntime <t>\\n`` || checkpoint text; the line carries
  key id || u64 BE timestamp || signature.

Parsing is strict: a note that is not exactly in this form is rejected with a reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.receipts.canonical import b64, unb64
from gateway.receipts.merkle import HASH_SIZE
from gateway.receipts.signing import raw_public
from gateway.signer import Signer

__all__ = [
    "DASH",
    "Checkpoint",
    "Cosigner",
    "NoteError",
    "NoteKey",
    "SignedNote",
    "WitnessKey",
]

DASH = "\u2014"
SIG_ED25519 = 0x01
SIG_COSIGNATURE = 0x04
MAX_SIGNATURES = 64


class NoteError(ValueError):
    """A note, checkpoint or signature line that does not parse."""


def _key_id(name: str, sig_type: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"invalid key name {name!r}")


@dataclass(frozen=True, slots=True)
class SignedNote:
    text: str  # ends with "\n"
    signatures: tuple[tuple[str, bytes], ...]  # (key name, key id || signature bytes)

    @classmethod
    def parse(cls, raw: str | bytes) -> SignedNote:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise NoteError("note is not UTF-8") from None
        if any(ord(c) < 0x20 and c != "\n" for c in raw):
            raise NoteError("note holds control characters")
        if not raw.endswith("\n"):
            raise NoteError("note does not end with a newline")
        cut = raw.rfind("\n\n")
        if cut < 0:
            raise NoteError("note has no blank line before its signatures")
        text, sigs = raw[: cut + 1], raw[cut + 2 :]
        lines = sigs[:-1].split("\n") if sigs else []
        if not lines or len(lines) > MAX_SIGNATURES:
            raise NoteError("note must carry 1..64 signature lines")
        out = []
        for line in lines:
            out.append(_parse_sig_line(line))
        return cls(text, tuple(out))

    def render(self) -> str:
        return self.text + "\n" + "".join(f"{DASH} {n} {b64(s)}\n" for n, s in self.signatures)

    def with_signatures(self, lines: list[tuple[str, bytes]]) -> SignedNote:
        seen = set(self.signatures)
        extra = tuple(s for s in lines if s not in seen)
        return SignedNote(self.text, self.signatures + extra)


def _parse_sig_line(line: str) -> tuple[str, bytes]:
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != DASH:
        raise NoteError(f"malformed signature line {line[:80]!r}")
    _check_name(parts[1])
    try:
        blob = unb64(parts[2])
    except ValueError as exc:
        raise NoteError(f"signature line: {exc}") from None
    if len(blob) < 5:
        raise NoteError("signature too short")
    return parts[1], blob


def parse_signature_lines(body: str) -> list[tuple[str, bytes]]:
    """Signature lines as a witness returns them (each ending in a newline)."""
    if not body.endswith("\n"):
        raise NoteError("signature lines must end with a newline")
    return [_parse_sig_line(line) for line in body[:-1].split("\n")]


@dataclass(frozen=True, slots=True)
class NoteKey:
    """An Ed25519 note verifier key (type 0x01); the log's checkpoint key."""

    name: str
    public_key: ed25519.Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, SIG_ED25519, raw_public(self.public_key))

    def vkey(self) -> str:
        raw = bytes([SIG_ED25519]) + raw_public(self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{b64(raw)}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteKey:
        name, kid, blob = _split_vkey(vkey, SIG_ED25519)
        key = cls(name, ed25519.Ed25519PublicKey.from_public_bytes(blob))
        if key.key_id.hex() != kid:
            raise NoteError("vkey id does not match its key")
        return key

    def sign(self, private: Signer, text: str) -> tuple[str, bytes]:
        return self.name, self.key_id + private.sign(text.encode())

    def verify(self, note: SignedNote) -> bool | None:
        """True: a valid signature by this key; False: one that fails; None: none present."""
        found: bool | None = None
        for name, blob in note.signatures:
            if name == self.name and blob[:4] == self.key_id:
                try:
                    self.public_key.verify(blob[4:], note.text.encode())
                except InvalidSignature:
                    return False
                found = True
        return found


@dataclass(frozen=True, slots=True)
class WitnessKey:
    """A witness's Ed25519 cosignature key (type 0x04)."""

    name: str
    public_key: ed25519.Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return _key_id(self.name, SIG_COSIGNATURE, raw_public(self.public_key))

    def vkey(self) -> str:
        raw = bytes([SIG_COSIGNATURE]) + raw_public(self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{b64(raw)}"

    @classmethod
    def from_vkey(cls, vkey: str) -> WitnessKey:
        name, kid, blob = _split_vkey(vkey, SIG_COSIGNATURE)
        key = cls(name, ed25519.Ed25519PublicKey.from_public_bytes(blob))
        if key.key_id.hex() != kid:
            raise NoteError("vkey id does not match its key")
        return key

    def verify(self, note: SignedNote) -> tuple[str, int]:
        """("valid", earliest timestamp), ("invalid", 0) if one fails, ("absent", 0)."""
        best: int | None = None
        for name, blob in note.signatures:
            if name != self.name or blob[:4] != self.key_id:
                continue
            if len(blob) != 4 + 8 + 64:
                return "invalid", 0
            ts = int.from_bytes(blob[4:12], "big")
            if ts >= 1 << 63:
                return "invalid", 0
            try:
                self.public_key.verify(blob[12:], _cosigned_message(ts, note.text))
            except InvalidSignature:
                return "invalid", 0
            best = ts if best is None else min(best, ts)
        return ("absent", 0) if best is None else ("valid", best)


def _cosigned_message(timestamp: int, text: str) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


class Cosigner:
    """Produces tlog-cosignature/v1 lines with a witness key."""

    def __init__(self, name: str, private: Signer) -> None:
        _check_name(name)
        self.private = private
        self.key = WitnessKey(name, private.public_key())

    def cosign(self, text: str, timestamp: int) -> tuple[str, bytes]:
        sig = self.private.sign(_cosigned_message(timestamp, text))
        return self.key.name, self.key.key_id + timestamp.to_bytes(8, "big") + sig


def _split_vkey(vkey: str, sig_type: int) -> tuple[str, str, bytes]:
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError("a vkey is name+keyid+base64key")
    name, kid, blob64 = parts
    _check_name(name)
    try:
        blob = unb64(blob64, 33)
    except ValueError as exc:
        raise NoteError(f"vkey: {exc}") from None
    if blob[0] != sig_type:
        raise NoteError(f"vkey type {blob[0]:#04x}, expected {sig_type:#04x}")
    return name, kid, blob[1:]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time: int | None = None  # POSIX seconds, ztgate extension line `time <t>`
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        ext = ([f"time {self.time}"] if self.time is not None else []) + list(self.extensions)
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), b64(self.root), *ext))

    @classmethod
    def parse_text(cls, text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise NoteError("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3 or any(not line for line in lines):
            raise NoteError("checkpoint needs origin, size and root hash lines")
        origin, size_s, root_s, *ext = lines
        if not size_s.isdigit() or (size_s != "0" and size_s.startswith("0")):
            raise NoteError(f"bad tree size {size_s!r}")
        try:
            root = unb64(root_s, HASH_SIZE)
        except ValueError as exc:
            raise NoteError(f"bad root hash: {exc}") from None
        t: int | None = None
        rest = []
        for line in ext:
            if line.startswith("time "):
                value = line[5:]
                if t is not None or not value.isdigit() or (value != "0" and value[0] == "0"):
                    raise NoteError(f"bad time line {line!r}")
                t = int(value)
            else:
                rest.append(line)
        cp = cls(origin, int(size_s), root, t, tuple(rest))
        if cp.text() != text:
            raise NoteError("checkpoint text is not in canonical form")
        return cp
